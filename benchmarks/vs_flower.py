"""fedmq against Flower's legacy gRPC path, on the same task in the same run (issue #13).

Both sides train digits (fedmq's `split_task("digits", seed=0)`, IID shards over 2
devices, the same arrays on both sides) with logistic regression, float32 updates, 2 local
epochs of batch 32 at lr 0.1, 20 rounds, no federated evaluation; each side runs as
separate OS processes on loopback:

- fedmq: a private mosquitto (simulator.broker.LocalMosquitto, set_tcp_nodelay), a real
  `fedmq aggregator` and 2 real `fedmq agent` processes from this tree;
- Flower 1.42: `start_server` (legacy gRPC bidi) and 2 `start_client` processes
  (benchmarks/flower_side.py) run by the python of a scratch venv this script creates on
  first use (--venv; flwr is never installed into fedmq's environment).

Measured per side:
- seconds per round: between consecutive round closes on the server (log timestamps of
  `round N closed`, Flower: the strategy's aggregate_fit); median and range over rounds
  2..N, and the wall time of all N rounds (first announcement to last close);
- bytes per round: TCP payload bytes, both directions, of every connection to the
  broker's / server's port, read from a packet socket on `lo` (kernel timestamps, a BPF
  filter on that port; needs CAP_NET_RAW) between the close of round 1 and the close of
  round N, divided by N-1. fedmq's figure includes the broker's second hop (updates in
  from the device, out to the aggregator); the per-device-link row is one device's link;
- peak RSS (ru_maxrss = VmHWM) of each process, reported by the process as it exits;
- where a round's time goes: the previous round closed -> the slower device starts
  training (download) -> it is done (fedmq: its update published, from the agent's log;
  Flower: fit returned) -> the round closes (upload, aggregation, fedmq's checkpoint);
  --trace logs fedmq's methods on the way (announce, chunk in, train, publish, fold,
  checkpoint write, close) and prints both sides' round as a timeline;
- accuracy of both final models on the held-out test set, and how far apart they are.

    python benchmarks/vs_flower.py [--rounds 20] [--repeat 3] [--trace] [--venv DIR]
                                   [--checkpoint-dir /dev/shm]

The machine's load moves single runs a lot: use --repeat, which alternates the sides and
pools their rounds. The aggregator's checkpoint (fsynced every round, before the next
model goes out) lives in the run's temporary directory; --checkpoint-dir /dev/shm shows
what the disk costs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmq.models import build_model
from fedmq.tasks import device_shards, split_task
from simulator.broker import LocalMosquitto, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FLOWER_SIDE = HERE / "flower_side.py"
DEFAULT_VENV = Path.home() / ".cache" / "fedmq-bench" / "flower-venv"
FLOWER_REQUIREMENT = "flwr==1.42.*"
DEVICES = 2
# --trace: fedmq methods whose entry and exit are logged, and what they stand for.
TRACE = {
    "aggregator.service:AggregatorService._announce": "aggregator: publish model",
    "edge_agent.agent:EdgeAgent._on_announcement": "device: announcement in",
    "fedmq.core.transfer:ModelReceiver.offer_chunk": "device: model chunk in",
    "edge_agent.agent:LocalTrainer.train": "device: train+encode",
    "edge_agent.agent:EdgeAgent._send": "device: publish update",
    "aggregator.service:AggregatorService._handle_update": "aggregator: fold update",
    "aggregator.checkpoint:CheckpointStore.save": "aggregator: checkpoint write",
    "edge_agent.agent:EdgeAgent._on_receipt": "device: receipt in",
    "aggregator.service:AggregatorService._close_round": "aggregator: close round",
    "aggregator.rounds:RoundMachine.close": "aggregator: new model",
    "fedmq.models.numpy_models:NumpyModel.evaluate": "aggregator: held-out accuracy",
    "aggregator.broadcast:ModelBroadcast.messages": "aggregator: encode model",
}
SEEDS = (1, 2)  # the devices' training seeds, the same on both sides

# `fedmq <command>` with log records stamped to the microsecond, and its peak RSS at exit.
# With FEDMQ_BENCH_TRACE="module:Class.method=label ...", those methods log when they are
# entered and left (the round's timeline, --trace); nothing of fedmq changes otherwise.
FEDMQ_WRAPPER = """
import functools, importlib, logging, os, resource, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format='%(created).6f %(levelname)s %(name)s: %(message)s')

