"""`fedmq status`: the fleet as the broker's retained statuses tell it, as a table.

The aggregator and every device keep a retained status (docs/protocol.md, Presence); a
device's carries its activity (round, bytes, outbox) when its agent is new enough. The
table is built from those messages alone (`FleetState`, `render`: pure, no broker), and a
read-only MQTT client (`StatusReader`) keeps them current, for one table or `--watch`.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from typing import TextIO

from fedmq.config import BrokerConfig, add_flags
from fedmq.core.protocol import AggregatorStatus, DeviceStatus, FleetTopics
from fedmq.errors import BrokerError, ConfigError, ProtocolError
from fedmq.runtime import config_from_args
from fedmq.transport.mqtt import MqttLink

COLUMNS = ("DEVICE", "ONLINE", "LAST-SEEN", "ROUND", "BACKEND", "CODEC", "BYTES-UP",
           "PENDING", "POWER/LINK")
# Retained messages come right after the SUBACK with nothing to say the last one is in; a
# reader that may only read (the ACL's fedmq-monitor) cannot echo a marker through the
# broker as the aggregator does, so it waits for this much quiet instead.
RETAINED_QUIET_S = 0.3
CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end of the screen


class FleetState:
    """The newest status of the aggregator and of each device (pure: fed topic + payload).

    A Last Will says only "offline": what the device (or aggregator) said before it, its
    activity, capabilities and last `ts`, is kept, as the aggregator's registry does.
    """

    def __init__(self, topics: FleetTopics) -> None:
        self.topics = topics
        self.aggregator: AggregatorStatus | None = None
        self.devices: dict[str, DeviceStatus] = {}
        self.rejected: Counter[str] = Counter()  # statuses that did not decode, by reason
        self.messages = 0

    def observe(self, topic: str, payload: bytes) -> None:
        self.messages += 1
        try:
            if topic == self.topics.aggregator_status:
                self._aggregator(payload)
            else:
                self._device(self.topics.device_from_status_topic(topic), payload)
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1

    def _aggregator(self, payload: bytes) -> None:
        if not payload:  # an empty retained message clears it
            self.aggregator = None
            return
        status = AggregatorStatus.from_payload(payload)
        before = self.aggregator
        if before is not None and not status.online and not status.ts:  # its Last Will
            status = AggregatorStatus(online=False, round=before.round,
                                      version=before.version, ts=before.ts)
        self.aggregator = status

    def _device(self, device_id: str, payload: bytes) -> None:
        if not payload:
            self.devices.pop(device_id, None)
            return
        status = DeviceStatus.from_payload(payload)
        if status.device_id != device_id:
            raise ProtocolError(f"status of {status.device_id} on {device_id}'s topic",
                                reason="wrong_topic")
        before = self.devices.get(device_id)
        if before is not None and not status.online:
            status = DeviceStatus(device_id=device_id, online=False,
                                  capabilities=status.capabilities or before.capabilities,
                                  agent_version=status.agent_version or before.agent_version,
                                  ts=status.ts or before.ts,
                                  activity=status.activity or before.activity)
        self.devices[device_id] = status


def _age(seconds: float) -> str:
    """kubectl's style: 45s, 3m12s, 2h5m, 3d4h."""
    s = max(0, int(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                      ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit}{f'{rest}{sub}' if rest else ''}"
    return f"{s}s"


def _bytes(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n}B" if unit == "B" else f"{value:.1f}{unit}"


def _power_link(capabilities: dict) -> str:
    """What the aggregator assigns work by: power source and advertised uplink."""
    battery = capabilities.get("battery")
    power = "-" if battery is None else ("battery" if battery else "mains")
    kbps = capabilities.get("link_kbps")
    link = f"{kbps:g}kbps" if isinstance(kbps, (int, float)) and kbps > 0 else "-"
    return f"{power}/{link}"


def device_row(status: DeviceStatus, *, now: float) -> tuple[str, ...]:
    """One line of the table; `-` where the device did not say (an agent from before
    DeviceActivity, or nothing trained yet)."""
    a = status.activity
    if a is None:
        activity = ("-",) * 5
    else:
        activity = (str(a.last_round) if a.updates else "-", a.backend or "-", a.codec or "-",
                    _bytes(a.bytes_up), str(a.pending))
    return (status.device_id, "yes" if status.online else "no",
            _age(now - status.ts) if status.ts else "-", *activity,
            _power_link(status.capabilities))


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def render(state: FleetState, *, now: float) -> str:
    """The aggregator's line, the device table (sorted by id) and a count, kubectl-style."""
    agg = state.aggregator
    if agg is None:
        head = "AGGREGATOR   none seen (no retained status on " \
               f"{state.topics.aggregator_status})"
    else:
        seen = f", status {_age(now - agg.ts)} old" if agg.ts else ""
        head = (f"AGGREGATOR   {'online' if agg.online else 'OFFLINE'}, round {agg.round}, "
                f"model v{agg.version}{seen}")
    lines = [f"FLEET        {state.topics.fleet}", head, ""]
    devices = [state.devices[d] for d in sorted(state.devices)]
    if devices:
        lines += _table([COLUMNS] + [device_row(s, now=now) for s in devices])
    else:
        lines.append("no device has published a status yet")
    online = sum(s.online for s in devices)
    footer = f"{len(devices)} devices, {online} online"
    if state.rejected:
        footer += "; unreadable statuses: " + ", ".join(
            f"{reason} x{n}" for reason, n in sorted(state.rejected.items()))
    return "\n".join([*lines, "", footer]) + "\n"


class StatusReader:
    """A read-only MQTT client keeping a FleetState current (paho's thread feeds it)."""

    def __init__(self, config: BrokerConfig) -> None:
        self.topics = FleetTopics(config.fleet)
        self.state = FleetState(self.topics)
        self._lock = threading.Condition()
        # A fresh id each time: two readers (or a reader and a device) never take over
        # each other's connection; no session, nothing queued for a reader that left.
        self.link = MqttLink(client_id=f"fedmq-status-{os.urandom(4).hex()}",
                             broker=config.broker, username=config.username,
                             password=config.password, tls=config.tls(), session_expiry_s=0,
                             mqtt_version=config.mqtt_version)
        for topic_filter in (self.topics.aggregator_status, self.topics.device_status_filter):
            self.link.route(topic_filter, self._on_status, qos=1)

    def _on_status(self, message) -> None:
        with self._lock:
            self.state.observe(message.topic, message.payload)
            self._lock.notify_all()

    def start(self, *, timeout_s: float) -> None:
        """Connect, subscribe, and wait until the retained statuses stop coming in."""
        self.link.start()
        self.link.wait_connected(timeout_s)
        if not self.link.subscribed.wait(timeout_s):
            raise BrokerError(f"{self.link.address} did not acknowledge the status "
                              f"subscriptions within {timeout_s:.0f} s; may this account "
                              f"read {self.topics.device_status_filter}?")
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while time.monotonic() < deadline:
                seen = self.state.messages
                self._lock.wait(RETAINED_QUIET_S)
                if self.state.messages == seen:
                    break

    def render(self, *, now: float | None = None) -> str:
        with self._lock:
            return render(self.state, now=time.time() if now is None else now)

    def close(self) -> None:
        self.link.stop()


def watch(reader: StatusReader, *, out: TextIO, interval_s: float, count: int = 0,
          ansi: bool = False, stop: threading.Event | None = None) -> int:
    """Draw the table every `interval_s` (in place with `ansi`) until `count` frames were
    drawn (0: until `stop` or Ctrl-C); the frames drawn."""
    stop = stop or threading.Event()
    frames = 0
    while True:
        stamp = time.strftime("%H:%M:%S")
        frame = f"fedmq status at {stamp}, every {interval_s:g}s\n\n{reader.render()}"
        out.write(CLEAR + frame if ansi else frame + "\n")
        out.flush()
        frames += 1
        if (count and frames >= count) or stop.wait(interval_s):
            return frames


def configure(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, BrokerConfig)
    parser.add_argument("--watch", action="store_true",
                        help="redraw the table in place until Ctrl-C")
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                        help="seconds between redraws with --watch (default: 2)")
    parser.add_argument("--count", type=int, default=0, metavar="N",
                        help="with --watch: stop after N tables (default: 0, never)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="give up connecting to the broker after this long (default: 10)")
    parser.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    if not (args.interval > 0 and args.count >= 0 and args.timeout > 0):
        raise ConfigError("--interval and --timeout must be > 0 seconds, --count >= 0")
    reader = StatusReader(config_from_args(BrokerConfig, args))
    try:
        reader.start(timeout_s=args.timeout)
        if not args.watch:
            sys.stdout.write(reader.render())
            return 0
        watch(reader, out=sys.stdout, interval_s=args.interval, count=args.count,
              ansi=sys.stdout.isatty())
        return 0
    finally:
        reader.close()

