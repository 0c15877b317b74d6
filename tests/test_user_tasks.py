"""Users' own tasks: the public API, its three Trainers, loading by import path or entry
point (and the errors when that fails), and the layout check between both sides."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedmq
from edge_agent.agent import LocalTrainer
from fedmq.core import codecs
from fedmq.core.layout import ParamLayout
from fedmq.core.protocol import ModelAnnouncement, TaskConfig
from fedmq.core.transfer import ReceivedModel, encode_model
from fedmq.errors import ConfigError, DataError, ProtocolError
from fedmq.models import build_model
from fedmq.tasks import device_shard, held_out_set, split_task, task_spec
from fedmq.tasks.datasource import load_source

from .user_tasks import CLASSES, FEATURES, blobs

NUMPY_TASK = "tests.user_tasks.numpy_task:BlobsTask"
TORCH_TASK = "tests.user_tasks.torch_task:DigitsTorchTask"
SKLEARN_TASK = "tests.user_tasks.sklearn_task:DigitsSgdTask"
_names = itertools.count()


@pytest.fixture
def write_module(tmp_path, monkeypatch):
    """write_module(source) -> the name of a fresh importable module holding `source`."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(source: str) -> str:
        name = f"user_task_mod{next(_names)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def _model(reference: str, seed: int = 0):
    spec = task_spec(reference)
    return build_model(spec.model, spec.model_config(), seed=seed)


# -- the public API ------------------------------------------------------------------------

