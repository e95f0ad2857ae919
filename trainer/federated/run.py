"""``edgefleet fl start``: validate → record the run → SuperLink → ``flwr run`` → wait →
register the global model. ``edgefleet fl status``: the ledger's view of a run.

:func:`prepare` checks everything checkable before any process starts (the version and its
weights, the family, the profiles, the reference data, the options, that the registry can
take a version) and raises :class:`FederatedError` with one line. :func:`start` then runs.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.federated import FederatedRun, FederatedRunError, encode_run, is_address, run_target
from shared.profiles import FirmwareProfile, load_profiles
from trainer.federated.ledger import FederatedRunRecord, PrivacyLedger
from trainer.federated.options import FederatedOptions, OptionsError
from trainer.federated.origin import SPEC_PARENT, Origin, origin_from_spec, origin_from_version
from trainer.federated.tls import TlsFiles
from trainer.registry import (
    Registry,
    RegistryError,
    VersionRecord,
    check_model_name,
    parse_model_ref,
)
from trainer.registry.store import DB_FILE

if TYPE_CHECKING:  # torch loads with trainer.models: only when a run starts
    from trainer.models import ArchitectureSpec

__all__ = ["FederatedError", "FederatedRunFailed", "Prepared", "StartOutcome", "StartRequest", "prepare", "start"]

Progress = Callable[[str, dict[str, Any]], None]
Announce = Callable[[FederatedRun], None]
"""Puts a run document into the agents' signed desired state (:mod:`trainer.fleet.federated`)."""


class FederatedError(ValueError):
    """Bad input for a federated run: one line for the user, nothing started."""


class FederatedRunFailed(RuntimeError):
    """The run started but produced no global model (refused, failed, no nodes)."""


@dataclass(frozen=True)
class StartRequest:
    """What ``edgefleet fl start`` was asked for: start from the registered version ``ref``
    (``NAME@V``), or from ``spec`` (then ``ref`` is ``None``, ``name`` names the result and
    ``data`` is required)."""

    ref: str | None
    options: FederatedOptions
    registry: Path
    profiles: Sequence[str] = ()
    data: Sequence[Path] = ()
    superlink: str | None = None  # host:port of a running SuperLink; None = start one
    port: int = 9092  # of the SuperLink started when ``superlink`` is None
    host: str = "127.0.0.1"  # where the SuperLink started listens
    advertise: str | None = None  # host:port agents reach it at (default host:port, or ``superlink``)
    tls: TlsFiles | None = None  # cert+key+CA for the SuperLink started; CA alone for ``superlink``
    timeout: float = 3600.0
    run: str | None = None
    profile_dirs: Sequence[Path] = ()
    spec: ArchitectureSpec | None = None
    name: str | None = None


@dataclass
class Prepared:
    request: StartRequest
    origin: Origin
    profiles: list[FirmwareProfile]
    series: list[np.ndarray]
    datasets: list[dict[str, Any]] = field(default_factory=list)
    advertise: str = ""  # the SuperLink address the run document names
    root_certificates: str | None = None  # the CA bundle's PEM (TLS), ``None``: plaintext


@dataclass(frozen=True)
class StartOutcome:
    run: FederatedRunRecord
    version: VersionRecord


def _data_files(parent: VersionRecord, given: Sequence[Path]) -> list[Path]:
    if given:
        return list(given)
    from shared.series import file_sha256

    datasets = parent.lineage.get("datasets") or []
    if not datasets:
        raise FederatedError(f"give --data CSV: {parent.ref} records no data it was trained on")
    paths = []
    for d in datasets:
        path = Path(d["file"])
        if not path.is_file() or file_sha256(path) != d.get("sha256"):
            raise FederatedError(f"give --data CSV (reference data for the threshold and int8 calibration): "
                                 f"{parent.ref} was trained on {d['file']}, and ./{path} is "
                                 f"{'missing' if not path.is_file() else 'not that file'}")
        paths.append(path)
    return paths


