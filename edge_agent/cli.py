"""`fedmq agent`: run an edge agent until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging

from edge_agent.config import AgentConfig
from fedmq.runtime import (
    add_config_flags,
    config_from_args,
    serve,
    setup_logging,
)


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, AgentConfig, with_file=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge_agent.agent import EdgeAgent
    from fedmq.tasks import device_shard

    config = config_from_args(AgentConfig, args)
    setup_logging(config.log_level, config.log_format)
    if config.data_source:  # the device's own data, checked before we connect
        from fedmq.tasks.datasource import load_source

        data = load_source(config.data_source, config.task, label=config.data_label,
                           max_samples=config.data_max_samples)
    else:
        data = device_shard(config.task, device_index=config.device_index,
                            device_count=config.device_count, alpha=config.alpha,
                            seed=config.partition_seed, partition=config.partition,
                            shards_per_device=config.shards_per_device)
    agent = EdgeAgent(config, data)
    log = logging.getLogger("fedmq")
    log.info("agent %s starts with %d local examples", config.device_id, len(data))
    if not config.state_dir:
        log.warning("state_dir is not set: updates awaiting their receipt and the error-"
                    "feedback residual live in memory and are lost if this agent restarts; "
                    "set state_dir (e.g. /var/lib/fedmq) to keep them")
    return serve(agent)
