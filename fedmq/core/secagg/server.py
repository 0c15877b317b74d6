"""The server's side of one secure-aggregation round, sans I/O: messages and time in,
messages and finally the field sum out.

Stages (docs/secagg.md), each closed as soon as every device it waits for has answered,
or at its deadline (`tick(now)`, times passed in):

1. keys:    collect AdvertiseKeys; send each device its neighbours' keys.
2. shares:  collect ShareKeys; route each encrypted share to its recipient.
3. inputs:  collect MaskedInput (a re-send counts once) into a running sum.
4. unmask:  ask the devices that sent inputs for one share per neighbour: of the
            self-mask seed b_i of every survivor, of the mask key of every device that
            shared but sent no input; rebuild them and remove their masks from the sum.

Who leaves when: before sharing (or left with fewer than `threshold` neighbours) ->
excluded, in no one's masks; after sharing but before its input -> dropped, its
pairwise masks removed via its rebuilt mask key; after its input -> still counted, its
self mask removed via its neighbours' shares. The server never asks for, accepts or
holds both secrets of one device. A round that cannot finish (fewer than `min_clients`
left at a stage, too few shares at the last deadline) raises SecureAggregationError
from `receive`/`tick`; `failure` keeps it. No individual input is ever unmasked.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.core.protocol.wire import Message
from fedmq.core.secagg import keys, prg, shamir
from fedmq.core.secagg.client import pair_sign
from fedmq.core.secagg.field import Field, Quantizer
from fedmq.core.secagg.graph import choose_parameters, neighbour_sets
from fedmq.core.secagg.messages import (
    SESSION_BYTES,
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    NeighbourKeys,
    PeerKeys,
    RoutedShares,
    SecAggSetup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmq.errors import ConfigError, ProtocolError, SecureAggregationError

KEYS = "keys"
SHARES = "shares"
INPUTS = "inputs"
UNMASK = "unmask"
DONE = "done"
FAILED = "failed"
STAGES = (KEYS, SHARES, INPUTS, UNMASK)
_EXPECTS: dict[str, type[Message]] = {KEYS: AdvertiseKeys, SHARES: ShareKeys,
                                      INPUTS: MaskedInput, UNMASK: UnmaskResponse}
STATE_FORMAT = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class StageTimeouts:
    """Seconds each stage waits for devices that have not answered yet."""

    keys_s: float = 30.0
    shares_s: float = 30.0
    inputs_s: float = 300.0  # devices train meanwhile
    unmask_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("keys_s", "shares_s", "inputs_s", "unmask_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"secure aggregation {name} must be > 0")

    def of(self, stage: str) -> float:
        return float(getattr(self, f"{stage}_s"))


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message to send: to one device, or (to=None) to every device still in the round."""

    to: str | None
    message: Message


@dataclass(frozen=True, slots=True)
class Handled:
    """What became of one incoming message; `status` is a Receipt status."""

    status: str  # "accepted", "duplicate" or "rejected"
    reason: str = ""
    outgoing: tuple[Outbound, ...] = ()


@dataclass(frozen=True, slots=True)
class SecAggResult:
    """The unmasked field sum of the survivors' inputs, and who is in it."""

    total: np.ndarray
    survivors: tuple[str, ...]  # their inputs are in `total`
    dropped: tuple[str, ...]  # shared secrets, sent no input: their masks were removed
    excluded: tuple[str, ...]  # left before sharing: never part of any mask

    def float_sum(self, setup: SecAggSetup) -> np.ndarray:
        return setup.quantizer.dequantize_sum(self.total, len(self.survivors))


