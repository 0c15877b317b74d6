"""Privacy accounting of central DP with Google's `dp-accounting` (extra `dp`).

Each noised round is one event in a ledger; epsilon at `dp_delta` is what the library's
accountant (by name: "rdp", Renyi DP, or "pld", privacy loss distributions) says the
ledger composes to. The ledger, not the accountant, is what is saved: an accountant is
rebuilt from it on restart (identical rounds are run-length encoded, so a 10,000-round
ledger is a handful of entries and PLD composes each once with `count`).

What one round is, as the selector samples it (aggregator/selection.py):

- Every device trains (no `clients_per_round`): the Gaussian mechanism on the sum of
  clipped updates, sensitivity 1 clip under add/remove-one device, noise multiplier z
  (GaussianDpEvent(z)).
- A cohort of m devices drawn uniformly without replacement from the n online ones
  (fixed size, `random.sample`): the library amplifies this only for RDP and only under
  replace-one neighbouring (Wang, Balle and Kasiviswanathan 2019), where one device's
  update is swapped for another's, so the sum moves by up to 2 clips and the Gaussian's
  noise multiplier is z / 2: SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z/2)).
  A round announced several times (a deadline passed short) samples fresh devices each
  time; its inclusion probability is bounded by the sum of each plan's m_k / n_k (a union
  bound, never below the true one). The round then closes on the first K of the cohort
  to answer: a device outside it cannot be in the sum, which is all the theorem needs.
  PLD has no without-replacement event, so "pld" claims no amplification for sampled
  cohorts: every device counts in every round, under add/remove (valid, pessimistic).
  Poisson sampling is not what the selector does, so no round is accounted as Poisson.
- Adaptive clipping (Andrew et al. 2021) also releases a noised count of the updates
  within the clip, each device moving it by 1/2 (bits centred on 0) with noise std
  sigma_b: a second Gaussian on the same sample, GaussianDpEvent(2 sigma_b) (sigma_b
  under replace-one), composed with the first inside the sampling event.

Every noised round computed is spent, whether or not the model guard then took its model:
the noise was drawn on private data (rounds.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fedmq.errors import ConfigError, require

ADD_OR_REMOVE = "add_or_remove_one"
REPLACE_ONE = "replace_one"
RELATIONS = (ADD_OR_REMOVE, REPLACE_ONE)


def _library():
    return require("dp_accounting", "dp", package="dp-accounting")


@dataclass(frozen=True, kw_only=True)
class RoundEvent:
    """One noised round: noise multiplier `z` on the sum (in clips), `count_noise`
    sigma_b of adaptive clipping's count (0: none), and the cohort sampled without
    replacement as `sample` of `population` (0 of 0: every device took part)."""

    z: float
    count_noise: float = 0.0
    sample: int = 0
    population: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.z) and self.z > 0):
            raise ConfigError(f"a DP round's noise multiplier {self.z} must be > 0")
        if not (math.isfinite(self.count_noise) and self.count_noise >= 0):
            raise ConfigError(f"the clip count's noise {self.count_noise} must be >= 0")
        if not 0 <= self.sample <= self.population:
            raise ConfigError(f"a cohort of {self.sample} of {self.population} devices")

    @property
    def sampled(self) -> bool:
        return 0 < self.sample < self.population

    def dp_event(self, relation: str):
        """The library's event for this round under `relation`."""
        lib = _library()
        scale = 0.5 if relation == REPLACE_ONE else 1.0  # replace-one: sensitivity doubles
        gaussians = [lib.GaussianDpEvent(self.z * scale)]
        if self.count_noise:  # the count's sensitivity is 1/2 under add/remove, 1 replacing
            gaussians.append(lib.GaussianDpEvent(self.count_noise * 2.0 * scale))
        event = gaussians[0] if len(gaussians) == 1 else lib.ComposedDpEvent(gaussians)
        if self.sampled and relation == REPLACE_ONE:
            return lib.SampledWithoutReplacementDpEvent(
                source_dataset_size=self.population, sample_size=self.sample, event=event)
        return event

    def to_list(self) -> list[float]:
        return [self.z, self.count_noise, self.sample, self.population]

    @classmethod
    def from_list(cls, values: Any) -> RoundEvent:
        z, count_noise, sample, population = values
        return cls(z=float(z), count_noise=float(count_noise), sample=int(sample),
                   population=int(population))


