"""Set keys of a flat TOML config file in place (`fedmq enroll ... --config FILE`).

Pasting a printed snippet under an example config repeats keys the example already sets,
which TOML forbids. This rewrites the line of each key the file sets and appends the
others, keeping every comment, the file's mode and its owner (so `sudo fedmq enroll` may
write into a file that root:fedmq 0640 or the invoking user owns). Written here rather than
with a TOML library: the standard library reads TOML but cannot write it, and the configs
are flat `key = "string"` lines, which the result is checked against before it is saved.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from fedmq.errors import ConfigError
from fedmq.storage import atomic_write

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def render(values: Mapping[str, str]) -> str:
    """`key = "value"` lines; JSON strings are valid TOML basic strings (same escapes)."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def set_keys(path: str | Path, values: Mapping[str, str], *, comment: str = "") -> Path:
    """Write `values` into the TOML file at `path` (created 0600 if missing).

    A key the file sets at the top level has its line replaced; the other keys are appended
    after `comment`. Nothing is written unless the result parses and holds every value.
    """
    path = Path(path)
    try:
        old = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    lines = old.splitlines(keepends=True)
    missing = dict(values)
    for i, line in enumerate(lines):
        for key in list(missing):
            if re.match(rf"{re.escape(key)}\s*=", line):
                lines[i] = render({key: missing.pop(key)})
                break
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if missing:
        lines += ["\n" if lines else "", f"# {comment}\n" if comment else "", render(missing)]
    text = "".join(lines)
    _check(path, text, values)
    stat = path.stat() if path.exists() else None
    atomic_write(path, text.encode())  # a fresh file is born 0600 (mkstemp)
    if stat is not None:
        os.chmod(path, stat.st_mode & 0o7777)
        if (stat.st_uid, stat.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(path, stat.st_uid, stat.st_gid)
    return path


def _check(path: Path, text: str, values: Mapping[str, str]) -> None:
    """The rewritten file must parse and say exactly `values` (a key inside a [table], a
    multi-line value or a key set twice would not): refuse rather than save it broken."""
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} would not be valid TOML after setting "
                          f"{', '.join(values)} ({exc}); set them by hand") from None
    wrong = [key for key, value in values.items() if parsed.get(key) != value]
    if wrong:
        raise ConfigError(f"cannot set {', '.join(wrong)} in {path} (a [table] or a "
                          "multi-line value in the way?); set them by hand")
