"""A robust round's kept updates in the checkpoint: appended to a side file per commit,
never rewritten, and loaded back exactly as the whole-state approach would."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import aggregator.checkpoint as checkpoint
from aggregator.checkpoint import CheckpointStore
from fedmq import storage
from fedmq.core import codecs
from fedmq.storage import AppendOnly

from .test_rounds import machine, update


def state(version: int, items: list, *, count: int | None = None) -> dict:
    """A state shaped like the aggregator's, its open round keeping `items`."""
    count = len(items) if count is None else count
    return {"machine": {"format": 3, "version": version, "round": version + 1,
                        "layout_hash": "h", "params": np.full(8, float(version), np.float32),
                        "optimizer": {},
                        "open": {"acc": {"rule": "median",
                                         "tensors": AppendOnly("updates", items, count)},
                                 "count": count}},
            "history": []}


def kept(loaded: dict) -> list:
    return loaded["machine"]["open"]["acc"]["tensors"]


def whole(saved: dict) -> list:
    """What the whole-state approach loads: the list written inline."""
    return kept(storage.loads(storage.dumps(saved)))


def entry(n: int) -> list:
    return ["q8", 4, bytes([n % 256]) * 40]


def test_a_commit_writes_the_updates_new_since_the_last_however_many_are_kept(tmp_path):
    """Bytes per commit stay flat as the round's updates grow: with the whole list in each
    journal, the 40th commit would write 40 updates."""
    m = machine(min_updates=50, aggregation="median", size=20_000)
    store = CheckpointStore(tmp_path / "agg.ckpt")
    store.save({"machine": m.state_dict(), "history": []})
    rng = np.random.default_rng(0)
    per_commit = []
    for i in range(40):
        delta = rng.normal(size=20_000).astype(np.float32)
        m.offer(update(f"d{i}", delta=delta, uid=f"u{i}"))
        before = store.journal_bytes
        store.save({"machine": m.state_dict(), "history": []})
        per_commit.append(store.journal_bytes - before)
    store.close()
    one_update = len(codecs.encode(delta).data)  # f32: 80 KB
    assert store.journal_writes == 40
    assert max(per_commit) < 1.1 * one_update, per_commit
    assert max(per_commit) < 1.05 * min(per_commit), per_commit
    resumed = machine(min_updates=50, aggregation="median", size=20_000)
    resumed.load_state_dict(CheckpointStore(tmp_path / "agg.ckpt").load()["machine"],
                            now=1.0)
    assert [t.data for t in resumed.acc.tensors] == [t.data for t in m.acc.tensors]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["append", "append3", "nothing", "new_list",
                                 "new_model", "restart"]), max_size=25))
