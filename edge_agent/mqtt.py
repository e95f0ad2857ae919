"""Broker connections shared by the agent and the trainer (paho-mqtt 2.x, callback API v2, MQTT 5).

MQTT 5 and not 3.1.1: a broker's ACL refusing a publish answers it with PUBACK reason code
0x87 (Not authorized), which paho passes to ``on_publish``; under 3.1.1 the broker acknowledges
and drops it, so a misconfigured client (wrong user name, wrong topic root) would take every
refused message for delivered. Sessions are clean (``clean_start`` on every connect, no session
expiry): callers resubscribe in their ``on_connect``.

- :func:`parse_broker_url` / :class:`BrokerSettings`: ``mqtt://host[:port]`` (1883) and
  ``mqtts://host[:port]`` (8883, TLS).
- :func:`check_tls_files`: the CA bundle, client certificate and key exist, are readable and
  load as PEM, so that a typo is a configuration error rather than a connection retried forever.
- :func:`connect`: connect, start the network thread, wait for CONNACK with a timeout and
  translate failures into :class:`BrokerError` (:class:`BrokerAuthError` for bad credentials,
  :class:`BrokerTlsError` for a broker certificate that the configured CA does not vouch for).
- :func:`new_client` / :func:`connect_in_background`: for a daemon that must work while the
  broker is away: build the client, then let paho's network thread connect and reconnect;
  ``on_tls_reject`` reports a broker certificate that fails verification (paho's
  ``on_connect_fail`` carries no reason, and retrying such a broker would not help).
- :class:`RetainedReader`: read the retained messages under some topic filters *now*, knowing
  when every one of them has arrived (a marker published to a private topic comes back after
  them), so that "no retained message" is answered without waiting for a timeout.

This module must not import trainer code, torch, optuna or onnx.
"""

from __future__ import annotations

import logging
import ssl
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from shared.topics import Topics

__all__ = [
    "BrokerAuthError",
    "BrokerError",
    "BrokerSettings",
    "BrokerTlsError",
    "RetainedReader",
    "TlsFileError",
    "Will",
    "check_tls_files",
    "connect",
    "connect_in_background",
    "new_client",
    "parse_broker_url",
    "tls_reject_reason",
]

logger = logging.getLogger(__name__)

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# CONNACK reason codes: bad user name or password, not authorized.
_AUTH_FAILURES = {134, 135}


class BrokerError(Exception):
    """The broker cannot be reached, refused us, or did not answer in time."""


class BrokerAuthError(BrokerError):
    """The broker rejected our credentials or is not authorizing us (do not retry)."""


class BrokerTlsError(BrokerAuthError):
    """The broker's TLS certificate failed verification: not signed by the configured CA
    (``ca_file``, else the system store), expired, or issued for another host name. Retrying
    would not help, as with bad credentials."""


