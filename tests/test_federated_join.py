"""Joining federated runs from signed desired state, and the SuperNode child process.

Real parts: the run document decoded by the agent and the node config parsed by Flower's own
parser; a real ``flower-superlink`` (insecure, on a free loopback port, with a database) and
real ``flower-supernode`` children; a real Mosquitto and a real TUF repository for the agents,
which learn of the run only from a signed ``federated/runs/{run}.json`` target.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers_delivery import TOPICS, Agents, Watch, poll_until, process_alive, process_group_members
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.config import parse_config
from edge_agent.federated.join import check_can_join, choose_run, missing_modules, run_refusal
from edge_agent.federated.supernode import (
    SuperNodeSpec,
    SuperNodeSupervisor,
    child_env,
    end_leftover,
    node_config_arg,
)
from shared.federated import (
    FederatedRun,
    FederatedRunError,
    decode_run,
    encode_run,
    is_loopback,
    openssh_ed25519,
    run_from_target,
    run_target,
)
from shared.profiles import load_profile

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUPERNODE = BIN / "flower-supernode"
SUPERLINK = BIN / "flower-superlink"
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

needs_flower = pytest.mark.skipif(not SUPERNODE.exists() or not SUPERLINK.exists(),
                                  reason="flwr (the fl extra) is not installed in this environment")


def _ed25519_raw_b64() -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate().public_key()
    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def _run(state: str = "active", superlink: str = "127.0.0.1:9092", **kw) -> FederatedRun:
    return FederatedRun(
        run=kw.pop("run", "fl-1"), group=kw.pop("group", "lab"), superlink=superlink,
        app_sha256="ab" * 32, trusted_entities={"fpk_trainer": _ed25519_raw_b64()}, state=state,
        epsilon_budget=8.0, delta=1e-5, **kw,
    )


# -- the run document -------------------------------------------------------------------------


def test_run_document_round_trips_and_keeps_unknown_fields() -> None:
    run = _run(insecure=True)
    assert decode_run(encode_run(run)) == run
    wire = json.loads(encode_run(run))
    wire["rounds"] = 3  # a newer trainer's field
    del wire["schema"]  # the contract's example carries none: read as version 1
    wire["epsilon_budget"] = None
    back = decode_run(json.dumps(wire).encode())
    assert back.extra == {"rounds": 3} and back.epsilon_budget == math.inf
    assert json.loads(encode_run(back))["rounds"] == 3
    assert run_target("fl-1") == "federated/runs/fl-1.json"
    assert run_from_target("federated/runs/fl-1.json") == "fl-1"
    assert run_from_target("deployments/groups/lab.json") is None


@pytest.mark.parametrize(("change", "message"), [
    ({"state": "paused"}, "state"),
    ({"superlink": "http://x:1"}, "superlink"),
    ({"app_sha256": "XY"}, "app_sha256"),
    ({"trusted_entities": []}, "trusted_entities"),
    ({"trusted_entities": {"k": "AAAA"}}, "32 bytes"),
    ({"delta": 0}, "delta"),
    ({"insecure": "yes"}, "insecure"),
    ({"schema": "edgefleet.federated-run/2"}, "schema"),
    ({"group": "a/b"}, "group"),
    ({"root_certificates": "not a certificate"}, "root_certificates"),
    ({"root_certificates": 3}, "root_certificates"),
    ({"insecure": True, "root_certificates": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
     "exclude each other"),
])
def test_malformed_run_documents_are_refused(change: dict, message: str) -> None:
    wire = json.loads(encode_run(_run())) | change
    with pytest.raises(FederatedRunError, match=message):
        decode_run(json.dumps(wire).encode())


PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"


def test_root_certificates_round_trip_and_insecure_is_for_loopback_only() -> None:
    run = _run(superlink="link.example:9092", root_certificates=PEM)
    assert decode_run(encode_run(run)).root_certificates == PEM
    assert "root_certificates" not in json.loads(encode_run(_run()))
    for address in ("127.0.0.1:9092", "127.8.0.1:1", "localhost:9092", "[::1]:9092"):
        assert is_loopback(address) and run_refusal(_run(superlink=address, insecure=True)) is None
    for address in ("10.0.0.1:9092", "link.example:9092", "[2001:db8::1]:9092", "localhost.evil:1"):
        assert not is_loopback(address)
        reason = run_refusal(_run(superlink=address, insecure=True))
        assert reason is not None and "\n" not in reason and address in reason and "loopback" in reason
        assert run_refusal(_run(superlink=address)) is None  # TLS: fine anywhere


def test_keys_become_what_flower_reads() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    raw = _ed25519_raw_b64()
    line = openssh_ed25519(raw)
    key = load_ssh_public_key(line.encode())  # what flower-supernode does with the file
    assert isinstance(key, Ed25519PublicKey)
    assert openssh_ed25519(line) == line


def test_node_config_parses_with_flowers_own_parser() -> None:
    from flwr.common.config import parse_config_args

    text = node_config_arg({"state-dir": "/var/lib/edge fleet/federated", "epsilon-budget": 8.0,
                            "delta": 1e-5, "node-name": "edge-1"})
    assert parse_config_args([text]) == {"state-dir": "/var/lib/edge fleet/federated",
                                         "epsilon-budget": 8.0, "delta": 1e-5, "node-name": "edge-1"}
    assert parse_config_args([node_config_arg({"epsilon-budget": math.inf})]) == {"epsilon-budget": "inf"}
    for bad in ('a"b', "a\\b", "a\nb", "a\rb"):
        with pytest.raises(ValueError, match="node config value"):
            node_config_arg({"state-dir": bad})


def test_the_supernode_gets_no_secret_from_the_agents_environment() -> None:
    env = child_env({"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C", "TMPDIR": "/t",
                     "PYTHONPATH": "/p", "FLWR_HOME": "/f", "EDGEFLEET_MQTT_PASSWORD": "s3cret",
                     "AWS_SECRET_ACCESS_KEY": "x", "SSH_AUTH_SOCK": "/s"})
    assert env == {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C", "TMPDIR": "/t",
                   "PYTHONPATH": "/p", "FLWR_HOME": "/f", "FLWR_TELEMETRY_ENABLED": "0",
                   "FLWR_DISABLE_UPDATE_CHECK": "1"}


def test_who_may_join() -> None:
    trains, may_not = load_profile("x86-64-v3"), load_profile("cortex-a53")
    assert not check_can_join(may_not, str(SUPERNODE)).can_join
    assert "may_train = false" in check_can_join(may_not, str(SUPERNODE)).reason
    missing = check_can_join(trains, str(SUPERNODE), probe=lambda binary, modules: (None, ["flwr"]))
    assert not missing.can_join and "fl extra" in missing.reason and "flwr" in missing.reason
    assert "edgefleet[edge,fl]" in missing.reason and "torch" in missing.reason
    assert "not found" in check_can_join(trains, "no-such-flower-supernode").reason
    bare = check_can_join(trains, "no-such-flower-supernode", modules=("no_such_module_for_edgefleet",))
    assert "not found and the fl extra is not installed" in bare.reason and "edgefleet[edge,fl]" in bare.reason
    runs = [_run(run="fl-1", state="finished"), _run(run="fl-2")]
    assert choose_run(runs).run == "fl-2" and choose_run(runs[:1]) is None


def test_the_fl_extra_is_looked_for_beside_the_supernode(tmp_path: Path) -> None:
    # A SuperNode installed in another environment: its ClientApps import from the python
    # beside it, not from the agent's interpreter.
    other = tmp_path / "venv" / "bin"
    other.mkdir(parents=True)
    binary = other / "flower-supernode"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    modules = ("json", "no_such_module_for_edgefleet")
    python, missing = missing_modules(str(binary), modules)
    assert python is None and missing == ["no_such_module_for_edgefleet"]  # no python beside it
    (other / "python").symlink_to(sys.executable)
    python, missing = missing_modules(str(binary), modules)
    assert python == str(other / "python") and missing == ["no_such_module_for_edgefleet"]
    check = check_can_join(load_profile("x86-64-v3"), str(binary), modules=modules)
    assert not check.can_join and str(other / "python") in check.reason
    assert "no_such_module_for_edgefleet" in check.reason
    (other / "python").unlink()
    (other / "python").write_text("#!/bin/sh\nexit 3\n")  # a python that does not run
    (other / "python").chmod(0o755)
    assert missing_modules(str(binary), modules) == (str(other / "python"), list(modules))
    assert check_can_join(load_profile("x86-64-v3"), str(SUPERNODE)).can_join  # this venv has it


def test_federated_config_section(tmp_path: Path) -> None:
    root = tmp_path / "root.json"
    root.write_text("{}")
    base = (f'[agent]\nid = "a"\ngroup = "g"\nprofile = "x86-64-v3"\nstate_dir = "s"\n'
            f'[broker]\nurl = "mqtt://127.0.0.1:1"\n[trust]\nroot = "{root}"\n[source]\nspec = "stdin"\n')
    c = parse_config(base, base=tmp_path)
    assert not c.federated.enabled
    c = parse_config(base + '[federated]\nenabled = true\nstate_dir = "fl"\nepsilon_budget = inf\n',
                     base=tmp_path)
    assert c.federated.enabled and c.federated.state_dir == tmp_path / "fl"
    assert c.federated.epsilon_budget == math.inf and c.federated.delta == 1e-5
    from edge_agent.config import ConfigError

    for bad, key in [("enabled = 1", "federated.enabled"), ("max_windows = 0", "max_windows"),
                     ("delta = 2.0", "delta"), ("epsilon = 1.0", "federated.epsilon"),
                     ("epsilon_budget = -1", "epsilon_budget"),
                     ('state_dir = "fl\\\\x"', "federated.state_dir may not contain"),
                     ('state_dir = "fl\\nx"', "federated.state_dir may not contain"),
                     ('state_dir = "fl\\"x"', "federated.state_dir may not contain")]:
        with pytest.raises(ConfigError, match=key):
            parse_config(base + f"[federated]\n{bad}\n", base=tmp_path)
    # the default federated directory sits beneath agent.state_dir: checked when enabled
    odd = base.replace('state_dir = "s"', 'state_dir = "s\\\\t"')
    assert parse_config(odd, base=tmp_path).state_dir.name == "s\\t"
    with pytest.raises(ConfigError, match="agent.state_dir may not contain"):
        parse_config(odd + "[federated]\nenabled = true\n", base=tmp_path)


# -- real Flower processes --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flower_env() -> dict[str, str]:
    return dict(os.environ, **FLOWER_ENV, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


class SuperLink:
    """A real ``flower-superlink`` (insecure, loopback, with a database) in its own session."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = workdir / "superlink.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(SUPERLINK), "--insecure", "--disable-runtime-dependency-installation",
                 "--database", str(workdir / "superlink.db"), "--host", "127.0.0.1",
                 "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=_flower_env(), start_new_session=True)
        poll_until(self._listening, 60, "the SuperLink to listen", self.tail)

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"flower-superlink exited\n{self.tail()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def activated(self) -> int:
        """How many SuperNodes the SuperLink has activated so far (from its log)."""
        return self.log.read_text(errors="replace").count("Activated node_id")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[SuperLink]:
    link = SuperLink(tmp_path)
    yield link
    link.stop()


