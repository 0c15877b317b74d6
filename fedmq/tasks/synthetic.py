"""Synthetic(alpha, beta) task: per-device logistic-regression data, any number of devices.

The generator of FedProx (Li et al. 2020, section 5.1) and LEAF. Device k has its own
model and its own input distribution:

    u_k ~ N(0, alpha^2),  W_k ~ N(u_k, 1) (10 x 60),  b_k ~ N(u_k, 1) (10)
    B_k ~ N(0, beta^2),   v_k ~ N(B_k, 1) (60),        x ~ N(v_k, diag(j^-1.2))
    y = argmax(W_k x + b_k)  (argmax of the softmax: the same class)

alpha is meant to set how much devices' models differ and beta how much their inputs do.
As in FedProx's own generator, u_k adds the same amount to every class's logit, so alpha
alone never changes a label: devices' models differ through their own W_k, b_k draws at
any alpha (labels are strongly skewed even at (0, 0)), and beta shifts each device's
inputs. The IID variant shares one W, b across devices and draws every x around 0.

Sample counts follow FedProx's power law, 50 + lognormal(4, 2), capped at MAX_SAMPLES so
one device's data stays small (240 KB of float32): median 103, mean 234.

Device k's data depend on (seed, k) alone, through its own random stream: any device of
any fleet is generated on its own, in time and memory O(its samples), and device 7 is the
same in a fleet of 10 as in one of 10,000. The last `test_fraction` of each device's
samples are held out; the server's test set is the held-out samples of the first
TEST_DEVICES devices of the fleet (devices are drawn independently, so the first ones are
a fair sample of any fleet's distributions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from fedmq.errors import ConfigError

DIM = 60
CLASSES = 10
MIN_SAMPLES = 50  # FedProx: 50 + lognormal(4, 2) samples per device
SIZE_MEAN, SIZE_SIGMA = 4.0, 2.0
MAX_SAMPLES = 1000  # about 7% of devices would have more; caps a device-round's work
TEST_DEVICES = 100  # devices whose held-out samples make the server's test set
_STD_X = np.arange(1, DIM + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma_jj = j^-1.2
_STREAM = 0x5E_7A_C0  # tags this task's random streams apart from other uses of a seed
_NAME = re.compile(r"synthetic-(?P<alpha>\d+(?:\.\d+)?)-(?P<beta>\d+(?:\.\d+)?)")

Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Synthetic:
    """One setting of the generator: Synthetic(alpha, beta), or the IID variant."""

    alpha: float = 1.0
    beta: float = 1.0
    iid: bool = False

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and self.beta >= 0):
            raise ConfigError(f"synthetic alpha {self.alpha} and beta {self.beta} must be >= 0")

    @property
    def description(self) -> str:
        what = "IID" if self.iid else f"Synthetic({self.alpha:g}, {self.beta:g})"
        return (f"{what}: per-device logistic-regression data (FedProx/LEAF), {DIM} "
                f"features, {CLASSES} classes, any number of devices")


def parse(name: str) -> Synthetic | None:
    """The setting a task name asks for: `synthetic` is (1, 1), `synthetic-A-B` is (A, B),
    `synthetic-iid` the IID variant; None for a name of another task."""
    if name == "synthetic":
        return Synthetic()
    if name == "synthetic-iid":
        return Synthetic(alpha=0.0, beta=0.0, iid=True)
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return Synthetic(alpha=float(match["alpha"]), beta=float(match["beta"]))


def _rng(seed: int, *stream: int) -> np.random.Generator:
    if seed < 0:
        raise ConfigError(f"seed {seed} must be >= 0 for the synthetic task")
    return np.random.default_rng([_STREAM, seed, *stream])


def device_size(*, seed: int, device: int) -> int:
    """How many samples device `device` has (train and held out), before generating them."""
    return _size(_rng(seed, device))


def _size(rng: np.random.Generator) -> int:
    # The first draw of a device's stream, so device_size needs nothing else.
    return min(MAX_SAMPLES, MIN_SAMPLES + int(rng.lognormal(SIZE_MEAN, SIZE_SIGMA)))


def device_samples(setting: Synthetic, *, seed: int, device: int) -> Arrays:
    """Every sample of device `device`: x float32 (n, DIM), y int64 (n,)."""
    if device < 0:
        raise ConfigError(f"device index {device} must be >= 0")
    rng = _rng(seed, device)
    n = _size(rng)
    # Standard draws scaled by alpha and beta: the settings share each device's randomness.
    u, big_b = setting.alpha * rng.standard_normal(), setting.beta * rng.standard_normal()
    w = u + rng.standard_normal((CLASSES, DIM))
    b = u + rng.standard_normal(CLASSES)
    v = big_b + rng.standard_normal(DIM)
    if setting.iid:
        w, b = _shared_model(seed)
        v = np.zeros(DIM)
    x = v + rng.standard_normal((n, DIM)) * _STD_X
    y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)
    return x.astype(np.float32), y


def _shared_model(seed: int) -> Arrays:
    """The IID variant's one (W, b), from the seed's fleet-wide stream."""
    rng = _rng(seed)
    return rng.standard_normal((CLASSES, DIM)), rng.standard_normal(CLASSES)


def device_split(setting: Synthetic, *, seed: int, device: int,
                 test_fraction: float) -> tuple[Arrays, Arrays]:
    """(training samples, held-out samples) of one device: its last `test_fraction`."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test fraction {test_fraction} must be between 0 and 1")
    x, y = device_samples(setting, seed=seed, device=device)
    cut = len(y) - max(1, round(len(y) * test_fraction))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def pooled(setting: Synthetic, *, seed: int, test_fraction: float,
           devices: int = TEST_DEVICES) -> tuple[Arrays, Arrays]:
    """(training samples, held-out samples) of devices 0..devices-1, concatenated."""
    if devices < 1:
        raise ConfigError(f"need at least one device, got {devices}")
    splits = [device_split(setting, seed=seed, device=k, test_fraction=test_fraction)
              for k in range(min(devices, TEST_DEVICES))]
    return _concat([train for train, _ in splits]), _concat([test for _, test in splits])


def _concat(parts: list[Arrays]) -> Arrays:
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
