"""Test material for broker security: a private certificate authority and a private Mosquitto
started with TLS, a password file and an ACL file.

The certificates come from the ``cryptography`` package; the broker is the real Mosquitto on a
free loopback port, with its own configuration file, stopped by :meth:`SecureBroker.stop`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "SecureBroker", "free_port", "mosquitto_binary"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise RuntimeError("mosquitto is not installed: run `make setup`")
    return exe


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@dataclass
class CertificateAuthority:
    """A one-day CA that issues server and client certificates as PEM files in ``directory``."""

    directory: Path
    name: str = "edgefleet test CA"
    key: ec.EllipticCurvePrivateKey = field(init=False)
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    def issue(self, name: str, *, server: bool, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
              expired: bool = False) -> tuple[Path, Path]:
        """A certificate for ``name`` (a server's for ``hosts``, or a client's) and its key:
        ``(cert_file, key_file)``. ``expired``: valid until yesterday."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC) - (timedelta(days=2) if expired else timedelta(0))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if server:
            names = [x509.IPAddress(IPv4Address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file = self.directory / f"{name}.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_file, _write_key(key, self.directory / f"{name}.key")


def _follow(proc: subprocess.Popen[bytes], running: threading.Event, ended: threading.Event) -> None:
    """Read Mosquitto's stderr to its end (so that it never blocks on a full pipe); set
    ``running`` at its "… running" line and ``ended`` (and ``running``, to wake a waiter) at
    the end of its output."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if b" running" in line and b"mosquitto version" in line:
            running.set()
    ended.set()
    running.set()


@dataclass
class SecureBroker:
    """A private Mosquitto with optional TLS (server certificate, optionally client certificates
    required), password file and ACL file. No anonymous clients when a password file is set."""

    workdir: Path
    server_cert: tuple[Path, Path] | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False
    password_file: Path | None = None
    acl_file: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.server_cert else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text() if path.exists() else ""

    def start(self) -> SecureBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1"]
        if self.server_cert is not None:
            assert self.ca_file is not None
            lines += [f"certfile {self.server_cert[0]}", f"keyfile {self.server_cert[1]}",
                      f"cafile {self.ca_file}"]
            if self.require_client_cert:
                lines.append("require_certificate true")
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        # The log goes to stderr too: its "running" line, written once the listener is open,
        # is what start() waits for.
        lines += [f"log_dest file {self.workdir}/mosquitto.log", "log_dest stderr", "log_type all"]
        if os.geteuid() == 0:  # as root, Mosquitto would drop to a user that cannot read tmp files
            lines.append("user root")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        running, ended = threading.Event(), threading.Event()
        threading.Thread(target=_follow, args=(self.proc, running, ended), daemon=True).start()
        if not running.wait(10):
            self.stop()
            raise RuntimeError(f"mosquitto did not start within 10 s:\n{self.log[-2000:]}")
        if ended.is_set():
            self.stop()
            raise RuntimeError(f"mosquitto exited: {self.log[-2000:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def agent_config(home: Path, agent_id: str, broker_url: str, trust: Path, **broker: str) -> Path:
    """An agent config as ``edgefleet-agent init-config`` writes it, with extra ``[broker]``
    keys (``username``, ``password_file``, ``ca_file`` …) after its ``url``; source: stdin."""
    import re
    import sys

    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "init-config", "--agent-id", agent_id, "--group", "lab",
         "--profile", "x86-64-v3", "--broker", broker_url, "--trust", str(trust),
         "--state-dir", str(home / "state"), "--source", "stdin"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    extra = "".join(f'\n{key} = "{value}"' for key, value in broker.items())
    text, n = re.subn(r"(?m)^url = .*$", lambda m: m.group(0) + extra, proc.stdout)
    assert n == 1, "init-config no longer writes [broker] url"
    path = home / "agent.toml"
    path.write_text(text)
    return path
