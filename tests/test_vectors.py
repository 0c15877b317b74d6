"""The conformance vectors in docs/vectors/ against the implementation, and against an
independent decoder written from docs/protocol.md alone (the `doc_*` functions below
import nothing from fedmq), so the document is shown to be enough to interoperate.
Also checks that docs/vectors/make_vectors.py still writes the committed files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

VECTORS = Path(__file__).resolve().parent.parent / "docs" / "vectors"


def load(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def vectors(name: str) -> list[dict[str, Any]]:
    return load(name)["vectors"]


def ids(name: str) -> list[str]:
    return [v["name"] for v in vectors(name)]


def f32(hex_text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_text), dtype="<f4")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"bin": bytes(value).hex()}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def needs_compressor(vector: dict[str, Any]) -> None:
    if "zstd" in vector["codec"]:
        pytest.importorskip("zstandard")


# ---------------------------------------------------------------------------------------------
# The committed files are what the generator writes
# ---------------------------------------------------------------------------------------------

def _generator():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same(expected: Any, actual: Any, where: str, tolerance: float | None = None) -> None:
    """Equal, except numbers under a `tolerance` (forward passes, float32 reductions: the
    last bits depend on the BLAS and CPU) and compressor output (bytes vary by version)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), where
        tolerance = expected.get("tolerance", tolerance)
        skip = {"data_hex", "tensor_hex", "payload_hex"} if expected.get(
            "compressor_dependent") else set()
        for key in expected:
            if key not in skip:
                _same(expected[key], actual[key], f"{where}.{key}", tolerance)
        return
    if isinstance(expected, list):
        assert isinstance(actual, list) and len(expected) == len(actual), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _same(e, a, f"{where}[{i}]", tolerance)
        return
    if tolerance is not None and isinstance(expected, float):
        assert math.isclose(expected, actual, rel_tol=tolerance, abs_tol=tolerance), where
        return
    assert expected == actual, where


def test_the_committed_vectors_are_what_the_generator_writes():
    pytest.importorskip("torch")
    pytest.importorskip("cryptography")
    pytest.importorskip("zstandard")
    pytest.importorskip("pyts")
    built = _generator().build()
    assert sorted(built) == sorted(p.name for p in VECTORS.glob("*.json"))
    for name, text in built.items():
        _same(load(name), json.loads(text), name)


# ---------------------------------------------------------------------------------------------
# fedmq decodes every vector to the expected content, and re-encodes it byte for byte
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vector", vectors("updates.json"), ids=ids("updates.json"))
def test_fedmq_decodes_every_codec_vector(vector):
    from fedmq.core import codecs
    from fedmq.core.protocol import Update

    needs_compressor(vector)
    update = Update.from_payload(bytes.fromhex(vector["update"]["payload_hex"]))
    assert update.delta.codec == vector["codec"] and update.delta.size == vector["size"]
    assert update.delta.data.hex() == vector["data_hex"]
    decoded = codecs.decode(update.delta)
    assert same_bits(decoded, f32(vector["decoded_f32"]))
    assert same_bits(decoded, np.array(vector["decoded"], dtype=np.float32))
    assert jsonable(msgpack.unpackb(update.to_payload())) == vector["update"]["decoded"]
    if vector["update"]["reencode"]:
        assert update.to_payload().hex() == vector["update"]["payload_hex"]


@pytest.mark.parametrize("vector", [v for v in vectors("updates.json") if v["reencode"]],
                         ids=[v["name"] for v in vectors("updates.json") if v["reencode"]])
def test_fedmq_encodes_every_codec_vector_input_to_its_bytes(vector):
    from fedmq.core import codecs

    tensor = codecs.encode(f32(vector["input_f32"]), vector["codec"],
                           rng=np.random.default_rng(vector["rng_seed"]))
    assert (tensor.codec, tensor.size, tensor.data.hex()) == (
        vector["codec"], vector["size"], vector["data_hex"])


