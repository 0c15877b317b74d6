"""A device's own data: every source kind loads, and every kind of bad data is named at start-up."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmq.errors import ConfigError, DataError
from fedmq.tasks.datasource import (
    CsvSource,
    InputSpec,
    NpzSource,
    PythonSource,
    TextSource,
    load_source,
    parse_source,
)

from .helpers import make_aggregator, wait_for

FEDMQ = [sys.executable, "-m", "fedmq.cli"]
DIGITS = InputSpec(task="digits", shape=(64,), dtype=np.dtype("float32"), classes=10)
KEYS = InputSpec(task="keyboard", shape=(8,), dtype=np.dtype("int64"), classes=96, vocab=96)
SENSOR = InputSpec(task="sensor", shape=(6, 5), dtype=np.dtype("float32"), classes=4,
                   class_names=("Badminton", "Running", "Standing", "Walking"))
finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


def write_csv(path, rows, header=None):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def digits_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 64), dtype=np.float32)
    y = rng.integers(0, 10, n)
    return x, y, [[repr(float(v)) for v in row] + [str(label)] for row, label in zip(x, y,
                                                                                      strict=True)]


# -- each kind loads -----------------------------------------------------------------------

@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 12), st.just(64)), elements=finite),
       data=st.data(), header=st.booleans(), label_at=st.integers(0, 64))
def test_csv_round_trip(tmp_path, x, data, header, label_at):
    """Any finite float32 features and any class ids come back exactly, wherever the label is."""
    y = data.draw(hnp.arrays(np.int64, len(x), elements=st.integers(0, 9)))
    rows = [[repr(float(v)) for v in row] for row in x]
    for row, label in zip(rows, y, strict=True):
        row.insert(label_at, str(label))
    names = [f"f{i}" for i in range(64)]
    names.insert(label_at, "digit")
    path = write_csv(tmp_path / "d.csv", rows, names if header else None)
    label = "digit" if header else ""
    if not header and label_at != 64:  # without a header the label must be last
        return
    got = CsvSource(path, label=label).load(DIGITS)
    assert got.x.dtype == np.float32 and got.y.dtype == np.int64
    np.testing.assert_array_equal(got.x, x)
    np.testing.assert_array_equal(got.y, y)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=hnp.arrays(st.sampled_from([np.float32, np.float64]),
                    st.tuples(st.integers(1, 10), st.just(6), st.just(5)), elements=finite),
       flat=st.booleans(), data=st.data())
def test_npz_round_trip(tmp_path, x, flat, data):
    """(n, 6, 5) or flattened (n, 30) rows load as the task's (n, 6, 5) float32."""
    y = data.draw(hnp.arrays(np.int32, len(x), elements=st.integers(0, 3)))
    path = tmp_path / "d.npz"
    np.savez(path, x=x.reshape(len(x), -1) if flat else x, y=y)
    got = NpzSource(path).load(SENSOR)
    assert got.x.shape == x.shape and got.x.dtype == np.float32
    np.testing.assert_array_equal(got.x, x.astype(np.float32))
    np.testing.assert_array_equal(got.y, y)


def test_csv_labels_may_be_class_names(tmp_path):
    rows = [[*(["0.5"] * 30), name] for name in ("Walking", "Running", "3")]
    got = CsvSource(write_csv(tmp_path / "s.csv", rows)).load(SENSOR)
    assert got.y.tolist() == [3, 1, 3] and got.x.shape == (3, 6, 5)


def test_text_becomes_windows_of_the_keyboard_vocabulary(tmp_path):
    from fedmq.tasks import keyboard

    text = "the quick brown fox jumps over the lazy dog"
    (tmp_path / "typing.txt").write_text(text, encoding="utf-8")
    got = TextSource(tmp_path / "typing.txt").load(KEYS)
    ids = keyboard.encode(text)
    assert got.x.shape == (len(text) - 8, 8) and got.x.dtype == np.int64
    np.testing.assert_array_equal(got.x[0], ids[:8])
    np.testing.assert_array_equal(got.y, ids[8:])
    newest = TextSource(tmp_path / "typing.txt", max_samples=5).load(KEYS)
    assert len(newest) == 5 and keyboard.decode(newest.y) == text[-5:]


