"""What the dashboard shows of a running service: the rounds so far, the open round's
progress and the fleet, as one frozen snapshot that turns into plain JSON.

The service's loop thread owns all of this and takes no lock, so a reader on another
thread copies each container in one step (`list()` / `dict()` of a list or dict, which no
other thread can interleave with under the GIL) and then reads only frozen values
(RoundRecord, DeviceInfo, Cohort) from its copies. A snapshot never sees half a record;
its counters may be a loop pass apart, which a dashboard polling every second cannot tell.
Nothing here writes to the service.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aggregator.records import RoundRecord

if TYPE_CHECKING:
    from aggregator.dashboard import DashboardServer
    from aggregator.service import AggregatorService

# Rows of the fleet table: a browser can show a few hundred; the counts cover the rest.
DEVICE_ROWS = 100


@dataclass(frozen=True, kw_only=True)
class RoundProgress:
    """The round under way."""

    number: int
    updates: int  # counted in it so far
    target: int  # updates that close it
    cohort: int  # devices asked to train it (0: every device)
    deadline_in_s: float  # until its deadline (negative: passed, the round was extended)


@dataclass(frozen=True, kw_only=True)
class DeviceRow:
    """One device of the fleet table; ages in seconds before the snapshot."""

    device_id: str
    online: bool
    status_age_s: float  # since its last birth or Last Will
    last_update_age_s: float | None  # since its last accepted update (None: none yet)
    in_round: str  # "uploaded", "asked" (selected, nothing in yet) or ""
    cpus: int | None
    link_kbps: float | None
    battery: bool | None
    agent_version: str


@dataclass(frozen=True, kw_only=True)
class FleetView:
    fleet: str
    task: str
    model: str
    mode: str
    rounds_total: int  # 0: runs until stopped
    finished: bool
    version: int  # of the current global model
    accepted: int
    rejected: dict[str, int]
    progress: RoundProgress
    history_total: int  # rounds closed; `history` holds those from `history_from` on
    history_from: int
    history: tuple[RoundRecord, ...]
    devices_total: int
    devices_online: int
    devices: tuple[DeviceRow, ...]  # online first, then those in the round, by id
    stopped: str = ""  # why training stopped early (the DP budget); '' if it did not

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; NaN and infinities (a round without a reported train loss)
        become None, which JSON can carry."""
        return _finite(dataclasses.asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def fleet_view(service: AggregatorService, *, since: int = 0,
               device_rows: int = DEVICE_ROWS) -> FleetView:
    """A snapshot of `service`, safe to take from any thread; rounds from index `since`
    (a dashboard that has the first N asks for the rest)."""
    config, machine, registry = service.config, service.machine, service.registry
    now = service.clock()
    history = list(service.history)
    devices = dict(registry.devices)
    last_update = dict(registry.last_update)
    open_round = machine.open  # replaced, not reset, when a round closes
    contributions = dict(open_round.contributions)
    cohort = machine.cohort
    number = open_round.round
    since = min(max(since, 0), len(history))
    asked = cohort.asked if cohort.round == number and cohort.asked is not None else frozenset()
    uploaded = {device for device, _ in contributions}

    def in_round(device: str) -> str:
        return "uploaded" if device in uploaded else "asked" if device in asked else ""

    def order(device: str) -> tuple[bool, int, str]:
        return (not devices[device].online, ("uploaded", "asked", "").index(in_round(device)),
                device)

    def row(device: str) -> DeviceRow:
        info = devices[device]
        caps = info.capabilities
        heard = last_update.get(device)
        return DeviceRow(
            device_id=device, online=info.online, status_age_s=now - info.last_change,
            last_update_age_s=None if heard is None else now - heard,
            in_round=in_round(device), cpus=_typed(caps.get("cpus"), int),
            link_kbps=_typed(caps.get("link_kbps"), float),
            battery=_typed(caps.get("battery"), bool), agent_version=info.agent_version)

    shown = heapq.nsmallest(device_rows, devices, key=order)
    return FleetView(
        fleet=config.fleet, task=config.task, model=config.model_name, mode=config.mode,
        rounds_total=config.rounds, finished=service.finished.is_set(),
        version=machine.version, accepted=service.accepted, rejected=dict(service.rejected),
        progress=RoundProgress(
            number=number, updates=len(contributions),
            target=open_round.target or machine.policy.close_at,
            cohort=cohort.size(number), deadline_in_s=open_round.deadline_at - now),
        history_total=len(history), history_from=since, history=tuple(history[since:]),
        devices_total=len(devices), devices_online=sum(i.online for i in devices.values()),
        devices=tuple(row(d) for d in shown), stopped=service.stopped,
    )


def _typed(value: Any, kind: type) -> Any:
    """A capability as the type the table shows, or None: devices advertise what they
    like, and a wrong type must not break the page."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        return None
    return value if isinstance(value, kind) else None


def serve_dashboard(service: AggregatorService) -> DashboardServer:
    """The service's dashboard, started on its configured address (ConfigError if that
    is taken)."""
    from aggregator.dashboard import DashboardServer

    c = service.config
    dashboard = DashboardServer(
        state=lambda since, rows: fleet_view(service, since=since, device_rows=rows).to_dict(),
        bind=c.dashboard_bind, port=c.dashboard_port, password=c.dashboard_secret())
    dashboard.start()
    return dashboard
