"""`fedmq keys init`: create the model-signing key pair; `fedmq keys he-init`: the CKKS
key pair of `he = "ckks"`."""

from __future__ import annotations

import argparse

from fedmq.core.he import PRESETS, CkksParams
from fedmq.core.signing import PUBLIC_NAME
from fedmq.keyfiles import generate_he_keys, generate_keypair


def _cmd_init(args: argparse.Namespace) -> int:
    pair = generate_keypair(args.out, force=args.force)
    print(f"model signing key {pair.key_id}\n"
          f"  private: {pair.private} (mode 600; the aggregator only)\n"
          f"  public:  {pair.public} (copy to every device)\n\n"
          f"aggregator.toml:  signing_key = \"{pair.private}\"\n"
          f"agent.toml:       model_public_key = \"/etc/fedmq/{PUBLIC_NAME}\"")
    return 0


def _cmd_he_init(args: argparse.Namespace) -> int:
    params = CkksParams(poly_modulus_degree=args.poly_degree, clip_norm=args.clip_norm)
    public, secret, fp = generate_he_keys(args.out, params, force=args.force)
    print(f"CKKS key {fp} (N = {params.poly_modulus_degree}, {params.slots} values per "
          f"ciphertext, devices clip updates to L2 norm {params.clip_norm:g})\n"
          f"  secret: {secret} (mode 600; the key holder only: it decrypts round sums)\n"
          f"  public: {public} (devices and the aggregator)\n\n"
          f"aggregator.toml:  he = \"ckks\"\n"
          f"                  he_public_context = \"{public}\"\n"
          f"keyholder.toml:   he_secret_context = \"{secret}\"\n"
          f"                  min_updates = 2   (no more than the aggregator's)\n"
          f"                  and run `fedmq keyholder --config keyholder.toml`\n"
          f"agent.toml:       he_context = \"/etc/fedmq/{public.name}\"")
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
    he = verbs.add_parser("he-init", help="create a CKKS key pair for he = ckks")
    he.add_argument("--out", required=True, metavar="DIR",
                    help="directory for he-secret.ctx (0600) and he-public.ctx")
    he.add_argument("--clip-norm", type=float, default=CkksParams().clip_norm,
                    help="L2 norm every device clips its update to before encrypting it "
                         "(default %(default)s)")
    he.add_argument("--poly-degree", type=int, default=CkksParams().poly_modulus_degree,
                    choices=sorted(PRESETS), help="CKKS ring degree: 8192 (precise) or 4096 "
                    "(smaller ciphertexts); default %(default)s")
    he.add_argument("--force", action="store_true", help="replace existing key files")
    he.set_defaults(func=_cmd_he_init)
