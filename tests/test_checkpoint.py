"""The aggregator's checkpoint store: whole-state file plus an in-place open-round journal."""

from __future__ import annotations

import logging
import shutil
import threading

import numpy as np
import pytest

from aggregator.checkpoint import HISTORY_INLINE, CheckpointStore, _read_slot
from aggregator.writer import CheckpointWriter
from fedmq import storage


def state(version: int, round: int, contributions: int, *, size: int = 64) -> dict:
    """A state shaped like the aggregator's: a model that changes per version, an open
    round whose sum and contributions change per update."""
    return {
        "machine": {
            "format": 3, "version": version, "round": round, "layout_hash": "h",
            "params": np.full(size, float(version), np.float32),
            "optimizer": {"m": np.full(size, -float(version), np.float32)},
            "open": {"acc": {"total": np.full(size, float(contributions), np.float32),
                             "weight": float(contributions), "count": contributions},
                     "contributions": [[f"d{i}", version, f"u{i}"]
                                       for i in range(contributions)]},
            "recent": [[f"d{i}", f"u{i}", round, version] for i in range(contributions)],
        },
        "history": [{"round": r} for r in range(1, round)],
    }


def assert_same(loaded: dict, expected: dict) -> None:
    m, e = loaded["machine"], expected["machine"]
    assert (m["version"], m["round"]) == (e["version"], e["round"])
    assert np.array_equal(m["params"], e["params"])
    assert np.array_equal(m["optimizer"]["m"], e["optimizer"]["m"])
    assert np.array_equal(m["open"]["acc"]["total"], e["open"]["acc"]["total"])
    assert m["open"]["contributions"] == e["open"]["contributions"]
    assert m["recent"] == e["recent"] and loaded["history"] == expected["history"]


def test_nothing_saved_loads_as_none(tmp_path):
    assert CheckpointStore(tmp_path / "agg.ckpt").load() is None


def test_the_model_is_written_once_per_version_and_the_open_round_per_commit(tmp_path):
    store = CheckpointStore(tmp_path / "agg.ckpt")
    for n in range(1, 6):
        store.save(state(0, 1, n))
    assert (store.full_writes, store.journal_writes) == (1, 4)
    assert_same(CheckpointStore(tmp_path / "agg.ckpt").load(), state(0, 1, 5))
    store.save(state(1, 2, 0))  # the round closed: a new model
    store.save(state(1, 2, 2))
    assert (store.full_writes, store.journal_writes) == (2, 5)
    assert_same(CheckpointStore(tmp_path / "agg.ckpt").load(), state(1, 2, 2))
    store.close()


def test_journal_slots_hold_no_model(tmp_path):
    store = CheckpointStore(tmp_path / "agg.ckpt")
    big = 100_000
    store.save(state(0, 1, 1, size=big))
    store.save(state(0, 1, 2, size=big))
    full = (tmp_path / "agg.ckpt").stat().st_size
    slot = max(path.stat().st_size for path in store.slots if path.exists())
    assert full > 2.9 * 4 * big and slot < 1.1 * 4 * big  # params + optimizer + sum vs sum
    store.close()


def test_journal_slots_hold_no_history_and_a_load_takes_it_from_the_model(tmp_path):
    """A commit's cost must not grow with the rounds run: the history changes only with
    the model, so only model writes carry it."""
    store = CheckpointStore(tmp_path / "agg.ckpt")
    long_run = state(0, 600, 1)  # 599 closed rounds
    store.save(long_run)
    store.save(state(0, 600, 2))
    journal = max((p for p in store.slots if p.exists()), key=lambda p: p.stat().st_mtime)
    assert "history" not in _read_slot(journal)
    loaded = CheckpointStore(tmp_path / "agg.ckpt").load()
    assert loaded["machine"]["open"]["acc"]["count"] == 2  # the journal's open round
    assert loaded["history"] == long_run["history"]  # the model's history
    store.save(state(1, 601, 0))  # a model slot now
    store.save(state(1, 601, 1))
    assert CheckpointStore(tmp_path / "agg.ckpt").load()["history"] == \
        state(1, 601, 1)["history"]
    store.close()


