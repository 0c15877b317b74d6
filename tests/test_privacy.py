"""Central differential privacy (DP-FedAvg): clipping, equal weights, noise, accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.config import AggregatorConfig
from aggregator.privacy import CentralDP, gaussian_epsilon
from aggregator.validation import UpdateLimits

from .test_rounds import machine, update


def brute_force_epsilon(rounds: int, sigma: float, delta: float) -> float:
    """min over a fine grid of orders a of T a / (2 sigma^2) + ln(1/delta) / (a - 1)."""
    orders = 1.0 + np.geomspace(1e-4, 1e4, 200_000)
    return float(np.min(rounds * orders / (2 * sigma**2) + math.log(1 / delta) / (orders - 1)))


@given(rounds=st.integers(1, 10_000), sigma=st.floats(0.3, 20.0),
       delta=st.floats(1e-12, 0.1))
def test_the_closed_form_epsilon_is_the_rdp_minimum(rounds, sigma, delta):
    closed = gaussian_epsilon(rounds, sigma, delta)
    assert closed == pytest.approx(brute_force_epsilon(rounds, sigma, delta), rel=1e-4)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert gaussian_epsilon(0, 1.0, 1e-5) == 0.0
    # one round at sigma 1, delta 1e-5: 1/2 + 2 sqrt(ln(1e5) / 2) = 5.298
    assert gaussian_epsilon(1, 1.0, 1e-5) == pytest.approx(5.2983, abs=1e-3)
    assert gaussian_epsilon(100, 1.0, 1e-5) > gaussian_epsilon(10, 1.0, 1e-5)
    assert gaussian_epsilon(100, 4.0, 1e-5) < gaussian_epsilon(100, 1.0, 1e-5)


def test_the_noise_has_the_promised_spread_and_is_fresh_every_time():
    dp = CentralDP(clip_norm=2.0, noise_multiplier=0.5, denominator=4)
    total = np.full(400_000, 8.0, np.float32)
    mean = dp.noised_mean(total)
    assert float(mean.mean()) == pytest.approx(2.0, abs=0.01)  # 8 / 4, noise averages out
    assert float(mean.std()) == pytest.approx(0.5 * 2.0 / 4, rel=0.01)
    assert not np.array_equal(mean, dp.noised_mean(total))  # never reproducible


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"clip_norm": 0.0}, "dp_clip_norm"), ({"noise_multiplier": 0.0}, "dp_noise_multiplier"),
    ({"noise_multiplier": math.inf}, "dp_noise_multiplier"), ({"delta": 1.0}, "dp_delta"),
    ({"denominator": 0}, "denominator"),
])
def test_bad_privacy_settings_are_config_errors(kwargs, message):
    from edge_agent.errors import ConfigError

    settings = {"clip_norm": 1.0, "noise_multiplier": 1.0, "denominator": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        CentralDP(**settings)


def test_under_dp_devices_weigh_equally_and_the_sum_is_divided_by_the_target():
    dp = CentralDP(clip_norm=10.0, noise_multiplier=1e-9, denominator=4)
    m = machine(min_updates=2, dp=dp)
    m.offer(update("a", samples=1, delta=np.full(4, 1.0, np.float32)))
    m.offer(update("b", samples=99, delta=np.full(4, 3.0, np.float32)))
    m.close(now=1.0)
    # (1 + 3) / 4: neither sample counts (which would give 2.98) nor arrivals (2) divide
    assert np.allclose(m.params, 1.0, atol=1e-6)
    assert m.dp_rounds == 1
    restored = machine(min_updates=2, dp=dp)
    restored.load_state_dict(m.state_dict(), now=2.0)
    assert restored.dp_rounds == 1


def test_dp_refuses_what_would_let_one_device_count_for_more():
    from edge_agent.errors import ConfigError

    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, denominator=2)
    with pytest.raises(ConfigError, match="discard late updates"):
        machine(dp=dp, late_updates="fold")
    with pytest.raises(ConfigError, match="discard late updates"):
        AggregatorConfig(dp_noise_multiplier=1.0, mode="async")
    with pytest.raises(ConfigError, match="leave max_update_norm at 0"):
        AggregatorConfig(dp_noise_multiplier=1.0, max_update_norm=5.0)


def test_the_update_screen_clips_every_update_to_the_dp_norm():
    config = AggregatorConfig(dp_noise_multiplier=1.0, dp_clip_norm=0.5, clients_per_round=8)
    limits = UpdateLimits.from_config(config)
    assert (limits.max_update_norm, limits.norm_policy) == (0.5, "clip")
    assert config.policy().dp.denominator == 8


def test_a_simulated_private_fleet_reports_its_privacy_spent_each_round(tmp_path):
    from aggregator.simulator import Simulation, SimulationConfig

    config = SimulationConfig(devices=4, rounds=3, model="logreg", epochs=2, lr=0.1,
                              dp_noise_multiplier=0.2, dp_clip_norm=1.0, dp_delta=1e-4,
                              timeout_s=120)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
    assert [r.epsilon for r in result.rounds] == pytest.approx(
        [gaussian_epsilon(t, 0.2, 1e-4) for t in (1, 2, 3)])
    assert "differential privacy epsilon" in result.summary()
    assert result.final_accuracy > 0.3  # it learns (chance: 0.1; 0.64-0.80 in 15 runs)
