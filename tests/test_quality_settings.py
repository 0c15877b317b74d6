"""benchmarks/quality.py's per-task settings are valid simulate options, and its central run
trains with the local epochs, lr and batch the devices are told (not the task's defaults
when a row changes them)."""

from __future__ import annotations

import pytest

from benchmarks.quality import SETTINGS, TASKS, VARIANTS, local_training
from fedmq.tasks import task_spec
from simulator.fleet import SimulationConfig


@pytest.mark.parametrize("name", TASKS + VARIANTS)
def test_every_row_is_a_valid_simulation(name):
    setting = SETTINGS[name]
    task = setting.task or name
    config = SimulationConfig(task=task, devices=setting.devices, rounds=setting.rounds,
                              dropout=0.3, **dict(setting.overrides))
    online = setting.devices - round(0.3 * setting.devices)
    drawn = dict(setting.overrides).get("clients_per_round", 0)
    assert config.rounds == setting.rounds
    assert config.quorum == (min(drawn, online) if drawn else online)


def test_the_central_run_trains_as_the_devices_are_told():
    spec = task_spec("synthetic")
    own = local_training("synthetic", devices=3, rounds=2, seed=0, overrides={})
    assert (own.epochs, own.lr, own.batch_size, own.max_steps) == (
        spec.epochs, spec.lr, spec.batch_size, spec.max_steps)
    changed = local_training("synthetic", devices=3, rounds=2, seed=0,
                             overrides={"epochs": 1, "lr": 0.02, "optimizer": "fedadam"})
    assert (changed.epochs, changed.lr, changed.batch_size) == (1, 0.02, spec.batch_size)


@pytest.mark.integration
def test_a_federated_run_writes_the_metrics_it_is_asked_for(tmp_path, capsys):
    """`--set metrics=PATH` reaches the run: Simulation itself writes no metrics file. The
    run says its rounds on stderr as they close."""
    import json

    from benchmarks.quality import federated_run

    accuracy, _ = federated_run("digits", devices=4, rounds=2, seed=0,
                                overrides={"metrics": str(tmp_path / "m.jsonl")})
    lines = (tmp_path / "m-digits-seed0.jsonl").read_text().splitlines()
    rounds = [json.loads(line) for line in lines]
    assert [r["round"] for r in rounds if "round" in r][-1] == 2
    assert (tmp_path / "m-digits-seed0.png").exists() and 0 < accuracy <= 1
    said = capsys.readouterr().err
    assert "digits seed 0 federated: round 1/2, held-out top-1" in said
    assert "digits seed 0 federated: round 2/2, held-out top-1" in said


def test_a_long_run_says_about_twenty_rounds_and_always_its_last(capsys):
    from benchmarks.quality import RoundProgress

    progress = RoundProgress("keyboard seed 0 central", 161)
    for round_ in range(1, 162):
        progress.say(round_, 0.5 if round_ % 2 else None)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("round ")[1].split("/")[0] for line in lines] == [
        str(r) for r in (*range(8, 161, 8), 161)]
    assert lines[0].startswith("keyboard seed 0 central: round 8/161, ")
    assert "held-out top-1 50.0%" in lines[-1] and "held-out" not in lines[0]
