"""The aggregator's side of `he = "ckks"`: the round's rule over encrypted updates.

`EncryptedMean` takes the place of the mean rule: it adds each device's ciphertexts to
the round's encrypted sum (fedmq/core/he.py's CiphertextSum, public key only) and never
sees an update in the clear. When the round closes the encrypted sum, and only the sum,
is decrypted, by one of two key holders (`he_decrypt`):

- `keyholder`: a separate `fedmq keyholder` process holds the secret key. The round is
  sealed (`seal`: no update joins it any more) into a DecryptRequest that the service
  (he_service.py) sends it; its DecryptReply is folded in with `resolve`, and only then
  does the round close. This process never holds the secret key.
- `local`: this process reads the secret file (`he_secret_context`) and decrypts itself.

Either refuses a sum of fewer than min_updates updates; the decrypted weighted sum over the
decrypted total weight is the round's delta, and the model guard checks the new model
as in any round. A total weight that differs from the devices' claimed samples refuses
the round (`refusal`): some ciphertext was weighted unlike its claim, or encrypted
under another key.

The checkpoint holds the encrypted sum (ciphertexts), never a plain update.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.strategy.rule import AggregationRule
from fedmq.core import he
from fedmq.core.protocol import DecryptReply, DecryptRequest, EncodedTensor
from fedmq.errors import ConfigError, FedmqError, ProtocolError

# An encrypted update may take this much more than its ciphertexts' measured size (their
# compressed size varies a little) before it is refused as too_large.
CIPHERTEXT_MARGIN = 1.25


@dataclass(frozen=True, eq=False)
class HESetup:
    """The loaded keys of one aggregator: the fleet's public key (sums), and the key
    holder's decryptor (the round's sum only) when it decrypts locally (None: a separate
    key holder does, and this process has no secret key at all)."""

    key: he.PublicKey
    decryptor: he.Decryptor | None = None

    @property
    def remote(self) -> bool:
        """Sums go to a separate key holder (he_decrypt = keyholder)."""
        return self.decryptor is None

    def rule(self, size: int, *, min_count: int) -> EncryptedMean:
        return EncryptedMean(size, setup=self, min_count=min_count)

    def payload_limit(self, params: int) -> int:
        """Bytes an encrypted update of a `params`-parameter model may take."""
        count = he.ciphertext_count(params, self.key.slots)
        return int(count * self.key.ciphertext_bytes * CIPHERTEXT_MARGIN)


def read_bundle(path: str, what: str) -> he.KeyBundle:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}; write the key files with "
                          "`fedmq keys he-init`") from None
    return he.KeyBundle.from_bytes(data, what=f"{what} {path}")


@functools.lru_cache(maxsize=4)
def load_setup(public_path: str, secret_path: str) -> HESetup:
    """The aggregator's HE keys (loaded once per pair of files). `secret_path` empty: the
    public key only, and a separate key holder decrypts (a public file that holds the
    secret key is refused: this process must not have it). `public_path` empty: the
    public key is the secret file's public part."""
    if not secret_path:
        public = read_bundle(public_path, "he_public_context")
        if public.secret:
            raise ConfigError(f"he_public_context {public_path} holds the secret HE key; with "
                              "he_decrypt = keyholder the aggregator must not have it: give it "
                              "he-public.ctx and the secret file to `fedmq keyholder` only")
        return HESetup(key=he.PublicKey(public))
    secret = read_bundle(secret_path, "he_secret_context")
    public = read_bundle(public_path, "he_public_context") if public_path else secret
    if public.fingerprint != secret.fingerprint or public.params != secret.params:
        raise ConfigError(f"he_public_context {public_path} (key {public.fingerprint}) and "
                          f"he_secret_context {secret_path} (key {secret.fingerprint}) are not "
                          "one key pair: use the two files one `fedmq keys he-init` wrote")
    return HESetup(key=he.PublicKey(public), decryptor=he.Decryptor(secret))


