"""The edge agent: receive the global model, train on local data, publish the delta.

`LocalTrainer` is the pure part (model in, Update out) and is tested without a broker;
the protocol decisions are fedmq/core/device.py's `DeviceMachine`; `EdgeAgent` wires both
to MQTT and to disk and runs training on its own thread so the network loop keeps
answering pings while a device trains.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import platform
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.outbox import Outbox
from edge_agent.personal import PersonalLayers, train_part
from edge_agent.privacy import LocalDP
from edge_agent.statedir import StateDirLock
from fedmq import __version__, storage
from fedmq.core import codecs
from fedmq.core.activity import ActivityReport
from fedmq.core.chunking import split_payload
from fedmq.core.device import (
    AnnouncementIn,
    ChunkIn,
    Connected,
    Decision,
    DeviceMachine,
    Evaluate,
    Evaluated,
    Event,
    Ignored,
    NewLineage,
    ReceiptIn,
    Rejected,
    Report,
    Send,
    Sent,
    Settled,
    SitOut,
    Subscribe,
    Tick,
    Train,
    Trained,
    Unsubscribe,
)
from fedmq.core.he import PublicKey
from fedmq.core.layout import LayoutMask
from fedmq.core.protocol import (
    DeviceStatus,
    EvalMetrics,
    EvalReport,
    FleetTopics,
    ModelAnnouncement,
    TaskConfig,
    Update,
)
from fedmq.core.transfer import DELTA, FULL, ReceivedModel
from fedmq.errors import ConfigError, DataError, FedmqError, ProtocolError
from fedmq.keyfiles import load_he_public, opener_for_config
from fedmq.models import Model, build_model, model_names
from fedmq.models.base import stoppable
from fedmq.tasks import Dataset, task_spec
from fedmq.tasks.holdout import local_holdout
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttLink, Will

log = logging.getLogger(__name__)
# How often the training thread ticks the machine for updates whose receipt is overdue.
RESEND_CHECK_S = 1.0
# How long a round waits for a fresh read of a live data source before it trains on the
# last good data (the read goes on and serves a later round).
RELOAD_WAIT_S = 10.0
# How soon a device waiting for its turn to train notices a stop or a newer model.
GATE_POLL_S = 0.1
# A device scores a model on at most this many of its held-out examples (evenly spaced),
# so federated evaluation costs a bounded time whatever the device holds: about a second
# of one core for the keyboard's GRU.
EVAL_MAX_EXAMPLES = 500
# finetune_check: the share of a device's training data it validates fine-tuning on
FINETUNE_VALIDATION = 0.2


class TrainingSkipped(FedmqError):
    """The device gave up a round before it trained (it was stopped, or a newer model came
    while it waited for its turn): not a failure."""


def device_capabilities(config: AgentConfig | None = None) -> dict[str, object]:
    """What the aggregator may use to assign work: cores, memory, link, backend, codecs."""
    try:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        ram_mb = 0
    backends = ["numpy"] + (["torch"] if _installed("torch") else [])
    return {"cpus": os.cpu_count() or 1, "ram_mb": int(ram_mb), "backends": backends,
            "codecs": codecs.codec_names(), "zstd": codecs.lossless.zstd_available(),
            "arch": platform.machine(), "python": platform.python_version(),
            **_advertised(config)}


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (an import hook may say no
    by raising, as tests/test_layers.py's base-install check does)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _advertised(config: AgentConfig | None) -> dict[str, object]:
    """What only the operator knows (link, battery, a core budget), from the config."""
    if config is None:
        return {}
    out: dict[str, object] = {"battery": config.on_battery}
    if config.link_kbps > 0:
        out["link_kbps"] = config.link_kbps
    if config.cpus > 0:
        out["cpus"] = config.cpus
    return out


class LocalTrainer:
    """Trains the received global model on this device's data and builds the Update.

    With an error-feedback codec the residual the codec dropped is kept here and, when
    `state_path` is set, saved atomically after every update so a reboot does not lose it.

    `update_transform`, when given, rewrites each delta before it is encoded: how a
    simulated attacker sends a poisoned (yet well-formed) update.

    `task`: the device's own task when it is a user's (fedmq/tasks/plugins.py): only its
    model is trained, whatever an announcement names; '' (a bundled task) trains the
    bundled model the announcement names.
    """

    def __init__(self, *, device_id: str, data: Dataset, codec: str, seed: int,
                 state_path: str | Path | None = None, slowdown: float = 1.0,
                 threads: int = 1, reload: Callable[[], Dataset] | None = None,
                 update_transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 task: str = "", encryptor: PublicKey | None = None,
                 ldp: LocalDP | None = None, holdout: float = 0.0,
                 compute_gate: threading.Semaphore | None = None) -> None:
        """holdout: the share of the device's data kept aside to score models on (for
        federated evaluation; fedmq/tasks/holdout.py), never trained on; 0: none.

        compute_gate: held while the model trains. A simulator running many devices in
        one process passes a semaphore sized to its cores, so that they take turns rather
        than all fight over the GIL and the cores at once (docs/scale.md)."""
        if len(data) == 0:
            raise FedmqError(f"device {device_id} has no training data")
        self.holdout = holdout
        self.eval_data: Dataset | None = None
        data = self._split(data, seed)
        # A live source (reload) is read again before every round, on its own thread: a
        # failed read keeps the last good data, and a read still going after
        # RELOAD_WAIT_S (a hung sensor) is left to finish for a later round. A sensor
        # hiccup costs freshness, never a round, and never blocks stop().
        self.reload = reload
        self.reload_wait_s = RELOAD_WAIT_S
        self.reloads = self.reload_failures = 0
        self._read: _Read | None = None  # the read in flight, if any
        self.codec = codec
        self.spec = codecs.get_codec(codec)  # fail at start-up, not mid-round
        self.device_id = device_id
        self.data = data
        self.seed = seed
        # One residual, whatever codec the server assigns: what was not sent is owed
        # regardless of how the next delta is compressed.
        # Restored under the codec it was saved with (the server's, when it assigned one).
        self.state_path = Path(state_path) if state_path else None
        state = storage.load_state(self.state_path) if self.state_path is not None else None
        self.feedback = codecs.ErrorFeedback.resume((state or {}).get("feedback", {}),
                                                    default=self.spec)
        # Personal layers (announcement `personal`): kept across restarts with the residual
        self.personal = PersonalLayers()
        if (state or {}).get("personal") is not None:
            try:
                self.personal.load_state_dict(state["personal"])
            except storage.StateError as exc:
                log.warning("%s: personal layers in %s not restored (%s); they start again "
                            "from the next model", device_id, self.state_path, exc)
        self._model: Model | None = None
        self._model_key: tuple | None = None
        # the device's own version of the newest model it scored (see personalize)
        self.personalized: np.ndarray | None = None
        if not slowdown >= 1.0:
            raise FedmqError(f"slowdown {slowdown} must be >= 1 (1: the host's own speed)")
        self.slowdown = slowdown
        self.threads = max(1, threads)  # the device's budget, whatever the model config says
        self.compute_gate = compute_gate
        self.halt = threading.Event()  # cuts a simulated slow device's wait short on stop
        # set by the agent: whether a decision about a later round (a newer model to
        # train, or a round this device sits out) supersedes training `round`
        self.superseded: Callable[[int], bool] = lambda round: False
        self.update_transform = update_transform
        # he = "ckks": every update is clipped, weighted and encrypted under the fleet's
        # public key instead of going through a codec (fedmq/core/he.py)
        self.encryptor = encryptor
        self.task = task
        # local DP: every update clipped and noised here (edge_agent/privacy.py); the
        # rounds spent survive a reboot with the state file
        self.ldp = ldp
        self.ldp_rounds = int((state or {}).get("ldp_rounds", 0))
        # the model a user task registered ("" for a bundled task): resolved now, so a
        # task that cannot load fails at start-up
        self.own_model = task_spec(task).model if task else ""

    def _split(self, data: Dataset, seed: int) -> Dataset:
        """The training part of `data`; its held-out part becomes eval_data."""
        train, held = local_holdout(data, self.holdout, seed=seed)
        if held is not None or self.eval_data is None:
            self.eval_data = held
        return train

    def _save_state(self) -> None:
        if self.state_path is not None:
            storage.save_state(self.state_path, self._state())

    def _model_for(self, a: ModelAnnouncement) -> Model:
        if self.own_model and a.model != self.own_model:
            own = self._build(self.own_model, {})
            raise ProtocolError(
                f"the aggregator trains {a.model} (layout {a.layout_hash}) but this device's "
                f"task {self.task} is {self.own_model} (layout {own.layout.hash}): configure "
                "the same task on both", reason="bad_layout")
        model = self._build(a.model, dict(a.model_config))
        if model.layout.hash != a.layout_hash:
            mine = f"task {self.task}" if self.own_model else "its bundled model"
            raise ProtocolError(
                f"model v{a.version} of {a.model} has layout {a.layout_hash}, this device's "
                f"{mine} builds layout {model.layout.hash}: run the same version of fedmq "
                "(and of the task's package) on both", reason="bad_layout")
        return model

    def _build(self, name: str, config: dict) -> Model:
        """The model `name` with `config`, built once while they stay the same."""
        key = (name, tuple(sorted(config.items())))
        if key != self._model_key or self._model is None:
            try:
                self._model = build_model(name, config)
            except ConfigError as exc:
                if name in model_names():
                    raise
                raise ProtocolError(
                    f"the aggregator trains model {name}, which this device cannot build "
                    f"({exc}); give it the aggregator's task", reason="bad_layout") from None
            self._model_key = key
            if hasattr(self._model, "threads"):
                self._model.threads = self.threads
        return self._model

    def _encode(self, delta: np.ndarray, codec: str, rng: np.random.Generator):
        """Encode with the assigned codec (or ours); error feedback carries the residual."""
        spec = codecs.get_codec(codec) if codec else self.spec
        if not spec.error_feedback:
            return codecs.encode(delta, spec, rng=rng)
        self.feedback.spec = spec
        encoded = self.feedback.encode(delta, rng=rng)
        self._save_state()
        return encoded

    def _state(self) -> dict:
        return {"feedback": self.feedback.state_dict(), "personal": self.personal.state_dict(),
                "ldp_rounds": self.ldp_rounds}

    @property
    def ldp_epsilon(self) -> float | None:
        """Local DP spent by this device's updates so far (None: local DP is off)."""
        return None if self.ldp is None else self.ldp.epsilon(self.ldp_rounds)

    @property
    def backend(self) -> str:
        """What the model of the last round trained with ("" before the first)."""
        return self._model.backend if self._model is not None else ""

    def _refresh_data(self) -> None:
        if self.reload is None:
            return
        if self._read is None:
            self._read = _Read(self.reload, name=f"{self.device_id}-data")
        read = self._read
        deadline = time.monotonic() + self.reload_wait_s
        while not read.done.wait(0.1) and not self.halt.is_set():
            if time.monotonic() > deadline:
                log.warning("%s: reading local data takes over %.0f s; training on the "
                            "previous %d examples", self.device_id, self.reload_wait_s,
                            len(self.data))
                return
        if not read.done.is_set():
            return
        self._read = None
        if read.error is not None:
            self.reload_failures += 1
            log.warning("%s: re-reading local data failed (%s); training on the previous %d "
                        "examples", self.device_id, read.error, len(self.data))
            return
        assert read.data is not None
        self.data = self._split(read.data, self.seed)
        self.reloads += 1

    def train(self, received: ReceivedModel, task: TaskConfig | None = None) -> Update:
        """Train on the model as `task` says (default: the announcement's task for all)."""
        a = received.announcement
        task = task or a.task
        delta, result, rng = self._train(received, task)
        if self.encryptor is not None:  # never falls back to a plain codec
            encoded = self.encryptor.encrypt(delta, result.num_samples)
        else:
            try:
                encoded = self._encode(delta, task.codec, rng)
            except FedmqError as exc:  # a codec this build does not know: ours still works
                log.warning("%s: assigned codec %r unusable (%s); using %s", self.device_id,
                            task.codec, exc, self.codec)
                encoded = self._encode(delta, "", rng)
        return Update(
            device_id=self.device_id, update_id=os.urandom(4).hex(), round=a.round,
            base_version=a.version, num_samples=result.num_samples, loss=result.loss,
            delta=encoded, layout_hash=self.update_layout_hash(a), train_s=result.seconds,
            steps=result.steps, complete=result.complete,
        )

    def train_delta(self, received: ReceivedModel,
                    task: TaskConfig | None = None) -> tuple[np.ndarray, int]:
        """Train, and return the raw delta and the samples it was trained on (for secure
        aggregation, which masks the delta itself instead of encoding it)."""
        delta, result, _ = self._train(received, task or received.announcement.task)
        return delta, result.num_samples

    def _train(self, received: ReceivedModel, task: TaskConfig):
        a = received.announcement
        model = self._model_for(a)
        self._refresh_data()
        mask = self._mask(model, a)
        start = self.personal.start(mask, received.params)
        model.set_flat(start)
        rng = np.random.default_rng([self.seed, a.round])
        # A device `slowdown` times slower does 1/slowdown of the work in its budget and
        # takes `slowdown` times as long for what it does.
        settings = dict(epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, rng=rng,
                        prox_mu=task.prox_mu, time_budget_s=task.time_budget_s / self.slowdown,
                        max_steps=task.max_steps)
        with self._computing(a.round):
            if a.personal_steps:  # FedRep: the head alone, then the body
                self._fit_personal(model, mask, a, task, rng)
                result = train_part(model, self.data.x, self.data.y, frozen=~mask.index,
                                    **settings)
            else:
                result = model.train(self.data.x, self.data.y, **settings)
        if self.slowdown > 1.0:
            self.halt.wait(result.seconds * (self.slowdown - 1.0))
        if task.update_weight == "examples":  # see UPDATE_WEIGHTS
            result = dataclasses.replace(result, num_samples=len(self.data))
        trained = model.get_flat()
        # only the shared tensors go up; the personal ones stay here (and on disk)
        delta = mask.take_shared(trained - start)
        self.personal.keep(mask, trained)
        if self.ldp is not None:
            delta = self.ldp.privatize(delta)
            self.ldp_rounds += 1
            log.info("%s: local DP update %d, epsilon %.3g at delta %g", self.device_id,
                     self.ldp_rounds, self.ldp_epsilon, self.ldp.delta)
        if self.ldp is not None or (mask.patterns and not self.spec.error_feedback):
            self._save_state()
        if self.update_transform is not None:
            delta = self.update_transform(delta)
        return delta, result, rng

    @contextmanager
    def _computing(self, round: int) -> Iterator[None]:
        """Holds compute_gate (if any) while the model of `round` trains. A device stopped
        while it waits for its turn, or told of a later round meanwhile (a newer model, or
        a round it sits out: the one it waits for has closed), gives up (TrainingSkipped)
        instead of training a round it will not send or whose update would be stale.
        Stopped while it trains, it ends after the current step and gives the round up
        too, so a simulation stops promptly. (Without a gate, a real device finishes:
        its outbox keeps the update for after a restart.)"""
        if self.compute_gate is None:
            yield
            return
        while not self.compute_gate.acquire(timeout=GATE_POLL_S):
            if self.halt.is_set():
                raise TrainingSkipped("stopped while waiting to train")
            if self.superseded(round):
                raise TrainingSkipped("a later round began while waiting to train")
        try:
            with stoppable(self.halt.is_set):
                yield
        finally:
            self.compute_gate.release()
        if self.halt.is_set():
            raise TrainingSkipped("stopped while training")

    @staticmethod
    def _mask(model: Model, a: ModelAnnouncement) -> LayoutMask:
        return LayoutMask(model.layout, tuple(a.personal))

    def update_layout_hash(self, a: ModelAnnouncement) -> str:
        """The layout hash an update of `a` carries: the shared tensors' with personal
        layers, else the model's."""
        if not a.personal:
            return a.layout_hash
        return self._mask(self._model_for(a), a).shared.hash

    def personalize(self, received: ReceivedModel, task: TaskConfig | None = None
                    ) -> np.ndarray | None:
        """The parameters this device uses of the announced model: its personal layers in
        (announcement `personal`), refit to it for `personal_steps` (FedRep), then
        `finetune_steps` steps at `finetune_lr` on its training data; kept
        as `personalized` (None when the announcement asks for neither: the device uses
        the model as announced)."""
        a = received.announcement
        task = task or a.task
        model = self._model_for(a)
        mask = self._mask(model, a)
        if not (mask.patterns or a.finetune_steps):
            return None
        model.set_flat(self.personal.start(mask, received.params))
        if a.personal_steps:
            self._fit_personal(model, mask, a, task, np.random.default_rng([self.seed, a.round, 2]))
        if a.finetune_steps:
            self._finetune(model, a, task)
        self.personalized = model.get_flat()
        return self.personalized

    def _finetune(self, model: Model, a: ModelAnnouncement, task: TaskConfig) -> None:
        """`finetune_steps` steps at `finetune_lr` on the device's training data; with
        `finetune_check`, on all but its last FINETUNE_VALIDATION share, keeping the
        parameters (the ones it started from included) that score the lowest loss there."""
        settings = dict(epochs=1000, batch_size=task.batch_size, lr=a.finetune_lr or task.lr,
                        rng=np.random.default_rng([self.seed, a.round, 1]))
        data, check = self.data, None
        if a.finetune_check:
            data, check = local_holdout(self.data, FINETUNE_VALIDATION, seed=self.seed)
        if check is None:  # no early stopping, or too few examples to spare
            model.train(data.x, data.y, max_steps=a.finetune_steps, **settings)
            return
        check = _at_most(check, EVAL_MAX_EXAMPLES)
        best, best_loss = model.get_flat(), model.evaluate(check.x, check.y).loss
        done = 0
        while done < a.finetune_steps:
            steps = min(a.finetune_check, a.finetune_steps - done)
            model.train(data.x, data.y, max_steps=steps, **settings)
            done += steps
            loss = model.evaluate(check.x, check.y).loss
            if loss < best_loss:
                best, best_loss = model.get_flat(), loss
        model.set_flat(best)

    def _fit_personal(self, model: Model, mask: LayoutMask, a: ModelAnnouncement,
                      task: TaskConfig, rng: np.random.Generator) -> None:
        """FedRep's first phase: `personal_steps` steps on the personal layers alone, so
        they fit the announced shared ones before anything uses them."""
        train_part(model, self.data.x, self.data.y, frozen=mask.index, epochs=1000,
                   batch_size=task.batch_size, lr=task.lr, rng=rng, max_steps=a.personal_steps)

    def evaluate(self, received: ReceivedModel, task: TaskConfig | None = None
                 ) -> EvalReport | None:
        """Score the announced model on this device's held-out data and, when the device
        personalizes (personal layers, or fine-tuning), the model it would use: its personal
        layers in, then `finetune_steps` steps on its training data. None: no held-out data
        (eval_holdout 0, or too few examples)."""
        held = self.eval_data
        if held is None:
            return None
        held = _at_most(held, EVAL_MAX_EXAMPLES)
        a = received.announcement
        task = task or a.task
        began = time.perf_counter()
        model = self._model_for(a)
        model.set_flat(received.params)
        announced = _metrics(model.evaluate(held.x, held.y))
        personal = None
        if self.personalize(received, task) is not None:  # leaves the model holding it
            personal = _metrics(model.evaluate(held.x, held.y))
        return EvalReport(device_id=self.device_id, round=a.round, version=a.version,
                          num_samples=len(held), metrics=announced, personal=personal,
                          eval_s=time.perf_counter() - began)