def prepare(request: StartRequest) -> Prepared:
    """Validate ``request`` (see the module docstring); nothing is written."""
    try:
        request.options.check()
    except OptionsError as e:
        raise FederatedError(str(e)) from e
    if (request.ref is None) == (request.spec is None):
        raise FederatedError("give one of --model NAME@V and --spec SPEC.json")
    from trainer.models import ArchitectureSpec

    parent: VersionRecord | None = None
    if request.spec is not None:
        spec = request.spec
        if spec.tree_ensemble:
            raise FederatedError(f"the spec is a {spec.family} model: federated averaging needs a torch family")
        if not request.name:
            raise FederatedError("give --name NAME: the model name the result of a run from --spec registers as")
        if not request.data:
            raise FederatedError("give --data CSV with --spec: the reference rows the starting model is "
                                 "normalised on")
        try:
            check_model_name(request.name)
        except (RegistryError, ValueError) as e:
            raise FederatedError(str(e)) from e
        what = "the spec"
    else:
        try:
            name, version = parse_model_ref(str(request.ref))
        except RegistryError as e:
            raise FederatedError(str(e)) from e
        if version is None:
            raise FederatedError(f"name the version to start from: {name}@N")
    try:  # the run and group names as the agents' run document needs them
        encode_run(run_document(request.run or new_run_name(), request.options, "127.0.0.1:9092", "0" * 64, "active"))
    except FederatedRunError as e:
        raise FederatedError(str(e)) from e
    _check_first_round_fits(request.options)
    if request.superlink is not None:
        _check_address(request.superlink, "--superlink")
    advertise, certificates = _transport(request)
    # From a spec the registry may not exist yet (fl start creates it, as train does)
    if request.spec is None or (Path(request.registry) / DB_FILE).exists():
        parent = _check_registry(request)
    if parent is not None:
        spec = ArchitectureSpec.from_json(parent.architecture)
        what = parent.ref
    names = list(request.profiles) or list((parent.params if parent else {}).get("profiles") or [])
    if not names:
        raise FederatedError("give at least one --profile")
    try:
        profiles = load_profiles(names, request.profile_dirs)
    except ValueError as e:
        raise FederatedError(str(e)) from e
    from shared.series import SeriesError, file_sha256, read_series
    from trainer.data import fill_missing, min_rows

    series, datasets = [], []
    features: tuple[str, ...] | None = None
    for path in request.data if parent is None else _data_files(parent, request.data):
        try:
            s = read_series(path)
        except SeriesError as e:
            raise FederatedError(str(e)) from e
        except OSError as e:
            raise FederatedError(f"cannot read {path}: {e.strerror or e}") from e
        if len(s.features) != spec.features:
            raise FederatedError(f"{path}: {len(s.features)} column(s), {what} reads {spec.features}")
        if features is not None and tuple(s.features) != features:
            raise FederatedError(f"{path}: columns {list(s.features)} differ from {list(features)} of the first file")
        features = tuple(s.features)
        if len(s) < min_rows(spec.input_rows):
            raise FederatedError(f"{path}: {len(s)} rows are too few for {what}'s {spec.input_rows}-row "
                                 f"input: need at least {min_rows(spec.input_rows)}")
        try:
            series.append(fill_missing(s.values))
        except ValueError:
            raise FederatedError(f"{path}: a column has no value") from None
        datasets.append({"file": Path(path).name, "sha256": file_sha256(path), "rows": len(s)})
    try:
        Registry.check_writable(request.registry)
    except RegistryError as e:
        raise FederatedError(str(e)) from e
    if parent is None:
        assert features is not None and request.name is not None
        origin = origin_from_spec(request.name, spec, features, series, datasets, request.options.seed)
    else:
        try:
            with Registry.open(request.registry) as reg:
                origin = origin_from_version(reg, parent)
        except RegistryError as e:
            raise FederatedError(str(e)) from e
    return Prepared(request, origin, profiles, series, datasets, advertise, certificates)


def _check_registry(request: StartRequest) -> VersionRecord | None:
    """The version ``request`` starts from (``None`` for a spec), checked, and that the run's
    name is new in the registry. Raises :class:`FederatedError`."""
    parent = None
    try:
        with Registry.open(request.registry) as reg:
            if request.spec is None:
                name, version = parse_model_ref(str(request.ref))
                parent = reg.get(name, version)
                if parent.architecture.get("family") in ("trees", "isolation_forest"):
                    raise FederatedError(f"{parent.ref} is a {parent.architecture['family']} model: federated "
                                         "averaging needs a torch family")
                if not parent.artifacts:
                    raise FederatedError(f"{parent.ref} has no artifact")
                reg.weights(parent)
            if request.run is not None and any(r.run == request.run for r in PrivacyLedger(reg).runs()):
                raise FederatedError(f"a federated run {request.run!r} exists already in {request.registry}")
    except RegistryError as e:
        raise FederatedError(str(e)) from e
    return parent


def _check_address(address: str, what: str) -> None:
    if not is_address(address):
        raise FederatedError(f"{what} must be HOST:PORT, got {address!r}")


