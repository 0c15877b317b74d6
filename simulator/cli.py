"""`fedmq simulate`: progress bars while the fleet trains, a table and a summary line after."""

from __future__ import annotations

import argparse

from fedmq.errors import require
from fedmq.runtime import add_config_flags, config_from_args, setup_logging
from fedmq.storage import check_writable
from simulator.fleet import Simulation, SimulationConfig, SimulationResult, write_metrics


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, SimulationConfig, with_file=False)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")
    parser.add_argument("--verbose", action="store_true", help="log every service event")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(SimulationConfig, args)
    # WARNING by default: what goes wrong in a run (a device's failure, an unreachable
    # broker) is said; --verbose adds every service event.
    setup_logging("INFO" if args.verbose else "WARNING", config.log_format)
    if config.metrics:  # said now, not after the whole run
        check_writable(config.metrics, what="metrics")
    # A closed terminal (SIGHUP) or a kill (SIGTERM) unwinds like Ctrl-C (Simulation sees
    # to it), so the private broker, the device processes and the temporary directory go
    # with the run.
    with Simulation(config) as sim:
        if sim.aggregator is not None and sim.aggregator.dashboard is not None:
            print(f"dashboard: {sim.aggregator.dashboard.url}", flush=True)
        result = sim.wait() if args.quiet else _wait_with_progress(sim, config)
    if not args.quiet:
        _print_table(result)
    if config.metrics:
        png = write_metrics(result, config.metrics)
        print(f"metrics: {config.metrics}, plot: {png}")
    if result.rejected:
        print(f"rejected updates: {result.rejected}")
    print(result.summary())
    return 0


def _wait_with_progress(sim: Simulation, config: SimulationConfig) -> SimulationResult:
    progress_mod = require("rich.progress", "sim")
    p = progress_mod.Progress(
        progress_mod.TextColumn("{task.description:<28}"), progress_mod.BarColumn(),
        progress_mod.MofNCompleteColumn(), progress_mod.TimeElapsedColumn(),
    )
    per_round = config.quorum
    with p:
        rounds_bar = p.add_task("rounds", total=config.rounds)
        updates_bar = p.add_task("round 1: updates", total=per_round)

        def show(s: Simulation, shown: int) -> int:
            done = s.rounds_done()
            if done > shown:
                last = s.records[-1].accuracy if s.records else None
                label = f"rounds (accuracy {last:.3f})" if last is not None else "rounds"
                p.update(rounds_bar, completed=done, description=label)
            round_, updates = s.open_round()
            finished = done >= config.rounds
            p.update(updates_bar, completed=per_round if finished else updates,
                     description=f"round {min(round_, config.rounds)}: updates")
            return done

        return sim.wait(progress=show)


def _print_table(result: SimulationResult) -> None:
    rich_console = require("rich.console", "sim")
    rich_console.Console().print(results_table(result))


def results_table(result: SimulationResult):
    """One row per round; the title gives the whole run's wall time, start-up included
    (the rows' seconds are the rounds' own)."""
    rich_table = require("rich.table", "sim")
    table = rich_table.Table(title=f"fedmq simulation: {len(result.rounds)} rounds in "
                                   f"{result.wall_s:.1f} s ({result.startup_s:.1f} s of it "
                                   "starting up)")
    with_top3 = any(r.top3 is not None for r in result.rounds)
    top3_column = ["top-3"] if with_top3 else []
    # federated evaluation: the devices' score of the model the round trained from
    with_fleet = any(r.fleet_devices for r in result.rounds)
    with_personal = any(r.personal_accuracy is not None for r in result.rounds)
    fleet_columns = (["fleet acc."] if with_fleet else []) + (
        ["personal"] if with_personal else [])
    if with_fleet:
        devices = max(r.fleet_devices for r in result.rounds)
        table.caption = ("fleet acc.: the model the round started from, scored by up to "
                         f"{devices} devices on their own held-out data (weighted by "
                         "examples)" + ("; personal: their personalized models on the same "
                                        "data" if with_personal else ""))
    for col in ("round", "accuracy", *top3_column, *fleet_columns, "test loss", "updates",
                "KiB up", "KiB down", "seconds"):
        table.add_column(col, justify="right")
    for r in result.rounds:
        top3 = [f"{r.top3:.4f}" if r.top3 is not None else "-"] if with_top3 else []
        fleet = ([_score(r.fleet_accuracy)] if with_fleet else []) + (
            [_score(r.personal_accuracy)] if with_personal else [])
        table.add_row(str(r.round), f"{r.accuracy:.4f}" if r.accuracy is not None else "-",
                      *top3, *fleet,
                      f"{r.loss:.4f}" if r.loss is not None else "-", str(r.participants),
                      f"{r.bytes_up / 1024:.1f}",
                      f"{r.bytes_down / 1024:.1f}" if r.bytes_down is not None else "-",
                      f"{r.wall_s:.2f}")
    return table


def _score(accuracy: float | None) -> str:
    return "-" if accuracy is None else f"{accuracy:.4f}"
