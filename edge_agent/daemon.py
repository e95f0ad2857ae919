"""The agent daemon: a composition root of ``init_*`` / ``start_*`` steps (no logic of its own).

The agent serves from its state directory before it reaches the broker: the last active model
is loaded, events go to the outbox from the first sample, and the MQTT connection is made
in the background by paho's network thread, which keeps reconnecting. A host that boots during
a network outage detects and queues as usual; the outbox drains once the broker is back.

Threads: the main thread reads the source and runs detection; paho's network thread; the
outbox publisher; a reconcile worker woken by each new retained ``timestamp.json`` and each
connect, which retries a pass that failed for a transient reason (broker, full disk) and runs
python-tuf in a child process for the length of a pass (:class:`IsolatedRepository`: the
agent process never loads it); a health timer; a state writer that persists the
birth/death sequence reservation. paho callbacks do no disk I/O: they take short in-memory
locks, set events and publish, and every one of them is guarded so that no exception reaches
paho's network thread.

A full state directory never stops detection: an event that cannot be stored is counted (in
health ``outbox_dropped``) and logged at most once a minute; a deployment that cannot be
stored is reported ``failed`` (``storage: …``) and retried until it can.

The last :data:`HISTORY` samples pre-fill a newly activated model, so that it scores from the
next sample. They outlive a clean stop (:mod:`edge_agent.recent`): saved at shutdown, loaded
before the active models are installed, and kept only if the first live sample continues them.
"""

from __future__ import annotations

import functools
import logging
import platform
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from edge_agent.activation import ActivationStore, ActiveRecord
from edge_agent.config import AgentConfig
from edge_agent.detector import Detection, Detector
from edge_agent.drift import DriftMonitor, DriftReport, DriftUnavailable, monitor_for
from edge_agent.mqtt import BrokerError, Will, connect_in_background, new_client
from edge_agent.outbox import Outbox, OutboxError, OutboxPublisher
from edge_agent.recent import RECENT_SAMPLES, discontinuity, load_recent, save_recent
from edge_agent.reconcile import LoadedModel, Reconciler, Repository, load_active, load_shadow
from edge_agent.runtime import ModelRuntime, available_runtimes, open_runtime
from edge_agent.shadow import ShadowComparison, ShadowModel
from edge_agent.sources import Sample, open_source, parse_source
from edge_agent.systemd import Notifier, Watchdog
from edge_agent.throttle import ThrottledLog
from edge_agent.trust import IsolatedRepository, TrustError
from edge_agent.usage import ProcessUsage
from shared.bundle import BundleSpec
from shared.files import write_atomically
from shared.messages import (
    ActiveModel,
    AgentHealth,
    AgentState,
    DeploymentStatus,
    encode_agent_health,
    encode_agent_state,
    encode_deployment_status,
    encode_drift_event,
    encode_event,
)
from shared.topics import Topics

if TYPE_CHECKING:
    from edge_agent.api import AgentMetrics, LocalApi
    from edge_agent.federated.participation import FederatedParticipation