class SecAggServer:
    """One round. Not thread-safe: one owner drives it."""

    def __init__(self, setup: SecAggSetup, *, timeouts: StageTimeouts | None = None,
                 now: float) -> None:
        self.setup = setup
        self.timeouts = timeouts or StageTimeouts()
        self._count = len(setup.participants)
        self._indices = {d: i for i, d in enumerate(setup.participants)}
        self._graph = neighbour_sets(self._count, setup.neighbours, setup.session)
        self.stage = KEYS
        self.deadline = now + self.timeouts.keys_s
        self.result: SecAggResult | None = None
        self.failure: SecureAggregationError | None = None
        self._keys: dict[int, tuple[bytes, bytes]] = {}  # (cipher, mask) public keys
        self._seen_keys: set[bytes] = set()
        self._u1: frozenset[int] = frozenset()  # keys routed to them
        self._shares: dict[int, dict[int, bytes]] = {}  # sender -> recipient -> ciphertext
        self._u2: frozenset[int] = frozenset()  # shares routed to them
        self._sum = setup.field.zeros(setup.vector_size)
        self._inputs: dict[int, bytes] = {}  # sender -> SHA-256 of its masked input
        self._u3: frozenset[int] = frozenset()  # their inputs are in the sum
        self._dropped: frozenset[int] = frozenset()  # in U2, not in U3
        self._self_shares: dict[int, dict[int, bytes]] = {}  # owner -> x -> b share
        self._key_shares: dict[int, dict[int, bytes]] = {}  # owner -> x -> mask-key share
        self._responded: set[int] = set()

    # -- events ------------------------------------------------------------------------

    def start(self) -> list[Outbound]:
        """The setup, for every participant."""
        return [Outbound(None, self.setup)]

    def receive(self, message: Message, *, now: float) -> Handled:
        """Take one device's message. Bad input is rejected with a reason, never raised;
        SecureAggregationError means the round is lost."""
        kind = type(message)
        if kind not in _EXPECTS.values():
            return Handled("rejected", "wrong_kind")
        if message.session != self.setup.session or message.round != self.setup.round:
            return Handled("rejected", "wrong_session")
        index = self._indices.get(message.device_id)
        if index is None:
            return Handled("rejected", "not_participant")
        if kind is MaskedInput and index in self._inputs:
            # a re-send of the counted input is acknowledged again; another one is not taken
            return _again(hashlib.sha256(message.data).digest() == self._inputs[index])
        if self.stage in (DONE, FAILED):
            return Handled("rejected", "round_closed")
        if kind is not _EXPECTS[self.stage]:
            late = STAGES.index(self.stage) > [*_EXPECTS.values()].index(kind)
            return Handled("rejected", "late" if late else "early")
        handler = {KEYS: self._on_keys, SHARES: self._on_shares, INPUTS: self._on_input,
                   UNMASK: self._on_unmask}[self.stage]
        handled = handler(index, message)
        if handled.status != "accepted" or handled.reason or not self._stage_complete():
            return handled
        return Handled(handled.status, handled.reason, tuple(self._close_stage(now)))

    def tick(self, now: float) -> list[Outbound]:
        """Close the current stage if its deadline has passed."""
        if self.stage in (DONE, FAILED) or now < self.deadline:
            return []
        return self._close_stage(now)

    # -- stage handlers ------------------------------------------------------------------

    def _on_keys(self, i: int, m: AdvertiseKeys) -> Handled:
        if i in self._keys:
            return _again(self._keys[i] == (m.cipher_key, m.mask_key))
        if m.cipher_key in self._seen_keys or m.mask_key in self._seen_keys \
                or m.cipher_key == m.mask_key:
            return Handled("rejected", "key_reuse")
        self._keys[i] = (m.cipher_key, m.mask_key)
        self._seen_keys |= {m.cipher_key, m.mask_key}
        return Handled("accepted")

    def _on_shares(self, i: int, m: ShareKeys) -> Handled:
        if i not in self._u1:
            return Handled("rejected", "excluded")
        shares = {s.peer: s.ciphertext for s in m.shares}
        if i in self._shares:
            return _again(self._shares[i] == shares)
        if set(shares) != self._graph[i] & self._u1:
            return Handled("rejected", "bad_recipients")
        self._shares[i] = shares
        return Handled("accepted")

    def _on_input(self, i: int, m: MaskedInput) -> Handled:
        if i not in self._u2:
            return Handled("rejected", "excluded")
        try:
            y = self.setup.field.from_bytes(m.data, self.setup.vector_size)
        except ProtocolError as exc:
            return Handled("rejected", exc.reason)
        self.setup.field.add_into(self._sum, y)
        self._inputs[i] = hashlib.sha256(m.data).digest()
        return Handled("accepted")

    def _on_unmask(self, i: int, m: UnmaskResponse) -> Handled:
        if i not in self._u3:
            return Handled("rejected", "excluded")
        if i in self._responded:
            return Handled("duplicate")
        mine = self._graph[i] & self._u2  # whose shares device i holds
        for share in m.self_mask_shares:
            if share.owner not in mine or share.owner not in self._u3:
                return Handled("rejected", "wrong_secret")
        for share in m.key_shares:
            if share.owner not in mine or share.owner not in self._dropped:
                return Handled("rejected", "wrong_secret")
        for share in m.self_mask_shares:
            self._self_shares.setdefault(share.owner, {})[i + 1] = share.share
        for share in m.key_shares:
            self._key_shares.setdefault(share.owner, {})[i + 1] = share.share
        self._responded.add(i)
        return Handled("accepted")

    # -- stage transitions ---------------------------------------------------------------

    def _stage_complete(self) -> bool:
        if self.stage == KEYS:
            return len(self._keys) == self._count
        if self.stage == SHARES:
            return set(self._shares) >= self._u1
        if self.stage == INPUTS:
            return set(self._inputs) >= self._u2
        if self.stage == UNMASK:
            return self._responded >= self._u3 or not self._missing_shares()
        return False

    def _close_stage(self, now: float) -> list[Outbound]:
        try:
            out = {KEYS: self._close_keys, SHARES: self._close_shares,
                   INPUTS: self._close_inputs, UNMASK: self._close_unmask}[self.stage]()
        except SecureAggregationError as exc:
            self.stage, self.failure = FAILED, exc
            self._forget()
            raise
        if self.stage in STAGES:
            self.deadline = now + self.timeouts.of(self.stage)
        return out

    def _prune(self, alive: set[int]) -> frozenset[int]:
        """Drop devices with fewer than `threshold` neighbours left (their secrets could not
        be rebuilt) until every remaining one has enough."""
        t = self.setup.threshold
        while weak := {i for i in alive if len(self._graph[i] & alive) < t}:
            alive -= weak
        return frozenset(alive)

    def _require_clients(self, alive: frozenset[int], what: str, answered: int) -> None:
        if len(alive) < self.setup.min_clients:
            raise SecureAggregationError(
                f"round {self.setup.round}: only {len(alive)} of {self._count} devices "
                f"{what} ({answered} answered), fewer than min_clients "
                f"{self.setup.min_clients}; the round is abandoned with no update revealed",
                reason="too_few_devices")

    def _close_keys(self) -> list[Outbound]:
        self._u1 = self._prune(set(self._keys))
        self._require_clients(self._u1, "advertised keys with enough neighbours",
                              len(self._keys))
        self.stage = SHARES
        return [Outbound(self.setup.participants[i], NeighbourKeys(
            device_id=self.setup.participants[i], round=self.setup.round,
            session=self.setup.session,
            keys=[PeerKeys(index=j, cipher_key=self._keys[j][0], mask_key=self._keys[j][1])
                  for j in sorted(self._graph[i] & self._u1)]))
            for i in sorted(self._u1)]

    def _close_shares(self) -> list[Outbound]:
        self._u2 = self._prune(set(self._shares) & self._u1)
        self._require_clients(self._u2, "shared their secrets with enough neighbours",
                              len(self._shares))
        out = [Outbound(self.setup.participants[i], RoutedShares(
            device_id=self.setup.participants[i], round=self.setup.round,
            session=self.setup.session,
            shares=[EncryptedShare(peer=j, ciphertext=self._shares[j][i])
                    for j in sorted(self._graph[i] & self._u2)]))
            for i in sorted(self._u2)]
        self._shares = {}  # routed: the server has no further use for them
        self.stage = INPUTS
        return out

    def _close_inputs(self) -> list[Outbound]:
        self._u3 = frozenset(self._inputs)
        self._require_clients(self._u3, "sent their masked input", len(self._u3))
        self._dropped = self._u2 - self._u3
        self.stage = UNMASK
        names = self.setup.participants
        return [Outbound(names[i], UnmaskRequest(
            device_id=names[i], round=self.setup.round, session=self.setup.session,
            survivors=sorted(self._graph[i] & self._u3 | {i}),
            dropped=sorted(self._graph[i] & self._dropped), inputs=len(self._u3)))
            for i in sorted(self._u3)]

    def _needed(self) -> list[tuple[int, dict[int, dict[int, bytes]]]]:
        """(owner, where its shares go) for every secret the sum needs rebuilt."""
        return ([(i, self._self_shares) for i in sorted(self._u3)]
                + [(j, self._key_shares) for j in sorted(self._dropped)
                   if self._graph[j] & self._u3])

    def _missing_shares(self) -> list[int]:
        t = self.setup.threshold
        return [owner for owner, store in self._needed() if len(store.get(owner, {})) < t]

    def _close_unmask(self) -> list[Outbound]:
        missing = self._missing_shares()
        if missing:
            names = ", ".join(self.setup.participants[i] for i in missing[:5])
            raise SecureAggregationError(
                f"round {self.setup.round}: too few devices answered the unmask request to "
                f"rebuild the secrets of {len(missing)} device(s) ({names}"
                f"{', ...' if len(missing) > 5 else ''}); plan for a higher dropout rate "
                "(more neighbours)", reason="too_few_shares")
        if set(self._self_shares) & set(self._key_shares):  # never, by construction
            raise SecureAggregationError("holding shares of both secrets of one device",
                                         reason="both_secrets")
        setup, field, size = self.setup, self.setup.field, self.setup.vector_size
        total = self._sum.copy()
        for i in sorted(self._u3):
            seed = shamir.combine(self._self_shares[i], threshold=setup.threshold)
            field.add_into(total, prg.expand(seed, size, field, purpose=prg.SELF_MASK),
                           sign=-1)
        for j in sorted(self._dropped):
            partners = self._graph[j] & self._u3
            if not partners:
                continue
            pair = keys.keypair_from_private(
                shamir.combine(self._key_shares[j], threshold=setup.threshold))
            if pair.public != self._keys[j][1]:
                raise SecureAggregationError(
                    f"the mask key rebuilt for {setup.participants[j]} does not match the one "
                    "it advertised: a share is corrupt", reason="bad_share")
            for i in sorted(partners):  # device i masked with j: take that mask out
                seed = keys.mask_seed(pair, self._keys[i][1], session=setup.session)
                field.add_into(total, prg.expand(seed, size, field, purpose=prg.PAIR_MASK),
                               sign=-pair_sign(i, j))
        names = setup.participants
        self.result = SecAggResult(
            total=total,
            survivors=tuple(names[i] for i in sorted(self._u3)),
            dropped=tuple(names[i] for i in sorted(self._dropped)),
            excluded=tuple(names[i] for i in range(self._count) if i not in self._u2))
        self.stage = DONE
        self._forget()
        return []

    def _forget(self) -> None:
        """Drop what the round no longer needs (shares, the masked sum)."""
        self._shares, self._self_shares, self._key_shares = {}, {}, {}

    # -- persistence ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on after a restart: no device secret is in it (shares
        are held encrypted until routed; revealed ones are the server's to see)."""
        pairs = _pairs
        return {
            "format": STATE_FORMAT, "setup": self.setup.to_payload(), "stage": self.stage,
            "keys": [[i, c, m] for i, (c, m) in sorted(self._keys.items())],
            "u1": sorted(self._u1), "u2": sorted(self._u2), "u3": sorted(self._u3),
            "dropped": sorted(self._dropped),
            "shares": [[i, pairs(s)] for i, s in sorted(self._shares.items())],
            "sum": self._sum.copy(), "inputs": pairs(self._inputs),
            "self_shares": [[i, pairs(s)] for i, s in sorted(self._self_shares.items())],
            "key_shares": [[i, pairs(s)] for i, s in sorted(self._key_shares.items())],
            "responded": sorted(self._responded),
            "result": None if self.result is None else {
                "total": self.result.total.copy(), "survivors": list(self.result.survivors),
                "dropped": list(self.result.dropped), "excluded": list(self.result.excluded)},
            "failure": None if self.failure is None else [str(self.failure),
                                                          self.failure.reason],
        }

    def load_state_dict(self, state: dict[str, Any], *, now: float) -> None:
        """Restore a saved round of the same setup; the current stage's deadline starts
        afresh (monotonic clocks do not survive a restart)."""
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"secure-aggregation state format {state.get('format')} is not "
                              f"supported (this build reads {STATE_FORMAT})")
        if bytes(state["setup"]) != self.setup.to_payload():
            raise ConfigError("saved secure-aggregation state belongs to another round or "
                              "setup; start the round afresh")
        if state["stage"] not in (*STAGES, DONE, FAILED):
            raise ConfigError(f"unknown secure-aggregation stage {state['stage']!r}")
        total = np.asarray(state["sum"], dtype=np.uint32)
        if total.shape != (self.setup.vector_size,):
            raise ConfigError(f"saved masked sum has shape {total.shape}, the round sums "
                              f"{self.setup.vector_size} values")
        nested = _nested
        self.stage = state["stage"]
        self._keys = {int(i): (bytes(c), bytes(m)) for i, c, m in state["keys"]}
        self._seen_keys = {k for pair in self._keys.values() for k in pair}
        self._u1, self._u2, self._u3 = (frozenset(int(i) for i in state[k])
                                        for k in ("u1", "u2", "u3"))
        self._dropped = frozenset(int(i) for i in state["dropped"])
        self._shares = nested(state["shares"])
        self._sum = total.copy()
        self._inputs = {int(i): bytes(d) for i, d in state["inputs"]}
        self._self_shares = nested(state["self_shares"])
        self._key_shares = nested(state["key_shares"])
        self._responded = {int(i) for i in state["responded"]}
        saved = state.get("result")
        self.result = None if saved is None else SecAggResult(
            total=np.asarray(saved["total"], dtype=np.uint32).copy(),
            survivors=tuple(saved["survivors"]), dropped=tuple(saved["dropped"]),
            excluded=tuple(saved["excluded"]))
        failure = state.get("failure")
        self.failure = None if failure is None else SecureAggregationError(
            failure[0], reason=failure[1])
        if self.stage in STAGES:
            self.deadline = now + self.timeouts.of(self.stage)