def test_the_bundled_tasks_shapes_dtypes_and_names_are_checked(tmp_path):
    """The real task specs: keyboard windows of 64 ids, sensor (6, 40), feature names."""
    (tmp_path / "typing.txt").write_text("Dear diary, " * 20, encoding="utf-8")
    keys = load_source(f"text:{tmp_path / 'typing.txt'}", "keyboard")
    assert keys.x.shape == (240 - 64, 64) and keys.x.dtype == np.int64
    np.savez(tmp_path / "s.npz", x=np.zeros((3, 6, 40)), y=[0, 1, 3])
    assert load_source(f"npz:{tmp_path / 's.npz'}", "sensor").x.shape == (3, 6, 40)
    np.savez(tmp_path / "s2.npz", x=np.zeros((3, 6, 20)), y=[0, 1, 3])
    with pytest.raises(DataError, match=r"\(6, 20\), task 'sensor' needs \(6, 40\)"):
        load_source(f"npz:{tmp_path / 's2.npz'}", "sensor")
    rows = [[*(["0.1"] * 30), name] for name in ("Walking", "Badminton")]
    features = load_source(f"csv:{write_csv(tmp_path / 'f.csv', rows)}", "sensor-features")
    assert features.y.tolist() == [3, 0]
    with pytest.raises(DataError, match="'Jogging' is not a class id or a class name "
                       r"\(Badminton, Running, Standing, Walking\)"):
        load_source(f"csv:{write_csv(tmp_path / 'g.csv', [[*(['0'] * 30), 'Jogging']])}",
                    "sensor-features")


