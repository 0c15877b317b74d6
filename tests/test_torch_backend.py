"""The torch backend behind the flat-vector Model interface, on real task data."""

import subprocess
import sys

import numpy as np
import pytest

from fedmq.errors import ConfigError, DataError
from fedmq.models import build_model
from fedmq.tasks import device_shard, split_task, task_spec

torch = pytest.importorskip("torch")
from fedmq.models.torch_backend import TorchModel  # noqa: E402

# A small keyboard model: the architecture of the real one, a fraction of its cost.
SMALL_GRU = {"vocab": 96, "seq_len": 64, "embed": 8, "hidden": 16, "layers": 1}


@pytest.fixture(scope="module")
def sensor():
    return split_task("sensor", seed=0)


@pytest.fixture(scope="module")
def typing():
    return device_shard("keyboard", device_index=0, device_count=3, alpha=0.0, seed=0)


def _cnn(**overrides):
    return build_model("har_cnn", task_spec("sensor").model_config() | overrides, seed=0)


class Recorder(torch.nn.Module):
    """A linear model with a BatchNorm, recording the thread count its forward runs with."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(4)
        self.linear = torch.nn.Linear(4, 3)
        self.threads_seen = []

    def forward(self, x):
        self.threads_seen.append(torch.get_num_threads())
        return self.linear(self.norm(x))


def _recorder_model(threads=1):
    return TorchModel.build("recorder", Recorder, seed=0, example_shape=(4,), threads=threads)


def test_training_lowers_the_loss(sensor, typing):
    train, test = sensor
    cnn = _cnn()
    before = cnn.evaluate(test.x, test.y)
    result = cnn.train(train.x, train.y, epochs=8, batch_size=16, lr=0.05,
                       rng=np.random.default_rng(0))
    after = cnn.evaluate(test.x, test.y)
    assert after.loss < before.loss and after.accuracy > 0.6
    assert (result.num_samples, result.complete) == (8 * len(train), True)

    gru = build_model("char_gru", SMALL_GRU, seed=0)
    x, y = typing.x[:512], typing.y[:512]
    start = gru.evaluate(x, y)
    gru.train(x, y, epochs=3, batch_size=32, lr=1.0, rng=np.random.default_rng(0))
    assert gru.evaluate(x, y).loss < start.loss - 0.5


def test_training_is_deterministic_from_the_seed(sensor):
    train, _ = sensor
    runs = []
    for _ in range(2):
        model = _cnn()
        model.train(train.x, train.y, epochs=1, batch_size=16, lr=0.05,
                    rng=np.random.default_rng(3))
        runs.append(model.get_flat())
    assert np.array_equal(*runs)
    assert not np.array_equal(_cnn().get_flat(), build_model(
        "har_cnn", task_spec("sensor").model_config(), seed=1).get_flat())


def test_flat_vector_follows_named_parameters_order_and_round_trips():
    model = build_model("char_gru", SMALL_GRU | {"layers": 2}, seed=0)
    names = [n for n, _ in model.module.named_parameters()]
    assert [n for n, _ in model.layout.entries] == names
    flat = model.get_flat()
    assert flat.dtype == np.float32 and flat.shape == (model.layout.size,)
    state = model.module.state_dict()
    for name, view in model.layout.split(flat).items():
        assert np.array_equal(view, state[name].numpy())
    new = np.random.default_rng(0).normal(size=flat.shape).astype(np.float32)
    model.set_flat(new)
    assert np.array_equal(model.get_flat(), new)
    assert np.array_equal(model.module.state_dict()["out.bias"].numpy(),
                          model.layout.split(new)["out.bias"])
    with pytest.raises(DataError, match="parameters"):
        model.set_flat(new[:-1])


def test_float_buffers_travel_and_step_counters_stay_local():
    model = _recorder_model()
    names = [n for n, _ in model.layout.entries]
    assert names == ["norm.weight", "norm.bias", "linear.weight", "linear.bias",
                     "norm.running_mean", "norm.running_var"]
    x = np.random.default_rng(0).normal(3.0, 1.0, size=(64, 4)).astype(np.float32)
    y = np.zeros(64, dtype=np.int64)
    model.train(x, y, epochs=1, batch_size=16, lr=0.1, rng=np.random.default_rng(0))
    mean = model.layout.split(model.get_flat())["norm.running_mean"]
    assert np.all(mean > 0.5)  # moved from 0 towards the data's mean by the forward passes
    twin = _recorder_model()
    twin.set_flat(model.get_flat())
    assert np.allclose(twin.module.norm.running_mean.numpy(), mean)
    assert twin.module.norm.num_batches_tracked.item() == 0


def test_layout_hash_is_stable_across_builds_and_tracks_the_architecture():
    config = task_spec("keyboard").model_config()
    a, b = build_model("char_gru", config, seed=0), build_model("char_gru", config, seed=7)
    assert a.layout == b.layout and a.layout.hash == b.layout.hash
    # Pinned: a change here means deployed agents can no longer take part. Change it on purpose.
    assert a.layout.hash == "18c7d2a7" and a.layout.size == 66_144
    assert _cnn().layout.hash == "5be7c0fb" and _cnn().layout.size == 3_220
    assert build_model("char_gru", config | {"hidden": 64}).layout.hash != a.layout.hash
    assert build_model("char_gru", config | {"cell": "lstm"}).layout.hash != a.layout.hash


def test_the_thread_count_is_used_for_the_work_and_then_restored():
    before = torch.get_num_threads()
    model = _recorder_model(threads=2 if before != 2 else 3)
    x = np.ones((8, 4), dtype=np.float32)
    model.train(x, np.zeros(8, dtype=np.int64), epochs=1, batch_size=4, lr=0.1,
                rng=np.random.default_rng(0))
    model.predict_logits(x)
    assert set(model.module.threads_seen) == {model.threads}
    assert torch.get_num_threads() == before


def test_training_stops_at_the_step_cap_and_the_time_budget(sensor):
    train, _ = sensor
    x, y = train.x[:200], train.y[:200]
    model = _cnn()
    rng = np.random.default_rng(0)
    capped = model.train(x, y, epochs=5, batch_size=20, lr=0.05, rng=rng, max_steps=7)
    assert (capped.steps, capped.num_samples, capped.complete) == (7, 140, False)
    full = model.train(x, y, epochs=1, batch_size=20, lr=0.05, rng=rng)
    assert (full.steps, full.num_samples, full.complete) == (10, 200, True)
    spent = model.train(x, y, epochs=3, batch_size=32, lr=0.05, rng=rng, time_budget_s=1e-9)
    assert (spent.steps, spent.num_samples, spent.complete) == (1, 32, False)


def test_fedprox_term_pulls_towards_the_global_model(sensor):
    train, _ = sensor
    drift = {}
    for mu in (0.0, 1.0):
        model = _cnn()
        start = model.get_flat()
        model.train(train.x, train.y, epochs=3, batch_size=16, lr=0.1,
                    rng=np.random.default_rng(0), prox_mu=mu)
        drift[mu] = np.linalg.norm(model.get_flat() - start)
    assert drift[1.0] < 0.9 * drift[0.0]


def test_export_contract_example_input_and_logits(sensor, typing):
    cnn = _cnn()
    dummy = cnn.example_input(batch=3)
    assert dummy.shape == (3, 6, 40) and dummy.dtype == np.float32
    logits = cnn.predict_logits(sensor[1].x[:5])
    assert logits.shape == (5, 4) and logits.dtype == np.float32
    assert not cnn.module.training and isinstance(cnn.module, torch.nn.Module)
    assert cnn.evaluate(sensor[1].x, sensor[1].y).top3 is None

    gru = build_model("char_gru", SMALL_GRU)
    dummy = gru.example_input()
    assert dummy.shape == (1, 64) and dummy.dtype == np.int64
    with torch.no_grad():
        direct = gru.module(torch.from_numpy(np.array(typing.x[:4]))).numpy()
    assert np.allclose(gru.predict_logits(typing.x[:4]), direct, atol=1e-6)
    ev = gru.evaluate(typing.x[:300], typing.y[:300])
    assert ev.top3 is not None and ev.top3 >= ev.accuracy


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ConfigError, match="char_gru"):
        build_model("char_gru", {"vocab": 96})  # seq_len missing
    with pytest.raises(ConfigError, match="hidden"):
        build_model("char_gru", SMALL_GRU | {"hidden": 0})
    with pytest.raises(ConfigError, match="cell"):
        build_model("char_gru", SMALL_GRU | {"cell": "rnn"})
    with pytest.raises(ConfigError, match="width"):
        build_model("har_cnn", {"channels": 6, "steps": 40, "classes": 4, "width": -1})


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


def test_registering_models_and_tasks_does_not_import_torch():
    done = _python("import sys, fedmq.models, fedmq.tasks, edge_agent.agent\n"
                   "assert 'char_gru' in fedmq.models.model_names()\n"
                   "assert 'torch' not in sys.modules, 'torch imported'\n")
    assert done.returncode == 0, done.stderr


def test_building_without_torch_names_the_extra():
    done = _python("import sys\nsys.modules['torch'] = None\n"
                   "from fedmq.models import build_model\n"
                   "from fedmq.errors import MissingExtraError\n"
                   "try:\n    build_model('har_cnn', {'channels': 6, 'steps': 40, 'classes': 4})\n"
                   "except MissingExtraError as exc:\n    print(exc)\n")
    assert done.returncode == 0, done.stderr
    assert "pip install 'fedmq[torch]'" in done.stdout


def test_an_export_waits_for_torch_compute_and_compute_waits_for_an_export():
    """torch.export's tracing state is global to the process: an ONNX export and a
    training step on another thread must never overlap (TORCH_TRACING)."""
    import threading

    from fedmq.models.torch_backend import SharedExclusive

    lock, events = SharedExclusive(), []
    with lock.shared(), lock.shared():  # trainers share it
        exporter = threading.Thread(target=lambda: _hold(lock.exclusive(), events, "export"))
        exporter.start()
        exporter.join(0.3)
        assert exporter.is_alive() and events == []  # the export waits for both
    exporter.join(10)
    assert events == ["export"]
    with lock.exclusive():
        trainer = threading.Thread(target=lambda: _hold(lock.shared(), events, "train"))
        trainer.start()
        trainer.join(0.3)
        assert trainer.is_alive() and events == ["export"]  # a trainer waits for it
    trainer.join(10)
    assert events == ["export", "train"]


def _hold(context, events, name):
    with context:
        events.append(name)


def test_a_trainer_that_ends_first_leaves_the_others_at_their_thread_count():
    """torch's thread count is one per process: when two of a simulator's trainers
    overlap (one thread each), the first to end must not put the other back on every
    core, and the last to end restores the process's own count."""
    from fedmq.models.torch_backend import torch_compute

    own = torch.get_num_threads()
    torch.set_num_threads(3)  # a count neither trainer asks for
    try:
        first, second = torch_compute(1), torch_compute(1)
        first.__enter__()
        second.__enter__()
        assert torch.get_num_threads() == 1
        first.__exit__(None, None, None)  # ends while the second still trains
        assert torch.get_num_threads() == 1
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(own)
