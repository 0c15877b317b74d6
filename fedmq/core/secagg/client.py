"""A device's side of one secure-aggregation round, sans I/O: messages in, messages out.

Stages (docs/secagg.md): setup -> advertise two public keys -> share the self-mask seed
b and the mask key among the neighbours -> send the masked input -> reveal, for each
neighbour, the one share the server may have. The device checks what a curious or lying
server could exploit: it never reveals a self-mask share and a mask-key share of the same
device, not even across two requests; it refuses to help unmask a sum of fewer than
`min_clients` inputs or one that lists itself as dropped. A refusal raises
SecureAggregationError and the device is then just a dropout.

Secrets live in this object only (never on disk): a device that restarts mid-round has
dropped out of it, which the protocol tolerates. One object serves one round.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from fedmq.core.protocol.wire import Message
from fedmq.core.secagg import keys, prg, shamir
from fedmq.core.secagg.graph import neighbour_sets
from fedmq.core.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    NeighbourKeys,
    PeerKeys,
    RevealedShare,
    RoutedShares,
    SecAggSetup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmq.errors import ProtocolError, SecureAggregationError

WAIT_SETUP = "setup"
WAIT_KEYS = "keys"
WAIT_SHARES = "shares"
WAIT_INPUT = "input"
WAIT_UNMASK = "unmask"
DONE = "done"
ABORTED = "aborted"


def pair_sign(me: int, peer: int) -> int:
    """The lower index adds the pairwise mask, the higher subtracts it: they cancel."""
    return 1 if me < peer else -1


class SecAggClient:
    """One device in one round. `entropy` is os.urandom; tests pass a seeded source."""

    def __init__(self, device_id: str, *, entropy: Callable[[int], bytes] = os.urandom,
                 rng: np.random.Generator | None = None) -> None:
        self.device_id = device_id
        self.stage = WAIT_SETUP
        self.setup: SecAggSetup | None = None
        self._entropy = entropy
        self._rng = rng if rng is not None else np.random.default_rng()
        self._index = -1
        self._neighbours: frozenset[int] = frozenset()
        self._cipher: keys.KeyPair | None = None
        self._mask: keys.KeyPair | None = None
        self._self_seed = b""
        self._peers: dict[int, PeerKeys] = {}
        self._share_keys: dict[int, bytes] = {}  # peer -> key of the shares between us
        self._held: dict[int, tuple[bytes, bytes]] = {}  # peer -> (mask-key share, b share)
        self._input: np.ndarray | None = None
        self._revealed: dict[int, str] = {}  # peer -> "b" or "sk", over the whole round
        # the input as sent: an outbox re-sends these very bytes until receipted
        self.masked_input: MaskedInput | None = None

    # -- events ------------------------------------------------------------------------

    def receive(self, message: Message) -> list[Message]:
        """Handle one message from the server; returns what to send back."""
        try:
            return self._dispatch(message)
        except SecureAggregationError:
            self.stage = ABORTED
            self._forget()
            raise

    def submit(self, values: np.ndarray) -> list[Message]:
        """This device's float update (flat): clipped and quantized into the field."""
        if self.setup is None:
            raise SecureAggregationError("submit the update after the round's setup arrived",
                                         reason="wrong_stage")
        return self.submit_elements(self.setup.quantizer.quantize(values, self._rng))

    def submit_elements(self, elements: np.ndarray) -> list[Message]:
        """This device's input, already field elements (no quantization)."""
        setup = self._require_setup()
        if self._input is not None or self.stage in (WAIT_UNMASK, DONE, ABORTED):
            raise SecureAggregationError("this round already has this device's input",
                                         reason="wrong_stage")
        x = np.asarray(elements)
        if x.shape != (setup.vector_size,):
            raise SecureAggregationError(f"the input has shape {x.shape}, the round sums "
                                         f"{setup.vector_size} values", reason="bad_size")
        self._input = setup.field.reduce(x)
        return self._masked_input() if self.stage == WAIT_INPUT else []

    # -- stages ------------------------------------------------------------------------

    def _dispatch(self, message: Message) -> list[Message]:
        if isinstance(message, SecAggSetup):
            return self._on_setup(message)
        setup = self._require_setup()
        if message.session != setup.session or message.round != setup.round:
            raise ProtocolError(f"{type(message).__name__} of another round or session",
                                reason="wrong_session")
        if getattr(message, "device_id", self.device_id) != self.device_id:
            raise ProtocolError(f"{type(message).__name__} for device "
                                f"{message.device_id!r:.40}", reason="misrouted")
        if isinstance(message, NeighbourKeys):
            return self._on_neighbour_keys(message) if self.stage == WAIT_KEYS else []
        if isinstance(message, RoutedShares):
            return self._on_routed_shares(message) if self.stage == WAIT_SHARES else []
        if isinstance(message, UnmaskRequest):
            return self._on_unmask(message)
        raise ProtocolError(f"a device does not take {type(message).__name__}",
                            reason="wrong_kind")

    def _on_setup(self, setup: SecAggSetup) -> list[Message]:
        if self.setup is not None:
            if setup == self.setup:
                return []  # a duplicate delivery
            raise ProtocolError("a second, different setup: start a new client per round",
                                reason="wrong_session")
        self._index = setup.index_of(self.device_id)
        self.setup = setup
        self._neighbours = neighbour_sets(len(setup.participants), setup.neighbours,
                                          setup.session)[self._index]
        self._cipher = keys.generate_keypair(self._entropy)
        self._mask = keys.generate_keypair(self._entropy)
        self._self_seed = self._entropy(prg.SEED_BYTES)
        self.stage = WAIT_KEYS
        return [AdvertiseKeys(device_id=self.device_id, round=setup.round,
                              session=setup.session, cipher_key=self._cipher.public,
                              mask_key=self._mask.public)]

    def _on_neighbour_keys(self, message: NeighbourKeys) -> list[Message]:
        setup = self._require_setup()
        assert self._cipher is not None and self._mask is not None
        peers = {k.index: k for k in message.keys}
        strangers = set(peers) - self._neighbours
        if strangers:
            raise SecureAggregationError(f"the server sent keys of devices {sorted(strangers)} "
                                         "that are not this device's neighbours",
                                         reason="not_neighbour")
        if len(peers) < setup.threshold:
            raise SecureAggregationError(
                f"only {len(peers)} neighbours are left, fewer than the threshold "
                f"{setup.threshold}: this device's secrets could not be rebuilt",
                reason="too_few_neighbours")
        holders = [j + 1 for j in peers]  # x-coordinates never 0
        key_shares = shamir.split(self._mask.private, threshold=setup.threshold,
                                  holders=holders, entropy=self._entropy)
        seed_shares = shamir.split(self._self_seed, threshold=setup.threshold,
                                   holders=holders, entropy=self._entropy)
        out = []
        for j, peer in sorted(peers.items()):
            key = self._share_keys[j] = keys.share_key(self._cipher, peer.cipher_key,
                                                       session=setup.session)
            ciphertext = keys.encrypt_share(
                key, key_shares[j + 1] + seed_shares[j + 1], session=setup.session,
                sender=self._index, recipient=j, entropy=self._entropy)
            out.append(EncryptedShare(peer=j, ciphertext=ciphertext))
        self._peers = peers
        self.stage = WAIT_SHARES
        return [ShareKeys(device_id=self.device_id, round=setup.round, session=setup.session,
                          shares=out)]

    def _on_routed_shares(self, message: RoutedShares) -> list[Message]:
        setup = self._require_setup()
        held = {}
        for share in message.shares:
            key = self._share_keys.get(share.peer)
            if key is None:
                raise SecureAggregationError(f"a share from device #{share.peer}, which this "
                                             "device shared nothing with", reason="not_neighbour")
            plain = keys.decrypt_share(key, share.ciphertext, session=setup.session,
                                       sender=share.peer, recipient=self._index)
            held[share.peer] = (plain[:shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])
        if len(held) < setup.threshold:
            raise SecureAggregationError(
                f"only {len(held)} neighbours shared their secrets, fewer than the "
                f"threshold {setup.threshold}", reason="too_few_neighbours")
        self._held = held
        self.stage = WAIT_INPUT
        return self._masked_input() if self._input is not None else []

    def _masked_input(self) -> list[Message]:
        setup = self._require_setup()
        assert self._mask is not None and self._input is not None
        field, size = setup.field, setup.vector_size
        y = self._input.copy()
        field.add_into(y, prg.expand(self._self_seed, size, field, purpose=prg.SELF_MASK))
        for j in sorted(self._held):  # the neighbours that shared: they mask with us too
            seed = keys.mask_seed(self._mask, self._peers[j].mask_key,
                                  session=setup.session)
            field.add_into(y, prg.expand(seed, size, field, purpose=prg.PAIR_MASK),
                           sign=pair_sign(self._index, j))
        self._input = None
        self.stage = WAIT_UNMASK
        self.masked_input = MaskedInput(device_id=self.device_id, round=setup.round,
                                        session=setup.session, data=field.to_bytes(y))
        return [self.masked_input]

    def _on_unmask(self, request: UnmaskRequest) -> list[Message]:
        setup = self._require_setup()
        if self.stage not in (WAIT_UNMASK, DONE):
            return []  # this device sent no input: it has nothing to unmask
        survivors, dropped = set(request.survivors), set(request.dropped)
        if self._index not in survivors:
            raise SecureAggregationError("the server lists this device, which sent its input, "
                                         "as dropped", reason="inconsistent")
        if request.inputs < setup.min_clients:
            raise SecureAggregationError(
                f"the server would unmask a sum of {request.inputs} inputs, fewer than "
                f"min_clients {setup.min_clients}", reason="too_few_inputs")
        reveal: dict[int, str] = {}
        for j in self._held:
            if j in survivors:
                reveal[j] = "b"
            elif j in dropped:
                reveal[j] = "sk"
        for j, kind in reveal.items():
            if self._revealed.get(j, kind) != kind:
                raise SecureAggregationError(
                    f"the server asks for the other secret of device #{j} after one was "
                    "revealed: revealing both would expose its update", reason="both_secrets")
        self._revealed.update(reveal)
        self.stage = DONE
        return [UnmaskResponse(
            device_id=self.device_id, round=setup.round, session=setup.session,
            self_mask_shares=[RevealedShare(owner=j, share=self._held[j][1])
                              for j, kind in sorted(reveal.items()) if kind == "b"],
            key_shares=[RevealedShare(owner=j, share=self._held[j][0])
                        for j, kind in sorted(reveal.items()) if kind == "sk"])]

    # -- helpers -----------------------------------------------------------------------

    def _require_setup(self) -> SecAggSetup:
        if self.setup is None:
            raise ProtocolError("a secure-aggregation message before the round's setup",
                                reason="wrong_stage")
        return self.setup

    def _forget(self) -> None:
        self._cipher = self._mask = None
        self._self_seed = b""
        self._held, self._share_keys = {}, {}
        self._input = None
