"""A small certificate authority for one fleet: `fedmq certs init|issue`.

One CA signs the broker's server certificate (names and addresses in its SAN) and one
client certificate per device (CN = device id, which mosquitto's `use_identity_as_username`
turns into the user name the ACL patterns see). Keys are EC P-256, written 0600 into
0700 directories, and never overwritten without `force`. `cryptography` is imported
lazily: it is the `secure` extra, and devices never need it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmq.core.protocol.topics import check_name
from fedmq.errors import ConfigError, require

DEFAULT_DIR = "fedmq-pki"
DIR_MODE = 0o700
KEY_MODE = 0o600
CERT_MODE = 0o644
# Certificates start an hour in the past: a device whose clock lags a little must still
# accept the broker's certificate right after it was issued.
BACKDATE = dt.timedelta(hours=1)
CA_DAYS = 3650
LEAF_DAYS = 825  # what browsers accept for server certificates; re-issue with --force


@dataclass(frozen=True, slots=True)
class Issued:
    """Where one certificate and its key were written."""

    cert: Path
    key: Path


class Pki:
    """The files of one CA directory: `ca.*`, `server.*` and `clients/{name}.*`."""

    def __init__(self, directory: str | Path = DEFAULT_DIR) -> None:
        self.directory = Path(directory)

    @property
    def ca(self) -> Issued:
        return Issued(self.directory / "ca.crt", self.directory / "ca.key")

    @property
    def server(self) -> Issued:
        return Issued(self.directory / "server.crt", self.directory / "server.key")

    def client(self, name: str) -> Issued:
        check_name(name, "client certificate name")
        folder = self.directory / "clients"
        return Issued(folder / f"{name}.crt", folder / f"{name}.key")

    def init(self, *, name: str = "fedmq CA", days: int = CA_DAYS,
             force: bool = False) -> Issued:
        """Create the CA key and self-signed certificate."""
        x509, _ = _crypto()
        target = self.ca
        _refuse_overwrite(target, force)
        key = _new_key()
        subject = _name(name)
        cert = (_builder(subject, subject, key.public_key(), days=days)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(_key_usage(ca=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False))
        return _write(target, cert.sign(key, _sha256()), key, force=force)

    def issue_server(self, hosts: Sequence[str], *, days: int = LEAF_DAYS,
                     force: bool = False) -> Issued:
        """The broker's certificate; clients check the host they dial against `hosts`."""
        if not hosts:
            raise ConfigError("a server certificate needs at least one --host (DNS name or IP "
                              "address clients use to reach the broker)")
        x509, oid = _crypto()
        san = x509.SubjectAlternativeName([_general_name(h) for h in hosts])
        return self._issue(self.server, hosts[0], oid.ExtendedKeyUsageOID.SERVER_AUTH,
                           days=days, force=force, extra=san)

    def issue_client(self, name: str, *, days: int = LEAF_DAYS,
                     force: bool = False) -> Issued:
        """A device's (or the aggregator's, or a bridge's) certificate with CN = `name`."""
        x509, oid = _crypto()
        # mosquitto reads the CN; strict verifiers also want a SAN, so name it there too.
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(client_uri(name))])
        return self._issue(self.client(name), name, oid.ExtendedKeyUsageOID.CLIENT_AUTH,
                           days=days, force=force, extra=san)

    def _issue(self, target: Issued, common_name: str, usage, *, days: int, force: bool,
               extra=None) -> Issued:
        x509, _ = _crypto()
        _refuse_overwrite(target, force)
        ca_cert, ca_key = self._load_ca()
        key = _new_key()
        builder = (_builder(_name(common_name), ca_cert.subject, key.public_key(), days=days)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(_key_usage(ca=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if extra is not None:
            builder = builder.add_extension(extra, critical=False)
        return _write(target, builder.sign(ca_key, _sha256()), key, force=force)

    def _load_ca(self):
        x509, _ = _crypto()
        serialization = require("cryptography.hazmat.primitives.serialization", "secure")
        ca = self.ca
        if not (ca.cert.is_file() and ca.key.is_file()):
            raise ConfigError(f"no CA in {self.directory}: run `fedmq certs init --dir "
                              f"{self.directory}` first")
        cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
        return cert, key


def client_uri(name: str) -> str:
    """The SAN of a client certificate: a URN, valid for any device id."""
    return f"urn:fedmq:client:{name}"


def _crypto():
    x509 = require("cryptography.x509", "secure")
    oid = require("cryptography.x509.oid", "secure")
    return x509, oid


def _sha256():
    return require("cryptography.hazmat.primitives.hashes", "secure").SHA256()


def _new_key():
    ec = require("cryptography.hazmat.primitives.asymmetric.ec", "secure")
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str):
    x509, oid = _crypto()
    return x509.Name([x509.NameAttribute(oid.NameOID.ORGANIZATION_NAME, "fedmq"),
                      x509.NameAttribute(oid.NameOID.COMMON_NAME, common_name)])


def _builder(subject, issuer, public_key, *, days: int):
    if days < 1:
        raise ConfigError(f"--days must be at least 1, not {days}")
    x509, _ = _crypto()
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days)))