def test_the_api_is_importable_from_fedmq_and_import_fedmq_stays_light():
    for name in ("Task", "Trainer", "Budget", "Device", "FitResult", "TorchTrainer",
                 "NumpyTrainer", "SklearnTrainer"):
        assert getattr(fedmq, name).__name__ == name
    code = ("import sys, fedmq; heavy = [m for m in ('numpy', 'torch', 'sklearn') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError):
        fedmq.NoSuchThing  # noqa: B018


def test_a_user_layout_hashes_as_a_built_in_one_of_the_same_arrays():
    """The layout (names, shapes, order) decides the hash, not who built the model: a numpy
    task with logreg's arrays has logreg's hash."""
    model = _model(NUMPY_TASK)
    assert model.layout == ParamLayout((("w", (FEATURES, CLASSES)), ("b", (CLASSES,))))
    logreg = build_model("logreg", {"inputs": FEATURES, "classes": CLASSES})
    assert model.layout.hash == logreg.layout.hash


@pytest.mark.parametrize("reference", [NUMPY_TASK, TORCH_TASK, SKLEARN_TASK])
def test_flat_vector_round_trip_and_training_lowers_the_loss(reference):
    if reference != NUMPY_TASK:
        pytest.importorskip("torch" if reference == TORCH_TASK else "sklearn")
    model = _model(reference)
    flat = model.get_flat()
    assert flat.dtype == np.float32 and flat.shape == (model.layout.size,)
    shifted = flat + np.arange(flat.size, dtype=np.float32) / flat.size
    model.set_flat(shifted)
    np.testing.assert_allclose(model.get_flat(), shifted, rtol=1e-6)
    model.set_flat(flat)
    train = device_shard(reference, device_index=0, device_count=2, alpha=0.0, seed=0)
    test = held_out_set(reference, seed=0)
    before = model.evaluate(test.x, test.y)
    result = model.train(train.x, train.y, epochs=3, batch_size=32, lr=0.05,
                         rng=np.random.default_rng(0))
    after = model.evaluate(test.x, test.y)
    assert after.loss < before.loss and after.accuracy > before.accuracy
    assert result.complete and result.num_samples == 3 * len(train)
    assert result.steps == 3 * -(-len(train) // 32)


@pytest.mark.parametrize("reference", [NUMPY_TASK, TORCH_TASK, SKLEARN_TASK])
def test_the_budget_caps_steps_and_the_prox_term_pulls_toward_the_global_model(reference):
    if reference != NUMPY_TASK:
        pytest.importorskip("torch" if reference == TORCH_TASK else "sklearn")
    train = device_shard(reference, device_index=0, device_count=2, alpha=0.0, seed=0)
    moved = {}
    for mu in (0.0, 5.0):
        model = _model(reference)
        start = model.get_flat()
        result = model.train(train.x, train.y, epochs=5, batch_size=16, lr=0.05,
                             rng=np.random.default_rng(1), prox_mu=mu, max_steps=7)
        assert (result.steps, result.num_samples, result.complete) == (7, 7 * 16, False)
        moved[mu] = float(np.linalg.norm(model.get_flat() - start))
    assert 0 < moved[5.0] < moved[0.0]


def test_budget_batches_take_one_step_even_with_no_time_left():
    budget = fedmq.Budget(epochs=3, batch_size=4, time_budget_s=1e-9)
    plan = budget.batches(40)
    assert len(list(plan)) == 1
    assert plan.result(0.5) == fedmq.FitResult(num_samples=4, loss=0.5, steps=1,
                                               complete=False)
    with pytest.raises(DataError, match="no training examples"):
        budget.batches(0)


def test_device_shard_is_deterministic_and_disjoint():
    x, y = blobs(seed=0, n=200)
    rows = []
    for index in range(4):
        device = fedmq.Device(index=index, count=4, seed=3, alpha=0.5)
        part_x, _ = device.shard(x, y)
        again_x, _ = device.shard(x, y)
        np.testing.assert_array_equal(part_x, again_x)
        rows.extend(map(tuple, part_x.tolist()))
    assert len(rows) == len(set(rows)) == 200


def test_a_regression_task_reports_no_accuracy(write_module):
    pytest.importorskip("sklearn")
    name = write_module("""
        import numpy as np
        from sklearn.linear_model import SGDRegressor
        import fedmq

        class Line(fedmq.Task):
            def build(self, *, seed):
                return fedmq.SklearnTrainer(SGDRegressor(learning_rate="constant", eta0=0.01),
                                            features=3)
            def load_data(self, device):
                x = np.random.default_rng(device.index).normal(size=(200, 3))
                return x, x @ np.array([1.0, -2.0, 0.5]) + 0.3
    """)
    model = _model(f"{name}:Line")
    data = device_shard(f"{name}:Line", device_index=0, device_count=1, alpha=0.0, seed=0)
    before = model.evaluate(data.x, data.y)
    model.train(data.x, data.y, epochs=3, batch_size=20, lr=0.1,
                rng=np.random.default_rng(0))
    after = model.evaluate(data.x, data.y)
    assert after.accuracy is None and after.loss < before.loss / 10
    assert [n for n, _ in model.layout.entries] == ["coef_", "intercept_"]


# -- loading by name -----------------------------------------------------------------------

def test_a_task_is_found_by_import_path_with_its_own_defaults():
    spec = task_spec(NUMPY_TASK)
    assert spec.custom and spec.model == NUMPY_TASK and spec.model_config() == {}
    assert (spec.rounds, spec.epochs, spec.batch_size, spec.lr) == (3, 1, 16, 0.2)
    assert task_spec(NUMPY_TASK) is spec  # loaded once
    with pytest.raises(ConfigError, match="trains its own model"):
        spec.model_config("mlp")
    with pytest.raises(ConfigError, match="is a user task"):
        split_task(NUMPY_TASK, seed=0)


def test_a_task_is_found_by_entry_point(tmp_path, monkeypatch, write_module):
    """An installed package's `fedmq.tasks` entry point, as pip would record it."""
    module = write_module("""
        import numpy as np
        import fedmq
        from tests.user_tasks.numpy_task import BlobsTask

        class Renamed(BlobsTask):
            name = "blobs-by-entry-point"
    """)
    dist = tmp_path / "blobs_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: blobs-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[fedmq.tasks]\nblobs = {module}:Renamed\n")
    spec = task_spec("blobs")
    assert spec.model == "blobs-by-entry-point" and spec.custom
    assert _model("blobs").layout.hash == _model(NUMPY_TASK).layout.hash
    with pytest.raises(ConfigError, match="the installed blobs, or your own as package"):
        task_spec("no-such-task")


@pytest.mark.parametrize(("source", "reference", "message"), [
    ("", "nowhere_pkg.tasks:Task",
     "task nowhere_pkg.tasks:Task: cannot import nowhere_pkg.tasks: there is no module "
     "'nowhere_pkg'; install the task's package"),
    ("import not_installed_dependency\n", "{m}:Task",
     "importing {m} failed: it needs 'not_installed_dependency', which is not installed"),
    ("def broken(:\n", "{m}:Task", r"importing {m} failed: SyntaxError: .*{m}\.py:1\)"),
    ("raise RuntimeError('no config file')\n", "{m}:Task",
     r"importing {m} failed: RuntimeError: no config file \(.*{m}\.py:1\)"),
    ("X = 1\n", "{m}:Task", "{m} has no 'Task'"),
    ("import fedmq\nclass Task(fedmq.Task):\n    def build(self, *, seed): pass\n", "{m}:Task",
     "task {m}:Task: Task lacks load_data"),
    ("class Task:\n    pass\n", "{m}:Task", "Task lacks build, load_data"),
    ("import fedmq\nclass Task(fedmq.Task):\n    def __init__(self, size): pass\n"
     "    def build(self, *, seed): pass\n    def load_data(self, device): pass\n",
     "{m}:Task", r"Task\(\) failed: TypeError: .* \(a task is built with no arguments\)"),
    ("import fedmq\nclass Task(fedmq.Task):\n    name = 'mlp'\n"
     "    def build(self, *, seed): pass\n    def load_data(self, device): pass\n",
     "{m}:Task", "its model name 'mlp' is taken by a built-in model"),
    ("import fedmq\nclass Task(fedmq.Task):\n    rounds = 0\n"
     "    def build(self, *, seed): pass\n    def load_data(self, device): pass\n",
     "{m}:Task", "rounds = 0 must be a number >= 1"),
    ("", "pkg.mod:", "must be package.module:Name"),
])
def test_a_task_that_cannot_load_says_what_failed(write_module, source, reference, message):
    module = write_module(source)
    with pytest.raises(ConfigError, match=message.format(m=module)):
        task_spec(reference.format(m=module))


TRAINER_FAULTS = """
    import numpy as np
    import fedmq

    class Good(fedmq.Task):
        def build(self, *, seed):
            return fedmq.NumpyTrainer({"w": np.zeros(3)}, self.grad)
        def grad(self, params, x, y):
            return 0.0, {"w": np.zeros(3)}
        def load_data(self, device):
            return np.ones((4, 3)), np.zeros(4, int)

    class NotATrainer(Good):
        def build(self, *, seed):
            return object()

    class Counting:
        def get_params(self):
            return {"w": np.zeros(3), "steps": np.zeros(1, dtype=np.int64)}
        def set_params(self, params): pass
        def fit(self, x, y, budget): pass
        def evaluate(self, x, y): pass

    class IntParams(Good):
        def build(self, *, seed):
            return Counting()

    class Crashing(Good):
        def grad(self, params, x, y):
            raise ValueError("shapes do not align")

    class BadData(Good):
        def load_data(self, device):
            return np.ones((4, 3))

    class Declared(Good):
        input_shape = (3,)
        classes = 2
        def load_data(self, device):
            return np.ones((4, 3)), np.array([0, 1, 2, 1])
"""


def test_user_code_failures_are_named_errors_not_tracebacks(write_module):
    m = write_module(TRAINER_FAULTS)
    with pytest.raises(ConfigError, match="build\\(\\) returned object, which lacks "
                                          "get_params, set_params, fit, evaluate"):
        _model(f"{m}:NotATrainer")
    with pytest.raises(DataError, match="parameter 'steps' is int64; only floating-point"):
        _model(f"{m}:IntParams")
    model = _model(f"{m}:Crashing")
    with pytest.raises(DataError, match=rf"task {m}:Crashing: fit\(\) failed: ValueError: "
                                        rf"shapes do not align \(.*{m}\.py:\d+\)"):
        model.train(np.ones((4, 3)), np.zeros(4, int), epochs=1, batch_size=2, lr=0.1,
                    rng=np.random.default_rng(0))
    with pytest.raises(DataError, match=r"load_data\(device 0 of 1\) must return \(x, y\)"):
        device_shard(f"{m}:BadData", device_index=0, device_count=1, alpha=0.0, seed=0)
    with pytest.raises(DataError, match=r"labels must be in \[0, 2\)"):  # declared: checked
        device_shard(f"{m}:Declared", device_index=0, device_count=1, alpha=0.0, seed=0)


def test_a_declared_task_takes_a_data_source_and_an_undeclared_one_says_why_not(
        tmp_path, write_module):
    m = write_module(TRAINER_FAULTS)
    path = tmp_path / "data.npz"
    np.savez(path, x=np.ones((5, 3)), y=np.array([0, 1, 1, 0, 1]))
    data = load_source(f"npz:{path}", f"{m}:Declared")
    assert data.x.shape == (5, 3) and data.x.dtype == np.float32
    with pytest.raises(ConfigError, match="declares no input_shape and classes"):
        load_source(f"npz:{path}", f"{m}:Good")


# -- both sides must train the same task ---------------------------------------------------

def _announcement(reference: str, **overrides) -> tuple[ModelAnnouncement, np.ndarray]:
    model = _model(reference)
    params = model.get_flat()
    info, _ = encode_model(params, codec="float32", version=0)
    fields = dict(fleet="f", version=0, round=1, model=model.name, model_config={},
                  layout=model.layout.to_wire(), layout_hash=model.layout.hash,
                  task=TaskConfig(epochs=1, batch_size=16, lr=0.1), payload=info)
    return ModelAnnouncement(**(fields | overrides)), params


def _trainer(reference: str) -> LocalTrainer:
    data = device_shard(reference, device_index=0, device_count=2, alpha=0.0, seed=0)
    return LocalTrainer(device_id="d0", data=data, codec="float32", seed=1, task=reference)


def test_an_agent_trains_its_task_and_sends_a_delta_of_its_layout():
    announcement, params = _announcement(NUMPY_TASK)
    update = _trainer(NUMPY_TASK).train(ReceivedModel(announcement, params, 0))
    delta = codecs.decode(update.delta)
    assert update.layout_hash == announcement.layout_hash and delta.shape == params.shape
    assert np.abs(delta).sum() > 0 and update.num_samples > 0


def test_an_agent_refuses_another_task_naming_both(write_module):
    m = write_module(TRAINER_FAULTS)
    announcement, params = _announcement(f"{m}:Good")
    mine = _model(NUMPY_TASK).layout.hash
    with pytest.raises(ProtocolError, match=(
            rf"the aggregator trains {m}:Good \(layout {announcement.layout_hash}\) but this "
            rf"device's task {NUMPY_TASK} is {NUMPY_TASK} \(layout {mine}\)")) as caught:
        _trainer(NUMPY_TASK).train(ReceivedModel(announcement, params, 0))
    assert caught.value.reason == "bad_layout"


def test_an_agent_refuses_its_own_task_at_another_layout_naming_both_hashes():
    """The same task name, a different version of its package (another layout)."""
    announcement, params = _announcement(NUMPY_TASK, layout_hash="0badc0de")
    mine = _model(NUMPY_TASK).layout.hash
    with pytest.raises(ProtocolError, match=f"has layout 0badc0de, this device's task "
                                            f"{NUMPY_TASK} builds layout {mine}"):
        _trainer(NUMPY_TASK).train(ReceivedModel(announcement, params, 0))


def test_an_agent_of_a_bundled_task_refuses_a_user_model_it_cannot_build():
    announcement, params = _announcement(NUMPY_TASK, model="someone_else.tasks:Task")
    data = device_shard("digits", device_index=0, device_count=4, alpha=0.5, seed=0)
    trainer = LocalTrainer(device_id="d0", data=data, codec="float32", seed=1)
    with pytest.raises(ProtocolError, match=r"trains model someone_else\.tasks:Task, which "
                                            "this device cannot build"):
        trainer.train(ReceivedModel(announcement, params, 0))


def test_the_aggregator_config_takes_a_user_task_and_no_other_model():
    from aggregator.config import AggregatorConfig

    config = AggregatorConfig(task=NUMPY_TASK)
    assert (config.model_name, config.model_config()) == (NUMPY_TASK, {})
    with pytest.raises(ConfigError, match="trains its own model"):
        AggregatorConfig(task=NUMPY_TASK, model="logreg")


# -- the named arrays are a lossless view of the flat vector ------------------------------

shapes = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
                  min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**32 - 1))
def test_named_arrays_and_the_flat_vector_round_trip_with_the_built_in_hash(shapes, seed):
    from fedmq.models.user import UserModel

    entries = tuple((f"p{i}", shape) for i, shape in enumerate(shapes))
    params = {name: np.zeros(shape, np.float32) for name, shape in entries}
    model = UserModel("prop", fedmq.NumpyTrainer(params, lambda p, x, y: (0.0, p)))
    assert model.layout == ParamLayout(entries)
    assert model.layout.hash == ParamLayout(entries).hash
    flat = np.random.default_rng(seed).normal(size=model.layout.size).astype(np.float32)
    model.set_flat(flat)
    np.testing.assert_array_equal(model.get_flat(), flat)
    for name, view in ParamLayout(entries).split(flat).items():
        np.testing.assert_array_equal(model.trainer.get_params()[name], view)
