"""Every rejected message counted by reason, logged sparingly: a flood of garbage costs one
line per sender and reason, not one per message."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from fedmq.core.protocol import ROUTINE_REFUSALS

# The first rejection of each (reason, source) is logged, then every LOG_EVERY-th.
LOG_EVERY = 1000
# (reason, source) pairs remembered for that; beyond it, new sources share one entry, so
# a flood from ever-new device ids cannot grow memory.
MAX_LOG_KEYS = 4096
OTHER_SOURCES = "*"


class RejectionLog:
    """Counts every rejection by reason; logs the first of each (reason, source) and then
    every `every`-th with its running count. `on_count(reason, 1)` hears of each one too
    (the service's observers)."""

    def __init__(self, counter: Counter, logger: logging.Logger, *, every: int = LOG_EVERY,
                 max_keys: int = MAX_LOG_KEYS,
                 on_count: Callable[[str, int], None] | None = None) -> None:
        if every < 1 or max_keys < 1:
            raise ValueError("every and max_keys must be >= 1")
        self.counter = counter
        self.logger = logger
        self.every = every
        self.max_keys = max_keys
        self.on_count = on_count
        self._seen: dict[tuple[str, str], int] = {}

    def record(self, reason: str, source: str, message: str) -> bool:
        """Count one rejection; True if it was logged."""
        self.counter[reason] += 1
        if self.on_count is not None:
            self.on_count(reason, 1)
        key = (reason, source)
        if key not in self._seen and len(self._seen) >= self.max_keys:
            key = (reason, OTHER_SOURCES)
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        # the protocol working as designed: INFO (fedmq.core.protocol says why)
        level = logging.INFO if reason in ROUTINE_REFUSALS else logging.WARNING
        if seen == 1:
            self.logger.log(level, "%s", message)
        elif seen % self.every == 0:
            self.logger.log(level, "%s (%d %s rejections from %s so far)", message, seen,
                            reason, key[1])
        else:
            return False
        return True
