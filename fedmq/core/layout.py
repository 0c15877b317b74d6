"""The flat parameter layout shared by agent and aggregator, with a hash checked per update."""

from __future__ import annotations

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