def _transport(request: StartRequest) -> tuple[str, str | None]:
    """The run document's SuperLink address and CA bundle (``None``: plaintext), checked."""
    from trainer.federated.tls import TlsError, check_tls

    tls = request.tls
    if request.superlink is not None:
        if tls is not None and (tls.cert is not None or tls.key is not None):
            raise FederatedError("--tls-cert and --tls-key are for the SuperLink fl start starts; "
                                 "with --superlink give --tls-ca alone")
        if request.host != "127.0.0.1":
            raise FederatedError("--host is for the SuperLink fl start starts, not with --superlink")
        advertise = request.advertise or request.superlink
    else:
        if tls is not None and (tls.cert is None or tls.key is None):
            raise FederatedError("give --tls-cert, --tls-key and --tls-ca together (or none of them)")
        if request.advertise is None and request.host in ("0.0.0.0", "::"):
            raise FederatedError(f"--host {request.host} listens everywhere: give --advertise HOST:PORT, "
                                 "the address agents reach the SuperLink at")
        host = f"[{request.host}]" if ":" in request.host else request.host
        advertise = request.advertise or f"{host}:{request.port}"
    _check_address(advertise, "--advertise" if request.advertise else "--host")
    if tls is None:
        return advertise, None
    try:
        return advertise, check_tls(tls)
    except TlsError as e:
        raise FederatedError(str(e)) from e


def _check_first_round_fits(options: FederatedOptions) -> None:
    """Refuse a budget that one round already passes (the ServerApp would refuse round 1)."""
    from trainer.federated.accounting import compose_epsilon

    if options.epsilon_budget is None or options.dp == "off":
        return
    rate = 1.0 if options.dp == "local" else options.fraction  # as trainer.federated.rounds charges
    first = compose_epsilon([(options.noise_multiplier, rate)], options.delta)
    if first > options.epsilon_budget:
        raise FederatedError(f"one round costs ε {first:.4g} (δ={options.delta:g}), more than --epsilon-budget "
                             f"{options.epsilon_budget:g}: raise --noise or the budget")


