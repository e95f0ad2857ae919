"""The agent's configuration: one TOML file, validated strictly (unknown keys are errors).

Secrets never live in the file: the MQTT password comes from ``password_file`` or the
environment variable named by ``password_env`` (one of them, with ``username``). TLS files are
checked here too, so a typo stops the agent with exit 2 instead of a reconnect loop.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.drift import MAX_WINDOW, MIN_WINDOW, DriftSettings
from edge_agent.mqtt import (
    BrokerError,
    BrokerSettings,
    TlsFileError,
    check_tls_files,
    parse_broker_url,
)
from edge_agent.sources import SourceError, rebase_source
from shared.profiles import FirmwareProfile, ProfileError, load_profile
from shared.topics import TopicError, validate_agent_id

__all__ = [
    "AgentConfig", "ApiConfig", "ConfigError", "DriftSettings", "FederatedConfig", "load_config", "parse_config",
    "render_config",
]


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid (one line, names the key)."""


@dataclass(frozen=True)
class FederatedConfig:
    """``[federated]``: whether and how this host takes part in federated training.

    ``state_dir`` holds the window store and the local privacy ledger (the SuperNode's
    ClientApp reads them); ``max_windows`` bounds the store; every ``sample_every``-th window
    scored as normal is kept; ``epsilon_budget`` (``inf``: none) and ``delta`` are the host's
    own privacy budget; ``supernode`` is the ``flower-supernode`` program (a name on ``PATH``
    or a path).
    """

    enabled: bool = False
    state_dir: Path | None = None  # default: {agent.state_dir}/federated
    max_windows: int = 20000
    sample_every: int = 10
    epsilon_budget: float = 8.0
    delta: float = 1e-5
    supernode: str = "flower-supernode"


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: the local HTTP API (predict, health check, Prometheus metrics), off by default.

    ``listen`` is ``HOST:PORT`` on a loopback address (``127.0.0.1``, ``[::1]``, ``localhost``;
    the API has no authentication, so it never listens on a network) or ``unix:PATH`` (a Unix
    socket, created mode 0660; relative paths resolve like the other paths of the file).
    ``max_body_bytes`` bounds a request body (a larger one gets 413; up to 64 MiB of it is read
    and dropped so the client receives the answer, then the connection closes),
    ``max_windows`` the windows of one predict request; ``/healthz`` answers 503 when no sample
    came from the source for ``stale_after_seconds``. At most ``max_connections`` connections
    are served at once (1 to 1024): one more is answered 503 and closed.
    """

    enabled: bool = False
    listen: str = "127.0.0.1:9464"
    max_body_bytes: int = 1024 * 1024
    max_windows: int = 256
    stale_after_seconds: float = 60.0
    max_connections: int = 16

    @property
    def unix_path(self) -> Path | None:
        """The socket path of a ``unix:PATH`` listen address, else ``None``."""
        return Path(self.listen[5:]) if self.listen.startswith("unix:") else None

    @property
    def host_port(self) -> tuple[str, int]:
        """``(host, port)`` of a TCP listen address (already validated)."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class AgentConfig:
    """A validated agent configuration."""

    agent_id: str
    group: str
    profile: FirmwareProfile
    source: str
    state_dir: Path
    trust_root: Path
    broker: BrokerSettings
    topic_root: str = "edgefleet/v1"
    health_period: float = 10.0
    threads: int = 1
    outbox_max_bytes: int = 64 * 1024 * 1024
    emulated: bool = False
    federated: FederatedConfig = FederatedConfig()
    drift: DriftSettings = DriftSettings()
    api: ApiConfig = ApiConfig()


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "agent": {"id": str, "group": str, "profile": str, "state_dir": str, "threads": int},
    "broker": {
        "url": str,
        "username": str,
        "password_file": str,
        "password_env": str,
        "ca_file": str,
        "cert_file": str,
        "key_file": str,
        "topic_root": str,
    },
    "trust": {"root": str},
    "source": {"spec": str},
    "health": {"period_seconds": (int, float)},
    "outbox": {"max_bytes": int},
    "federated": {
        "enabled": bool,
        "state_dir": str,
        "max_windows": int,
        "sample_every": int,
        "epsilon_budget": (int, float),
        "delta": float,
        "supernode": str,
    },
    "drift": {
        "enabled": bool,
        "window": int,
        "psi_threshold": (int, float),
        "psi_clear": (int, float),
        "ks_alpha": float,
    },
    "api": {
        "enabled": bool,
        "listen": str,
        "max_body_bytes": int,
        "max_windows": int,
        "stale_after_seconds": (int, float),
        "max_connections": int,
    },
}
_REQUIRED = {
    "agent": ("id", "group", "profile", "state_dir"),
    "broker": ("url",),
    "trust": ("root",),
    "source": ("spec",),
}


