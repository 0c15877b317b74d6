"""he = "ckks" (TenSEAL) against plain updates: bytes, seconds, and where it stops fitting
a Pi-class device.

Measured in one process WITHOUT the broker, with the code the agent and the aggregator
run (fedmq/core/he.py, aggregator/he_round.py): an Update message is built and encoded as
on the wire, but not published, so MQTT framing, chunk reassembly and network time are
not in these figures.

1. Per model (digits logreg and mlp, sensor har_cnn, and a synthetic 100k-parameter
   vector to check how costs scale) and per ring degree (N = 8192, the default, and 4096):
   - bytes of one device's Update message: plain float32, q8, and encrypted (ratio to f32);
   - device seconds to clip, pack and encrypt one update;
   - server seconds per round of --devices updates: load and add each update's
     ciphertexts (the aggregator, public key only), then decrypt the sum once (the key
     holder) and take the mean.
   Seconds are this process's CPU time (time.process_time), not wall time, so other
   load on the host does not inflate them; TenSEAL runs these operations on one thread.
   Ranges are min-max over --runs runs, each with a fresh key pair. Deltas are random
   normal vectors of the model's size: CKKS costs depend on the number of ciphertexts,
   never on the values.
2. The model size beyond which he = ckks is impractical on a Pi-class device, from the
   measured per-ciphertext costs and two budgets per round (--encrypt-budget-s of device
   compute, --upload-budget-s on a --uplink-kbps link), with the device assumed
   --pi-slowdown (low-high) times slower than this host's core.

    python benchmarks/he.py [--runs 3 --devices 10 --pi-slowdown 3 5]
"""

from __future__ import annotations

import argparse
import platform
import time
import uuid

import numpy as np

from fedmq.core import codecs, he
from fedmq.core.protocol import EncodedTensor, Update
from fedmq.models import build_model
from fedmq.tasks import task_spec

MODELS = (("digits", "logreg"), ("digits", "mlp"), ("sensor", "har_cnn"))
SYNTHETIC = 100_000


