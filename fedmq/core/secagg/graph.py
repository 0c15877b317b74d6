"""Who masks with whom: the SecAgg+ neighbour graph and its parameters (k, t).

Bonawitz et al. (CCS 2017) pair every device with every other: O(n) keys, shares and
masks per device. Bell et al. ("Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020) show a random k-regular graph with k = O(log n) keeps the same
guarantees with high probability. Following them, the graph is a *random Harary graph*:
the n devices are placed on a ring in a random order and each is joined to the k/2
nearest on either side (k even); k = n - 1 is the complete graph, i.e. plain SecAgg.

The order comes from the round's session bytes through SHA-256, so the server and every
device compute the same graph without trusting numpy's generator streams to agree across
versions.

Choosing k and the Shamir threshold t (`choose_parameters`) follows Bell et al.'s
analysis: given n, an assumed fraction of dropouts delta and of colluding (corrupt)
devices gamma, pick the smallest even k for which, except with probability 2^-sigma
(security, sigma = 40) or 2^-eta (correctness, eta = 20), all of:

1. the graph of honest survivors stays connected (else the server would learn partial
   sums): removing nodes disconnects a Harary graph only through two runs of k/2
   consecutive removed nodes, bounded by a union bound over where the runs start;
2. no device has t or more corrupt neighbours (they could rebuild its secrets): the
   number of corrupt neighbours is hypergeometric, its tail is bounded per device and
   summed over all n (union bound);
3. every device has at least t surviving neighbours (else its secrets cannot be rebuilt
   and the round is lost): the same, for surviving neighbours;
4. against a server that lies about who dropped (`semi_malicious`, on by default): 2t >
   k + (corrupt neighbours), so the honest neighbours, each revealing one kind of share
   per device, can never give it both t shares of the self-mask seed and t of the
   masking key of one device.

t is the smallest value that passes 2 and 4 (cheaper reconstruction); it must be at most
the bound from 3. When no sparse k < n - 1 works (small cohorts, large delta), the
complete graph is used if its counts, which are then exact, allow a threshold.
These are the bounds' shape from the paper; the numbers come from the hypergeometric
tails computed below, not from its tables.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from fedmq.errors import ConfigError

GRAPH_DOMAIN = b"fedmq/secagg/graph/v1\x00"
SECURITY_BITS = 40
CORRECTNESS_BITS = 20


@dataclass(frozen=True, slots=True)
class GraphParameters:
    """k neighbours per device and the Shamir threshold t of its shares among them."""

    neighbours: int
    threshold: int


def check_parameters(count: int, neighbours: int, threshold: int) -> None:
    """ConfigError unless (k, t) make a valid Harary graph and sharing for `count` devices."""
    if count < 3:
        raise ConfigError(f"secure aggregation needs at least 3 devices, got {count}")
    if not (neighbours == count - 1 or (2 <= neighbours < count - 1 and neighbours % 2 == 0)):
        raise ConfigError(f"{neighbours} neighbours for {count} devices: use an even number "
                          f"below {count - 1}, or {count - 1} (every other device)")
    if not 2 <= threshold <= neighbours:
        raise ConfigError(f"threshold {threshold} must be in 2..{neighbours} (the neighbours)")


def ring_order(count: int, session: bytes) -> list[int]:
    """Device indices in ring order, a permutation determined by the session bytes."""
    keys = [hashlib.sha256(GRAPH_DOMAIN + session + i.to_bytes(4, "big")).digest()
            for i in range(count)]
    return sorted(range(count), key=keys.__getitem__)


def neighbour_sets(count: int, neighbours: int, session: bytes) -> tuple[frozenset[int], ...]:
    """For each device index, the indices it is joined to (symmetric, k each)."""
    if neighbours >= count - 1:
        return tuple(frozenset(set(range(count)) - {i}) for i in range(count))
    order = ring_order(count, session)
    half = neighbours // 2
    sets: list[set[int]] = [set() for _ in range(count)]
    for pos, i in enumerate(order):
        for d in range(1, half + 1):
            j = order[(pos + d) % count]
            sets[i].add(j)
            sets[j].add(i)
    return tuple(frozenset(s) for s in sets)


# -- parameter choice (Bell et al. 2020) -------------------------------------------------
# Written here because fedmq.core depends on numpy and msgpack only (scipy.stats would do it).


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _hypergeom_pmf(population: int, marked: int, draws: int) -> list[float]:
    """P(X = x) for x = 0..draws: marked items among `draws` taken without replacement."""
    total = _log_comb(population, draws)
    out = []
    for x in range(draws + 1):
        if x > marked or draws - x > population - marked:
            out.append(0.0)
        else:
            out.append(math.exp(_log_comb(marked, x)
                                + _log_comb(population - marked, draws - x) - total))
    return out


def _log_disconnect_probability(count: int, k: int, bad: int) -> float:
    """log of a union bound on the survivors' Harary graph being cut by `bad` removed nodes."""
    if k > bad:
        return -math.inf
    log_pairs = math.log(count) + math.log(max(count - k - 1, 1)) - math.log(2)
    # the k nodes of two runs all bad: bad!/(bad-k)! * (count-k)!/count!
    return (log_pairs + math.lgamma(bad + 1) - math.lgamma(bad - k + 1)
            + math.lgamma(count - k + 1) - math.lgamma(count + 1))


