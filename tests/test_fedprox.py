"""FedProx: the proximal term travels in the task config and devices apply it."""

import numpy as np

from fedmq.core.protocol import TaskConfig

from .helpers import trained_digits_delta


def trained_delta_norm(prox_mu: float) -> float:
    task = TaskConfig(epochs=3, lr=0.1, prox_mu=prox_mu)
    return float(np.linalg.norm(trained_digits_delta(task)))


def test_devices_apply_the_announced_proximal_term():
    plain, prox = trained_delta_norm(0.0), trained_delta_norm(1.0)
    assert prox < 0.8 * plain  # mu pulls local weights back towards the global model


def test_prox_mu_round_trips_in_the_announcement():
    task = TaskConfig(prox_mu=0.01)
    assert TaskConfig.from_wire(task.to_wire()) == task
