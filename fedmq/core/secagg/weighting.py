"""How a FedAvg-weighted update rides in a secure sum, shared by device and server.

The sum is of field elements, so the weight travels inside the masked vector: a device
with n samples sends `[w * clip(delta), w * clip]` with w = min(n, cap) / cap in (0, 1],
every value inside [-clip, clip] (the quantizer's range). The unmasked sum then holds
sum_i w_i clip(delta_i) and clip * sum_i w_i: their ratio is the weighted mean, and the
server learns the total weight (samples, up to the cap) but no device's. Capping the
weight bounds what one device can move the mean by, as the plain path's sample credit
check does (aggregator/bounds.py). cap 0: every device weighs 1.
"""

from __future__ import annotations

import numpy as np

from fedmq.errors import SecureAggregationError


def vector_size(params: int) -> int:
    """The secure sum's length for a model of `params` parameters: one more, the weight."""
    return params + 1


def weighted_vector(delta: np.ndarray, samples: int, *, clip: float,
                    weight_cap: int) -> np.ndarray:
    """A device's input: its delta clipped to [-clip, clip] per coordinate and scaled by
    its weight, followed by the weight (times clip, so it is inside the range too)."""
    w = 1.0 if weight_cap <= 0 else min(max(int(samples), 1), weight_cap) / weight_cap
    flat = np.clip(np.asarray(delta, dtype=np.float64).ravel(), -clip, clip)
    return np.concatenate([flat * w, [w * clip]])


def weighted_mean(float_sum: np.ndarray, *, clip: float,
                  weight_cap: int) -> tuple[np.ndarray, float, int]:
    """(mean delta, total weight, samples it stands for) from the unmasked float sum of
    `weighted_vector`s. The total weight is quantized too: a tiny sum is refused."""
    total = np.asarray(float_sum, dtype=np.float64)
    weight = float(total[-1]) / clip
    if not weight > 1e-6:
        raise SecureAggregationError(f"the secure sum's total weight is {weight:.3g}: no "
                                     "weighted input is in it", reason="no_weight")
    mean = (total[:-1] / weight).astype(np.float32)
    samples = round(weight * weight_cap) if weight_cap > 0 else round(weight)
    return mean, weight, samples
