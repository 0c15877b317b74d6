"""What goes out for a model: its payload (and a delta) encoded and chunked once per
version, and the retained messages of each announcement, built once per (version, round).

The service publishes what this returns; nothing here touches the link.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.core import codecs
from fedmq.core.protocol import (
    FleetTopics,
    ModelAnnouncement,
    ModelChunk,
    PayloadInfo,
    cohort_digest,
)
from fedmq.core.transfer import chunk_tensor

# Model payloads up to this size also travel inside the announcement: a device starts
# training on the first message instead of subscribing to a chunk stream and waiting for
# it (one broker round trip per round; measured ~1-2 ms of a ~15 ms digits round).
# 32 KiB keeps the announcement small next to managed brokers' 128 KiB limit.
INLINE_MODEL_BYTES = 32 * 1024

Messages = list[tuple[str, bytes]]


@dataclass(frozen=True)
class _Encoded:
    version: int
    full_info: PayloadInfo
    full_chunks: list[ModelChunk]
    delta_info: PayloadInfo | None
    delta_chunks: list[ModelChunk]


class ModelBroadcast:
    """The retained messages that announce the current model (chunks, then the
    announcement), for one fleet."""

    def __init__(self, *, topics: FleetTopics, seal: Callable[[ModelAnnouncement], bytes],
                 model_codec: str, delta_codec: str, seed: int) -> None:
        self.topics = topics
        self.seal = seal
        self.model_codec = model_codec
        self.delta_codec = delta_codec
        self.seed = seed
        self._encoded: _Encoded | None = None
        self._chain: tuple[int, np.ndarray] | None = None  # what delta followers hold
        self._chunk_slots: dict[str, int] = {}  # retained chunk topics filled, per stream
        self._published: tuple[tuple[int, int], Messages] | None = None

    def forget(self) -> None:
        """The next `messages` builds a fresh announcement (new announce_id: devices train
        again), e.g. after a reconnect without a session or a re-planned cohort."""
        self._published = None

    def messages(self, *, params: np.ndarray, version: int, round: int, limit: int,
                 fields: Callable[[], dict[str, Any]]) -> Messages:
        """The messages announcing `version` for `round`. Built once per (version, round)
        and returned unchanged after, so a republish after a reconnect is byte-identical
        and devices do not train twice. `fields()` gives the announcement's other fields
        (cohort included); it is called only when building. `limit`: largest payload the
        link may publish."""
        if self._published is not None and self._published[0] == (version, round):
            return self._published[1]
        encoded = self._encode(params, version, limit)
        extra = fields()
        full_info, delta_info = encoded.full_info, encoded.delta_info
        if extra.get("cohort") is not None:
            # Not everyone trains: the devices that do fetch the chunks, the rest (who
            # download nothing) are not sent a model inside every announcement.
            full_info = dataclasses.replace(full_info, data=b"")
            if delta_info is not None:
                delta_info = dataclasses.replace(delta_info, data=b"")
        if extra.get("cohort"):  # compact: every device of the fleet receives this
            extra = {**extra, "cohort": None, "cohort_digest": cohort_digest(extra["cohort"])}
        announcement = ModelAnnouncement(
            version=version, round=round, payload=full_info, delta=delta_info,
            delta_base=version - 1 if delta_info else -1, announce_id=os.urandom(6).hex(),
            issued_at=time.time(), **extra)
        messages = (self._chunk_messages(self.topics.model_payload_chunk, encoded.full_chunks)
                    + self._chunk_messages(self.topics.model_delta_chunk,
                                           encoded.delta_chunks))
        messages.append((self.topics.model_current, self.seal(announcement)))
        self._published = ((version, round), messages)
        return messages

    def _encode(self, params: np.ndarray, version: int, limit: int) -> _Encoded:
        """The model's full payload and, for devices holding the previous version, a delta;
        built once per version.

        The delta is taken against the chain view: exactly what a device that followed
        every delta holds, so quantization error never accumulates on such devices (it is
        fed back into the next delta). A device that took the full payload holds a view
        within one quantization step of the chain's; either way its update is a delta
        against what it holds, so aggregation stays unbiased.
        """
        if self._encoded is not None and self._encoded.version == version:
            return self._encoded
        rng = np.random.default_rng([self.seed, version])
        full = codecs.encode(params, self.model_codec, rng=rng)
        inline = min(INLINE_MODEL_BYTES, limit // 4)
        delta_info, delta_chunks = None, []
        chain = self._chain
        if self.delta_codec and chain is not None and chain[0] == version - 1:
            delta = codecs.encode(params - chain[1], self.delta_codec, rng=rng)
            delta_info, delta_chunks = chunk_tensor(delta, version=version, max_payload=limit,
                                                    inline_max=inline)
            self._chain = (version, chain[1] + codecs.decode(delta))
        else:
            self._chain = (version, codecs.decode(full))
        # One payload inline, the one most devices need: the delta when there is one (the
        # devices that took the last model), else the full model. Both inline would make
        # every device download both.
        full_info, full_chunks = chunk_tensor(
            full, version=version, max_payload=limit,
            inline_max=0 if delta_info is not None else inline)
        self._encoded = _Encoded(version, full_info, full_chunks, delta_info, delta_chunks)
        return self._encoded

    def _chunk_messages(self, topic_of: Callable[[int], str],
                        chunks: list[ModelChunk]) -> Messages:
        """Retained chunk messages of one stream, plus empty retained payloads that delete
        the chunks a bigger earlier payload left behind."""
        stream = topic_of(0)
        filled = self._chunk_slots.get(stream, 0)
        messages = [(topic_of(ch.index), ch.to_payload()) for ch in chunks]
        messages += [(topic_of(i), b"") for i in range(len(chunks), filled)]
        self._chunk_slots[stream] = max(filled, len(chunks))
        return messages
