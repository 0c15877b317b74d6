"""`fedmq enroll DEVICE_ID`: create a device's broker account and print its agent config.

`--role aggregator` and `--role keyholder` (the HE key holder, `fedmq keyholder`) enroll
the server's accounts the same way; broker_config/acl.conf grants their rights to the
user names `fedmq-aggregator` and `fedmq-keyholder`.

Two kinds of credentials, matching the two listeners of broker_config/production.conf:
a password (port 8883), added to mosquitto's password file with `mosquitto_passwd`, or a
client certificate from the fleet CA (port 8884, `--cert`). Either way the account name is
the device id, because the topic ACLs (broker_config/acl.conf) confine each account to the
topics carrying its own name. The TOML keys it makes are printed (a config file of their
own) or, with `--config FILE`, written into an existing config in place: pasting them under
an example config would repeat keys it already sets.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedmq.core.protocol.topics import check_name
from fedmq.core.signing import PUBLIC_NAME
from fedmq.errors import BrokerError, ConfigError
from fedmq.ops.certs import DEFAULT_DIR, Pki
from fedmq.ops.configfile import render, set_keys

DEFAULT_PASSWORD_FILE = "/etc/mosquitto/fedmq/passwd"
# Where the printed snippet says the device keeps its files (deploy/install.sh makes it).
DEVICE_DIR = "/etc/fedmq"
PASSWORD_PORT = 8883
CERT_PORT = 8884
PASSWORD_BYTES = 24  # 32 URL-safe characters: no quoting trouble in TOML or shells
ROLES = ("device", "aggregator", "keyholder")
# The user names broker_config/acl.conf grants the servers' topics to.
ACL_USERS = {"aggregator": "fedmq-aggregator", "keyholder": "fedmq-keyholder"}
# Where deploy/install.sh puts each role's config (and, for the key holder, its key files).
CONFIGS = {"device": "agent.toml", "aggregator": "aggregator.toml",
           "keyholder": "keyholder.toml"}
KEYHOLDER_DIR = "/etc/fedmq-keyholder"
PASSWD_HINT = ("mosquitto_passwd is not installed; on Debian/Ubuntu run: sudo apt-get install "
               "-y mosquitto (or use --cert for a client certificate instead)")


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What a device, the aggregator or the key holder needs to log in; rendered as the
    keys of its config."""

    name: str
    broker: str
    fleet: str
    role: str = "device"
    password: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    model_public_key: str = ""  # where the device keeps the aggregator's public key
    signing_key: str = ""  # where the aggregator keeps its private signing key

    def keys(self) -> dict[str, object]:
        """Keys of AgentConfig (role device), AggregatorConfig (role aggregator) or
        KeyHolderConfig (role keyholder). An enrolled fleet's aggregator refuses updates
        from devices that never announced themselves (require_known_devices;
        docs/security.md)."""
        id_key = "device_id" if self.role == "device" else "client_id"
        values: dict[str, object] = {"broker": self.broker, "fleet": self.fleet,
                                     id_key: self.name}
        if self.password:
            values |= {"username": self.name, "password": self.password}
        values |= {key: value for key, value in (("ca_file", self.ca_file),
                                                 ("cert_file", self.cert_file),
                                                 ("key_file", self.key_file),
                                                 ("model_public_key", self.model_public_key),
                                                 ("signing_key", self.signing_key))
                   if value}
        if self.role == "aggregator":
            values["require_known_devices"] = True
        return values

    def toml(self) -> str:
        return render(self.keys())


def add_password(password_file: str | Path, name: str, password: str, *,
                 force: bool = False) -> Path:
    """Add (or with force, replace) `name` in mosquitto's password file via mosquitto_passwd.

    The password goes through stdin, never the command line (other users can read that).
    """
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        raise BrokerError(PASSWD_HINT)
    path = Path(password_file)
    if not path.parent.is_dir():
        raise ConfigError(f"directory {path.parent} of the password file does not exist; "
                          "create it (see broker_config/README.md) or pass --password-file")
    existed = path.exists()
    if existed and name in password_users(path) and not force:
        raise ConfigError(f"{name} already has a password in {path}; pass --force to "
                          "replace it (the device then needs the new one)")
    args = [binary, *(() if existed else ("-c",)), str(path), name]
    try:
        result = subprocess.run(args, input=f"{password}\n{password}\n", text=True,
                                capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"{binary} failed: {exc}") from exc
    if result.returncode != 0:
        raise BrokerError(f"mosquitto_passwd could not update {path}: "
                          f"{(result.stderr or result.stdout).strip()}")
    if not existed:
        os.chmod(path, 0o600)  # hashes only, but offline guessing is still guessing
    return path


def password_users(path: Path) -> set[str]:
    """User names in a mosquitto password file (`user:hash` lines)."""
    return {line.split(":", 1)[0] for line in path.read_text().splitlines()
            if ":" in line and not line.startswith("#")}