class EncryptedMean(AggregationRule):
    """The weighted mean of a round's encrypted updates (see the module doc)."""

    name = "ckks"
    streams = True

    def __init__(self, size: int, *, setup: HESetup, min_count: int) -> None:
        self.setup = setup
        self.size = size
        self.min_count = min_count
        self.sum = he.CiphertextSum(setup.key, size)
        self.claimed = 0.0  # samples the counted updates claim in the clear
        self._refusal = ""
        self.sealed = False  # sent to the key holder: nothing joins the sum any more
        self.answer: DecryptReply | None = None  # the key holder's, once it came

    @property
    def count(self) -> int:
        return self.sum.count

    def add_encoded(self, tensor: EncodedTensor, weight: float,
                    norm: float | None = None) -> None:
        if self.sealed:
            raise ProtocolError("the round's encrypted sum went to the key holder; the update "
                                "is for a round that is closing (train on the next model)",
                                reason="round_closing")
        self.sum.add(tensor)
        self.claimed += weight

    def add(self, delta: np.ndarray, weight: float, norm: float | None = None) -> None:
        raise ProtocolError("a decoded update reached the encrypted round; with he set the "
                            "server decodes nothing", reason="not_encrypted")

    def seal(self, *, lineage: str, round: int, devices: tuple[str, ...]) -> DecryptRequest:
        """The request for the key holder: from now on the sum is fixed (an update that
        comes later is refused as round_closing)."""
        if self.count < self.min_count:
            raise FedmqError(f"a sum of {self.count} updates is not sent for decryption; "
                             f"{self.min_count} are needed")
        self.sealed = True
        return DecryptRequest(lineage=lineage, round=round, key=self.setup.key.fingerprint,
                              size=self.size, count=self.count, devices=list(devices),
                              ciphertexts=self.sum.to_bytes())

    def resolve(self, reply: DecryptReply) -> None:
        """The key holder's answer to the request `seal` made (the caller matched it)."""
        self.answer = reply

    @property
    def awaiting(self) -> bool:
        """Sealed and sent to a key holder that has not answered yet."""
        return self.sealed and self.answer is None

    def _decrypted(self) -> tuple[np.ndarray, float]:
        if self.setup.decryptor is not None:
            return self.setup.decryptor.decrypt(self.sum.to_bytes(), size=self.size,
                                                count=self.count, min_count=self.min_count)
        reply = self.answer
        if reply is None:
            raise FedmqError("the key holder has not answered")
        if reply.status != "ok":
            raise FedmqError(f"the key holder refused to decrypt ({reply.reason}): "
                             f"{reply.message}")
        weighted = np.frombuffer(reply.weighted, dtype="<f8")
        if weighted.size != self.size:
            raise FedmqError(f"the key holder's sum has {weighted.size} values, the model "
                             f"{self.size}")
        return weighted, reply.weight

    def result(self) -> np.ndarray:
        """The decrypted mean, or zeros with `refusal` set when it cannot be had."""
        self._refusal = ""
        try:
            weighted, weight = self._decrypted()
            return he.mean_of(weighted, weight, claimed=self.claimed)
        except FedmqError as exc:
            self._refusal = f"he: {exc}"
            return np.zeros(self.size, dtype=np.float32)

    def refusal(self) -> str:
        return self._refusal

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.name, "key": self.setup.key.fingerprint, "count": self.count,
                "claimed": self.claimed, "ciphertexts": self.sum.to_bytes(),
                "sealed": self.sealed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_saved_rule(state)
        if state["key"] != self.setup.key.fingerprint:
            raise ConfigError(f"the checkpoint's open round was encrypted under HE key "
                              f"{state['key']}, this aggregator has {self.setup.key.fingerprint}:"
                              " configure that key pair, or a new checkpoint path")
        self.sum.load(list(state["ciphertexts"]), int(state["count"]))
        self.claimed = float(state["claimed"])
        # a sealed round was (maybe) sent to the key holder: it is asked again on resume
        self.sealed = bool(state.get("sealed", False))
