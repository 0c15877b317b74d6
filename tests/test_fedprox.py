"""FedProx: the proximal term travels in the task config and devices apply it."""

import numpy as np

from edge_agent.agent import LocalTrainer
from fedmq.core import codecs
from fedmq.core.protocol import ModelAnnouncement, TaskConfig
from fedmq.core.transfer import ReceivedModel, encode_model
from fedmq.models import build_model
from fedmq.tasks import device_shard


def trained_delta_norm(prox_mu: float) -> float:
    config = {"inputs": 64, "classes": 10, "hidden": 16}
    model = build_model("mlp", config, seed=0)
    params = model.get_flat()
    info, _ = encode_model(params, codec="float32", version=0)
    announcement = ModelAnnouncement(
        fleet="f", version=0, round=1, model="mlp", model_config=config,
        layout=model.layout.to_wire(), layout_hash=model.layout.hash,
        task=TaskConfig(epochs=3, lr=0.1, prox_mu=prox_mu), payload=info)
    data = device_shard("digits", device_index=0, device_count=4, alpha=0.5, seed=0)
    trainer = LocalTrainer(device_id="d0", data=data, codec="float32", seed=1)
    update = trainer.train(ReceivedModel(announcement, params, 0))
    return float(np.linalg.norm(codecs.decode(update.delta)))


def test_devices_apply_the_announced_proximal_term():
    plain, prox = trained_delta_norm(0.0), trained_delta_norm(1.0)
    assert prox < 0.8 * plain  # mu pulls local weights back towards the global model


def test_prox_mu_round_trips_in_the_announcement():
    task = TaskConfig(prox_mu=0.01)
    assert TaskConfig.from_wire(task.to_wire()) == task
