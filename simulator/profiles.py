"""Simulated device profiles: how a fleet of mixed hardware behaves on one laptop.

A profile sets what a device advertises in its birth (cores, memory, link, battery), how
much slower than the host it computes, and the uplink rate its fault proxy enforces, so
the aggregator's task assignment and the round's stragglers are exercised for real.
Figures are rough orders of magnitude of real hardware, relative to a laptop core.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedmq.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    name: str
    cpus: int
    ram_mb: int
    slowdown: float  # compute time relative to the host
    link_kbps: float  # uplink, enforced by the device's fault proxy (0: unlimited)
    battery: bool = False
    # availability: the link is up for up_s then down for down_s, over and over (0: always up)
    up_s: float = 0.0
    down_s: float = 0.0

    @property
    def flaky(self) -> bool:
        return self.down_s > 0

    @property
    def bandwidth_bytes_per_s(self) -> float | None:
        return self.link_kbps * 1000 / 8 if self.link_kbps else None


PROFILES = {p.name: p for p in (
    DeviceProfile(name="laptop", cpus=4, ram_mb=8192, slowdown=1.0, link_kbps=0.0),
    DeviceProfile(name="rpi4", cpus=4, ram_mb=4096, slowdown=2.0, link_kbps=20_000.0),
    DeviceProfile(name="rpi-zero", cpus=1, ram_mb=512, slowdown=8.0, link_kbps=5_000.0),
    DeviceProfile(name="cellular", cpus=2, ram_mb=1024, slowdown=3.0, link_kbps=128.0,
                  battery=True),
    DeviceProfile(name="slow", cpus=1, ram_mb=512, slowdown=10.0, link_kbps=0.0),
    DeviceProfile(name="flaky", cpus=4, ram_mb=4096, slowdown=1.0, link_kbps=0.0,
                  up_s=4.0, down_s=3.0),
)}

# Fleet mixes by name: profiles dealt out in these proportions.
MIXES = {
    "uniform": ("laptop",),
    "mixed": ("rpi4", "rpi4", "rpi4", "rpi4", "rpi-zero", "rpi-zero", "cellular"),
    # 30% ten times slower, 30% on a link down about 3 s of every 7, each device on its own
    # jittered schedule (issue 4's benchmark)
    "stragglers": ("laptop",) * 4 + ("slow",) * 3 + ("flaky",) * 3,
}


def fleet_profiles(mix: str, devices: int, *, seed: int) -> list[DeviceProfile]:
    """`devices` profiles in the mix's proportions, shuffled by `seed` (so the slow devices
    do not all hold the same data shards)."""
    if mix not in MIXES:
        raise ConfigError(f"unknown profile mix {mix!r}; available: {', '.join(MIXES)}")
    names = MIXES[mix]
    dealt = [PROFILES[names[i % len(names)]] for i in range(devices)]
    random.Random(seed).shuffle(dealt)
    return dealt
