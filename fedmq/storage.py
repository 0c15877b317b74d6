"""Durable local state: atomic files holding msgpack with explicit dtype/shape arrays.

Used by the aggregator's checkpoints and by device-side state. Nothing is ever pickled.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedmq.errors import ConfigError, FedmqError

_ARRAY = "__ndarray__"
# Numeric dtypes only: object arrays would smuggle pickles back in.
_ALLOWED_KINDS = set("biuf")


class StateError(FedmqError):
    """A state file is corrupt or from an incompatible version."""


def _as_is(item: Any) -> Any:
    return item


@dataclass(frozen=True, slots=True, eq=False)
class AppendOnly:
    """A list in a state that only grows: a store that saves the state often may write only
    what was appended since its last save (aggregator/checkpoint.py); elsewhere it is
    saved as the plain list of its items, each through `pack`.

    The first `count` of `items` belong to the state; `items` is the owner's own list,
    not a copy (a snapshot costs nothing however long it is), which it may go on
    appending to meanwhile, but never change otherwise: a new list starts over. `name`
    tells one such list of a state from another."""

    name: str
    items: Sequence[Any]
    count: int
    pack: Callable[[Any], Any] = _as_is

    def packed(self, start: int = 0) -> list[Any]:
        """The items from `start` on, each packed."""
        return [self.pack(item) for item in self.items[start:self.count]]


def _contiguous(arr: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns a 0-d array into a 1-d one
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"cannot persist arrays of dtype {obj.dtype}")
        arr = _contiguous(obj)
        # a byte view, not tobytes(): a 1M-parameter checkpoint is copied once, not twice
        return {_ARRAY: True, "dtype": arr.dtype.str, "shape": list(arr.shape),
                "data": memoryview(arr.reshape(-1)).cast("B") if arr.size else b""}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, AppendOnly):
        return obj.packed()
    raise TypeError(f"cannot persist {type(obj).__name__}")


def _decode(obj: dict) -> Any:
    if obj.get(_ARRAY) is True:
        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in _ALLOWED_KINDS:
            raise StateError(f"refusing array of dtype {dtype}")
        return np.frombuffer(obj["data"], dtype=dtype).reshape(obj["shape"]).copy()
    return obj


_SKELETON_LEN = struct.Struct("<Q")


def dump_parts(state: Any, *, appended: Callable[[AppendOnly], Any] | None = None,
               ) -> list[bytes | memoryview]:
    """`state` as buffers to write one after another, arrays not copied: a length-prefixed
    msgpack skeleton in which each array names its dtype and shape, then the arrays' bytes.
    For state written often (the aggregator's open round): msgpack would copy each array
    into its growing output buffer several times. `appended` says what to write in place
    of each AppendOnly list (by default, its items)."""
    arrays: list[memoryview] = []

    def by_reference(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in _ALLOWED_KINDS:
                raise TypeError(f"cannot persist arrays of dtype {obj.dtype}")
            arr = _contiguous(obj)
            arrays.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b""))
            return {_ARRAY: True, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        if appended is not None and isinstance(obj, AppendOnly):
            return appended(obj)
        return _encode(obj)

    skeleton = msgpack.packb(state, default=by_reference, use_bin_type=True)
    return [_SKELETON_LEN.pack(len(skeleton)), skeleton, *arrays]


def load_parts(data: bytes | memoryview) -> Any:
    """The inverse of dump_parts (StateError if the bytes do not add up)."""
    data = memoryview(data)
    offset = _SKELETON_LEN.size

    def from_reference(obj: dict) -> Any:
        nonlocal offset
        if obj.get(_ARRAY) is not True:
            return obj
        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in _ALLOWED_KINDS:
            raise StateError(f"refusing array of dtype {dtype}")
        shape = [int(n) for n in obj["shape"]]
        nbytes = dtype.itemsize * int(np.prod(shape))
        if offset + nbytes > len(data):
            raise StateError("state file is truncated")
        arr = np.frombuffer(data[offset:offset + nbytes], dtype=dtype).reshape(shape).copy()
        offset += nbytes
        return arr

    try:
        (length,) = _SKELETON_LEN.unpack_from(data)
        offset += length
        if offset > len(data):
            raise StateError("state file is truncated")
        return msgpack.unpackb(data[_SKELETON_LEN.size:offset], object_hook=from_reference,
                               raw=False, strict_map_key=False)
    except StateError:
        raise
    except Exception as exc:
        raise StateError(f"state file is corrupt: {exc}") from None


def dumps(state: Any) -> bytes:
    return msgpack.packb(state, default=_encode, use_bin_type=True)


def loads(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)
    except StateError:
        raise
    except Exception as exc:
        raise StateError(f"state file is corrupt: {exc}") from None


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write-then-rename with fsyncs: after a crash the file is the old or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def check_writable(path: str | os.PathLike[str], *, what: str, directory: bool = False) -> None:
    """ConfigError naming `what` (the option) unless `path` can be written: a file whose
    folder takes new files (write-then-rename needs that), or with `directory` a folder.
    Said at start-up, in words, not as a traceback from the first save an hour later.
    Folders that do not exist yet are created, as the first save would."""
    path = Path(path)
    folder = path if directory else path.parent
    try:
        if not directory and path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
        _check_ancestors(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fedmq-probe-")
        os.close(fd)
        os.unlink(probe)
        if not directory and path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "cannot be written", str(path))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename and exc.filename != str(path) else ""
        raise ConfigError(f"{what} {path} cannot be written ({where}{exc.strerror or exc}); "
                          f"choose another path for {what} or fix its permissions") from None


def _check_ancestors(folder: Path) -> None:
    """The nearest existing ancestor must be a folder (mkdir would say 'File exists')."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "is a file, not a directory",
                                         str(parent))
            return


# fdatasync skips the metadata an in-place rewrite does not need; macOS lacks it.
datasync = getattr(os, "fdatasync", os.fsync)


def pwrite_all(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> int:
    """Write `buffers` one after another from `offset` (pwrite may stop short: whatever
    is left goes on); the bytes written. For files rewritten in place (checkpoint slots,
    the device's outbox slots)."""
    start = offset
    for buffer in buffers:
        view = memoryview(buffer)
        while view:
            written = os.pwrite(fd, view, offset)
            offset += written
            view = view[written:]
    return offset - start


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the names in a directory (a rename, a new file) survive a crash."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_state(path: str | os.PathLike[str], state: Any) -> None:
    atomic_write(path, dumps(state))


def load_state(path: str | os.PathLike[str]) -> Any | None:
    """The saved state, or None when there is no file yet."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return loads(data)
