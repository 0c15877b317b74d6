"""ONNX export of global models and onnxruntime-only prediction on the device."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import threading

import numpy as np
import pytest

from aggregator.onnx_export import (
    LATEST,
    BackgroundExporter,
    ExportError,
    ModelExporter,
    check_exportable,
    export_onnx,
)
from edge_agent.predict import OnnxPredictor
from fedmq.core.protocol import FleetTopics, ModelAnnouncement, ModelChunk
from fedmq.core.transfer import ModelReceiver, ReceivedModel
from fedmq.errors import ConfigError, DataError
from fedmq.models import build_model
from fedmq.models.numpy_models import NumpyModel
from fedmq.tasks import split_task, task_spec
from fedmq.tasks.datasource import task_class_names
from fedmq.transport.mqtt import MqttLink

from .helpers import make_agents, make_aggregator, wait_for

FEDMQ = [sys.executable, "-m", "fedmq.cli"]
TOL = 1e-4
SMALL_GRU = {"vocab": 96, "seq_len": 10, "embed": 8, "hidden": 16}
SMALL_CNN = {"channels": 6, "steps": 20, "classes": 4, "width": 4}


@pytest.fixture(scope="module")
def digits():
    return split_task("digits", seed=0)


def trained(name: str, config: dict, digits):
    """A model a few SGD steps away from its initialisation, so no weight is trivial."""
    model = build_model(name, config, seed=3)
    train, _ = digits
    model.train(train.x, train.y, epochs=1, batch_size=64, lr=0.1,
                rng=np.random.default_rng(0))
    return model


@pytest.mark.parametrize(("name", "config"), [
    ("logreg", {"inputs": 64, "classes": 10}),
    ("mlp", {"inputs": 64, "classes": 10, "hidden": 32}),
])
def test_numpy_models_match_their_onnx_export(tmp_path, digits, name, config):
    model = trained(name, config, digits)
    _, test = digits
    path = export_onnx(model, tmp_path / f"{name}.onnx", version=7, round=9, task="digits",
                       model_config=config)
    predictor = OnnxPredictor(path)
    for n in (1, 7, len(test)):  # the batch dimension is dynamic
        got = predictor.logits(test.x[:n])
        want = model._logits(test.x[:n])  # the numpy model's own forward pass
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    ev = model.evaluate(test.x, test.y)
    assert float((predictor.predict(test.x) == test.y).mean()) == pytest.approx(ev.accuracy)
    np.testing.assert_allclose(predictor.predict_proba(test.x).sum(axis=1), 1.0, atol=1e-5)
    one = predictor.predict(test.x[0])  # a single example, no batch axis
    assert one.shape == (1,)
    info = predictor.info
    assert (info.model, info.version, info.round, info.task) == (name, 7, 9, "digits")
    assert info.layout_hash == model.layout.hash
    assert (info.input_dtype, info.input_shape, info.class_names) == (np.float32, (64,), ())


def test_metadata_is_in_the_onnx_file_itself(tmp_path, digits):
    import onnx

    model = trained("logreg", {"inputs": 64, "classes": 10}, digits)
    proto = onnx.load(str(export_onnx(model, tmp_path / "m.onnx", version=2, round=3,
                                      task="digits")))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["fedmq.model"] == "logreg" and props["fedmq.version"] == "2"
    assert props["fedmq.layout_hash"] == model.layout.hash
    assert props["fedmq.input_shape"] == "[64]" and props["fedmq.input_dtype"] == "float32"
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory):
    """char_gru and har_cnn, each exported once (torch.onnx.export takes seconds)."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("torch")
    models = {"char_gru": build_model("char_gru", SMALL_GRU, seed=1),
              "har_cnn": build_model("har_cnn", SMALL_CNN, seed=1)}
    tasks = {"char_gru": "keyboard", "har_cnn": "sensor"}
    models["har_cnn"].module.train()  # export traces in eval mode, then restores this
    paths = {name: export_onnx(m, out / f"{name}.onnx", version=4, round=5, task=tasks[name],
                               class_names=task_class_names(tasks[name]))
             for name, m in models.items()}
    assert models["har_cnn"].module.training
    return models, paths


