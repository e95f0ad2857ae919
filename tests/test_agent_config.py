"""Agent configuration: init-config renders a config that check-config accepts; strict errors."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_config, parse_config, render_config
from edge_agent.sources import SourceError, parse_source, rebase_source


def agent_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


@pytest.fixture
def root_json(tmp_path: Path) -> Path:
    p = tmp_path / "root.json"
    p.write_text("{}")
    return p


def test_init_config_then_check_config(tmp_path: Path, root_json: Path) -> None:
    out = agent_cli("init-config", "--agent-id", "edge-1", "--group", "lab", "--profile", "rpi4-arm64",
                    "--broker", "mqtt://127.0.0.1:1883", "--trust", str(root_json),
                    "--state-dir", str(tmp_path / "state"), "--source", "csv:data.csv?rate=5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("#") > 10  # commented
    cfg = tmp_path / "agent.toml"
    cfg.write_text(out.stdout)
    check = agent_cli("check-config", "--config", str(cfg))
    assert check.returncode == 0 and "ok" in check.stdout and "emulated" in check.stdout
    config = load_config(cfg)
    assert config.profile.name == "rpi4-arm64" and config.emulated
    assert config.source == f"csv:{Path.cwd() / 'data.csv'}?rate=5"  # absolute: see below
    assert config.threads == config.profile.budget.threads


def test_init_config_with_relative_paths_into_another_folder(tmp_path: Path) -> None:
    # The README's workflow: paths typed relative to the shell, the config written elsewhere.
    work = (tmp_path / "work").resolve()
    (work / "reg").mkdir(parents=True)
    (work / "reg" / "root.json").write_text("{}")
    (work / "host.csv").write_text("timestamp,value\n2026-01-01 00:00:00,1\n")
    (work / "conf").mkdir()
    out = agent_cli("init-config", "--agent-id", "edge-1", "--group", "lab", "--profile", "x86-64-v3",
                    "--broker", "mqtt://127.0.0.1:1883", "--trust", "reg/root.json",
                    "--state-dir", "./edge-1", "--source", "csv:host.csv?rate=50", cwd=work)
    assert out.returncode == 0, out.stderr
    cfg = work / "conf" / "edge-1.toml"
    cfg.write_text(out.stdout)
    check = agent_cli("check-config", "--config", str(cfg), cwd=tmp_path)  # from a third folder
    assert check.returncode == 0, check.stderr
    assert f"source csv:{work / 'host.csv'}?rate=50" in check.stdout
    config = load_config(cfg)
    assert config.trust_root == work / "reg" / "root.json"
    assert config.state_dir == work / "edge-1"
    assert parse_source(config.source).path == work / "host.csv"
    assert parse_source(config.source).rate == 50


def test_relative_paths_in_a_config_resolve_beside_it(tmp_path: Path, root_json: Path) -> None:
    text = render_config(agent_id="a1", group="g", profile="x86-64-v3", broker="mqtt://127.0.0.1:1",
                         trust="root.json", state_dir="state", source="csv:../data/x.csv?rate=2")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    config = load_config(cfg)
    assert config.trust_root == root_json and config.state_dir == tmp_path / "state"
    assert config.source == f"csv:{tmp_path.parent / 'data' / 'x.csv'}?rate=2"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("host?period=2", "host?period=2"),
        ("stdin", "stdin"),
        ("csv:/abs/x.csv", "csv:/abs/x.csv"),
        ("csv:x.csv", "csv:/base/x.csv"),
        ("csv:./d/../x.csv?rate=10", "csv:/base/x.csv?rate=10"),
        ("csv:~/x.csv", f"csv:{Path('~/x.csv').expanduser()}"),
    ],
)
def test_rebase_source(spec: str, expected: str) -> None:
    assert rebase_source(spec, Path("/base")) == expected


def _valid(root: Path, **over: str) -> str:
    text = render_config(agent_id="a1", group="g", profile="x86-64-v3", broker="mqtt://127.0.0.1:1",
                         trust=str(root), state_dir="state", source="host")
    for old, new in over.items():
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    "old, new, needle",
    [
        ("[health]", "[health]\nbogus = 1", "unknown key 'health.bogus'"),
        ("[outbox]", "[nope]\n[outbox]", "unknown section [nope]"),
        ('profile = "x86-64-v3"', 'profile = "z80"', "agent.profile"),
        ('url = "mqtt://127.0.0.1:1"', 'url = "http://x"', "broker.url"),
        ('spec = "host"', 'spec = "ftp:x"', "source.spec"),
        ('id = "a1"', 'id = "a/1"', "agent.id"),
        ("period_seconds = 10", "period_seconds = true", "'health.period_seconds' must be a number"),
        ('id = "a1"', "", "missing required key 'agent.id'"),
        ("# password_file", "password_file", "broker.password_file"),
        ("# state_dir = \"...\"", 'state_dir = "fl\\\\x"', "federated.state_dir may not contain"),
        ("# state_dir = \"...\"", 'state_dir = "fl\\nx"', "federated.state_dir may not contain"),
        ("# state_dir = \"...\"", 'state_dir = "fl\\"x"', "federated.state_dir may not contain"),
        ("enabled = false", 'enabled = true\nsupernode = ""', "federated.supernode"),
        ("window = 1000", "window = 99", "drift.window must be between 100 and 100000"),
        ("window = 1000", "window = 100001", "drift.window must be between 100 and 100000"),
        ("window = 1000", "window = 1000.5", "'drift.window' must be a int"),
        ("psi_clear = 0.1", "psi_clear = 0.3", "drift.psi_clear must be positive and at most"),
        ("psi_threshold = 0.25", "psi_threshold = -1", "drift.psi_threshold must be a positive"),
        ("ks_alpha = 0.05", "ks_alpha = 1.0", "drift.ks_alpha must be in (0, 1)"),
        ("[drift]", "[drift]\nbins = 10", "unknown key 'drift.bins'"),
        ("[api]", "[api]\nbogus = 1", "unknown key 'api.bogus'"),
        ("[api]\nenabled = false", '[api]\nenabled = "yes"', "'api.enabled' must be a bool"),
        ("[api]", '[api]\nlisten = "0.0.0.0:9464"', "api.listen must be HOST:PORT on a loopback"),
        ("[api]", '[api]\nlisten = "192.168.1.5:80"', "api.listen must be HOST:PORT on a loopback"),
        ("[api]", '[api]\nlisten = "127.0.0.1"', "api.listen must be HOST:PORT"),
        ("[api]", '[api]\nlisten = "127.0.0.1:0"', "api.listen must be HOST:PORT"),
        ("[api]", '[api]\nlisten = "127.0.0.1:70000"', "api.listen must be HOST:PORT"),
        ("[api]", '[api]\nlisten = "unix:"', "api.listen unix: needs a socket path"),
        ("[api]", "[api]\nmax_body_bytes = 10", "api.max_body_bytes must be at least 1024"),
        ("[api]", "[api]\nmax_windows = 0", "api.max_windows must be at least 1"),
        ("[api]", "[api]\nstale_after_seconds = 0", "api.stale_after_seconds must be positive"),
        ("[api]", "[api]\nstale_after_seconds = nan", "api.stale_after_seconds must be positive"),
    ],
)
def test_bad_configs_name_the_key(root_json: Path, old: str, new: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_valid(root_json).replace(old, new, 1), base=root_json.parent)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_api_is_off_by_default_and_listens_on_loopback_or_a_unix_socket(root_json: Path) -> None:
    text = _valid(root_json)
    assert "\n[api]\nenabled = false" in text  # init-config shows it, disabled
    config = parse_config(text, base=root_json.parent)
    assert not config.api.enabled and config.api.unix_path is None
    for listen, host_port in (("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:8080", ("::1", 8080)),
                              ("localhost:1234", ("localhost", 1234))):
        on = parse_config(text.replace("[api]\nenabled = false", f'[api]\nenabled = true\nlisten = "{listen}"'),
                          base=root_json.parent)
        assert on.api.enabled and on.api.host_port == host_port and on.api.unix_path is None
    unix = parse_config(text.replace("[api]\nenabled = false", '[api]\nenabled = true\nlisten = "unix:run/api.sock"'),
                        base=root_json.parent)
    assert unix.api.unix_path == root_json.parent / "run" / "api.sock"  # beside the config


def test_missing_trust_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trust.root"):
        parse_config(_valid(tmp_path / "absent.json"), base=tmp_path)


def test_check_config_exit_code_2_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[agent\n")
    out = agent_cli("check-config", "--config", str(cfg))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("state_dir, needle", [
    ("fl\\\\x", "federated.state_dir may not contain a double quote, a backslash"),  # check-config
    ("pw.txt", "federated.state_dir"),  # a file where the directory should be: run
    ("pw.txt/fl", "federated.state_dir"),
])
def test_an_unusable_federated_state_dir_stops_run_with_exit_2_and_one_line(
    tmp_path: Path, root_json: Path, state_dir: str, needle: str
) -> None:
    (tmp_path / "pw.txt").write_text("x\n")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(_valid(root_json).replace("enabled = false", "enabled = true", 1)
                   .replace('# state_dir = "..."', f'state_dir = "{state_dir}"', 1))
    out = agent_cli("run", "--config", str(cfg), "--exit-at-end")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was written


def test_password_from_env(root_json: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _valid(root_json).replace('# password_file = "/etc/edgefleet/mqtt-password"   # or: password_env = "EDGEFLEET_MQTT_PASSWORD"',
                                     'username = "u"\npassword_env = "EF_TEST_PW"')
    monkeypatch.setenv("EF_TEST_PW", "s3cret")
    config = parse_config(text, base=root_json.parent)
    assert config.broker.password == "s3cret" and "s3cret" not in repr(config)


# -- credentials and TLS files ----------------------------------------------------------------


def _broker(root: Path, lines: str, url: str = "mqtt://127.0.0.1:1") -> str:
    """A valid config whose [broker] table is ``url`` plus ``lines``."""
    text = _valid(root).replace('url = "mqtt://127.0.0.1:1"', f'url = "{url}"\n{lines}')
    tomllib.loads(text)  # the test's own TOML is well-formed
    return text


@pytest.mark.parametrize(
    "lines, needle",
    [
        ('username = "u"\npassword_file = "pw"\npassword_env = "EF_TEST_PW"',
         "broker.password_file and broker.password_env are both set: keep one"),
        ('password_file = "pw"',
         'broker.password_file is set but broker.username is not: add username = "..." to [broker]'),
        ('password_env = "EF_TEST_PW"', "broker.password_env is set but broker.username is not"),
    ],
)
def test_ambiguous_credentials_are_refused(root_json: Path, monkeypatch: pytest.MonkeyPatch,
                                           lines: str, needle: str) -> None:
    (root_json.parent / "pw").write_text("s3cret\n")
    monkeypatch.setenv("EF_TEST_PW", "other")
    with pytest.raises(ConfigError) as e:
        parse_config(_broker(root_json, lines), base=root_json.parent)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert "s3cret" not in str(e.value) and "other" not in str(e.value)


def test_password_file_with_username(root_json: Path) -> None:
    (root_json.parent / "pw").write_text("s3cret\n")
    config = parse_config(_broker(root_json, 'username = "u"\npassword_file = "pw"'), base=root_json.parent)
    assert (config.broker.username, config.broker.password) == ("u", "s3cret")


def _pem_pair(directory: Path, name: str, *, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """A self-signed certificate and its private key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


