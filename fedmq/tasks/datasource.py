"""A device's own training data: CSV, NPZ, a text of its user's typing, or a live callable.

Configured by one string (`data_source` in agent.toml): `csv:PATH`, `npz:PATH`, `text:PATH`
or `python:package.module:function`; empty means the bundled task shard. Everything is read
and checked at start-up against the task's input shape, dtype and classes, so bad data
stops the agent with a message naming the file and the problem; with `data_reload` it is
read and checked again before every round, and a bad read there keeps the last good data.
The data never leaves the device; only model deltas do.
"""

from __future__ import annotations

import csv
import importlib
import io
import math
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from fedmq.errors import ConfigError, DataError
from fedmq.tasks import Dataset, TaskSpec, task_spec

# A live source that yields forever must stop somewhere: the agent trains on a fixed set.
DEFAULT_MAX_SAMPLES = 10_000


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What one example must look like for a task: shape, dtype, value range, classes."""

    task: str
    shape: tuple[int, ...]  # one example, without the batch dimension
    dtype: np.dtype
    classes: int
    vocab: int = 0  # integer inputs (token ids) must lie in [0, vocab); 0: any float
    class_names: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """Values per example once flattened (a CSV row's feature columns)."""
        return math.prod(self.shape)

    @classmethod
    def from_task(cls, spec: TaskSpec) -> InputSpec:
        dtype = np.dtype(spec.x_dtype)
        if spec.custom:  # a user's task: what it declares, ids unbounded
            if not (spec.example_shape and spec.classes):
                raise ConfigError(f"task {spec.name} declares no input_shape and classes, "
                                  "which a data_source is checked against: declare them on "
                                  "the task, or have its load_data read the device's data")
            return cls(task=spec.name, shape=tuple(spec.shape), dtype=dtype,
                       classes=spec.classes)
        # Integer inputs are token ids of the vocabulary the model predicts (keyboard:
        # characters in, next character out), so their range is the class count.
        return cls(task=spec.name, shape=tuple(spec.shape), dtype=dtype, classes=spec.classes,
                   vocab=spec.classes if dtype.kind in "iu" else 0,
                   class_names=task_class_names(spec.name))


def task_class_names(task: str) -> tuple[str, ...]:
    """Names of a task's classes, where it has them: activity names, keyboard characters."""
    from fedmq.tasks import keyboard, sensor, wearable

    if task in ("sensor", "sensor-features"):
        return tuple(sensor.CLASSES)
    if task == "wearable":
        return tuple(wearable.CLASSES)
    if task == "keyboard":
        return ("\N{REPLACEMENT CHARACTER}", *keyboard.VOCAB)  # id 0 is "unknown"
    return ()


def check_dataset(x, y, spec: InputSpec, source: str) -> Dataset:
    """Shape, dtype, finiteness and range checks; returns the data in the task's dtypes."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise DataError(f"{source}: x and y must be numeric arrays, got {x.dtype} and {y.dtype}")
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be one value per example, got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} examples but {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{source}: no examples")
    if x.shape[1:] != spec.shape:
        if x.ndim == 2 and x.shape[1] == spec.width:  # flattened rows, e.g. from a CSV
            x = x.reshape((len(x), *spec.shape))
        else:
            raise DataError(f"{source}: examples have shape {x.shape[1:]}, task {spec.task!r} "
                            f"needs {spec.shape}")
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.dtype.kind == "f" else None
    if bad is not None and bad.any():
        raise DataError(f"{source}: example {int(np.argmax(bad))} has NaN or infinite values "
                        f"({int(bad.sum())} such examples)")
    if spec.dtype.kind in "iu":
        if x.dtype.kind == "f" and not (x == np.round(x)).all():
            raise DataError(f"{source}: task {spec.task!r} takes integer ids, got fractions")
        if spec.vocab and (x.min() < 0 or x.max() >= spec.vocab):
            raise DataError(f"{source}: ids must be in [0, {spec.vocab}), got "
                            f"{x.min()}..{x.max()}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise DataError(f"{source}: labels must be whole class ids, got fractions or NaN")
    if y.min() < 0 or y.max() >= spec.classes:
        raise DataError(f"{source}: labels must be in [0, {spec.classes}) for task "
                        f"{spec.task!r}, got {y.min()}..{y.max()}")
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(x, dtype=spec.dtype)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{source}: values beyond the range of {spec.dtype} (about 3e38)")
    return Dataset(x=x, y=np.ascontiguousarray(y, dtype=np.int64))


# -- CSV ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CsvTable:
    """A CSV file's cells as text, with the line number of every row for error messages."""

    path: Path
    header: tuple[str, ...] | None
    rows: list[list[str]]
    lines: list[int]

    def column_index(self, name: str) -> int:
        if self.header is None:
            raise DataError(f"{self.path}: label column {name!r} needs a header row, and the "
                            "file has none")
        if name not in self.header:
            shown = ", ".join(self.header[:12]) + (", ..." if len(self.header) > 12 else "")
            raise DataError(f"{self.path}: no column {name!r}; columns: {shown}")
        return self.header.index(name)

    def numbers(self, columns: list[int]) -> np.ndarray:
        """The given columns as float64, naming the first cell that is not a finite number."""
        out = np.empty((len(self.rows), len(columns)), dtype=np.float64)
        for r, row in enumerate(self.rows):
            try:
                out[r] = [float(row[c]) for c in columns]
            except ValueError:
                c = next(c for c in columns if not _is_number(row[c]))
                raise DataError(f"{self.where(r, c)}: {row[c]!r} is not a number") from None
            if not np.isfinite(out[r]).all():
                c = columns[int(np.argmin(np.isfinite(out[r])))]
                raise DataError(f"{self.where(r, c)}: {row[c]!r} is not a finite number")
        return out

    def where(self, r: int, c: int) -> str:
        name = f" ({self.header[c]!r})" if self.header else ""
        return f"{self.path} line {self.lines[r]}, column {c + 1}{name}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_header(rows: list[list[str]]) -> bool:
    """The first row names the columns when it has text where the second row has a number
    (a label column of class names is text in every row); a lone row, when it is all text."""
    first = [not _is_number(cell) for cell in rows[0]]
    if len(rows) == 1:
        return all(first)
    return any(text and _is_number(below) for text, below in zip(first, rows[1], strict=False))


def read_csv(path: str | Path) -> CsvTable:
    """Rows of equal length, and the header row if the file has one (see `_is_header`)."""
    path = Path(path)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    rows, lines = [], []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):  # blank lines are skipped
                rows.append([cell.strip() for cell in row])
                lines.append(reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    header = None
    if _is_header(rows):
        header = tuple(rows.pop(0))
        lines.pop(0)
    width = len(header) if header is not None else len(rows[0])
    for row, line in zip(rows, lines, strict=True):
        if len(row) != width:
            raise DataError(f"{path} line {line}: {len(row)} columns, expected {width} "
                            f"(like the {'header' if header else 'first row'})")
    if not rows:
        raise DataError(f"{path}: the file has a header but no data rows")
    return CsvTable(path=path, header=header, rows=rows, lines=lines)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"data file {path} is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror}") from None