__all__ = ["Agent", "Backoff", "EXIT_AUTH", "EXIT_OK"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_AUTH = 3
AUTH_FAILURES = {134, 135}  # MQTT 5 reason codes bad user name or password, not authorized
NOT_AUTHORIZED = 135  # MQTT 5 PUBACK reason code of a publish the broker's ACL refuses
OUTBOX_REOPEN_INTERVAL = 5.0  # seconds between attempts to open an outbox that would not open
HISTORY = 4096  # recent samples kept to pre-fill a newly activated model (windows up to this)


def _event_payload(detection: Detection, agent: str, seq: int) -> bytes:
    return encode_event(detection, agent, seq)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _waiting_on(samples: Iterator[Sample], watchdog: Watchdog) -> Iterator[Sample]:
    """``samples``, telling ``watchdog`` each time the loop blocks waiting for the next one."""
    while True:
        watchdog.waiting()
        sample = next(samples, None)
        if sample is None:
            return
        yield sample


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """A paho callback that logs its exceptions instead of raising them into the network
    thread (an exception there ends the thread: no more reconnects, no more deliveries)."""

    @functools.wraps(callback)
    def wrapper(*args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("MQTT callback %s failed; the connection carries on", callback.__name__)

    return wrapper


@dataclass
class Backoff:
    """Jittered exponential backoff ("full jitter"): uniform in [base, min(cap, base·2^n)]."""

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return self.rng.uniform(self.base, max(self.base, ceiling))

    def reset(self) -> None:
        self.attempt = 0


class Agent:
    """One edge agent. ``run()`` blocks until the source ends or :meth:`stop` is called."""

    def __init__(self, config: AgentConfig, *, stdin=None, environ: Mapping[str, str] | None = None) -> None:
        """``environ`` (``os.environ`` in ``main()``) carries systemd's ``NOTIFY_SOCKET`` and
        ``WATCHDOG_USEC``; without it nothing is sent to systemd."""
        self.config = config
        self.topics = Topics(config.topic_root)
        self.stop_event = threading.Event()
        self.reconcile_event = threading.Event()
        self.model_ready = threading.Event()  # set once any slot serves a model
        self.exit_code = EXIT_OK
        self.started_at = _now()  # health ``started_at``: counters count from here
        self._stdin = stdin
        self._lock = threading.Lock()  # guards self._detectors, _drift, _shadows and _history
        self._detectors: dict[str, Detector] = {}
        # per slot, the shadow candidate run beside its model; replaced, never changed in
        # place (like _drift): an empty dict keeps shadow mode off the serving path
        self._shadows: dict[str, ShadowModel] = {}
        self._shadow_failures: dict[str, DeploymentStatus] = {}  # the last failed shadow per slot
        self._shadow_errors = ThrottledLog(log, 60.0)  # failed shadow inferences
        # stored shadows that did not load at start-up, for the reconciler to report
        self._failed_shadows: list[tuple[str, ActiveRecord, str]] = []
        # per slot; replaced, never changed in place, so that a reader may keep a reference
        self._drift: dict[str, DriftMonitor | DriftUnavailable] = {}
        self._history: deque[Sample] = deque(maxlen=HISTORY)
        self._resumed = 0  # samples loaded from the last stop, not yet judged by a live one
        self._errors = 0
        self._retired = {"inferences": 0, "anomalies": 0, "errors": 0}  # of replaced detectors (under _lock)
        self.store: ActivationStore | None = None
        self.bdseq = 0
        self._reserve_wanted = threading.Event()  # a bdseq was handed out: persist a reservation
        self.outbox: Outbox | None = None
        self.publisher: OutboxPublisher | None = None
        self._outbox_retry_at = 0.0
        self._outbox_lock = threading.Lock()  # serving and health threads both may open it
        self._unstored = ThrottledLog(log, 60.0)  # anomaly events that could not be stored
        self.trusted: Repository | None = None
        self.reconciler: Reconciler | None = None
        self._storage_failure: str | None = None  # the last one reported while provisioning
        self._session: mqtt.Client | None = None
        self._connected_once = False  # a CONNACK was accepted since the process started
        self._birth_mid: int | None = None  # the 'online' publish of the current connection
        self._tls_rejected: dict[str, Any] | None = None  # the last broker certificate refused
        self._backoff = Backoff()
        self._usage = ProcessUsage()
        self.federation: FederatedParticipation | None = None
        self._records: dict[str, ActiveRecord] = {}  # what each slot's detector serves (under _lock)
        self._deployments: dict[str, DeploymentStatus] = {}  # the last status reported per slot
        self._last_sample: float | None = None  # time.monotonic() of the source's last sample
        self.metrics: AgentMetrics | None = None
        self.api: LocalApi | None = None
        self.notifier = Notifier.from_environ(environ or {})
        self.watchdog = Watchdog.from_environ(self.notifier, environ or {})
        formats = {"onnx": "onnxruntime", "tflite": "litert"}
        self.runtimes = available_runtimes({formats[f] for f in config.profile.formats})

    # -- init (nothing here waits for the broker) ---------------------------------------------

    def init_state(self) -> None:
        """Clean up after a crash, take a birth/death sequence number, open the outbox and load
        the active models. A full disk is logged and survived: see the module docstring."""
        c = self.config
        c.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = ActivationStore(c.state_dir)
        removed = self.store.recover()
        if removed:
            log.info("cleaned up after a crash: %s", ", ".join(removed))
        if not self._reserve_bdseq():
            self._reserve_wanted.set()  # the state writer retries
        self.bdseq = self.store.next_bdseq()
        try:
            self._open_outbox()
        except OutboxError as e:
            log.error("%s: anomaly events are counted, not stored, until it opens", e)
        # Before the models are installed, which pre-fill their windows from the history; the
        # first live sample decides whether these samples stay (_judge_resumed).
        resumed = load_recent(c.state_dir / RECENT_SAMPLES, limit=HISTORY)
        self._history.extend(resumed)
        self._resumed = len(resumed)
        for slot in self.store.slots():
            loaded = load_active(self.store, slot, c.threads, open_model=self._open_model)
            if loaded:
                self._install(slot, loaded)
        for slot, record in self.store.shadows():
            shadow = load_shadow(self.store, slot, c.threads, open_model=self._open_model)
            if isinstance(shadow, LoadedModel):
                self._install_shadow(slot, shadow)
            elif shadow is not None:  # out of the store, so that a reconcile pass fetches it again
                self._failed_shadows.append((slot, record, shadow))
                try:
                    self.store.set_shadow(slot, None)
                except OSError as e:
                    log.warning("slot %s: cannot remove the stored shadow: %s", slot, e)
        if c.emulated:
            log.warning(
                "profile %s (%s) is emulated on this %s host: figures are this host's",
                c.profile.name, c.profile.arch, platform.machine(),
            )

    def init_federated(self) -> None:
        """End a SuperNode a killed agent left behind, whatever the config says now; then, with
        ``[federated] enabled``, the window store feed and the SuperNode supervisor if this
        host can join (otherwise the reason goes to health). Without it nothing federated is
        imported unless such a leftover has to be ended.

        Raises:
            OSError: the federated state directory cannot be created or written.
            FederatedStateError: a federated state file cannot be opened.
        """
        c = self.config
        workdir = (c.federated.state_dir or c.state_dir / "federated").absolute() / "supernode"
        if (workdir / "supernode.pid").exists():  # see edge_agent.federated.supernode
            from edge_agent.federated.supernode import end_leftover

            end_leftover(workdir)
        if not c.federated.enabled:
            return
        from edge_agent.federated.participation import FederatedParticipation

        self.federation = FederatedParticipation(
            c.federated, agent_id=c.agent_id, group=c.group, profile=c.profile, state_dir=c.state_dir)

    def init_session(self) -> None:
        """Build the MQTT client; :meth:`start_connections` connects it.

        Raises:
            BrokerError: the TLS files cannot be loaded (a configuration error).
        """
        c, b = self.config, self.config.broker
        creds: dict[str, Any] = dict(username=b.username, password=b.password, ca_file=b.ca_file,
                                     cert_file=b.cert_file, key_file=b.key_file)
        will = Will(self.topics.agent_state(c.agent_id), encode_agent_state(self._state("offline")))
        self._session = session = new_client(b.url, client_id=c.agent_id, will=will,
                                             on_tls_reject=self._on_tls_reject, **creds)
        session.on_connect = self._on_connect
        session.on_disconnect = self._on_disconnect
        session.on_connect_fail = self._on_connect_fail
        session.on_publish = self._on_publish
        session.message_callback_add(self.topics.repo_metadata("timestamp.json"), self._on_timestamp)

    def init_trust(self) -> None:
        """Provision the trust anchor and open the TUF client. If the state directory cannot
        be written (full disk), deployments wait: the reconcile worker tries again.

        Raises:
            TrustError: the configured trust root cannot be read or is not a valid TUF root.
        """
        try:
            self._open_trust()
        except OSError as e:
            log.error("cannot write the trusted metadata in %s (%s): deployments wait until it can",
                      self.config.state_dir, e)

    def init_api(self) -> None:
        """With ``[api] enabled``, the per-agent metrics registry and the local HTTP API,
        listening before the state is loaded (``/healthz`` says 503 until a model serves and
        samples flow). Without it neither ``http.server`` nor
        ``prometheus_client`` is imported.

        Raises:
            OSError: the API's address cannot be bound.
        """
        if not self.config.api.enabled:
            return
        from edge_agent.api import AgentMetrics, LocalApi

        self.metrics = AgentMetrics(self)
        api = LocalApi(self.config.api, self, self.metrics)
        api.start()
        self.api = api

    def _open_trust(self) -> None:
        c = self.config
        metadata = c.state_dir / "metadata"
        anchor = metadata / "root.json"
        if not anchor.exists():  # provisioning: copy the trust anchor once; TUF keeps it current
            try:
                root = c.trust_root.read_bytes()
            except OSError as e:
                raise TrustError("unavailable", f"cannot read it: {e}") from e
            # Atomic: a crash or a full disk must not leave a truncated anchor, which would
            # then "exist" and refuse every later start.
            write_atomically(anchor, root)
        assert self.store is not None
        trusted = self._repository(metadata)
        self.reconciler = Reconciler(
            agent_id=c.agent_id, group=c.group, profile=c.profile, runtimes=self.runtimes,
            threads=c.threads, trusted=trusted, store=self.store,
            report=self._report_deployment, activate=self._install,
            after_pass=self.federation.on_pass if self.federation is not None else None,
            untrusted=self.federation.on_untrusted if self.federation is not None else None,
            open_model=self._open_model,
            shadow=self._install_shadow, report_shadow=self._report_shadow,
        )
        for slot, record, reason in self._failed_shadows:
            self.reconciler.stored_shadow_failed(slot, record, reason)
        self._failed_shadows = []
        self.trusted = trusted

    def _repository(self, metadata: Path) -> Repository:
        """The TUF client of reconcile passes, over the trusted metadata in ``metadata``.

        Raises:
            TrustError: the trust anchor is invalid.
            OSError: the anchor cannot be cached (a full disk).
        """
        c = self.config
        # python-tuf runs in a child process for each reconcile pass, never in this one (memory);
        # the anchor is checked now. OSError: a full disk.
        return IsolatedRepository(
            metadata, c.state_dir / "targets", c.state_dir / "chunks", broker=c.broker,
            client_id=f"{c.agent_id}.fetch", topics=self.topics, timeout=15,
        )

    def _open_model(self, spec: BundleSpec, model: bytes, *, threads: int) -> ModelRuntime:
        """Open a verified bundle's model in its runtime (one session per agent)."""
        return open_runtime(spec, model, threads=threads)

    def _reserve_bdseq(self) -> bool:
        assert self.store is not None
        try:
            self.store.reserve_bdseq()
        except OSError as e:
            log.warning("cannot save the birth/death sequence reservation (%s); will retry", e)
            return False
        return True

    def _open_outbox(self) -> Outbox | None:
        """The outbox, opened now if it is not open yet (at most every few seconds). Thread safe:
        the serving thread (anomaly events) and the health thread (drift events) both call it,
        and only one of them opens the outbox and starts its publisher.

        Raises:
            OutboxError: it cannot be opened (e.g. the disk is full).
        """
        outbox = self.outbox
        if outbox is not None:  # the common case, without the lock
            return outbox
        with self._outbox_lock:
            if self.outbox is not None:
                return self.outbox
            now = time.monotonic()
            if now < self._outbox_retry_at:
                return None
            self._outbox_retry_at = now + OUTBOX_REOPEN_INTERVAL
            c = self.config
            outbox = Outbox(c.state_dir / "outbox.sqlite", max_bytes=c.outbox_max_bytes)
            self.outbox = outbox
            if self._session is not None:  # opened late: the workers are running already
                log.info("outbox %s open: events are stored again", outbox.path)
                self._start_publisher()
            return outbox

    # -- MQTT callbacks (network thread: no disk I/O, never block, never raise) ---------------

    @_guarded
    def _on_connect(self, client, _userdata, _flags, reason, _props) -> None:
        if getattr(reason, "is_failure", False):
            if getattr(reason, "value", None) in AUTH_FAILURES:
                log.error("broker %s refused the credentials: stopping", self.config.broker.url)
                self.exit_code = EXIT_AUTH
                self.stop_event.set()
            else:
                log.warning("broker %s refused the connection: %s", self.config.broker.url, reason)
            return
        self._backoff.reset()
        client.reconnect_delay_set(self._backoff.base, self._backoff.base)
        self._connected_once = True
        if self._tls_rejected is not None and self._tls_rejected.get("ongoing"):
            self._tls_rejected["ongoing"] = False
            log.info("connected to %s again: its certificate verifies", self.config.broker.url)
        else:
            log.info("connected to %s", self.config.broker.url)
        # Resubscribe and re-announce on every connect (clean sessions keep nothing).
        client.subscribe(self.topics.repo_metadata("timestamp.json"), qos=1)
        info = client.publish(self.topics.agent_state(self.config.agent_id),
                              encode_agent_state(self._state("online")), qos=1, retain=True)
        self._birth_mid = info.mid  # its PUBACK is handled on this thread, after this returns
        self.reconcile_event.set()  # converge now: a deployment may have come while away

    @_guarded
    def _on_disconnect(self, client, _userdata, _flags, reason, _props) -> None:
        if self.stop_event.is_set():
            return
        assert self.store is not None
        # A new birth/death sequence for the next session, so that a late Last Will of the old
        # session (bdseq N) can never be mistaken for the new one (bdseq N + 1). It comes from
        # the reservation in memory; the state writer tops the reservation up on disk.
        self.bdseq = self.store.next_bdseq()
        self._reserve_wanted.set()
        client.will_set(self.topics.agent_state(self.config.agent_id),
                        encode_agent_state(self._state("offline")), qos=1, retain=True)
        self._set_reconnect_delay(client, "disconnected from broker (%s)", reason)

    @_guarded
    def _on_publish(self, _client, _userdata, mid, reason, _props) -> None:
        # The broker refused the birth message on the agent's own state topic: its ACL gives
        # this user no right to this agent's topics (broker.username not the agent id, another
        # topic root, an ACL not regenerated for this agent). Every event would be refused too.
        if mid != self._birth_mid:
            return
        self._birth_mid = None  # its one PUBACK: a later publish reusing the mid is not the birth
        if getattr(reason, "value", None) != NOT_AUTHORIZED:
            return
        if self.stop_event.is_set():
            return
        b = self.config.broker
        log.error("broker %s does not authorize user %r to publish to %s: its ACL must give the "
                  "agent's user name (broker.username, normally the agent id) the topics under %s; "
                  "stopping", b.url, b.username, self.topics.agent_state(self.config.agent_id),
                  self.config.topic_root)
        self.exit_code = EXIT_AUTH
        self.stop_event.set()

    @_guarded
    def _on_tls_reject(self, reason: str) -> None:
        # Before the first connection, a broker whose certificate the configured CA does not
        # vouch for is a configuration error: stop, as for refused credentials. Once connected,
        # it is an impostor on the path or a broker certificate that expired or was rotated: a
        # stop would end detection on every host, so keep retrying with backoff (the outbox keeps
        # the events), say it once, and report it in health.
        if self.stop_event.is_set():
            return
        b = self.config.broker
        where = b.ca_file or "the system CA store"
        if not self._connected_once:
            log.error("broker %s: %s (broker.ca_file: %s): stopping", b.url, reason, where)
            self.exit_code = EXIT_AUTH
            self.stop_event.set()
            return
        previous = self._tls_rejected
        if previous is None or not previous.get("ongoing"):
            log.error("broker %s: %s (broker.ca_file: %s): not connecting to it; detection goes "
                      "on, events stay in the outbox, retrying with backoff", b.url, reason, where)
        count = previous["count"] + 1 if previous is not None else 1
        self._tls_rejected = {"reason": reason, "at": _now(), "count": count, "ongoing": True}

    @_guarded
    def _on_connect_fail(self, client, _userdata) -> None:
        if self.stop_event.is_set():
            return
        rejected = self._tls_rejected is not None and self._tls_rejected.get("ongoing")
        # A refused certificate was logged once (ERROR) by _on_tls_reject; its retries are not news.
        self._set_reconnect_delay(client, "cannot reach the broker at %s", self.config.broker.url,
                                  level=logging.DEBUG if rejected else logging.WARNING)

    def _set_reconnect_delay(self, client: mqtt.Client, what: str, arg: object, *,
                             level: int = logging.WARNING) -> None:
        delay = self._backoff.next()
        # paho waits min(delay·2, max) between attempts; min == max pins it to our jittered delay.
        client.reconnect_delay_set(max(1, round(delay)), max(1, round(delay)))
        log.log(level, what + "; reconnecting in ~%.0f s", arg, max(1, round(delay)))

    @_guarded
    def _on_timestamp(self, _client, _userdata, _msg) -> None:
        self.reconcile_event.set()

    # -- reports -------------------------------------------------------------------------------

    def _state(self, status: str) -> AgentState:
        records = self.store.active() if self.store is not None else []
        active = [ActiveModel(slot, r.model, r.version, r.format, r.quantization, r.sha256)
                  for slot, r in records]
        return AgentState(
            agent=self.config.agent_id, status=status, bdseq=self.bdseq,
            group=self.config.group, profile=self.config.profile.name,
            arch=platform.machine(), runtimes=tuple(self.runtimes), active=tuple(active),
            emulated=self.config.emulated, ts=_now(), health_period_s=self.config.health_period,
        )

    def _publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if self._session is not None:
            self._session.publish(topic, payload, qos=qos, retain=retain)

    def _report_deployment(self, slot: str, state: str, model: str, version: int, serial: int,
                           reason: str | None) -> None:
        status = DeploymentStatus(agent=self.config.agent_id, slot=slot if slot != "*" else "default",
                                  model=model or "-", version=version, state=state, reason=reason,
                                  serial=serial, ts=_now())
        self._deployments[status.slot] = status
        # Retained so `edgefleet fleet status` shows the last deployment of an agent.
        self._publish(self.topics.agent_deployments(self.config.agent_id),
                      encode_deployment_status(status), retain=True)
        if state in ("active", "rolled_back"):
            self._publish(self.topics.agent_state(self.config.agent_id),
                          encode_agent_state(self._state("online")), retain=True)

    def _report_shadow(self, slot: str, state: str, model: str, version: int, serial: int,
                       reason: str | None) -> None:
        """A state change of a slot's shadow candidate: a deployment status with role
        ``shadow``, unretained (the retained status stays the serving model's); a ``failed``
        one also shows in health ``shadow`` until a shadow of the slot is active or removed
        (a retry of the same candidate, which fails again, keeps showing it)."""
        status = DeploymentStatus(agent=self.config.agent_id, slot=slot, model=model or "-",
                                  version=version, state=state, reason=reason, serial=serial,
                                  ts=_now(), role="shadow")
        if state in ("failed", "active", "removed"):
            failures = {s: f for s, f in self._shadow_failures.items() if s != slot}
            if state == "failed":
                failures[slot] = status
            self._shadow_failures = failures  # replaced, never changed in place: health reads it
        self._publish(self.topics.agent_deployments(self.config.agent_id),
                      encode_deployment_status(status), retain=False)

    def shadow_health(self) -> dict[str, Any] | None:
        """Health ``shadow``: per slot, the shadow's comparison with the slot's model, or its
        failure; ``None`` when no slot has a shadow."""
        with self._lock:
            shadows = self._shadows
        out: dict[str, Any] = {slot: m.to_json() for slot, m in sorted(shadows.items())}
        for slot, status in self._shadow_failures.items():
            out[slot] = {"model": status.model, "version": status.version, "state": "failed",
                         "reason": status.reason, "serial": status.serial}
        return out or None

    def health(self, *, cpu_share: bool = True) -> AgentHealth:
        """Counters and gauges; ``outbox_dropped`` also counts the events that could not be
        stored at all (disk full) since the agent started.

        ``cpu_percent`` is the CPU share since the previous report; ``cpu_share=False`` (a
        metrics scrape) leaves it ``None`` and that window alone for the health reporter."""
        with self._lock:  # the detectors and the retired counters of one instant
            stats = [d.stats() for d in self._detectors.values()]
            retired = dict(self._retired)
        p50 = max((s.latency_p50_ms for s in stats if s.latency_p50_ms is not None), default=None)
        p99 = max((s.latency_p99_ms for s in stats if s.latency_p99_ms is not None), default=None)
        outbox = self.outbox
        rejected = self._tls_rejected
        extra = {} if rejected is None else {"broker_tls_rejected": {
            k: rejected[k] for k in ("reason", "at", "count")}}
        return AgentHealth(
            agent=self.config.agent_id, ts=_now(),
            inferences=sum(s.inferences for s in stats) + retired["inferences"],
            anomalies=sum(s.anomalies for s in stats) + retired["anomalies"],
            errors=sum(s.errors for s in stats) + retired["errors"] + self._errors,
            latency_ms={"p50": p50, "p99": p99},
            outbox_depth=outbox.depth() if outbox is not None else 0,
            outbox_dropped=(outbox.dropped() if outbox is not None else 0) + self._unstored.total,
            rss_mb=self._usage.rss_bytes() / 1e6, cpu_percent=self._usage.cpu_percent() if cpu_share else None,
            federated=(self.federation.health() if self.federation is not None else
                       {"can_join": False, "reason": "federated learning is not enabled in the "
                                                     "agent config ([federated] enabled)"}),
            drift=self._assess_drift(),
            extra=extra,
            started_at=self.started_at,
            shadow=self.shadow_health(),
            outbox_refused=self.publisher.refused if self.publisher is not None else 0,
        )

    def _assess_drift(self) -> dict[str, Any]:
        """Every slot's drift figures (health ``drift``); a slot whose drift has just been
        raised queues a ``drift`` event (once per raise: the monitor's hysteresis)."""
        with self._lock:
            monitors = self._drift
        out: dict[str, Any] = {}
        for slot, monitor in sorted(monitors.items()):
            if isinstance(monitor, DriftUnavailable):
                out[slot] = monitor.to_json()
                continue
            report = monitor.assess()
            if report.raised:
                drifted = [f for f, v in report.features.items() if v["drifted"]]
                drifted += ["(score)"] if report.score["drifted"] else []
                log.warning("slot %s: %s@%s inputs drifted from its training reference (%s)",
                            slot, report.model, report.model_version, ", ".join(drifted))
                self._store_drift_event(report)
            out[slot] = report.to_json()
        return out

    # -- the local API's view (edge_agent.api.AgentView) ----------------------------------------

    def serving(self) -> dict[str, tuple[Detector, ActiveRecord]]:
        """The detector and record of every slot that serves a model (a snapshot)."""
        with self._lock:
            return {slot: (d, self._records[slot]) for slot, d in self._detectors.items()}

    def deployments(self) -> list[DeploymentStatus]:
        """The last deployment status reported for each slot since the agent started."""
        deployments = dict(self._deployments)  # a copy: the reconcile worker may add a slot
        return [deployments[slot] for slot in sorted(deployments)]

    def last_sample_age(self) -> float | None:
        """Seconds since the source's last sample; ``None`` before the first."""
        last = self._last_sample
        return None if last is None else time.monotonic() - last

    # -- workers -------------------------------------------------------------------------------

    def _health_loop(self) -> None:
        while not self.stop_event.wait(self.config.health_period):
            try:
                self._publish(self.topics.agent_health(self.config.agent_id),
                              encode_agent_health(self.health()), qos=0, retain=True)
            except Exception:  # a health report must never take the agent down
                log.exception("health report failed")

    def _reconcile_loop(self) -> None:
        retry = Backoff(base=1.0, cap=30.0)
        retry_in: float | None = None  # a transient failure: run again after this many seconds
        while not self.stop_event.is_set():
            woke = self.reconcile_event.wait(1.0 if retry_in is None else retry_in)
            if self.stop_event.is_set():
                break
            if not woke and retry_in is None:
                continue
            self.reconcile_event.clear()
            if self._session is None or not self._session.is_connected():
                continue  # on_connect wakes us
            if self._reconcile_once():
                retry.reset()
                retry_in = None
            else:
                retry_in = retry.next()
                log.info("reconcile: retrying in %.0f s", retry_in)

    def _reconcile_once(self) -> bool:
        """One pass; ``False`` if it should be retried (broker or storage failure)."""
        try:
            if self.reconciler is None:
                self._open_trust()
            assert self.reconciler is not None
            return self.reconciler.reconcile()
        except OSError as e:  # provisioning the trust anchor and metadata (a full disk)
            reason = f"storage: {e}"
            if reason != self._storage_failure:  # reported once, not at every retry
                self._storage_failure = reason
                log.warning("reconcile: the state directory cannot be written (%s)", e)
                self._report_deployment("*", "failed", "", 0, 0, reason)
            return False
        except TrustError as e:  # only when provisioning was put off: the root is invalid
            log.error("trust root %s: %s", self.config.trust_root, e)
            self.exit_code = EXIT_CONFIG
            self.stop_event.set()
            return True
        except Exception:
            log.exception("reconcile pass failed; the current model keeps serving")
            return True

    def _state_writer_loop(self) -> None:
        """Persist the birth/death sequence reservation, which callbacks may not write."""
        retry = Backoff(base=1.0, cap=60.0)
        failing = False
        while True:
            self._reserve_wanted.wait(retry.next() if failing else None)
            if self.stop_event.is_set():
                return
            self._reserve_wanted.clear()
            failing = not self._reserve_bdseq()
            if not failing:
                retry.reset()

    # -- serving -------------------------------------------------------------------------------

    def _install(self, slot: str, loaded: LoadedModel) -> None:
        """Swap the slot's detector; the new one is pre-filled with the last ``window - 1``
        recent samples (one short of a full window: the pre-fill scores nothing)."""
        observe = self.metrics.inference_seconds.observe if self.metrics is not None else None
        detector = Detector(loaded.runtime, loaded.spec, model_version=loaded.record.version, slot=slot,
                            observe_latency=observe)
        drift = monitor_for(loaded.spec, self.config.drift, slot=slot, model=loaded.record.model,
                            model_version=loaded.record.version)
        features = loaded.spec.features
        # Under the lock: no sample is appended or dropped between the pre-fill and the swap.
        with self._lock:
            start = max(0, len(self._history) - (loaded.spec.window - 1))
            for sample in islice(self._history, start, None):
                detector.push(sample.timestamp, [sample.values.get(f) for f in features])
            old = self._detectors.get(slot)
            self._detectors[slot] = detector
            self._drift = {**self._drift, slot: drift}
            self._records[slot] = loaded.record
            shadow = self._shadows.get(slot)
            if shadow is not None:  # compared with another model from now on: start over
                self._shadows = {**self._shadows, slot: replace(shadow, comparison=ShadowComparison())}
            if old is not None:  # in the same critical section: a health read never sees totals drop
                s = old.stats()
                self._retired["inferences"] += s.inferences
                self._retired["anomalies"] += s.anomalies
                self._retired["errors"] += s.errors
        self.model_ready.set()
        log.info("slot %s now serves %s@%s (%s/%s)", slot, loaded.record.model,
                 loaded.record.version, loaded.record.format, loaded.record.quantization)

    def _install_shadow(self, slot: str, loaded: LoadedModel | None) -> None:
        """Run ``loaded`` beside the slot's model (pre-filled like :meth:`_install`, with a
        fresh comparison), or with ``None`` unload the slot's shadow. A shadow's detections
        never become events, outbox entries, drift observations or federated windows."""
        if loaded is None:
            with self._lock:
                self._shadows = {s: m for s, m in self._shadows.items() if s != slot}
            log.info("slot %s: shadow removed", slot)
            return
        detector = Detector(loaded.runtime, loaded.spec, model_version=loaded.record.version, slot=slot)
        features = loaded.spec.features
        with self._lock:
            start = max(0, len(self._history) - (loaded.spec.window - 1))
            for sample in islice(self._history, start, None):
                detector.push(sample.timestamp, [sample.values.get(f) for f in features])
            shadow = ShadowModel(loaded.record, detector, ShadowComparison())
            self._shadows = {**self._shadows, slot: shadow}
        log.info("slot %s now shadows its model with %s@%s (%s/%s)", slot, loaded.record.model,
                 loaded.record.version, loaded.record.format, loaded.record.quantization)

    def _shadow_push(self, shadow: ShadowModel, sample: Sample, active: Detection | None) -> None:
        """Score ``sample`` with the slot's shadow and compare it with the serving model's
        ``active`` detection of the same sample (when both scored it). Never raises: any
        failure is one of the shadow's ``errors`` and the serving loop carries on."""
        detector = shadow.detector
        counted = detector.errors
        try:
            seen = detector.push(sample.timestamp, [sample.values.get(f) for f in detector.spec.features])
            if seen is not None and active is not None:
                shadow.comparison.add(active, seen)
        except Exception as e:
            if detector.errors == counted:  # a failed inference is already the detector's
                detector.count_error()
            self._shadow_errors.warning("slot %s: shadow inference failed: %s", detector.slot, e)

    def _serve(self, samples: Iterator[Sample]) -> None:
        topic = self.topics.agent_events(self.config.agent_id)
        federation = self.federation
        watchdog = self.watchdog
        for sample in _waiting_on(samples, watchdog):
            watchdog.beat()
            self._last_sample = time.monotonic()
            with self._lock:
                if self._resumed:
                    self._judge_resumed(sample)
                self._history.append(sample)
                detectors = list(self._detectors.values())
                monitors = self._drift  # copy-on-write: no copy per sample
                shadows = self._shadows  # copy-on-write; empty unless a slot runs a shadow
            for detector in detectors:
                detection: Detection | None = None
                counted = detector.errors
                try:
                    values = [sample.values.get(f) for f in detector.spec.features]
                    detection = detector.push(sample.timestamp, values)
                    if detection is not None:
                        monitor = monitors.get(detector.slot)
                        if isinstance(monitor, DriftMonitor):
                            monitor.observe(detection.timestamp, detection.values, detection.score)
                except Exception:
                    if detector.errors == counted:  # a failed inference is the detector's to count
                        self._errors += 1
                    log.exception("inference failed")
                    detection = None
                    failed = True
                else:
                    failed = False
                if not failed and detection is not None:
                    if detection.is_anomaly:
                        self._store_event(topic, detection)
                    elif federation is not None:
                        federation.offer(detector, detection)
                # After the serving model's event is stored: the shadow never delays it.
                if shadows and (shadow := shadows.get(detector.slot)) is not None:
                    self._shadow_push(shadow, sample, detection)  # same sample, same window
            if self.stop_event.is_set():
                break

    def _judge_resumed(self, first: Sample) -> None:
        """Keep the samples loaded at start if ``first``, the first live sample, continues them;
        otherwise drop them and make every model refill its window. Called with the lock held."""
        n, self._resumed = self._resumed, 0
        gap = discontinuity([s.timestamp for s in self._history], first.timestamp)
        if gap is None:
            log.info("resumed %d samples saved at the last stop", n)
            return
        log.info("dropped %d samples saved at the last stop: %s; models refill their windows", n, gap)
        self._history.clear()
        for detector in self._detectors.values():
            detector.restart_window()
        for shadow in self._shadows.values():
            shadow.detector.restart_window()

    def _save_recent(self) -> None:
        """Save the history for the next start (see :mod:`edge_agent.recent`); a failure is
        logged: the next start refills the windows instead."""
        with self._lock:
            samples = list(self._history)
        if not samples:
            return
        path = self.config.state_dir / RECENT_SAMPLES
        try:
            save_recent(path, samples)
        except OSError as e:
            log.warning("cannot save the recent samples to %s (%s): models refill their windows "
                        "after the restart", path, e)
            return
        log.info("saved %d recent samples to %s", len(samples), path)

    def _store_event(self, topic: str, detection: Detection) -> None:
        """Queue an event for delivery; one that cannot be stored is counted, never fatal."""
        self._enqueue(topic, partial(_event_payload, detection, self.config.agent_id),
                      f"anomaly event at {detection.timestamp}")

    def _store_drift_event(self, report: DriftReport) -> None:
        """Queue a ``drift`` event (same topic, outbox and ``seq`` as anomaly events)."""
        self._enqueue(self.topics.agent_events(self.config.agent_id),
                      partial(encode_drift_event, report, self.config.agent_id),
                      f"drift event of slot {report.slot}")

    def _enqueue(self, topic: str, build: Callable[[int], bytes], what: str) -> None:
        try:
            outbox = self._open_outbox()
            if outbox is None:
                raise OutboxError("the outbox is not open (it would not open a moment ago)")
            outbox.append_with_seq(topic, build)
        except OutboxError as e:
            self._unstored.warning("%s not stored (%s); detection goes on", what, e)
            return
        self._unstored.resolved("events are stored again")
        if self.publisher is not None:
            self.publisher.wake()

    # -- lifecycle -----------------------------------------------------------------------------

    def _start_publisher(self) -> None:
        assert self._session is not None and self.outbox is not None
        self.publisher = OutboxPublisher(self.outbox, self._session)
        self.publisher.start()

    def start_workers(self) -> None:
        if self.outbox is not None:
            self._start_publisher()
        for target in (self._health_loop, self._reconcile_loop, self._state_writer_loop):
            threading.Thread(target=target, name=target.__name__, daemon=True).start()
        self.reconcile_event.set()  # converge once connected, before the first timestamp arrives

    def start_connections(self) -> None:
        """Connect in the background: serving never waits for the broker."""
        assert self._session is not None
        url = self.config.broker.url
        log.info("connecting to %s in the background", url)
        connect_in_background(self._session, url)

    def run(self, *, exit_at_end: bool = False) -> int:
        """Run until stopped; with ``exit_at_end``, also when the source ends.

        Without it, an agent whose replay source has ended keeps serving deployments (state,
        health, reconcile) until SIGTERM/SIGINT.
        """
        try:
            # First: a federated state directory that cannot be used stops the agent before
            # anything is written (and a SuperNode left behind ends even then).
            self.init_federated()
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError):
                from edge_agent.federated import FederatedStateError  # loaded by now

                if not isinstance(e, FederatedStateError):
                    raise
            c = self.config
            where = c.federated.state_dir or c.state_dir / "federated"
            if isinstance(e, FileExistsError | NotADirectoryError):
                detail = "a file is in the way of the directory"
            else:
                detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            log.error("federated.state_dir %s cannot be used: %s", where, detail)
            return EXIT_CONFIG
        try:
            # Before the models are installed: their detectors observe the metrics' histogram.
            self.init_api()
        except OSError as e:
            log.error("cannot serve the local API on %s: %s", self.config.api.listen, e.strerror or e)
            self.shutdown()
            return EXIT_FAILURE
        try:
            self.init_state()
            self.init_session()
            self.init_trust()
        except BrokerError as e:  # the TLS files
            log.error("%s", e)
            self.shutdown()
            return EXIT_CONFIG
        except TrustError as e:  # the configured trust root is not a valid TUF root
            log.error("trust root %s: %s", self.config.trust_root, e)
            self.shutdown()
            return EXIT_CONFIG
        self.start_workers()
        self.start_connections()
        try:
            source = parse_source(self.config.source)
            self._ready()
            if source.kind != "host":
                self._wait_for_model()  # a replay must not stream past before a model serves
            self._serve(open_source(source, self.stop_event, self._stdin))
            log.info("stop requested" if self.stop_event.is_set() else "source ended")
            if not exit_at_end:
                self.watchdog.waiting()
                self.stop_event.wait()
        finally:
            self.shutdown()
        return self.exit_code

    def _ready(self) -> None:
        """Tell systemd the agent is up (``READY=1``) and start its watchdog.

        Ready means: the state is loaded, the local API (if enabled) listens, and the serving
        loop starts — serving a model, or waiting for the first one. It waits neither for the
        broker (the agent serves offline by design, and a boot during a network outage must
        not fail the unit) nor for a model (the first one arrives by a deployment).
        """
        if self.notifier.notify("READY=1"):
            log.info("notified systemd: ready%s", "" if self.watchdog.interval is None else
                     f" (watchdog every {self.watchdog.interval:g} s)")
        self.watchdog.start()

    def _wait_for_model(self) -> None:
        if not self.model_ready.is_set():
            log.info("waiting for a deployment before reading the source")
        # Wake on either event: a model arrives, or the agent is told to stop.
        while not self.stop_event.is_set() and not self.model_ready.wait(0.5):
            self.watchdog.beat()

    def stop(self) -> None:
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def shutdown(self) -> None:
        """Save the recent samples, flush events, announce ``stopped`` (retained), disconnect
        cleanly (no Last Will).

        When the broker is unreachable nothing is waited for: the events stay in the outbox.
        """
        self.notifier.notify("STOPPING=1")
        self.watchdog.stop()
        self.stop_event.set()
        self.model_ready.set()
        self._reserve_wanted.set()  # wakes the state writer, which sees the stop
        self._save_recent()  # first: the broker may make the rest slow
        session = self._session
        connected = session is not None and session.is_connected()
        if self.publisher is not None:
            if connected:
                self.publisher.wait_idle(5.0)
            self.publisher.stop()
        if session is not None:
            if not connected:
                # After a refusal (credentials, TLS) the one error line has said why already.
                (log.info if self.exit_code == EXIT_AUTH else log.warning)(
                    "broker unreachable: 'stopped' not announced; events stay in the outbox")
            else:
                if self.outbox is not None:  # a last health report with final counters
                    self._publish(self.topics.agent_health(self.config.agent_id),
                                  encode_agent_health(self.health()), qos=1, retain=True)
                info = session.publish(self.topics.agent_state(self.config.agent_id),
                                       encode_agent_state(self._state("stopped")), qos=1, retain=True)
                try:
                    info.wait_for_publish(5.0)
                except (RuntimeError, ValueError):
                    log.warning("could not announce 'stopped' (broker unreachable)")
        if self.federation is not None:  # its SuperNode stops with the agent
            self.federation.close()
        if self._session is not None:
            self._session.disconnect()
            self._session.loop_stop()
        if self.outbox is not None:
            self.outbox.close()
        if self.api is not None:  # last: the health check answers while the agent stops
            self.api.close()
        log.info("agent %s stopped", self.config.agent_id)