def cohort_event(*, z: float, count_noise: float = 0.0, inclusion: float,
                 asked: int) -> RoundEvent:
    """The event of a round whose devices were each in the cohort with probability at
    most `inclusion` (1 or more: no sampling), `asked` of them in all."""
    if inclusion >= 1.0 or asked < 1:
        return RoundEvent(z=z, count_noise=count_noise)
    # the smallest population whose ratio is at least the bound: q = asked / n >= inclusion
    population = max(asked, math.floor(asked / inclusion + 1e-9))
    return RoundEvent(z=z, count_noise=count_noise, sample=asked, population=population)


# -- the accountants, by name -----------------------------------------------------------

@dataclass(frozen=True)
class AccountantKind:
    name: str
    amplifies: bool  # claims amplification by sampling without replacement
    build: Callable[[str], Any]  # relation -> a fresh library accountant


# RDP orders: the library's default set has 156, up to 1024, and its subsampled-without-
# replacement bound costs 2-4 s per distinct round at those; these 28 cost 0.3 s and
# give the same epsilon to 3 digits from epsilon 0.5 to 50 (benchmarked in the tests).
RDP_ORDERS = (1.1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 10, 12, 14, 16,
              20, 24, 28, 32, 48, 64, 96, 128, 256)
# PLD's discretisation: pessimistic, so an upper bound; 1e-4 (the default) takes 10 s to
# compose 20 rounds, this 0.6 s, and moves epsilon by 1e-8.
PLD_INTERVAL = 1e-3


def _rdp(relation: str):
    lib = _library()
    return lib.rdp.RdpAccountant(list(RDP_ORDERS), neighboring_relation=_relation(relation))


def _pld(relation: str):
    lib = _library()
    return lib.pld.PLDAccountant(neighboring_relation=_relation(relation),
                                 value_discretization_interval=PLD_INTERVAL)


def _relation(relation: str):
    rel = _library().NeighboringRelation
    return rel.REPLACE_ONE if relation == REPLACE_ONE else rel.ADD_OR_REMOVE_ONE


_ACCOUNTANTS: dict[str, AccountantKind] = {}


def register_accountant(kind: AccountantKind) -> AccountantKind:
    if kind.name in _ACCOUNTANTS:
        raise ValueError(f"privacy accountant {kind.name!r} registered twice")
    _ACCOUNTANTS[kind.name] = kind
    return kind


register_accountant(AccountantKind("rdp", amplifies=True, build=_rdp))
register_accountant(AccountantKind("pld", amplifies=False, build=_pld))


def accountant_names() -> list[str]:
    return sorted(_ACCOUNTANTS)


def accountant_kind(name: str) -> AccountantKind:
    kind = _ACCOUNTANTS.get(name)
    if kind is None:
        raise ConfigError(f"dp_accountant {name!r} must be one of "
                          f"{', '.join(accountant_names())}")
    return kind


# -- the ledger -------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LedgerSettings:
    accountant: str = "rdp"
    delta: float = 1e-5
    sampled: bool = False  # cohorts are sampled (clients_per_round > 0)

    def __post_init__(self) -> None:
        accountant_kind(self.accountant)
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp_delta {self.delta} must be in (0, 1)")

    @property
    def relation(self) -> str:
        """Replace-one where amplification by sampling without replacement is claimed."""
        return REPLACE_ONE if self.sampled and accountant_kind(self.accountant).amplifies \
            else ADD_OR_REMOVE


