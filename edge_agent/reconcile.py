"""Converge what the agent runs on what the trainer's TUF repository asks for.

One :meth:`Reconciler.reconcile` pass: TUF refresh → the agent's own deployment document,
else its group's → per slot, the variant for this profile and runtimes → download (verified
by TUF) → read the bundle → open it in its runtime and smoke-test the golden vectors →
activate atomically. Any failure keeps the previous model serving and is reported as
``failed`` with a reason; every state change goes to ``report``. Slots are independent: a slot
that fails (for example because a newer trainer offers it only variants this agent cannot
run) does not stop the others from converging.

A pass that failed for a reason that goes away by itself — the broker or a chunk is
unavailable (``unavailable: …``), the state directory cannot be written (``storage: …``,
e.g. a full disk) — says so by returning ``False``: the caller retries it later, without
waiting for a new deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edge_agent.activation import ActivationStore, ActiveRecord
from edge_agent.runtime import (
    ModelRuntime,
    ModelRuntimeError,
    RuntimeUnavailableError,
    open_runtime,
    smoke_test,
)
from edge_agent.trust import TargetNotFoundError, TrustError
from shared.bundle import BundleError, BundleSpec, read_bundle
from shared.deployment import (
    Deployment,
    DeploymentError,
    Slot,
    agent_target,
    choose_variant,
    decode_deployment,
    describe_unrunnable,
    group_target,
)
from shared.profiles import FirmwareProfile

__all__ = ["LoadedModel", "OpenModel", "Reconciler", "Repository", "load_active"]

log = logging.getLogger(__name__)

Report = Callable[[str, str, str, int, int, str | None], None]  # slot, state, model, version, serial, reason
#: Opens a bundle's model in its runtime: ``open_model(spec, model, threads=N)``
#: (:func:`~edge_agent.runtime.open_runtime` unless a caller shares sessions).
OpenModel = Callable[..., ModelRuntime]


class Repository(Protocol):
    """What a pass needs from the TUF repository: :class:`~edge_agent.trust.IsolatedRepository`
    in the agent, :class:`~edge_agent.trust.TrustedRepository` in-process."""

    def refresh(self) -> None: ...

    def fetch_target(self, path: str) -> bytes: ...

    def list_targets(self, prefix: str) -> list[str]: ...

    def close(self) -> None:
        """Release what the pass held (called at the end of every pass)."""
        ...


@dataclass
class LoadedModel:
    """An activated artifact opened in its runtime, ready to serve."""

    record: ActiveRecord
    spec: BundleSpec
    runtime: ModelRuntime


def load_active(store: ActivationStore, slot: str, threads: int, *,
                open_model: OpenModel = open_runtime) -> LoadedModel | None:
    """Open the slot's current bundle (at start-up); ``None`` if there is none or it fails."""
    record = store.current(slot)
    if record is None:
        return None
    try:
        spec, model = read_bundle(store.bundle_path(record.sha256).read_bytes())
        runtime = open_model(spec, model, threads=threads)
        smoke_test(runtime, spec)
    except (OSError, BundleError, ModelRuntimeError) as e:
        log.error("slot %s: stored model %s@%s does not load: %s", slot, record.model, record.version, e)
        return None
    return LoadedModel(record, spec, runtime)


