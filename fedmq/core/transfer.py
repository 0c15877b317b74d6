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

from fedmq.core import codecs
from fedmq.core.chunking import DEFAULT_MAX_PAYLOAD, frame, join_verified
from fedmq.core.layout import ParamLayout
from fedmq.core.protocol import EncodedTensor, ModelAnnouncement, ModelChunk, PayloadInfo
from fedmq.core.protocol.wire import unpack
from fedmq.errors import ProtocolError


def chunk_tensor(tensor: EncodedTensor, *, version: int,
                 max_payload: int = DEFAULT_MAX_PAYLOAD,
                 inline_max: int = 0) -> tuple[PayloadInfo, list[ModelChunk]]:
    """An encoded tensor as chunks that each encode to at most `max_payload` bytes, and the
    PayloadInfo (size, sha256, count) the announcement carries for them; with the whole
    payload inline too when it is at most `inline_max` bytes."""
    blob = msgpack.packb(tensor.to_wire(), use_bin_type=True)

    def make(index: int, count: int, data: bytes) -> ModelChunk:
        return ModelChunk(version=version, index=index, count=count, data=data)

    chunks = frame(blob, max_payload=max_payload, make=make)
    info = PayloadInfo(codec=tensor.codec, size=len(blob),
                       sha256=hashlib.sha256(blob).hexdigest(), chunks=len(chunks),
                       data=blob if len(blob) <= inline_max else b"")
    return info, chunks


def encode_model(params: np.ndarray, *, codec: str, version: int,
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[PayloadInfo, list[ModelChunk]]:
    return chunk_tensor(codecs.encode(params, codec), version=version, max_payload=max_payload)


@dataclass(frozen=True)
class ReceivedModel:
    announcement: ModelAnnouncement
    params: np.ndarray
    wire_bytes: int  # announcement + chunk bytes received for this version


FULL = "full"
DELTA = "delta"


class _ChunkSet:
    """Chunks of the newest version seen on one stream."""

    def __init__(self) -> None:
        self.version = -1
        self.chunks: dict[int, ModelChunk] = {}
        self.bytes = 0

    def add(self, chunk: ModelChunk, size: int) -> None:
        if chunk.version < self.version:
            return
        if chunk.version > self.version:
            self.__init__()
            self.version = chunk.version
        if chunk.index not in self.chunks:
            self.chunks[chunk.index] = chunk
            self.bytes += size

    def join(self, info: PayloadInfo, what: str) -> bytes | None:
        """The verified blob once all `info.chunks` are here, else None."""
        if len(self.chunks) < info.chunks:
            return None
        if any(c.count != info.chunks for c in self.chunks.values()):
            raise ProtocolError(f"{what}: chunk counts disagree with the announcement",
                                reason="bad_chunks")
        try:
            return join_verified((self.chunks[i].data for i in range(info.chunks)),
                                 size=info.size, sha256=bytes.fromhex(info.sha256), what=what)
        except ProtocolError:
            self.chunks.clear()
            raise


class ModelReceiver:
    """Assembles the newest announced model version from the chunks of one stream.

    A device that holds the announced delta's base version takes the small delta stream,
    any other the full payload; `wanted()` says which, so the caller subscribes to that
    stream only. Chunks may arrive before their announcement and in any order; only the
    newest version per stream is kept, so memory is bounded by one model.
    """

    def __init__(self) -> None:
        self.lineage_changes = 0  # times the aggregator was seen to start over
        self._forget()

    def _forget(self) -> None:
        """Hold nothing: no announcement, no chunks, no model."""
        self.announcement: ModelAnnouncement | None = None
        self._announcement_bytes = 0
        self._streams = {FULL: _ChunkSet(), DELTA: _ChunkSet()}
        self._delivered: tuple[int, int, str] | None = None
        self.held_version = -1
        self._held: np.ndarray | None = None

    def wanted(self) -> str | None:
        """The chunk stream the pending announcement needs, or None when nothing is pending
        or the payload it needs came inline."""
        stream = self._stream()
        if stream is None or self._info(stream).data:
            return None
        return stream

    def _stream(self) -> str | None:
        """Which payload the pending announcement needs (delta or full), if any."""
        a = self.announcement
        if a is None or a.key == self._delivered or a.version == self.held_version:
            return None
        if a.delta is not None and self._held is not None and self.held_version == a.delta_base:
            return DELTA
        return FULL

    def _info(self, stream: str) -> PayloadInfo:
        a = self.announcement
        assert a is not None
        info = a.delta if stream == DELTA else a.payload
        assert info is not None  # _stream() picks DELTA only when there is a delta
        return info

    def offer_announcement(
        self, announcement: ModelAnnouncement, size: int
    ) -> ReceivedModel | None:
        self._follow_lineage(announcement)
        current = self.announcement
        if current is not None and announcement.version < current.version:
            return None  # an older retained copy arriving late
        if current is not None and announcement.key == current.key:
            return None  # the same announcement again (a reconnect)
        self.announcement = announcement
        self._announcement_bytes = size
        return self._try_complete()

    def pass_over(self, announcement: ModelAnnouncement) -> bool:
        """Note an announcement this device sits out, downloading nothing for it (a pending
        download of an older version stops: superseded). False: older, or a repeat."""
        self._follow_lineage(announcement)
        current = self.announcement
        if current is not None and (announcement.version < current.version
                                    or announcement.key == current.key):
            return False
        self.announcement = announcement
        self._delivered = announcement.key  # nothing pending: wanted() is None
        return True

    def _follow_lineage(self, announcement: ModelAnnouncement) -> None:
        """A model of another lineage (the aggregator started over): forget what we hold
        and download, so its versions are neither refused as older nor taken as deltas of
        a model from another line."""
        current = self.announcement
        if current is None or current.lineage == announcement.lineage:
            return
        self._forget()
        self.lineage_changes += 1

    def offer_chunk(self, chunk: ModelChunk, size: int, stream: str = FULL) -> ReceivedModel | None:
        self._streams[stream].add(chunk, size)
        return self._try_complete()

    def _try_complete(self) -> ReceivedModel | None:
        a = self.announcement
        if a is None or a.key == self._delivered:
            return None
        if a.version == self.held_version and self._held is not None:
            # the model we hold, announced for a new round: nothing to download
            return self._deliver(a, self._held, 0)
        stream = self._stream()
        assert stream is not None
        info = self._info(stream)
        chunks = self._streams[stream]
        if info.data:
            blob = join_verified((info.data,), size=info.size, sha256=bytes.fromhex(info.sha256),
                                 what=f"model v{a.version} ({stream}, inline)")
            chunk_bytes = 0
        else:
            if chunks.version != a.version:
                return None
            blob = chunks.join(info, f"model v{a.version} ({stream})")
            if blob is None:
                return None
            chunk_bytes = chunks.bytes
        decoded = codecs.decode(EncodedTensor.from_wire(unpack(blob)))
        expected = ParamLayout.from_wire(a.layout).size
        if decoded.size != expected:
            raise ProtocolError(f"model v{a.version}: {decoded.size} parameters where the "
                                f"layout has {expected}", reason="bad_shape")
        params = self._held + decoded if stream == DELTA else decoded
        return self._deliver(a, params, chunk_bytes)

    def _deliver(self, a: ModelAnnouncement, params: np.ndarray, chunk_bytes: int
                 ) -> ReceivedModel:
        self._delivered = a.key
        self.held_version, self._held = a.version, params
        return ReceivedModel(a, params.copy(), self._announcement_bytes + chunk_bytes)
