"""Error feedback: what compression dropped this round is added to the next round's delta.

Top-k and 1-bit sign diverge without it and match uncompressed SGD with it (Karimireddy
et al. 2019). The residual lives on the device and survives restarts via state_dict().
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmq.core.codecs.pipeline import decode, encode
from fedmq.core.codecs.spec import CodecSpec, parse_spec
from fedmq.core.protocol import EncodedTensor
from fedmq.errors import ConfigError


class ErrorFeedback:
    def __init__(self, spec: CodecSpec) -> None:
        self.spec = spec
        self.residual: np.ndarray | None = None

    def encode(self, delta: np.ndarray, *, rng: np.random.Generator) -> EncodedTensor:
        """Encode delta + residual; keep exactly what the decoder will not see."""
        corrected = np.asarray(delta, dtype=np.float32).ravel().copy()
        if self.residual is not None and self.residual.shape == corrected.shape:
            corrected += self.residual
        tensor = encode(corrected, self.spec, rng=rng)
        self.residual = corrected - decode(tensor)
        return tensor

    def state_dict(self) -> dict[str, Any]:
        return {"spec": str(self.spec), "residual": self.residual}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the residual; a residual saved under another codec is dropped, not mixed."""
        if state.get("spec") == str(self.spec) and state.get("residual") is not None:
            self.residual = np.asarray(state["residual"], dtype=np.float32)

    @classmethod
    def resume(cls, state: dict[str, Any], *, default: CodecSpec) -> ErrorFeedback:
        """The feedback saved in `state`, under the spec it was saved with: a device whose
        server assigns codecs owes its residual whichever codec sends the next delta.
        `default` when nothing was saved, or under a codec this build cannot parse."""
        try:
            spec = parse_spec(state["spec"]) if state.get("spec") else default
        except (ConfigError, TypeError):
            spec = default
        feedback = cls(spec)
        feedback.load_state_dict(state)
        return feedback
