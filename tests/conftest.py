"""Fixtures: a private mosquitto per test on a free port, stopped even when the test fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from aggregator.broker import LocalMosquitto


@pytest.fixture
def broker(tmp_path) -> Iterator[LocalMosquitto]:
    """A fresh loopback mosquitto (anonymous, no persistence) for one test."""
    mosq = LocalMosquitto(workdir=tmp_path / "broker")
    mosq.workdir.mkdir()
    mosq.start()
    try:
        yield mosq
    finally:
        mosq.close()


@pytest.fixture
def stoppers() -> Iterator[Callable[[Callable[[], object]], None]]:
    """Register clean-up calls (agents, services) that run in reverse order at teardown."""
    calls: list[Callable[[], object]] = []
    yield calls.append
    errors = []
    for call in reversed(calls):
        try:
            call()
        except Exception as exc:  # keep stopping the rest, then report
            errors.append(exc)
    if errors:
        raise errors[0]
