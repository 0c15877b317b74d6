"""`fedmq keys init`: create the model-signing key pair."""

from __future__ import annotations

import argparse

from fedmq.core.signing import PUBLIC_NAME
from fedmq.keyfiles import generate_keypair


def _cmd_init(args: argparse.Namespace) -> int:
    pair = generate_keypair(args.out, force=args.force)
    print(f"model signing key {pair.key_id}\n"
          f"  private: {pair.private} (mode 600; the aggregator only)\n"
          f"  public:  {pair.public} (copy to every device)\n\n"
          f"aggregator.toml:  signing_key = \"{pair.private}\"\n"
          f"agent.toml:       model_public_key = \"/etc/fedmq/{PUBLIC_NAME}\"")
    return 0


def configure(keys: argparse.ArgumentParser) -> None:
    """`fedmq keys`: the aggregator signs every model announcement, devices with the public
    key refuse anything else."""
    verbs = keys.add_subparsers(dest="keys_command", required=True)
    init = verbs.add_parser("init", help="create a signing key pair")
    init.add_argument("--out", required=True, metavar="DIR",
                      help="directory for model-signing.key (0600) and model-signing.pub")
    init.add_argument("--force", action="store_true", help="replace existing key files")
    init.set_defaults(func=_cmd_init)
