"""Export a global model to ONNX, so devices can run it with onnxruntime alone.

numpy models (`logreg`, `mlp`) are dense stacks, written directly as an ONNX graph
(MatMul + Add, Relu between layers) from their flat parameters: no torch needed on the
server either. Torch models go through `torch.onnx.export` with the torch.export-based
("dynamo") exporter, the default and only maintained one since torch 2.9; it needs the
`onnxscript` package (in the `onnx` extra). The TorchScript exporter (`dynamo=False`)
still works in torch 2.13 but warns that it will be removed, so it is not used.

Every file carries fedmq metadata (`metadata_props`, keys `fedmq.*`): model name,
version, round, layout hash, task, input dtype and shape, class names. A device reads
them with onnxruntime (`edge_agent.predict`) and knows what it runs.

Graph contract, for every model: one input `input` whose first dimension is the batch
(dynamic), one output `logits` of shape (batch, classes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.errors import ConfigError, FedmqError, MissingExtraError, require
from fedmq.models import Model, build_model
from fedmq.storage import atomic_write
from fedmq.tasks import task_spec
from fedmq.tasks.datasource import task_class_names

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
META_PREFIX = "fedmq."
# opset 17 / IR 8: what onnxruntime >= 1.14 runs, so old device images still load the
# numpy models' graphs (MatMul, Add and Relu have not changed since opset 14).
NUMPY_OPSET = 17
NUMPY_IR_VERSION = 8
# torch.export specialises a dimension of size 1 to a constant, so the example batch used
# to trace torch models must have at least two rows for the batch axis to stay dynamic.
TORCH_EXAMPLE_BATCH = 2

# numpy model name -> its (weight, bias) pairs in order, ReLU between consecutive layers
_DENSE_LAYERS: dict[str, tuple[tuple[str, str], ...]] = {
    "logreg": (("w", "b"),),
    "mlp": (("w1", "b1"), ("w2", "b2")),
}


class ExportError(FedmqError):
    """A model could not be exported to ONNX."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What a device needs to know about an exported model (stored as metadata_props)."""

    model: str
    input_dtype: str  # numpy dtype name, e.g. float32 or int64
    input_shape: tuple[int, ...]  # one example's shape, without the batch dimension
    version: int = -1
    round: int = -1
    layout_hash: str = ""
    task: str = ""
    class_names: tuple[str, ...] = ()
    model_config: Mapping[str, Any] | None = None

    def to_props(self) -> dict[str, str]:
        props = {
            "model": self.model, "version": str(self.version), "round": str(self.round),
            "layout_hash": self.layout_hash, "task": self.task,
            "input_dtype": self.input_dtype, "input_shape": json.dumps(list(self.input_shape)),
            "class_names": json.dumps(list(self.class_names)),
            "model_config": json.dumps(dict(self.model_config or {}), sort_keys=True),
        }
        return {META_PREFIX + key: value for key, value in props.items()}


def _onnx():
    return require("onnx", "onnx")


def _torch_parts(model: Model, task: str) -> tuple[Any, np.ndarray] | None:
    """(module, example batch) of a torch model: a bundled one, or the nn.Module of a user
    task's TorchTrainer, traced with an example of the task's declared `input_shape` and
    the trainer's input dtype. None: not a torch model."""
    if hasattr(model, "module") and hasattr(model, "example_input"):
        return model.module, np.asarray(model.example_input(batch=TORCH_EXAMPLE_BATCH))
    trainer = getattr(model, "trainer", None)
    module = getattr(trainer, "module", None)
    if module is None or not isinstance(module, require("torch", "torch").nn.Module):
        return None
    spec = task_spec(task) if task else None
    if spec is None or not spec.example_shape:
        raise ExportError(f"task {task or '?'}: its torch model is exported to ONNX with an "
                          "example input: declare the shape of one example as the task "
                          "class's input_shape (e.g. input_shape = (28, 28))")
    dtype = getattr(trainer, "x_dtype", None) or spec.x_dtype
    return module, np.zeros((TORCH_EXAMPLE_BATCH, *spec.example_shape), dtype=dtype)


