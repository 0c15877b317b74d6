"""Prometheus metrics of the aggregator (`metrics_port`), served over HTTP for scraping.

An observer (aggregator/observers.py) writing into prometheus_client's metric types, in
a registry of its own: the process-wide default registry would carry a second
aggregator's metrics (tests, a simulation run twice) into this one's page and refuse the
second's registration. `MetricsServer` (the registry and its HTTP server) also serves the
key holder's counters (aggregator/keyholder.py). Needs the `metrics` extra
(`pip install 'fedmq[metrics]'`).
"""

from __future__ import annotations

import logging
import threading

from aggregator.devices import DeviceInfo
from aggregator.observers import AggregatorObserver
from aggregator.records import RoundRecord
from fedmq import __version__
from fedmq.errors import ConfigError, require

log = logging.getLogger(__name__)

# Rounds last from a fraction of a second (a simulation on a laptop) to many minutes (a
# fleet of phones that train overnight); checkpoints from a millisecond to a slow SD card.
ROUND_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class MetricsServer:
    """A registry of its own and the HTTP server that serves it on `bind`:`port`
    (`start`; port 0 picks a free one, see `port`)."""

    def __init__(self, *, port: int, bind: str = "127.0.0.1") -> None:
        self.prom = require("prometheus_client", "metrics")  # the module, for metric types
        self.bind, self._port = bind, port
        self.registry = self.prom.CollectorRegistry()
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port serving /metrics (the one picked, when started on port 0)."""
        return self._server.server_port if self._server is not None else self._port

    def start(self) -> None:
        try:
            self._server, self._thread = self.prom.start_http_server(
                self._port, addr=self.bind, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {self.bind}:{self._port} ({exc}); "
                              "choose another metrics_port or metrics_bind, or stop what "
                              "listens there") from None
        log.info("Prometheus metrics on http://%s:%d/metrics", self.bind, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)
            self._server = self._thread = None


class PrometheusExporter(MetricsServer, AggregatorObserver):
    """The aggregator's counters, gauges and histograms, served by a MetricsServer."""

    def __init__(self, *, port: int, bind: str = "127.0.0.1",
                 info: dict[str, str] | None = None) -> None:
        super().__init__(port=port, bind=bind)
        prom = self.prom
        r = self.registry
        self.rounds = prom.Counter("fedmq_rounds", "Rounds closed (new model versions)",
                                   registry=r)
        self.round_seconds = prom.Histogram(
            "fedmq_round_duration_seconds", "Wall time from a round's announcement to its "
            "close", buckets=ROUND_BUCKETS, registry=r)
        self.accepted = prom.Counter("fedmq_updates_accepted",
                                     "Updates counted into a round", registry=r)
        self.redelivered = prom.Counter(
            "fedmq_updates_redelivered", "Updates already counted, seen again and receipted "
            "again (broker redelivery, device re-send)", registry=r)
        self.rejected = prom.Counter(
            "fedmq_updates_rejected", "Messages refused, by reason (docs/protocol.md; "
            "status_*: device statuses)", ["reason"], registry=r)
        self.bytes_in = prom.Counter("fedmq_received_bytes", "MQTT payload bytes received, "
                                     "by kind (update, status)", ["kind"], registry=r)
        self.bytes_out = prom.Counter("fedmq_sent_bytes", "MQTT payload bytes published, by "
                                      "kind (model, receipt, status)", ["kind"], registry=r)
        self.devices_online = prom.Gauge("fedmq_devices_online",
                                         "Devices whose retained status says online",
                                         registry=r)
        self.devices_known = prom.Gauge("fedmq_devices_known",
                                        "Devices that ever published a status", registry=r)
        self.round = prom.Gauge("fedmq_round", "The round open (or last announced)",
                                registry=r)
        self.version = prom.Gauge("fedmq_model_version", "Version of the current global model",
                                  registry=r)
        self.participants = prom.Gauge("fedmq_round_participants",
                                       "Updates aggregated in the last round", registry=r)
        # Made when first measured: absent, not 0, for a run without test data or DP.
        self._optional = {
            "accuracy": ("fedmq_test_accuracy", "Held-out accuracy of the newest model"),
            "loss": ("fedmq_test_loss", "Held-out loss of the newest model"),
            "epsilon": ("fedmq_dp_epsilon", "Differential privacy spent so far (at the "
                        "configured dp_delta)"),
            "fleet_accuracy": ("fedmq_fleet_accuracy", "Federated evaluation: the devices' "
                               "held-out accuracy of the model the last round trained "
                               "from, weighted by their examples"),
            "fleet_loss": ("fedmq_fleet_loss", "Federated evaluation: the devices' held-out "
                           "loss of that model, weighted by their examples"),
            "personal_accuracy": ("fedmq_personal_accuracy", "The devices' held-out "
                                  "accuracy of their personalized models (personal layers, "
                                  "fine-tuning), weighted by their examples"),
        }
        self._gauges: dict[str, object] = {}
        self.train_loss = prom.Gauge("fedmq_train_loss", "Participants' mean training loss "
                                     "in the last round, weighted by samples", registry=r)
        self.evaluations = prom.Counter("fedmq_evaluations_accepted", "Devices' evaluation "
                                        "reports taken (federated evaluation)", registry=r)
        self.checkpoint_seconds = prom.Histogram(
            "fedmq_checkpoint_write_seconds", "Time to write and fsync a checkpoint",
            buckets=CHECKPOINT_BUCKETS, registry=r)
        prom.Info("fedmq_aggregator", "What this aggregator runs", registry=r).info(
            {"fedmq_version": __version__, **(info or {})})

    # -- events ----------------------------------------------------------------------------
    def announced(self, *, round: int, version: int, model_bytes: int) -> None:
        self.round.set(round)
        self.version.set(version)

    def round_closed(self, record: RoundRecord) -> None:
        self.rounds.inc()
        self.round_seconds.observe(record.wall_s)
        self.participants.set(record.participants)
        self.train_loss.set(record.train_loss)
        for field in self._optional:
            value = getattr(record, field)
            if value is not None:
                self._gauge(field).set(value)

    def _gauge(self, field: str):
        gauge = self._gauges.get(field)
        if gauge is None:  # one thread closes rounds: no race on first creation
            name, help_text = self._optional[field]
            gauge = self._gauges[field] = self.prom.Gauge(name, help_text,
                                                           registry=self.registry)
        return gauge

    def evaluation_accepted(self, report) -> None:
        self.evaluations.inc()

    def update_accepted(self, *, device_id: str, round: int, counted: bool) -> None:
        (self.accepted if counted else self.redelivered).inc()

    def update_rejected(self, reason: str, count: int = 1) -> None:
        self.rejected.labels(reason=reason).inc(count)

    def traffic(self, *, direction: str, kind: str, nbytes: int) -> None:
        (self.bytes_in if direction == "in" else self.bytes_out).labels(kind=kind).inc(nbytes)

    def device_seen(self, info: DeviceInfo, *, online: int, known: int) -> None:
        self.devices_online.set(online)
        self.devices_known.set(known)

    def checkpoint_saved(self, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)
