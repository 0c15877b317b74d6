"""Central differential privacy (DP-FedAvg): clipping, equal weights, noise, accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.config import AggregatorConfig
from aggregator.ingest import UpdateLimits
from aggregator.strategy.privacy import CentralDP

from .test_accounting import closed_form_epsilon, library_rdp
from .test_rounds import machine, update


def brute_force_epsilon(rounds: int, sigma: float, delta: float) -> float:
    """min over a fine grid of orders a of T a / (2 sigma^2) + ln(1/delta) / (a - 1)."""
    orders = 1.0 + np.geomspace(1e-4, 1e4, 200_000)
    return float(np.min(rounds * orders / (2 * sigma**2) + math.log(1 / delta) / (orders - 1)))


@given(rounds=st.integers(1, 10_000), sigma=st.floats(0.3, 20.0),
       delta=st.floats(1e-12, 0.1))
def test_the_closed_form_reference_is_the_rdp_minimum(rounds, sigma, delta):
    """The closed form the tests compare the library's RDP with is itself right."""
    closed = closed_form_epsilon(rounds, sigma, delta)
    assert closed == pytest.approx(brute_force_epsilon(rounds, sigma, delta), rel=1e-4)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert library_rdp(1, 1.0, 1e-5) < closed_form_epsilon(1, 1.0, 1e-5)  # 5.2983
    assert library_rdp(100, 1.0, 1e-5) > library_rdp(10, 1.0, 1e-5)
    assert library_rdp(100, 4.0, 1e-5) < library_rdp(100, 1.0, 1e-5)


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
    from fedmq.errors import ConfigError

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
    from fedmq.errors import ConfigError

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
    from simulator.fleet import Simulation, SimulationConfig

    config = SimulationConfig(devices=4, rounds=3, model="logreg", epochs=2, lr=0.1,
                              dp_noise_multiplier=0.2, dp_clip_norm=1.0, dp_delta=1e-4,
                              timeout_s=120)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
    assert [r.epsilon for r in result.rounds] == pytest.approx(
        [library_rdp(t, 0.2, 1e-4) for t in (1, 2, 3)])
    assert "differential privacy epsilon" in result.summary()
    assert result.final_accuracy > 0.3  # it learns (chance: 0.1; 0.64-0.80 in 15 runs)


def test_a_closed_round_carries_the_noise_into_the_model():
    """Through the round machine, not just the noise helper: zero updates, sigma 1, C 1,
    denominator 2: the new parameters are the noise, N(0, 0.5^2) per coordinate."""
    from aggregator.rounds import RoundMachine, RoundPolicy
    from aggregator.strategy.optimizers import ServerOptConfig, create_optimizer

    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, denominator=2)
    m = RoundMachine(params=np.zeros(200_000, np.float32),
                     optimizer=create_optimizer(ServerOptConfig()),
                     policy=RoundPolicy(min_updates=1, dp=dp), layout_hash="lay", now=0.0)
    m.offer(update("a", delta=np.zeros(200_000, np.float32)))
    m.close(now=1.0)
    assert float(m.params.std()) == pytest.approx(0.5, rel=0.02)
    assert m.epsilon() == pytest.approx(library_rdp(1, 1.0, 1e-5))


def test_epsilon_adds_up_rounds_of_different_noise_and_is_infinite_after_plain_ones():
    dp_low = CentralDP(clip_norm=1.0, noise_multiplier=1.0, denominator=1)
    dp_high = CentralDP(clip_norm=1.0, noise_multiplier=2.0, denominator=1)
    m = machine(min_updates=1, dp=dp_low)
    m.offer(update("a"))
    m.close(now=1.0)
    resumed = machine(min_updates=1, dp=dp_high)  # restarted with more noise
    resumed.load_state_dict(m.state_dict(), now=2.0)
    resumed.offer(update("a", round=2, version=1, uid="u2"))
    resumed.close(now=3.0)
    import dp_accounting

    from aggregator.strategy.accounting import RDP_ORDERS

    direct = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    direct.compose(dp_accounting.GaussianDpEvent(1.0))  # one round at sigma 1 ...
    direct.compose(dp_accounting.GaussianDpEvent(2.0))  # ... one at sigma 2
    assert resumed.epsilon() == pytest.approx(direct.get_epsilon(1e-5))
    plain = machine(min_updates=1)  # a model released without DP ...
    plain.offer(update("a"))
    plain.close(now=1.0)
    private = machine(min_updates=1, dp=dp_low)  # ... then DP turned on
    private.load_state_dict(plain.state_dict(), now=2.0)
    assert private.epsilon() == math.inf


def test_the_service_clips_an_oversized_update_to_the_dp_norm(tmp_path):
    from aggregator.service import AggregatorService
    from fedmq.core import codecs
    from fedmq.core.protocol import FleetTopics, Update

    config = AggregatorConfig(broker="mqtt://127.0.0.1:1", fleet="dp", model="logreg",
                              evaluate=False, min_updates=1, dp_noise_multiplier=1e-9,
                              dp_clip_norm=0.5, checkpoint=str(tmp_path / "agg.ckpt"),
                              log_level="ERROR")
    service = AggregatorService(config)
    try:
        size = service.model.layout.size
        big = np.full(size, 10.0, np.float32)  # norm 10 sqrt(size), far above 0.5
        payload = Update(device_id="d1", update_id="u1", round=1, base_version=0,
                         num_samples=1000, loss=0.5, delta=codecs.encode(big),
                         layout_hash=service.model.layout.hash).to_payload()
        before = service.machine.params.copy()
        service._handle_update(FleetTopics("dp").update("d1"), payload)
        service.machine.close(now=1.0)
        moved = float(np.linalg.norm(service.machine.params - before))
        assert moved == pytest.approx(0.5, rel=1e-4)  # clipped to C, divided by 1
        assert service.ingest.clipped == 1
    finally:
        service.writer.close()


def test_a_round_that_cannot_be_saved_is_never_announced(tmp_path):
    """Under DP a restart would close such a round again with fresh noise: two releases,
    one counted. So a failed save stops the model from going out (and the service fails)."""
    from aggregator.service import AggregatorService
    from fedmq.core import codecs
    from fedmq.core.protocol import FleetTopics, Update

    config = AggregatorConfig(broker="mqtt://127.0.0.1:1", fleet="dp", model="logreg",
                              evaluate=False, min_updates=1, dp_noise_multiplier=1.0,
                              checkpoint=str(tmp_path / "agg.ckpt"), log_level="ERROR")
    service = AggregatorService(config)
    announced = []
    service._announce = lambda: announced.append(service.machine.version)
    try:
        payload = Update(device_id="d1", update_id="u1", round=1, base_version=0,
                         num_samples=10, loss=0.5,
                         delta=codecs.encode(np.zeros(service.model.layout.size, np.float32)),
                         layout_hash=service.model.layout.hash).to_payload()
        service._handle_update(FleetTopics("dp").update("d1"), payload)

        def disk_full(_state):
            raise OSError(28, "No space left on device")

        service.store.save = disk_full
        service._close_round(now=1.0)
        assert announced == [] and service.failure is not None
    finally:
        service.writer.close()