class TlsFileError(BrokerError):
    """A TLS file is missing, unreadable or not what it should be; ``field`` names it
    (``ca_file``, ``cert_file`` or ``key_file``) so callers can word it as key or option."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _read_pem(field: str, path: str, block: str) -> bytes:
    try:
        with open(path, "rb") as f:
            text = f.read(4 * 1024 * 1024)
    except OSError as e:
        raise TlsFileError(field, f"cannot read {path}: {e.strerror or e}") from e
    if b"-----BEGIN " not in text:
        raise TlsFileError(field, f"{path} is not a PEM file")
    if block.encode() not in text:
        raise TlsFileError(field, f"{path} holds no PEM {block.lower()}")
    return text


def check_tls_files(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> None:
    """Check the TLS files of a broker connection the way ``connect`` will load them.

    ``ca_file`` must hold PEM certificates; ``cert_file`` a PEM certificate whose private key
    is in ``key_file`` (or in ``cert_file`` itself), unencrypted. ``key_file`` needs
    ``cert_file``. Reads the files only; connects to nothing.

    Raises:
        TlsFileError: naming the file at fault in ``field``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        _read_pem("ca_file", ca_file, "CERTIFICATE")
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise TlsFileError("ca_file", f"{ca_file} is not a PEM CA bundle: {reason}") from e
    if key_file is not None and cert_file is None:
        raise TlsFileError("key_file", "a client key needs its certificate (cert_file) too")
    if cert_file is not None:
        key_text = _read_pem("cert_file", cert_file, "CERTIFICATE")
        if key_file is not None:
            key_text = _read_pem("key_file", key_file, "PRIVATE KEY")
        if b"ENCRYPTED" in key_text:
            raise TlsFileError(
                "key_file" if key_file is not None else "cert_file",
                f"the private key in {key_file or cert_file} is encrypted: a daemon cannot type "
                "its passphrase; use an unencrypted key readable only by its user",
            )
        try:
            # An empty password: an encrypted key fails here instead of prompting on a terminal.
            context.load_cert_chain(cert_file, key_file, password=b"")
        except (ssl.SSLError, OSError) as e:
            where = cert_file if key_file is None else f"{cert_file} with key {key_file}"
            raise TlsFileError(
                "key_file" if key_file is not None else "cert_file",
                f"cannot load client certificate {where} (unencrypted PEM key matching the "
                f"certificate expected): {getattr(e, 'reason', None) or e}",
            ) from e