def _again(same: bool) -> Handled:
    """A device's second message of a kind: the same one again is acknowledged (so its
    sender can stop re-sending) and changes nothing; a different one is not taken."""
    return Handled("accepted", "resent") if same else Handled("duplicate")


def _pairs(mapping: dict[int, Any]) -> list[list[Any]]:
    """An int-keyed dict as [key, value] rows (checkpoint maps keep string keys only)."""
    return [[k, v] for k, v in sorted(mapping.items())]


def _nested(rows: list[Any]) -> dict[int, dict[int, bytes]]:
    return {int(i): {int(x): bytes(v) for x, v in inner} for i, inner in rows}


def plan_setup(participants: list[str], *, round: int, vector_size: int, clip: float,
               dropout_rate: float, adversarial_rate: float = 0.0, field_bits: int = 32,
               min_clients: int | None = None, session: bytes | None = None,
               neighbours: int | None = None, threshold: int | None = None) -> SecAggSetup:
    """The setup of a round: (k, t) from Bell et al.'s bounds unless given, the finest
    quantization the field has room for, a fresh random session. `min_clients` defaults
    to the threshold (Bonawitz et al.: fewer survivors than t and the round aborts)."""
    if neighbours is None or threshold is None:
        chosen = choose_parameters(len(participants), dropout_rate=dropout_rate,
                                   adversarial_rate=adversarial_rate)
        neighbours = chosen.neighbours if neighbours is None else neighbours
        threshold = chosen.threshold if threshold is None else threshold
    quantizer = Quantizer.for_summands(len(participants), clip=clip, field=Field(field_bits))
    try:
        return SecAggSetup(
            round=round, session=session if session is not None else os.urandom(SESSION_BYTES),
            participants=list(participants), neighbours=neighbours, threshold=threshold,
            min_clients=min_clients if min_clients is not None else max(threshold, 2),
            vector_size=vector_size, clip=clip, levels=quantizer.levels, field_bits=field_bits)
    except ProtocolError as exc:
        raise ConfigError(f"secure aggregation setup: {exc}") from None
