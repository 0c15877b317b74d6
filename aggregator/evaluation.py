"""Federated evaluation: the devices' scores of one model, pooled into the fleet's.

Devices that an announcement's `evaluate` share picks (protocol.evaluates) score the
announced model on their own held-out data and send an EvalReport. Ingest checks each
(aggregator/ingest.py); this pool keeps the reports of the model being trained from,
one per device, and sums them, weighted by held-out examples, when its round closes.
Pure: no I/O, no clock. The pool is checkpointed with the aggregator (state_dict): a
report is acked to the broker only after the write that holds it, so a restart between a
report and its round's close neither loses it nor counts it twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedmq.core.protocol import EvalMetrics, EvalReport
from fedmq.errors import ProtocolError
from fedmq.storage import StateError


@dataclass(frozen=True, slots=True)
class FleetScore:
    """A model's score over the devices that reported: sample-weighted means."""

    version: int  # of the model scored
    devices: int
    samples: int
    loss: float
    accuracy: float | None  # None: no device reported an accuracy
    personal_loss: float | None = None  # the devices' personalized models, same examples
    personal_accuracy: float | None = None


def weighted_mean(pairs: Iterable[tuple[float, int]]) -> float | None:
    """sum(value x weight) / sum(weight) over (value, weight) pairs; None without weight."""
    total = weight = 0.0
    for value, n in pairs:
        total += value * n
        weight += n
    return total / weight if weight else None


def fleet_score(version: int, reports: Iterable[EvalReport]) -> FleetScore | None:
    """The sample-weighted score of `reports` (None: no report)."""
    reports = list(reports)
    if not reports:
        return None

    def mean(pick, key: str) -> float | None:
        return weighted_mean((getattr(m, key), r.num_samples) for r in reports
                             if (m := pick(r)) is not None and getattr(m, key) is not None)

    def announced(r: EvalReport) -> EvalMetrics:
        return r.metrics

    def personal(r: EvalReport) -> EvalMetrics | None:
        return r.personal

    loss = mean(announced, "loss")
    assert loss is not None
    return FleetScore(version=version, devices=len(reports),
                      samples=sum(r.num_samples for r in reports), loss=loss,
                      accuracy=mean(announced, "accuracy"),
                      personal_loss=mean(personal, "loss"),
                      personal_accuracy=mean(personal, "accuracy"))


class EvalPool:
    """The reports for the current model, one per device (a second one is refused)."""

    def __init__(self) -> None:
        self.version = -1
        self.reports: dict[str, EvalReport] = {}
        self.accepted = 0

    def offer(self, report: EvalReport, *, version: int, open_round: int) -> None:
        """Keep `report`, or raise ProtocolError: for another model than `version` (the
        current one: `stale_eval`, or `future_round`), or a device's second report."""
        if report.round > open_round or report.version > version:
            raise ProtocolError(f"evaluation from {report.device_id} is for model "
                                f"v{report.version} of round {report.round}; model v{version} "
                                f"of round {open_round} is current", reason="future_round")
        if report.version != version:
            raise ProtocolError(f"evaluation from {report.device_id} scores model "
                                f"v{report.version}; v{version} is current (reports of a "
                                "model count until its round closes)", reason="stale_eval")
        if not (math.isfinite(report.metrics.loss * report.num_samples)):
            raise ProtocolError(f"evaluation loss {report.metrics.loss} x "
                                f"{report.num_samples} examples is not finite", reason="non_finite")
        if version != self.version:
            self.version, self.reports = version, {}
        if report.device_id in self.reports:
            raise ProtocolError(f"device {report.device_id} already scored model v{version}",
                                reason="duplicate")
        self.reports[report.device_id] = report
        self.accepted += 1

    def close(self, version: int) -> FleetScore | None:
        """The fleet's score of model `version` (None: no report for it); the pool then
        waits for the next model's."""
        reports = self.reports.values() if self.version == version else ()
        score = fleet_score(version, reports)
        self.version, self.reports = version + 1, {}
        return score

    def state_dict(self) -> dict[str, Any]:
        """The pending reports as their wire payloads (checked again on restore)."""
        return {"version": self.version, "accepted": self.accepted,
                "reports": [r.to_payload() for r in self.reports.values()]}

    def load_state_dict(self, state: Any) -> None:
        """Restore what state_dict saved; raise StateError for anything else."""
        try:
            version, accepted, payloads = state["version"], state["accepted"], state["reports"]
            reports = [EvalReport.from_payload(bytes(p)) for p in payloads]
        except (KeyError, TypeError, ValueError, ProtocolError) as exc:
            raise StateError(f"evaluation pool state is malformed ({exc})") from None
        if not (isinstance(version, int) and isinstance(accepted, int)
                and all(r.version == version for r in reports)):
            raise StateError("evaluation pool state is malformed (version, accepted, reports "
                             "of that version)")
        self.version, self.accepted = version, accepted
        self.reports = {r.device_id: r for r in reports}


def fleet_fields(score: FleetScore | None) -> dict[str, Any]:
    """RoundRecord's fleet_* and personal_* fields for `score` (none: {})."""
    if score is None:
        return {}
    return {"fleet_accuracy": score.accuracy, "fleet_loss": score.loss,
            "fleet_samples": score.samples, "fleet_devices": score.devices,
            "personal_accuracy": score.personal_accuracy,
            "personal_loss": score.personal_loss}