@pytest.fixture
def sensor_module(tmp_path, monkeypatch):
    """A 'live sensor' package importable as mysensor.read."""
    pkg = tmp_path / "mysensor"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "read.py").write_text(textwrap.dedent("""
        import numpy as np

        closed = []

        def batches():
            rng = np.random.default_rng(0)
            try:
                while True:  # a sensor never runs out
                    yield rng.normal(size=(7, 6, 5)), rng.integers(0, 4, 7)
            finally:
                closed.append(True)

        def single():
            for i in range(3):
                yield np.full(30, float(i)), i

        def broken():
            yield np.zeros((2, 6, 5)), [0, 1]
            raise OSError("I2C bus timeout")

        def garbage():
            yield "nope"

        def nothing():
            return iter(())

        not_callable = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("mysensor", "mysensor.read"):
        sys.modules.pop(name, None)


def test_python_source_collects_up_to_max_samples(sensor_module):
    got = PythonSource("mysensor.read:batches", max_samples=20).load(SENSOR)
    assert got.x.shape == (20, 6, 5) and got.x.dtype == np.float32
    import mysensor.read

    assert mysensor.read.closed == [True]  # the generator was closed, the sensor released
    single = PythonSource("mysensor.read:single").load(SENSOR)
    assert single.y.tolist() == [0, 1, 2] and single.x.shape == (3, 6, 5)


@pytest.mark.parametrize(("target", "error", "message"), [
    ("mysensor.read:broken", DataError, "python:mysensor.read:broken failed: OSError: I2C bus"),
    ("mysensor.read:garbage", DataError, "must yield (x, y) pairs"),
    ("mysensor.read:nothing", DataError, "yielded no examples"),
    ("mysensor.read:not_callable", ConfigError, "has no function 'not_callable'"),
    ("mysensor.nope:batches", ConfigError, "cannot import mysensor.nope"),
])
def test_python_source_errors_name_the_callable(sensor_module, target, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        PythonSource(target).load(SENSOR)


# -- bad data ----------------------------------------------------------------------------

def _header():
    return ",".join([f"f{i}" for i in range(64)] + ["label"])


ROW = ",".join(["0.5"] * 64)


@pytest.mark.parametrize(("content", "message"), [
    ("", "has no rows"),
    ("\n\n", "has no rows"),
    (_header() + "\n", "has a header but no data rows"),
    (f"{ROW},1\n{ROW}\n", "line 2: 64 columns, expected 65"),
    (f"{ROW},1\n" + ",".join(["0.5"] * 63) + ",abc,2\n",
     "line 2, column 64: 'abc' is not a number"),
    (f"{_header()}\n{ROW},1\n" + ",".join(["0.5"] * 10 + ["nan"] + ["0.5"] * 53) + ",2\n",
     "line 3, column 11 \\('f10'\\): 'nan' is not a finite number"),
    (f"{ROW},1\n" + ",".join(["inf"] * 64) + ",2\n", "line 2, column 1: 'inf' is not a finite"),
    (f"{ROW},10\n", "line 1, column 65: label 10 is not a class id in \\[0, 10\\)"),
    (f"{ROW},-1\n", "label -1 is not a class id"),
    (f"{ROW},2.5\n", "label 2.5 is not a class id"),
    (f"{ROW},cat\n", "label 'cat' is not a class id"),
    (",".join(["0.5"] * 10) + ",1\n",
     "10 feature columns \\(\\+1 label\\), task 'digits' needs 64"),
    ('1,"unterminated\n', "line 1: not valid CSV"),
])
def test_bad_csv_is_named_with_line_and_column(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_source(f"csv:{path}", "digits")
    assert str(path) in str(info.value)


def test_unreadable_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(f"csv:{tmp_path / 'missing.csv'}", "digits")
    with pytest.raises(DataError, match="is a directory"):
        load_source(f"csv:{tmp_path}", "digits")
    (tmp_path / "latin1.csv").write_bytes("0.5,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_source(f"csv:{tmp_path / 'latin1.csv'}", "digits")
    with pytest.raises(DataError, match="needs a header row"):
        _, _, rows = digits_rows(2)
        load_source(f"csv:{write_csv(tmp_path / 'nohead.csv', rows)}", "digits", label="label")


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((3, 64))}, "no array y"),
    ({"features": np.zeros((3, 64))}, "no array x or y; it holds features"),
    ({"x": np.zeros((3, 63)), "y": np.zeros(3, int)},
     r"shape \(63,\), task 'digits' needs \(64,\)"),
    ({"x": np.zeros((3, 64)), "y": np.zeros(4, int)}, "3 examples but 4 labels"),
    ({"x": np.zeros((0, 64)), "y": np.zeros(0, int)}, "no examples"),
    ({"x": np.full((3, 64), np.inf), "y": np.zeros(3, int)}, "example 0 has NaN or infinite"),
    ({"x": np.full((3, 64), 1e300), "y": np.zeros(3, int)}, "beyond the range of float32"),
    ({"x": np.zeros((3, 64)), "y": np.array([0, 1, 10])}, r"labels must be in \[0, 10\)"),
    ({"x": np.zeros((3, 64)), "y": np.array([0.5, 1, 2])}, "whole class ids"),
    ({"x": np.zeros((3, 64)), "y": np.zeros((3, 1), int)}, "one value per example"),
    ({"x": np.array(["a"] * 3), "y": np.zeros(3, int)}, "must be numeric"),
])
def test_bad_npz_is_named(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_source(f"npz:{path}", "digits")
    assert str(path) in str(info.value)


def test_npz_that_needs_pickle_or_is_no_zip_is_refused(tmp_path):
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_source(f"npz:{pickled}", "digits")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_source(f"npz:{tmp_path / 'junk.npz'}", "digits")


def test_keyboard_ids_out_of_range_and_text_misuse(tmp_path):
    np.savez(tmp_path / "k.npz", x=np.full((2, 8), 96), y=np.zeros(2, int))
    with pytest.raises(DataError, match=r"ids must be in \[0, 96\)"):
        NpzSource(tmp_path / "k.npz").load(KEYS)
    (tmp_path / "short.txt").write_text("hello")
    with pytest.raises(DataError, match="5 characters; at least 9"):
        TextSource(tmp_path / "short.txt").load(KEYS)
    with pytest.raises(DataError, match="text data is for the keyboard task"):
        load_source(f"text:{tmp_path / 'short.txt'}", "digits")


@pytest.mark.parametrize(("spec", "kwargs", "message"), [
    ("csv", {}, "must be KIND:WHERE"),
    ("parquet:/x.parquet", {}, "KIND one of csv, npz, python, text"),
    ("csv:", {}, "must be KIND:WHERE"),
    ("python:mysensor", {}, "python:package.module:function"),
    ("npz:/x.npz", {"label": "y"}, "data_label is only for csv"),
    ("python:a:b", {"max_samples": 0}, "data_max_samples must be >= 1"),
])
def test_bad_source_strings_are_config_errors(spec, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        parse_source(spec, **kwargs)


def test_empty_source_means_the_bundled_shard():
    assert parse_source("") is None and parse_source("  ") is None


# -- the agent ---------------------------------------------------------------------------

def test_agent_with_bad_data_stops_before_connecting(tmp_path):
    """Port 1 has no broker: the agent would retry forever, so exiting proves it never tried."""
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{ROW},1\n{ROW},nan\n")
    proc = subprocess.run(
        [*FEDMQ, "agent", "--broker", "mqtt://127.0.0.1:1", "--device-id", "own0",
         "--data-source", f"csv:{bad}"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{bad} line 2, column 65: label nan is not a class id" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_agent_with_bad_source_setting_in_its_config_file(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "own0"\nbroker = "mqtt://127.0.0.1:1"\n'
                      'data_source = "excel:/data.xlsx"\n')
    proc = subprocess.run([*FEDMQ, "agent", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "data_source 'excel:/data.xlsx' must be KIND:WHERE" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_agent_trains_on_its_own_csv_in_a_real_round(broker, tmp_path, stoppers, processes):
    _, _, rows = digits_rows(37)
    data = write_csv(tmp_path / "mine.csv", rows, _header().split(","))
    service = make_aggregator(broker.url, tmp_path, stoppers, model="logreg", min_updates=1,
                              rounds=1)
    processes.append(subprocess.Popen(
        [*FEDMQ, "agent", "--broker", broker.url, "--fleet", "test", "--device-id", "own0",
         "--data-source", f"csv:{data}", "--data-label", "label"],
        stderr=subprocess.PIPE, text=True))
    wait_for(service.finished.is_set, "one round trained on the device's own CSV")
    assert service.failure is None
    record = service.history[0]
    assert record.participants == 1 and record.samples == 37  # epochs=1 over 37 rows


# -- live data: re-read before every round ----------------------------------------------

def test_a_live_source_is_read_again_every_round_and_a_bad_read_keeps_the_last(tmp_path):
    path = tmp_path / "log.csv"
    write_csv(path, digits_rows(10)[2])
    reads = []

    def reload():
        reads.append(True)
        return load_source(f"csv:{path}", "digits")

    trainer, train_round = _trainer_and_round(load_source(f"csv:{path}", "digits"), reload)
    assert train_round(1) == 10
    write_csv(path, digits_rows(25)[2])  # the logger appended readings
    assert train_round(2) == 25
    path.write_text("0.5,half a row\n")  # a torn write, mid-append
    assert train_round(3) == 25 and trainer.reload_failures == 1
    write_csv(path, digits_rows(40)[2])
    assert train_round(4) == 40 and (trainer.reloads, len(reads)) == (3, 4)


def _trainer_and_round(data, reload):
    """A LocalTrainer on `data` with `reload`, and a function that trains one round."""
    from edge_agent.agent import LocalTrainer
    from fedmq.core.protocol import ModelAnnouncement, TaskConfig
    from fedmq.core.transfer import ReceivedModel, encode_model
    from fedmq.models import build_model

    config = {"inputs": 64, "classes": 10}
    model = build_model("logreg", config, seed=0)
    info, _ = encode_model(model.get_flat(), codec="float32", version=0)
    trainer = LocalTrainer(device_id="d0", data=data, codec="float32", seed=1, reload=reload)

    def train_round(r: int) -> int:
        announcement = ModelAnnouncement(
            fleet="f", version=0, round=r, model="logreg", model_config=config,
            layout=model.layout.to_wire(), layout_hash=model.layout.hash,
            task=TaskConfig(epochs=1, lr=0.1), payload=info)
        return trainer.train(ReceivedModel(announcement, model.get_flat(), 0)).num_samples

    return trainer, train_round


def test_a_torn_npz_or_a_crashing_reader_keeps_the_last_data(tmp_path):
    path = tmp_path / "log.npz"
    x, y, _ = digits_rows(12)
    np.savez(path, x=x, y=y)
    crash = []

    def reload():
        if crash:
            raise RuntimeError("USB unplugged")
        return load_source(f"npz:{path}", "digits")

    trainer, train_round = _trainer_and_round(reload(), reload)
    assert train_round(1) == 12
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # caught mid-write
    assert train_round(2) == 12 and trainer.reload_failures == 1
    crash.append(True)  # not even a DataError: still only a bad read
    assert train_round(3) == 12 and trainer.reload_failures == 2
    crash.clear()
    np.savez(path, x=np.concatenate([x, x]), y=np.concatenate([y, y]))
    assert train_round(4) == 24


def test_a_hung_sensor_does_not_hold_up_the_round():
    """A read that does not finish within reload_wait_s is left running; the round trains
    on the last good data, and the read, once it finishes, serves the next round."""
    import threading

    release, calls = threading.Event(), []
    x, y, _ = digits_rows(30)

    def reload():
        calls.append(True)
        if len(calls) == 1:
            release.wait(60)  # the sensor hangs
        return load_source_rows(x[: 10 * len(calls) + 10], y[: 10 * len(calls) + 10])

    trainer, train_round = _trainer_and_round(load_source_rows(x[:5], y[:5]), reload)
    trainer.reload_wait_s = 0.3
    assert train_round(1) == 5  # the read hangs: last good data
    assert train_round(2) == 5 and len(calls) == 1  # still the same read: no second one
    release.set()
    wait_for(lambda: trainer._read is not None and trainer._read.done.is_set(), "the read")
    assert train_round(3) == 20  # the hung read's data, once it came


def load_source_rows(x, y):
    from fedmq.tasks import task_spec
    from fedmq.tasks.datasource import check_dataset

    return check_dataset(x, y, InputSpec.from_task(task_spec("digits")), "rows")


def test_data_reload_without_a_source_is_a_config_error():
    from edge_agent.config import AgentConfig

    with pytest.raises(ConfigError, match="data_reload needs a data_source"):
        AgentConfig(device_id="d0", data_reload=True)


def test_a_torn_npz_at_start_up_is_a_named_data_error(tmp_path):
    path = tmp_path / "torn.npz"
    x, y, _ = digits_rows(12)
    np.savez(path, x=x, y=y)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=r"torn\.npz is not a readable \.npz"):
        load_source(f"npz:{path}", "digits")


@pytest.mark.integration
def test_an_agent_trains_each_round_on_what_its_live_sensor_has_now(broker, tmp_path,
                                                                     stoppers, processes):
    """A python: sensor that has more readings every time it is asked: with data_reload
    each round trains on the readings of that moment (start-up read 30, then 40, 50)."""
    (tmp_path / "growing_sensor.py").write_text(textwrap.dedent("""
        import numpy as np

        calls = 0

        def readings():
            global calls
            calls += 1
            rng = np.random.default_rng(calls)
            n = 20 + 10 * calls
            yield rng.random((n, 64), dtype=np.float32), rng.integers(0, 10, n)
    """))
    service = make_aggregator(broker.url, tmp_path, stoppers, model="logreg", min_updates=1,
                              rounds=2)
    processes.append(subprocess.Popen(
        [*FEDMQ, "agent", "--broker", broker.url, "--fleet", "test", "--device-id", "live0",
         "--data-source", "python:growing_sensor:readings", "--data-reload"],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)}))
    wait_for(service.finished.is_set, "two rounds on a live sensor")
    assert service.failure is None
    first, second = (r.samples for r in service.history)
    # start-up read 30 readings; each round reads again (40, then 50, more if a model is
    # ever announced twice): every round trains on more than the one before
    assert first >= 40 and second > first