def parse_broker_url(url: str) -> tuple[str, str, int]:
    """Split ``mqtt://host[:port]`` or ``mqtts://host[:port]`` into ``(scheme, host, port)``.

    Raises:
        BrokerError: one clear line naming what is wrong with ``url``.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BrokerError(f"bad broker URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise BrokerError(f"bad broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise BrokerError(f"bad broker URL {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BrokerError(f"bad broker URL {url!r}: no path, query or fragment allowed")
    if parts.username or parts.password:
        raise BrokerError(f"bad broker URL {url!r}: put credentials in the settings, not the URL")
    if port == 0:
        raise BrokerError(f"bad broker URL {url!r}: port 0")
    return scheme, parts.hostname, port or _DEFAULT_PORTS[scheme]


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect. ``password`` never appears in ``repr``."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        parse_broker_url(self.url)


@dataclass(frozen=True)
class Will:
    """A Last Will message set before connecting."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def new_client(
    broker_url: str,
    *,
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    will: Will | None = None,
    on_tls_reject: Callable[[str], None] | None = None,
) -> mqtt.Client:
    """A configured MQTT 5 client that is not connected yet: credentials, TLS, Last Will.

    ``mqtts://`` enables TLS (``ca_file`` or the system store; ``cert_file``/``key_file`` for a
    client certificate); the broker's certificate must chain to that CA and name the URL's host.
    ``on_tls_reject(reason)`` is called (on the thread that connects: paho's network thread
    under :func:`connect_in_background`) each time the broker's certificate fails
    verification, before paho's ``on_connect_fail``; ``reason`` is one line.

    Raises:
        BrokerError: bad URL, or the TLS files cannot be loaded (retrying would not help).
    """
    scheme, _host, _port = parse_broker_url(broker_url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    if username is not None:
        client.username_pw_set(username, password)
    if scheme == "mqtts":
        try:
            context = _tls_context(ca_file, cert_file, key_file, on_tls_reject)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise BrokerError(f"TLS setup failed: {e}") from e
        client.tls_set_context(context)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    return client


def _tls_context(
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    on_tls_reject: Callable[[str], None] | None,
) -> ssl.SSLContext:
    """The client's TLS context: paho's own defaults (``PROTOCOL_TLS_CLIENT``: certificate
    and host name required), plus a hook on the handshake.

    paho catches the handshake's exception inside its network thread and reports only "connect
    failed", so a wrong CA would look like an unreachable broker retried forever. The context's
    ``sslsocket_class`` (the documented way to customize the sockets it wraps) records a
    verification failure before paho swallows it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    else:
        context.load_default_certs()
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file, password=b"")
    if on_tls_reject is not None:
        report = on_tls_reject

        class _VerifiedSocket(ssl.SSLSocket):
            def do_handshake(self, block: bool = False) -> None:
                try:
                    super().do_handshake(block)
                except ssl.SSLCertVerificationError as e:
                    report(tls_reject_reason(e))
                    raise

        context.sslsocket_class = _VerifiedSocket
    return context


def tls_reject_reason(error: ssl.SSLCertVerificationError) -> str:
    """One line saying why the broker's certificate was not accepted."""
    detail = error.verify_message or error.reason or str(error)
    return f"the broker's TLS certificate failed verification ({detail})"


def connect_in_background(client: mqtt.Client, broker_url: str, *, keepalive: int = 30) -> None:
    """Start paho's network thread, which connects and keeps reconnecting; returns at once.

    Nothing here waits for the broker: a failed attempt calls ``on_connect_fail`` and is
    retried after paho's reconnect delay (``reconnect_delay_set``); a CONNACK, good or bad,
    arrives in ``on_connect``. Every connect starts a clean session. Stop with
    ``disconnect()`` then ``loop_stop()``.

    ``suppress_exceptions`` is turned on: an exception escaping a callback is logged by paho
    instead of ending its network thread (callbacks should still catch their own).

    Raises:
        BrokerError: bad URL.
    """
    _scheme, host, port = parse_broker_url(broker_url)
    client.suppress_exceptions = True
    client.on_log = _paho_log
    client.connect_async(host, port, keepalive, clean_start=True)
    client.loop_start()


def _paho_log(_client: mqtt.Client, _userdata: object, level: int, message: str) -> None:
    # A suppressed callback exception is an error; socket errors on an outage are not news
    # (on_disconnect says it once), and the rest is packet tracing.
    if level == mqtt.MQTT_LOG_ERR and message.startswith("Caught exception"):
        logger.error("paho: %s", message)
    else:
        logger.debug("paho: %s", message)


def connect(
    broker_url: str,
    *,
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    will: Will | None = None,
    timeout: float = 10.0,
    keepalive: int = 30,
) -> mqtt.Client:
    """Connect to ``broker_url`` and return a client whose network thread is running.

    ``mqtts://`` enables TLS (``ca_file`` or the system store; ``cert_file``/``key_file`` for a
    client certificate). The caller owns the client: stop it with ``disconnect()`` then
    ``loop_stop()``. After the first CONNACK paho reconnects by itself (each time with a clean
    session); callers that keep subscriptions must resubscribe in their own ``on_connect``.

    Raises:
        BrokerTlsError: the broker's certificate failed verification.
        BrokerAuthError: bad user name or password / not authorized.
        BrokerError: bad URL, connection refused, other TLS failure, or no CONNACK within
            ``timeout``.
    """
    scheme, host, port = parse_broker_url(broker_url)
    client = new_client(
        broker_url, client_id=client_id, username=username, password=password, ca_file=ca_file,
        cert_file=cert_file, key_file=key_file, will=will,
    )

    done = threading.Event()
    outcome: dict[str, object] = {}

    def on_connect(_c: mqtt.Client, _u: object, _flags: object, reason: object, _p: object) -> None:
        if not done.is_set():
            outcome["reason"] = reason
            done.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive, clean_start=True)
    except ssl.SSLCertVerificationError as e:
        raise BrokerTlsError(
            f"cannot connect to {scheme}://{host}:{port}: {tls_reject_reason(e)}: check the CA "
            "file (ca_file) and that the certificate names this host"
        ) from e
    except OSError as e:  # refused, unreachable, TLS handshake (ssl.SSLError is an OSError)
        raise BrokerError(f"cannot connect to {scheme}://{host}:{port}: {e}") from e
    client.loop_start()
    if not done.wait(timeout):
        _stop(client)
        raise BrokerError(f"no CONNACK from {scheme}://{host}:{port} within {timeout:g} s")
    reason = outcome["reason"]
    if getattr(reason, "is_failure", False):
        _stop(client)
        value = getattr(reason, "value", None)
        if value in _AUTH_FAILURES:
            raise BrokerAuthError(f"broker {host}:{port} refused the credentials: {reason}")
        raise BrokerError(f"broker {host}:{port} refused the connection: {reason}")
    logger.debug("connected to %s://%s:%d as %s", scheme, host, port, client_id)
    return client


