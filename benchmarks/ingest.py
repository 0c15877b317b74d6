"""How fast the aggregator takes in 1,000,000-parameter updates.

(1) decode + accumulate on one core, per codec: the codec alone and the whole payload
    path (msgpack + validation + decode into the running sum); peak RSS of a fresh
    process after 10 and after 1,000 updates (streaming: it must not grow).
(2) end to end through a real mosquitto: publisher processes flood pre-encoded 8-bit
    updates; the aggregator service's accepted updates/s is measured next to subscribers
    that do nothing (a plain paho Client, and fedmq's MqttLink with its one-copy receive
    path), with the same payloads, interleaved in the same run. The aggregator runs
    with its safe defaults (every update decoded, norm-bounded and its samples credited
    before the fold, aggregator/bounds.py) and, beside it, with those bounds off (the
    fold decodes straight into the sum).
(3) the same flood through 1 / 2 / 4 worker processes and a reducer (--workers): every
    worker receives every update and drops the other shards' before decoding them, so the
    broker sends each update N times (docs/scale.md).

    python benchmarks/ingest.py [--updates 1000 --publishers 3 --flood 300 --e2e-only]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # "one core": no BLAS threads anywhere

import numpy as np

from aggregator.strategy.accumulator import WeightedAccumulator
from fedmq.core import codecs
from fedmq.core.protocol import FleetTopics, Update
from fedmq.transport.mqtt import BrokerAddress

PARAMS = 1_000_000
GOAL_DECODE_PER_S = 600
GOAL_E2E_FRACTION = 0.70
# An MLP on digits with this many hidden units has 75 * 13333 + 10 = 999,985 parameters.
HIDDEN_1M = 13333
PARAMS_1M_MLP = 75 * HIDDEN_1M + 10


def make_update(codec: str, device: str, *, size: int = PARAMS, seed: int = 0,
                round: int = 1, version: int = 0, layout_hash: str = "") -> bytes:
    rng = np.random.default_rng(seed)
    delta = rng.normal(0, 0.01, size).astype(np.float32)
    tensor = codecs.encode(delta, codec, rng=rng)
    return Update(device_id=device, update_id=f"{seed:08x}", round=round, base_version=version,
                  num_samples=100, loss=0.5, delta=tensor, layout_hash=layout_hash).to_payload()


def decode_rate(codec: str, count: int) -> tuple[float, float, int]:
    """(codec-only updates/s, full payload path updates/s, payload bytes)."""
    payloads = [make_update(codec, f"d{i}", seed=i) for i in range(8)]
    tensors = [Update.from_payload(p).delta for p in payloads]
    acc = WeightedAccumulator(PARAMS)
    codecs.decode_into(tensors[0], acc.total, 1.0)  # warm-up
    start = time.perf_counter()
    for i in range(count):
        codecs.decode_into(tensors[i % len(tensors)], acc.total, 3.0)
    codec_only = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(count):
        acc.add_encoded(Update.from_payload(payloads[i % len(payloads)]).delta, 3.0)
    full = count / (time.perf_counter() - start)
    return codec_only, full, len(payloads[0])


def child_peak_rss(codec: str, count: int) -> float:
    """Peak RSS (MB) of a fresh process that accumulates `count` updates."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", codec, str(count)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def rss_child(codec: str, count: int) -> None:
    payloads = [make_update(codec, f"d{i}", seed=i) for i in range(4)]
    acc = WeightedAccumulator(PARAMS)
    for i in range(count):
        acc.add_encoded(Update.from_payload(payloads[i % len(payloads)]).delta, 1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# -- part 2: through a real broker --------------------------------------------------------
def publisher_child(url: str, fleet: str, name: str, count: int, layout_hash: str) -> None:
    """Connect, build `count` distinct-device payloads, wait for 'go' on stdin, flood."""
    from fedmq.transport.mqtt import MqttLink

    topics = FleetTopics(fleet)
    base = Update.from_payload(make_update("q8", "x", size=PARAMS_1M_MLP,
                                           layout_hash=layout_hash))
    payloads = []
    for i in range(count):
        device = f"{name}-{i}"
        update = Update(device_id=device, update_id=f"{i:08x}", round=1, base_version=0,
                        num_samples=100, loss=0.5, delta=base.delta, layout_hash=layout_hash)
        payloads.append((topics.update(device), update.to_payload()))
    link = MqttLink(client_id=name, broker=url)
    link._client.max_inflight_messages_set(100)
    link.start()
    link.wait_connected(30)
    print("ready", flush=True)
    sys.stdin.readline()
    infos = [link.publish(topic, payload, qos=1) for topic, payload in payloads]
    for info in infos:
        info.wait_for_publish(120)
    link.stop()


def start_publishers(url: str, fleet: str, publishers: int, per: int, layout_hash: str):
    procs = []
    for j in range(publishers):
        proc = subprocess.Popen(
            [sys.executable, __file__, "--publisher", url, fleet, f"pub{j}", str(per),
             layout_hash], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return procs


def flood(procs) -> float:
    """Say go to every publisher; returns the start time."""
    start = time.perf_counter()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return start


def finish(procs) -> None:
    for proc in procs:
        proc.stdin.close()
        proc.wait(300)
        proc.stdout.close()


def raw_broker_rate(url: str, publishers: int, per: int, *, plain: bool) -> float:
    """Messages/s a do-nothing subscriber receives: a plain paho Client (`plain`), or
    fedmq's MqttLink, whose receive path the aggregator uses (the stricter baseline)."""
    import paho.mqtt.client as mqtt

    from fedmq.transport.mqtt import MqttLink

    total = publishers * per
    fleet = "rawbench"
    received = []
    done = threading.Event()

    def count(_message) -> None:
        received.append(time.perf_counter())
        if len(received) == total:
            done.set()

    topic_filter = FleetTopics(fleet).update_filter
    if plain:
        address = BrokerAddress.parse(url)
        sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                          client_id="raw-paho", protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        sub.on_connect = lambda client, *_: client.subscribe(topic_filter, qos=1)
        sub.on_subscribe = lambda *_: subscribed.set()
        sub.on_message = lambda _client, _userdata, message: count(message)
        sub.connect(address.host, address.port)
        sub.loop_start()
    else:
        sub = MqttLink(client_id="raw-link", broker=url)
        sub.route(topic_filter, count, qos=1)
        sub.start()
        subscribed = sub.subscribed
    if not subscribed.wait(30):
        raise RuntimeError("raw subscriber did not subscribe")
    procs = start_publishers(url, fleet, publishers, per, "")
    start = flood(procs)
    if not done.wait(600):
        raise RuntimeError(f"raw subscriber got {len(received)} of {total}")
    rate = total / (received[-1] - start)
    finish(procs)
    if plain:
        sub.disconnect()
        sub.loop_stop()
    else:
        sub.stop()
    return rate


# The bounds off: no norm bound (fixed or adaptive) and claims taken as they are.
UNBOUNDED = {"adaptive_norm_factor": 0.0, "max_sample_factor": 0.0}


def aggregator_rate(url: str, publishers: int, per: int, workdir: str,
                    **settings) -> float:
    """Updates/s the real aggregator service takes in: decoded into its running sum, the
    open round journaled to disk, then acked and receipted. min_updates is never reached,
    so no round closes: this is the steady state within a round."""
    from aggregator.config import AggregatorConfig
    from aggregator.service import AggregatorService

    total = publishers * per
    config = AggregatorConfig(
        broker=url, fleet="aggbench", model="mlp", hidden=HIDDEN_1M, evaluate=False,
        min_updates=total + 1, deadline_s=3600, checkpoint=os.path.join(workdir, "agg.ckpt"),
        log_level="ERROR", **settings)
    service = AggregatorService(config)
    assert service.model.layout.size == PARAMS_1M_MLP, service.model.layout.size
    service.start()
    service.link.subscribed.wait(30)
    procs = start_publishers(url, "aggbench", publishers, per, service.model.layout.hash)
    start = flood(procs)
    deadline = time.monotonic() + 600
    while service.answered < total:  # acked: folded in, checkpointed, receipted
        if time.monotonic() > deadline:
            raise RuntimeError(f"aggregator answered {service.answered} of {total}")
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    if service.rejected:
        raise RuntimeError(f"aggregator rejected updates: {dict(service.rejected)}")
    finish(procs)
    service.stop()
    return total / elapsed


def workers_rate(url: str, publishers: int, per: int, workdir: str, workers: int) -> float:
    """Updates/s from the devices through `workers` worker processes (each folds its shard,
    journals, and sends a partial aggregate every half second) into a reducer's round:
    timed until the reducer's open round represents every update."""
    from aggregator.config import AggregatorConfig
    from aggregator.service import AggregatorService

    total = publishers * per
    fleet = f"wbench{workers}"
    names = [f"w{i}" for i in range(workers)]
    model = ["--model", "mlp", "--hidden", str(HIDDEN_1M)]
    reducer = AggregatorService(AggregatorConfig(
        broker=url, fleet=fleet, model="mlp", hidden=HIDDEN_1M, evaluate=False,
        role="reducer", partial_sources=",".join(names), min_updates=total + 1,
        deadline_s=3600, checkpoint=os.path.join(workdir, "reducer.ckpt"), log_level="ERROR"))
    reducer.start()
    procs = []
    try:
        for i, name in enumerate(names):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedmq.cli", "aggregator", "--role", "worker",
                 "--shard", f"{i}/{workers}", "--broker", url, "--fleet", fleet, *model,
                 "--client-id", f"{fleet}-{name}", "--source-name", name,
                 "--checkpoint", os.path.join(workdir, f"{name}.state"),
                 "--flush-after-s", "0.5", "--log-level", "INFO"],
                stderr=subprocess.PIPE, text=True))
        for proc in procs:  # a worker follows the reducer's announcement: it can judge
            for line in proc.stderr:
                if "following round" in line:
                    break
            else:
                raise RuntimeError("a worker exited before it followed the announcement")
        pubs = start_publishers(url, fleet, publishers, per, reducer.model.layout.hash)
        start = flood(pubs)
        deadline = time.monotonic() + 600
        while reducer.machine.open.count < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"reducer holds {reducer.machine.open.count} of {total}")
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        if reducer.rejected:
            raise RuntimeError(f"reducer rejected partials: {dict(reducer.rejected)}")
        finish(pubs)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
            proc.stderr.close()
        reducer.stop()
    return total / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=1000, help="updates per decode timing")
    parser.add_argument("--publishers", type=int, default=3)
    parser.add_argument("--flood", type=int, default=450, help="updates per end-to-end phase")
    parser.add_argument("--repeats", type=int, default=5,
                        help="alternate raw and aggregator phases this many times")
    parser.add_argument("--e2e-only", action="store_true", help="skip (1)")
    parser.add_argument("--workers", default="1,2,4",
                        help="(3): worker counts to run beside one reducer ('' skips it)")
    args = parser.parse_args()
    rates = decode_table(args.updates) if not args.e2e_only else {}
    end_to_end(args, rates)
    return 0


