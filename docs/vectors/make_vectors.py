"""Write fedmq's protocol conformance vectors (docs/vectors/*.json) from the implementation.

    python docs/vectors/make_vectors.py          # rewrite the files
    python docs/vectors/make_vectors.py --check  # exit 1 if the committed files differ

Every vector is built by fedmq's own encoders, so the files say what fedmq puts on the
wire; tests/test_vectors.py decodes them with fedmq and with an independent decoder
written from docs/protocol.md, and checks that this script still writes the committed
files. The format of the files is described in docs/vectors/README.md.

Inputs are chosen so that encoding does not depend on random draws (quantized values lie
on the quantization grid, top-k magnitudes are distinct), so the vectors are stable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedmq.core import codecs
from fedmq.core.chunking import frame
from fedmq.core.layout import ParamLayout
from fedmq.core.protocol import (
    PROTOCOL_VERSION,
    UPDATE_BUCKETS,
    AggregatorStatus,
    DecryptReply,
    DecryptRequest,
    DeviceStatus,
    EncodedTensor,
    EvalMetrics,
    EvalReport,
    FleetTopics,
    ModelAnnouncement,
    ModelChunk,
    Part,
    PayloadInfo,
    Receipt,
    TaskConfig,
    Update,
    update_bucket,
)
from fedmq.core.signing import SIGNED_CONTEXT, AnnouncementSigner, SignedAnnouncement
from fedmq.core.transfer import chunk_tensor

HERE = Path(__file__).resolve().parent
FLEET = "demo"
DEVICE = "dev-01"
TOPICS = FleetTopics(FLEET)
# Device ids whose update topics (layout 2: update/{bucket}/{id}) updates.json lists.
TOPIC_DEVICES = ("dev-01", "dev-02", "pi-1", "a", "x" * 64, "0")
# The test key: derived from this public phrase, so anyone can recompute it. NEVER use it
# (or anything derived from it) to sign a real model.
TEST_KEY_PHRASE = b"fedmq conformance vectors: TEST KEY, never use it to sign a real model"


# -- JSON forms ------------------------------------------------------------------------------

def f32_hex(values: np.ndarray) -> str:
    """float32 values as the hex of their little-endian bytes: exact, bit for bit."""
    return np.ascontiguousarray(values, dtype="<f4").tobytes().hex()


def f32_list(values: np.ndarray) -> list[float]:
    """float32 values as JSON numbers; each parses (as a double) to exactly that float32."""
    return [float(v) for v in np.asarray(values, dtype=np.float32).ravel()]


def jsonable(value: Any) -> Any:
    """A decoded msgpack value in JSON: bin becomes {"bin": hex}, everything else as is."""
    if isinstance(value, (bytes, bytearray)):
        return {"bin": bytes(value).hex()}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def unpacked(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=True)


def message_entry(name: str, payload: bytes, cls: type, *, topic: str,
                  note: str = "") -> dict[str, Any]:
    """A payload and what it decodes to (defaults filled in, unknown keys dropped)."""
    decoded = cls.from_payload(payload)
    canonical = decoded.to_payload()
    entry: dict[str, Any] = {"name": name, "kind": cls.KIND, "topic": topic}
    if note:
        entry["note"] = note
    entry.update(payload_hex=payload.hex(), decoded=jsonable(unpacked(canonical)),
                 reencode=canonical == payload)
    return entry


def topic(suffix: str) -> str:
    return f"fedmq/{FLEET}/{suffix}"


# -- codecs, inside Updates --------------------------------------------------------------------

def on_grid(codes: list[int], step: float) -> np.ndarray:
    """Values code x step: exactly on the quantization grid, so stochastic rounding keeps
    them whatever it draws (for a block whose largest |code| is the codec's L)."""
    return (np.array(codes, dtype=np.float32) * np.float32(step)).astype(np.float32)


def _codec_inputs() -> list[tuple[str, str, np.ndarray, str]]:
    """(vector name, codec, encoder input, what it shows)."""
    q8_block = on_grid([127, -64, 3, 0, -127, 1, 50, -1, 9, 100], 2.0**-6)
    q8_blocks = np.concatenate([
        on_grid([127, -127, 0, 1, -2, 64, -100, 5], 2.0**-7),
        on_grid([0, 0, 0, 0, 0, 0, 0, 0], 1.0),  # an all-zero block: scale 0
        on_grid([-127, 3, 126], 0.5),  # the last block is short: 3 values
    ])
    q4 = np.concatenate([on_grid([7, -7, 6, -6, 5, -5, 0, 1], 0.25),
                         on_grid([-7, 3, -3, 2, 4], 2.0**-10)])
    q2 = np.concatenate([on_grid([1, -1, 0, 1, 1, -1, 0, 0], 0.375),
                         on_grid([-1, 1, 0], 8.0)])
    sign = np.array([0.5, -1.25, 0.0, -0.0, 2.0, -0.125, 0.75, -3.0,  # block 0: mean 0.953125
                     1.5, -0.5, 0.25, -1.0, 0.0], dtype=np.float32)  # block 1: 5 values
    f32 = np.array([0.0, -0.0, 1.5, -2.25, 1e-8, 1e-40, 3.0e30, -7.0], dtype=np.float32)
    f16 = np.array([1.0, -0.5, 0.1, 65504.0, 70000.0, -1e6, 6e-8, 1e-9, 3.14159],
                   dtype=np.float32)
    sparse16 = np.array([0.1, -0.2, 5.0, 0.3, -0.4, 0.01, -6.0, 0.02, 0.0, 7.5, -0.03,
                         0.04, 0.05, -8.25, 0.06, 0.07], dtype=np.float32)
    sparse30 = np.zeros(30, dtype=np.float32)
    sparse30[[1, 2, 5, 9, 17, 18, 25, 28, 29]] = on_grid([127, -3, 64, -127, 10, 2, -50,
                                                          100, 127], 2.0**-3)
    sparse30[[0, 3, 4, 6]] = [0.01, -0.02, 0.03, -0.04]  # smaller: dropped
    sparse40 = np.zeros(40, dtype=np.float32)
    sparse40[[0, 13, 14, 39]] = on_grid([7, -7, 3, -1], 0.5)
    sparse20 = np.linspace(-1.0, 1.0, 20, dtype=np.float32) * np.float32(0.01)
    sparse20[[3, 7, 8, 19]] = [2.0, -4.0, 1.0, 0.5]
    wide = np.zeros(400, dtype=np.float32)  # gaps above 127: two-byte varints
    kept = [0, 1, 150, 151, 152, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310,
            390, 391, 398, 399]
    wide[kept] = on_grid([1, -1, 1, 1, -1, 1, -1, 1, 1, 1, -1, -1, 1, -1, 1, 1, -1, 1, 1, -1],
                         0.5)
    repetitive = np.tile(on_grid([127, 0, 0, -127, 0, 0, 5, 0], 2.0**-4), 16)
    noisy = on_grid(list(np.random.default_rng(7).integers(-127, 128, 24)), 2.0**-5)
    noisy[[0, 8, 16]] = on_grid([127, 127, 127], 2.0**-5)
    return [
        ("f32", "f32", f32, "little-endian IEEE binary32, as is (signed zero, subnormal)"),
        ("f16", "f16", f16, "binary16: rounded to nearest even, clipped to +-65504 first"),
        ("q8", "q8", q8_block, "one block of 256 (the default): one scale, int8 codes"),
        ("q8b8", "q8b8", q8_blocks, "3 blocks of 8: an all-zero block (scale 0), a short "
         "last block"),
        ("q4b8", "q4b8", q4, "codes + 7 in 4 bits, two per byte, low nibble first"),
        ("q2b8", "q2b8", q2, "codes + 1 in 2 bits, four per byte, lowest bits first"),
        ("signb8", "signb8", sign, "one bit per value, least significant bit first; "
         "scale = mean |x| of the block (of its 5 values for the short last block); "
         "0 and -0 give bit 1"),
        ("top-f32", "top0.25+f32", sparse16, "k = round(0.25 x 16) = 4; the first gap is "
         "counted from index -1"),
        ("top-q8b8", "top0.3+q8b8", sparse30, "k = 9 values, quantized in blocks of 8 of "
         "the kept values (not of the 30)"),
        ("top-q4", "top0.1+q4", sparse40, "first kept index 0: gap 0"),
        ("top-sign", "top0.2+sign", sparse20, "sign of the kept values; scale = their "
         "mean |x|"),
        ("top-q2b8-wide", "top0.05+q2b8", wide, "gaps of 148 and 89: two-byte LEB128 "
         "varints"),
        ("q8b8-zlib", "q8b8+zlib", repetitive, "zlib stream (RFC 1950) around the q8 bytes"),
        ("signb16-zstd", "signb16+zstd", np.tile(sign[:8], 40), "one zstd frame around "
         "the sign bytes"),
        ("q8b8-zlib-not-applied", "q8b8+zlib", noisy, "zlib would save under 10%: not "
         "applied, and the codec name says so"),
        ("f32-empty", "f32", np.zeros(0, np.float32), "no values: empty data"),
        ("top-q8-empty", "top0.1+q8", np.zeros(0, np.float32), "no values under a sparse "
         "codec: k = 0"),
    ]


def _handmade_tensors() -> list[tuple[str, EncodedTensor, str]]:
    """Payloads fedmq's encoder never writes but every decoder must read the same way."""
    scale = np.array([0.5], dtype="<f4").tobytes()
    return [
        ("q8b8-code-minus-128", EncodedTensor("q8b8", 3, scale + bytes([0x80, 0x7F, 0x00])),
         "int8 code -128 is read as -128 x scale"),
        ("q4b8-code-15", EncodedTensor("q4b8", 3, scale + bytes([0x0F, 0xF0])),
         "4-bit code 15 reads as +8 x scale; unused high bits of the last byte ignored"),
        ("q2b8-code-3", EncodedTensor("q2b8", 2, scale + bytes([0xF3])),
         "2-bit code 3 reads as +2 x scale; padding bits ignored"),
        ("signb8-padding-bits", EncodedTensor("signb8", 3, scale + bytes([0xFD])),
         "bits 3-7 of the last byte are padding, ignored"),
        ("q8-b256-written-out", EncodedTensor("q8b256", 2, scale + bytes([0x02, 0xFE])),
         "b256 may be written out; it is the default"),
        ("top-stages-any-order", EncodedTensor("f32+top0.5", 4, bytes([0x02, 0x01, 0x00])
                                               + np.array([1.5, -2], "<f4").tobytes()),
         "stages in another order; indices 1 and 2 kept"),
    ]


def _tensor_entry(name: str, tensor: EncodedTensor, *, note: str, index: int,
                  encoder_input: np.ndarray | None, rng_seed: int | None) -> dict[str, Any]:
    spec = codecs.parse_wire_spec(tensor.codec)
    raw = codecs.lossless.decompress(tensor.data, spec.lossless,
                                     limit=codecs.max_raw_size(spec, tensor.size))
    decoded = codecs.decode(tensor)
    update = Update(device_id=DEVICE, update_id=f"{index:08x}", round=3, base_version=2,
                    num_samples=120, loss=0.6931471805599453, delta=tensor,
                    layout_hash="9776d664", train_s=1.25, steps=4, complete=True)
    payload = update.to_payload()
    entry: dict[str, Any] = {
        "name": name, "note": note, "codec": tensor.codec, "size": tensor.size,
        "tensor_hex": msgpack.packb(tensor.to_wire(), use_bin_type=True).hex(),
        "data_hex": tensor.data.hex(), "raw_hex": raw.hex(),
        "decoded_f32": f32_hex(decoded), "decoded": f32_list(decoded),
    }
    if encoder_input is not None:
        entry.update(input_f32=f32_hex(encoder_input), input=f32_list(encoder_input),
                     rng_seed=rng_seed)
    entry["reencode"] = encoder_input is not None and spec.lossless == "none"
    entry["compressor_dependent"] = spec.lossless != "none"
    entry["update"] = message_entry(f"update-{name}", payload, Update,
                                    topic=TOPICS.update(DEVICE))
    return entry


def updates() -> dict[str, Any]:
    entries = []
    for index, (name, codec, values, note) in enumerate(_codec_inputs()):
        seed = 1000 + index
        tensor = codecs.encode(values, codec, rng=np.random.default_rng(seed))
        for stage in ("zlib", "zstd"):  # compressed exactly when the name says so
            assert (stage in tensor.codec) == (stage in codec and "not-applied" not in name)
        entries.append(_tensor_entry(name, tensor, note=note, index=index,
                                     encoder_input=values, rng_seed=seed))
    for offset, (name, tensor, note) in enumerate(_handmade_tensors()):
        entries.append(_tensor_entry(name, tensor, note=note, index=100 + offset,
                                     encoder_input=None, rng_seed=None))
    return {"about": "Updates (update/{bucket}/{device_id}) carrying one delta per codec; "
                     "`decoded` is the delta every receiver must get, bit for bit. "
                     "`update_topics`: a device's bucket is the first 4 bytes of "
                     "SHA-256(device id), big-endian, mod `buckets`.",
            "buckets": UPDATE_BUCKETS,
            "update_topics": [{"device": d, "bucket": update_bucket(d),
                               "topic": TOPICS.update(d)} for d in TOPIC_DEVICES],
            "vectors": entries}


# -- the other messages ----------------------------------------------------------------------

def _layout() -> ParamLayout:
    return ParamLayout((("w", (4, 3)), ("b", (3,))))


def _announcement(**changes: Any) -> ModelAnnouncement:
    blob = msgpack.packb(EncodedTensor("f32", 0, b"").to_wire(), use_bin_type=True)
    base: dict[str, Any] = dict(
        fleet=FLEET, version=2, round=3, model="logreg",
        model_config={"inputs": 4, "classes": 3}, layout=_layout().to_wire(),
        layout_hash=_layout().hash,
        task=TaskConfig(epochs=2, batch_size=16, lr=0.1, deadline_s=30.0, prox_mu=0.01,
                        time_budget_s=20.0, max_steps=50, codec="top0.1+q8"),
        payload=PayloadInfo(codec="f32", size=len(blob),
                            sha256=hashlib.sha256(blob).hexdigest(), chunks=1),
        announce_id="0123456789ab", issued_at=1700000000.5, lineage="a1b2c3d4e5f6")
    base.update(changes)
    return ModelAnnouncement(**base)


def _rich_announcement() -> ModelAnnouncement:
    return _announcement(
        cohort=["dev-01", "dev-02", "dev-03"],
        tiers=[TaskConfig(epochs=1, batch_size=8, codec="top0.02+sign+zlib")],
        assign={"dev-02": 0},
        delta=PayloadInfo(codec="q8", size=40, sha256="ab" * 32, chunks=2), delta_base=1)


def _decrypt_request() -> DecryptRequest:
    return DecryptRequest(lineage="a1b2c3d4e5f6", round=3, key="00112233aabbccdd", size=2,
                          count=2, devices=["dev-01", "dev-02"],
                          ciphertexts=[b"stand-in ciphertext"])


def _handmade(fields: dict[str, Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def messages() -> dict[str, Any]:
    update = Update(device_id=DEVICE, update_id="5eed0001", round=3, base_version=2,
                    num_samples=64, loss=1.5,
                    delta=codecs.encode(np.array([0.5, -0.25], np.float32), "f32"),
                    layout_hash=_layout().hash, train_s=0.75, steps=4, complete=False)
    minimal_update = {"dev": DEVICE, "id": "x", "r": 0, "bv": 0, "ns": 1, "l": 2,
                      "x": {"c": "f32", "n": 0, "d": b""}, "zz": "a key nobody knows",
                      "$v": PROTOCOL_VERSION, "$k": "upd"}
    minimal_model = {"$k": "model", "$v": PROTOCOL_VERSION, "f": FLEET, "v": 0, "r": 1,
                     "m": "logreg", "mc": {"inputs": 4, "classes": 3}, "lay": _layout().to_wire(),
                     "lh": _layout().hash, "t": {},
                     "p": {"c": "f32", "n": 0, "h": hashlib.sha256(b"").hexdigest()}}
    entries = [
        message_entry("model", _announcement().to_payload(), ModelAnnouncement,
                      topic=topic("model/current")),
        message_entry("model-cohort-tiers-delta", _rich_announcement().to_payload(),
                      ModelAnnouncement, topic=topic("model/current")),
        message_entry("model-minimal", _handmade(minimal_model), ModelAnnouncement,
                      topic=topic("model/current"),
                      note="only the required keys, envelope first: every other field "
                           "takes its default; TaskConfig `t` may be an empty map"),
        message_entry("mchunk", ModelChunk(version=2, index=1, count=3,
                                           data=bytes(range(10))).to_payload(),
                      ModelChunk, topic=topic("model/payload/1")),
        message_entry("part", Part(transfer_id=bytes.fromhex("0011223344556677"), index=0,
                                   count=2, size=20, sha256=hashlib.sha256(b"x" * 20).digest(),
                                   data=b"x" * 10).to_payload(),
                      Part, topic=TOPICS.update(DEVICE)),
        message_entry("upd", update.to_payload(), Update, topic=TOPICS.update(DEVICE)),
        message_entry("upd-minimal", _handmade(minimal_update), Update,
                      topic=TOPICS.update(DEVICE),
                      note="required keys only, an integer for the float `l`, and an "
                           "unknown key `zz` (ignored)"),
        message_entry("eval", EvalReport(
            device_id=DEVICE, round=3, version=2, num_samples=40,
            metrics=EvalMetrics(loss=1.25, accuracy=0.625)).to_payload(),
            EvalReport, topic=TOPICS.update(DEVICE),
            note="federated evaluation: the device scored model v2 on 40 held-out examples"),
        message_entry("eval-personal", EvalReport(
            device_id=DEVICE, round=3, version=2, num_samples=40,
            metrics=EvalMetrics(loss=1.25, accuracy=0.625),
            personal=EvalMetrics(loss=0.5, accuracy=0.875), eval_s=0.5).to_payload(),
            EvalReport, topic=TOPICS.update(DEVICE),
            note="with `p`: the same examples scored by the device's personalized model"),
        message_entry("model-evaluate-personal", dataclasses.replace(
            _announcement(), evaluate=0.25, personal=("out.*",), finetune_steps=20
        ).to_payload(), ModelAnnouncement, topic=topic("model/current"),
            note="`ev`, `pl` and `ft` are left out of every announcement that does not "
                 "set them"),
        message_entry("model-personal-fedrep", dataclasses.replace(
            _announcement(), evaluate=0.25, personal=("out.*",), finetune_steps=20,
            finetune_lr=0.1, finetune_check=5, personal_steps=20
        ).to_payload(), ModelAnnouncement, topic=topic("model/current"),
            note="FedRep (`ps`) with checked fine-tuning at its own rate (`fl`, `fc`); "
                 "all three are left out when 0"),
        message_entry("rcpt-accepted", Receipt(update_id="5eed0001", round=3,
                                               status="accepted").to_payload(),
                      Receipt, topic=topic(f"receipt/{DEVICE}")),
        message_entry("rcpt-rejected", Receipt(update_id="5eed0002", round=3, status="rejected",
                                               reason="stale_round").to_payload(),
                      Receipt, topic=topic(f"receipt/{DEVICE}")),
        message_entry("dev-birth", DeviceStatus(
            device_id=DEVICE, online=True,
            capabilities={"cpus": 4, "ram_mb": 3906, "backends": ["numpy"],
                          "codecs": ["float32", "q8"], "zstd": False, "arch": "aarch64",
                          "python": "3.11.2", "battery": False, "link_kbps": 250},
            agent_version="0.1.0", ts=1700000001.25).to_payload(),
            DeviceStatus, topic=topic(f"device/{DEVICE}/status")),
        message_entry("dev-will", DeviceStatus(device_id=DEVICE, online=False).to_payload(),
                      DeviceStatus, topic=topic(f"device/{DEVICE}/status")),
        message_entry("agg", AggregatorStatus(online=True, round=3, version=2,
                                              ts=1700000002.0).to_payload(),
                      AggregatorStatus, topic=topic("aggregator/status")),
        message_entry("he.req", _decrypt_request().to_payload(), DecryptRequest,
                      topic=TOPICS.he_decrypt,
                      note="he = ckks: the aggregator asks the key holder to decrypt round "
                           "3's sum of 2 updates; `ct` holds stand-in bytes where real "
                           "TenSEAL ciphertexts would be"),
        message_entry("he.sum", DecryptReply(
            lineage="a1b2c3d4e5f6", round=3, digest=_decrypt_request().digest(),
            status="ok", weighted=np.array([0.5, -0.25], "<f8").tobytes(),
            weight=64.0).to_payload(), DecryptReply, topic=TOPICS.he_sum,
            note="the key holder's answer: `h` is the SHA-256 over the request's "
                 "ciphertexts (each prefixed by its 8-byte big-endian length), `s` the "
                 "weighted sum as float64 little-endian, `w` the total weight"),
        message_entry("he.sum-refused", DecryptReply(
            lineage="a1b2c3d4e5f6", round=2, digest=_decrypt_request().digest(),
            status="refused", reason="replayed",
            message="round 3 was decrypted already").to_payload(), DecryptReply,
            topic=TOPICS.he_sum, note="a refusal: a reason token and a message, no sum"),
    ]
    return {"about": "One payload per message kind, with what it decodes to.",
            "vectors": entries}


# -- payloads split into pieces ----------------------------------------------------------------

def _split(payload: bytes, max_payload: int, transfer_id: bytes) -> list[bytes]:
    """chunking.split_payload with a fixed transfer id instead of a random one."""
    digest = hashlib.sha256(payload).digest()

    def make(index: int, count: int, data: bytes) -> Part:
        return Part(transfer_id=transfer_id, index=index, count=count, size=len(payload),
                    sha256=digest, data=data)

    return [p.to_payload() for p in frame(payload, max_payload=max_payload, make=make)]


def parts() -> dict[str, Any]:
    entries = []
    for name, size, max_payload in (("five-parts", 48, 128), ("one-byte-tail", 25, 110)):
        delta = on_grid(list(range(-size // 2, size - size // 2)), 0.125)
        update = Update(device_id=DEVICE, update_id=f"{size:08x}", round=7, base_version=6,
                        num_samples=32, loss=0.25, delta=codecs.encode(delta, "f32"),
                        layout_hash="9776d664")
        payload = update.to_payload()
        pieces = _split(payload, max_payload, bytes.fromhex("a0a1a2a3a4a5a6a7"))
        assert all(len(p) <= max_payload for p in pieces) and len(pieces) > 1
        entries.append({
            "name": name, "topic": TOPICS.update(DEVICE), "max_payload": max_payload,
            "parts_hex": [p.hex() for p in pieces],
            "parts": [jsonable(unpacked(p)) for p in pieces],
            "payload_hex": payload.hex(), "sha256": hashlib.sha256(payload).hexdigest(),
            "update": jsonable(unpacked(payload)), "delta_decoded": f32_list(delta),
        })
    return {"about": "Updates too big for max_payload, as Parts (any arrival order); "
                     "joined in index order they are `payload_hex`.", "vectors": entries}


# -- model transfer: chunks, inline, delta -------------------------------------------------------

def _transfer(name: str, params: np.ndarray, codec: str, *, max_payload: int,
              inline: bool, note: str, base: np.ndarray | None = None) -> dict[str, Any]:
    layout = _layout()
    tensor = codecs.encode(params if base is None else params - base, codec,
                           rng=np.random.default_rng(5))
    info, chunks = chunk_tensor(tensor, version=2, max_payload=max_payload,
                                inline_max=1 << 20 if inline else 0)
    stream = "payload" if base is None else "delta"
    if base is None:
        announcement = _announcement(payload=info)
    else:
        full, _ = chunk_tensor(codecs.encode(params, "f32"), version=2,
                               max_payload=max_payload)
        announcement = _announcement(payload=full, delta=info, delta_base=1)
    blob = msgpack.packb(tensor.to_wire(), use_bin_type=True)
    decoded = codecs.decode(tensor)
    result = decoded if base is None else base + decoded
    entry: dict[str, Any] = {
        "name": name, "note": note, "layout": layout.to_wire(), "layout_hash": layout.hash,
        "announcement": message_entry(f"{name}-announcement", announcement.to_payload(),
                                      ModelAnnouncement, topic=topic("model/current")),
        "stream": stream,
        "chunks": [message_entry(f"{name}-chunk-{c.index}", c.to_payload(), ModelChunk,
                                 topic=topic(f"model/{stream}/{c.index}")) for c in chunks],
        "blob_hex": blob.hex(), "blob_sha256": hashlib.sha256(blob).hexdigest(),
        "tensor": jsonable(tensor.to_wire()), "decoded_f32": f32_hex(decoded),
    }
    if base is not None:
        entry.update(base_version=1, base_f32=f32_hex(base), base=f32_list(base))
    entry.update(params_f32=f32_hex(result), params=f32_list(result),
                 max_payload=max_payload)
    return entry


def model_transfer() -> dict[str, Any]:
    params = on_grid([10, -20, 30, -40, 50, -60, 70, -80, 90, -100, 110, -127, 1, 2, 3],
                     2.0**-8)
    base = on_grid([0, -16, 32, -48, 48, -64, 64, -80, 96, -96, 112, -128, 0, 0, 0], 2.0**-8)
    return {"about": "A model announcement and the chunks it points to; `params` is the "
                     "model a device holds afterwards (named tensors split by `layout`).",
            "vectors": [
                _transfer("full-chunked", params, "f32", max_payload=60, inline=False,
                          note="f32 model in 3 chunks on model/payload/{i}"),
                _transfer("full-inline", params, "q8b8", max_payload=4096, inline=True,
                          note="q8 model inline in p.d (the chunk is published too)"),
                _transfer("delta-chunked", params, "q8b8", max_payload=60, inline=False,
                          base=base, note="a device holding version 1 (`base`) takes the "
                          "q8 delta on model/delta/{i}: params = base + decoded delta "
                          "(float32 addition)"),
            ]}


# -- signed announcements -------------------------------------------------------------------------

def _test_key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(TEST_KEY_PHRASE).digest())


def signed() -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization as s

    key = _test_key()
    public = key.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    signer = AnnouncementSigner(key)
    announcement = _announcement()
    sealed = signer.seal(announcement)
    wrapper = SignedAnnouncement.from_payload(sealed)
    tampered_body = bytearray(wrapper.announcement)
    tampered_body[tampered_body.index(b"logreg")] ^= 0x01  # "logreg" -> "mogreg"
    tampered = SignedAnnouncement(announcement=bytes(tampered_body),
                                  signature=wrapper.signature, key_id=wrapper.key_id)
    other = SignedAnnouncement(announcement=wrapper.announcement,
                               signature=wrapper.signature, key_id="0" * 16)
    return {
        "about": "Signed announcements (smodel) under a TEST key. The private key is "
                 "published here on purpose: never use it, or any key derived from it, "
                 "to sign a real model.",
        "test_key": {
            "WARNING": "TEST KEY ONLY - its private half is public",
            "private_seed_hex": hashlib.sha256(TEST_KEY_PHRASE).hexdigest(),
            "derived_from": "SHA-256 of the ASCII phrase " + TEST_KEY_PHRASE.decode(),
            "public_key_hex": public.hex(), "key_id": signer.key_id,
        },
        "context_hex": SIGNED_CONTEXT.hex(),
        "vectors": [
            dict(message_entry("signed", sealed, SignedAnnouncement,
                               topic=topic("model/current")),
                 expect="valid", announcement=jsonable(unpacked(wrapper.announcement))),
            dict(message_entry("tampered", tampered.to_payload(), SignedAnnouncement,
                               topic=topic("model/current")),
                 expect="bad_signature",
                 note="one bit of `a` flipped after signing"),
            dict(message_entry("other-key-id", other.to_payload(), SignedAnnouncement,
                               topic=topic("model/current")),
                 expect="wrong_key", note="kid is not the test key's"),
            dict(message_entry("unsigned", announcement.to_payload(), ModelAnnouncement,
                               topic=topic("model/current")),
                 expect="unsigned", note="a device that has the public key refuses it"),
        ],
    }


# -- payloads every receiver must refuse -----------------------------------------------------------

def invalid() -> dict[str, Any]:
    good = unpacked(Update(device_id=DEVICE, update_id="bad00000", round=3, base_version=2,
                           num_samples=8, loss=1.0,
                           delta=codecs.encode(np.ones(4, np.float32), "q8b8"),
                           layout_hash=_layout().hash).to_payload())
    scale = np.array([0.5], "<f4").tobytes()

    def upd(**changes: Any) -> bytes:
        return _handmade({**good, **changes})

    def tensor(codec: str, size: int, data: bytes) -> bytes:
        return upd(x={"c": codec, "n": size, "d": data})

    rows = [
        ("not-msgpack", b"\xc1", "message", "malformed"),
        ("not-a-map", _handmade([1, 2]), "message", "malformed"),
        ("version-1", upd(**{"$v": 1}), "message", "bad_version"),
        ("version-3", upd(**{"$v": 3}), "message", "bad_version"),
        ("version-true", upd(**{"$v": True}), "message", "bad_version"),
        ("version-float", upd(**{"$v": float(PROTOCOL_VERSION)}), "message", "bad_version"),
        ("kind-model-on-update-topic", upd(**{"$k": "model"}), "message", "wrong_kind"),
        ("missing-ns", _handmade({k: v for k, v in good.items() if k != "ns"}), "message",
         "malformed"),
        ("bool-for-int", upd(r=True), "message", "malformed"),
        ("float-for-int", upd(r=3.0), "message", "malformed"),
        ("str-for-bin", upd(x={"c": "f32", "n": 0, "d": ""}), "message", "malformed"),
        ("zero-samples", upd(ns=0), "message", "bad_samples"),
        ("nan-loss", upd(l=float("nan")), "message", "non_finite"),
        ("bad-device-id", upd(dev="a/b"), "message", "bad_field"),
        ("q8-short", tensor("q8b8", 4, scale + b"\x01\x02\x03"), "delta", "truncated"),
        ("q4-long", tensor("q4b8", 4, scale + b"\x00\x00\x00"), "delta", "truncated"),
        ("unknown-codec", tensor("q3", 4, scale + bytes(4)), "delta", "unknown_codec"),
        ("auto-on-the-wire", tensor("q8+auto", 4, scale + bytes(4)), "delta",
         "unknown_codec"),
        ("nan-scale", tensor("q8b8", 4, np.array([np.nan], "<f4").tobytes() + bytes(4)),
         "delta", "non_finite"),
        ("negative-scale", tensor("q8b8", 4, np.array([-1], "<f4").tobytes() + bytes(4)),
         "delta", "non_finite"),
        ("inf-value", tensor("f32", 4, np.array([0, np.inf, 0, 0], "<f4").tobytes()), "delta",
         "non_finite"),
        ("huge-value", tensor("f32", 4, np.array([0, 0, 1e33, 0], "<f4").tobytes()), "delta",
         "out_of_range"),
        ("top-k-zero", tensor("top0.5+f32", 4, b"\x00"), "delta", "malformed"),
        ("top-k-above-size", tensor("top0.5+f32", 4, b"\x05" + bytes(5) + bytes(20)),
         "delta", "malformed"),
        ("top-index-out-of-range", tensor("top0.5+f32", 4, b"\x01\x04" + bytes(4)), "delta",
         "malformed"),
        ("varint-6-bytes", tensor("top0.5+f32", 4, b"\x81\x80\x80\x80\x80\x00"), "delta",
         "malformed"),
        ("zlib-garbage", tensor("f32+zlib", 4, b"\x00\x01\x02"), "delta", "malformed"),
        ("wrong-size-for-model", tensor("f32", 3, bytes(12)), "delta", "bad_shape"),
    ]
    return {"about": "Payloads on update/{bucket}/{device_id} every receiver must refuse, with the "
                     "reason token. `stage`: `message` fails when the Update is decoded, "
                     "`delta` when its delta is decoded into a model of `model_size` values.",
            "model_size": 4,
            "vectors": [{"name": n, "payload_hex": p.hex(), "stage": stage, "reason": r}
                        for n, p, stage, r in rows]}


# -- layouts and models ----------------------------------------------------------------------------

MODEL_CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("logreg-digits", "logreg", {"inputs": 64, "classes": 10}),
    ("mlp-digits", "mlp", {"inputs": 64, "classes": 10, "hidden": 64}),
    ("char_gru-keyboard", "char_gru", {"embed": 8, "hidden": 128, "layers": 1, "seq_len": 64,
                                       "threads": 1, "vocab": 96}),
    ("char_gru-lstm-2-layers", "char_gru", {"vocab": 96, "seq_len": 64, "cell": "lstm",
                                            "layers": 2}),
    ("har_cnn-sensor", "har_cnn", {"channels": 6, "classes": 4, "steps": 40, "threads": 1,
                                   "width": 16}),
]


def layouts() -> dict[str, Any]:
    from fedmq.models import build_model

    entries = []
    for name, model, config in MODEL_CONFIGS:
        layout = build_model(model, config).layout
        canonical = json.dumps(layout.to_wire(), separators=(",", ":"))
        entries.append({"name": name, "model": model, "model_config": config,
                        "layout": layout.to_wire(), "canonical_json": canonical,
                        "layout_hash": layout.hash, "parameters": layout.size})
    odd = ParamLayout((("é \"x\"\\", (2, 0)), ("", ())))
    entries.append({"name": "escaping", "model": None, "model_config": None,
                    "layout": odd.to_wire(),
                    "canonical_json": json.dumps(odd.to_wire(), separators=(",", ":")),
                    "layout_hash": odd.hash, "parameters": odd.size})
    return {"about": "Parameter layouts and their hashes (lh).", "vectors": entries}


# Small configs: a forward pass a test can recompute in a few lines of numpy.
FORWARD_CONFIGS: list[tuple[str, str, dict[str, Any], tuple[int, ...], str]] = [
    ("logreg", "logreg", {"inputs": 5, "classes": 3}, (5,), "float32"),
    ("mlp", "mlp", {"inputs": 5, "classes": 3, "hidden": 4}, (5,), "float32"),
    ("char_gru", "char_gru", {"vocab": 7, "seq_len": 5, "embed": 3, "hidden": 4}, (5,),
     "int64"),
    ("char_gru-lstm-2-layers", "char_gru", {"vocab": 7, "seq_len": 4, "embed": 3, "hidden": 4,
                                            "layers": 2, "cell": "lstm"}, (4,), "int64"),
    ("har_cnn", "har_cnn", {"channels": 2, "steps": 9, "classes": 3, "width": 2}, (2, 9),
     "float32"),
]
FORWARD_TOLERANCE = 1e-5


def _logits(model: Any, x: np.ndarray) -> np.ndarray:
    if hasattr(model, "predict_logits"):
        return model.predict_logits(x)
    return model._logits(x)


def models() -> dict[str, Any]:
    from fedmq.models import build_model

    entries = []
    for index, (name, model_name, config, shape, dtype) in enumerate(FORWARD_CONFIGS):
        rng = np.random.default_rng(300 + index)
        model = build_model(model_name, config)
        params = (rng.integers(-64, 65, model.layout.size) / 64).astype(np.float32)
        model.set_flat(params)
        if dtype == "int64":
            x = rng.integers(0, config["vocab"], (3, *shape)).astype(np.int64)
            x_json: Any = x.tolist()
        else:
            x = (rng.integers(-32, 33, (3, *shape)) / 16).astype(np.float32)
            x_json = f32_list(x)
        logits = _logits(model, x).astype(np.float32)
        entries.append({
            "name": name, "model": model_name, "model_config": config,
            "layout": model.layout.to_wire(), "layout_hash": model.layout.hash,
            "params": f32_list(params), "input_shape": [3, *shape], "input_dtype": dtype,
            "input": x_json, "logits": f32_list(logits), "tolerance": FORWARD_TOLERANCE,
        })
    return {"about": "Forward passes: `params` (the flat vector, split by `layout`) on a "
                     "batch of 3 `input` examples (row-major, shape `input_shape`) give "
                     "`logits` (3 x classes, row-major), within `tolerance`.",
            "vectors": entries}


def preprocessing() -> dict[str, Any]:
    from fedmq.tasks import keyboard, sensor

    text = "To be, or not\tto be: thaté\u2014 ~"
    ids = keyboard.encode(text)
    window = (np.arange(sensor.CHANNELS * sensor.WINDOW, dtype=np.float32) % 7 - 3) / 4
    window = window.reshape(1, sensor.CHANNELS, sensor.WINDOW)
    window[0, 1] = np.linspace(-1, 1, sensor.WINDOW, dtype=np.float32)
    features = sensor.features(window)
    x, y = keyboard.windows(keyboard.encode("abcdefgh"), seq_len=5)
    folder = sensor.data_dir()
    raw, _ = sensor.parse_arff((folder / "BasicMotions_TRAIN.arff").read_text(encoding="utf-8"))
    return {
        "about": "Input preprocessing of the tasks' data on a device.",
        "keyboard_encode": {"text": text, "ids": ids.tolist()},
        "keyboard_windows": {"text": "abcdefgh", "seq_len": 5, "x": x.tolist(),
                             "y": y.tolist()},
        "sensor_features": {"window": f32_list(window), "shape": [1, sensor.CHANNELS,
                                                                  sensor.WINDOW],
                            "features": f32_list(features), "tolerance": 1e-6},
        "sensor_standardisation": {
            "note": "per channel over the 40 training recordings of BasicMotions (all "
                    "steps), float32; std without Bessel's correction",
            "mean": f32_list(raw.mean(axis=(0, 2))), "std": f32_list(raw.std(axis=(0, 2))),
            "tolerance": 1e-6},
    }


FILES = {
    "updates.json": updates, "messages.json": messages, "parts.json": parts,
    "model_transfer.json": model_transfer, "signed.json": signed, "invalid.json": invalid,
    "layouts.json": layouts, "models.json": models, "preprocessing.json": preprocessing,
}


def dump(value: Any, indent: str = "") -> str:
    """JSON with one line per list or map of scalars: diffs stay readable, files short."""
    inner = indent + " "
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {dump(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + dump(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def build() -> dict[str, str]:
    """File name -> its text."""
    return {name: dump(make()) + "\n" for name, make in FILES.items()}


def main(argv: list[str]) -> int:
    built = build()
    if "--check" in argv:
        stale = [n for n, text in built.items()
                 if not (HERE / n).is_file() or (HERE / n).read_text(encoding="utf-8") != text]
        for name in stale:
            print(f"docs/vectors/{name} differs from what make_vectors.py writes")
        return 1 if stale else 0
    for name, text in built.items():
        (HERE / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(built)} files to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
