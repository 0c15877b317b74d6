"""The flat parameter layout shared by agent and aggregator, with a hash checked per update."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class ParamLayout:
    """Ordered (name, shape) pairs: how one flat float32 vector splits into tensors."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    @property
    def hash(self) -> str:
        canonical = json.dumps([[n, list(s)] for n, s in self.entries], separators=(",", ":"))
        # 32 bits: enough to catch a mismatched build, and every update carries it
        return hashlib.sha256(canonical.encode()).hexdigest()[:8]

    def to_wire(self) -> list[Any]:
        return [[name, list(shape)] for name, shape in self.entries]

    @classmethod
    def from_wire(cls, data: Any) -> ParamLayout:
        try:
            entries = tuple((str(n), tuple(int(d) for d in s)) for n, s in data)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad parameter layout: {exc}", reason="bad_layout") from None
        if any(d < 0 for _, s in entries for d in s):
            raise ProtocolError("negative dimension in layout", reason="bad_layout")
        return cls(entries)

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views into `flat`, one per named tensor (no copies)."""
        if flat.size != self.size:
            raise ProtocolError(
                f"flat vector has {flat.size} values, layout needs {self.size}", reason="bad_shape"
            )
        out, offset = {}, 0
        for name, shape in self.entries:
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].reshape(shape)
            offset += n
        return out


@dataclass(frozen=True, slots=True)
class LayoutMask:
    """Which tensors of a layout federate (shared) and which never leave the device
    (personal: FedPer / FedRep's personal layers), by fnmatch patterns on their names.

    An update carries the shared tensors only, in layout order: its vector has
    `shared.size` values and its layout hash is `shared.hash`, on the device and on the
    aggregator alike. Without patterns every tensor is shared.
    """

    layout: ParamLayout
    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in self.patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in self.layout.entries):
                names = ", ".join(name for name, _ in self.layout.entries)
                raise ProtocolError(f"personal layer pattern {pattern!r} matches none of the "
                                    f"model's tensors ({names})", reason="bad_layout")
        if self.patterns and not self.shared.entries:
            raise ProtocolError(f"personal layers {list(self.patterns)} cover every tensor: "
                                "nothing would be federated", reason="bad_layout")

    def is_personal(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    @property
    def shared(self) -> ParamLayout:
        """The sub-layout that federates."""
        return ParamLayout(tuple(e for e in self.layout.entries if not self.is_personal(e[0])))

    @property
    def personal(self) -> ParamLayout:
        """The sub-layout that stays on the device."""
        return ParamLayout(tuple(e for e in self.layout.entries if self.is_personal(e[0])))

    @property
    def index(self) -> np.ndarray:
        """Positions of the shared values in the flat vector, ascending (a bool mask)."""
        mask = np.ones(self.layout.size, dtype=bool)
        offset = 0
        for name, shape in self.layout.entries:
            n = math.prod(shape)
            if self.is_personal(name):
                mask[offset:offset + n] = False
            offset += n
        return mask

    def take_shared(self, flat: np.ndarray) -> np.ndarray:
        """The shared values of a full vector, as a new array."""
        self._check(flat)
        return flat[self.index] if self.patterns else flat.copy()

    def take_personal(self, flat: np.ndarray) -> np.ndarray:
        self._check(flat)
        return flat[~self.index]

    def merge(self, *, shared: np.ndarray, personal: np.ndarray) -> np.ndarray:
        """The full vector from its shared and personal values."""
        index = self.index
        if shared.size != int(index.sum()) or personal.size != index.size - int(index.sum()):
            raise ProtocolError(f"{shared.size} shared + {personal.size} personal values do "
                                f"not fill the layout's {index.size}", reason="bad_shape")
        out = np.empty(index.size, dtype=np.float32)
        out[index] = shared
        out[~index] = personal
        return out

    def _check(self, flat: np.ndarray) -> None:
        if flat.size != self.layout.size:
            raise ProtocolError(f"flat vector has {flat.size} values, layout needs "
                                f"{self.layout.size}", reason="bad_shape")