@pytest.fixture
def tls_dir(root_json: Path) -> Path:
    d = root_json.parent
    _pem_pair(d, "ca")
    _pem_pair(d, "client")
    _pem_pair(d, "other")
    _pem_pair(d, "locked", passphrase=b"secret")
    (d / "notpem.txt").write_text("not a certificate\n")
    (d / "fakepem.pem").write_text("-----BEGIN CERTIFICATE-----\nbm90\n-----END CERTIFICATE-----\n")
    return d


def test_valid_tls_files_are_accepted_and_resolved_beside_the_config(root_json: Path, tls_dir: Path) -> None:
    text = _broker(root_json, 'ca_file = "ca.pem"\ncert_file = "client.pem"\nkey_file = "client.key"',
                   url="mqtts://127.0.0.1:8883")
    config = parse_config(text, base=tls_dir)
    assert config.broker.ca_file == str(tls_dir / "ca.pem")
    assert config.broker.key_file == str(tls_dir / "client.key")


@pytest.mark.parametrize(
    "lines, needle",
    [
        ('ca_file = "ca.pme"', "broker.ca_file: cannot read"),  # the typo that used to retry forever
        ('ca_file = "notpem.txt"', "broker.ca_file: {d}/notpem.txt is not a PEM file"),
        ('ca_file = "client.key"', "broker.ca_file: {d}/client.key holds no PEM certificate"),
        ('ca_file = "fakepem.pem"', "broker.ca_file: {d}/fakepem.pem is not a PEM CA bundle"),
        ('ca_file = "."', "broker.ca_file: cannot read {d}"),
        ('cert_file = "client.pem"\nkey_file = "nope.key"', "broker.key_file: cannot read {d}/nope.key"),
        ('cert_file = "notpem.txt"\nkey_file = "client.key"', "broker.cert_file: {d}/notpem.txt is not a PEM file"),
        ('cert_file = "client.pem"\nkey_file = "other.key"', "broker.key_file: cannot load client certificate"),
        ('cert_file = "client.pem"\nkey_file = "locked.key"', "broker.key_file: the private key in {d}/locked.key is encrypted"),
        ('cert_file = "client.pem"', "broker.cert_file: cannot load client certificate"),  # no key anywhere
        ('key_file = "client.key"', "broker.key_file: a client key needs its certificate"),
    ],
)
def test_bad_tls_files_name_the_key(root_json: Path, tls_dir: Path, lines: str, needle: str) -> None:
    text = _broker(root_json, lines, url="mqtts://127.0.0.1:8883")
    with pytest.raises(ConfigError) as e:
        parse_config(text, base=tls_dir)
    assert needle.format(d=tls_dir) in str(e.value) and "\n" not in str(e.value)