def enroll(name: str, *, fleet: str, broker: str, role: str = "device",
           password_file: str | Path = DEFAULT_PASSWORD_FILE, cert: bool = False,
           pki_dir: str | Path = DEFAULT_DIR, device_dir: str = "",
           model_public_key: str = "", signing_key: str = "",
           force: bool = False) -> Enrollment:
    """Create the account and return what the device's config must say.

    model_public_key: the path, on the device, of the aggregator's public signing key
    (`fedmq keys init`); the device then refuses models that key did not sign.
    signing_key: the path of that private key on the aggregator (role aggregator).
    device_dir: where the machine keeps ca.crt and its key (empty: /etc/fedmq, or
    /etc/fedmq-keyholder for the key holder, as deploy/install.sh lays them out).
    """
    check_name(name, "device id")
    check_name(fleet, "fleet name")
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if model_public_key and role != "device":
        raise ConfigError("--model-public-key belongs in a device's config; the aggregator "
                          "signs with the private half (signing_key; --signing-key with "
                          "--role aggregator), the key holder needs neither")
    if signing_key and role != "aggregator":
        raise ConfigError("--signing-key belongs in the aggregator's config (--role "
                          "aggregator); devices get the public half (--model-public-key)")
    device_dir = device_dir or (KEYHOLDER_DIR if role == "keyholder" else DEVICE_DIR)
    ca_file = f"{device_dir}/ca.crt"
    if cert:
        Pki(pki_dir).issue_client(name, force=force)
        return Enrollment(name, broker, fleet, role, ca_file=ca_file,
                          cert_file=f"{device_dir}/{name}.crt",
                          key_file=f"{device_dir}/{name}.key",
                          model_public_key=model_public_key, signing_key=signing_key)
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    add_password(password_file, name, password, force=force)
    return Enrollment(name, broker, fleet, role, password=password, ca_file=ca_file,
                      model_public_key=model_public_key, signing_key=signing_key)


# --- command line ------------------------------------------------------------------------

def configure(p: argparse.ArgumentParser) -> None:
    """`fedmq enroll DEVICE_ID`."""
    p.add_argument("device_id", help="the device's id: also its MQTT user name / CN")
    p.add_argument("--fleet", default="default", help="fleet name (default: default)")
    p.add_argument("--broker", default="",
                   help="broker URL devices dial (default: mqtts://THIS-HOST:8883, or :8884 "
                   "with --cert)")
    p.add_argument("--cert", action="store_true",
                   help="issue a client certificate instead of a password")
    p.add_argument("--password-file", default=DEFAULT_PASSWORD_FILE,
                   help=f"mosquitto password file (default: {DEFAULT_PASSWORD_FILE})")
    p.add_argument("--pki", default=DEFAULT_DIR,
                   help=f"CA directory for --cert (default: ./{DEFAULT_DIR})")
    p.add_argument("--device-dir", default="",
                   help="where the device (or the aggregator) keeps ca.crt and its key "
                   f"(default: {DEVICE_DIR}; {KEYHOLDER_DIR} with --role keyholder)")
    p.add_argument("--model-public-key", default="", metavar="PATH",
                   help="the device's copy of the aggregator's public signing key (fedmq "
                   "keys init): adds model_public_key, so it refuses unsigned models")
    p.add_argument("--signing-key", default="", metavar="PATH",
                   help="with --role aggregator: the aggregator's private signing key (fedmq "
                   "keys init): adds signing_key, so it signs every model")
    p.add_argument("--role", choices=ROLES, default="device",
                   help="aggregator, keyholder (the HE key holder): client_id instead of "
                   "device_id; acl.conf knows them as fedmq-aggregator and fedmq-keyholder")
    p.add_argument("--config", default="", metavar="FILE",
                   help="write the keys into this config file (replacing the lines that set "
                   "them, keeping the rest; created 0600 if missing) instead of printing them")
    p.add_argument("--force", action="store_true",
                   help="replace an existing password or certificate")
    p.set_defaults(func=_cmd_enroll)


def _cmd_enroll(args: argparse.Namespace) -> int:
    port = CERT_PORT if args.cert else PASSWORD_PORT
    broker = args.broker or f"mqtts://{socket.getfqdn()}:{port}"
    done = enroll(args.device_id, fleet=args.fleet, broker=broker, role=args.role,
                  password_file=args.password_file, cert=args.cert, pki_dir=args.pki,
                  device_dir=args.device_dir, model_public_key=args.model_public_key,
                  signing_key=args.signing_key, force=args.force)
    config = CONFIGS[args.role]
    owner = "fedmq-keyholder" if args.role == "keyholder" else "fedmq"
    acl_user = ACL_USERS.get(args.role, done.name)
    if done.name != acl_user:
        print(f"note: broker_config/acl.conf grants the {args.role}'s topics to user "
              f"{acl_user}, not {done.name}: enroll that name, or edit the broker's acl.conf",
              file=sys.stderr)
    if args.config:
        set_keys(args.config, done.keys(), comment=f"credentials of {done.name} (fedmq enroll)")
        print(f"wrote {', '.join(done.keys())} into {args.config}", file=sys.stderr)
    else:
        print(f"# credentials of {done.name} (fedmq enroll): a config file of their own, or "
              f"written into {config} by `fedmq enroll ... --config FILE`")
        print(done.toml(), end="")
    pki = Pki(args.pki)
    copies = [f"{pki.ca.cert} -> {done.ca_file}"]
    if args.cert:
        issued = pki.client(done.name)
        copies += [f"{issued.cert} -> {done.cert_file}",
                   f"{issued.key} -> {done.key_file} (mode 0600, owner {owner})"]
        print(f"enrolled {done.name} with a client certificate", file=sys.stderr)
    else:
        print(f"enrolled {done.name} in {args.password_file}; reload the broker: "
              "sudo systemctl reload mosquitto", file=sys.stderr)
    if done.model_public_key:
        copies.append(f"the aggregator's {PUBLIC_NAME} -> {done.model_public_key}")
    print(f"copy to {done.name}'s machine: " + "; ".join(copies), file=sys.stderr)
    print(f"keep {args.config or 'the config'} readable by root and {owner} only (or by the "
          "user running the service): it holds the credentials", file=sys.stderr)
    return 0