@pytest.mark.parametrize("vector", vectors("messages.json"), ids=ids("messages.json"))
def test_fedmq_decodes_every_message_vector(vector):
    from fedmq.core.protocol import wire
    from fedmq.core.signing import SignedAnnouncement

    kinds = {cls.KIND: cls for cls in (*_message_classes(), SignedAnnouncement)}
    payload = bytes.fromhex(vector["payload_hex"])
    message = wire.decode_any(payload, kinds[vector["kind"]])
    canonical = message.to_payload()
    assert jsonable(msgpack.unpackb(canonical)) == vector["decoded"]
    assert (canonical == payload) == vector["reencode"]


def _message_classes():
    from fedmq.core import protocol

    return (protocol.ModelAnnouncement, protocol.ModelChunk, protocol.Part, protocol.Update,
            protocol.Receipt, protocol.DeviceStatus, protocol.AggregatorStatus,
            protocol.EvalReport, protocol.DecryptRequest, protocol.DecryptReply)


@pytest.mark.parametrize("vector", vectors("parts.json"), ids=ids("parts.json"))
def test_fedmq_reassembles_parts_after_the_first_in_any_order(vector):
    from fedmq.core import codecs
    from fedmq.core.chunking import Reassembler
    from fedmq.core.protocol import Part, Update

    pieces = [bytes.fromhex(p) for p in vector["parts_hex"]]
    assert all(len(p) <= vector["max_payload"] for p in pieces)
    reassembler = Reassembler(timeout_s=60, max_pending_bytes=1 << 20)
    # a transfer opens at its part 0 (docs/protocol.md, Updates); the rest in any order
    results = [reassembler.offer("dev-01", Part.from_payload(p), 0.0)
               for p in [pieces[0], *reversed(pieces[1:])]]
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert results[-1].payload.hex() == vector["payload_hex"]
    update = Update.from_payload(results[-1].payload)
    assert codecs.decode(update.delta).tolist() == vector["delta_decoded"]


@pytest.mark.parametrize("vector", vectors("model_transfer.json"),
                         ids=ids("model_transfer.json"))
def test_fedmq_receives_every_model_transfer_vector(vector):
    from fedmq.core import codecs
    from fedmq.core.protocol import ModelAnnouncement, ModelChunk
    from fedmq.core.transfer import DELTA, FULL, ModelReceiver, chunk_tensor

    announcement = ModelAnnouncement.from_payload(
        bytes.fromhex(vector["announcement"]["payload_hex"]))
    receiver = ModelReceiver()
    if vector["stream"] == "delta":  # first hold the base version, as a device would
        info, _ = chunk_tensor(codecs.encode(f32(vector["base_f32"]), "f32"), version=1,
                               inline_max=1 << 20)
        base = ModelAnnouncement.from_wire(
            {**announcement.to_wire(), "v": 1, "r": 2, "dp": None, "db": -1,
             "p": info.to_wire()})
        assert receiver.offer_announcement(base, 0) is not None
    received = receiver.offer_announcement(announcement, 0)
    if received is None:
        assert receiver.wanted() == (DELTA if vector["stream"] == "delta" else FULL)
        for chunk in reversed(vector["chunks"]):
            received = receiver.offer_chunk(
                ModelChunk.from_payload(bytes.fromhex(chunk["payload_hex"])), 0,
                receiver.wanted())
    assert received is not None
    assert same_bits(received.params, f32(vector["params_f32"]))


@pytest.mark.parametrize("vector", vectors("signed.json"), ids=ids("signed.json"))
def test_fedmq_opens_every_signed_vector_with_the_test_key(vector):
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from fedmq.core.signing import AnnouncementOpener
    from fedmq.errors import ProtocolError

    key = load("signed.json")["test_key"]
    opener = AnnouncementOpener(Ed25519PublicKey.from_public_bytes(
        bytes.fromhex(key["public_key_hex"])))
    assert opener.key_id == key["key_id"]
    payload = bytes.fromhex(vector["payload_hex"])
    if vector["expect"] == "valid":
        announcement = opener.open(payload)
        assert jsonable(msgpack.unpackb(announcement.to_payload())) == vector["announcement"]
    else:
        with pytest.raises(ProtocolError) as info:
            opener.open(payload)
        assert info.value.reason == vector["expect"]