def test_tls_files_need_an_mqtts_url(root_json: Path, tls_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker.ca_file is set but broker.url is mqtt:// \(no TLS\)"):
        parse_config(_broker(root_json, 'ca_file = "ca.pem"'), base=tls_dir)


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_ca_file_typo_stops_check_config_and_run_with_exit_2(root_json: Path, tls_dir: Path, command: str) -> None:
    cfg = tls_dir / "agent.toml"
    cfg.write_text(_broker(root_json, 'ca_file = "ca.pme"', url="mqtts://127.0.0.1:8883"))
    out = agent_cli(command, "--config", str(cfg))  # `run` used to reconnect forever: a timeout
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [f"edgefleet-agent: {cfg}: broker.ca_file: cannot read {tls_dir}/ca.pme: No such file or directory"]


@pytest.mark.parametrize("spec, kind", [("host", "host"), ("host?period=2", "host"),
                                        ("csv:/x.csv", "csv"), ("csv:x.csv?rate=10", "csv"), ("stdin", "stdin")])
def test_source_specs(spec: str, kind: str) -> None:
    assert parse_source(spec).kind == kind


@pytest.mark.parametrize("spec", ["host?period=0", "host?x=1", "csv:", "csv:x?rate=abc", "tcp:1"])
def test_bad_source_specs(spec: str) -> None:
    with pytest.raises(SourceError):
        parse_source(spec)


def test_drift_settings_default_to_the_published_bounds_and_can_be_set(root_json: Path) -> None:
    config = parse_config(_valid(root_json), base=root_json.parent)
    assert (config.drift.enabled, config.drift.window, config.drift.psi_threshold,
            config.drift.psi_clear, config.drift.ks_alpha) == (True, 1000, 0.25, 0.1, 0.05)
    text = _valid(root_json).replace("window = 1000", "window = 200").replace("enabled = true", "enabled = false")
    config = parse_config(text, base=root_json.parent)
    assert (config.drift.window, config.drift.enabled) == (200, False)
    assert config.federated.enabled is False  # the [federated] table's own enabled is untouched
