"""A refusal by design (an over-selected device's update after its round closed, a re-send
already counted) is INFO on both sides: a WARNING means something is wrong."""

from __future__ import annotations

import logging

import pytest

from fedmq.core.device import Settled
from fedmq.core.protocol import ROUTINE_REFUSALS, Receipt
from tests.helpers import make_agents


@pytest.mark.parametrize(("status", "reason", "level"), [
    ("rejected", "stale_round", "INFO"),  # over-selected: the round closed on K others
    ("duplicate", "", "INFO"),
    ("rejected", "bad_shape", "WARNING"),
])
def test_a_routine_refusal_is_no_warning_on_the_device(stoppers, caplog, status, reason,
                                                        level):
    agent = make_agents("mqtt://127.0.0.1:1", stoppers, 1, start=False)[0]
    with caplog.at_level(logging.INFO, logger="edge_agent.agent"):
        agent._carry_out(Settled(Receipt(update_id="u1", round=3, status=status,
                                         reason=reason)))
    [record] = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert record.levelname == level
    assert agent.stats.receipts[status] == 1


def test_the_aggregator_logs_the_same_refusals_at_info(caplog):
    from collections import Counter

    from aggregator.rejections import RejectionLog

    rejections = RejectionLog(Counter(), logging.getLogger("test.rejections"))
    with caplog.at_level(logging.INFO, logger="test.rejections"):
        for reason in [*ROUTINE_REFUSALS, "bad_shape"]:
            rejections.record(reason, "dev1", f"refused: {reason}")
    levels = {r.getMessage().split(": ")[1]: r.levelname for r in caplog.records}
    assert levels == {**dict.fromkeys(ROUTINE_REFUSALS, "INFO"), "bad_shape": "WARNING"}