@pytest.mark.parametrize("vector", vectors("invalid.json"), ids=ids("invalid.json"))
def test_fedmq_refuses_every_invalid_vector_with_its_reason(vector):
    from fedmq.core import codecs
    from fedmq.core.protocol import Update
    from fedmq.errors import FedmqError

    payload = bytes.fromhex(vector["payload_hex"])
    with pytest.raises(FedmqError) as info:
        update = Update.from_payload(payload)
        assert vector["stage"] == "delta", "the message should not have decoded"
        codecs.decode_into(update.delta, np.zeros(load("invalid.json")["model_size"],
                                                  np.float32))
    assert info.value.reason == vector["reason"]


@pytest.mark.parametrize("vector", vectors("layouts.json"), ids=ids("layouts.json"))
def test_fedmq_layout_hashes(vector):
    from fedmq.core.layout import ParamLayout

    layout = ParamLayout.from_wire(vector["layout"])
    assert layout.hash == vector["layout_hash"] and layout.size == vector["parameters"]
    if vector["model"] is not None:
        if vector["model"] in ("char_gru", "har_cnn"):
            pytest.importorskip("torch")
        from fedmq.models import build_model

        assert build_model(vector["model"], vector["model_config"]).layout == layout


@pytest.mark.parametrize("vector", vectors("models.json"), ids=ids("models.json"))
def test_fedmq_forward_passes(vector):
    from fedmq.models import build_model

    if vector["model"] in ("char_gru", "har_cnn"):
        pytest.importorskip("torch")
    model = build_model(vector["model"], vector["model_config"])
    model.set_flat(np.array(vector["params"], np.float32))
    x = np.array(vector["input"], dtype=vector["input_dtype"]).reshape(vector["input_shape"])
    logits = model.predict_logits(x) if hasattr(model, "predict_logits") else model._logits(x)
    assert np.allclose(logits.ravel(), vector["logits"], rtol=vector["tolerance"],
                       atol=vector["tolerance"])


def test_fedmq_preprocessing():
    from fedmq.tasks import keyboard, sensor

    vector = load("preprocessing.json")
    encode = vector["keyboard_encode"]
    assert keyboard.encode(encode["text"]).tolist() == encode["ids"]
    cut = vector["keyboard_windows"]
    x, y = keyboard.windows(keyboard.encode(cut["text"]), seq_len=cut["seq_len"])
    assert (x.tolist(), y.tolist()) == (cut["x"], cut["y"])
    feats = vector["sensor_features"]
    window = np.array(feats["window"], np.float32).reshape(feats["shape"])
    assert np.allclose(sensor.features(window).ravel(), feats["features"], atol=1e-6)


