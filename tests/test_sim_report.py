"""What `fedmq simulate` shows after a run: the table's title and rows, and the plot."""

from __future__ import annotations

import math

import pytest

from aggregator.records import RoundRecord
from simulator.cli import results_table
from simulator.fleet import Simulation, SimulationConfig, SimulationResult, metrics_figure


def record(round_no: int, *, participants: int = 4) -> RoundRecord:
    return RoundRecord(round=round_no, version=round_no, accuracy=0.5 + round_no / 50,
                       loss=2.0 - round_no / 10, train_loss=1.9 - round_no / 10,
                       participants=participants, samples=100 * participants,
                       bytes_up=20_000 * participants, model_bytes=40_000, wall_s=0.5,
                       bytes_down=80_000)


def cells(table, column: str) -> list[str]:
    return list(next(c for c in table.columns if c.header == column).cells)


def test_the_plot_has_a_loss_panel_and_its_legends_cover_no_round():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    records = [record(r) for r in range(1, 13)]
    fig = metrics_figure(SimulationResult(rounds=records, wall_s=9.0, devices=4))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        [loss] = [ax for ax in fig.axes if "loss" in ax.get_ylabel()]
        curves = {line.get_label(): list(line.get_ydata()) for line in loss.get_lines()}
        assert curves["test"] == [r.loss for r in records]
        assert curves["train (devices)"] == [r.train_loss for r in records]
        legends = [ax for ax in fig.axes if ax.get_legend() is not None]
        assert legends
        for ax in legends:
            legend = ax.get_legend().get_window_extent(renderer)
            plotted = ax.get_window_extent(renderer)
            assert not legend.overlaps(plotted), ax.get_ylabel()
    finally:
        plt.close(fig)


@pytest.mark.integration
def test_the_table_title_gives_the_whole_run_and_each_async_row_adds_up(tmp_path):
    pytest.importorskip("rich")
    config = SimulationConfig(devices=6, rounds=4, mode="async", model="logreg", epochs=1,
                              timeout_s=120)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
    assert 0 < result.startup_s < result.wall_s
    assert result.wall_s >= sum(r.wall_s for r in result.rounds)  # the rounds happened in it
    table = results_table(result)
    assert f"{len(result.rounds)} rounds in {result.wall_s:.1f} s" in str(table.title)
    # The updates column and the upload column count the same updates: every update of a
    # float32 model is about the same size, so KiB up / updates is one figure on every row.
    per_update = [float(kib) / int(n)
                  for n, kib in zip(cells(table, "updates"), cells(table, "KiB up"),
                                    strict=True)]
    assert all(math.isclose(p, per_update[0], rel_tol=0.02) for p in per_update), per_update
