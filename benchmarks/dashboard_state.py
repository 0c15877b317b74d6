"""What one dashboard poll costs the aggregator: a `/api/state` snapshot of a big fleet.

The snapshot runs on the dashboard's thread but holds the GIL while it copies and sorts,
so it is time the service's loop thread waits. A page polls once a second, asking only
for rounds it does not have yet (`since`); its first load takes the whole history.

    python benchmarks/dashboard_state.py [--devices 10000 --rounds 1000 --repeats 20 --runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from aggregator.config import AggregatorConfig
from aggregator.fleetview import fleet_view
from aggregator.records import RoundRecord
from aggregator.service import AggregatorService
from fedmq.core.protocol import DeviceStatus


def service_with(devices: int, rounds: int, workdir: str) -> AggregatorService:
    """A service (never connected) whose registry and history hold a fleet's worth."""
    service = AggregatorService(AggregatorConfig(broker="mqtt://127.0.0.1:1", evaluate=False,
                                                 checkpoint=f"{workdir}/agg.ckpt"))
    now = time.monotonic()
    for i in range(devices):
        device = f"dev{i:05d}"
        service.registry.observe(device, DeviceStatus(device_id=device, online=i % 7 != 0,
                                                      capabilities={"cpus": 4}), now)
    for r in range(1, rounds + 1):
        service.history.append(RoundRecord(
            round=r, version=r, accuracy=0.5, loss=1.0, train_loss=1.0, participants=100,
            samples=1000, bytes_up=10**6, model_bytes=10**5, wall_s=1.0))
    return service


def poll_ms(service: AggregatorService, since: int, repeats: int) -> tuple[float, int]:
    """Median milliseconds of a snapshot serialized as the server does, and its bytes."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        body = json.dumps(fleet_view(service, since=since).to_dict(), allow_nan=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3, len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        service = service_with(args.devices, args.rounds, workdir)
        try:
            for label, since in (("first load", 0), ("steady poll", args.rounds)):
                runs = [poll_ms(service, since, args.repeats) for _ in range(args.runs)]
                medians = [ms for ms, _ in runs]
                print(f"{label:<12} {args.devices} devices, {args.rounds} rounds: "
                      f"{min(medians):.1f}-{max(medians):.1f} ms per snapshot (medians of "
                      f"{args.runs} runs of {args.repeats}), {runs[0][1]} bytes")
        finally:
            service.writer.close()


if __name__ == "__main__":
    main()