class Reconciler:
    """Runs reconcile passes; ``activate(slot, loaded)`` hands a new model to the serving loop."""

    def __init__(
        self,
        *,
        agent_id: str,
        group: str,
        profile: FirmwareProfile,
        runtimes: list[str],
        threads: int,
        trusted: Repository,
        store: ActivationStore,
        report: Report,
        activate: Callable[[str, LoadedModel], None],
        after_pass: Callable[[Repository], bool] | None = None,
        untrusted: Callable[[TrustError], None] | None = None,
        open_model: OpenModel = open_runtime,
    ) -> None:
        self.agent_id = agent_id
        self.group = group
        self.profile = profile
        self.formats = {"onnxruntime": "onnx", "litert": "tflite"}
        self.available = [self.formats[r] for r in runtimes if r in self.formats]
        self.threads = threads
        self.trusted = trusted
        self.store = store
        self.report = report
        self.activate = activate
        # Called once per pass with the refreshed repository, after the deployment slots and
        # before the repository is closed (the federated run documents ride on the same TUF
        # pass); returns False when it should be retried, like a slot.
        self.after_pass = after_pass
        # Called when the refresh itself is refused for a reason other than ``unavailable``
        # (expired, tampered, rolled back …): what only a verified repository justified (the
        # federated run) must stop; the deployed models keep serving.
        self.untrusted = untrusted
        self.open_model = open_model
        self._last_failure: dict[str, str] = {}  # slot → the failure last reported for it

    def _desired(self) -> Deployment | None:
        for target in (agent_target(self.agent_id), group_target(self.group)):
            try:
                return decode_deployment(self.trusted.fetch_target(target))
            except TargetNotFoundError:
                continue
        return None

    def _fail(self, slot: str, model: str, version: int, serial: int, reason: str) -> None:
        key = f"{model}|{version}|{serial}|{reason}"
        if self._last_failure.get(slot) != key:  # the same failure is reported once, not every refresh
            self._last_failure[slot] = key
            log.warning("slot %s: %s@%s failed: %s", slot, model, version, reason)
            self.report(slot, "failed", model, version, serial, reason)

    def reconcile(self) -> bool:
        """One pass. Never raises for a bad deployment: it is reported and skipped.

        Returns ``False`` when the pass should be retried later (a transient failure, see the
        module docstring), ``True`` when it converged or failed for good. The repository is
        closed at the end of the pass (the agent's
        :class:`~edge_agent.trust.IsolatedRepository`: its TUF process ends).
        """
        try:
            return self._pass()
        finally:
            self.trusted.close()

    def _pass(self) -> bool:
        try:
            self.trusted.refresh()
        except TrustError as e:
            self._fail("*", "", 0, 0, str(e))  # TrustError reads "{kind}: {message}"
            if e.kind != "unavailable" and self.untrusted is not None:
                self.untrusted(e)
            return e.kind != "unavailable"
        except OSError as e:  # python-tuf persisting trusted metadata
            self._fail("*", "", 0, 0, f"storage: {e}")
            return False
        done = True
        desired: Deployment | None = None
        try:
            desired = self._desired()
        except TrustError as e:  # the deployment document only: the run documents still count
            self._fail("*", "", 0, 0, str(e))
            done = e.kind != "unavailable"
        except DeploymentError as e:
            self._fail("*", "", 0, 0, f"bad deployment document: {e}")
        except OSError as e:
            self._fail("*", "", 0, 0, f"storage: {e}")
            done = False
        if desired is not None:
            for slot_name, slot in sorted(desired.slots.items()):
                done = self._reconcile_slot(slot_name, slot, desired.serial) and done
        if self.after_pass is not None:
            done = self.after_pass(self.trusted) and done
        return done

    def _reconcile_slot(self, slot_name: str, slot: Slot, serial: int) -> bool:
        variant = choose_variant(
            slot,
            self.profile.name,
            self.profile.preferred_format,
            self.profile.preferred_quantization,
            self.available,
        )
        if variant is None:
            self._fail(slot_name, slot.model, slot.version, serial, self._no_variant_reason(slot))
            return True
        current = self.store.current(slot_name)
        if current is not None and current.sha256 == variant.sha256:
            return True
        report = lambda state, reason=None: self.report(  # noqa: E731
            slot_name, state, slot.model, slot.version, serial, reason
        )
        report("downloading")
        try:
            data = self.trusted.fetch_target(variant.target)
        except TrustError as e:
            self._fail(slot_name, slot.model, slot.version, serial, str(e))
            return e.kind != "unavailable"
        report("verifying")
        try:
            spec, model = read_bundle(data)
            if (spec.format, spec.quantization) != (variant.format, variant.quantization):
                raise BundleError(
                    f"bundle is {spec.format}/{spec.quantization}, document says "
                    f"{variant.format}/{variant.quantization}"
                )
        except BundleError as e:
            self._fail(slot_name, slot.model, slot.version, serial, f"bad bundle: {e}")
            return True
        report("staging")
        try:
            runtime = self.open_model(spec, model, threads=self.threads)
            smoke_test(runtime, spec)
        except RuntimeUnavailableError as e:
            # Runtimes are probed without importing them: one that is installed but does not
            # load is found here. Stop offering its format and choose among the others.
            log.warning("slot %s: %s; choosing among the other formats", slot_name, e)
            self.available = [f for f in self.available if f != variant.format]
            return self._reconcile_slot(slot_name, slot, serial)
        except ModelRuntimeError as e:
            self._fail(slot_name, slot.model, slot.version, serial, f"smoke test: {e}")
            return True
        record = ActiveRecord(
            model=slot.model,
            version=slot.version,
            format=variant.format,
            quantization=variant.quantization,
            sha256=variant.sha256,
            target=variant.target,
            serial=serial,
        )
        try:
            self.store.stage(variant.sha256, data)
            self.store.activate(slot_name, record)
        except OSError as e:  # a full disk: the previous model keeps serving; retried later
            self._fail(slot_name, slot.model, slot.version, serial, f"storage: {e}")
            return False
        self.activate(slot_name, LoadedModel(record, spec, runtime))
        older = current is not None and current.model == slot.model and slot.version < current.version
        report("rolled_back" if older else "active")
        self._last_failure.pop(slot_name, None)
        self._last_failure.pop("*", None)
        return True

    def _no_variant_reason(self, slot: Slot) -> str:
        """``no runnable variant for profile P (runtimes …): onnx/int4: unknown quantization; …``."""
        skipped = sorted({
            why for v in slot.variants
            if (why := describe_unrunnable(v, self.profile.name, self.available)) is not None
        })
        formats = ", ".join(self.available) or "none"
        offered = "; ".join(skipped) if skipped else "the slot lists no variants"
        return f"no runnable variant for profile {self.profile.name} (formats {formats}): {offered}"