def test_every_commit_loads_back_as_the_whole_state_would(ops):
    """Appends, commits with nothing new, a new list on the same model (a refused or
    rerun round), a new model, and a new process that loads and goes on: after each
    commit, a fresh load holds exactly the list the whole state holds."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "agg.ckpt"
        store, version, items, n = CheckpointStore(path), 0, [], 0
        store.save(state(version, items))
        for op in ops:
            if op.startswith("append"):
                for _ in range(3 if op == "append3" else 1):
                    n += 1
                    items.append(entry(n))
            elif op == "new_list":
                items = [entry(n)]
            elif op == "new_model":
                version, items = version + 1, []
            elif op == "restart":
                store.close()
                store = CheckpointStore(path)
                items = list(kept(store.load()))
            saved = state(version, items)
            store.save(saved)
            loaded = CheckpointStore(path).load()
            assert loaded["machine"]["version"] == version
            assert kept(loaded) == whole(saved) == items
        store.close()


def test_only_what_a_journal_counts_loads_and_a_torn_tail_falls_back(tmp_path):
    """A crash while appending leaves entries (and a torn one) past what any durable
    journal counts: they never count. A torn journal falls back to the commit before."""
    items = [entry(i) for i in range(5)]
    store = CheckpointStore(tmp_path / "agg.ckpt")
    store.save(state(0, []))
    store.save(state(0, items, count=2))
    store.save(state(0, items, count=3))  # durable: 3 entries
    side = tmp_path / "agg.ckpt.updates-0"
    on_disk = side.stat().st_size
    store.save(state(0, items, count=5))  # the crash: its entries go out, its slot tears
    store.close()
    newest = store.slots[store._seq % 2]
    newest.write_bytes(newest.read_bytes()[:-7])
    with open(side, "r+b") as fh:  # and the last entry is torn too
        fh.truncate(side.stat().st_size - 9)
    assert side.stat().st_size > on_disk
    assert kept(CheckpointStore(tmp_path / "agg.ckpt").load()) == items[:3]


def test_a_side_file_short_of_its_journal_falls_back_with_an_error(tmp_path, caplog):
    """Not a crash (entries are on disk before the journal counting them): a damaged
    disk. The commit before is used, and the log says what was lost."""
    items = [entry(i) for i in range(4)]
    store = CheckpointStore(tmp_path / "agg.ckpt")
    store.save(state(0, []))
    store.save(state(0, items, count=3))
    store.save(state(0, items, count=4))
    store.close()
    side = tmp_path / "agg.ckpt.updates-0"
    with open(side, "r+b") as fh:
        fh.truncate(side.stat().st_size - 3)
    with caplog.at_level(logging.ERROR, logger="aggregator.checkpoint"):
        assert kept(CheckpointStore(tmp_path / "agg.ckpt").load()) == items[:3]
    assert "incomplete" in caplog.text and "lost" in caplog.text


def test_a_new_list_starts_over_in_the_other_file_keeping_what_the_last_commit_counts(
        tmp_path):
    """Starting over in place would leave, until the next journal is on disk, a durable
    journal counting entries that are gone."""
    store = CheckpointStore(tmp_path / "agg.ckpt")
    store.save(state(0, []))
    first = [entry(1), entry(2)]
    store.save(state(0, first))
    before = (tmp_path / "agg.ckpt.updates-0").read_bytes()
    store.save(state(0, [entry(3)]))  # a new round on the same model
    assert (tmp_path / "agg.ckpt.updates-0").read_bytes() == before
    assert (tmp_path / "agg.ckpt.updates-1").exists()
    store.save(state(0, [entry(4)]))  # and again: back to the first file
    store.close()
    assert kept(CheckpointStore(tmp_path / "agg.ckpt").load()) == [entry(4)]


def test_entries_are_synced_before_the_journal_that_counts_them(tmp_path, monkeypatch):
    synced = []

    def datasync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        os.fsync(fd)

    monkeypatch.setattr(checkpoint.storage, "datasync", datasync)
    store = CheckpointStore(tmp_path / "agg.ckpt")
    items = [entry(1)]
    store.save(state(0, []))
    store.save(state(0, items))
    store.save(state(0, items))  # nothing new: only the journal
    store.close()
    assert synced == ["agg.ckpt.updates-0", "agg.ckpt.round-0", "agg.ckpt.round-1"]


def test_the_first_save_of_a_process_leaves_the_side_files_alone(tmp_path):
    """Until it is renamed into place the old run's journal is the state, and it counts
    entries of the side files: the whole state holds its list itself."""
    store = CheckpointStore(tmp_path / "agg.ckpt")
    store.save(state(0, []))
    store.save(state(0, [entry(1), entry(2)]))
    store.close()
    side = tmp_path / "agg.ckpt.updates-0"
    before = side.read_bytes()
    again = CheckpointStore(tmp_path / "agg.ckpt")
    items = list(kept(again.load()))
    items.append(entry(3))
    again.save(state(0, items))
    assert again.file_writes == 1 and side.read_bytes() == before
    again.close()
    assert kept(CheckpointStore(tmp_path / "agg.ckpt").load()) == items


def test_a_median_round_keeps_counting_across_restarts_and_closes_the_same(tmp_path):
    """The collector's own state through the store: two processes, updates in each."""
    values = [1.0, 7.0, 2.0, 9.0, 3.0]
    m = machine(min_updates=5, aggregation="median")
    store = CheckpointStore(tmp_path / "agg.ckpt")
    for i, value in enumerate(values[:3]):
        m.offer(update(f"d{i}", delta=np.full(4, value, np.float32), uid=f"u{i}"))
        store.save({"machine": m.state_dict(), "history": []})
    store.close()
    resumed = machine(min_updates=5, aggregation="median")
    store = CheckpointStore(tmp_path / "agg.ckpt")
    resumed.load_state_dict(store.load()["machine"], now=1.0)
    for i, value in enumerate(values[3:], start=3):
        store.save({"machine": resumed.state_dict(), "history": []})
        resumed.offer(update(f"d{i}", delta=np.full(4, value, np.float32), uid=f"u{i}"))
        store.save({"machine": resumed.state_dict(), "history": []})
    store.close()
    again = machine(min_updates=5, aggregation="median")
    again.load_state_dict(CheckpointStore(tmp_path / "agg.ckpt").load()["machine"], now=2.0)
    assert again.acc.count == 5
    again.close(now=3.0)
    assert np.allclose(again.params, 3.0)


def test_entries_of_an_earlier_list_in_the_same_file_never_count_for_a_later_one(
        tmp_path):
    """Each entry carries its list's tag: if the later list's writes were lost (a disk
    that lied about a sync), the earlier list's entries under them are not taken for
    its own; the commit before is used."""
    store = CheckpointStore(tmp_path / "agg.ckpt")
    store.save(state(0, []))
    store.save(state(0, [entry(1), entry(2), entry(3)]))  # file 0
    earlier = (tmp_path / "agg.ckpt.updates-0").read_bytes()
    store.save(state(0, [entry(4)]))  # file 1
    store.save(state(0, [entry(5), entry(6)]))  # file 0 again
    store.close()
    (tmp_path / "agg.ckpt.updates-0").write_bytes(earlier)  # its entries lost
    assert kept(CheckpointStore(tmp_path / "agg.ckpt").load()) == [entry(4)]
