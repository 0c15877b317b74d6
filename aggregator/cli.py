"""`fedmq aggregator`: run the aggregator service until SIGTERM/SIGINT or its last round."""

from __future__ import annotations

import argparse

from aggregator.config import AggregatorConfig
from fedmq.runtime import add_config_flags, config_from_args, serve, setup_logging


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, AggregatorConfig, with_file=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(AggregatorConfig, args)
    setup_logging(config.log_level, config.log_format)
    if config.role in ("worker", "site"):
        from aggregator.partial_service import PartialService

        service = PartialService(config)
    else:
        from aggregator.service import AggregatorService

        service = AggregatorService(config)
    return serve(service, done=service.finished)
