"""Run an exported global model on a device with numpy and onnxruntime only (never torch).

The aggregator writes `model-v{N}.onnx` files (aggregator/onnx_export.py) whose metadata
says which model, version, task, input dtype and shape they hold; `OnnxPredictor` reads
them, so callers pass plain arrays and get class ids back:

    predictor = OnnxPredictor("latest.onnx")
    predictor.predict(x)        # (n,) class ids
    predictor.predict_proba(x)  # (n, classes) probabilities
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmq.errors import DataError, require

META_PREFIX = "fedmq."
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32"}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What an exported model says about itself (its `fedmq.*` metadata, or its graph)."""

    model: str
    version: int
    round: int
    task: str
    layout_hash: str
    input_dtype: np.dtype
    input_shape: tuple[int, ...]  # one example, without the batch dimension
    class_names: tuple[str, ...]

    @property
    def width(self) -> int:
        return math.prod(self.input_shape)


def _model_info(session) -> ModelInfo:
    """From the metadata the exporter wrote; a foreign ONNX file falls back to its graph."""
    meta = {k.removeprefix(META_PREFIX): v
            for k, v in session.get_modelmeta().custom_metadata_map.items()
            if k.startswith(META_PREFIX)}
    graph_input = session.get_inputs()[0]
    if "input_shape" in meta:
        shape = tuple(int(d) for d in json.loads(meta["input_shape"]))
    else:
        shape = tuple(d if isinstance(d, int) else -1 for d in graph_input.shape[1:])
    dtype = meta.get("input_dtype") or _ORT_DTYPES.get(graph_input.type, "float32")
    return ModelInfo(
        model=meta.get("model", "?"), version=int(meta.get("version", -1)),
        round=int(meta.get("round", -1)), task=meta.get("task", ""),
        layout_hash=meta.get("layout_hash", ""), input_dtype=np.dtype(dtype),
        input_shape=shape, class_names=tuple(json.loads(meta.get("class_names", "[]"))),
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class OnnxPredictor:
    """An ONNX model file, loaded once into an onnxruntime CPU session."""

    def __init__(self, path: str | Path, *, threads: int = 0) -> None:
        ort = require("onnxruntime", "onnx")
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"model file {self.path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's choice (all cores)
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise DataError(f"{self.path} is not a model onnxruntime can load: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.info = _model_info(self.session)

    def prepare(self, x) -> np.ndarray:
        """`x` as the model's input: a batch (or one example), flattened rows reshaped."""
        x = np.asarray(x)
        info = self.info
        if x.dtype.kind not in "biuf":
            raise DataError(f"input must be numeric, got {x.dtype}")
        if x.ndim == len(info.input_shape) and len(x) and _fits(x.shape, info.input_shape):
            x = x[None]  # a single example
        if not _fits(x.shape[1:], info.input_shape):
            if x.ndim == 2 and x.shape[1] == info.width and -1 not in info.input_shape:
                x = x.reshape((len(x), *info.input_shape))
            else:
                raise DataError(f"input has examples of shape {x.shape[1:]}, model "
                                f"{info.model} takes {info.input_shape}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError("input has NaN or infinite values")
        fractional = x.dtype.kind == "f" and not (x == np.round(x)).all()
        if info.input_dtype.kind in "iu" and fractional:
            raise DataError(f"model {info.model} takes integer ids, the input has fractions")
        return np.ascontiguousarray(x, dtype=info.input_dtype)

    def logits(self, x) -> np.ndarray:
        x = self.prepare(x)
        return self.session.run(None, {self.input_name: x})[0]

    def predict_proba(self, x) -> np.ndarray:
        return softmax(self.logits(x))

    def predict(self, x) -> np.ndarray:
        return self.logits(x).argmax(axis=-1)

    def top_k(self, x, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(class ids, probabilities), each (n, k), most likely first."""
        proba = self.predict_proba(x)
        k = max(1, min(k, proba.shape[-1]))
        ids = np.argsort(-proba, axis=-1, kind="stable")[:, :k]
        return ids, np.take_along_axis(proba, ids, axis=-1)


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(shape) == len(expected) and all(e < 0 or s == e
                                               for s, e in zip(shape, expected, strict=True))


# -- the `fedmq predict` command ------------------------------------------------------------

def load_inputs(path: str | Path, info: ModelInfo) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, labels or None) from an .npz (`x`, optional `y`) or a .csv of feature rows
    (one more column than the model's input width: the last one is a label)."""
    from fedmq.tasks.datasource import read_csv

    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "x" not in npz.files:
                    raise DataError(f"{path}: no array x (it holds {', '.join(npz.files)})")
                return npz["x"], (npz["y"] if "y" in npz.files else None)
        except FileNotFoundError:
            raise DataError(f"input file {path} does not exist") from None
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path} is not a readable .npz of numeric arrays: {exc}") from None
    if path.suffix != ".csv":
        raise DataError(f"input {path} must be a .npz or .csv file")
    table = read_csv(path)
    columns = len(table.rows[0])
    if columns not in (info.width, info.width + 1):
        raise DataError(f"{path}: {columns} columns; model {info.model} takes {info.width} "
                        f"features per row (plus an optional label column)")
    values = table.numbers(list(range(columns)))
    if columns == info.width:
        return values, None
    return values[:, :-1], values[:, -1]


def configure(parser: argparse.ArgumentParser) -> None:
    """`fedmq predict`: arguments, and run() as what it does."""
    parser.set_defaults(func=run)
    parser.add_argument("--model", required=True, metavar="ONNX",
                        help="model file written by the aggregator (e.g. latest.onnx)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", metavar="FILE",
                      help=".npz with array x (and optionally y), or .csv of feature rows "
                      "(an extra last column is taken as the label)")
    what.add_argument("--text", metavar="TEXT",
                      help="keyboard models: predict the characters that follow TEXT")
    parser.add_argument("--output", metavar="CSV", help="write the predictions here, not stdout")
    parser.add_argument("--top", type=int, default=1, metavar="K",
                        help="the K most likely classes per example, with probabilities")
    parser.add_argument("--length", type=int, default=1, metavar="N",
                        help="with --text: continue the text by N characters (greedy)")


def run(args: argparse.Namespace) -> int:
    """`fedmq predict`: predictions as CSV, a one-line summary on stderr."""
    predictor = OnnxPredictor(args.model)
    info = predictor.info
    if args.top < 1:
        raise DataError("--top must be >= 1")
    if args.text is not None:
        return _run_text(predictor, args)
    x, labels = load_inputs(args.input, info)
    ids, proba = predictor.top_k(x, args.top)
    header = ["row"]
    for k in range(1, ids.shape[1] + 1):
        header += [f"class_{k}"] + ([f"name_{k}"] if info.class_names else []) + [f"prob_{k}"]
    rows = []
    for i, (row_ids, row_p) in enumerate(zip(ids, proba, strict=True)):
        row: list = [i]
        for c, p in zip(row_ids, row_p, strict=True):
            row += [int(c)] + ([_name(info, c)] if info.class_names else []) + [f"{p:.6f}"]
        rows.append(row)
    _write_csv(header, rows, args.output)
    summary = (f"model {info.model} v{info.version} (task {info.task or '?'}): "
               f"{len(rows)} predictions")
    if labels is not None:
        summary += f", accuracy {float((ids[:, 0] == labels).mean()):.4f}"
    if args.output:
        summary += f", written to {args.output}"
    print(summary, file=sys.stderr)
    return 0


def _name(info: ModelInfo, class_id) -> str:
    c = int(class_id)
    return info.class_names[c] if c < len(info.class_names) else str(c)


def _write_csv(header: list[str], rows: list[list], output: str | None) -> None:
    if output:
        with open(output, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
    else:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _run_text(predictor: OnnxPredictor, args: argparse.Namespace) -> int:
    """Keyboard models: the next characters after `args.text`, most likely first."""
    from fedmq.tasks import keyboard

    info = predictor.info
    if info.input_dtype.kind not in "iu" or len(info.input_shape) != 1 or info.width < 1:
        raise DataError(f"--text is for keyboard models (character windows); model "
                        f"{info.model} takes {info.input_dtype} of shape {info.input_shape}")
    window = info.width
    # Too little context: pad on the left with spaces, as a line's start follows a space.
    ids = keyboard.encode(" " * max(0, window - len(args.text)) + args.text)
    top_ids, top_p = predictor.top_k(ids[-window:], args.top)
    if args.length > 1:  # greedy continuation, one character at a time
        for _ in range(args.length):
            ids = np.append(ids, predictor.predict(ids[-window:])[0])
        print(args.text + keyboard.decode(ids[-args.length:]))
    print("next character: " + ", ".join(f"{keyboard.decode(np.array([c]))!r} {p:.3f}"
                                         for c, p in zip(top_ids[0], top_p[0], strict=True)))
    return 0

__all__ = ["ModelInfo", "OnnxPredictor", "load_inputs", "softmax"]