def app_sha256() -> str:
    """sha256 of the Flower app as ``flwr run`` submits it (the FAB is built reproducibly)."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    from trainer.federated.flower import APP_DIR

    return hashlib.sha256(build_fab_from_disk(APP_DIR)).hexdigest()


def run_document(run: str, options: FederatedOptions, superlink: str, app_hash: str,
                 state: str, root_certificates: str | None = None) -> FederatedRun:
    """The run as its agents see it (:mod:`shared.federated`, target ``federated/runs/{run}.json``).

    ``trusted_entities`` is empty: flwr 1.42 cannot sign an app submitted to a self-hosted
    SuperLink, and a SuperNode told to trust any key refuses every unsigned app (see
    docs/federated.md). Hosts rely on the signed document itself (SuperLink address, transport,
    ``app_sha256``) instead. Transport: TLS verified with ``root_certificates`` (the CA bundle's
    PEM) when given, else ``insecure`` (agents accept that only for a loopback SuperLink).
    """
    return FederatedRun(run=run, group=options.group, superlink=superlink, app_sha256=app_hash,
                        trusted_entities={}, state=state,
                        epsilon_budget=math.inf if options.epsilon_budget is None else options.epsilon_budget,
                        delta=options.delta, insecure=root_certificates is None,
                        root_certificates=root_certificates)


def new_run_name() -> str:
    return f"fl-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def start(prepared: Prepared, progress: Progress | None = None, announce: Announce | None = None) -> StartOutcome:
    """Run the federated rounds and register the global model.

    ``announce(run)``, when given, receives the run's document
    (:func:`run_document`) as ``active`` before the app is submitted and as ``finished`` once
    the Flower run has ended, whatever its outcome (agents stop their SuperNodes then).

    Raises :class:`FederatedRunFailed` (the ledger says why) when no global model came out,
    :class:`~trainer.federated.flower.FlowerError` when Flower's processes fail.
    """
    from trainer.federated.flower import (
        SuperLink,
        stop_run,
        submit_run,
        wait_for_run,
        write_connection,
    )
    from trainer.federated.publish import register_global_model

    notify = progress or (lambda stage, info: None)
    req, opts = prepared.request, prepared.request.options
    run = req.run or new_run_name()
    state_dir = Path(req.registry).absolute() / "federated"
    origin = prepared.origin
    params: dict[str, Any] = {}
    if origin.version is None:  # the ServerApp starts from these weights (trainer.federated.server)
        with Registry.open(req.registry, create=True) as reg:
            params["start"] = {"spec": origin.architecture, "spec_sha256": origin.spec_sha256,
                               "seed": opts.seed, "weights": reg.blobs.put(origin.weights)}
    record = FederatedRunRecord(
        run=run, created_at=datetime.now(UTC).isoformat(timespec="seconds"), model=origin.model,
        parent_version=SPEC_PARENT if origin.version is None else origin.version, group=opts.group, strategy=opts.strategy, dp=opts.dp,
        noise_multiplier=opts.effective_noise, clipping="adaptive" if opts.adaptive_clipping else f"{opts.clipping_norm:g}",
        sampling_rate=opts.fraction, rounds=opts.rounds, epsilon_budget=opts.epsilon_budget, delta=opts.delta,
        params={**params, "options": opts.to_json(), "profiles": [p.name for p in prepared.profiles],
                "data": prepared.datasets, "superlink": req.superlink,
                "advertise": prepared.advertise, "tls": prepared.root_certificates is not None},
    )
    with Registry.open(req.registry) as reg:
        PrivacyLedger(reg).create_run(record)
    notify("run", {"run": run})
    link = None
    flower_id: str | None = None
    announced = ""
    try:
        if req.superlink is None:
            link = SuperLink(state_dir / "superlink", req.port, req.host, req.tls).start()
            flwr_home, address = link.flwr_home, link.address
        else:
            flwr_home, address = state_dir / "flwr-home", req.superlink
            write_connection(flwr_home, address, None if req.tls is None else req.tls.ca)
        advertise, certificates = prepared.advertise, prepared.root_certificates
        target, app_hash = run_target(run), app_sha256()
        if announce is not None:
            announced = app_hash
            announce(run_document(run, opts, advertise, app_hash, "active", certificates))
            notify("announced", {"target": target})
        flower_id = submit_run(flwr_home, {"registry": str(Path(req.registry).absolute()), "edgefleet-run": run})
        with Registry.open(req.registry) as reg:
            PrivacyLedger(reg).update_run(run, flower_run_id=flower_id)
        notify("submitted", {"run": run, "flower_run_id": flower_id, "superlink": address})
        status = wait_for_run(flwr_home, flower_id, req.timeout)
    except BaseException as e:  # a timeout, Ctrl-C (SIGTERM too, see the CLI): the run ends here
        if flower_id is not None and link is None:
            try:
                stop_run(flwr_home, flower_id)
            except Exception as stop_error:  # noqa: BLE001 - the first error is the one to report
                notify("warning", {"message": f"flwr stop {flower_id}: {stop_error}"})
        _mark_failed(req.registry, run, f"{type(e).__name__}: {e}".strip(": "))
        raise
    finally:
        if link is not None:
            link.stop()
        if announce is not None and announced:
            try:
                announce(run_document(run, opts, advertise, announced, "finished", certificates))
            except Exception as e:  # noqa: BLE001 - must not hide the run's own outcome
                notify("warning", {"message": f"could not announce run {run} finished: {e}"})
    with Registry.open(req.registry) as reg:
        ledger = PrivacyLedger(reg)
        done = ledger.get(run)
        if done.state in ("running", "pending"):  # the ServerApp died without saying why
            ledger.update_run(run, state="failed", message=f"the Flower run ended {status.status}")
            done = ledger.get(run)
    if done.state != "finished" or done.weights is None:
        raise FederatedRunFailed(f"run {run} {done.state}: {done.message or status.status}")
    with Registry.open(req.registry) as reg:
        weights = reg.bundle(done.weights)
    federated = {
        "run": run, "flower_run_id": done.flower_run_id, "strategy": opts.strategy, "dp": opts.dp,
        "rounds_planned": opts.rounds,
        "rounds_done": sum(1 for r in done.round_rows if r["state"] == "done"),
        "nodes": sorted({n for r in done.round_rows for n in r["nodes_contributed"]}),
        "noise_multiplier": opts.effective_noise, "clipping": done.clipping, "sampling_rate": opts.fraction,
        "delta": opts.delta, "epsilon": done.epsilon if math.isfinite(done.epsilon) else "inf",
        "epsilon_accountant": "rdp", "epsilon_budget": opts.epsilon_budget, "group": opts.group,
        "reference_data": prepared.datasets, "app_sha256": app_hash,
    }
    version = register_global_model(Path(req.registry), origin, weights, prepared.profiles,
                                    prepared.series, federated, notify)
    with Registry.open(req.registry) as reg:
        ledger = PrivacyLedger(reg)
        ledger.update_run(run, state="registered", result_version=version.version)
        return StartOutcome(ledger.get(run), version)


def _mark_failed(registry: Path, run: str, message: str) -> None:
    """Mark the run ``failed`` if it is still ``pending`` or ``running`` (best effort)."""
    try:
        with Registry.open(registry) as reg:
            ledger = PrivacyLedger(reg)
            if ledger.get(run).state in ("pending", "running"):
                ledger.update_run(run, state="failed", message=message[:500])
    except Exception:  # noqa: BLE001 - never mask the error that ended the run
        pass


def status(registry: Path, run: str | None) -> list[FederatedRunRecord]:
    """One run (``run``) or every run, from the ledger. Raises :class:`FederatedError`."""
    from trainer.federated.ledger import RunNotFound

    try:
        with Registry.open(registry) as reg:
            ledger = PrivacyLedger(reg)
            return [ledger.get(run)] if run else ledger.runs()
    except (RunNotFound, RegistryError) as e:
        raise FederatedError(str(e)) from e
