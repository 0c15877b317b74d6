"""Who trains a round, and what each device is asked to do: pure functions of the registry.

Sync rounds over-select (Bonawitz et al. 2019 pick ~130% of the devices they need and
close on the first K) so the 6-10% that drop out of a round do not stall it. Task tiers
adapt the work to the device: fewer epochs for the weakest hardware, a smaller codec for
a thin link, and one time budget for all so nobody holds the round past its deadline.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedmq.core import codecs
from fedmq.core.protocol import TaskConfig
from fedmq.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class CohortPolicy:
    clients_per_round: int = 0  # K: the round closes on K updates (0: no selection)
    over_select: float = 1.3  # ask ceil(K * over_select) devices, expecting some to drop

    def __post_init__(self) -> None:
        if self.clients_per_round < 0:
            raise ConfigError("clients_per_round must be >= 0 (0: every device trains)")
        if not (math.isfinite(self.over_select) and self.over_select >= 1.0):
            raise ConfigError(f"over_select {self.over_select} must be >= 1.0")

    def cohort_size(self, online: int) -> int:
        return min(online, math.ceil(self.clients_per_round * self.over_select))


def select_cohort(online: list[str], policy: CohortPolicy, *, seed: int,
                  round: int) -> list[str] | None:
    """A seeded random sample of the online devices; None: every device trains (no
    selection configured, or nobody known yet: a fresh aggregator has not heard births)."""
    if policy.clients_per_round == 0 or not online:
        return None
    rng = random.Random(f"{seed}/{round}")
    return sorted(rng.sample(sorted(online), policy.cohort_size(len(online))))


@dataclass(frozen=True, kw_only=True)
class AssignmentPolicy:
    constrained_epochs: int = 0  # epochs for constrained devices (0: the same as everyone)
    constrained_batch_size: int = 0  # their mini-batch, to fit their memory (0: the same)
    constrained_time_budget_s: float = 0.0  # their training time, to spare batteries (0: same)
    constrained_cpus: int = 1  # a device with at most this many cores is constrained ...
    constrained_ram_mb: int = 1024  # ... as is one with less memory, or one on battery
    slow_link_kbps: float = 0.0  # a device advertising a slower uplink than this ...
    slow_link_codec: str = ""  # ... is assigned this codec ("" or 0 kbps: nobody is)

    def __post_init__(self) -> None:
        if (self.constrained_epochs < 0 or self.constrained_batch_size < 0
                or not 0 <= self.constrained_time_budget_s < math.inf):
            raise ConfigError("constrained_epochs, constrained_batch_size and "
                              "constrained_time_budget_s must be >= 0 (0: no special treatment)")
        if self.slow_link_codec:
            codecs.get_codec(self.slow_link_codec)

    def task_for(self, base: TaskConfig, capabilities: Mapping[str, Any]) -> TaskConfig:
        task = base
        if _constrained(capabilities, self):
            if self.constrained_epochs:
                task = replace(task, epochs=min(task.epochs, self.constrained_epochs))
            if self.constrained_batch_size:
                task = replace(task, batch_size=min(task.batch_size,
                                                    self.constrained_batch_size))
            if self.constrained_time_budget_s:  # the tighter of the two budgets
                budget = self.constrained_time_budget_s
                task = replace(task, time_budget_s=min(task.time_budget_s or budget, budget))
        link = _number(capabilities.get("link_kbps"))
        if self.slow_link_codec and self.slow_link_kbps and 0 < link < self.slow_link_kbps:
            task = replace(task, codec=self.slow_link_codec)
        return task


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _constrained(capabilities: Mapping[str, Any], policy: AssignmentPolicy) -> bool:
    cpus, ram = _number(capabilities.get("cpus")), _number(capabilities.get("ram_mb"))
    return (0 < cpus <= policy.constrained_cpus or 0 < ram < policy.constrained_ram_mb
            or capabilities.get("battery") is True)


def assign_tasks(base: TaskConfig, devices: Mapping[str, Mapping[str, Any]],
                 policy: AssignmentPolicy) -> tuple[list[TaskConfig], dict[str, int]]:
    """(tiers, device -> tier index) for the devices whose task differs from `base`."""
    tiers: list[TaskConfig] = []
    assign: dict[str, int] = {}
    for device in sorted(devices):
        task = policy.task_for(base, devices[device])
        if task == base:
            continue
        if task not in tiers:
            tiers.append(task)
        assign[device] = tiers.index(task)
    return tiers, assign
