"""README.md's two-machine recipe, run as written on one machine.

The two ```sh blocks of "Running agent and aggregator on separate machines" run in bash,
changed only where one machine stands in for several (CHANGES below; each must apply, so
an edited recipe fails here instead of drifting): the server's address is 127.0.0.1 and
its port a free one; /etc lives under a temporary root (DESTDIR for install.sh, and the
password file `fedmq enroll` writes by default); `sudo` runs its command as it is; and
`systemctl reload mosquitto` starts, then reloads, a private mosquitto from the config
install.sh wrote there (tests/recipe_broker.py). The server block runs in a clean
directory made to look like a checkout (deploy/ and broker_config/ linked in); three
devices each run the device block in a directory of their own holding the files the
README says to copy. Every process is stopped at teardown, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.broker import free_port, port_open

from .helpers import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Running agent and aggregator on separate machines"
DEVICES = 3
ROUNDS = 2  # signed rounds every device took part in
PORT = 8883  # the recipe's; the test's broker gets a free one


def recipe_blocks() -> list[str]:
    """The ```sh blocks of the README's recipe section, in order."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


def change(text: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        if old not in text:
            raise AssertionError(f"the README's recipe no longer contains {old!r}")
        text = text.replace(old, new)
    return text


# Shell functions standing in for what one machine cannot do as written.
PRELUDE = """\
set -euo pipefail
sudo() { "$@"; }
systemctl() { "$PYTHON" -m tests.recipe_broker "$@"; }
"""

# `fedmq` on PATH: this checkout, with enroll's default password file (under /etc) moved
# into the temporary root like every other /etc path.
SHIM = """#!/bin/sh
if [ "$1" = enroll ]; then
    shift
    set -- enroll --password-file "$DESTDIR/etc/mosquitto/fedmq/passwd" "$@"
fi
exec "$PYTHON" -m fedmq.cli "$@"
"""


class Script:
    """One recipe block running in bash in its own session (so it and all it started can
    be killed together); output in `log`."""

    def __init__(self, name: str, text: str, cwd: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = cwd / f"{name}.log"
        path = cwd / f"{name}.sh"
        path.write_text(PRELUDE + text)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(["bash", str(path)], cwd=cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_running(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"{self.name} exited with {code}:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM to the whole session (the services stop cleanly), SIGKILL if it hangs."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(20)
                break
            except subprocess.TimeoutExpired:
                continue


def rounds_with_everyone(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return sum(1 for record in lines if record["participants"] == DEVICES)


def stop_broker(root: Path) -> None:
    """The broker tests/recipe_broker.py started, if it did (also when the script failed)."""
    pid_file = root / "run" / "mosquitto.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_the_readme_two_machine_recipe_trains_signed_rounds_over_tls(tmp_path, stoppers):
    server_block, device_block = recipe_blocks()
    port = free_port()
    root, server, bin_dir = tmp_path / "root", tmp_path / "server", tmp_path / "bin"
    for folder in (root, server, bin_dir):
        folder.mkdir()
    for item in ("deploy", "broker_config", "pyproject.toml"):  # a checkout, to install.sh
        (server / item).symlink_to(REPO / item)
    (bin_dir / "fedmq").write_text(SHIM)
    (bin_dir / "fedmq").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "DESTDIR": str(root),
           "FEDMQ_RECIPE_PORT": str(port)}
    stoppers(lambda: stop_broker(root))
    scripts = [Script("server", change(server_block, {"SERVER=192.0.2.10": "SERVER=127.0.0.1",
                                                      f":{PORT}": f":{port}"}), server, env)]
    stoppers(scripts[0].stop)
    wait_for(lambda: port_open(port) or scripts[0].proc.poll() is not None,
             "the broker, started once every account is enrolled")
    scripts[0].check_running()

    for n in range(1, DEVICES + 1):
        device = tmp_path / f"pi-{n}"
        device.mkdir()
        for source in (server / f"pi-{n}.toml", server / "fedmq-pki" / "ca.crt",
                       server / "fedmq-keys" / "model-signing.pub"):
            shutil.copy(source, device)
        scripts.append(Script(f"pi-{n}", change(device_block, {"N=1": f"N={n}"}), device, env))
        stoppers(scripts[-1].stop)

    def progress() -> int:
        for script in scripts:
            script.check_running()
        return rounds_with_everyone(server / "metrics.jsonl")

    wait_for(lambda: progress() >= ROUNDS, f"{ROUNDS} rounds with all {DEVICES} devices",
             timeout=90)

    # Over TLS: the broker the recipe installed has one listener, TLS, where it was told.
    installed = (root / "etc/mosquitto/mosquitto.conf").read_text()
    assert re.findall(r"^listener .*$", installed, flags=re.MULTILINE) == [
        f"listener {PORT} 127.0.0.1"]
    assert "allow_anonymous false" in installed and "certfile" in installed
    broker_log = (root / "var/log/mosquitto/mosquitto.log").read_text()
    for name in ("fedmq-aggregator", *(f"pi-{n}" for n in range(1, DEVICES + 1))):
        assert f"u'{name}'" in broker_log, f"{name} never logged in with its account"
    # Signed: the aggregator signs with the key whose public half every agent requires
    # (an agent refuses anything else, and yet they all trained every round).
    signer = re.search(r"model announcements are signed with key (\w+)", scripts[0].output())
    assert signer, scripts[0].output()[-3000:]
    for script in scripts[1:]:
        text = script.output()
        assert f"only models signed with key {signer.group(1)} are accepted" in text, text
        assert not re.search(r"rejected \S+ message \((unsigned|wrong_key|bad_signature)",
                             text), text