def _stop(client: mqtt.Client) -> None:
    try:
        client.disconnect()
    finally:
        client.loop_stop()


def _client_id(client: mqtt.Client) -> str:
    # paho 2.x has no public accessor for the client id it was built with.
    raw = getattr(client, "_client_id", b"")
    client_id = raw.decode() if isinstance(raw, bytes) else str(raw)
    if not client_id:
        raise BrokerError("a retained read needs a client with an explicit client id")
    return client_id


class RetainedReader:
    """Reads the current retained messages under topic filters, on demand.

    ``read()`` subscribes to the filters and to a private marker topic (``probe/{client id}/…``:
    the broker's ACL lets a client use only its own), publishes a unique
    marker, and returns when the marker comes back: the broker handles one client's packets in
    order, so every retained message matched by the subscription has been delivered by then.
    It then unsubscribes. A topic with no retained message is simply absent from the result.

    The reader owns its subscriptions: give it a client that does not itself subscribe to the
    same filters (an unsubscribe would cancel them). Reads on one reader are serialized by a
    lock; never call ``read()`` from a paho callback (it waits for the network thread).
    """

    def __init__(self, client: mqtt.Client, topics: Topics, *, timeout: float = 10.0) -> None:
        """Raises:
            BrokerError: ``client`` has no client id of its own (the broker would assign one).
            TopicError: the client id cannot be a topic level.
        """
        self._client = client
        self._topics = topics
        self._timeout = timeout
        self._lock = threading.Lock()
        self._probe = topics.probe(_client_id(client), uuid.uuid4().hex)

    def read(
        self,
        filters: Sequence[str],
        *,
        keep_payload: Callable[[str], bool] | None = None,
        timeout: float | None = None,
    ) -> dict[str, bytes | None]:
        """Return ``{topic: payload}`` for every retained message under ``filters``.

        ``keep_payload(topic)`` returning False stores ``None`` instead of the payload (to list
        large topics without holding them). Empty payloads (deleted retained) are left out.

        Raises:
            BrokerError: not connected, or the marker did not come back within the timeout.
        """
        timeout = self._timeout if timeout is None else timeout
        with self._lock:
            token = uuid.uuid4().hex.encode()
            got: dict[str, bytes | None] = {}
            got_lock = threading.Lock()
            arrived = threading.Event()

            def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
                keep = keep_payload is None or keep_payload(msg.topic)
                with got_lock:
                    if not msg.payload:
                        got.pop(msg.topic, None)
                    else:
                        got[msg.topic] = bytes(msg.payload) if keep else None

            def on_probe(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
                if msg.payload == token:
                    arrived.set()

            client = self._client
            for f in filters:
                client.message_callback_add(f, on_message)
            client.message_callback_add(self._probe, on_probe)
            subs = [(self._probe, 1), *((f, 1) for f in filters)]
            try:
                rc, _mid = client.subscribe(subs)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise BrokerError(f"subscribe failed: {mqtt.error_string(rc)}")
                info = client.publish(self._probe, token, qos=1)
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS,):
                    raise BrokerError(f"publish failed: {mqtt.error_string(info.rc)}")
                if not arrived.wait(timeout):
                    raise BrokerError(
                        f"retained read of {list(filters)} timed out after {timeout:g} s"
                    )
                with got_lock:
                    return dict(got)
            finally:
                try:
                    client.unsubscribe([t for t, _ in subs])
                finally:
                    for f in filters:
                        client.message_callback_remove(f)
                    client.message_callback_remove(self._probe)