def _dense_graph(model: Model):
    """The ModelProto of a numpy dense stack, initializers taken from its flat params."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    check_exportable(model)
    layers = _DENSE_LAYERS[model.name]
    tensors = model.layout.split(model.get_flat())
    inputs = tensors[layers[0][0]].shape[0]
    classes = tensors[layers[-1][1]].shape[0]
    nodes, initializers, current = [], [], INPUT_NAME
    for i, (w, b) in enumerate(layers):
        initializers += [numpy_helper.from_array(np.ascontiguousarray(tensors[w]), w),
                         numpy_helper.from_array(np.ascontiguousarray(tensors[b]), b)]
        last = i == len(layers) - 1
        product, out = f"{w}_matmul", OUTPUT_NAME if last else f"{b}_add"
        nodes += [helper.make_node("MatMul", [current, w], [product]),
                  helper.make_node("Add", [product, b], [out])]
        current = out
        if not last:
            current = f"relu{i + 1}"
            nodes.append(helper.make_node("Relu", [out], [current]))
    graph = helper.make_graph(
        nodes, f"fedmq_{model.name}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, inputs])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, classes])],
        initializers,
    )
    proto = helper.make_model(graph, producer_name="fedmq",
                              opset_imports=[helper.make_opsetid("", NUMPY_OPSET)])
    proto.ir_version = NUMPY_IR_VERSION
    onnx.checker.check_model(proto)
    return proto, ("float32", (inputs,))


def _torch_graph(model: Model, module: Any, example: np.ndarray):
    """The ModelProto of a torch model's `module`, traced in eval mode with a dynamic batch."""
    onnx = _onnx()
    torch = require("torch", "torch")
    _check_onnxscript()  # the dynamo exporter needs it
    was_training = module.training
    module.eval()
    noisy = logging.getLogger("torch.onnx")
    level = noisy.level
    try:
        # The exporter warns about torch internals (deprecations, registrations) on every
        # call; none of it concerns our graph, and the aggregator's log is not the place.
        # (Both switches are process-wide: other threads' warnings are muted meanwhile.)
        noisy.setLevel(logging.ERROR)
        from fedmq.models.torch_backend import TORCH_TRACING

        with TORCH_TRACING.exclusive(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (torch.from_numpy(example),), dynamo=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
                external_data=False, report=False, verbose=False,
            )
            proto = program.model_proto
    except Exception as exc:  # the exporter raises many kinds; name the model and go on
        raise ExportError(f"torch.onnx.export failed for model {model.name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    finally:
        noisy.setLevel(level)
        module.train(was_training)
    onnx.checker.check_model(proto)
    return proto, (example.dtype.name, tuple(int(d) for d in example.shape[1:]))


def _check_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("onnxscript", "onnx") from exc


def check_exportable(model: Model, task: str = "") -> None:
    """Raise now (at start-up) what exporting `model` (of `task`) would raise later: a
    missing extra, a user's torch task without an input_shape, or a model with no ONNX
    graph."""
    _onnx()
    if _torch_parts(model, task) is not None:
        _check_onnxscript()
    elif model.name not in _DENSE_LAYERS:
        raise ExportError(f"no ONNX graph for {model.backend} model {model.name!r}; "
                          f"exportable: {', '.join(sorted(_DENSE_LAYERS))}, a bundled torch "
                          "model, or a user task's TorchTrainer module (leave onnx_dir empty "
                          "for this one)")


def export_onnx(model: Model, path: str | os.PathLike, *, version: int = -1, round: int = -1,
                task: str = "", class_names: Sequence[str] = (),
                model_config: Mapping[str, Any] | None = None) -> Path:
    """Write `model` (its current parameters) as an ONNX file at `path`, atomically."""
    path = Path(path)
    torch_parts = _torch_parts(model, task)
    proto, (dtype, shape) = (_dense_graph(model) if torch_parts is None
                             else _torch_graph(model, *torch_parts))
    info = ExportInfo(model=model.name, input_dtype=dtype, input_shape=shape, version=version,
                      round=round, layout_hash=model.layout.hash, task=task,
                      class_names=tuple(str(c) for c in class_names), model_config=model_config)
    del proto.metadata_props[:]
    for key, value in info.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "fedmq"
    proto.model_version = max(version, 0)
    proto.doc_string = f"fedmq {model.name} v{version} (round {round}, task {task or '?'})"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, proto.SerializeToString())
    return path