def _threshold_range(count: int, k: int, corrupt: int, survivors: int, *,
                     semi_malicious: bool, security: float, correctness: float
                     ) -> tuple[int, int]:
    """(lowest secure t, highest correct t) for degree k; empty if lowest > highest."""
    if k == count - 1:  # complete graph: the counts are exact
        most_corrupt = corrupt
        fewest_alive = survivors - 1  # a surviving device's own neighbours
    else:
        # corrupt neighbours: the largest a with P(X > a) <= security / count
        pmf = _hypergeom_pmf(count - 1, corrupt, k)
        tail, most_corrupt = 0.0, k
        for a in range(k, -1, -1):
            tail += pmf[a]
            if tail > security / count:
                break
            most_corrupt = a - 1
        most_corrupt = max(most_corrupt, 0)
        # surviving neighbours: the largest s with P(X < s) <= correctness / count
        pmf = _hypergeom_pmf(count - 1, survivors - 1, k)
        head, fewest_alive = 0.0, 0
        for s in range(k + 1):
            head += pmf[s]
            if head > correctness / count:
                break
            fewest_alive = s + 1
    lowest = most_corrupt + 1
    if semi_malicious:
        lowest = max(lowest, (k + most_corrupt) // 2 + 1)
    return max(lowest, 2), min(fewest_alive, k)


def choose_parameters(count: int, *, dropout_rate: float, adversarial_rate: float = 0.0,
                      semi_malicious: bool = True, security_bits: float = SECURITY_BITS,
                      correctness_bits: float = CORRECTNESS_BITS) -> GraphParameters:
    """The smallest (k, t) that tolerate `dropout_rate` of `count` devices dropping at any
    stage and `adversarial_rate` colluding with the server (module docstring)."""
    if count < 3:
        raise ConfigError(f"secure aggregation needs at least 3 devices, got {count}")
    if not (0 <= dropout_rate < 1 and 0 <= adversarial_rate < 1):
        raise ConfigError("dropout and adversarial rates must be in [0, 1)")
    corrupt = math.floor(adversarial_rate * count + 1e-9)
    dropped = math.floor(dropout_rate * count + 1e-9)
    survivors = count - dropped
    security = 2.0 ** -(security_bits + 1)  # split between the two bad events
    correctness = 2.0 ** -correctness_bits
    for k in [*range(2, count - 1, 2), count - 1]:
        if k < count - 1 and _log_disconnect_probability(
                count, k, corrupt + dropped) >= math.log(security):
            continue
        lowest, highest = _threshold_range(count, k, corrupt, survivors,
                                           semi_malicious=semi_malicious,
                                           security=security, correctness=correctness)
        if lowest <= highest:
            return GraphParameters(neighbours=k, threshold=lowest)
    raise ConfigError(
        f"no neighbour count and threshold let {count} devices tolerate a dropout rate of "
        f"{dropout_rate} with {adversarial_rate} of them colluding; plan for fewer dropouts "
        "or colluders, or a larger cohort")