# -- sources -----------------------------------------------------------------------------

class DataSource:
    """Where a device's own examples come from; `load` reads and checks them once."""

    kind: ClassVar[str]

    def load(self, spec: InputSpec) -> Dataset:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class CsvSource(DataSource):
    """Feature columns then a label column: the last one, or the column named `label`."""

    path: Path
    label: str = ""
    kind: ClassVar[str] = "csv"

    def load(self, spec: InputSpec) -> Dataset:
        table = read_csv(self.path)
        width = len(table.rows[0])
        label = table.column_index(self.label) if self.label else width - 1
        features = [c for c in range(width) if c != label]
        if len(features) != spec.width:
            raise DataError(f"{self.path}: {len(features)} feature columns (+1 label), task "
                            f"{spec.task!r} needs {spec.width}")
        y = self._labels(table, label, spec)
        return check_dataset(table.numbers(features), y, spec, str(self.path))

    def _labels(self, table: CsvTable, column: int, spec: InputSpec) -> np.ndarray:
        """Class ids, or else class names where the task has them (e.g. `Walking`)."""
        ids = {name: i for i, name in enumerate(spec.class_names)}
        y = np.empty(len(table.rows), dtype=np.int64)
        for r, row in enumerate(table.rows):
            cell = row[column]
            if _is_number(cell):
                value = float(cell)
                if not value.is_integer() or not 0 <= value < spec.classes:
                    raise DataError(f"{table.where(r, column)}: label {cell} is not a class id "
                                    f"in [0, {spec.classes}) for task {spec.task!r}")
                y[r] = int(value)
            elif cell in ids:
                y[r] = ids[cell]
            else:
                listed = 0 < len(ids) <= 20  # activity names, not 96 keyboard characters
                names = f" or a class name ({', '.join(spec.class_names)})" if listed else ""
                raise DataError(f"{table.where(r, column)}: label {cell!r} is not a class "
                                f"id{names}")
        return y

    def describe(self) -> str:
        return f"csv:{self.path}" + (f" (label column {self.label!r})" if self.label else "")


