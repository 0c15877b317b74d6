"""Which devices the open round asked to train: planned from the registry's online list,
re-planned (asking others) when a round runs short, and asked whether an update's sender
was selected. Pure; the round machine owns it and checkpoints it with the round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aggregator.selection import CohortPolicy, select_cohort
from fedmq.core.protocol import Update
from fedmq.errors import ConfigError, ProtocolError


@dataclass(frozen=True)
class Cohort:
    """The devices asked in `round` (every announcement of it adds its cohort); `asked`
    None: everyone may train (no selection, or nobody known when it was planned)."""

    round: int = -1
    asked: frozenset[str] | None = None

    def plan(self, round: int, online: list[str], policy: CohortPolicy, *,
             seed: int) -> tuple[Cohort, list[str] | None]:
        """(the cohort after announcing `round`, the devices this announcement asks).

        Planned again for the same round (a deadline passed short of the quorum, or a
        reconnect), it asks devices not asked yet: the first cohort may have gone away.
        Everyone asked so far may still deliver."""
        before = self.asked if self.round == round and self.asked is not None else frozenset()
        fresh = [d for d in online if d not in before] or online
        chosen = select_cohort(fresh, policy, seed=seed + len(before), round=round)
        if chosen is None:
            return Cohort(round, None), None
        return Cohort(round, before | frozenset(chosen)), chosen

    def size(self, round: int) -> int:
        """Devices asked in `round` (0: no selection for it)."""
        return len(self.asked) if self.round == round and self.asked is not None else 0

    def check_selected(self, update: Update) -> None:
        """An update for the planned round must come from a device it asked."""
        if (self.asked is not None and self.round == update.round
                and update.device_id not in self.asked):
            raise ProtocolError(f"{update.device_id} is not in round {update.round}'s cohort",
                                reason="not_selected")

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round,
                "asked": None if self.asked is None else sorted(self.asked)}

    @classmethod
    def from_state(cls, state: Any, *, open_round: int) -> Cohort:
        """The saved cohort, checked: a cohort of a round not yet open cannot be real."""
        try:
            round, asked = int(state["round"]), state["asked"]
            if asked is not None and not all(isinstance(d, str) for d in asked):
                raise TypeError("device ids must be strings")
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"checkpoint holds a malformed cohort ({exc}); move the "
                              "checkpoint away to start fresh") from None
        if round > open_round:
            raise ConfigError(f"checkpoint holds the cohort of round {round} but round "
                              f"{open_round} is open; move the checkpoint away to start fresh")
        return cls(round, None if asked is None else frozenset(asked))
