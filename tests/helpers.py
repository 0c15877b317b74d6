"""Shared test helpers: condition waits (never fixed sleeps) and fleet builders."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmq.tasks import partition, split_task

# Generous: a shared 2-core CI box can stall a thread for seconds.
WAIT_S = 60.0

# The MQTT version every service and agent built here speaks unless a test says otherwise;
# the `mqtt_version` fixture (conftest.py) runs a test once on "5" and once on "3.1.1".
MQTT_VERSION = "auto"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def make_aggregator(broker_url: str, tmp_path, stoppers, *, start: bool = True,
                    **overrides) -> AggregatorService:
    settings = dict(broker=broker_url, fleet="test", task="digits", model="mlp", hidden=16,
                    min_updates=3, rounds=3, epochs=1, lr=0.1, deadline_s=30.0,
                    checkpoint=str(tmp_path / "aggregator.ckpt"), mqtt_version=MQTT_VERSION)
    settings.update(overrides)
    service = AggregatorService(AggregatorConfig(**settings))
    if not start:
        return service
    service.start()
    stoppers(service.stop)
    wait_for(service.link.subscribed.is_set, "the aggregator's subscriptions")
    return service


def make_agents(broker_url: str, stoppers, count: int, *, total: int | None = None,
                first: int = 0, fleet: str = "test", start: bool = True,
                **overrides) -> list[EdgeAgent]:
    total = total or count
    overrides.setdefault("mqtt_version", MQTT_VERSION)
    train, _ = split_task("digits", seed=0)
    shards = partition(train.y, devices=total, alpha=0.5, seed=0)
    agents = []
    for i in range(first, first + count):
        agent = EdgeAgent(AgentConfig(broker=broker_url, fleet=fleet, device_id=f"dev{i}",
                                      device_index=i, device_count=total, **overrides),
                          train.subset(shards[i]))
        if start:
            agent.start()
            stoppers(agent.stop)
        agents.append(agent)
    return agents


def trained_digits_delta(task, *, with_trainer=False, with_update=False, before_train=None,
                         **trainer_options):
    """Device 0 of 4 trains a digits MLP (v0, as `task` says) once; its decoded delta
    (and the trainer, `with_trainer`, or the Update, `with_update`). before_train(trainer)
    runs just before it trains."""
    from edge_agent.agent import LocalTrainer
    from fedmq.core import codecs
    from fedmq.core.protocol import ModelAnnouncement
    from fedmq.core.transfer import ReceivedModel, encode_model
    from fedmq.models import build_model
    from fedmq.tasks import device_shard

    config = {"inputs": 64, "classes": 10, "hidden": 16}
    model = build_model("mlp", config, seed=0)
    params = model.get_flat()
    info, _ = encode_model(params, codec="float32", version=0)
    announcement = ModelAnnouncement(
        fleet="f", version=0, round=1, model="mlp", model_config=config,
        layout=model.layout.to_wire(), layout_hash=model.layout.hash, task=task, payload=info)
    data = device_shard("digits", device_index=0, device_count=4, alpha=0.5, seed=0)
    trainer = LocalTrainer(device_id="d0", data=data, codec="float32", seed=1,
                           **trainer_options)
    if before_train is not None:
        before_train(trainer)
    update = trainer.train(ReceivedModel(announcement, params, 0))
    delta = codecs.decode(update.delta)
    if with_update:
        return delta, update
    return (delta, trainer) if with_trainer else delta


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus page on 127.0.0.1:port, parsed by prometheus_client's
    own text parser: {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_S) as page:
        text = page.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