def _supernodes_of(parent: int) -> list[int]:
    """Live ``flower-supernode`` processes whose parent is ``parent``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[1]) == parent and fields[0] != "Z" and b"flower-supernode" in cmdline:
            out.append(int(stat.parent.name))
    return out


@needs_flower
@pytest.mark.slow
def test_supervisor_runs_restarts_and_stops_a_real_supernode(tmp_path: Path, superlink: SuperLink) -> None:
    work = tmp_path / "node"
    sup = SuperNodeSupervisor(str(SUPERNODE), work, env=_flower_env(), backoff=lambda n: 0.2,
                              stop_timeout=10)
    spec = SuperNodeSpec(run="fl-1", superlink=superlink.address, insecure=True,
                         trusted_entities={"fpk_trainer": _ed25519_raw_b64()},
                         node_config={"state-dir": str(tmp_path), "epsilon-budget": 8.0,
                                      "delta": 1e-5, "node-name": "edge-1"})
    diag = lambda: f"{sup.status()}\n{(work / 'supernode.log').read_text(errors='replace')[-3000:]}\n{superlink.tail()}"  # noqa: E731
    try:
        sup.want(spec)
        first = poll_until(lambda: sup.status()["pid"], 30, "a SuperNode", diag)
        poll_until(lambda: superlink.activated() >= 1, 60, "the SuperLink to activate the node", diag)
        cmdline = Path(f"/proc/{first}/cmdline").read_bytes().split(b"\0")
        assert b"--insecure" in cmdline and b"--trusted-entities" in cmdline
        assert os.getpgid(first) == first  # its own process group

        os.kill(first, signal.SIGKILL)  # it dies while the run is active: started again
        second = poll_until(lambda: (p := sup.status()["pid"]) and p != first and p, 30,
                            "a restarted SuperNode", diag)
        assert sup.status()["restarts"] == 1 and sup.status()["last_exit"] == -signal.SIGKILL
        poll_until(lambda: superlink.activated() >= 2, 60, "the restarted node to activate", diag)

        sup.want(replace(spec, insecure=False, run="fl-2"), wait=30)  # another run: a new child
        third = sup.status()["pid"]
        assert third not in (None, second) and not process_alive(second)
        assert b"--insecure" not in Path(f"/proc/{third}/cmdline").read_bytes().split(b"\0")

        sup.want(None, wait=30)  # the run is over
        assert sup.status()["state"] == "stopped" and not process_alive(third)
        assert process_group_members(third) == []  # its ClientApp/SuperExec children too
        assert not (work / "supernode.pid").exists()
    finally:
        sup.close()


@needs_flower
@pytest.mark.slow
def test_a_new_supervisor_ends_the_supernode_a_killed_agent_left(tmp_path: Path, superlink: SuperLink) -> None:
    work = tmp_path / "node"
    spec = SuperNodeSpec(run="fl-1", superlink=superlink.address, insecure=True,
                         trusted_entities={"fpk_trainer": _ed25519_raw_b64()},
                         node_config={"state-dir": str(tmp_path), "node-name": "edge-1"})
    sup = SuperNodeSupervisor(str(SUPERNODE), work, env=_flower_env())
    sup.want(spec)
    pid = poll_until(lambda: sup.status()["pid"], 30, "a SuperNode", lambda: str(sup.status()))
    with sup._cond:  # noqa: SLF001 - forget it, as an agent killed with SIGKILL would
        sup._proc = None  # noqa: SLF001
        sup._wanted = sup._running = None  # noqa: SLF001
    sup.close()
    assert process_alive(pid)
    SuperNodeSupervisor(str(SUPERNODE), work, env=_flower_env()).close()
    assert not process_alive(pid) and process_group_members(pid) == []


# -- real agents, real TUF, real broker ---------------------------------------------------------


def _csv(path: Path, rows: int = 50) -> Path:
    path.write_text("timestamp,value\n" + "".join(
        f"2024-01-01 00:{i // 60:02d}:{i % 60:02d},{math.sin(i / 5):.4f}\n" for i in range(rows)))
    return path


def _enable_federated(config: Path, **extra: object) -> None:
    text = config.read_text().replace("[federated]\nenabled = false", "[federated]\nenabled = true")
    assert "enabled = true" in text, "init-config no longer writes [federated] enabled = false"
    for key, value in extra.items():
        text = text.replace("[federated]\n", f"[federated]\n{key} = {json.dumps(value)}\n")
    config.write_text(text)


def _set_profile(config: Path, profile: str) -> None:
    text = config.read_text()
    config.write_text(text.replace('profile = "x86-64-v3"', f'profile = "{profile}"', 1))


@needs_flower
@pytest.mark.slow
def test_agents_join_from_the_signed_run_and_leave_when_it_finishes(
    tmp_path: Path, broker, clients, superlink: SuperLink
) -> None:
    from trainer.fleet.federated import finish_federated_run, publish_federated_run
    from trainer.fleet.tuf_repository import TufRepository

    registry = tmp_path / "registry"
    repo = TufRepository.init(registry / "tuf")
    agents = Agents(tmp_path / "agents", broker.url)
    csv = _csv(tmp_path / "series.csv")
    trains = agents.config("edge-t", trust=repo.root_json_path, source=f"csv:{csv}?rate=20")
    _enable_federated(trains, supernode=str(SUPERNODE))
    barred = agents.config("edge-b", trust=repo.root_json_path, source=f"csv:{csv}?rate=20")
    _set_profile(barred, "cortex-a53")  # may_train = false
    _enable_federated(barred, supernode=str(SUPERNODE))
    watch = Watch(broker.url, lambda: agents.tail() + "\n" + superlink.tail())
    pub = clients()
    t = b = None
    try:
        t, b = agents.start(trains), agents.start(barred)

        def fed(agent: str):
            return lambda: next((h.federated for h in reversed(watch.of("health"))
                                 if h.agent == agent and h.federated), None)

        # before any run: the barred agent says why it cannot join, the other that it can
        barred_h = watch.wait_for(fed("edge-b"), 60, "edge-b's federated health")
        assert barred_h["can_join"] is False and "may_train = false" in barred_h["reason"]
        trains_h = watch.wait_for(fed("edge-t"), 60, "edge-t's federated health")
        assert trains_h["can_join"] is True and trains_h["supernode"] == "stopped"
        assert trains_h["epsilon_spent"] == 0.0 and trains_h["epsilon_budget"] == 8.0

        run = _run(superlink=superlink.address, insecure=True)
        publish_federated_run(registry, run, client=pub, topics=TOPICS, timeout=10)
        watch.wait_for(lambda: (h := fed("edge-t")()) and h["supernode"] == "running"
                       and h["run"] == "fl-1", 60, "edge-t to run a SuperNode for fl-1")
        [node] = poll_until(lambda: _supernodes_of(t.pid), 30, "edge-t's SuperNode child", agents.tail)
        poll_until(lambda: superlink.activated() >= 1, 60, "the SuperLink to activate edge-t's node",
                   lambda: superlink.tail() + agents.tail())
        # Flower, its gRPC and the accountant stay out of the agent's own address space
        from test_agent_footprint import mapped_packages

        mapped = mapped_packages(t.pid)
        assert not mapped & {"grpc", "torch", "scipy", "dp_accounting", "flwr"}, sorted(mapped)
        cmdline = Path(f"/proc/{node}/cmdline").read_bytes().split(b"\0")
        assert b"--insecure" in cmdline and cmdline[cmdline.index(b"--superlink") + 1] == superlink.address.encode()
        node_config = cmdline[cmdline.index(b"--node-config") + 1].decode()
        assert 'node-name="edge-t"' in node_config and "epsilon-budget=8.0" in node_config
        entities = Path(cmdline[cmdline.index(b"--trusted-entities") + 1].decode())
        assert json.loads(entities.read_text()) == {
            "fpk_trainer": openssh_ed25519(run.trusted_entities["fpk_trainer"])}
        # The health report shows the local ε the host's ledger recorded. The ledger is
        # charged here directly; the ClientApp charging it in a real round is tested with the
        # trainer's Flower app.
        from edge_agent.federated import LocalLedger

        with LocalLedger(agents.base / "edge-t" / "state" / "federated" / "ledger.sqlite",
                         epsilon_budget=8.0, delta=1e-5) as ledger:
            spent = ledger.charge("fl-1", 1, noise_multiplier=1.0, sampling_rate=0.1, clipping_norm=1.0)
        watch.wait_for(lambda: (h := fed("edge-t")()) and h["epsilon_spent"] == pytest.approx(spent),
                       30, "edge-t's health to show the ε spent")
        # the barred agent saw the same run and started nothing
        watch.wait_for(lambda: (h := fed("edge-b")()) and h["run"] == "fl-1", 60, "edge-b to see fl-1")
        assert _supernodes_of(b.pid) == [] and fed("edge-b")()["can_join"] is False

        finish_federated_run(registry, run, client=pub, topics=TOPICS, timeout=10)
        watch.wait_for(lambda: (h := fed("edge-t")()) and h["supernode"] == "stopped"
                       and h["run"] is None, 60, "edge-t to stop its SuperNode")
        poll_until(lambda: not process_alive(node), 30, "the SuperNode process to end", agents.tail)
        assert process_group_members(node) == [] and _supernodes_of(t.pid) == []

        # a new run, then the agent stops: its SuperNode stops with it
        publish_federated_run(registry, replace(run, run="fl-2"), client=pub, topics=TOPICS, timeout=10)
        [node] = poll_until(lambda: _supernodes_of(t.pid), 60, "a SuperNode for fl-2", agents.tail)
        t.signal(signal.SIGTERM)
        assert t.wait(60) == 0
        assert not process_alive(node) and process_group_members(node) == []
    finally:
        watch.close()
        agents.close()
        for p in (t, b):
            if p is not None:
                for pid in _supernodes_of(p.pid):
                    os.killpg(pid, signal.SIGKILL)


# -- property: the codec round-trips every valid document -------------------------------------

_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_KEY = openssh_ed25519(base64.b64encode(bytes(range(32))).decode())
_runs = st.builds(
    FederatedRun,
    run=_names, group=_names,
    superlink=st.tuples(st.sampled_from(["127.0.0.1", "link.example", "[::1]"]),
                        st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    app_sha256=st.binary(min_size=32, max_size=32).map(bytes.hex),
    trusted_entities=st.dictionaries(st.text(min_size=1, max_size=10), st.just(_KEY), max_size=3),
    state=st.sampled_from(["active", "finished"]),
    epsilon_budget=st.floats(0, 1e6) | st.just(math.inf),
    delta=st.floats(1e-12, 0.5),
    insecure=st.booleans(),
    extra=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in {
        "schema", "run", "group", "superlink", "app_sha256", "trusted_entities", "state",
        "epsilon_budget", "delta", "insecure"}), st.integers() | st.text(max_size=5), max_size=3),
)


@given(_runs)
def test_every_valid_run_document_round_trips(run: FederatedRun) -> None:
    assert decode_run(encode_run(run)) == run


# -- what must start nothing, and what must stop a SuperNode ----------------------------------


def _waiting_process(argv0: str | None = None, *args: str) -> subprocess.Popen[bytes]:
    """A live process in its own session that waits on its stdin (a reused pid, say)."""
    if argv0 is None:
        return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                stdin=subprocess.PIPE, start_new_session=True)
    return subprocess.Popen([argv0, "-c", "read line", "sh", *args], executable="/bin/sh",
                            stdin=subprocess.PIPE, start_new_session=True)


def test_a_pid_file_naming_an_unrelated_process_ends_nothing(tmp_path: Path) -> None:
    work = tmp_path / "node"
    work.mkdir()
    unrelated = _waiting_process()
    # named like a SuperNode, but not started with this workdir's files
    lookalike = _waiting_process("flower-supernode", "--trusted-entities", str(tmp_path / "other.yaml"))
    try:
        for proc in (unrelated, lookalike):
            (work / "supernode.pid").write_text(f"{proc.pid}\n")
            assert end_leftover(work, stop_timeout=5) is False
            assert not (work / "supernode.pid").exists() and process_alive(proc.pid)
        (work / "supernode.pid").write_text(f"{unrelated.pid}\n")
        SuperNodeSupervisor(str(SUPERNODE), work).close()  # what a starting agent does
        assert process_alive(unrelated.pid) and process_alive(lookalike.pid)
        (work / "supernode.pid").write_text("not a pid\n")
        assert end_leftover(work) is False and not (work / "supernode.pid").exists()
    finally:
        for proc in (unrelated, lookalike):
            proc.kill()
            proc.wait(10)


def test_a_failing_start_backs_off_with_one_line_per_attempt(tmp_path: Path, caplog) -> None:
    attempts: list[int] = []
    sup = SuperNodeSupervisor(str(SUPERNODE), tmp_path / "node",
                              backoff=lambda n: attempts.append(n) or 0.05)
    spec = SuperNodeSpec(run="fl-1", superlink="127.0.0.1:1", trusted_entities={"k": _ed25519_raw_b64()},
                         node_config={"state-dir": "C:\\fl"})  # refused by node_config_arg
    try:
        sup.want(spec, wait=30)
        poll_until(lambda: len(attempts) >= 3, 30, "three attempts", lambda: str(attempts))
        assert attempts[:3] == [1, 2, 3]  # the backoff grows: no retry loop every second
        status = sup.status()
        assert status["state"] == "restarting" and "backslashes" in status["last_error"]
        assert _supernodes_of(os.getpid()) == []
        assert not any(r.exc_info for r in caplog.records)  # one line each, no traceback
    finally:
        sup.close()


@needs_flower
def test_a_pid_file_that_cannot_be_written_stops_the_child_it_would_lose(tmp_path: Path) -> None:
    work = tmp_path / "node"
    (work / "supernode.pid").mkdir(parents=True)  # the pid file cannot be written
    sup = SuperNodeSupervisor(str(SUPERNODE), work, backoff=lambda n: 3600.0, stop_timeout=10)
    spec = SuperNodeSpec(run="fl-1", superlink="127.0.0.1:1", insecure=True,
                         trusted_entities={"k": _ed25519_raw_b64()}, node_config={"node-name": "e"})
    try:
        sup.want(spec, wait=60)
        status = sup.status()
        assert status["state"] == "restarting" and "pid file" in status["last_error"]
        assert _supernodes_of(os.getpid()) == []  # stopped, not left running untracked
    finally:
        sup.close()
    assert _supernodes_of(os.getpid()) == []


def _participation(tmp_path: Path, **config: object):
    from edge_agent.config import FederatedConfig
    from edge_agent.federated.join import JoinCheck
    from edge_agent.federated.participation import FederatedParticipation

    return FederatedParticipation(
        FederatedConfig(enabled=True, state_dir=tmp_path / "fl", **config), agent_id="edge-1",
        group="lab", profile=load_profile("x86-64-v3"), state_dir=tmp_path,
        check=JoinCheck(True, None, str(SUPERNODE)))


def test_health_reports_the_delta_the_spent_epsilon_was_computed_at(tmp_path: Path) -> None:
    from edge_agent.federated import LocalLedger

    part = _participation(tmp_path, delta=1e-3)
    try:
        assert part.health()["delta"] == 1e-3 and part.health()["epsilon_spent"] == 0.0
        with LocalLedger(tmp_path / "fl" / "ledger.sqlite", 8.0, 1e-5) as ledger:
            spent = ledger.charge("fl-1", 1, 4.0, 1.0, 1.0)
        health = part.health()
        assert health["epsilon_spent"] == spent and health["delta"] == 1e-5
    finally:
        part.close()


def _agent_repo(tmp_path: Path, client, repo):
    from helpers_delivery import TOPICS as topics

    from edge_agent.trust import MqttFetcher, TrustedRepository

    state = tmp_path / "agent-tuf"
    return TrustedRepository(state / "metadata", state / "targets",
                             MqttFetcher(client, topics, state / "chunks", timeout=5),
                             repo.root_json_path.read_bytes())


@needs_flower
def test_run_documents_for_another_group_unsigned_tampered_or_insecure_start_nothing(
    tmp_path: Path, broker, clients
) -> None:
    import hashlib

    from helpers_delivery import Attacker

    from trainer.fleet.publisher import publish_repository
    from trainer.fleet.tuf_repository import TufRepository, url_path

    repo = TufRepository.init(tmp_path / "tuf")
    pub = clients()
    other = _run(run="fl-other", group="other", superlink="127.0.0.1:9092")
    remote = _run(run="fl-lab", superlink="superlink.example:9092", insecure=True)
    repo.add_targets({run_target(r.run): encode_run(r) for r in (other, remote)})
    publish_repository(repo, pub, TOPICS)
    attacker = Attacker(broker.url)
    evil = encode_run(_run(run="fl-evil", superlink="127.0.0.1:9092", insecure=True))
    evil_path = url_path(run_target("fl-evil"), hashlib.sha256(evil).hexdigest())
    attacker.put(TOPICS.repo_target_chunk(evil_path, 0), evil)  # never signed
    part = _participation(tmp_path)
    trusted = _agent_repo(tmp_path, clients(), repo)
    try:
        trusted.refresh()
        assert part.on_pass(trusted) is True
        health = part.health()
        assert health["run"] == "fl-lab" and health["supernode"] == "stopped"
        assert "superlink.example:9092" in health["refused"] and "loopback" in health["refused"]
        assert part.supervisor.status()["state"] == "stopped"

        # the trainer publishes a good run; the attacker alters it before this agent fetches it
        good = _run(run="fl-lab2", superlink="127.0.0.1:9092", insecure=True)
        repo.add_targets({run_target(good.run): encode_run(good)})
        publish_repository(repo, pub, TOPICS)
        data = encode_run(good)
        upath = url_path(run_target(good.run), hashlib.sha256(data).hexdigest())
        attacker.put(TOPICS.repo_target_chunk(upath, 0), data.replace(b"fl-lab2", b"fl-lab3"))
        trusted.refresh()
        assert part.on_pass(trusted) is True  # tampered: no run, not "retry later"
        health = part.health()
        assert health["run"] is None and health["refused"] is None and health["supernode"] == "stopped"
        assert _supernodes_of(os.getpid()) == []
    finally:
        part.close()
        attacker.close()


@needs_flower
@pytest.mark.slow
def test_a_joined_run_ends_when_the_repository_can_no_longer_be_verified(
    tmp_path: Path, clients, superlink: SuperLink, monkeypatch
) -> None:
    from edge_agent.activation import ActivationStore
    from edge_agent.reconcile import Reconciler
    from trainer.fleet.publisher import publish_repository
    from trainer.fleet.tuf_repository import TufRepository

    monkeypatch.setenv("EDGEFLEET_MQTT_PASSWORD", "s3cret")  # the agent's secret
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    repo = TufRepository.init(tmp_path / "tuf")
    pub = clients()
    run = _run(superlink=superlink.address, insecure=True)
    repo.add_targets({run_target(run.run): encode_run(run)})
    publish_repository(repo, pub, TOPICS)
    part = _participation(tmp_path)
    reports: list[tuple] = []
    (tmp_path / "state").mkdir()
    reconciler = Reconciler(
        agent_id="edge-1", group="lab", profile=load_profile("x86-64-v3"), runtimes=["onnxruntime"],
        threads=1, trusted=_agent_repo(tmp_path, clients(), repo),
        store=ActivationStore(tmp_path / "state"), report=lambda *a: reports.append(a),
        activate=lambda *a: None, after_pass=part.on_pass, untrusted=part.on_untrusted)
    diag = lambda: f"{part.supervisor.status()}\n{superlink.tail()}"  # noqa: E731
    try:
        assert reconciler.reconcile() is True
        pid = poll_until(lambda: part.supervisor.status()["pid"], 30, "a SuperNode", diag)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        node_config = cmdline[cmdline.index(b"--node-config") + 1].decode()
        assert f'app-sha256="{run.app_sha256}"' in node_config  # the ClientApp checks its FAB
        environ = dict(e.split("=", 1) for e in
                       Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in e)
        assert "EDGEFLEET_MQTT_PASSWORD" not in environ and environ["FLWR_TELEMETRY_ENABLED"] == "0"

        # a freeze: the timestamp the agents get has expired (the `finished` document withheld)
        assert repo.refresh(timestamp_days=-1) == ["timestamp"]
        publish_repository(repo, pub, TOPICS)
        assert reconciler.reconcile() is True
        assert any("expired" in str(r[-1]) for r in reports)
        assert part.supervisor.status()["state"] == "stopped" and not process_alive(pid)
        assert process_group_members(pid) == [] and part.health()["run"] is None
    finally:
        part.close()


@needs_flower
@pytest.mark.slow
def test_an_agent_not_taking_part_any_more_ends_the_supernode_it_left(
    tmp_path: Path, superlink: SuperLink
) -> None:
    from edge_agent.daemon import Agent

    root = tmp_path / "root.json"
    root.write_text("{}")
    base = (f'[agent]\nid = "edge-1"\ngroup = "lab"\nprofile = "x86-64-v3"\nstate_dir = "state"\n'
            f'[broker]\nurl = "mqtt://127.0.0.1:1"\n[trust]\nroot = "{root}"\n[source]\nspec = "stdin"\n')
    work = tmp_path / "state" / "federated" / "supernode"
    spec = SuperNodeSpec(run="fl-1", superlink=superlink.address, insecure=True,
                         trusted_entities={"fpk_trainer": _ed25519_raw_b64()},
                         node_config={"node-name": "edge-1"})
    for federated in ("[federated]\nenabled = false\n",  # turned off since
                      '[federated]\nenabled = true\nsupernode = "no-such-flower-supernode"\n'):
        sup = SuperNodeSupervisor(str(SUPERNODE), work, env=_flower_env())
        sup.want(spec)
        pid = poll_until(lambda s=sup: s.status()["pid"], 30, "a SuperNode", lambda s=sup: str(s.status()))
        with sup._cond:  # noqa: SLF001 - forget it, as an agent killed with SIGKILL would
            sup._proc = None  # noqa: SLF001
            sup._wanted = sup._running = None  # noqa: SLF001
        sup.close()
        assert process_alive(pid)
        agent = Agent(parse_config(base + federated, base=tmp_path))
        agent.init_federated()
        try:
            assert not process_alive(pid) and process_group_members(pid) == []
            assert not (work / "supernode.pid").exists()
        finally:
            if agent.federation is not None:
                agent.federation.close()


def test_a_supernode_that_exits_by_itself_takes_its_process_group_along(tmp_path: Path) -> None:
    # A stand-in for a SuperNode that dies while a ClientApp it started is still running:
    # `tail -f /dev/null` never ends by itself.
    binary = tmp_path / "bin" / "flower-supernode"
    binary.parent.mkdir()
    binary.write_text(f"#!/bin/sh\ntail -f /dev/null &\necho $! > {tmp_path / 'child.tmp'}\n"
                      f"mv {tmp_path / 'child.tmp'} {tmp_path / 'child.pid'}\nexit 3\n")
    binary.chmod(0o755)
    sup = SuperNodeSupervisor(str(binary), tmp_path / "node", backoff=lambda n: 3600.0)
    spec = SuperNodeSpec(run="fl-1", superlink="127.0.0.1:1", trusted_entities={"k": _ed25519_raw_b64()},
                         node_config={"node-name": "e"})
    child = None
    try:
        sup.want(spec)
        child = int(poll_until(lambda: (tmp_path / "child.pid").exists(), 30, "its child", str)
                    and (tmp_path / "child.pid").read_text())
        poll_until(lambda: sup.status()["last_exit"] == 3, 30, "the exit", lambda: str(sup.status()))
        poll_until(lambda: not process_alive(child), 30, "its process group to go", lambda: str(sup.status()))
        assert sup.status()["state"] == "restarting" and sup.status()["restarts"] == 1
    finally:
        sup.close()
        if child is not None and process_alive(child):
            os.kill(child, signal.SIGKILL)