@dataclass(frozen=True)
class NpzSource(DataSource):
    """Arrays `x` (examples) and `y` (class ids) in one .npz; never unpickled."""

    path: Path
    kind: ClassVar[str] = "npz"

    def load(self, spec: InputSpec) -> Dataset:
        try:
            # our own handle: np.load leaves its file open when the zip is torn
            with open(self.path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
                missing = [k for k in ("x", "y") if k not in npz.files]
                if missing:
                    raise DataError(f"{self.path}: no array {' or '.join(missing)}; it holds "
                                    f"{', '.join(npz.files) or 'nothing'} (need x and y)")
                x, y = npz["x"], npz["y"]
        except FileNotFoundError:
            raise DataError(f"data file {self.path} does not exist") from None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            # not a zip, truncated (a file caught mid-write), object arrays
            raise DataError(f"{self.path} is not a readable .npz of numeric arrays: {exc}") \
                from None
        return check_dataset(x, y, spec, str(self.path))

    def describe(self) -> str:
        return f"npz:{self.path}"


@dataclass(frozen=True)
class TextSource(DataSource):
    """The user's own typing, cut into (window of character ids, next character) examples
    with the keyboard task's vocabulary; the most recent `max_samples` windows are kept."""

    path: Path
    max_samples: int = DEFAULT_MAX_SAMPLES
    kind: ClassVar[str] = "text"

    def load(self, spec: InputSpec) -> Dataset:
        from fedmq.tasks import keyboard

        if spec.dtype.kind not in "iu" or len(spec.shape) != 1:
            raise DataError(f"text:{self.path}: task {spec.task!r} does not take character "
                            "windows; text data is for the keyboard task")
        window = spec.shape[0]
        ids = keyboard.encode(_read_text(self.path))
        if len(ids) <= window:
            raise DataError(f"{self.path}: {len(ids)} characters; at least {window + 1} are "
                            f"needed for one example of a {window}-character window")
        x, y = keyboard.windows(ids[-(self.max_samples + window):], seq_len=window)
        return check_dataset(x, y, spec, str(self.path))

    def describe(self) -> str:
        return f"text:{self.path} (up to {self.max_samples} windows)"


@dataclass(frozen=True)
class PythonSource(DataSource):
    """`package.module:function`: called once, yields (x, y) batches or single examples
    (a live sensor) until `max_samples` are collected or it stops."""

    target: str
    max_samples: int = DEFAULT_MAX_SAMPLES
    kind: ClassVar[str] = "python"

    def __post_init__(self) -> None:
        module, sep, name = self.target.partition(":")
        if not (module and sep and name):
            raise ConfigError(f"data source python:{self.target} must be "
                              "python:package.module:function")

    def _function(self) -> Callable[[], Iterable]:
        module_name, _, name = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"data source python:{self.target}: cannot import "
                              f"{module_name}: {exc}") from None
        func = getattr(module, name, None)
        if not callable(func):
            raise ConfigError(f"data source python:{self.target}: {module_name} has no "
                              f"function {name!r}")
        return func

    def load(self, spec: InputSpec) -> Dataset:
        source = f"python:{self.target}"
        xs, ys, count = [], [], 0
        try:
            batches = iter(self._function()())
            try:
                for item in batches:
                    x, y = _as_batch(item, spec, source)
                    xs.append(x[: self.max_samples - count])
                    ys.append(y[: self.max_samples - count])
                    count += len(xs[-1])
                    if count >= self.max_samples:
                        break
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
        except (DataError, ConfigError):
            raise
        except Exception as exc:  # the user's code: any failure is a data problem, named
            raise DataError(f"{source} failed: {type(exc).__name__}: {exc}") from exc
        if not xs:
            raise DataError(f"{source} yielded no examples")
        return check_dataset(np.concatenate(xs), np.concatenate(ys), spec, source)

    def describe(self) -> str:
        return f"python:{self.target} (up to {self.max_samples} examples)"


