"""The agent daemon: a composition root of ``init_*`` / ``start_*`` steps (no logic of its own).

Threads: the main thread reads the source and runs detection; paho's network threads
(session and fetcher connections); the outbox publisher; a reconcile worker woken by each new
retained ``timestamp.json``; a health timer. Callbacks only set events or enqueue: they never
block or raise into paho's network thread.
"""

from __future__ import annotations

import logging
import platform
import random
import shutil
import signal
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import paho.mqtt.client as mqtt

from edge_agent.activation import ActivationStore
from edge_agent.config import AgentConfig
from edge_agent.detector import Detection, Detector
from edge_agent.mqtt import BrokerAuthError, BrokerError, Will, connect
from edge_agent.outbox import Outbox, OutboxPublisher
from edge_agent.reconcile import LoadedModel, Reconciler, load_active
from edge_agent.runtime import available_runtimes
from edge_agent.sources import Sample, open_source, parse_source
from edge_agent.trust import MqttFetcher, TrustedRepository, TrustError
from shared.messages import (
    ActiveModel,
    AgentHealth,
    AgentState,
    DeploymentStatus,
    encode_agent_health,
    encode_agent_state,
    encode_deployment_status,
    encode_event,
)
from shared.topics import Topics

__all__ = ["Agent", "Backoff", "EXIT_AUTH", "EXIT_OK"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_AUTH = 3
AUTH_FAILURES = {134, 135}  # MQTT 5 reason codes bad user name or password, not authorized


def _event_payload(detection: Detection, agent: str, seq: int) -> bytes:
    return encode_event(detection, agent, seq)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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

    def __init__(self, config: AgentConfig, *, stdin=None) -> None:
        self.config = config
        self.topics = Topics(config.topic_root)
        self.stop_event = threading.Event()
        self.reconcile_event = threading.Event()
        self.model_ready = threading.Event()  # set once any slot serves a model
        self.exit_code = EXIT_OK
        self._stdin = stdin
        self._lock = threading.Lock()  # guards self._detectors
        self._detectors: dict[str, Detector] = {}
        self._history: deque[Sample] = deque(maxlen=4096)
        self._errors = 0
        self._retired = {"inferences": 0, "anomalies": 0}  # counters of replaced detectors
        self._session: mqtt.Client | None = None
        self._fetch_client: mqtt.Client | None = None
        self._backoff = Backoff()
        formats = {"onnx": "onnxruntime", "tflite": "litert"}
        self.runtimes = available_runtimes({formats[f] for f in config.profile.formats})

    # -- init ----------------------------------------------------------------------------------

    def init_state(self) -> None:
        c = self.config
        c.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = ActivationStore(c.state_dir)
        removed = self.store.recover()
        if removed:
            log.info("cleaned up after a crash: %s", ", ".join(removed))
        self.bdseq = self.store.next_bdseq()
        metadata = c.state_dir / "metadata"
        metadata.mkdir(exist_ok=True)
        if not (metadata / "root.json").exists():  # provisioning: copy the trust anchor once
            shutil.copyfile(c.trust_root, metadata / "root.json")
        self.outbox = Outbox(c.state_dir / "outbox.sqlite", max_bytes=c.outbox_max_bytes)
        for slot in self.store.slots():
            loaded = load_active(self.store, slot, c.threads)
            if loaded:
                self._install(slot, loaded)
        if c.emulated:
            log.warning(
                "profile %s (%s) is emulated on this %s host: figures are this host's",
                c.profile.name, c.profile.arch, platform.machine(),
            )

    def _connect(self, client_id: str, will: Will | None) -> mqtt.Client:
        """Connect, retrying with jittered backoff until connected or stopped."""
        b = self.config.broker
        backoff = Backoff()
        while not self.stop_event.is_set():
            try:
                return connect(
                    b.url, client_id=client_id, username=b.username, password=b.password,
                    ca_file=b.ca_file, cert_file=b.cert_file, key_file=b.key_file, will=will,
                    clean_session=True,
                )
            except BrokerAuthError:
                raise
            except BrokerError as e:
                delay = backoff.next()
                log.warning("broker unavailable (%s); retrying in %.1f s", e, delay)
                self.stop_event.wait(delay)
        raise InterruptedError("stopped before connecting")

    def init_session(self) -> None:
        c = self.config
        will = Will(self.topics.agent_state(c.agent_id), encode_agent_state(self._state("offline")))
        self._session = client = self._connect(c.agent_id, will)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.message_callback_add(self.topics.repo_metadata("timestamp.json"), self._on_timestamp)
        self._on_connect(client, None, None, mqtt.ReasonCode(mqtt.PacketTypes.CONNACK, "Success"), None)
        self._fetch_client = self._connect(f"{c.agent_id}.fetch", None)
        fetcher = MqttFetcher(self._fetch_client, self.topics, c.state_dir / "chunks", timeout=15)
        self.trusted = TrustedRepository(c.state_dir / "metadata", c.state_dir / "targets", fetcher)
        self.reconciler = Reconciler(
            agent_id=c.agent_id, group=c.group, profile=c.profile, runtimes=self.runtimes,
            threads=c.threads, trusted=self.trusted, store=self.store,
            report=self._report_deployment, activate=self._install,
        )

    # -- MQTT callbacks (network thread: never block, never raise) ---------------------------

    def _on_connect(self, client, _userdata, _flags, reason, _props) -> None:
        if getattr(reason, "is_failure", False):
            if getattr(reason, "value", None) in AUTH_FAILURES:
                log.error("broker refused the credentials: stopping")
                self.exit_code = EXIT_AUTH
                self.stop_event.set()
            return
        self._backoff.reset()
        client.reconnect_delay_set(self._backoff.base, self._backoff.base)
        # Resubscribe and re-announce on every connect (clean sessions keep nothing).
        client.subscribe(self.topics.repo_metadata("timestamp.json"), qos=1)
        client.publish(self.topics.agent_state(self.config.agent_id),
                       encode_agent_state(self._state("online")), qos=1, retain=True)

    def _on_disconnect(self, client, _userdata, _flags, reason, _props) -> None:
        if self.stop_event.is_set():
            return
        # A new birth/death sequence for the next session, so that a late Last Will of the old
        # session (bdseq N) can never be mistaken for the new one (bdseq N + 1).
        self.bdseq = self.store.next_bdseq()
        client.will_set(self.topics.agent_state(self.config.agent_id),
                        encode_agent_state(self._state("offline")), qos=1, retain=True)
        delay = self._backoff.next()
        # paho waits min(delay·2, max) between attempts; min == max pins it to our jittered delay.
        client.reconnect_delay_set(max(1, round(delay)), max(1, round(delay)))
        log.warning("disconnected from broker (%s); reconnecting in ~%.1f s", reason, delay)

    def _on_timestamp(self, _client, _userdata, _msg) -> None:
        self.reconcile_event.set()

    # -- reports -------------------------------------------------------------------------------

    def _state(self, status: str) -> AgentState:
        active = []
        store: ActivationStore | None = getattr(self, "store", None)  # None before init_state
        records = [(slot, store.current(slot)) for slot in store.slots()] if store is not None else []
        for slot, r in records:
            if r:
                active.append(ActiveModel(slot, r.model, r.version, r.format, r.quantization, r.sha256))
        return AgentState(
            agent=self.config.agent_id, status=status, bdseq=getattr(self, "bdseq", 0),
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
        # Retained so `edgefleet fleet status` shows the last deployment of an agent.
        self._publish(self.topics.agent_deployments(self.config.agent_id),
                      encode_deployment_status(status), retain=True)
        if state in ("active", "rolled_back"):
            self._publish(self.topics.agent_state(self.config.agent_id),
                          encode_agent_state(self._state("online")), retain=True)

    def health(self) -> AgentHealth:
        import psutil

        with self._lock:
            stats = [d.stats() for d in self._detectors.values()]
        proc = psutil.Process()
        p50 = max((s.latency_p50_ms for s in stats if s.latency_p50_ms is not None), default=None)
        p99 = max((s.latency_p99_ms for s in stats if s.latency_p99_ms is not None), default=None)
        return AgentHealth(
            agent=self.config.agent_id, ts=_now(),
            inferences=sum(s.inferences for s in stats) + self._retired["inferences"],
            anomalies=sum(s.anomalies for s in stats) + self._retired["anomalies"],
            errors=sum(s.errors for s in stats) + self._errors,
            latency_ms={"p50": p50, "p99": p99},
            outbox_depth=self.outbox.depth(), outbox_dropped=self.outbox.dropped(),
            rss_mb=proc.memory_info().rss / 1e6, cpu_percent=proc.cpu_percent(None),
        )

    def _health_loop(self) -> None:
        while not self.stop_event.wait(self.config.health_period):
            try:
                self._publish(self.topics.agent_health(self.config.agent_id),
                              encode_agent_health(self.health()), qos=0, retain=True)
            except Exception:  # a health report must never take the agent down
                log.exception("health report failed")

    def _reconcile_loop(self) -> None:
        while not self.stop_event.is_set():
            if not self.reconcile_event.wait(1.0):
                continue
            self.reconcile_event.clear()
            try:
                self.reconciler.reconcile()
            except TrustError as e:
                log.warning("reconcile: %s", e)
            except Exception:
                log.exception("reconcile pass failed; the current model keeps serving")

    # -- serving -------------------------------------------------------------------------------

    def _install(self, slot: str, loaded: LoadedModel) -> None:
        """Swap the slot's detector; the new one is pre-filled with recent samples."""
        detector = Detector(loaded.runtime, loaded.spec, model_version=loaded.record.version, slot=slot)
        for sample in list(self._history)[-loaded.spec.window + 1 :]:
            detector.push(sample.timestamp, [sample.values.get(f) for f in loaded.spec.features])
        with self._lock:
            old = self._detectors.get(slot)
            self._detectors[slot] = detector
        self.model_ready.set()
        if old is not None:
            s = old.stats()
            self._retired["inferences"] += s.inferences
            self._retired["anomalies"] += s.anomalies
        log.info("slot %s now serves %s@%s (%s/%s)", slot, loaded.record.model,
                 loaded.record.version, loaded.record.format, loaded.record.quantization)

    def _serve(self, samples: Iterator[Sample]) -> None:
        agent = self.config.agent_id
        topic = self.topics.agent_events(agent)
        for sample in samples:
            self._history.append(sample)
            with self._lock:
                detectors = list(self._detectors.values())
            for detector in detectors:
                try:
                    values = [sample.values.get(f) for f in detector.spec.features]
                    detection = detector.push(sample.timestamp, values)
                except Exception:
                    self._errors += 1
                    log.exception("inference failed")
                    continue
                if detection is not None and detection.is_anomaly:
                    self.outbox.append_with_seq(topic, partial(_event_payload, detection, agent))
                    self.publisher.wake()
            if self.stop_event.is_set():
                break

    # -- lifecycle -----------------------------------------------------------------------------

    def start_workers(self) -> None:
        assert self._session is not None
        self.publisher = OutboxPublisher(self.outbox, self._session)
        self.publisher.start()
        for target in (self._health_loop, self._reconcile_loop):
            threading.Thread(target=target, name=target.__name__, daemon=True).start()
        self.reconcile_event.set()  # converge once at start, before the first timestamp arrives

    def run(self, *, exit_at_end: bool = False) -> int:
        """Run until stopped; with ``exit_at_end``, also when the source ends.

        Without it, an agent whose replay source has ended keeps serving deployments (state,
        health, reconcile) until SIGTERM/SIGINT.
        """
        try:
            self.init_state()
            self.init_session()
        except BrokerAuthError as e:
            log.error("%s", e)
            return EXIT_AUTH
        except TrustError as e:  # the configured trust root is not a valid TUF root
            log.error("trust root %s: %s", self.config.trust_root, e)
            self.shutdown()
            return EXIT_CONFIG
        except InterruptedError:
            return EXIT_OK
        self.start_workers()
        try:
            source = parse_source(self.config.source)
            if source.kind != "host":
                self._wait_for_model()  # a replay must not stream past before a model serves
            self._serve(open_source(source, self.stop_event, self._stdin))
            log.info("stop requested" if self.stop_event.is_set() else "source ended")
            if not exit_at_end:
                self.stop_event.wait()
        finally:
            self.shutdown()
        return self.exit_code

    def _wait_for_model(self) -> None:
        if not self.model_ready.is_set():
            log.info("waiting for a deployment before reading the source")
        # Wake on either event: a model arrives, or the agent is told to stop.
        while not self.stop_event.is_set() and not self.model_ready.wait(0.5):
            pass

    def stop(self) -> None:
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def shutdown(self) -> None:
        """Flush events, announce ``stopped`` (retained), disconnect cleanly (no Last Will)."""
        self.stop_event.set()
        self.model_ready.set()
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            publisher.wait_idle(5.0)
            publisher.stop()
        if self._session is not None:
            if getattr(self, "outbox", None) is not None:  # a last health report with final counters
                self._publish(self.topics.agent_health(self.config.agent_id),
                              encode_agent_health(self.health()), qos=1, retain=True)
            info = self._session.publish(self.topics.agent_state(self.config.agent_id),
                                         encode_agent_state(self._state("stopped")), qos=1, retain=True)
            try:
                info.wait_for_publish(5.0)
            except (RuntimeError, ValueError):
                log.warning("could not announce 'stopped' (broker unreachable)")
        for client in (self._session, self._fetch_client):
            if client is not None:
                client.disconnect()
                client.loop_stop()
        outbox = getattr(self, "outbox", None)
        if outbox is not None:
            outbox.close()
        log.info("agent %s stopped", self.config.agent_id)
