"""`systemctl reload|restart mosquitto` for tests/test_recipe.py: starts (or reloads) a
private mosquitto from the config `deploy/install.sh broker` installed under $DESTDIR.

The installed config is used as written but for what a temporary root needs: its paths
point into $DESTDIR, its port 8883 becomes $FEDMQ_RECIPE_PORT, and a broker started by
root stays root (it would drop to the `mosquitto` user, which cannot read a private
temporary directory). Every rewrite must apply, so a changed production.conf fails loudly.
The broker runs on in the caller's process group; its pid is in $DESTDIR/run/mosquitto.pid.

    python -m tests.recipe_broker reload|restart mosquitto
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from simulator.broker import LocalMosquitto, as_invoking_user, port_open

START_S = 30.0


def rewrite(text: str, root: Path, port: int) -> str:
    replacements = {
        "/etc/mosquitto/": f"{root}/etc/mosquitto/",
        "/var/lib/mosquitto/": f"{root}/var/lib/mosquitto/",
        "/var/log/mosquitto/": f"{root}/var/log/mosquitto/",
    }
    for old, new in replacements.items():
        if old not in text:
            raise SystemExit(f"the installed mosquitto.conf no longer names {old}")
        text = text.replace(old, new)
    # The port only: the address is the one install.sh --listen wrote.
    text, count = re.subn(r"^listener 8883 ", f"listener {port} ", text, flags=re.MULTILINE)
    if count != 1:
        raise SystemExit(f"expected one `listener 8883 ADDRESS` line, found {count}")
    return as_invoking_user(text)


def main(argv: list[str]) -> int:
    if argv[1:] != ["mosquitto"] or argv[0] not in ("reload", "restart"):
        raise SystemExit(f"recipe_broker: unexpected systemctl {' '.join(argv)}")
    root = Path(os.environ["DESTDIR"])
    port = int(os.environ["FEDMQ_RECIPE_PORT"])
    run = root / "run"
    pid_file = run / "mosquitto.pid"
    if pid_file.exists():  # reload: re-read the password file and the ACLs
        os.kill(int(pid_file.read_text()), signal.SIGHUP)
        return 0
    for folder in (run, root / "var/lib/mosquitto", root / "var/log/mosquitto"):
        folder.mkdir(parents=True, exist_ok=True)  # the mosquitto package makes these
    config = run / "mosquitto.conf"
    config.write_text(rewrite((root / "etc/mosquitto/mosquitto.conf").read_text(), root, port))
    binary = LocalMosquitto(workdir=run).binary
    proc = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=(run / "mosquitto.stderr").open("wb"))
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + START_S
    while not port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            log = root / "var/log/mosquitto/mosquitto.log"
            raise SystemExit("mosquitto did not start: "
                             + (run / "mosquitto.stderr").read_text()
                             + (log.read_text()[-2000:] if log.exists() else ""))
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