def test_torch_models_match_their_onnx_export(torch_exports):
    models, paths = torch_exports
    rng = np.random.default_rng(0)
    inputs = {"char_gru": lambda n: rng.integers(0, 96, (n, 10)),
              "har_cnn": lambda n: rng.normal(size=(n, 6, 20)).astype(np.float32)}
    for name, model in models.items():
        predictor = OnnxPredictor(paths[name])
        for n in (1, 3, 17):
            x = inputs[name](n)
            got, want = predictor.logits(x), model.predict_logits(x)
            assert got.shape == want.shape == (n, 96 if name == "char_gru" else 4)
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("task", ["sensor", "keyboard"])
def test_task_default_torch_models_match_their_onnx_export_on_real_windows(tmp_path, task):
    """The configs a fleet runs (har_cnn width 16; char_gru 64 steps, GRU 128), on held-out
    windows; the char_gru export alone takes ~5 s, the GRU is traced step by step."""
    spec = task_spec(task)
    train, test = split_task(task, seed=0)
    model = build_model(spec.model, spec.model_config(), seed=0)
    model.train(train.x[:256], train.y[:256], epochs=1, batch_size=spec.batch_size, lr=spec.lr,
                rng=np.random.default_rng(0), max_steps=8)  # away from the initialisation
    path = export_onnx(model, tmp_path / f"{spec.model}.onnx", version=1, round=1, task=task,
                       model_config=spec.model_config(), class_names=task_class_names(task))
    predictor = OnnxPredictor(path)
    x = test.x[:8]
    got, want = predictor.logits(x), model.predict_logits(x)
    assert got.shape == want.shape == (8, spec.classes)
    assert float(np.abs(got - want).max()) <= TOL
    assert predictor.info.input_shape == tuple(test.x.shape[1:])


def test_torch_metadata_names_input_dtype_shape_and_classes(torch_exports):
    _, paths = torch_exports
    gru, cnn = OnnxPredictor(paths["char_gru"]).info, OnnxPredictor(paths["har_cnn"]).info
    assert (gru.model, gru.task, gru.version, gru.round) == ("char_gru", "keyboard", 4, 5)
    assert (gru.input_dtype, gru.input_shape) == (np.int64, (10,))
    assert len(gru.class_names) == 96 and gru.class_names[1] == " "
    assert (cnn.input_dtype, cnn.input_shape) == (np.float32, (6, 20))
    assert cnn.class_names == ("Badminton", "Running", "Standing", "Walking")


# -- the exporter the aggregator runs after each round --------------------------------------

def _logreg(seed: int):
    model = build_model("logreg", {"inputs": 64, "classes": 10})
    model.set_flat(np.random.default_rng(seed).normal(size=model.layout.size)
                   .astype(np.float32))
    return model


def test_exporter_writes_versions_links_latest_and_prunes(tmp_path):
    exporter = ModelExporter(tmp_path / "onnx", keep=2)
    for version in range(1, 5):
        path = exporter.export(_logreg(version), version=version, round=version + 1,
                               task="digits")
        assert path == tmp_path / "onnx" / f"model-v{version}.onnx"
        assert OnnxPredictor(exporter.latest).info.version == version
    assert exporter.versions() == [3, 4]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        LATEST, "model-v3.onnx", "model-v4.onnx"]  # no temporary files left behind
    assert exporter.latest.read_bytes() == exporter.path_for(4).read_bytes()
    # a fresh start (new checkpoint) numbers from 1 again: the new model is never pruned
    exporter.export(_logreg(0), version=1, round=1)
    assert exporter.versions() == [1, 4] and OnnxPredictor(exporter.latest).info.version == 1


def test_exporter_keep_zero_keeps_all_and_negative_is_refused(tmp_path):
    exporter = ModelExporter(tmp_path, keep=0)
    for version in range(3):
        exporter.export(_logreg(version), version=version, round=version)
    assert exporter.versions() == [0, 1, 2]
    with pytest.raises(ConfigError, match="keep must be >= 0"):
        ModelExporter(tmp_path, keep=-1)


class _Unexportable(NumpyModel):
    name = "weird"