def test_fedmq_standardises_sensor_data_with_the_published_constants():
    pytest.importorskip("pyts")
    from fedmq.tasks import sensor

    constants = load("preprocessing.json")["sensor_standardisation"]
    mean = np.array(constants["mean"], np.float32)[None, :, None]
    std = np.array(constants["std"], np.float32)[None, :, None]
    raw, _ = sensor.parse_arff((sensor.data_dir() / "BasicMotions_TEST.arff").read_text())
    (_, _), (test_x, _) = sensor.load_recordings()
    assert np.allclose(test_x, (raw - mean) / std, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# An independent device, written from docs/protocol.md only: numpy, msgpack, hashlib, zlib
# ---------------------------------------------------------------------------------------------

class Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def doc_require(condition: bool, reason: str) -> None:
    if not condition:
        raise Refused(reason)


UPDATE_FIELDS = {  # key: (type, required)  -- "Messages: Update"
    "dev": (str, True), "id": (str, True), "r": (int, True), "bv": (int, True),
    "ns": (int, True), "l": (float, True), "x": (dict, True), "lh": (str, False),
    "s": (float, False), "st": (int, False), "cp": (bool, False),
}
TENSOR_FIELDS = {"c": (str, True), "n": (int, True), "d": (bytes, True)}
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def doc_typed(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def doc_fields(data: Any, schema: dict[str, tuple[type, bool]]) -> None:
    doc_require(isinstance(data, dict), "malformed")
    for key, (kind, required) in schema.items():
        if key in data:
            doc_require(doc_typed(data[key], kind), "malformed")
        else:
            doc_require(not required, "malformed")


def doc_message(payload: bytes, kind: str) -> dict[str, Any]:
    """Envelope: msgpack map, `$v` the integer 2, `$k` the kind."""
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception:
        raise Refused("malformed") from None
    doc_require(isinstance(data, dict), "malformed")
    version = data.get("$v")
    doc_require(isinstance(version, int) and not isinstance(version, bool) and version == 2,
                "bad_version")
    doc_require(data.get("$k") == kind, "wrong_kind")
    return data


def doc_update(payload: bytes) -> dict[str, Any]:
    data = doc_message(payload, "upd")
    doc_fields(data, UPDATE_FIELDS)
    doc_fields(data["x"], TENSOR_FIELDS)
    doc_require(bool(NAME.fullmatch(data["dev"])), "bad_field")
    doc_require(data["ns"] > 0, "bad_samples")
    doc_require(math.isfinite(data["l"]), "non_finite")
    return data


def doc_varints(data: bytes, pos: int, count: int) -> tuple[list[int], int]:
    """LEB128: 7 bits per byte, least significant group first, high bit = more."""
    out = []
    for _ in range(count):
        value, shift, length = 0, 0, 0
        while True:
            doc_require(pos < len(data), "truncated")
            byte = data[pos]
            pos, length = pos + 1, length + 1
            doc_require(length <= 5, "malformed")
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        out.append(value)
    return out, pos


def doc_parse_codec(name: str) -> dict[str, Any]:
    spec = {"top": None, "quant": "f32", "block": 256, "lossless": "none"}
    for stage in name.split("+"):
        if m := re.fullmatch(r"top(0?\.\d+|1(?:\.0*)?)", stage):
            spec["top"] = float(m.group(1))
        elif stage in ("f32", "f16"):
            spec["quant"] = stage
        elif m := re.fullmatch(r"(q8|q4|q2|sign)(?:b(\d+))?", stage):
            spec["quant"] = m.group(1)
            spec["block"] = int(m.group(2) or 256)
        elif stage in ("zstd", "zlib"):
            spec["lossless"] = stage
        else:
            raise Refused("unknown_codec")
    doc_require(8 <= spec["block"] <= 1 << 20, "unknown_codec")
    return spec


LIMIT = float(np.finfo(np.float32).max) / 2**20  # the overflow guard, at weight 1


def doc_values(raw: bytes, quant: str, block: int, count: int) -> np.ndarray:
    """The value section: `count` values from exactly these bytes."""
    if quant in ("f32", "f16"):
        width = 4 if quant == "f32" else 2
        doc_require(len(raw) == width * count, "truncated")
        values = np.frombuffer(raw, "<f4" if quant == "f32" else "<f2").astype(np.float32)
        doc_require(bool(np.isfinite(values).all()), "non_finite")
        doc_require(bool((np.abs(values) <= LIMIT).all()), "out_of_range")
        return values
    bits = {"q8": 8, "q4": 4, "q2": 2, "sign": 1}[quant]
    blocks = -(-count // block)
    doc_require(len(raw) == 4 * blocks + -(-count * bits // 8), "truncated")
    scales = np.frombuffer(raw[: 4 * blocks], "<f4")
    doc_require(bool(np.isfinite(scales).all() and (scales >= 0).all()), "non_finite")
    doc_require(not blocks or float(scales.max()) * 2**bits <= LIMIT, "out_of_range")
    body = np.frombuffer(raw[4 * blocks:], np.uint8)
    if bits == 8:
        q = body.view(np.int8).astype(np.float32)
    else:  # value i sits at bits (i mod 8/bits) x bits of byte i div (8/bits)
        per = 8 // bits
        i = np.arange(count)
        codes = (body[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)
        q = (2.0 * codes - 1 if bits == 1 else codes - (2 ** (bits - 1) - 1)).astype(np.float32)
    return q * scales[np.arange(count) // block]  # float32 x float32, one rounding


def doc_tensor(codec: str, size: int, data: bytes) -> np.ndarray:
    spec = doc_parse_codec(codec)
    if spec["lossless"] == "zlib":
        try:
            raw = zlib.decompress(data)
        except zlib.error:
            raise Refused("malformed") from None
    elif spec["lossless"] == "zstd":
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(data)
    else:
        raw = data
    out = np.zeros(size, np.float32)  # values are added to +0.0: -0.0 decodes as +0.0
    if spec["top"] is None or spec["top"] >= 1:
        out += doc_values(raw, spec["quant"], spec["block"], size)
    else:
        (k,), pos = doc_varints(raw, 0, 1)
        doc_require(k == 0 if size == 0 else 1 <= k <= size, "malformed")
        gaps, pos = doc_varints(raw, pos, k)
        index, previous = [], -1  # the first gap counts from index -1
        for gap in gaps:
            previous += gap + 1
            index.append(previous)
        doc_require(not index or index[-1] < size, "malformed")
        out[index] += doc_values(raw[pos:], spec["quant"], spec["block"], k)
    return out


def doc_join(pieces: dict[int, bytes], count: int, size: int, sha256: bytes) -> bytes:
    blob = b"".join(pieces[i] for i in range(count))
    doc_require(len(blob) == size and hashlib.sha256(blob).digest() == sha256, "bad_hash")
    return blob


@pytest.mark.parametrize("vector", vectors("updates.json"), ids=ids("updates.json"))
def test_the_doc_decodes_every_codec_vector(vector):
    needs_compressor(vector)
    update = doc_update(bytes.fromhex(vector["update"]["payload_hex"]))
    x = update["x"]
    assert same_bits(doc_tensor(x["c"], x["n"], x["d"]), f32(vector["decoded_f32"]))


@pytest.mark.parametrize("vector", vectors("invalid.json"), ids=ids("invalid.json"))
def test_the_doc_refuses_every_invalid_vector_with_its_reason(vector):
    with pytest.raises(Refused) as info:
        update = doc_update(bytes.fromhex(vector["payload_hex"]))
        x = update["x"]
        decoded = doc_tensor(x["c"], x["n"], x["d"])
        doc_require(len(decoded) == load("invalid.json")["model_size"], "bad_shape")
    assert info.value.reason == vector["reason"]


@pytest.mark.parametrize("vector", vectors("parts.json"), ids=ids("parts.json"))
def test_the_doc_reassembles_parts(vector):
    pieces, manifest = {}, None
    for hex_part in reversed(vector["parts_hex"]):
        part = doc_message(bytes.fromhex(hex_part), "part")
        assert manifest in (None, (part["t"], part["k"], part["n"], part["h"]))
        manifest = (part["t"], part["k"], part["n"], part["h"])
        pieces[part["i"]] = part["d"]
    _, count, size, sha256 = manifest
    update = doc_update(doc_join(pieces, count, size, sha256))
    x = update["x"]
    assert doc_tensor(x["c"], x["n"], x["d"]).tolist() == vector["delta_decoded"]


@pytest.mark.parametrize("vector", vectors("model_transfer.json"),
                         ids=ids("model_transfer.json"))
def test_the_doc_receives_every_model(vector):
    a = doc_message(bytes.fromhex(vector["announcement"]["payload_hex"]), "model")
    info = a["dp"] if vector["stream"] == "delta" else a["p"]
    if info.get("d"):
        blob = doc_join({0: info["d"]}, 1, info["n"], bytes.fromhex(info["h"]))
    else:
        pieces = {}
        for chunk in vector["chunks"]:
            c = doc_message(bytes.fromhex(chunk["payload_hex"]), "mchunk")
            assert c["v"] == a["v"] and c["k"] == info["k"]
            pieces[c["i"]] = c["d"]
        blob = doc_join(pieces, info["k"], info["n"], bytes.fromhex(info["h"]))
    tensor = msgpack.unpackb(blob, raw=False)  # a bare EncodedTensor map
    params = doc_tensor(tensor["c"], tensor["n"], tensor["d"])
    if vector["stream"] == "delta":
        params = f32(vector["base_f32"]) + params
    assert same_bits(params, f32(vector["params_f32"]))
    assert params.size == sum(math.prod(dims) for _, dims in a["lay"])


@pytest.mark.parametrize("vector", vectors("signed.json"), ids=ids("signed.json"))
def test_the_doc_verifies_signed_announcements(vector):
    pytest.importorskip("cryptography")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    top = load("signed.json")
    public = bytes.fromhex(top["test_key"]["public_key_hex"])
    assert hashlib.sha256(public).hexdigest()[:16] == top["test_key"]["key_id"]
    payload = bytes.fromhex(vector["payload_hex"])
    try:
        wrapper = doc_message(payload, "smodel")
    except Refused:
        assert doc_message(payload, "model") and vector["expect"] == "unsigned"
        return
    if wrapper["kid"] != top["test_key"]["key_id"]:
        assert vector["expect"] == "wrong_key"
        return
    context = b"fedmq/model-announcement/v1\x00"
    assert context.hex() == top["context_hex"]
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(wrapper["s"], context + wrapper["a"])
    except InvalidSignature:
        assert vector["expect"] == "bad_signature"
        return
    assert vector["expect"] == "valid"
    assert jsonable(doc_message(wrapper["a"], "model")) == vector["announcement"]


@pytest.mark.parametrize("vector", vectors("layouts.json"), ids=ids("layouts.json"))
def test_the_doc_computes_layout_hashes(vector):
    text = json.dumps(vector["layout"], separators=(",", ":"), ensure_ascii=True)
    assert text == vector["canonical_json"]
    assert hashlib.sha256(text.encode("ascii")).hexdigest()[:8] == vector["layout_hash"]


def doc_split(params: np.ndarray, layout: list) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, dims in layout:
        n = math.prod(dims)
        out[name] = params[offset: offset + n].astype(np.float64).reshape(dims)
        offset += n
    assert offset == params.size
    return out


def doc_sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def doc_recurrent(p: dict[str, np.ndarray], ids_: np.ndarray, cell: str) -> np.ndarray:
    x = p["embed.weight"][ids_]  # (batch, seq, embed)
    layer = 0
    while f"rnn.weight_ih_l{layer}" in p:
        w_ih, w_hh = p[f"rnn.weight_ih_l{layer}"], p[f"rnn.weight_hh_l{layer}"]
        b_ih, b_hh = p[f"rnn.bias_ih_l{layer}"], p[f"rnn.bias_hh_l{layer}"]
        hidden = w_hh.shape[1]
        h = np.zeros((x.shape[0], hidden))
        c = np.zeros_like(h)
        states = []
        for t in range(x.shape[1]):
            gi, gh = x[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
            if cell == "gru":  # rows of the weights: r, z, n
                r = doc_sigmoid(gi[:, :hidden] + gh[:, :hidden])
                z = doc_sigmoid(gi[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
                n = np.tanh(gi[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
                h = (1 - z) * n + z * h
            else:  # rows: i, f, g, o
                g = gi + gh
                i, f = doc_sigmoid(g[:, :hidden]), doc_sigmoid(g[:, hidden:2 * hidden])
                cand, o = np.tanh(g[:, 2 * hidden:3 * hidden]), doc_sigmoid(g[:, 3 * hidden:])
                c = f * c + i * cand
                h = o * np.tanh(c)
            states.append(h)
        x = np.stack(states, axis=1)
        layer += 1
    return x[:, -1] @ p["out.weight"].T + p["out.bias"]


def doc_conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross-correlation, kernel 5, 2 zeros of padding on each side."""
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2)))
    steps = x.shape[2]
    return np.stack([np.einsum("nck,ock->no", padded[:, :, t: t + 5], w) for t in range(steps)],
                    axis=2) + b[None, :, None]


def doc_forward(model: str, config: dict[str, Any], p: dict[str, np.ndarray],
                x: np.ndarray) -> np.ndarray:
    if model == "logreg":
        return x @ p["w"] + p["b"]
    if model == "mlp":
        return np.maximum(x @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]
    if model == "char_gru":
        return doc_recurrent(p, x, config.get("cell", "gru"))
    h = np.maximum(doc_conv1d(x, p["features.0.weight"], p["features.0.bias"]), 0)
    h = h[:, :, : h.shape[2] // 2 * 2].reshape(h.shape[0], h.shape[1], -1, 2).max(axis=3)
    h = np.maximum(doc_conv1d(h, p["features.3.weight"], p["features.3.bias"]), 0)
    return h.mean(axis=2) @ p["out.weight"].T + p["out.bias"]


@pytest.mark.parametrize("vector", vectors("models.json"), ids=ids("models.json"))
def test_the_doc_computes_every_forward_pass(vector):
    p = doc_split(np.array(vector["params"], np.float32), vector["layout"])
    x = np.array(vector["input"]).reshape(vector["input_shape"])
    if vector["input_dtype"] == "float32":
        x = x.astype(np.float64)
    logits = doc_forward(vector["model"], vector["model_config"], p, x)
    assert np.allclose(logits.ravel(), vector["logits"], rtol=1e-5, atol=1e-5)


def test_the_doc_preprocesses_task_inputs():
    vector = load("preprocessing.json")
    text = vector["keyboard_encode"]["text"]
    assert [ord(ch) - 31 if 32 <= ord(ch) <= 126 else 0 for ch in text] == \
        vector["keyboard_encode"]["ids"]
    cut = vector["keyboard_windows"]
    ids_ = [ord(ch) - 31 for ch in cut["text"]]
    n = cut["seq_len"]
    assert [ids_[j: j + n] for j in range(len(ids_) - n)] == cut["x"]
    assert ids_[n:] == cut["y"]
    feats = vector["sensor_features"]
    w = np.array(feats["window"], np.float64).reshape(feats["shape"])
    expected = np.concatenate([w.mean(2), w.std(2), w.min(2), w.max(2),
                               np.abs(np.diff(w, axis=2)).mean(2)], axis=1)
    assert np.allclose(expected.ravel(), feats["features"], atol=1e-6)


def doc_update_topic(fleet: str, device: str, buckets: int) -> str:
    """"Topics": update/{bucket}/{device_id}, bucket = SHA-256(id)[:4] big-endian mod 64."""
    bucket = int.from_bytes(hashlib.sha256(device.encode()).digest()[:4], "big") % buckets
    return f"fedmq/{fleet}/update/{bucket}/{device}"


@pytest.mark.parametrize("entry", load("updates.json")["update_topics"],
                         ids=[e["device"][:16] for e in load("updates.json")["update_topics"]])
def test_the_doc_and_fedmq_give_every_device_its_update_topic(entry):
    from fedmq.core.protocol import FleetTopics, update_bucket

    assert load("updates.json")["buckets"] == 64
    assert doc_update_topic("demo", entry["device"], 64) == entry["topic"]
    assert FleetTopics("demo").update(entry["device"]) == entry["topic"]
    assert update_bucket(entry["device"]) == entry["bucket"]
    assert FleetTopics("demo").device_from_update_topic(entry["topic"]) == entry["device"]