def test_a_long_history_goes_to_its_append_only_file_and_loads_whole(tmp_path):
    """Model writes hold only the newest HISTORY_INLINE records: their size stays flat
    however many rounds ran, and every record loads back, also in a new process."""
    def noted(version: int) -> dict:  # records of ~100 bytes, as real ones are
        s = state(version, version + 1, 1)
        s["history"] = [{"round": r, "note": "x" * 100} for r in range(1, version + 1)]
        return s

    path = tmp_path / "agg.ckpt"
    store = CheckpointStore(path)
    sizes = []
    for version in range(300):
        store.save(noted(version))
        if version >= 2:
            sizes.append(max(p.stat().st_size for p in store.model_slots if p.exists()))
        if version in (5, 63, 64, 65, 130, 299):
            assert_same(CheckpointStore(path).load(), noted(version))
    store.close()
    # flat once the inline window is full (236 more records inline would be ~25 KB)
    assert max(sizes[200:]) <= max(sizes[60:70]) + 500
    assert (tmp_path / "agg.ckpt.history").stat().st_size > 0
    # a new process: loads the whole history, writes the file afresh, goes on
    again = CheckpointStore(path)
    assert len(again.load()["history"]) == 299
    for version in range(300, 340):
        again.save(state(version, version + 1, 0))
    again.close()
    assert_same(CheckpointStore(path).load(), state(339, 340, 0))