def test_failed_export_leaves_the_directory_as_it_was(tmp_path):
    exporter = ModelExporter(tmp_path, keep=3)
    exporter.export(_logreg(1), version=1, round=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    from fedmq.models import ParamLayout

    weird = _Unexportable(ParamLayout((("w", (64, 10)),)), seed=0)
    with pytest.raises(ExportError, match="no ONNX graph for numpy model 'weird'"):
        check_exportable(weird)  # what a BackgroundExporter checks at start-up
    with pytest.raises(ExportError, match="no ONNX graph for numpy model 'weird'"):
        exporter.export(weird, version=2, round=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_readers_never_see_a_partial_latest_file(tmp_path):
    """A device process loading latest.onnx while the aggregator replaces it."""
    exporter = ModelExporter(tmp_path, keep=2)
    exporter.export(_logreg(0), version=0, round=0)
    done, seen, errors = threading.Event(), set(), []

    def read() -> None:
        while not done.is_set():
            try:
                seen.add(OnnxPredictor(exporter.latest).info.version)
            except DataError as exc:
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in range(1, 40):
            exporter.export(_logreg(version), version=version, round=version)
    finally:
        done.set()
        reader.join(30)
    assert not errors and len(seen) > 1


def test_background_exporter_exports_the_newest_without_blocking(tmp_path):
    exporter = ModelExporter(tmp_path, keep=3)
    background = BackgroundExporter(exporter, model="mlp",
                                    model_config={"inputs": 64, "classes": 10, "hidden": 8},
                                    task="digits")
    try:
        params = [build_model("mlp", {"inputs": 64, "classes": 10, "hidden": 8}, seed=s)
                  .get_flat() for s in range(5)]
        for version, flat in enumerate(params, start=1):
            background.submit(flat, version=version, round=version)
            flat[:] = 0  # the caller may reuse its buffer at once: submit copied it
        assert background.flush(60)
    finally:
        background.close()
    assert background.failures == 0
    assert len(background.exported) + background.skipped == 5
    info = OnnxPredictor(exporter.latest).info
    assert (info.version, info.task) == (5, "digits")
    x = np.random.default_rng(1).random((4, 64), dtype=np.float32)
    model = build_model("mlp", {"inputs": 64, "classes": 10, "hidden": 8}, seed=4)
    np.testing.assert_allclose(OnnxPredictor(exporter.latest).logits(x), model._logits(x),
                               atol=TOL, rtol=0)


def test_background_exporter_survives_a_failed_export(tmp_path):
    background = BackgroundExporter(ModelExporter(tmp_path), model="logreg",
                                    model_config={"inputs": 64, "classes": 10})
    try:
        background.submit(np.zeros(3, np.float32), version=1, round=1)  # wrong size
        assert background.flush(60) and background.failures == 1
        background.submit(_logreg(2).get_flat(), version=2, round=2)
        assert background.flush(60)
    finally:
        background.close()
    assert background.failures == 1 and background.exported == [tmp_path / "model-v2.onnx"]


@pytest.mark.integration
def test_each_round_of_a_real_fleet_is_exported_and_predicts_like_the_server(
        broker, tmp_path, stoppers, digits):
    """The service with onnx_dir set: v0 at start, then every round's model."""
    onnx_dir = tmp_path / "onnx"
    service = make_aggregator(broker.url, tmp_path, stoppers, model="mlp", hidden=16,
                              min_updates=2, rounds=2, onnx_dir=str(onnx_dir), onnx_keep=5)
    make_agents(broker.url, stoppers, 2)
    wait_for(service.finished.is_set, "two rounds")
    assert service.exporter.flush(60) and service.exporter.failures == 0
    assert sorted(p.name for p in onnx_dir.glob("model-v*.onnx")) == [
        "model-v0.onnx", "model-v1.onnx", "model-v2.onnx"]
    predictor = OnnxPredictor(onnx_dir / LATEST)
    assert predictor.info.version == 2 and predictor.info.layout_hash == service.model.layout.hash
    _, test = digits
    accuracy = float((predictor.predict(test.x) == test.y).mean())
    assert accuracy == pytest.approx(service.history[-1].accuracy)


@pytest.mark.integration
def test_a_device_exports_the_model_it_received_as_the_aggregator_does(broker, tmp_path,
                                                                       stoppers):
    """The snippet in docs/onnx.md: a model assembled from the broadcast (the receiving code
    of EdgeAgent) goes through export_onnx to the very file the aggregator wrote."""
    service = make_aggregator(broker.url, tmp_path, stoppers, onnx_dir=str(tmp_path / "onnx"))
    topics, receiver, got = FleetTopics("test"), ModelReceiver(), []

    def keep(received: ReceivedModel | None) -> None:
        if received is not None:
            got.append(received)

    link = MqttLink(client_id="device-side", broker=broker.url)
    link.route(topics.model_current, lambda m: keep(receiver.offer_announcement(
        ModelAnnouncement.from_payload(m.payload), len(m.payload))))
    link.route(topics.model_payload_filter, lambda m: keep(receiver.offer_chunk(
        ModelChunk.from_payload(m.payload), len(m.payload))))
    link.start()
    stoppers(link.stop)
    wait_for(lambda: got, "model v0 assembled on the device side")
    received = got[0]

    a = received.announcement
    model = build_model(a.model, a.model_config)
    model.set_flat(received.params)
    path = export_onnx(model, tmp_path / "device.onnx", version=a.version, round=a.round,
                       task="digits", class_names=task_class_names("digits"),
                       model_config=a.model_config)

    assert service.exporter.flush(60) and service.exporter.failures == 0
    assert path.read_bytes() == (tmp_path / "onnx" / "model-v0.onnx").read_bytes()


# -- `fedmq predict` ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_model(tmp_path_factory, digits):
    model = trained("mlp", {"inputs": 64, "classes": 10, "hidden": 32}, digits)
    path = export_onnx(model, tmp_path_factory.mktemp("m") / "mlp.onnx", version=3, round=3,
                       task="digits")
    return model, path


def test_predict_cli_on_npz_and_csv(tmp_path, digits, digits_model):
    model, path = digits_model
    _, test = digits
    np.savez(tmp_path / "in.npz", x=test.x[:50], y=test.y[:50])
    proc = subprocess.run([*FEDMQ, "predict", "--model", str(path), "--input",
                           str(tmp_path / "in.npz")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == ["row", "class_1", "prob_1"] and len(rows) == 51
    want = model._logits(test.x[:50]).argmax(axis=1)
    assert [int(r[1]) for r in rows[1:]] == want.tolist()
    accuracy = float((want == test.y[:50]).mean())
    assert f"model mlp v3 (task digits): 50 predictions, accuracy {accuracy:.4f}" in proc.stderr

    with open(tmp_path / "in.csv", "w", newline="") as fh:  # features only, no label column
        csv.writer(fh).writerows([[repr(float(v)) for v in row] for row in test.x[:5]])
    out = tmp_path / "preds.csv"
    proc = subprocess.run([*FEDMQ, "predict", "--model", str(path), "--input",
                           str(tmp_path / "in.csv"), "--top", "3", "--output", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and f"written to {out}" in proc.stderr
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["row", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    probs = [[float(p) for p in r[2::2]] for r in rows[1:]]
    assert all(p[0] >= p[1] >= p[2] for p in probs)
    assert [int(r[1]) for r in rows[1:]] == want[:5].tolist()


def test_predict_cli_names_classes_and_continues_keyboard_text(torch_exports, tmp_path):
    _, paths = torch_exports
    np.savez(tmp_path / "s.npz", x=np.zeros((2, 6, 20), np.float32))
    proc = subprocess.run([*FEDMQ, "predict", "--model", str(paths["har_cnn"]), "--input",
                           str(tmp_path / "s.npz")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, first, _ = list(csv.reader(io.StringIO(proc.stdout)))
    assert header == ["row", "class_1", "name_1", "prob_1"]
    assert first[2] in ("Badminton", "Running", "Standing", "Walking")

    proc = subprocess.run([*FEDMQ, "predict", "--model", str(paths["char_gru"]), "--text",
                           "to be or not to b", "--top", "3", "--length", "5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    continued, alternatives = proc.stdout.splitlines()
    assert continued.startswith("to be or not to b") and len(continued) == 17 + 5
    assert alternatives.startswith("next character: ") and alternatives.count(",") == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/nonexistent.onnx", "--input", "x.npz"], "model file /nonexistent.onnx does"),
    (["--input", "BAD.csv"], "BAD.csv: 3 columns; model mlp takes 64 features"),
    (["--input", "x.txt"], "must be a .npz or .csv file"),
    (["--text", "hello"], "--text is for keyboard models"),
])
def test_predict_cli_errors_are_one_clear_line(tmp_path, digits_model, args, message):
    _, path = digits_model
    (tmp_path / "BAD.csv").write_text("1,2,3\n")
    (tmp_path / "x.txt").write_text("1,2,3\n")
    args = [a if not a[0].isupper() and not a.startswith("x.") else str(tmp_path / a)
            for a in args]
    if "--model" not in args:
        args = ["--model", str(path), *args]
    proc = subprocess.run([*FEDMQ, "predict", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_predictor_checks_its_input(digits_model):
    _, path = digits_model
    predictor = OnnxPredictor(path)
    with pytest.raises(DataError, match=r"examples of shape \(63,\), model mlp takes \(64,\)"):
        predictor.predict(np.zeros((2, 63)))
    with pytest.raises(DataError, match="NaN or infinite"):
        predictor.predict(np.full((2, 64), np.nan))
    with pytest.raises(DataError, match="must be numeric"):
        predictor.predict(np.array([["a"] * 64]))
    assert predictor.predict(np.zeros((3, 64), dtype=np.float64)).shape == (3,)


def test_predicting_never_imports_torch(torch_exports, digits_model, tmp_path):
    """A device runs predictions with numpy + onnxruntime only, CLI and API alike."""
    _, paths = torch_exports
    _, mlp = digits_model
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 64), np.float32))
    script = f"""
import sys
import numpy as np
from edge_agent.predict import OnnxPredictor
from fedmq.cli import main

OnnxPredictor({str(paths["har_cnn"])!r}).predict(np.zeros((2, 6, 20), np.float32))
assert main(["predict", "--model", {str(mlp)!r}, "--input", {str(tmp_path / "in.npz")!r}]) == 0
assert main(["predict", "--model", {str(paths["char_gru"])!r}, "--text", "hi"]) == 0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript"))
assert not heavy, heavy
print("no torch")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "no torch"


@pytest.mark.integration
def test_a_user_torch_task_is_exported_each_round_and_predicts_like_the_server(
        broker, tmp_path, stoppers):
    """A user's TorchTrainer module (BatchNorm, its own loss) declared with input_shape:
    the service exports every round's model, and onnxruntime scores it as torch did."""
    pytest.importorskip("onnxscript")
    from fedmq.tasks import held_out_set

    task = "tests.user_tasks.torch_task:ExportableDigitsTorchTask"
    onnx_dir = tmp_path / "onnx"
    service = make_aggregator(broker.url, tmp_path, stoppers, task=task, model="",
                              min_updates=2, rounds=2, onnx_dir=str(onnx_dir))
    make_agents(broker.url, stoppers, 2, task=task)
    wait_for(service.finished.is_set, "two rounds")
    assert service.exporter.flush(120) and service.exporter.failures == 0
    predictor = OnnxPredictor(onnx_dir / LATEST)
    assert predictor.info.version == 2 and predictor.info.task == task
    assert (predictor.info.input_dtype, predictor.info.input_shape) == ("float32", (64,))
    test = held_out_set(task, seed=0)
    accuracy = float((predictor.predict(test.x) == test.y).mean())
    assert accuracy == pytest.approx(service.history[-1].accuracy)


def test_a_user_torch_task_without_input_shape_says_how_to_export_it(tmp_path):
    pytest.importorskip("torch")
    from aggregator.onnx_export import BackgroundExporter

    task = "tests.user_tasks.torch_task:DigitsTorchTask"
    with pytest.raises(ExportError, match=r"declare the shape of one example as the task "
                                          r"class's input_shape"):
        BackgroundExporter(ModelExporter(tmp_path), model=task_spec(task).model,
                           model_config={}, task=task)
