"""The web dashboard over real HTTP: the state a running service serves, who may read it,
and its settings. The page itself runs in a browser in test_dashboard_browser.py."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import subprocess
import sys

import pytest

from aggregator.config import DASHBOARD_PASSWORD_ENV, AggregatorConfig
from aggregator.dashboard import DashboardServer
from aggregator.fleetview import fleet_view
from aggregator.records import RoundRecord
from fedmq.errors import ConfigError
from simulator.broker import free_port

from .helpers import make_agents, make_aggregator, wait_for


def get(port: int, path: str, headers: dict[str, str] | None = None):
    """(status, headers, body) of one GET to the dashboard on this host's loopback."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def serve(stoppers):
    """A dashboard on a free loopback port that serves what `state` returns."""

    def start(state=None, **settings) -> DashboardServer:
        server = DashboardServer(state=state or (lambda since, rows: {"since": since,
                                                                      "rows": rows}),
                                 **settings)
        server.start()
        stoppers(server.stop)
        return server

    return start


@pytest.mark.integration
def test_a_running_service_serves_its_rounds_progress_and_fleet(broker, tmp_path, stoppers):
    service = make_aggregator(broker.url, tmp_path, stoppers, dashboard_port=free_port())
    port = service.dashboard.port
    agents = make_agents(broker.url, stoppers, 3)
    polled = []
    while not service.finished.is_set():  # read while the loop thread changes it all
        status, _, body = get(port, "/api/state")
        assert status == 200
        state = json.loads(body)
        polled.append((state["history_total"], state["progress"]["number"]))
        assert state["progress"]["number"] > state["history_total"]  # the open round
    assert polled == sorted(polled)  # never backwards

    state = json.loads(get(port, "/api/state")[2])
    assert state["finished"] and state["rounds_total"] == 3 and state["version"] == 3
    assert [r["round"] for r in state["history"]] == [1, 2, 3]
    assert all(0.0 < r["accuracy"] <= 1.0 and r["participants"] == 3 for r in state["history"])
    assert state["accepted"] == 9 and state["rejected"] == {}
    assert (state["devices_total"], state["devices_online"]) == (3, 3)
    rows = {row["device_id"]: row for row in state["devices"]}
    assert sorted(rows) == ["dev0", "dev1", "dev2"]
    assert all(row["online"] and row["last_update_age_s"] >= 0 and row["cpus"] >= 1
               for row in rows.values())

    later = json.loads(get(port, "/api/state?since=2&devices=1")[2])
    assert (later["history_from"], [r["round"] for r in later["history"]]) == (2, [3])
    assert len(later["devices"]) == 1 and later["devices_total"] == 3
    assert json.loads(get(port, "/api/state?since=99")[2])["history"] == []

    agents[0].stop()  # a clean stop says offline: the table shows it, last
    wait_for(lambda: json.loads(get(port, "/api/state")[2])["devices_online"] == 2,
             "dev0 offline on the dashboard")
    last = json.loads(get(port, "/api/state")[2])["devices"][-1]
    assert (last["device_id"], last["online"]) == ("dev0", False)


def test_a_round_without_train_loss_is_null_in_json(tmp_path, stoppers):
    service = make_aggregator("mqtt://127.0.0.1:1", tmp_path, stoppers, start=False)
    stoppers(service.writer.close)
    service.history.append(RoundRecord(
        round=1, version=1, accuracy=None, loss=None, train_loss=float("nan"), participants=0,
        samples=0, bytes_up=0, model_bytes=0, wall_s=0.1))
    state = fleet_view(service).to_dict()
    assert state["history"][0]["train_loss"] is None
    json.dumps(state, allow_nan=False)