def _at_most(data: Dataset, n: int) -> Dataset:
    """`data`, or n of its examples evenly spaced over it (the whole span) when larger."""
    if len(data) <= n:
        return data
    return data.subset(np.linspace(0, len(data) - 1, n).astype(int))


def _metrics(ev) -> EvalMetrics:
    """A model's EvalResult as the wire's EvalMetrics."""
    return EvalMetrics(loss=float(ev.loss),
                       accuracy=None if ev.accuracy is None else float(ev.accuracy))


@dataclass
class AgentStats:
    updates_sent: int = 0  # updates trained and sent (re-sends not counted)
    sat_out: int = 0  # rounds this device was not selected for
    partial: int = 0  # updates cut short by the time budget or step cap
    codecs: Counter = field(default_factory=Counter)  # updates sent, by codec
    resent: int = 0
    models_received: int = 0
    receipts: Counter = field(default_factory=Counter)  # by status
    rejected: Counter = field(default_factory=Counter)
    evaluated: int = 0  # evaluation reports sent
    not_evaluated: int = 0  # evaluations asked of a device without held-out data
    # round -> [bytes uploaded, bytes downloaded]
    traffic: dict[int, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))


def _accuracy(metrics: EvalMetrics) -> str:
    if metrics.accuracy is None:
        return f"loss {metrics.loss:.4f}"
    return f"accuracy {metrics.accuracy:.4f} (loss {metrics.loss:.4f})"