def traced(fn, label):
    @functools.wraps(fn)
    def call(*a, **k):
        sys.stderr.write(f'{time.time():.6f} TRACE {label} enter\\n')
        try:
            return fn(*a, **k)
        finally:
            sys.stderr.write(f'{time.time():.6f} TRACE {label} exit\\n')
    return call

for spec in os.environ.get('FEDMQ_BENCH_TRACE', '').split():
    target, label = spec.split('=')
    module, attr = target.split(':')
    cls_name, method = attr.split('.')
    cls = getattr(importlib.import_module(module), cls_name)
    setattr(cls, method, traced(getattr(cls, method), label))
from fedmq.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr,
          flush=True)
sys.exit(rc)
"""


# -- the Flower venv ------------------------------------------------------------------------
def flower_python(venv: Path) -> Path:
    """The scratch venv's python, creating the venv (flwr, numpy) the first time."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import flwr, numpy; print(flwr.__version__)"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating the Flower venv in {venv} (pip install {FLOWER_REQUIREMENT} numpy) ...",
          file=sys.stderr, flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", FLOWER_REQUIREMENT, "numpy"],
                   check=True)
    subprocess.run(check, check=True, capture_output=True)
    return python


# -- bytes on the wire: a packet socket on lo with a BPF filter on one TCP port -------------
def _port_filter(port: int) -> bytes:
    """Classic BPF: IPv4 TCP with source or destination `port`; keep 96 bytes of each."""
    prog = [
        (0x30, 0, 0, 9),  # ldb [9]            protocol
        (0x15, 0, 6, 6),  # jeq #6 (TCP)       else drop
        (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf)   IP header length
        (0x48, 0, 0, 0),  # ldh [x+0]          source port
        (0x15, 2, 0, port),
        (0x48, 0, 0, 2),  # ldh [x+2]          destination port
        (0x15, 0, 1, port),
        (0x06, 0, 0, 96),  # accept (snap 96 bytes: the headers are enough)
        (0x06, 0, 0, 0),  # drop
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in prog)