_VERSIONED = re.compile(r"model-v(\d+)\.onnx")
LATEST = "latest.onnx"


class ModelExporter:
    """Writes `model-v{version}.onnx` per new global model, points `latest.onnx` at the
    newest one and keeps `keep` versions: the one just written and the newest others (0: all).

    `latest.onnx` is a relative symlink swapped atomically; where the file system has no
    symlinks it is an atomically replaced copy.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 5) -> None:
        if keep < 0:
            raise ConfigError(f"onnx keep must be >= 0 (0: keep every version), not {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, version: int) -> Path:
        return self.directory / f"model-v{version}.onnx"

    @property
    def latest(self) -> Path:
        return self.directory / LATEST

    def export(self, model: Model, *, version: int, round: int, task: str = "",
               model_config: Mapping[str, Any] | None = None) -> Path:
        """Export, relink `latest.onnx`, prune; returns the versioned file's path."""
        path = export_onnx(model, self.path_for(version), version=version, round=round,
                           task=task, class_names=task_class_names(task),
                           model_config=model_config)
        self._link_latest(path)
        self._prune(keep_version=version)
        log.info("exported model v%d to %s", version, path)
        return path

    def versions(self) -> list[int]:
        """Versions on disk, oldest first."""
        if not self.directory.is_dir():
            return []
        found = (_VERSIONED.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _link_latest(self, path: Path) -> None:
        tmp = self.directory / f".{LATEST}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            tmp.symlink_to(path.name)
            os.replace(tmp, self.latest)
        except OSError:  # no symlinks here (some FAT/SMB mounts): an atomic copy instead
            tmp.unlink(missing_ok=True)
            atomic_write(self.latest, path.read_bytes())

    def _prune(self, *, keep_version: int) -> None:
        """Keep the version just written and the newest keep-1 others (after a fresh start
        the new numbers are lower than the old ones, and the new model must stay)."""
        if not self.keep:
            return
        others = [v for v in self.versions() if v != keep_version]
        for version in others[: max(0, len(others) - (self.keep - 1))]:
            self.path_for(version).unlink(missing_ok=True)


class BackgroundExporter:
    """Runs a ModelExporter on its own thread, on its own model instance.

    torch.onnx.export takes seconds (a char_gru of 64 steps: ~5 s, the GRU is traced step
    by step); the aggregator's round loop must not stall that long. `submit` copies the
    parameters and returns at once; when models arrive faster than they export, only the
    newest waiting one is exported. Failures are logged and counted, never raised: an
    export is a by-product of training, not part of it.
    """

    def __init__(self, exporter: ModelExporter, *, model: str, model_config: Mapping[str, Any],
                 task: str = "") -> None:
        self.exporter = exporter
        self.task = task
        self.model_config = dict(model_config)
        self._model = build_model(model, self.model_config)  # fails now, not in the thread
        check_exportable(self._model, task)
        self._pending: tuple[np.ndarray, int, int] | None = None
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self.exported: list[Path] = []
        self.failures = 0
        self.skipped = 0  # versions superseded by a newer one before their turn
        self._thread = threading.Thread(target=self._run, name="onnx-export", daemon=True)
        self._thread.start()

    def submit(self, params: np.ndarray, *, version: int, round: int) -> None:
        with self._cond:
            if self._pending is not None:
                self.skipped += 1
            self._pending = (np.array(params, dtype=np.float32), version, round)
            self._cond.notify_all()

    def flush(self, timeout: float = 120.0) -> bool:
        """Wait until everything submitted is exported (or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy,
                                       timeout)

    def close(self, timeout: float = 120.0) -> None:
        """Finish the export in progress and any waiting one, then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                (params, version, round_), self._pending = self._pending, None
                self._busy = True
            try:
                self._model.set_flat(params)
                path = self.exporter.export(self._model, version=version, round=round_,
                                            task=self.task, model_config=self.model_config)
                self.exported.append(path)
            except Exception:  # a failed export must not stop training or the thread
                self.failures += 1
                log.exception("ONNX export of model v%d failed", version)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


__all__ = ["INPUT_NAME", "LATEST", "OUTPUT_NAME", "BackgroundExporter", "ExportError",
           "ExportInfo", "ModelExporter", "check_exportable", "export_onnx"]
