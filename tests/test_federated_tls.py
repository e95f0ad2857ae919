"""``edgefleet fl start`` with TLS: the SuperLink it starts serves TLS with a certificate from a
CA made here, real SuperNodes join with ``--root-certificates CA.pem`` (no ``--insecure``), and
the signed run document carries ``"insecure": false`` and the CA's PEM. A SuperNode trusting
another CA never joins.

Certificates are made with ``cryptography`` (EC P-256): a CA and a server certificate for
``127.0.0.1`` and ``localhost``.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import edgefleet
from helpers_federated import SuperNode
from test_federated_rounds import parent, shares  # noqa: F401 - the module's trained host@1

from edge_agent.federated import WindowStore
from trainer.federated.flower import free_port
from trainer.registry import Registry

pytestmark = pytest.mark.slow


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool):  # noqa: ANN001, ANN202
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_ca(folder: Path, name: str) -> tuple[Path, object]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = folder / f"{name}.pem"
    path.write_bytes(_certificate(name, key, name, key, ca=True).public_bytes(serialization.Encoding.PEM))
    return path, key


def _write_server(folder: Path, ca_name: str, ca_key) -> tuple[Path, Path]:  # noqa: ANN001
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert, key_path = folder / "server.pem", folder / "server.key"
    cert.write_bytes(_certificate("localhost", key, ca_name, ca_key, ca=False).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ca.pem, server.pem/server.key signed by it, and other-ca.pem (a CA that signed nothing)."""
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key = _write_ca(folder, "ca")
    cert, key = _write_server(folder, "ca", ca_key)
    other, _ = _write_ca(folder, "other-ca")
    return {"ca": ca, "cert": cert, "key": key, "other": other}


@pytest.fixture
def registry(parent, tmp_path: Path) -> Path:  # noqa: F811
    """A copy of the module's registry without SuperLink state (no nodes of earlier runs)."""
    copy = tmp_path / "reg"
    shutil.copytree(parent[0], copy, ignore=shutil.ignore_patterns("superlink", "flwr-home"))
    return copy


@pytest.fixture
def nodes() -> Iterator[list[SuperNode]]:
    started: list[SuperNode] = []
    try:
        yield started
    finally:
        for node in started:
            node.stop()


def _node(tmp_path: Path, name: str, windows: np.ndarray, port: int, ca: Path) -> SuperNode:
    state = tmp_path / name
    state.mkdir()
    with WindowStore(state / "windows.sqlite") as store:
        store.add(windows, "host@1")
    # started before the SuperLink: a SuperNode keeps retrying until it is there
    return SuperNode(name, state, f"127.0.0.1:{port}", root_certificates=ca).start(tmp_path / "flwr-home")


def _fl_start(registry: Path, csv: Path, port: int, pki: dict[str, Path], *args: str):  # noqa: ANN202
    return edgefleet("fl", "start", "--model", "host@1", "--group", "lab", "--data", str(csv),
                     "--registry", str(registry), "--port", str(port), "--json", "--rounds", "1",
                     "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--tls-ca", str(pki["ca"]),
                     *args, check=False, timeout=900)


def test_supernodes_join_a_tls_superlink_with_the_ca_and_the_document_carries_it(
        parent, registry, pki, nodes, tmp_path) -> None:  # noqa: F811
    _, csv, windows = parent
    port = free_port()
    for i, part in enumerate(shares(windows, 2)):
        nodes.append(_node(tmp_path, f"host-{i}", part, port, pki["ca"]))
    proc = _fl_start(registry, csv, port, pki, "--dp", "central", "--noise", "1.0", "--clip", "0.5",
                     "--node-wait", "120", "--round-timeout", "120", "--run", "fl-tls")
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n".join(n.log()[-2000:] for n in nodes)
    assert "plaintext" not in proc.stderr
    out = json.loads(proc.stdout)
    assert out["run"]["state"] == "registered" and out["run"]["nodes"] == ["host-0", "host-1"]
    assert out["version"]["ref"] == "host@2"
    with Registry.open(registry) as reg:
        assert reg.get("host", 2).weights is not None
    connection = (registry / "federated" / "superlink" / "flwr-home" / "config.toml").read_text()
    assert f'root-certificates = "{pki["ca"]}"' in connection and "insecure" not in connection
    from trainer.fleet.deploy import open_repository

    doc = json.loads(open_repository(registry).target_bytes("federated/runs/fl-tls.json"))
    assert doc["insecure"] is False and doc["state"] == "finished"
    assert doc["superlink"] == f"127.0.0.1:{port}"
    assert doc["root_certificates"] == pki["ca"].read_text()


def test_a_supernode_trusting_another_ca_never_joins(parent, registry, pki, nodes, tmp_path) -> None:  # noqa: F811
    _, csv, windows = parent
    port = free_port()
    node = _node(tmp_path, "host-x", shares(windows, 1)[0], port, pki["other"])
    nodes.append(node)
    proc = _fl_start(registry, csv, port, pki, "--dp", "off", "--min-nodes", "1", "--node-wait", "15",
                     "--round-timeout", "15", "--run", "fl-wrong-ca")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "run fl-wrong-ca failed" in proc.stderr
    with Registry.open(registry) as reg:
        assert [v.version for v in reg.versions("host")] == [1]
    with node.ledger() as ledger:
        assert ledger.rounds() == []
    assert "CERTIFICATE_VERIFY_FAILED" in node.log() or "certificate verify failed" in node.log().lower()


def test_a_key_that_is_not_the_certificates_is_refused_before_anything_starts(parent, registry, pki) -> None:  # noqa: F811
    _, csv, _ = parent
    _, other_key = _write_ca(pki["ca"].parent, "third")
    from cryptography.hazmat.primitives import serialization

    wrong = pki["ca"].parent / "wrong.key"
    wrong.write_bytes(other_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    proc = edgefleet("fl", "start", "--model", "host@1", "--group", "lab", "--data", str(csv),
                     "--registry", str(registry), "--rounds", "1", "--tls-cert", str(pki["cert"]),
                     "--tls-key", str(wrong), "--tls-ca", str(pki["ca"]), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"edgefleet: error: --tls-key {wrong} is not the key of --tls-cert {pki['cert']}"]
    assert not (registry / "federated" / "superlink").exists()


def test_flwr_reaches_a_tls_superlink_listening_everywhere_only_with_its_ca(pki, tmp_path) -> None:
    """What ``fl start --superlink HOST:PORT --tls-ca CA.pem`` relies on: the ``flwr`` connection
    with ``root-certificates`` talks TLS; another CA or plaintext gets no answer."""
    from trainer.federated.flower import FlowerError, SuperLink, run_status, write_connection
    from trainer.federated.tls import TlsFiles

    link = SuperLink(tmp_path / "link", free_port(), "0.0.0.0", TlsFiles(pki["ca"], pki["cert"], pki["key"])).start()
    try:
        assert link.address == f"127.0.0.1:{link.port}"
        write_connection(tmp_path / "with-ca", link.address, pki["ca"])
        with pytest.raises(FlowerError, match="Run ID not found"):  # the SuperLink answered: TLS works
            run_status(tmp_path / "with-ca", "7")
        for name, ca in (("other-ca", pki["other"]), ("plaintext", None)):
            write_connection(tmp_path / name, link.address, ca)
            with pytest.raises(FlowerError, match="Connection to the SuperLink is unavailable"):
                run_status(tmp_path / name, "7")
    finally:
        link.stop()
