"""One per-round record: the service's and the simulator's metrics files share its format."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.records import RoundRecord, read_records
from fedmq.errors import DataError

from .helpers import make_agents, make_aggregator, wait_for

counts = st.integers(min_value=0, max_value=2**40)
maybe = st.none() | st.floats(allow_nan=False, allow_infinity=False)
records = st.builds(
    RoundRecord, round=st.integers(1, 10**6), version=st.integers(0, 10**6),
    accuracy=st.none() | st.floats(0, 1), loss=maybe, train_loss=st.floats(allow_nan=False),
    participants=counts, samples=counts, bytes_up=counts, model_bytes=counts,
    wall_s=st.floats(0, 1e6), stale=counts, partial=counts, cohort=counts,
    top3=st.none() | st.floats(0, 1), epsilon=maybe, bytes_down=st.none() | counts)


@given(records)
def test_a_record_round_trips_through_its_json_line(record):
    line = record.to_json()
    assert "\n" not in line
    assert RoundRecord.from_json(line) == record


@given(records)
def test_to_dict_is_the_dataclass_as_a_flat_map(record):
    """to_dict copies fields one level deep: a field holding a container would need
    asdict's deep copy (checkpoints keep these dicts)."""
    assert record.to_dict() == dataclasses.asdict(record)
    assert all(v is None or isinstance(v, (int, float, str)) for v in record.to_dict().values())


def test_a_round_without_samples_keeps_its_nan_train_loss():
    record = RoundRecord(round=1, version=1, accuracy=None, loss=None,
                         train_loss=float("nan"), participants=0, samples=0, bytes_up=0,
                         model_bytes=0, wall_s=0.0)
    assert math.isnan(RoundRecord.from_json(record.to_json()).train_loss)


def test_records_written_before_the_one_format_still_load():
    """Checkpoint histories and service metrics files named the test loss test_loss."""
    old = {"round": 2, "version": 2, "accuracy": 0.5, "test_loss": 1.25, "train_loss": 1.0,
           "participants": 3, "samples": 90, "bytes_up": 10, "model_bytes": 20,
           "wall_s": 0.5, "stale": 0, "partial": 0, "cohort": 0, "top3": None,
           "epsilon": None}
    assert RoundRecord.from_json(json.dumps(old)).loss == 1.25
    assert RoundRecord.from_dict(old).bytes_down is None


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '{"round": 1}'])
def test_a_line_that_is_no_record_is_a_data_error(line):
    with pytest.raises(DataError, match="round record"):
        RoundRecord.from_json(line)


@pytest.mark.integration
def test_the_service_and_the_simulator_write_the_same_metrics_format(broker, tmp_path,
                                                                     stoppers):
    from simulator.fleet import Simulation, SimulationConfig, write_metrics

    service_file, sim_file = tmp_path / "service.jsonl", tmp_path / "sim.jsonl"
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=2, min_updates=2,
                              metrics=str(service_file))
    make_agents(broker.url, stoppers, 2)
    wait_for(service.finished.is_set, "the service's 2 rounds", timeout=60)
    config = SimulationConfig(devices=2, rounds=2, model="mlp", hidden=16, epochs=1,
                              broker=broker.url, timeout_s=60)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
    write_metrics(result, sim_file)

    served, simulated = list(read_records(service_file)), list(read_records(sim_file))
    assert [r.round for r in served] == [r.round for r in simulated] == [1, 2]
    assert served == service.history and simulated == result.rounds
    keys = {frozenset(json.loads(line)) for f in (service_file, sim_file)
            for line in f.read_text().splitlines()}
    assert len(keys) == 1  # one format: the same keys on every line of both files
    assert all(r.accuracy is not None and r.loss is not None for r in served + simulated)
    # what only the simulator measures (the devices' downloads) is a field, not a format
    assert all(r.bytes_down is None for r in served)
    assert all(r.bytes_down > 0 for r in simulated)