class PrivacyLedger:
    """Every noised round spent so far, and the epsilon they compose to."""

    def __init__(self, settings: LedgerSettings) -> None:
        _library()  # the extra is missing: say so at start-up, not at the first round
        self.settings = settings
        self.entries: list[list[Any]] = []  # [event as a list, count], in order
        self._accountant = None  # built lazily from the entries
        self._epsilon: float | None = 0.0
        # The last epsilon_after: (rounds spent, event) -> epsilon. The budget peeks at the
        # next round before it is spent and again at close, each ~0.35-1 s for sampled
        # cohorts: a peek at the same event reuses it, and spending it sets epsilon().
        self._after: tuple[tuple[int, tuple[float, ...]], float] | None = None

    @property
    def rounds(self) -> int:
        return sum(int(count) for _, count in self.entries)

    def _normalize(self, event: RoundEvent) -> RoundEvent:
        """What the accountant is told: no cohort when it claims no amplification."""
        if self.settings.relation == REPLACE_ONE:
            return event
        return RoundEvent(z=event.z, count_noise=event.count_noise)

    def spend(self, event: RoundEvent) -> None:
        event = self._normalize(event)
        values = event.to_list()
        known = self._peeked(event)
        if self.entries and self.entries[-1][0] == values:
            self.entries[-1][1] += 1
        else:
            self.entries.append([values, 1])
        if self._accountant is not None:
            self._accountant.compose(event.dp_event(self.settings.relation))
        self._epsilon = known

    def _peeked(self, event: RoundEvent) -> float | None:
        """epsilon_after(event) if it was asked at this ledger state (event normalized)."""
        if self._after is not None and self._after[0] == (self.rounds, tuple(event.to_list())):
            return self._after[1]
        return None

    def _built(self):
        if self._accountant is None:
            acc = accountant_kind(self.settings.accountant).build(self.settings.relation)
            for values, count in self.entries:
                acc.compose(RoundEvent.from_list(values).dp_event(self.settings.relation),
                            int(count))
            self._accountant = acc
        return self._accountant

    def epsilon(self) -> float:
        """Epsilon at the settings' delta of every round spent (0 for none)."""
        if self._epsilon is None:
            self._epsilon = float(self._built().get_epsilon(self.settings.delta)) \
                if self.entries else 0.0
        return self._epsilon

    def epsilon_after(self, event: RoundEvent) -> float:
        """Epsilon if `event` were spent next (the ledger itself is unchanged)."""
        event = self._normalize(event)
        known = self._peeked(event)
        if known is not None:
            return known
        trial = copy.deepcopy(self._built())
        trial.compose(event.dp_event(self.settings.relation))
        after = float(trial.get_epsilon(self.settings.delta))
        self._after = ((self.rounds, tuple(event.to_list())), after)
        return after

    def state_dict(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "relation": self.settings.relation,
                "entries": [[list(v), int(c)] for v, c in self.entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved ledger; ConfigError if it is damaged or was kept under another
        neighbouring relation (its epsilons would not compose with ours)."""
        try:
            relation = state["relation"]
            entries = [[RoundEvent.from_list(v).to_list(), int(c)] for v, c in state["entries"]]
            if relation not in RELATIONS or any(c < 1 for _, c in entries):
                raise ValueError(f"relation {relation!r}, counts must be >= 1")
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the checkpoint's privacy ledger is damaged ({exc}); move the "
                              "checkpoint away to start a fresh private run") from None
        if relation != self.settings.relation:
            raise ConfigError(
                f"the checkpoint's privacy ledger was kept under {relation} neighbouring, "
                f"this configuration accounts under {self.settings.relation} (dp_accountant "
                "and clients_per_round decide it): keep the settings of the run, or start "
                "a fresh checkpoint")
        self.entries = entries
        self._accountant, self._epsilon, self._after = None, None, None


def legacy_ledger_entries(rdp: float) -> list[list[Any]]:
    """A checkpoint from before the ledger kept only sum(1 / (2 z^2)) of its rounds: the
    same RDP curve is one Gaussian round of z = sqrt(1 / (2 rdp))."""
    if rdp <= 0:
        return []
    return [[RoundEvent(z=math.sqrt(1.0 / (2.0 * rdp))).to_list(), 1]]