def span(values: list[float], fmt: str = "{:.3g}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else \
        f"{fmt.format(lo)}-{fmt.format(hi)}"


def model_size(task: str, model: str) -> int:
    spec = task_spec(task)
    return build_model(model, spec.model_config(model, hidden=64, rnn_hidden=0,
                                                rnn_layers=0)).layout.size


def update_bytes(tensor: EncodedTensor) -> int:
    return len(Update(device_id="dev-000", update_id=uuid.uuid4().hex[:8], round=1,
                      base_version=0, num_samples=100, loss=0.5, delta=tensor).to_payload())


def measure(size: int, degree: int, devices: int, seed: int) -> dict[str, float]:
    """One run: fresh keys, `devices` updates of `size` parameters encrypted, summed and
    decrypted; seconds and bytes."""
    rng = np.random.default_rng(seed)
    public, secret = he.create_keys(he.CkksParams(poly_modulus_degree=degree, clip_norm=1.0))
    key, decryptor = he.PublicKey(public), he.Decryptor(secret)
    deltas = [rng.normal(0, 0.01, size).astype(np.float32) for _ in range(devices)]
    weights = [int(w) for w in rng.integers(20, 200, devices)]
    encrypt_s, tensors = [], []
    for delta, weight in zip(deltas, weights, strict=True):
        started = time.process_time()
        tensors.append(key.encrypt(delta, weight))
        encrypt_s.append(time.process_time() - started)
    started = time.process_time()
    total = he.CiphertextSum(key, size)
    for tensor in tensors:
        total.add(tensor)
    sum_s = time.process_time() - started
    started = time.process_time()
    weighted, weight = decryptor.decrypt(total.to_bytes(), size=size, count=total.count,
                                         min_count=devices)
    mean = he.mean_of(weighted, weight, claimed=sum(weights))
    decrypt_s = time.process_time() - started
    plain = sum(he.clip(d, 1.0) * w for d, w in zip(deltas, weights, strict=True))
    error = float(np.max(np.abs(mean - plain / sum(weights))))
    return {"he_bytes": update_bytes(tensors[0]), "encrypt_s": float(np.median(encrypt_s)),
            "sum_s": sum_s, "decrypt_s": decrypt_s, "error": error,
            "ciphertexts": he.ciphertext_count(size, key.slots)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--degrees", type=int, nargs="+", default=[8192, 4096])
    parser.add_argument("--pi-slowdown", type=float, nargs=2, default=[3.0, 5.0],
                        metavar=("LOW", "HIGH"))
    parser.add_argument("--encrypt-budget-s", type=float, default=10.0)
    parser.add_argument("--upload-budget-s", type=float, default=60.0)
    parser.add_argument("--uplink-kbps", type=float, default=1000.0)
    args = parser.parse_args()

    print(f"he = ckks benchmark: {args.devices} devices per round, {args.runs} runs "
          f"(fresh keys each), {platform.machine()} {platform.processor() or ''}".rstrip())
    rng = np.random.default_rng(0)
    rows = [(f"{task} {model}", model_size(task, model)) for task, model in MODELS]
    rows.append((f"synthetic {SYNTHETIC // 1000}k", SYNTHETIC))
    header = (f"{'model':<18} {'params':>7} {'N':>5} {'cts':>3} {'f32 B':>7} {'q8 B':>6} "
              f"{'HE B':>9} {'x f32':>7} {'encrypt ms':>11} {'sum ms/round':>13} "
              f"{'decrypt ms':>11} {'max err':>8}")
    print(header)
    print("-" * len(header))
    per_ct: dict[int, list[tuple[float, float, float]]] = {d: [] for d in args.degrees}
    for name, size in rows:
        delta = rng.normal(0, 0.01, size).astype(np.float32)
        f32 = update_bytes(codecs.encode(delta))
        q8 = update_bytes(codecs.encode(delta, "q8", rng=rng))
        for degree in args.degrees:
            runs = [measure(size, degree, args.devices, seed) for seed in range(args.runs)]
            cts = runs[0]["ciphertexts"]
            heb = [r["he_bytes"] for r in runs]
            enc = [1e3 * r["encrypt_s"] for r in runs]
            sums = [1e3 * r["sum_s"] for r in runs]
            dec = [1e3 * r["decrypt_s"] for r in runs]
            for r in runs:
                per_ct[degree].append((r["encrypt_s"] / cts, r["he_bytes"] / cts,
                                       r["sum_s"] / cts / args.devices))
            print(f"{name:<18} {size:>7} {degree:>5} {cts:>3} {f32:>7} {q8:>6} "
                  f"{span(heb, '{:.0f}'):>9} {span([b / f32 for b in heb], '{:.0f}'):>7} "
                  f"{span(enc):>11} {span(sums):>13} {span(dec):>11} "
                  f"{max(r['error'] for r in runs):>8.1e}")

    lo, hi = args.pi_slowdown
    link_bytes = args.uplink_kbps * 1000 / 8 * args.upload_budget_s
    print(f"\nPi-class device (assumed {lo:g}-{hi:g}x slower than this core): the largest model "
          f"that encrypts within {args.encrypt_budget_s:g} s per round, and uploads within "
          f"{args.upload_budget_s:g} s at {args.uplink_kbps:g} kbit/s")
    for degree in args.degrees:
        slots = degree // 2
        enc = [e for e, _, _ in per_ct[degree]]
        size = [b for _, b, _ in per_ct[degree]]
        add = [a for _, _, a in per_ct[degree]]
        # params per ciphertext = slots; the slowest measured run and the slowest Pi
        compute_params = args.encrypt_budget_s / (max(enc) * hi) * slots
        compute_fast = args.encrypt_budget_s / (min(enc) * lo) * slots
        link_params = link_bytes / max(size) * slots
        print(f"  N = {degree}: {span([1e3 * e for e in enc])} ms to encrypt and "
              f"{span(size, '{:.0f}')} bytes per ciphertext of {slots} values "
              f"({span([b / slots for b in size], '{:.1f}')} B/param), server "
              f"{span([1e3 * a for a in add])} ms to load and add one")
        print(f"    compute limit {compute_params / 1e6:.2g}-{compute_fast / 1e6:.2g} M params; "
              f"upload limit {link_params / 1e3:.0f} k params "
              f"(plain f32 would allow {link_bytes / 4 / 1e3:.0f} k)")


if __name__ == "__main__":
    main()