def decode_table(updates: int) -> dict[str, float]:
    print(f"(1) decode + accumulate, {PARAMS:,} parameters, one core, {updates} updates")
    print(f"{'codec':8s} {'payload KB':>10s} {'codec-only/s':>13s} {'full path/s':>12s} "
          f"{'RSS@10 MB':>10s} {'RSS@1000 MB':>12s}")
    rates = {}
    for codec in ("float32", "q8", "q4"):
        codec_only, full, nbytes = decode_rate(codec, updates)
        rss10, rss1000 = child_peak_rss(codec, 10), child_peak_rss(codec, 1000)
        rates[codec] = full
        print(f"{codec:8s} {nbytes / 1024:10.0f} {codec_only:13.0f} {full:12.0f} "
              f"{rss10:10.1f} {rss1000:12.1f}")
    return rates


def end_to_end(args: argparse.Namespace, rates: dict[str, float]) -> None:
    from simulator.broker import LocalMosquitto

    per = max(1, args.flood // args.publishers)
    print(f"\n(2) end to end through mosquitto: {args.publishers} publisher processes x {per} "
          "pre-encoded q8 updates (1M parameters each), QoS 1")
    plains, raws, aggs, fasts = [], [], [], []
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    by_workers: dict[int, list[float]] = {n: [] for n in worker_counts}
    with tempfile.TemporaryDirectory() as workdir, LocalMosquitto() as broker:
        for i in range(args.repeats):  # interleaved, so machine noise hits all alike
            plains.append(raw_broker_rate(broker.url, args.publishers, per, plain=True))
            raws.append(raw_broker_rate(broker.url, args.publishers, per, plain=False))
            aggs.append(aggregator_rate(broker.url, args.publishers, per,
                                        os.path.join(workdir, str(i))))
            fasts.append(aggregator_rate(broker.url, args.publishers, per,
                                         os.path.join(workdir, f"{i}-unbounded"), **UNBOUNDED))
            for n in worker_counts:
                run_dir = os.path.join(workdir, f"{i}-w{n}")
                os.makedirs(run_dir)
                by_workers[n].append(workers_rate(broker.url, args.publishers, per,
                                                  run_dir, n))
            print(f"  pass {i + 1}: plain paho {plains[-1]:6.1f}/s, fedmq link {raws[-1]:6.1f}/s, "
                  f"aggregator {aggs[-1]:6.1f}/s, bounds off {fasts[-1]:6.1f}/s" + "".join(
                      f", {n} worker(s) {r[-1]:6.1f}/s" for n, r in by_workers.items()),
                  file=sys.stderr)
    plain, raw, agg, fast = (statistics.median(x) for x in (plains, raws, aggs, fasts))
    print("broker -> do-nothing plain paho:   " + " ".join(f"{r:6.1f}" for r in plains)
          + f"  median {plain:6.1f} updates/s")
    print("broker -> do-nothing fedmq link:   " + " ".join(f"{r:6.1f}" for r in raws)
          + f"  median {raw:6.1f} updates/s")
    print("broker -> aggregator (accepted):   " + " ".join(f"{a:6.1f}" for a in aggs)
          + f"  median {agg:6.1f} updates/s")
    print("   ... with the bounds off:        " + " ".join(f"{a:6.1f}" for a in fasts)
          + f"  median {fast:6.1f} updates/s")
    for n, rates_n in by_workers.items():
        print(f"broker -> {n} worker(s) -> reducer: " + " ".join(f"{r:6.1f}" for r in rates_n)
              + f"  median {statistics.median(rates_n):6.1f} updates/s")
    if "q8" not in rates:
        print(f"summary: end to end {agg / plain:.0%} of a do-nothing plain paho subscriber "
              f"({fast / plain:.0%} with the bounds off)")
        return
    ok1 = rates["q8"] >= GOAL_DECODE_PER_S
    # The goal's baseline is the one the issue names, a do-nothing plain paho subscriber;
    # the same do-nothing subscriber on fedmq's one-copy receive path is shown beside it.
    ok2 = agg / plain >= GOAL_E2E_FRACTION
    print(f"summary: q8 decode+accumulate {rates['q8']:.0f}/s (goal {GOAL_DECODE_PER_S}: "
          f"{'met' if ok1 else 'MISSED'}), end to end {agg / plain:.0%} of a do-nothing plain "
          f"paho subscriber (goal {GOAL_E2E_FRACTION:.0%}: {'met' if ok2 else 'MISSED'}) and "
          f"{agg / raw:.0%} of a do-nothing fedmq link; with the bounds off "
          f"{fast / plain:.0%}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--publisher":
        publisher_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        sys.exit(main())
