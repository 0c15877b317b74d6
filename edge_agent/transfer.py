"""Moving a global model: announcement + chunked payload out, verified reassembly in.

Pure (no MQTT): the aggregator turns parameters into messages, the agent feeds received
messages to a `ModelReceiver` and gets the model back once every chunk and the hash agree.
Chunks are cut and verified by chunking.py's `frame` and `join_verified`, like update Parts;
they stay their own message because the announcement carries their manifest and the
receiver keeps the newest model version only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack
import numpy as np

from . import codecs
from .chunking import DEFAULT_MAX_PAYLOAD, frame, join_verified
from .errors import ProtocolError
from .protocol import EncodedTensor, ModelAnnouncement, ModelChunk, PayloadInfo
from .protocol.wire import unpack


def encode_model(params: np.ndarray, *, codec: str, version: int,
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[PayloadInfo, list[ModelChunk]]:
    """Encoded model bytes, described by a PayloadInfo and cut into chunks that each
    encode to at most `max_payload` bytes."""
    blob = msgpack.packb(codecs.encode(params, codec).to_wire(), use_bin_type=True)

    def make(index: int, count: int, data: bytes) -> ModelChunk:
        return ModelChunk(version=version, index=index, count=count, data=data)

    chunks = frame(blob, max_payload=max_payload, make=make)
    info = PayloadInfo(codec=codec, size=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
                       chunks=len(chunks))
    return info, chunks


@dataclass(frozen=True)
class ReceivedModel:
    announcement: ModelAnnouncement
    params: np.ndarray
    wire_bytes: int  # announcement + chunk bytes received for this version


class ModelReceiver:
    """Assembles the newest announced model version from its chunks.

    Chunks may arrive before their announcement and in any order; only the newest version
    is kept, so memory is bounded by one model.
    """

    def __init__(self) -> None:
        self.announcement: ModelAnnouncement | None = None
        self._announcement_bytes = 0
        self._chunks: dict[int, ModelChunk] = {}
        self._chunk_version = -1
        self._chunk_bytes = 0
        self._delivered: tuple[int, int, str] | None = None

    def offer_announcement(
        self, announcement: ModelAnnouncement, size: int
    ) -> ReceivedModel | None:
        current = self.announcement
        if current is not None and announcement.version < current.version:
            return None  # an older retained copy arriving late
        if current is not None and announcement.key == current.key:
            return None  # the same announcement again (a reconnect)
        self.announcement = announcement
        self._announcement_bytes = size
        return self._try_complete()

    def offer_chunk(self, chunk: ModelChunk, size: int) -> ReceivedModel | None:
        if chunk.version < self._chunk_version:
            return None
        if chunk.version > self._chunk_version:
            self._chunks.clear()
            self._chunk_version = chunk.version
            self._chunk_bytes = 0
        if chunk.index not in self._chunks:
            self._chunks[chunk.index] = chunk
            self._chunk_bytes += size
        return self._try_complete()

    def _try_complete(self) -> ReceivedModel | None:
        a = self.announcement
        if a is None or a.version != self._chunk_version or a.key == self._delivered:
            return None
        if len(self._chunks) < a.payload.chunks:
            return None
        if any(c.count != a.payload.chunks for c in self._chunks.values()):
            raise ProtocolError(f"model v{a.version}: chunk counts disagree with the announcement",
                                reason="bad_chunks")
        try:
            blob = join_verified((self._chunks[i].data for i in range(a.payload.chunks)),
                                 size=a.payload.size, sha256=bytes.fromhex(a.payload.sha256),
                                 what=f"model v{a.version}")
        except ProtocolError:
            self._chunks.clear()
            raise
        tensor = EncodedTensor.from_wire(unpack(blob))
        params = codecs.decode(tensor)
        self._delivered = a.key
        return ReceivedModel(a, params, self._announcement_bytes + self._chunk_bytes)
