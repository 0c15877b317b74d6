"""One closed round as every reader sees it: a line of the service's `--metrics` file, an
entry of the checkpoint's history, and a line, a row and a point of `fedmq simulate`'s
metrics file, table and plot. One type, so the two metrics files share one format."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq.errors import DataError

# Keys written before the record had one format, read under their current name.
_RENAMED = {"test_loss": "loss"}


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """What one round produced and cost; `None`: not measured where the record was made."""

    round: int
    version: int  # of the model the round produced
    accuracy: float | None  # on the held-out test split (None: not evaluated)
    loss: float | None  # on the held-out test split
    train_loss: float  # the participants' mean, weighted by samples (nan: none reported)
    participants: int  # updates aggregated
    samples: int
    bytes_up: int  # update bytes the aggregator counted in the round
    model_bytes: int  # bytes of the model broadcast (announcement and chunks) before it
    wall_s: float
    stale: int = 0  # participants trained on an older model (folded in with s(tau))
    partial: int = 0  # participants that stopped at their time budget
    cohort: int = 0  # devices selected for the round (0: every device)
    top3: float | None = None  # top-3 accuracy, for tasks that report it (keyboard)
    epsilon: float | None = None  # DP: privacy spent so far, at the configured dp_delta
    stopped: str = ""  # why training stopped after this round ('': it goes on)
    # Model bytes all devices downloaded for the round: measured on the devices, so only
    # the simulator knows it.
    bytes_down: int | None = None
    # Federated evaluation (evaluate_fraction): the model this round trained from (version
    # - 1) scored by `fleet_devices` devices on their own held-out data, sample-weighted;
    # personal_*: the same examples scored by the devices' personalized models (personal
    # layers, fine-tuning). None/0: no report.
    fleet_accuracy: float | None = None
    fleet_loss: float | None = None
    fleet_samples: int = 0
    fleet_devices: int = 0
    personal_accuracy: float | None = None
    personal_loss: float | None = None
    lr: float | None = None  # the devices' learning rate in the round (lr_decay's cosine)

    def to_dict(self) -> dict[str, Any]:
        # Every field is a number, a string or None: a flat copy, not dataclasses.asdict's
        # recursive deep copy (~0.5 ms a record, on the loop thread as each round closes).
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        """The record `to_dict` made, also from files and checkpoints of older versions."""
        values = {_RENAMED.get(key, key): value for key, value in data.items()}
        try:
            return cls(**values)
        except TypeError as exc:
            raise DataError(f"not a round record ({exc}): {dict(data)!r}") from None

    def to_json(self) -> str:
        """One line of a metrics file (non-finite losses as NaN, which `json` reads back)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, line: str) -> RoundRecord:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not a JSON round record ({exc}): {line[:80]!r}") from None
        if not isinstance(data, dict):
            raise DataError(f"not a JSON round record: {line[:80]!r}")
        return cls.from_dict(data)


def read_records(path: str | Path) -> Iterator[RoundRecord]:
    """The records of a metrics file, the service's or the simulator's."""
    with open(path) as fh:
        for line in fh:
            if line.strip():
                yield RoundRecord.from_json(line)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RoundRecord))
