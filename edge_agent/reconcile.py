"""Converge what the agent runs on what the trainer's TUF repository asks for.

One :meth:`Reconciler.reconcile` pass: TUF refresh → the agent's own deployment document,
else its group's → per slot, the variant for this profile and runtimes → download (verified
by TUF) → read the bundle → open it in its runtime and smoke-test the golden vectors →
activate atomically; then each slot's optional shadow candidate, through the very same steps,
handed to the serving loop to run beside the slot's model (a slot without one has its shadow
removed). Any failure keeps the previous model serving and is reported as
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
    Variant,
    agent_target,
    choose_variant,
    decode_deployment,
    describe_unrunnable,
    group_target,
)
from shared.profiles import FirmwareProfile

__all__ = ["LoadedModel", "OpenModel", "Reconciler", "Repository", "load_active", "load_shadow"]

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
    loaded = _load_stored(store, store.current(slot), slot, "model", threads, open_model)
    return loaded if isinstance(loaded, LoadedModel) else None


def load_shadow(store: ActivationStore, slot: str, threads: int, *,
                open_model: OpenModel = open_runtime) -> LoadedModel | str | None:
    """Open the slot's stored shadow candidate (at start-up); ``None`` if there is none, the
    reason (a string) if it does not load."""
    return _load_stored(store, store.shadow(slot), slot, "shadow", threads, open_model)


def _load_stored(store: ActivationStore, record: ActiveRecord | None, slot: str, role: str, threads: int,
                 open_model: OpenModel) -> LoadedModel | str | None:
    if record is None:
        return None
    try:
        spec, model = read_bundle(store.bundle_path(record.sha256).read_bytes())
        runtime = open_model(spec, model, threads=threads)
        smoke_test(runtime, spec)
    except (OSError, BundleError, ModelRuntimeError) as e:
        log.error("slot %s: stored %s %s@%s does not load: %s", slot, role, record.model, record.version, e)
        return f"stored bundle does not load: {e}"
    return LoadedModel(record, spec, runtime)


def _record(slot: Slot, variant: Variant, serial: int) -> ActiveRecord:
    return ActiveRecord(
        model=slot.model,
        version=slot.version,
        format=variant.format,
        quantization=variant.quantization,
        sha256=variant.sha256,
        target=variant.target,
        serial=serial,
    )


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
        shadow: Callable[[str, LoadedModel | None], None] | None = None,
        report_shadow: Report | None = None,
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
        # Shadow candidates (optional: without ``shadow`` a document's shadow entries are
        # ignored): ``shadow(slot, loaded)`` installs one beside the slot's model, ``None``
        # unloads it; ``report_shadow`` reports its states (role ``shadow``).
        self.shadow = shadow
        self.report_shadow = report_shadow if report_shadow is not None else report
        self._last_failure: dict[str, str] = {}  # slot → the failure last reported for it
        # slot → the shadow (model, version) whose failure is on record: withdrawn, it is
        # reported ``removed`` even if nothing was ever installed (the agent's health drops it)
        self._shadow_failed: dict[str, tuple[str, int]] = {}
        # (slot, model, version, serial, reason) of stored shadows that did not load at
        # start-up: reported at the start of the next pass (when the broker is connected)
        self._unreported: list[tuple[str, str, int, int, str]] = []

    def stored_shadow_failed(self, slot: str, record: ActiveRecord, reason: str) -> None:
        """The slot's stored shadow ``record`` did not load at start-up (and was taken out of
        the store): report it ``failed`` at the start of the next pass. That pass downloads it
        again if the document still names it; a failure then is reported once per document
        serial, like any other."""
        self._unreported.append((slot, record.model, record.version, record.serial, reason))

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
        unreported, self._unreported = self._unreported, []
        for failed_slot, model, version, serial, reason in unreported:
            self._shadow_failed[failed_slot] = (model, version)
            self.report_shadow(failed_slot, "failed", model, version, serial, reason)
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
            if self.shadow is not None:
                # After the serving models: a shadow never delays them. A slot the document
                # no longer names, or names without a shadow, has its shadow removed.
                # (and a slot with a failed shadow on record: withdrawn, the failure is cleared)
                named = set(desired.slots) | {s for s, _ in self.store.shadows()} | set(self._shadow_failed)
                for slot_name in sorted(named):
                    slot_or_none = desired.slots.get(slot_name)
                    entry = slot_or_none.shadow if slot_or_none is not None else None
                    done = self._reconcile_shadow(slot_name, entry, desired.serial) and done
        if self.after_pass is not None:
            done = self.after_pass(self.trusted) and done
        return done

    def _reconcile_slot(self, slot_name: str, slot: Slot, serial: int) -> bool:
        variant = self._choose(slot)
        if variant is None:
            self._fail(slot_name, slot.model, slot.version, serial, self._no_variant_reason(slot))
            return True
        current = self.store.current(slot_name)
        if current is not None and current.sha256 == variant.sha256:
            return True
        report = lambda state, reason=None: self.report(  # noqa: E731
            slot_name, state, slot.model, slot.version, serial, reason
        )
        fail = lambda reason: self._fail(  # noqa: E731
            slot_name, slot.model, slot.version, serial, reason
        )
        opened = self._open_variant(slot_name, variant, report, fail)
        if opened is None:  # that runtime does not load: choose among the other formats
            return self._reconcile_slot(slot_name, slot, serial)
        if isinstance(opened, bool):
            return opened
        data, spec, runtime = opened
        record = _record(slot, variant, serial)
        try:
            self.store.stage(variant.sha256, data)
            self.store.activate(slot_name, record)
        except OSError as e:  # a full disk: the previous model keeps serving; retried later
            fail(f"storage: {e}")
            return False
        self.activate(slot_name, LoadedModel(record, spec, runtime))
        older = current is not None and current.model == slot.model and slot.version < current.version
        report("rolled_back" if older else "active")
        self._last_failure.pop(slot_name, None)
        self._last_failure.pop("*", None)
        return True

    def _reconcile_shadow(self, slot_name: str, shadow: Slot | None, serial: int) -> bool:
        """Converge the slot's shadow candidate exactly as a serving model (same TUF
        verification, same smoke test), but hand it to :attr:`shadow`; a shadow that fails is
        reported ``failed`` with role ``shadow`` and the serving model is not touched."""
        assert self.shadow is not None and self.report_shadow is not None
        key = f"{slot_name}#shadow"
        current = self.store.shadow(slot_name)
        if shadow is None:
            self._last_failure.pop(key, None)
            failed = self._shadow_failed.pop(slot_name, None)
            if current is None:
                if failed is not None:  # nothing installed, but a failure on record: clear it
                    self.report_shadow(slot_name, "removed", failed[0], failed[1], serial, None)
                return True
            try:
                self.store.set_shadow(slot_name, None)
            except OSError as e:  # retried later; the shadow keeps running meanwhile
                log.warning("slot %s: cannot remove shadow %s@%s: %s", slot_name, current.model,
                            current.version, e)
                return False
            self.shadow(slot_name, None)
            self.report_shadow(slot_name, "removed", current.model, current.version, serial, None)
            return True
        report = lambda state, reason=None: self.report_shadow(  # noqa: E731
            slot_name, state, shadow.model, shadow.version, serial, reason
        )

        def fail(reason: str) -> None:
            key_value = f"{shadow.model}|{shadow.version}|{serial}|{reason}"
            if self._last_failure.get(key) != key_value:  # once, not every refresh
                self._last_failure[key] = key_value
                log.warning("slot %s: shadow %s@%s failed: %s", slot_name, shadow.model,
                            shadow.version, reason)
                self._shadow_failed[slot_name] = (shadow.model, shadow.version)
                report("failed", reason)

        variant = self._choose(shadow)
        if variant is None:
            fail(self._no_variant_reason(shadow))
            return True
        if current is not None and current.sha256 == variant.sha256:
            return True
        opened = self._open_variant(slot_name, variant, report, fail)
        if opened is None:
            return self._reconcile_shadow(slot_name, shadow, serial)
        if isinstance(opened, bool):
            return opened
        data, spec, runtime = opened
        record = _record(shadow, variant, serial)
        try:
            self.store.stage(variant.sha256, data)
            self.store.set_shadow(slot_name, record)
        except OSError as e:
            fail(f"storage: {e}")
            return False
        self.shadow(slot_name, LoadedModel(record, spec, runtime))
        report("active")
        self._last_failure.pop(key, None)
        self._shadow_failed.pop(slot_name, None)
        return True

    def _choose(self, slot: Slot) -> Variant | None:
        return choose_variant(
            slot,
            self.profile.name,
            self.profile.preferred_format,
            self.profile.preferred_quantization,
            self.available,
        )

    def _open_variant(
        self,
        slot_name: str,
        variant: Variant,
        report: Callable[..., None],
        fail: Callable[[str], None],
    ) -> tuple[bytes, BundleSpec, ModelRuntime] | bool | None:
        """Download (verified by TUF), read and smoke-test ``variant``, reporting each step.

        Returns the bundle bytes, spec and opened runtime; or ``None`` when the variant's
        runtime turned out not to load (the caller chooses again among the other formats);
        or, after a failure already reported through ``fail``, whether the pass is done
        (``False``: retry it later)."""
        report("downloading")
        try:
            data = self.trusted.fetch_target(variant.target)
        except TrustError as e:
            fail(str(e))
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
            fail(f"bad bundle: {e}")
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
            return None
        except ModelRuntimeError as e:
            fail(f"smoke test: {e}")
            return True
        return data, spec, runtime

    def _no_variant_reason(self, slot: Slot) -> str:
        """``no runnable variant for profile P (runtimes …): onnx/int4: unknown quantization; …``."""
        skipped = sorted({
            why for v in slot.variants
            if (why := describe_unrunnable(v, self.profile.name, self.available)) is not None
        })
        formats = ", ".join(self.available) or "none"
        offered = "; ".join(skipped) if skipped else "the slot lists no variants"
        return f"no runnable variant for profile {self.profile.name} (formats {formats}): {offered}"
