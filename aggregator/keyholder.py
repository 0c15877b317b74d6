"""`fedmq keyholder`: the HE key holder, the one process that holds the CKKS secret key.

With `he = "ckks"` and `he_decrypt = keyholder` the aggregator sums the devices'
ciphertexts with the public key only and, when a round closes, publishes the encrypted
sum on `he/decrypt`; this service decrypts it (if fedmq/core/keyholder.py's rules allow)
and answers on `he/sum`. It is a thin adapter: the decisions are the pure KeyHolder's;
this reassembles Parts, saves the KeyHolder's state (one decrypted round per lineage)
before a reply leaves, publishes the reply, and only then acknowledges the request, so a
restart loses nothing (a persistent session keeps requests that came while it was away).
With `metrics_port` its counters (decryptions, refusals by reason, malformed requests)
are served to Prometheus, read from the KeyHolder at each scrape.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedmq import __version__, storage
from fedmq.config import BrokerConfig, option
from fedmq.core import he
from fedmq.core.chunking import DEFAULT_MAX_PAYLOAD, Reassembler, split_payload
from fedmq.core.keyholder import REFUSALS, KeyHolder, KeyHolderPolicy
from fedmq.core.protocol import DecryptRequest, FleetTopics, Part
from fedmq.core.protocol.wire import decode_any
from fedmq.errors import ConfigError, ProtocolError
from fedmq.keyfiles import warn_if_shared
from fedmq.runtime import (
    add_config_flags,
    config_from_args,
    serve,
    setup_logging,
)
from fedmq.transport.mqtt import MqttLink

log = logging.getLogger(__name__)

SOURCE = "aggregator"  # the one sender of he/decrypt, as the Reassembler keys it


@dataclass(frozen=True, kw_only=True)
class KeyHolderConfig(BrokerConfig):
    client_id: str = option("fedmq-keyholder", "the key holder's MQTT client id")
    he_secret_context: str = option("", "the secret HE key file (he-secret.ctx from `fedmq "
                                    "keys he-init`); only this process reads it")
    min_updates: int = option(2, "decrypt only sums of at least this many updates (>= 2; "
                              "the aggregator's min_updates must not be lower, or it "
                              "refuses every round)")
    state: str = option("fedmq-keyholder.state", "file of the rounds decrypted (one per "
                        "aggregator lineage): each round's sum is decrypted once, in order")
    session_expiry_s: int = option(3600, "seconds the broker keeps requests for the key "
                                   "holder while it is away; 0: clean sessions")
    max_payload: int = option(DEFAULT_MAX_PAYLOAD, "largest MQTT payload in bytes; bigger "
                              "replies are chunked")
    chunk_timeout_s: float = option(60.0, "drop a chunked request when no new part of it "
                                    "arrived for this many seconds")
    metrics_port: int = option(0, "serve Prometheus metrics (decryptions, refusals by "
                               "reason) at http://METRICS_BIND:PORT/metrics (0: off; needs "
                               "fedmq[metrics])")
    metrics_bind: str = option("127.0.0.1", "address the metrics port listens on (0.0.0.0: "
                               "every interface; the page is unauthenticated)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.he_secret_context:
            raise ConfigError("the key holder needs he_secret_context, the secret file of "
                              "`fedmq keys he-init`")
        self.policy()
        if self.max_payload < 4096:
            raise ConfigError("max_payload must be at least 4096 bytes")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port {self.metrics_port} must be 0 (off) to 65535")

    def policy(self) -> KeyHolderPolicy:
        return KeyHolderPolicy(min_count=self.min_updates)

    def decryptor(self) -> he.Decryptor:
        try:
            data = Path(self.he_secret_context).read_bytes()
        except OSError as exc:
            raise ConfigError(f"he_secret_context {self.he_secret_context}: {exc.strerror}; "
                              "write the key files with `fedmq keys he-init`") from None
        warn_if_shared(self.he_secret_context, "he_secret_context")
        return he.Decryptor(he.KeyBundle.from_bytes(
            data, what=f"he_secret_context {self.he_secret_context}"))


class KeyHolderCounters:
    """A prometheus_client collector reading a KeyHolderService's counters at each scrape,
    so the pure KeyHolder needs no hooks. Reads of ints and Counter items need no lock."""

    def __init__(self, service: KeyHolderService) -> None:
        self.service = service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        holder = self.service.holder
        yield CounterMetricFamily("fedmq_keyholder_decryptions", "Round sums decrypted (a "
                                  "repeat of the same sum included)", value=holder.decrypted)
        refused = CounterMetricFamily("fedmq_keyholder_refusals", "Round sums refused, by "
                                      "reason (fedmq/core/keyholder.py)", labels=["reason"])
        for reason in REFUSALS:  # every reason, 0 included: alerts need no absent()
            refused.add_metric([reason], holder.refused[reason])
        yield refused
        yield CounterMetricFamily("fedmq_keyholder_malformed", "Messages on he/decrypt that "
                                  "did not decode", value=self.service.malformed)


class KeyHolderService:
    """The KeyHolder on MQTT: one loop thread answers requests in the order they came."""

    def __init__(self, config: KeyHolderConfig) -> None:
        self.config = config
        self.topics = FleetTopics(config.fleet)
        self.holder = KeyHolder(config.decryptor(), config.policy())
        storage.check_writable(config.state, what="key holder state")
        saved = storage.load_state(config.state)
        if saved is not None:
            self.holder.load_state_dict(saved)
        self.reassembler = Reassembler(timeout_s=config.chunk_timeout_s)
        self.finished = threading.Event()  # set on failure (it runs until stopped)
        self.failure: BaseException | None = None
        self.malformed = 0  # requests that did not decode
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.link = MqttLink(
            client_id=config.client_id, broker=config.broker, username=config.username,
            password=config.password, tls=config.tls(), max_payload=config.max_payload,
            session_expiry_s=config.session_expiry_s, mqtt_version=config.mqtt_version,
            manual_ack=True)
        self.link.route(self.topics.he_decrypt, self._inbox.put, qos=1)
        self.metrics = None
        if config.metrics_port:
            from aggregator.metrics_export import MetricsServer

            self.metrics = MetricsServer(port=config.metrics_port, bind=config.metrics_bind)
            self.metrics.registry.register(KeyHolderCounters(self))
            self.metrics.prom.Info("fedmq_keyholder", "What this key holder runs",
                                    registry=self.metrics.registry).info(
                {"fedmq_version": __version__, "fleet": config.fleet,
                 "key": self.holder.decryptor.fingerprint})

    def start(self) -> None:
        if self.metrics is not None:
            self.metrics.start()  # a taken port fails the start, before any request
        log.info("key holder for fleet %s: key %s, decrypting sums of >= %d updates "
                 "(state %s)", self.config.fleet, self.holder.decryptor.fingerprint,
                 self.config.min_updates, self.config.state)
        self._thread = threading.Thread(target=self._run, name="keyholder", daemon=True)
        self._thread.start()
        self.link.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.link.stop()
        if self.metrics is not None:
            self.metrics.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    message = self._inbox.get(timeout=1.0)
                except queue.Empty:
                    self.reassembler.expire(time.monotonic())
                    continue
                if message is None:
                    break
                self._handle(message.payload)
                self.link.ack(message.mid, message.qos)
        except BaseException as exc:  # a failed state write: stop rather than go on
            log.exception("key holder failed: %s", exc)
            self.failure = exc
            self.finished.set()

    def _handle(self, payload: bytes) -> None:
        try:
            message = decode_any(payload, DecryptRequest, Part)
            if isinstance(message, Part):
                assembled = self.reassembler.offer(SOURCE, message, time.monotonic(),
                                                   wire_bytes=len(payload))
                if assembled is None:
                    return
                message = DecryptRequest.from_payload(assembled.payload)
        except ProtocolError as exc:
            self.malformed += 1
            log.warning("ignored a message on %s (%s): %s", self.topics.he_decrypt,
                        exc.reason, exc)
            return
        reply = self.holder.answer(message)
        if reply.status == "ok":  # recorded before it leaves: a restart decrypts it once
            storage.save_state(self.config.state, self.holder.state_dict())
        limit = self.link.effective_max_payload(self.topics.he_sum)
        for piece in split_payload(reply.to_payload(), max_payload=limit):
            self.link.publish(self.topics.he_sum, piece, qos=1)


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, KeyHolderConfig, with_file=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(KeyHolderConfig, args)
    setup_logging(config.log_level, config.log_format)
    service = KeyHolderService(config)
    return serve(service, done=service.finished)