class WireCounter:
    """(kernel timestamp, source port, destination port, TCP payload bytes) of every
    packet to or from `port` on loopback. Each loopback packet is seen once."""

    SO_ATTACH_FILTER = 26
    SO_TIMESTAMP = 29  # Linux; also the cmsg type of the struct timeval it adds
    SOL_PACKET, PACKET_STATISTICS = 263, 6

    def __init__(self, port: int) -> None:
        self.port = port
        self.packets: list[tuple[float, int, int, int]] = []
        self.drops = 0
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)  # receives nothing yet
        except OSError as exc:
            self.error = f"no packet socket ({exc.strerror}; needs CAP_NET_RAW)"
            return
        code = ctypes.create_string_buffer(_port_filter(port))
        self._code = code  # must outlive the setsockopt
        sock.setsockopt(socket.SOL_SOCKET, self.SO_ATTACH_FILTER,
                        struct.pack("HL", len(code.raw) // 8, ctypes.addressof(code)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.setsockopt(socket.SOL_SOCKET, self.SO_TIMESTAMP, 1)
        sock.bind(("lo", 0x0800))
        sock.settimeout(0.2)
        self._sock = sock

    def __enter__(self) -> WireCounter:
        if self._sock is not None:
            self._thread = threading.Thread(target=self._run, name="wire", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._sock is not None:
            stats = self._sock.getsockopt(self.SOL_PACKET, self.PACKET_STATISTICS, 8)
            self.drops = struct.unpack("II", stats)[1]
            self._sock.close()

    def _run(self) -> None:
        assert self._sock is not None
        tv = struct.Struct("ll")
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self._sock.recvmsg(128, 64)
            except TimeoutError:
                continue
            t = time.time()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == self.SO_TIMESTAMP:
                    sec, usec = tv.unpack_from(value)
                    t = sec + usec / 1e6
            ihl = (data[0] & 0x0F) * 4
            total = struct.unpack_from("!H", data, 2)[0]
            sport, dport = struct.unpack_from("!HH", data, ihl)
            payload = total - ihl - (data[ihl + 12] >> 4) * 4
            if payload > 0:
                self.packets.append((t, sport, dport, payload))


def connections(port: int) -> dict[int, int]:
    """Local port of each established connection to `port` -> the pid holding it."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout
    owners = {}
    for line in out.splitlines():
        local = re.search(r":(\d+)\s+\S+:\d+", line)
        pid = re.search(r"pid=(\d+)", line)
        if local and pid:
            owners[int(local.group(1))] = int(pid.group(1))
    return owners


# -- one side's outcome ---------------------------------------------------------------------
@dataclass
class Side:
    name: str
    started: float = 0.0  # the first announcement / configure_fit
    closes: dict[int, float] = field(default_factory=dict)  # round -> close time
    train: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    rss_kb: dict[str, int] = field(default_factory=dict)  # process -> peak RSS
    links: dict[int, str] = field(default_factory=dict)  # client port -> process name
    packets: list[tuple[float, int, int, int]] = field(default_factory=list)
    port: int = 0
    drops: int = 0
    wire_error: str = ""
    trace: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # proc -> events
    final: np.ndarray | None = None
    accuracy: float = float("nan")
    cpu_s: float = 0.0  # user + system CPU of every process the side ran, start-up included

    def round_seconds(self) -> list[float]:
        rounds = sorted(self.closes)
        return [self.closes[r] - self.closes[r - 1] for r in rounds if r - 1 in self.closes]

    def wall(self) -> float:
        return self.closes[max(self.closes)] - self.started

    def bytes_between(self, lo: float, hi: float, who: str = "") -> tuple[int, int]:
        """(up, down) payload bytes in (lo, hi] on the links of processes named `who*`."""
        up = down = 0
        for t, sport, dport, n in self.packets:
            if not lo < t <= hi:
                continue
            client = dport if sport == self.port else sport
            if who and not self.links.get(client, "").startswith(who):
                continue
            if sport == self.port:
                down += n
            else:
                up += n
        return up, down

    def steady_bytes(self, who: str = "") -> tuple[float, float]:
        first, last = min(self.closes), max(self.closes)
        up, down = self.bytes_between(self.closes[first], self.closes[last], who)
        rounds = last - first
        return up / rounds, down / rounds

    def timeline(self) -> list[tuple[float, float, str]]:
        """(median, max) ms after the previous round closed at which each traced event
        happens in a steady round, in order: its k-th time in a process is `event #k`, and
        a device event is the slower device's."""
        offsets: dict[str, list[float]] = {}
        for r in sorted(self.closes):
            if r - 1 not in self.closes:
                continue
            lo, hi = self.closes[r - 1], self.closes[r]
            per_event: dict[str, float] = {}
            for events in self.trace.values():
                seen: Counter[str] = Counter()
                for t, event in events:
                    if lo < t <= hi:
                        seen[event] += 1
                        key = event + (f" #{seen[event]}" if seen[event] > 1 else "")
                        per_event[key] = max(per_event.get(key, 0.0), (t - lo) * 1e3)
            for key, ms in per_event.items():
                offsets.setdefault(key, []).append(ms)
        rows = [(statistics.median(v), max(v), k) for k, v in offsets.items()
                if len(v) >= len(self.round_seconds()) // 2]
        return sorted(rows)

    def phases(self) -> dict[str, list[float]]:
        """Per steady round: close of r-1 -> the slower device starts training -> it is
        done training and has handed its update over -> the round closes."""
        out: dict[str, list[float]] = {"download": [], "train": [], "upload+close": []}
        for r in sorted(self.closes):
            if r - 1 not in self.closes:
                continue
            spans = [d[r] for d in self.train.values() if r in d]
            if len(spans) < DEVICES:
                continue
            start, end = max(s for s, _ in spans), max(e for _, e in spans)
            out["download"].append(start - self.closes[r - 1])
            out["train"].append(end - start)
            out["upload+close"].append(self.closes[r] - end)
        return out


def _wait(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{proc.args[:4]} did not finish within {timeout:.0f} s") from None


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_links(port: int, pids: dict[int, str], count: int, timeout: float = 30.0
                    ) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        links = {lp: pids[pid] for lp, pid in connections(port).items() if pid in pids}
        if len(set(links.values())) >= count:
            return links
        time.sleep(0.05)
    raise RuntimeError(f"only {connections(port)} connected to port {port} within {timeout} s")


def _traced(text: str) -> list[tuple[float, str]]:
    return [(float(t), f"{label.replace('_', ' ')} {phase}") for t, label, phase in
            re.findall(r"^(\d+\.\d+) TRACE (\S+) (enter|exit)$", text, re.M)]


def _peak(text: str) -> int:
    found = re.findall(r"^peak_rss_kb (\d+)$", text, re.M)
    return int(found[-1]) if found else 0


# -- fedmq ----------------------------------------------------------------------------------
def run_fedmq(args: argparse.Namespace, work: Path) -> Side:
    side = Side("fedmq")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if args.trace:
        env["FEDMQ_BENCH_TRACE"] = " ".join(f"{k}={v.replace(' ', '_')}" for k, v in TRACE.items())
    checkpoint = Path(args.checkpoint_dir or work) / f"fedmq-aggregator-{os.getpid()}.ckpt"
    logs = {name: work / f"fedmq-{name}.log" for name in ("aggregator", "dev0", "dev1")}
    procs: dict[str, subprocess.Popen] = {}
    with LocalMosquitto() as broker, WireCounter(broker.port) as wire:
        common = ["--broker", broker.url, "--log-level", "INFO"]
        try:
            for i in range(DEVICES):
                name = f"dev{i}"
                procs[name] = subprocess.Popen(
                    [sys.executable, "-c", FEDMQ_WRAPPER, "agent", *common, "--device-id", name,
                     "--task", "digits", "--device-index", str(i), "--device-count",
                     str(DEVICES), "--partition-seed", "0", "--alpha", "0", "--codec",
                     "float32", "--seed", str(SEEDS[i])],
                    env=env, stderr=logs[name].open("w"), stdout=subprocess.DEVNULL)
            pids = {p.pid: n for n, p in procs.items()}
            _wait_for_links(broker.port, pids, DEVICES)
            procs["aggregator"] = subprocess.Popen(
                [sys.executable, "-c", FEDMQ_WRAPPER, "aggregator", *common, "--task",
                 "digits", "--model", "logreg", "--no-evaluate", "--rounds", str(args.rounds),
                 "--min-updates", str(DEVICES), "--epochs", str(args.epochs), "--batch-size",
                 str(args.batch_size), "--lr", str(args.lr), "--model-codec", "float32",
                 "--checkpoint", str(checkpoint)],
                env=env, stderr=logs["aggregator"].open("w"), stdout=subprocess.DEVNULL)
            pids[procs["aggregator"].pid] = "aggregator"
            side.links = _wait_for_links(broker.port, pids, DEVICES + 1)
            _wait([procs["aggregator"]], args.timeout)
            broker_status = Path(f"/proc/{broker.process.pid}/status").read_text()
            side.rss_kb["broker"] = int(re.search(r"VmHWM:\s+(\d+)", broker_status).group(1))
        finally:
            _stop(list(procs.values()))
        side.port = broker.port
    side.packets, side.drops, side.wire_error = wire.packets, wire.drops, wire.error
    text = logs["aggregator"].read_text()
    for t, r in re.findall(r"^(\d+\.\d+) \S+ aggregator\.service: round (\d+) closed", text, re.M):
        side.closes[int(r)] = float(t)
    announced = re.search(r"^(\d+\.\d+) \S+ aggregator\.service: announced model v0 for round 1 ",
                          text, re.M)
    side.started = float(announced.group(1))
    side.rss_kb["aggregator"] = _peak(text)
    side.trace["aggregator"] = _traced(text)
    for i in range(DEVICES):
        name = f"dev{i}"
        text = logs[name].read_text()
        starts = {int(r): float(t) for t, r in re.findall(
            rf"^(\d+\.\d+) \S+ \S+: {name}: round (\d+): training on", text, re.M)}
        ends = {int(r): float(t) for t, r in re.findall(
            rf"^(\d+\.\d+) \S+ \S+: {name}: round (\d+): trained on", text, re.M)}
        side.train[name] = {r: (starts[r], ends[r]) for r in starts if r in ends}
        side.rss_kb[name] = _peak(text)
        side.trace[name] = _traced(text)
    if len(side.closes) < args.rounds:
        raise RuntimeError(f"fedmq closed {len(side.closes)} of {args.rounds} rounds; see "
                           f"{logs['aggregator']}")
    from aggregator.checkpoint import CheckpointStore

    state = CheckpointStore(checkpoint).load()
    side.final = np.asarray(state["machine"]["params"], dtype=np.float32)
    for path in checkpoint.parent.glob(checkpoint.name + "*"):
        path.unlink()
    return side


# -- Flower ---------------------------------------------------------------------------------
def run_flower(args: argparse.Namespace, work: Path, python: Path) -> Side:
    side = Side("Flower")
    port = free_port()
    common = ["--port", str(port), "--out", str(work)]
    procs: dict[str, subprocess.Popen] = {}
    # fedmq's numpy models (the training code both sides run) from this checkout
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with WireCounter(port) as wire:
        try:
            procs["server"] = subprocess.Popen(
                [str(python), str(FLOWER_SIDE), "server", *common, "--rounds", str(args.rounds),
                 "--clients", str(DEVICES), "--epochs", str(args.epochs), "--batch-size",
                 str(args.batch_size), "--lr", str(args.lr)],
                env=env, stdout=(work / "flower-server.out").open("w"),
                stderr=(work / "flower-server.log").open("w"))
            deadline = time.monotonic() + 60
            while not connections_listening(port):
                if time.monotonic() > deadline or procs["server"].poll() is not None:
                    raise RuntimeError(f"Flower server did not listen; see {work}")
                time.sleep(0.05)
            for i in range(DEVICES):
                name = f"client{i}"
                procs[name] = subprocess.Popen(
                    [str(python), str(FLOWER_SIDE), "client", *common, "--data",
                     str(work / f"shard-{i}.npz"), "--seed", str(SEEDS[i]), "--name", name],
                    env=env, stdout=subprocess.DEVNULL,
                    stderr=(work / f"flower-{name}.log").open("w"))
            pids = {p.pid: n for n, p in procs.items()}
            side.links = _wait_for_links(port, pids, DEVICES)
            _wait(list(procs.values()), args.timeout)
        finally:
            _stop(list(procs.values()))
    side.port = port
    side.packets, side.drops, side.wire_error = wire.packets, wire.drops, wire.error
    server = json.loads((work / "server.json").read_text())
    side.rss_kb["server"] = server["peak_rss_kb"]
    side.trace["server"] = [(e["t"], f"server: {e['event']}") for e in server["events"]]
    for e in server["events"]:
        if e["event"] == "round_closed":
            side.closes[e["round"]] = e["t"]
        elif e["event"] == "clients_sampled" and e["round"] == 1:
            side.started = e["t"]
    for i in range(DEVICES):
        name = f"client{i}"
        client = json.loads((work / f"{name}.json").read_text())
        side.rss_kb[name] = client["peak_rss_kb"]
        side.trace[name] = [(e["t"], f"device: {e['event']}") for e in client["events"]]
        starts = {e["round"]: e["t"] for e in client["events"] if e["event"] == "fit_start"}
        ends = {e["round"]: e["t"] for e in client["events"] if e["event"] == "fit_end"}
        side.train[name] = {r: (starts[r], ends[r]) for r in starts if r in ends}
    final = np.load(work / "flower-final.npz")
    side.final = np.concatenate([final["w"].ravel(), final["b"].ravel()]).astype(np.float32)
    return side


def connections_listening(port: int) -> bool:
    """The port listens (checked without connecting: a probe would be one more client)."""
    out = subprocess.run(["ss", "-tlnH", f"( sport = :{port} )"], capture_output=True,
                         text=True).stdout
    return bool(out.strip())


# -- the table ------------------------------------------------------------------------------
def _fmt_range(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    if not values:
        return "-"
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} [{min(v):.{digits}f}-{max(v):.{digits}f}]"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def _cpu_counted(run, *args) -> Side:
    """`run(*args)`, its Side carrying the CPU time of the processes it started and
    reaped (the broker, the server, the devices): on a shared machine the time a round
    takes moves with the load, the CPU it needs far less. Runs of --rounds 20 and 200
    give the CPU per round without the start-up."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    side = run(*args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    side.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return side


def report(fedmq: Side, flower: Side, args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, str, str]] = []
    fs, ws = fedmq.round_seconds(), flower.round_seconds()
    rows.append(("s/round, median [min-max], rounds 2..N", _fmt_range(fs), _fmt_range(ws),
                 _ratio(statistics.median(fs), statistics.median(ws))))
    rows.append((f"wall time of {args.rounds} rounds, s", f"{fedmq.wall():.3f}",
                 f"{flower.wall():.3f}", _ratio(fedmq.wall(), flower.wall())))
    rows.append(("CPU s, all processes, start-up included", f"{fedmq.cpu_s:.2f}",
                 f"{flower.cpu_s:.2f}", _ratio(fedmq.cpu_s, flower.cpu_s)))
    fp, wp = fedmq.phases(), flower.phases()
    for phase in fp:
        rows.append((f"  {phase}, ms (slower device)", _fmt_range(fp[phase], 1e3, 1),
                     _fmt_range(wp[phase], 1e3, 1),
                     _ratio(statistics.median(fp[phase]), statistics.median(wp[phase]))
                     if fp[phase] and wp[phase] else "-"))
    if fedmq.wire_error or flower.wire_error:
        rows.append(("bytes/round", fedmq.wire_error or "-", flower.wire_error or "-", "-"))
    else:
        fu, fd = fedmq.steady_bytes()
        wu, wd = flower.steady_bytes()
        rows.append(("KB/round, all links (up+down)", f"{(fu + fd) / 1e3:.1f}",
                     f"{(wu + wd) / 1e3:.1f}", _ratio(fu + fd, wu + wd)))
        du, dd = fedmq.steady_bytes("dev")
        cu, cd = flower.steady_bytes("client")
        rows.append(("KB/round per device link, up / down",
                     f"{du / DEVICES / 1e3:.1f} / {dd / DEVICES / 1e3:.1f}",
                     f"{cu / DEVICES / 1e3:.1f} / {cd / DEVICES / 1e3:.1f}",
                     _ratio(du + dd, cu + cd)))
        au, ad = fedmq.steady_bytes("aggregator")
        rows.append(("KB/round server link (to broker), up / down",
                     f"{au / 1e3:.1f} / {ad / 1e3:.1f}", "(none)", "-"))
    dev_f = max(fedmq.rss_kb[f"dev{i}"] for i in range(DEVICES))
    dev_w = max(flower.rss_kb[f"client{i}"] for i in range(DEVICES))
    rows.append(("peak RSS of a device process, MB", f"{dev_f / 1024:.1f}", f"{dev_w / 1024:.1f}",
                 _ratio(dev_f, dev_w)))
    rows.append(("peak RSS of the server process, MB",
                 f"{fedmq.rss_kb['aggregator'] / 1024:.1f}",
                 f"{flower.rss_kb['server'] / 1024:.1f}",
                 _ratio(fedmq.rss_kb["aggregator"], flower.rss_kb["server"])))
    rows.append(("peak RSS of the broker, MB", f"{fedmq.rss_kb['broker'] / 1024:.1f}", "(none)",
                 "-"))
    rows.append(("test accuracy of the final model", f"{fedmq.accuracy:.4f}",
                 f"{flower.accuracy:.4f}", "-"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}s}  {'fedmq':>24s}  {'Flower (legacy gRPC)':>24s}  {'fedmq/Flower':>12s}")
    for label, a, b, ratio in rows:
        print(f"{label:{width}s}  {a:>24s}  {b:>24s}  {ratio:>12s}")
    if args.trace:
        for side in (fedmq, flower):
            print(f"\n{side.name}: a steady round, ms after the previous round closed "
                  f"(median, max over rounds 2..N; device events: the slower device)")
            for median, top, event in side.timeline():
                print(f"  {median:7.2f} {top:7.2f}  {event}")
    diff = float(np.abs(fedmq.final - flower.final).max())
    print(f"final models: max |fedmq - Flower| = {diff:.2e}"
          + (f"; packet drops: fedmq {fedmq.drops}, Flower {flower.drops}"
             if fedmq.drops or flower.drops else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=1, help="runs of both sides")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                        help="scratch venv for Flower (created on first use)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    parser.add_argument("--trace", action="store_true",
                        help="log and print where a round's time goes, event by event")
    parser.add_argument("--checkpoint-dir", default="",
                        help="directory of the aggregator's checkpoint (default: the run's "
                             "temporary directory; e.g. /dev/shm to take fsync out)")
    args = parser.parse_args(argv)
    python = flower_python(args.venv)
    _, test = split_task("digits", seed=0)
    model = build_model("logreg", {"inputs": 64, "classes": 10})
    pooled: dict[str, list[float]] = {"fedmq": [], "Flower": []}
    walls: dict[str, list[float]] = {"fedmq": [], "Flower": []}
    for run in range(args.repeat):
        work = Path(tempfile.mkdtemp(prefix="fedmq-vs-flower-"))
        for i, shard in enumerate(device_shards("digits", device_count=DEVICES, alpha=0.0,
                                                seed=0)):
            np.savez(work / f"shard-{i}.npz", x=np.ascontiguousarray(shard.x), y=shard.y)
        print(f"run {run + 1}/{args.repeat}: fedmq ...", file=sys.stderr, flush=True)
        fedmq = _cpu_counted(run_fedmq, args, work)
        print(f"run {run + 1}/{args.repeat}: Flower ...", file=sys.stderr, flush=True)
        flower = _cpu_counted(run_flower, args, work, python)
        for side in (fedmq, flower):
            model.set_flat(side.final)
            side.accuracy = model.evaluate(test.x, test.y).accuracy
            pooled[side.name] += side.round_seconds()
            walls[side.name].append(side.wall())
        print(f"\nrun {run + 1}: digits logreg, {DEVICES} devices, float32, {args.rounds} rounds, "
              f"{args.epochs} epochs x batch {args.batch_size} at lr {args.lr}, loopback")
        report(fedmq, flower, args)
        if args.keep:
            print(f"logs: {work}")
        else:
            with contextlib.suppress(OSError):
                for path in work.iterdir():
                    path.unlink()
                work.rmdir()
    if args.repeat > 1:
        f, w = (statistics.median(pooled[k]) for k in ("fedmq", "Flower"))
        print(f"\nall {args.repeat} runs (the sides alternate, so both see the same load "
              f"on average): s/round median fedmq {f:.4f}, Flower {w:.4f}, "
              f"fedmq/Flower {f / w:.2f}; wall time of {args.rounds} rounds fedmq "
              f"{min(walls['fedmq']):.3f}-{max(walls['fedmq']):.3f} s, Flower "
              f"{min(walls['Flower']):.3f}-{max(walls['Flower']):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
