"""The aggregator's web dashboard: one page (aggregator/dashboard_static/) that polls
`/api/state` every second and draws the fleet table, the round's progress and the charts.

The standard library's threading HTTP server is enough for a handful of operators
watching one page, and keeps the aggregator free of web dependencies. It knows nothing of
the service: it serves whatever JSON its `state` callable returns (aggregator/fleetview.py).

Access: loopback by default. With a password, every request needs HTTP Basic credentials
(any user name), compared in constant time. Without one, requests must name the host by
an IP address or "localhost", so a web page elsewhere cannot reach the dashboard through
a DNS name it points at 127.0.0.1 (DNS rebinding).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fedmq.errors import ConfigError

log = logging.getLogger(__name__)

# The page's files, served from memory: nothing else on disk is reachable by a URL.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
REALM = "fedmq dashboard"
# Everything the page loads comes from the dashboard itself; no page may frame it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
MAX_DEVICE_ROWS = 1000

StateFn = Callable[[int, int], dict[str, Any]]  # (rounds since, device rows) -> JSON-able


def _load_static() -> dict[str, tuple[bytes, str]]:
    files = resources.files("aggregator") / "dashboard_static"
    return {path: ((files / name).read_bytes(), ctype)
            for path, (name, ctype) in STATIC_FILES.items()}


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a browser's open connection never holds up stop()

    def __init__(self, address: tuple[str, int], *, state: StateFn, password: str) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.state = state
        self.password = password.encode()
        self.static = _load_static()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that went away mid-answer: nothing to report above DEBUG."""
        log.debug("dashboard request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fedmq-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        if not self._allowed():
            return
        url = urlsplit(self.path)
        if url.path == "/api/state":
            self._state(parse_qs(url.query))
        elif url.path in self.server.static:
            body, ctype = self.server.static[url.path]
            self._send(HTTPStatus.OK, body, ctype)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def _allowed(self) -> bool:
        """Credentials when a password is set; else a Host header no rebinding can forge."""
        if self.server.password:
            if self._password_matches():
                return True
            self._send(HTTPStatus.UNAUTHORIZED, b"the dashboard needs its password\n",
                       "text/plain; charset=utf-8",
                       {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
            return False
        host = urlsplit("//" + self.headers.get("Host", "")).hostname or ""
        if host == "localhost" or _ip(host) is not None:
            return True
        self._send(HTTPStatus.FORBIDDEN, b"open the dashboard by IP address or localhost, "
                   b"or give it a password (dashboard_password)\n", "text/plain; charset=utf-8")
        return False

    def _password_matches(self) -> bool:
        scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            _user, _, given = base64.b64decode(encoded, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self.server.password)

    def _state(self, query: dict[str, list[str]]) -> None:
        try:
            since = int(query.get("since", ["0"])[0])
            rows = min(int(query.get("devices", ["100"])[0]), MAX_DEVICE_ROWS)
        except ValueError:
            self._send(HTTPStatus.BAD_REQUEST, b"since and devices are integers\n",
                       "text/plain; charset=utf-8")
            return
        try:
            state = self.server.state(since, max(rows, 0))
            body = json.dumps(state, allow_nan=False, separators=(",", ":")).encode()
        except Exception:  # a bug: the page says so, the service goes on
            log.exception("the dashboard could not read the service's state")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"state unavailable\n",
                       "text/plain; charset=utf-8")
            return
        self._send(HTTPStatus.OK, body, "application/json")

    def _send(self, status: HTTPStatus, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests at DEBUG (a poll a second would flood stderr); no headers, so no
        credentials, are ever logged."""
        log.debug("%s %s", self.address_string(), format % args)


class DashboardServer:
    """The dashboard on `bind`:`port` (port 0: any free port, for tests), served from a
    daemon thread between start() and stop()."""

    def __init__(self, *, state: StateFn, bind: str = "127.0.0.1", port: int = 0,
                 password: str = "") -> None:
        self.state = state
        self.bind = bind
        self.port = port
        self.password = password
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where this host's browser finds it (a wildcard bind is reached by loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.bind, self.bind)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def start(self) -> None:
        try:
            self._server = _Server((self.bind, self.port), state=self.state,
                                   password=self.password)
        except OSError as exc:
            raise ConfigError(f"the dashboard cannot listen on {self.bind}:{self.port} "
                              f"({exc.strerror or exc}); choose another dashboard_port or "
                              "dashboard_bind, or 0 to turn the dashboard off") from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="dashboard", daemon=True)
        self._thread.start()
        ip = _ip(self.bind)
        if not self.password and self.bind != "localhost" and not (ip and ip.is_loopback):
            log.warning("the dashboard on %s:%d has no password: anyone who can reach this "
                        "host sees the fleet (set dashboard_password_file)", self.bind,
                        self.port)
        log.info("dashboard at %s", self.url)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