def _check_types(raw: dict[str, Any], source: str) -> None:
    for section, value in raw.items():
        if section not in _SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section}]; known: {', '.join(_SCHEMA)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key, item in value.items():
            expected = _SCHEMA[section].get(key)
            if expected is None:
                raise ConfigError(
                    f"{source}: unknown key '{section}.{key}'; known: {', '.join(_SCHEMA[section])}"
                )
            if (isinstance(item, bool) and expected is not bool) or not isinstance(item, expected):
                names = expected.__name__ if isinstance(expected, type) else "number"
                raise ConfigError(f"{source}: '{section}.{key}' must be a {names}")
    for section, keys in _REQUIRED.items():
        for key in keys:
            if key not in raw.get(section, {}):
                raise ConfigError(f"{source}: missing required key '{section}.{key}'")


def parse_config(text: str, *, source: str = "<config>", base: Path | None = None) -> AgentConfig:
    """Parse and validate a config. Relative paths resolve against ``base`` (default: the
    working directory): the trust root, the state dir, the TLS and password files and a
    ``csv:`` source's file. The returned config holds only absolute paths.

    Raises :class:`ConfigError` naming the key for any problem, including a password file that
    cannot be read, ambiguous credentials (both ``password_file`` and ``password_env``, or a
    password without ``username``), a TLS file that is missing or not PEM (or given for a
    plain ``mqtt://`` broker), or a trust root that does not exist.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from e
    _check_types(raw, source)
    base = base.absolute() if base else Path.cwd()
    agent, broker, trust = raw["agent"], raw["broker"], raw["trust"]

    def path(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    try:
        agent_id = validate_agent_id(agent["id"])
        group = validate_agent_id(agent["group"])
    except TopicError as e:
        raise ConfigError(f"{source}: agent.id/agent.group: {e}") from e
    try:
        profile = load_profile(agent["profile"])
    except ProfileError as e:
        raise ConfigError(f"{source}: agent.profile: {e}") from e
    try:
        source_spec = rebase_source(raw["source"]["spec"], base)
    except SourceError as e:
        raise ConfigError(f"{source}: source.spec: {e}") from e
    threads = agent.get("threads", profile.budget.threads)
    if threads < 1:
        raise ConfigError(f"{source}: agent.threads must be at least 1")
    root = path(trust["root"])
    if not root.is_file():
        raise ConfigError(f"{source}: trust.root: no such file {root}")
    password = _password(broker, path, source)
    try:
        scheme, _host, _port = parse_broker_url(broker["url"])
    except BrokerError as e:
        raise ConfigError(f"{source}: broker.url: {e}") from e
    tls = {key: str(path(broker[key])) for key in ("ca_file", "cert_file", "key_file") if key in broker}
    if tls and scheme != "mqtts":
        raise ConfigError(
            f"{source}: broker.{next(iter(tls))} is set but broker.url is {scheme}:// (no TLS): "
            "use an mqtts:// URL, or remove the TLS keys"
        )
    try:
        check_tls_files(**tls)
    except TlsFileError as e:
        raise ConfigError(f"{source}: broker.{e.field}: {e}") from e
    settings = BrokerSettings(
        url=broker["url"], username=broker.get("username"), password=password, **tls
    )
    period = float(raw.get("health", {}).get("period_seconds", 10.0))
    if period <= 0:
        raise ConfigError(f"{source}: health.period_seconds must be positive")
    max_bytes = raw.get("outbox", {}).get("max_bytes", 64 * 1024 * 1024)
    if max_bytes < 4096:
        raise ConfigError(f"{source}: outbox.max_bytes must be at least 4096")
    federated = _federated(raw.get("federated", {}), path, source)
    if federated.enabled and federated.state_dir is None and \
            not _node_config_safe(str(path(agent["state_dir"]))):
        raise ConfigError(f"{source}: agent.state_dir may not contain a double quote, a backslash "
                          "or a control character while [federated] is enabled (the federated "
                          "state goes beneath it): set federated.state_dir")
    drift = _drift(raw.get("drift", {}), source)
    api = _api(raw.get("api", {}), path, source)
    import platform

    return AgentConfig(
        agent_id=agent_id,
        group=group,
        profile=profile,
        source=source_spec,
        state_dir=path(agent["state_dir"]),
        trust_root=root,
        broker=settings,
        topic_root=broker.get("topic_root", "edgefleet/v1"),
        health_period=period,
        threads=threads,
        outbox_max_bytes=max_bytes,
        emulated=platform.machine().lower() not in _ARCH_ALIASES[profile.arch],
        federated=federated,
        drift=drift,
        api=api,
    )


def _drift(table: dict[str, Any], source: str) -> DriftSettings:
    """The ``[drift]`` section (types already checked)."""
    d = DriftSettings()
    c = DriftSettings(
        enabled=table.get("enabled", d.enabled),
        window=table.get("window", d.window),
        psi_threshold=float(table.get("psi_threshold", d.psi_threshold)),
        psi_clear=float(table.get("psi_clear", d.psi_clear)),
        ks_alpha=table.get("ks_alpha", d.ks_alpha),
    )
    if not MIN_WINDOW <= c.window <= MAX_WINDOW:
        raise ConfigError(f"{source}: drift.window must be between {MIN_WINDOW} and {MAX_WINDOW} samples")
    if not 0.0 < c.psi_threshold < float("inf"):
        raise ConfigError(f"{source}: drift.psi_threshold must be a positive number")
    if not 0.0 < c.psi_clear <= c.psi_threshold:
        raise ConfigError(f"{source}: drift.psi_clear must be positive and at most drift.psi_threshold")
    if not 0.0 < c.ks_alpha < 1.0:
        raise ConfigError(f"{source}: drift.ks_alpha must be in (0, 1)")
    return c


def _federated(table: dict[str, Any], path: Callable[[str], Path], source: str) -> FederatedConfig:
    """The ``[federated]`` section (types already checked)."""
    import math

    c = FederatedConfig(
        enabled=table.get("enabled", False),
        state_dir=path(table["state_dir"]) if "state_dir" in table else None,
        max_windows=table.get("max_windows", FederatedConfig.max_windows),
        sample_every=table.get("sample_every", FederatedConfig.sample_every),
        epsilon_budget=float(table.get("epsilon_budget", FederatedConfig.epsilon_budget)),
        delta=table.get("delta", FederatedConfig.delta),
        supernode=table.get("supernode", FederatedConfig.supernode),
    )
    if c.max_windows < 1:
        raise ConfigError(f"{source}: federated.max_windows must be at least 1")
    if c.sample_every < 1:
        raise ConfigError(f"{source}: federated.sample_every must be at least 1")
    if math.isnan(c.epsilon_budget) or c.epsilon_budget <= 0:
        raise ConfigError(f"{source}: federated.epsilon_budget must be positive (inf: no local budget)")
    if not 0.0 < c.delta < 1.0:
        raise ConfigError(f"{source}: federated.delta must be in (0, 1)")
    if not c.supernode.strip():
        raise ConfigError(f"{source}: federated.supernode must not be empty")
    if c.state_dir is not None and not _node_config_safe(str(c.state_dir)):
        raise ConfigError(f"{source}: federated.state_dir may not contain a double quote, a "
                          "backslash or a control character (line break, tab …)")
    return c


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _api(table: dict[str, Any], path: Callable[[str], Path], source: str) -> ApiConfig:
    """The ``[api]`` section (types already checked); a unix socket path is made absolute."""
    import math

    listen = table.get("listen", ApiConfig.listen)
    if listen.startswith("unix:"):
        if not listen[5:]:
            raise ConfigError(f"{source}: api.listen unix: needs a socket path (unix:/run/edgefleet/api.sock)")
        listen = f"unix:{path(listen[5:])}"
    else:
        host, sep, port = listen.rpartition(":")
        if not sep or host.strip("[]") not in _LOOPBACK or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"{source}: api.listen must be HOST:PORT on a loopback address (127.0.0.1, [::1], "
                f"localhost) or unix:PATH, got {listen!r}: the API has no authentication"
            )
    c = ApiConfig(
        enabled=table.get("enabled", False),
        listen=listen,
        max_body_bytes=table.get("max_body_bytes", ApiConfig.max_body_bytes),
        max_windows=table.get("max_windows", ApiConfig.max_windows),
        stale_after_seconds=float(table.get("stale_after_seconds", ApiConfig.stale_after_seconds)),
        max_connections=table.get("max_connections", ApiConfig.max_connections),
    )
    if c.max_body_bytes < 1024:
        raise ConfigError(f"{source}: api.max_body_bytes must be at least 1024")
    if c.max_windows < 1:
        raise ConfigError(f"{source}: api.max_windows must be at least 1")
    if not (math.isfinite(c.stale_after_seconds) and c.stale_after_seconds > 0):
        raise ConfigError(f"{source}: api.stale_after_seconds must be positive")
    if not 1 <= c.max_connections <= 1024:
        raise ConfigError(f"{source}: api.max_connections must be 1 to 1024, got {c.max_connections}")
    return c


def _node_config_safe(text: str) -> bool:
    """Whether ``text`` can go into the SuperNode's ``--node-config`` (a TOML string written
    without escapes): no ``"``, no backslash, no control character."""
    return not any(ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def _password(broker: dict[str, Any], path: Callable[[str], Path], source: str) -> str | None:
    """The password from ``password_file`` or ``password_env``; refuses ambiguous settings."""
    if "password_file" in broker and "password_env" in broker:
        raise ConfigError(
            f"{source}: broker.password_file and broker.password_env are both set: keep one"
        )
    key = "password_file" if "password_file" in broker else "password_env"
    if key in broker and "username" not in broker:
        raise ConfigError(
            f"{source}: broker.{key} is set but broker.username is not: add "
            'username = "..." to [broker] (the broker checks the password against it)'
        )
    if "password_file" in broker:
        try:
            return str(path(broker["password_file"]).read_text().strip())
        except OSError as e:
            raise ConfigError(f"{source}: broker.password_file: {e.strerror or e}") from e
    if "password_env" in broker:
        password = os.environ.get(broker["password_env"])
        if password is None:
            raise ConfigError(f"{source}: broker.password_env: ${broker['password_env']} is not set")
        return password
    return None


_ARCH_ALIASES = {"x86_64": {"x86_64", "amd64"}, "aarch64": {"aarch64", "arm64"}}


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate the config file at ``path`` (relative paths resolve beside it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e
    return parse_config(text, source=str(path), base=path.resolve().parent)


def render_config(
    *,
    agent_id: str,
    group: str,
    profile: str,
    broker: str,
    trust: str,
    state_dir: str,
    source: str,
) -> str:
    """A complete, commented config for ``edgefleet-agent init-config``."""

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return f"""\
# edgefleet agent configuration. Validate with: edgefleet-agent check-config --config FILE
# Unknown keys are errors. Relative paths resolve against this file's directory.

[agent]
id = {q(agent_id)}          # unique per host; letters, digits, '.', '_', '-'
group = {q(group)}           # deployments addressed to this group apply unless an agent document overrides
profile = {q(profile)}       # firmware profile: edgefleet profiles list
state_dir = {q(state_dir)}   # artifacts, trusted TUF metadata, outbox.sqlite, state.json, recent samples
# threads = 1                # inference threads (default: the profile's budget.threads)

[broker]
url = {q(broker)}            # mqtt://HOST:PORT or mqtts://HOST:PORT
# username = "agent"
# password_file = "/etc/edgefleet/mqtt-password"   # or: password_env = "EDGEFLEET_MQTT_PASSWORD"
# ca_file = "/etc/edgefleet/ca.pem"                # mqtts: CA bundle (default: system store)
# cert_file = "/etc/edgefleet/agent.pem"           # mqtts: client certificate
# key_file = "/etc/edgefleet/agent.key"
# topic_root = "edgefleet/v1"

[trust]
root = {q(trust)}            # TUF root.json printed by `edgefleet repo init`; the trust anchor

[source]
# host[?period=SECONDS]              psutil: cpu, memory, disk, network, load, temperature
# csv:PATH[?rate=ROWS_PER_SECOND]    NAB or multivariate CSV; no rate = as fast as possible
# stdin                              JSON lines: {{"timestamp": "...", "cpu": 12.5, ...}}
spec = {q(source)}

[health]
period_seconds = 10          # health report period

[outbox]
max_bytes = 67108864         # events kept while offline; the oldest are dropped (and counted) beyond

[federated]
enabled = false              # take part in federated training (needs the fl extra and a profile with may_train)
# state_dir = "..."          # window store and local privacy ledger (default: STATE_DIR/federated)
# max_windows = 20000        # windows scored as normal kept for training; the oldest are dropped beyond
# sample_every = 10          # keep every N-th window scored as normal
# epsilon_budget = 8.0       # this host's own privacy budget (inf: none); rounds beyond it are refused
# delta = 1e-5
# supernode = "flower-supernode"   # the Flower SuperNode program, started only while a run is active

[drift]
enabled = true               # compare live inputs and scores with the model's training reference
window = 1000                # samples in the rolling window, 100 to 100000 (rounded up to whole seasons of a seasonal model)
psi_threshold = 0.25         # PSI of a significant shift: a series drifts at or above it (and when KS rejects)
psi_clear = 0.1              # drift clears once every PSI is below this (no significant change)
ks_alpha = 0.05              # significance level of the two-sample Kolmogorov-Smirnov test

[api]
enabled = false              # local HTTP API: POST /v1/slots/SLOT/predict, GET /healthz, GET /metrics
# listen = "127.0.0.1:9464"  # loopback HOST:PORT only (no authentication), or "unix:/run/edgefleet/api.sock"
# max_body_bytes = 1048576   # larger request bodies get 413
# max_connections = 16       # connections served at once; one more gets 503
# max_windows = 256          # windows in one predict request
# stale_after_seconds = 60   # /healthz is 503 when no sample came for this long
"""