def test_a_history_file_cut_short_loses_records_not_the_checkpoint(tmp_path, caplog):
    path = tmp_path / "agg.ckpt"
    store = CheckpointStore(path)
    for version in range(150):
        store.save(state(version, version + 1, 0))
    store.close()
    history = tmp_path / "agg.ckpt.history"
    data = history.read_bytes()
    history.write_bytes(data[:len(data) // 3])  # torn inside records the load needs
    with caplog.at_level(logging.WARNING, logger="aggregator.checkpoint"):
        loaded = CheckpointStore(path).load()
    assert loaded["machine"]["version"] == 149
    records = loaded["history"]
    assert records[-HISTORY_INLINE:] == state(149, 150, 0)["history"][-HISTORY_INLINE:]
    assert len(records) < 149 and "missing from the history" in caplog.text


def test_a_torn_journal_write_falls_back_to_the_commit_before(tmp_path):
    store = CheckpointStore(tmp_path / "agg.ckpt")
    for n in range(1, 5):
        store.save(state(0, 1, n))
    store.close()
    newest = store.slots[store._seq % 2]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a crash mid-write: the CRC no longer matches
    newest.write_bytes(bytes(data))
    assert_same(CheckpointStore(tmp_path / "agg.ckpt").load(), state(0, 1, 3))
    newest.write_bytes(bytes(data[:40]))  # cut short
    assert_same(CheckpointStore(tmp_path / "agg.ckpt").load(), state(0, 1, 3))


def test_journals_of_an_older_model_are_ignored(tmp_path):
    store = CheckpointStore(tmp_path / "agg.ckpt")
    store.save(state(0, 1, 1))
    store.save(state(0, 1, 7))  # journal of version 0
    store.save(state(1, 2, 0))  # the new model, written whole
    store.close()
    assert_same(CheckpointStore(tmp_path / "agg.ckpt").load(), state(1, 2, 0))


def test_a_restarted_store_numbers_on_and_rewrites_the_whole_state_first(tmp_path):
    path = tmp_path / "agg.ckpt"
    first = CheckpointStore(path)
    for n in range(1, 4):
        first.save(state(0, 1, n))
    first.close()
    second = CheckpointStore(path)
    assert_same(second.load(), state(0, 1, 3))
    # The whole file now holds 4 updates; the old journals (1..3 updates) must never be
    # laid over it, even if this process dies right after writing it.
    second.save(state(0, 1, 4))
    assert second.full_writes == 1
    assert_same(CheckpointStore(path).load(), state(0, 1, 4))
    second.save(state(0, 1, 5))
    second.close()
    assert_same(CheckpointStore(path).load(), state(0, 1, 5))


def test_a_corrupt_whole_state_file_is_an_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "agg.ckpt"
    path.write_bytes(b"\x92\x01")
    with pytest.raises(storage.StateError):
        CheckpointStore(path).load()


def test_slots_left_behind_never_count_for_a_new_checkpoint(tmp_path):
    """An operator moves the whole-state file away to start fresh and leaves the journal:
    the old run's slots (newer sequence numbers, same version) must not be laid over the
    new run's state."""
    path = tmp_path / "agg.ckpt"
    old = CheckpointStore(path)
    for n in range(1, 8):
        old.save(state(0, 1, n))
    old.close()
    path.rename(tmp_path / "moved-away.ckpt")
    new = CheckpointStore(path)
    assert new.load() is None
    new.save(state(0, 1, 0))
    new.save(state(0, 1, 1))  # one update receipted by the new run
    new.close()
    assert_same(CheckpointStore(path).load(), state(0, 1, 1))


def test_a_slot_for_another_layout_is_ignored(tmp_path):
    path = tmp_path / "agg.ckpt"
    store = CheckpointStore(path)
    store.save(state(0, 1, 1))
    other = state(0, 1, 2, size=32)
    other["machine"]["layout_hash"] = "other"
    store.save(other)
    store.close()
    loaded = CheckpointStore(path).load()
    assert loaded["machine"]["layout_hash"] == "h" and len(loaded["machine"]["params"]) == 64
    assert_same(loaded, state(0, 1, 1))


def test_a_failed_checkpoint_write_is_one_error_line_and_stops_acknowledging(tmp_path, caplog):
    folder = tmp_path / "state"
    store = CheckpointStore(folder / "agg.ckpt")
    failures: list[BaseException] = []
    writer = CheckpointWriter(store, on_failure=failures.append)
    acked: list[int] = []
    try:
        writer.submit(state(1, 1, 0), [lambda: acked.append(1)])
        assert writer.flush()
        shutil.rmtree(folder)  # the disk goes away under the running service
        folder.write_text("not a folder any more")
        with caplog.at_level(logging.ERROR, logger="aggregator.writer"):
            writer.submit(state(2, 2, 0), [lambda: acked.append(2)])
            assert writer.flush()
    finally:
        writer.close()
    assert writer.failed and isinstance(failures[0], OSError)
    assert acked == [1]  # nothing the failed write held is acknowledged
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(folder / "agg.ckpt") in record.getMessage()
    assert record.exc_info is None  # in words, not a traceback


def test_durable_returns_once_the_state_is_written_before_its_receipts_go_out(tmp_path):
    """A closed round's model goes out as soon as its checkpoint is on disk, while the
    receipts that checkpoint released are still being sent."""
    path = tmp_path / "agg.ckpt"
    writer = CheckpointWriter(CheckpointStore(path), on_failure=pytest.fail)
    sending, release = threading.Event(), threading.Event()

    def slow_receipt() -> None:
        sending.set()
        assert release.wait(30)

    try:
        writer.submit(state(1, 2, 0), [slow_receipt])
        assert writer.durable(timeout=30)  # the receipt has not gone out
        assert sending.wait(30) and not writer.idle
        assert CheckpointStore(path).load()["machine"]["version"] == 1
        release.set()
        assert writer.flush(timeout=30) and writer.idle
    finally:
        release.set()
        writer.close()


def test_new_models_after_the_first_save_go_in_place_to_alternating_model_slots(tmp_path):
    """No write-then-rename per round: the whole file once per process, then each new
    model overwrites the older of two model slots (one fdatasync)."""
    path = tmp_path / "agg.ckpt"
    store = CheckpointStore(path)
    store.save(state(0, 1, 0))
    inode = path.stat().st_ino
    for version in range(1, 6):
        store.save(state(version, version + 1, 0))
        store.save(state(version, version + 1, 1))
        assert_same(CheckpointStore(path).load(), state(version, version + 1, 1))
    assert (store.file_writes, store.full_writes) == (1, 6)
    assert path.stat().st_ino == inode  # never replaced
    assert all(slot.exists() for slot in store.model_slots)
    store.close()


def test_a_torn_model_slot_falls_back_to_the_model_before_and_its_journal(tmp_path):
    """A crash while a round's new model is written: that model was never published, so
    the state is the previous model with its open round as last journaled."""
    path = tmp_path / "agg.ckpt"
    store = CheckpointStore(path)
    store.save(state(0, 1, 0))
    store.save(state(1, 2, 0))  # model slot
    store.save(state(1, 2, 3))  # journal of version 1: three updates acknowledged
    store.save(state(2, 3, 0))  # the next model: torn below
    store.close()
    newest = store.model_slots[(store.full_writes - 1) % 2]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert_same(CheckpointStore(path).load(), state(1, 2, 3))


def test_model_slots_of_an_earlier_process_never_count_after_a_restart(tmp_path):
    path = tmp_path / "agg.ckpt"
    first = CheckpointStore(path)
    for version in range(4):
        first.save(state(version, version + 1, 0))
    first.close()
    second = CheckpointStore(path)
    assert_same(second.load(), state(3, 4, 0))
    second.save(state(3, 4, 0))  # the whole file again, under a new run
    second.close()
    third = CheckpointStore(path)
    assert_same(third.load(), state(3, 4, 0))
    path.rename(tmp_path / "moved-away.ckpt")  # an operator starts fresh
    fresh = CheckpointStore(path)
    assert fresh.load() is None
    fresh.save(state(0, 1, 0))
    fresh.close()
    assert_same(CheckpointStore(path).load(), state(0, 1, 0))
