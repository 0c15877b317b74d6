"""`fedmq simulate` composes the aggregator's and the device's configs: each key is
declared once, and the simulator's own defaults are stated in one place."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from edge_agent.config import AgentConfig
from fedmq.cli import build_parser
from fedmq.config import Default, borrow_options
from fedmq.core.protocol import TaskConfig
from fedmq.errors import ConfigError
from fedmq.runtime import config_from_args
from fedmq.tasks import task_spec
from simulator.config import AGENT_KEYS, SET_BY_SIMULATOR, SIMULATOR_DEFAULTS
from simulator.fleet import BYZANTINE_SCALE, SimulationConfig, poison
from simulator.profiles import fleet_profiles

from .helpers import trained_digits_delta


def simulate_flags() -> dict[str, str]:
    """Flag destination -> its help text, as `fedmq simulate --help` shows it."""
    parser = build_parser(["simulate"])
    sub = next(a for a in parser._actions if a.dest == "command").choices["simulate"]
    return {a.dest: a.help for a in sub._actions if a.option_strings}


def defaults(cls: type) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_simulate_without_flags_is_the_default_config():
    args = build_parser(["simulate"]).parse_args(["simulate"])
    assert config_from_args(SimulationConfig, args) == SimulationConfig()


def test_every_aggregator_key_is_a_simulate_flag_unless_the_simulator_sets_it():
    flags = simulate_flags()
    for name in set(defaults(AggregatorConfig)) - {"metrics"}:  # --metrics: the simulator's own
        assert (name in flags) != (name in SET_BY_SIMULATOR), name
    assert set(AGENT_KEYS) <= set(flags)


def test_a_borrowed_key_keeps_its_declaration_unless_the_simulator_states_another_default():
    sim, service = defaults(SimulationConfig), defaults(AggregatorConfig)
    sim_agent = defaults(AgentConfig)
    flags = simulate_flags()
    for name, default in sim.items():
        if name in SIMULATOR_DEFAULTS:
            assert default == SIMULATOR_DEFAULTS[name].value, name
        elif name in service:
            assert default == service[name], name  # declared once, in AggregatorConfig
        elif name in AGENT_KEYS:
            assert default == sim_agent[name], name
        # --help tells the truth: the default, or what the default means
        shown = "empty" if default == "" else f"{default:g}" if isinstance(default, float) \
            else str(default)
        assert (flags[name].endswith(f"default: {default!r})")
                or re.search(rf"[(;] ?{re.escape(shown)}:", flags[name])), name
    differing = {n for n, d in SIMULATOR_DEFAULTS.items() if d.value != service[n]}
    assert differing == {"broker", "fleet", "epochs", "batch_size", "lr", "min_updates",
                         "deadline_s", "slow_link_kbps", "he_decrypt"}
    # the same value, meaning something else: its help says what
    for name in set(SIMULATOR_DEFAULTS) - differing:
        assert SIMULATOR_DEFAULTS[name].help, name


def test_the_simulated_aggregator_gets_the_simulator_defaults_and_every_flag_given():
    config = SimulationConfig(task="sensor", momentum=0.5, max_update_norm=2.0)
    spec = task_spec("sensor")
    agg = config.aggregator_config(broker="mqtt://h:1883", fleet="f", checkpoint="/x.ckpt")
    assert (agg.rounds, agg.epochs, agg.batch_size, agg.lr) == (
        spec.rounds, spec.epochs, spec.batch_size, spec.lr)
    assert (agg.deadline_s, agg.slow_link_kbps, agg.min_updates, agg.buffer_size) == (
        30.0, 256.0, 10, 2)
    assert (agg.momentum, agg.max_update_norm) == (0.5, 2.0)
    assert (agg.client_id, agg.checkpoint, agg.metrics) == ("f-aggregator", "/x.ckpt", "")


def test_the_device_template_takes_the_shared_device_keys_and_the_profile():
    config = SimulationConfig(devices=4, codec="q8", alpha=0.0, seed=3, profiles="mixed")
    profile = fleet_profiles("mixed", 4, seed=3)[2]
    agent = config.agent_config(2, broker="mqtt://h:1883", fleet="f", profile=profile)
    assert (agent.device_id, agent.codec, agent.alpha, agent.partition_seed) == (
        "f-dev002", "q8", 0.0, 3)
    assert (agent.device_index, agent.device_count, agent.slowdown) == (2, 4,
                                                                       profile.slowdown)


@pytest.mark.parametrize(("settings", "match"), [
    ({"optimizer": "sgdx"}, "optimizer"),
    ({"devices": 0}, "devices and rounds must be >= 1"),
    ({"mode": "lazy"}, "sync or async"),
    ({"fleet": "a/b"}, "fleet"),
])
def test_bad_aggregator_keys_fail_when_the_simulation_is_configured(settings, match):
    with pytest.raises(ConfigError, match=match):
        SimulationConfig(**settings)


def test_borrowing_an_option_that_does_not_exist_is_an_error():
    with pytest.raises(ConfigError, match="no option"):
        borrow_options(AgentConfig, keys=("codecs",))
    with pytest.raises(ConfigError, match="not borrowed"):
        borrow_options(AgentConfig, keys=("codec",), defaults={"alpha": Default(1.0)})


def trained_delta(**trainer_options) -> np.ndarray:
    return trained_digits_delta(TaskConfig(epochs=1, lr=0.1), **trainer_options)


def test_an_attacker_trains_honestly_and_sends_its_delta_reversed_and_scaled():
    honest, poisoned = trained_delta(), trained_delta(update_transform=poison)
    assert np.abs(honest).max() > 0
    np.testing.assert_allclose(poisoned, -BYZANTINE_SCALE * honest, rtol=1e-6)


def test_simulate_help_lists_the_allowed_values_of_each_choice_from_its_registry():
    from aggregator.config import MODES
    from aggregator.strategy import rules
    from aggregator.strategy.collectors import CoordinateMedian
    from aggregator.strategy.optimizers import optimizer_names
    from simulator.profiles import MIXES

    class Krum(CoordinateMedian):  # a rule registered later shows up too
        name = "krum_for_the_help_test"

    rules.register_rule(Krum)
    try:
        flags = simulate_flags()
    finally:
        del rules._REGISTRY[Krum.name]
    for dest, names in [("optimizer", optimizer_names()), ("mode", MODES),
                        ("profiles", list(MIXES)),
                        ("aggregation", ["bulyan", "centered_clip", "krum", "mean", "median",
                                         "multi_krum", "trimmed_mean", Krum.name])]:
        listed = re.search(r"one of: ([^;)]*)", flags[dest])
        assert listed, flags[dest]
        assert listed.group(1).split(", ") == sorted(names) if dest in (
            "optimizer", "aggregation") else list(names), flags[dest]


def test_a_flag_states_its_default_once():
    flags = simulate_flags()
    assert flags["fleet"] == "fleet name (empty: a fresh sim-XXXXXX)"
    assert flags["rounds"].endswith("(0: the task's default, 20)")
    for dest, text in flags.items():
        assert text is None or text.count("default:") <= 1, dest
        assert not ("empty:" in (text or "") and "default: ''" in text), dest
