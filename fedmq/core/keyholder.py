"""The HE key holder's decisions: which encrypted sums it decrypts (sans-I/O).

With `he = "ckks"` and `he_decrypt = keyholder` the aggregator holds the public key only;
the secret key lives with the key holder (`fedmq keyholder`, aggregator/keyholder.py is
its MQTT adapter), which answers each round's DecryptRequest with a DecryptReply. This
module decides, for each request, whether to decrypt it:

- `wrong_key`: the sum names another key's fingerprint;
- `too_few`: it claims fewer than `min_count` updates (the sum of one update is that
  update);
- `bad_shape`: its ciphertexts do not make a packed sum of a `size`-parameter model;
- `replayed`: its round is older than the last one decrypted for the aggregator's
  lineage (each lineage's rounds are decrypted once, in order);
- `different_sum`: the round was decrypted already, and this is another sum. The very
  same sum again (the reply was lost, the aggregator restarted) is answered again: that
  reveals nothing new;
- `undecryptable`: the decryptor failed on it.

What this does and does not stop is in docs/privacy.md ("The key holder"): the count is
the aggregator's claim, so it protects against an honest-but-curious aggregator, not a
malicious one. The state to persist (`state_dict`) is one (round, digest) per lineage.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedmq.core import he
from fedmq.core.protocol import DecryptReply, DecryptRequest
from fedmq.errors import ConfigError, FedmqError

log = logging.getLogger(__name__)

STATE_FORMAT = 1
REFUSALS = ("wrong_key", "too_few", "bad_shape", "replayed", "different_sum",
            "undecryptable")


class SumDecryptor(Protocol):
    """What the key holder decrypts with: fedmq.core.he.Decryptor."""

    fingerprint: str
    params: he.CkksParams

    def decrypt(self, blobs: list[bytes], *, size: int, count: int,
                min_count: int) -> tuple[np.ndarray, float]: ...


@dataclass(frozen=True, kw_only=True)
class KeyHolderPolicy:
    """What the key holder demands of a sum before decrypting it."""

    min_count: int = 2

    def __post_init__(self) -> None:
        if self.min_count < 2:
            raise ConfigError(f"min_updates {self.min_count} must be >= 2: the decrypted sum "
                              "of one update is that update")


@dataclass(frozen=True)
class Decrypted:
    """The last sum decrypted for one lineage."""

    round: int
    digest: bytes


class KeyHolder:
    """Answers DecryptRequests: decrypts a round's sum at most once (see the module doc)."""

    def __init__(self, decryptor: SumDecryptor, policy: KeyHolderPolicy) -> None:
        self.decryptor = decryptor
        self.policy = policy
        self.last: dict[str, Decrypted] = {}  # lineage -> its last decrypted round
        self.decrypted = 0  # sums decrypted (a repeat of the same sum included)
        self.refused: Counter[str] = Counter()  # refusals by reason

    def answer(self, request: DecryptRequest) -> DecryptReply:
        """The reply to `request`: the decrypted sum, or a refusal (logged and counted).
        On success the round is recorded: persist `state_dict()` before sending it."""
        digest = request.digest()
        refusal = self._check(request, digest)
        if refusal is None:
            try:
                weighted, weight = self.decryptor.decrypt(
                    request.ciphertexts, size=request.size, count=request.count,
                    min_count=self.policy.min_count)
            except FedmqError as exc:
                refusal = ("undecryptable", str(exc))
            except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError
                refusal = ("undecryptable", f"a ciphertext does not load: {exc}")
        if refusal is not None:
            reason, message = refusal
            self.refused[reason] += 1
            log.warning("refused to decrypt round %d of lineage %r (%s): %s", request.round,
                        request.lineage, reason, message)
            return DecryptReply(lineage=request.lineage, round=request.round, digest=digest,
                                status="refused", reason=reason, message=message)
        repeat = request.lineage in self.last and self.last[request.lineage].round == request.round
        self.last[request.lineage] = Decrypted(request.round, digest)
        self.decrypted += 1
        log.info("decrypted %sround %d of lineage %r: the sum of %d updates (%s)",
                 "again " if repeat else "", request.round, request.lineage, request.count,
                 ", ".join(request.devices) or "devices not named")
        return DecryptReply(lineage=request.lineage, round=request.round, digest=digest,
                            status="ok", weighted=np.asarray(weighted, "<f8").tobytes(),
                            weight=float(weight))

    def _check(self, request: DecryptRequest, digest: bytes) -> tuple[str, str] | None:
        """(reason, message) for a sum it must not decrypt, else None."""
        fingerprint = self.decryptor.fingerprint
        if request.key != fingerprint:
            return ("wrong_key", f"the sum is encrypted under key {request.key}, this key "
                    f"holder has {fingerprint}: give both the same `fedmq keys he-init` pair")
        if request.count < self.policy.min_count:
            return ("too_few", f"a sum of {request.count} updates; at least "
                    f"{self.policy.min_count} are needed so no single update is revealed")
        expected = he.ciphertext_count(request.size, self.decryptor.params.slots)
        if len(request.ciphertexts) != expected:
            return ("bad_shape", f"{len(request.ciphertexts)} ciphertexts, a "
                    f"{request.size}-parameter sum has {expected}")
        last = self.last.get(request.lineage)
        if last is None:
            return None
        if request.round < last.round:
            return ("replayed", f"round {last.round} was decrypted already; each round is "
                    "decrypted once, in order (a fresh aggregator checkpoint starts a new "
                    "lineage)")
        if request.round == last.round and digest != last.digest:
            return ("different_sum", f"round {request.round} was decrypted already, as "
                    "another sum; a round's sum is decrypted once")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT,
                "last": {lin: [d.round, d.digest.hex()] for lin, d in self.last.items()},
                "decrypted": self.decrypted, "refused": dict(self.refused)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"key holder state format {state.get('format')} is not "
                              f"{STATE_FORMAT}; move the state file away to start afresh")
        self.last = {lin: Decrypted(int(r), bytes.fromhex(h))
                     for lin, (r, h) in state["last"].items()}
        self.decrypted = int(state.get("decrypted", 0))
        self.refused = Counter({str(k): int(v) for k, v in state.get("refused", {}).items()})