class _Read:
    """One read of a live data source on a daemon thread: its data or its error."""

    def __init__(self, load: Callable[[], Dataset], *, name: str) -> None:
        self.data: Dataset | None = None
        self.error: Exception | None = None
        self.done = threading.Event()
        self._load = load
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self.data = self._load()
        except Exception as exc:  # the user's file or sensor: any failure is a bad read
            self.error = exc if isinstance(exc, FedmqError) else DataError(
                f"{type(exc).__name__}: {exc}")
        finally:
            self.done.set()


class EdgeAgent:
    """One device: DeviceMachine's decisions carried out over MQTT, a durable outbox, and
    a training thread (so the network loop keeps answering pings while the device trains).

    Every protocol decision (what to download, what to train, what to send again and
    when, what a receipt settles) is fedmq/core/device.py's; this class only feeds it
    events and executes what it returns. `update_transform` is handed to the LocalTrainer
    (see there).
    """

    def __init__(self, config: AgentConfig, data: Dataset, *,
                 update_transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 secagg_drop_after_input: Callable[[int], bool] | None = None,
                 compute_gate: threading.Semaphore | None = None) -> None:
        self.config = config
        self.topics = FleetTopics(config.fleet)
        if config.state_dir:  # said now, not as a traceback at the first save
            storage.check_writable(config.state_dir, what="state_dir", directory=True)
        # Before anything reads the directory: another agent's outbox must not be loaded.
        self._state_lock = (StateDirLock(config.state_dir, config.device_id)
                            if config.state_dir else None)
        state_path = Path(config.state_dir) / "agent-state.bin" if config.state_dir else None
        # Devices must not share a seed: their stochastic rounding noise would not average out.
        seed = config.seed if config.seed >= 0 else zlib.crc32(config.device_id.encode())
        reload = None
        if config.data_reload:
            from fedmq.tasks.datasource import load_source

            reload = functools.partial(load_source, config.data_source, config.task,
                                       label=config.data_label,
                                       max_samples=config.data_max_samples)
        self.trainer = LocalTrainer(device_id=config.device_id, data=data, codec=config.codec,
                                    seed=seed, state_path=state_path, slowdown=config.slowdown,
                                    threads=config.train_threads or config.cpus
                                    or os.cpu_count() or 1, reload=reload,
                                    update_transform=update_transform,
                                    task=config.task if task_spec(config.task).custom else "",
                                    encryptor=load_he_public(config.he_context)
                                    if config.he_context else None,
                                    ldp=config.local_dp(), holdout=config.eval_holdout,
                                    compute_gate=compute_gate)
        self.stats = AgentStats()
        self.last_eval: EvalReport | None = None  # the newest report sent
        # The retained status: birth, then fresh activity at most every status_interval_s
        # (published from the training thread's tick); guarded: paho's thread sends too.
        # `examples`: the aggregator weighs this device's updates by at most a few times
        # examples x epochs (aggregator/bounds.py), so a forged sample count cannot drown it
        self.report = ActivityReport(device_id=config.device_id,
                                     capabilities={**device_capabilities(config),
                                                   "examples": len(self.trainer.data)},
                                     agent_version=__version__,
                                     interval_s=config.status_interval_s)
        self._report_lock = threading.Lock()
        # Written to disk before anything is published (the machine's ledger writes through).
        self.outbox = Outbox(Path(config.state_dir) / "outbox" if config.state_dir else None)
        # With model_public_key set, only announcements the aggregator signed get through.
        self.announcements = opener_for_config(config.model_public_key)
        self.machine = DeviceMachine(device_id=config.device_id, fleet=config.fleet,
                                     resend_after_s=config.resend_after_s, outbox=self.outbox,
                                     opener=self.announcements)
        self.receiver = self.machine.receiver
        # The machine is driven from paho's thread (messages) and the training thread
        # (ticks, trained updates); decisions are carried out outside this lock.
        self._machine_lock = threading.Lock()
        self._pending: Train | None = None
        self._pending_eval: Evaluate | None = None
        # the newest round a Train or SitOut was decided for: a Train of an earlier round
        # still waiting for its turn is superseded (DeviceMachine's Train and SitOut say so)
        self._decided_round = 0
        self.trainer.superseded = lambda round: self._decided_round > round
        self._wake = threading.Condition()
        self._stopping = False
        self._worker: threading.Thread | None = None
        offline = DeviceStatus(device_id=config.device_id, online=False).to_payload()
        self.link = MqttLink(
            client_id=config.device_id, broker=config.broker, username=config.username,
            password=config.password, on_connect=self._on_connect, tls=config.tls(),
            will=Will(self.topics.device_status(config.device_id), offline),
            max_payload=config.max_payload, session_expiry_s=config.session_expiry_s,
            mqtt_version=config.mqtt_version,
        )
        self.link.route(self.topics.receipt(config.device_id), self._on_receipt)
        self.link.route(self.topics.model_current, self._on_announcement)
        # secure_aggregation: updates go up only masked, in SecAgg+ rounds (secure.py)
        self.secure = None
        if config.secure_aggregation:
            from edge_agent.secure import SecureDevice

            self.secure = SecureDevice(device_id=config.device_id, topics=self.topics,
                                       publish=self._publish_secagg,
                                       queue_input=self._queue_masked_input,
                                       drop_after_input=secagg_drop_after_input)
            self.link.route(self.secure.setup_topic, self._on_secagg)
            self.link.route(self.secure.in_topic, self._on_secagg)
        # Chunk streams are subscribed only when the machine says so (Subscribe).
        for stream in (FULL, DELTA):
            self.link.route(self.machine.stream_filter(stream), self._chunk_handler(stream),
                            active=False)

    # -- events in -------------------------------------------------------------------------
    def _handle(self, event: Event) -> int:
        """Feed `event` to the machine and carry out its decisions; bytes published."""
        with self._machine_lock:
            decisions = self.machine.handle(event)
        sent = sum(self._carry_out(decision) for decision in decisions)
        with self._report_lock:
            self.report.uploaded(sent)
            self.report.holding(len(self.outbox))
        return sent

    @property
    def announced_round(self) -> int:
        """The newest round this device has heard announced (0: none yet)."""
        a = self.receiver.announcement
        return 0 if a is None else a.round

    def _on_connect(self, _session_present: bool) -> None:
        self._publish_status(force=True)  # the birth
        self._handle(Connected(time.monotonic()))
        self._wake_worker()

    def _publish_status(self, *, force: bool = False) -> None:
        """The retained status with the activity so far: always (`force`: a birth), else
        when the report says one is due."""
        now = time.monotonic()
        with self._report_lock:
            if not (force or self.report.due(now)):
                return
            status = self.report.status(online=True, now=now, wall=time.time())
        self.link.publish(self.topics.device_status(self.config.device_id), status.to_payload(),
                          qos=1, retain=True)

    def _on_receipt(self, message: Message) -> None:
        self._handle(ReceiptIn(message.payload, time.monotonic()))

    def _on_announcement(self, message: Message) -> None:
        self._handle(AnnouncementIn(message.payload, time.monotonic(),
                                    retained=message.retain))

    def _chunk_handler(self, stream: str) -> Callable[[Message], None]:
        def on_chunk(message: Message) -> None:
            self._handle(ChunkIn(stream, message.payload, time.monotonic()))
        return on_chunk

    # -- decisions out ---------------------------------------------------------------------
    def _carry_out(self, decision: Decision) -> int:
        device = self.config.device_id
        match decision:
            case Subscribe(topic_filters=filters):
                for topic_filter in filters:
                    self.link.activate(topic_filter)
            case Unsubscribe(topic_filters=filters):
                for topic_filter in filters:
                    self.link.deactivate(topic_filter)
            case Train(model=model):
                self.stats.models_received += 1
                self.stats.traffic[model.announcement.round][1] += model.wire_bytes
                # newest wins: never train on a superseded model; and the worker re-sends
                # what a new model makes due
                self._decided_round = max(self._decided_round, model.announcement.round)
                self._wake_worker(decision)
            case Evaluate(model=model):
                if self.trainer.eval_data is None:
                    self.stats.not_evaluated += 1
                    log.info("%s: asked to score model v%d but holds no held-out data (set "
                             "eval_holdout)", device, model.announcement.version)
                else:
                    with self._wake:  # newest wins, as for training
                        self._pending_eval = decision
            case Report(topic=topic, payload=payload):
                self.link.publish(topic, payload, qos=1)
                self.stats.evaluated += 1
                return len(payload)
            case NewLineage(lineage=lineage):
                log.warning("%s: the aggregator started over (model lineage %s): dropping the "
                            "model held and following the new one", device, lineage or "-")
            case SitOut(announcement=a):
                self.stats.sat_out += 1
                log.debug("%s: not in round %d's cohort (model v%d): not downloading it",
                          device, a.round, a.version)
                self._decided_round = max(self._decided_round, a.round)
                self._wake_worker(None)
            case Send():
                sent = self._send(decision)
                self.stats.traffic[decision.round][0] += sent  # bytes are bytes
                self.stats.resent += decision.resend
                return sent
            case Settled(receipt=receipt):
                self.stats.receipts[receipt.status] += 1
                if receipt.status == "accepted":
                    log.debug("%s: update %s counted in round %d", device, receipt.update_id,
                              receipt.round)
                else:  # a routine refusal (the round closed first) is no news
                    log.log(logging.INFO if receipt.routine else logging.WARNING,
                            "%s: update %s for round %d dropped: %s %s", device,
                            receipt.update_id, receipt.round, receipt.status, receipt.reason)
            case Ignored(what=what, why=why):
                log.debug("%s: ignoring %s (%s)", device, what, why)
            case Rejected(what=what, reason=reason, detail=detail):
                self.stats.rejected[reason] += 1
                log.warning("%s: rejected %s message (%s): %s", device, what, reason, detail)
        return 0

    def _wake_worker(self, *pending: Train | None) -> None:
        """Wake the training thread; with `pending`, replace the model it is to train next."""
        with self._wake:
            if pending:
                self._pending = pending[0]
            self._wake.notify()

    def _send(self, send: Send) -> int:
        messages = split_payload(send.payload,
                                 max_payload=self.link.effective_max_payload(send.topic))
        connected = self.link.connected.is_set()
        for message in messages:
            self.link.publish(send.topic, message, qos=1)
        self._handle(Sent(send.update_id, connected, time.monotonic()))
        log.debug("%s: sent update %s (round %d, connected=%s)", self.config.device_id,
                  send.update_id, send.round, connected)
        return sum(len(message) for message in messages)

    # -- secure aggregation ----------------------------------------------------------------
    def _publish_secagg(self, message) -> int:
        """A SecAgg+ message up on this device's update topic (QoS 1, not kept)."""
        payload = message.to_payload()
        self.link.publish(self.machine.update_topic, payload, qos=1)
        self.stats.traffic[message.round][0] += len(payload)
        return len(payload)

    def _queue_masked_input(self, message) -> int:
        """The masked input into the durable outbox (re-sent until receipted), then out."""
        payload = message.to_payload()
        self.outbox.put(message.input_id, message.round, payload)
        sent = self._send(Send(self.machine.update_topic, message.input_id, message.round,
                               payload, resend=False))
        self.stats.traffic[message.round][0] += sent
        return sent

    def _on_secagg(self, message: Message) -> None:
        """The round's setup, or a message of it for this device."""
        assert self.secure is not None
        if message.topic == self.secure.setup_topic:
            sent = self.secure.on_setup(message.payload)
        else:
            sent = self.secure.on_message(message.payload)
        self.stats.traffic[self.secure.round][1] += len(message.payload)
        self._secure_sent(sent)

    def _secure_sent(self, sent: int) -> None:
        with self._report_lock:
            self.report.uploaded(sent)
            self.report.holding(len(self.outbox))

    # -- training thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                if self._pending is None and not self._stopping:
                    self._wake.wait(RESEND_CHECK_S)
                if self._stopping:
                    return
                train, self._pending = self._pending, None
                evaluate, self._pending_eval = self._pending_eval, None
            # receipts can reach us once subscribed: re-send what is due
            self._handle(Tick(time.monotonic(), online=self.link.subscribed.is_set()))
            if self.link.connected.is_set():
                self._publish_status()
            if evaluate is not None:
                self._evaluate_and_report(evaluate)
            if train is not None:
                try:
                    self._train_and_publish(train)
                except OSError as exc:  # a full disk must not end training for good
                    self.stats.rejected["train_error"] += 1
                    log.error("%s: round %d failed: %s; waiting for the next model",
                              self.config.device_id, train.model.announcement.round, exc)
                except Exception:  # nor a bug
                    self.stats.rejected["train_error"] += 1
                    log.exception("%s: round %d failed; waiting for the next model",
                                  self.config.device_id, train.model.announcement.round)

    def _evaluate_and_report(self, evaluate: Evaluate) -> None:
        a = evaluate.model.announcement
        try:
            report = self.trainer.evaluate(evaluate.model, a.task_for(self.config.device_id))
        except Exception as exc:  # a user task's evaluate, or a bug: training goes on
            self.stats.rejected["eval_error"] += 1
            log.error("%s: scoring model v%d failed: %s", self.config.device_id, a.version,
                      exc)
            return
        if report is None:
            return
        self.last_eval = report
        self._handle(Evaluated(report, time.monotonic()))
        personal = report.personal
        log.info("%s: model v%d scores %s on %d held-out examples%s", self.config.device_id,
                 a.version, _accuracy(report.metrics), report.num_samples,
                 f" (personalized: {_accuracy(personal)})" if personal is not None else "")

    def _train_and_publish(self, train: Train) -> None:
        a = train.model.announcement
        log.info("%s: round %d: training on model v%d", self.config.device_id, a.round,
                 a.version)
        if self.secure is not None:
            self._train_secure(train)
            return
        try:
            update = self.trainer.train(train.model, train.task)
        except FedmqError as exc:
            self._train_failed(exc, a)
            return
        # What is due goes out before the new update (a stored one from before a restart
        # whose receipt the link could not hear when training began): same order as made.
        self._handle(Tick(time.monotonic(), online=self.link.subscribed.is_set()))
        sent = self._handle(Trained(update, time.monotonic()))
        self.stats.updates_sent += 1
        self.stats.partial += not update.complete
        self.stats.codecs[update.delta.codec] += 1
        with self._report_lock:
            self.report.trained(round=a.round, codec=update.delta.codec,
                                backend=self.trainer.backend)
        log.info("%s: round %d: trained on %d samples (loss %.4f), sent %d bytes",
                 self.config.device_id, a.round, update.num_samples, update.loss, sent)

    def _train_failed(self, exc: FedmqError, a: ModelAnnouncement) -> None:
        if isinstance(exc, TrainingSkipped):  # not a failure
            log.info("%s: model v%d not trained: %s", self.config.device_id, a.version, exc)
            return
        self.stats.rejected[getattr(exc, "reason", "train_failed")] += 1
        log.error("%s: cannot train on model v%d: %s", self.config.device_id, a.version, exc)

    def _train_secure(self, train: Train) -> None:
        """Train, then hand the raw delta to the secure round (never sent in the clear)."""
        assert self.secure is not None
        a = train.model.announcement
        try:
            delta, samples = self.trainer.train_delta(train.model, train.task)
        except FedmqError as exc:
            self._train_failed(exc, a)
            return
        self._handle(Tick(time.monotonic(), online=self.link.subscribed.is_set()))
        sent = self.secure.submit(a.round, delta, samples)
        self._secure_sent(sent)
        self.stats.updates_sent += 1
        self.stats.codecs["secagg"] += 1
        with self._report_lock:
            self.report.trained(round=a.round, codec="secagg", backend=self.trainer.backend)
        log.info("%s: round %d: trained on %d samples, masked input %s", self.config.device_id,
                 a.round, samples, "sent" if sent else "waits for the round's shares")

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._worker = threading.Thread(target=self._run, name=f"train-{self.config.device_id}",
                                        daemon=True)
        self._worker.start()
        self.link.start()

    def request_stop(self) -> None:
        """Tell the agent to stop without waiting: a simulator tells every device first,
        so none waits for its turn to train behind devices not yet told."""
        self.trainer.halt.set()
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def stop(self) -> None:
        self.request_stop()
        if self._worker is not None:
            self._worker.join(timeout=30)
        with self._report_lock:  # the last word: offline, with what it did
            offline = self.report.status(online=False, now=time.monotonic(), wall=time.time())
        self.link.stop(final=(self.topics.device_status(self.config.device_id),
                              offline.to_payload()))
        if self._state_lock is not None:
            self._state_lock.release()