def _key_usage(*, ca: bool):
    x509, _ = _crypto()
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False)


def _general_name(host: str):
    x509, _ = _crypto()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _refuse_overwrite(target: Issued, force: bool) -> None:
    if force:
        return
    for path in (target.key, target.cert):
        if path.exists():
            raise ConfigError(f"{path} already exists; pass --force to replace it (clients "
                              "that trust or use the old one must then get the new one)")


def _write(target: Issued, cert, key, *, force: bool) -> Issued:
    """Key first (0600, created exclusively), then the certificate (0644)."""
    serialization = require("cryptography.hazmat.primitives.serialization", "secure")
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _make_dirs(target.key.parent)
    _write_file(target.key, key_pem, KEY_MODE, force=force)
    _write_file(target.cert, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE,
                force=force)
    return target


def _make_dirs(folder: Path) -> None:
    """Create missing directories 0700 (never loosening existing ones)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=DIR_MODE)
        os.chmod(path, DIR_MODE)  # mkdir's mode is masked by the umask


def _write_file(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """O_EXCL: the file is born with `mode`, never briefly readable by others."""
    if force:
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; pass --force to replace it") from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)  # the umask may have taken bits off
        fh.write(data)


# --- command line ------------------------------------------------------------------------

def configure(certs: argparse.ArgumentParser) -> None:
    """`fedmq certs init|issue`."""
    verbs = certs.add_subparsers(dest="certs_command", required=True)

    def common(p: argparse.ArgumentParser, days: int) -> None:
        p.add_argument("--dir", default=DEFAULT_DIR,
                       help=f"CA directory (default: ./{DEFAULT_DIR}; keep it off the broker)")
        p.add_argument("--days", type=int, default=days,
                       help=f"validity in days (default: {days})")
        p.add_argument("--force", action="store_true", help="replace existing files")

    init = verbs.add_parser("init", help="create the CA key and certificate")
    common(init, CA_DAYS)
    init.add_argument("--name", default="fedmq CA", help="the CA's common name")
    init.set_defaults(func=_cmd_init)

    issue = verbs.add_parser("issue", help="issue a broker (server) or client certificate")
    kinds = issue.add_subparsers(dest="kind", required=True)
    server = kinds.add_parser("server", help="the broker's certificate")
    common(server, LEAF_DAYS)
    server.add_argument("--host", action="append", required=True, metavar="NAME_OR_IP",
                        help="DNS name or IP address clients dial (repeat for each)")
    server.set_defaults(func=_cmd_server)
    client = kinds.add_parser("client", help="a device, aggregator or bridge certificate "
                              "(CN = NAME = its MQTT user name)")
    common(client, LEAF_DAYS)
    client.add_argument("name", help="device id (or aggregator client id, bridge name)")
    client.set_defaults(func=_cmd_client)


def _cmd_init(args: argparse.Namespace) -> int:
    _report(Pki(args.dir).init(name=args.name, days=args.days, force=args.force))
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    _report(Pki(args.dir).issue_server(args.host, days=args.days, force=args.force))
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    _report(Pki(args.dir).issue_client(args.name, days=args.days, force=args.force))
    return 0


def _report(issued: Issued) -> None:
    print(f"wrote {issued.cert}\nwrote {issued.key} (mode 0600: copy it only to where it "
          "is used)")