def _as_batch(item, spec: InputSpec, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One yielded (x, y): a batch, or a single example with a scalar label."""
    try:
        x, y = item
    except (TypeError, ValueError):
        raise DataError(f"{source} must yield (x, y) pairs, got {type(item).__name__}") from None
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim == 0:
        x, y = x[None], y[None]
    if len(x) != len(y):
        raise DataError(f"{source} yielded {len(x)} examples with {len(y)} labels")
    return x, y


# -- configuration -----------------------------------------------------------------------

_KINDS: dict[str, Callable[..., DataSource]] = {}


def register_source(kind: str, factory: Callable[..., DataSource]) -> None:
    """factory(rest_of_the_string, label=..., max_samples=...) -> DataSource."""
    if kind in _KINDS:
        raise ValueError(f"data source kind {kind!r} is registered twice")
    _KINDS[kind] = factory


register_source("csv", lambda rest, *, label, max_samples: CsvSource(Path(rest), label))
register_source("npz", lambda rest, *, label, max_samples: NpzSource(Path(rest)))
register_source("text", lambda rest, *, label, max_samples: TextSource(Path(rest), max_samples))
register_source("python", lambda rest, *, label, max_samples: PythonSource(rest, max_samples))


def parse_source(text: str, *, label: str = "",
                 max_samples: int = DEFAULT_MAX_SAMPLES) -> DataSource | None:
    """`kind:rest` -> a DataSource; empty -> None (the bundled task shard)."""
    if not text.strip():
        return None
    kind, sep, rest = text.strip().partition(":")
    factory = _KINDS.get(kind)
    if not sep or factory is None or not rest:
        raise ConfigError(f"data_source {text!r} must be KIND:WHERE with KIND one of "
                          f"{', '.join(sorted(_KINDS))}, e.g. csv:/var/lib/fedmq/data.csv")
    if max_samples < 1:
        raise ConfigError(f"data_max_samples must be >= 1, not {max_samples}")
    if label and kind != "csv":
        raise ConfigError(f"data_label is only for csv data sources, not {kind}")
    return factory(rest, label=label, max_samples=max_samples)


def load_source(text: str, task: str, *, label: str = "",
                max_samples: int = DEFAULT_MAX_SAMPLES) -> Dataset:
    """Parse, read and check a device's data for `task`; raises DataError/ConfigError."""
    source = parse_source(text, label=label, max_samples=max_samples)
    if source is None:
        raise ConfigError("no data_source configured")
    return source.load(InputSpec.from_task(task_spec(task)))


__all__ = ["CsvSource", "DataSource", "InputSpec", "NpzSource", "PythonSource", "TextSource",
           "check_dataset", "load_source", "parse_source", "read_csv", "register_source",
           "task_class_names"]
