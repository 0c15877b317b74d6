"""A spawned simulator child (a device host, a worker or site aggregator) that sends
reports over a pipe: ask for a fresh one, stop it and wait for its final one."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from fedmq.errors import BrokerError

log = logging.getLogger(__name__)


class ReportingChild:
    """The parent's side. A report has `answers` (how many asks it answers) and `final`;
    subclasses read reports in `poll`, which raises when the child died."""

    label = "child process"  # for messages: what this child is

    def __init__(self, target: Callable[..., Any], arg: Any, *, name: str,
                 report: Any) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a threaded process
        self._conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(arg, child), daemon=True,
                                       name=name)
        self.report = report
        self._asked = 0

    def start(self) -> None:
        self.process.start()

    def poll(self) -> Any:
        raise NotImplementedError

    def _drain(self) -> bool:
        """Read every waiting report; True if there was one."""
        got = False
        with contextlib.suppress(EOFError, OSError):
            while self._conn.poll():
                self.report = self._conn.recv()
                got = True
        return got

    def fresh(self, timeout: float = 30.0) -> Any:
        """A report made after this call (the periodic one may be half a second old)."""
        if self.report.final:
            return self.report
        self._asked += 1
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(self._asked)
        deadline = time.monotonic() + timeout
        while self.poll().answers < self._asked and not self.report.final:
            if time.monotonic() > deadline:
                raise BrokerError(f"{self.label} did not answer within {timeout:.0f} s")
            self._conn.poll(0.05)
        return self.report

    def request_stop(self) -> None:
        """Ask the child to stop (returns at once; `stop` waits)."""
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send("stop")

    def stop(self, timeout: float = 30.0) -> Any:
        """Stop the child cleanly (killed after `timeout`) and return its final report."""
        self.request_stop()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.report.final:
            with contextlib.suppress(EOFError, OSError):
                if self._conn.poll(0.2):
                    self.report = self._conn.recv()
                    continue
            if not self.process.is_alive():
                break
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            log.warning("%s did not stop in %.0f s; killing it", self.label, timeout)
            self.process.kill()
            self.process.join(5)
        self._conn.close()
        return self.report
