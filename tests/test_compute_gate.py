"""LocalTrainer's compute_gate: a simulator's devices take turns on the cores, and a device
stopped while it waits for its turn gives up instead of training first."""

from __future__ import annotations

import threading
import time

import pytest

from edge_agent.agent import TrainingSkipped
from fedmq.core.protocol import TaskConfig
from tests.helpers import trained_digits_delta

TASK = TaskConfig(epochs=1, batch_size=16, lr=0.1)


def test_the_gate_is_held_while_training_and_released_after():
    gate = threading.BoundedSemaphore(1)
    held = []

    def probe(trainer):  # the model's train runs inside the gate: peek from a hook
        model_train = trainer._model_for

        def model_for(a):
            model = model_train(a)
            inner = model.train

            def train(*args, **kwargs):
                held.append(not gate.acquire(blocking=False))
                return inner(*args, **kwargs)

            model.train = train
            return model

        trainer._model_for = model_for

    delta = trained_digits_delta(TASK, compute_gate=gate, before_train=probe)
    assert held == [True]  # nobody else could take the gate while the model trained
    assert gate.acquire(blocking=False)  # and it was given back
    assert delta.any()


def test_a_device_stopped_while_waiting_for_its_turn_gives_up():
    gate = threading.BoundedSemaphore(1)
    gate.acquire()  # another device is training

    def stop_soon(trainer):
        threading.Timer(0.3, trainer.halt.set).start()

    started = time.monotonic()
    with pytest.raises(TrainingSkipped, match="stopped while waiting to train"):
        trained_digits_delta(TASK, compute_gate=gate, before_train=stop_soon)
    assert time.monotonic() - started < 10  # gave up at the stop, not after the other


def test_a_device_stopped_while_training_ends_after_the_step_and_gives_up():
    """Stopping a simulation does not wait for a long local budget to run out."""
    gate = threading.BoundedSemaphore(1)
    results = []

    def stop_as_it_starts(trainer):
        model_for = trainer._model_for

        def stopped_model_for(a):
            model = model_for(a)
            inner = model.train

            def train(*args, **kwargs):
                trainer.halt.set()  # the stop arrives as the model starts its steps
                results.append(inner(*args, **kwargs))
                return results[-1]

            model.train = train
            return model

        trainer._model_for = stopped_model_for

    long_task = TaskConfig(epochs=500, batch_size=16, lr=0.1)  # thousands of steps
    with pytest.raises(TrainingSkipped, match="stopped while training"):
        trained_digits_delta(long_task, compute_gate=gate, before_train=stop_as_it_starts)
    assert [r.steps for r in results] == [1] and not results[0].complete
    assert gate.acquire(blocking=False)  # the turn was given back


def test_without_a_gate_a_stopped_flag_does_not_stop_training():
    delta = trained_digits_delta(TASK, before_train=lambda t: t.halt.set())
    assert delta.any()


def test_a_device_sent_a_newer_model_while_waiting_gives_the_old_one_up():
    gate = threading.BoundedSemaphore(1)
    gate.acquire()
    newer = threading.Event()

    def newer_model_soon(trainer):
        trainer.superseded = lambda round: round == 1 and newer.is_set()
        threading.Timer(0.3, newer.set).start()

    with pytest.raises(TrainingSkipped, match="a later round began while waiting"):
        trained_digits_delta(TASK, compute_gate=gate, before_train=newer_model_soon)


def test_an_agent_tells_its_trainer_when_a_later_round_began(stoppers):
    """A Train of a later round, or a SitOut of one (the device is not in its cohort: the
    round it waits to train has closed), supersedes the waiting one; an earlier one not."""
    from fedmq.core.device import SitOut, Train
    from tests.helpers import make_agents

    class Later:  # what the agent reads of a ReceivedModel / an announcement here
        def __init__(self, round):
            self.round, self.version, self.announcement, self.wire_bytes = round, 0, self, 0

    agent = make_agents("mqtt://127.0.0.1:1", stoppers, 1, start=False)[0]
    assert not agent.trainer.superseded(1)
    agent._carry_out(SitOut(Later(2)))
    assert agent.trainer.superseded(1) and not agent.trainer.superseded(2)
    agent._carry_out(Train(model=Later(3), task=TASK))
    assert agent.trainer.superseded(2) and not agent.trainer.superseded(3)
    agent._carry_out(SitOut(Later(1)))  # an old decision heard late changes nothing
    assert not agent.trainer.superseded(3)


def test_a_stop_reaches_a_users_trainer_through_its_batches():
    from fedmq import Budget
    from fedmq.models.base import stoppable

    budget = Budget(epochs=3, batch_size=10)
    stop = threading.Event()
    plan = budget.batches(100)
    with stoppable(stop.is_set):
        for _ in plan:
            stop.set()
    assert plan.steps == 1 and not plan.complete
    unstopped = budget.batches(100)
    assert sum(1 for _ in unstopped) == 30  # outside the block nothing stops it