def test_the_page_and_its_files_and_nothing_else(serve):
    port = serve().port
    status, headers, body = get(port, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"static/dashboard.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    status, headers, _ = get(port, "/static/dashboard.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    for path in ("/static/../dashboard.py", "/../aggregator/service.py", "/static/",
                 "/api/state/x"):
        assert get(port, path)[0] == 404, path


def test_state_query_is_checked_and_bounded(serve):
    port = serve().port
    assert json.loads(get(port, "/api/state?since=4&devices=5000")[2]) == {"since": 4,
                                                                          "rows": 1000}
    assert json.loads(get(port, "/api/state?devices=-3")[2])["rows"] == 0
    assert get(port, "/api/state?since=abc")[0] == 400


def test_a_broken_state_is_a_500_not_a_dead_server(serve, caplog):
    def broken(since, rows):
        raise RuntimeError("bug")

    port = serve(broken).port
    with caplog.at_level(logging.ERROR, logger="aggregator.dashboard"):
        assert get(port, "/api/state")[0] == 500
    assert "could not read the service's state" in caplog.text
    assert get(port, "/")[0] == 200


def test_with_a_password_every_request_needs_it_and_any_user_name(serve, caplog):
    port = serve(password="s3cret:with colon").port
    for path in ("/", "/api/state", "/static/dashboard.js"):
        status, headers, _ = get(port, path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    assert get(port, "/api/state", basic("fedmq", "wrong"))[0] == 401
    assert get(port, "/api/state", {"Authorization": "Basic not*base64"})[0] == 401
    assert get(port, "/api/state", {"Authorization": "Bearer s3cret:with colon"})[0] == 401
    with caplog.at_level(logging.DEBUG, logger="aggregator.dashboard"):
        assert get(port, "/api/state", basic("anyone", "s3cret:with colon"))[0] == 200
        # behind a reverse proxy under its own name: the password is what guards it
        assert get(port, "/", {**basic("", "s3cret:with colon"),
                               "Host": "fleet.example.org"})[0] == 200
    assert "s3cret" not in caplog.text


def test_without_a_password_only_ip_or_localhost_host_names_are_served(serve):
    """DNS rebinding: a page on evil.example, resolved to 127.0.0.1, must not read it."""
    port = serve().port
    assert get(port, "/api/state", {"Host": f"evil.example:{port}"})[0] == 403
    assert get(port, "/", {"Host": "evil.example"})[0] == 403
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert get(port, "/api/state", {"Host": host})[0] == 200, host


def test_a_port_in_use_is_a_clear_error(serve):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}.*"
                                              "dashboard_port"):
            DashboardServer(state=lambda since, rows: {}, port=port).start()


def test_fedmq_aggregator_says_the_port_is_taken_without_a_traceback(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "fedmq.cli", "aggregator", "--broker", "mqtt://127.0.0.1:1",
             "--checkpoint", str(tmp_path / "agg.ckpt"), "--dashboard-port", str(port)],
            capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"the dashboard cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_wildcard_bind_without_password_is_warned_about(serve, caplog):
    with caplog.at_level(logging.WARNING, logger="aggregator.dashboard"):
        server = serve(bind="0.0.0.0")
    assert "has no password" in caplog.text
    assert server.url == f"http://127.0.0.1:{server.port}/"
    assert get(server.port, "/")[0] == 200


def test_dashboard_settings(tmp_path, monkeypatch):
    monkeypatch.delenv(DASHBOARD_PASSWORD_ENV, raising=False)
    assert AggregatorConfig().dashboard_port == 0  # off unless asked for
    assert AggregatorConfig().dashboard_bind == "127.0.0.1"
    secret = tmp_path / "password"
    secret.write_text("from-file\nignored\n")
    assert AggregatorConfig(dashboard_port=8080,
                            dashboard_password_file=str(secret)).dashboard_secret() == "from-file"
    assert AggregatorConfig(dashboard_password="given").dashboard_secret() == "given"
    assert AggregatorConfig().dashboard_secret() == ""
    monkeypatch.setenv(DASHBOARD_PASSWORD_ENV, "from-env")
    assert AggregatorConfig().dashboard_secret() == "from-env"
    with pytest.raises(ConfigError, match="not both"):
        AggregatorConfig(dashboard_password="a", dashboard_password_file=str(secret))
    with pytest.raises(ConfigError, match=r"dashboard_password_file .*missing: No such file"):
        AggregatorConfig(dashboard_port=8080, dashboard_password_file=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        AggregatorConfig(dashboard_port=8080, dashboard_password_file=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="dashboard_port"):
        AggregatorConfig(dashboard_port=70000)
