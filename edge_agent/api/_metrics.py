"""``GET /metrics``: the agent's health report in Prometheus exposition format.

A :class:`~prometheus_client.CollectorRegistry` per agent (never the library's global
default registry): the figures come from :meth:`AgentView.health` at each scrape — the very
numbers the MQTT health message carries — plus two instruments observed as things happen: the
per-inference duration histogram and the count of windows scored through the API.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge_agent.api._base import AgentView

__all__ = ["AgentMetrics"]

PREFIX = "edgefleet_agent"
# Inference takes tens of microseconds to a few milliseconds on the profiles' models.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)


class _HealthCollector(Collector):
    """Reads the agent's health (and its models and deployments) at each scrape."""

    def __init__(self, agent: AgentView) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Any]:
        agent = self._agent
        h = agent.health(cpu_share=False)
        for name, value, doc in (
            ("inferences", h.inferences, "Windows scored by the streaming detectors."),
            ("anomalies", h.anomalies, "Anomalies the streaming detectors reported."),
            ("errors", h.errors, "Failed inferences."),
            ("outbox_dropped", h.outbox_dropped,
             "Anomaly events dropped (outbox full, refused for good by the broker) or never stored."),
            ("outbox_refused", h.outbox_refused or 0, "Publishes of anomaly events the broker refused."),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        latency = GaugeMetricFamily(
            f"{PREFIX}_inference_latency_milliseconds",
            "Inference latency percentiles over the last inferences (as in the health report).",
            labels=["quantile"])
        for key, quantile in (("p50", "0.5"), ("p99", "0.99")):
            v = h.latency_ms.get(key)
            if isinstance(v, int | float):
                latency.add_metric([quantile], float(v))
        yield latency
        yield GaugeMetricFamily(f"{PREFIX}_outbox_depth", "Anomaly events waiting for delivery.",
                                value=h.outbox_depth)
        if h.rss_mb is not None:
            yield GaugeMetricFamily(f"{PREFIX}_resident_memory_bytes", "Resident memory of the agent.",
                                    value=h.rss_mb * 1e6)
        # A counter rather than the health report's share since its previous report: a
        # scrape must not reset that window, and Prometheus computes the rate itself.
        times = os.times()
        yield CounterMetricFamily(f"{PREFIX}_cpu_seconds", "CPU time (user and system) of the agent.",
                                  value=times.user + times.system)
        age = agent.last_sample_age()
        if age is not None:
            yield GaugeMetricFamily(f"{PREFIX}_last_sample_age_seconds",
                                    "Seconds since the source's last sample.", value=age)
        models = GaugeMetricFamily(f"{PREFIX}_model_info", "The model each slot serves (value 1).",
                                   labels=["slot", "model", "version", "format", "quantization"])
        for slot, (_detector, r) in sorted(agent.serving().items()):
            models.add_metric([slot, r.model, str(r.version), r.format, r.quantization], 1)
        yield models
        deployments = GaugeMetricFamily(
            f"{PREFIX}_deployment_state", "The last deployment state reported per slot (value 1).",
            labels=["slot", "model", "version", "state"])
        for d in agent.deployments():
            deployments.add_metric([d.slot, d.model, str(d.version), d.state], 1)
        yield deployments
        if h.federated is not None and isinstance(h.federated.get("can_join"), bool):
            yield GaugeMetricFamily(f"{PREFIX}_federated_can_join",
                                    "Whether the agent can take part in federated training.",
                                    value=float(h.federated["can_join"]))
        drift = getattr(h, "drift", None)
        if isinstance(drift, Mapping):
            yield from _drift_families(drift)
        shadow = getattr(h, "shadow", None)
        if isinstance(shadow, Mapping):
            yield from _shadow_families(shadow)


def _number(value: Any) -> float | None:
    """A finite JSON number (booleans as 0/1), else ``None``."""
    if isinstance(value, bool | int | float) and math.isfinite(float(value)):
        return float(value)
    return None


def _drift_families(drift: Mapping[str, Any]) -> Iterator[GaugeMetricFamily]:
    """Health ``drift`` (slot → the drift monitor's figures) as gauges per slot and per series
    (``kind="feature"`` for each input, ``kind="score"`` for the model's score). Keys it does
    not know, or that are missing, are skipped."""
    per_slot = {
        key: GaugeMetricFamily(f"{PREFIX}_drift_{key}", doc, labels=["slot"])
        for key, doc in (("available", "Whether the slot's model has a drift monitor."),
                         ("drifted", "Whether the slot's inputs drifted (with hysteresis)."),
                         ("fill", "Samples in the slot's rolling drift window."))
    }
    per_series = {
        key: GaugeMetricFamily(f"{PREFIX}_drift_series_{key}", doc, labels=["slot", "kind", "series"])
        for key, doc in (("psi", "Population stability index of a series against its training reference."),
                         ("ks", "Kolmogorov-Smirnov statistic of a series against its training reference."),
                         ("ks_pvalue", "p-value of that Kolmogorov-Smirnov statistic."),
                         ("drifted", "Whether the series drifted."))
    }
    for slot, entry in sorted(drift.items()):
        if not isinstance(entry, Mapping):
            continue
        for key, family in per_slot.items():
            if (v := _number(entry.get(key))) is not None:
                family.add_metric([str(slot)], v)
        features = entry.get("features")
        series = [("feature", name, figures) for name, figures in sorted(features.items())] \
            if isinstance(features, Mapping) else []
        series.append(("score", "score", entry.get("score")))
        for kind, name, figures in series:
            if not isinstance(figures, Mapping):
                continue
            for key, family in per_series.items():
                if (v := _number(figures.get(key))) is not None:
                    family.add_metric([str(slot), kind, str(name)], v)
    yield from per_slot.values()
    yield from per_series.values()


def _shadow_families(shadow: Mapping[str, Any]) -> Iterator[GaugeMetricFamily]:
    """Health ``shadow`` (slot → the comparison of its shadow candidate with its model) as
    gauges labelled with the slot and the candidate; a figure that is ``null`` (no sample yet,
    an undefined correlation) or missing is skipped. A failed shadow has only ``_info``."""
    labels = ["slot", "model", "version"]
    info = GaugeMetricFamily(f"{PREFIX}_shadow_info",
                             "The shadow candidate each slot runs, by state (value 1).",
                             labels=[*labels, "state"])
    figures = {
        key: GaugeMetricFamily(f"{PREFIX}_shadow_{key}", doc, labels=labels)
        for key, doc in (
            ("samples", "Samples both the slot's model and its shadow scored."),
            ("agreement", "Fraction of those samples where both decisions agree."),
            ("active_only", "Alarms only the slot's serving model raised."),
            ("shadow_only", "Alarms only the shadow candidate raised."),
            ("correlation", "Pearson correlation of the two models' raw scores."),
            ("errors", "Failed shadow inferences."))
    }
    latency = GaugeMetricFamily(f"{PREFIX}_shadow_latency_milliseconds",
                                "Shadow inference latency percentiles over its last inferences.",
                                labels=[*labels, "quantile"])
    for slot, entry in sorted(shadow.items()):
        if not isinstance(entry, Mapping):
            continue
        key = [str(slot), str(entry.get("model")), str(entry.get("version"))]
        info.add_metric([*key, str(entry.get("state", "active"))], 1)
        for name, family in figures.items():
            if (v := _number(entry.get(name))) is not None:
                family.add_metric(key, v)
        lat = entry.get("latency_ms")
        if isinstance(lat, Mapping):
            for q, quantile in (("p50", "0.5"), ("p99", "0.99")):
                if (v := _number(lat.get(q))) is not None:
                    latency.add_metric([*key, quantile], v)
    yield info
    yield from figures.values()
    yield latency


class AgentMetrics:
    """The per-agent registry and its instruments. Thread safe (prometheus_client's own locks)."""

    def __init__(self, agent: AgentView) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_HealthCollector(agent))
        self.inference_seconds = Histogram(
            f"{PREFIX}_inference_duration_seconds", "Duration of each streaming inference.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.api_windows = Counter(
            f"{PREFIX}_api_predicted_windows", "Windows scored through the local API.",
            registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the text exposition format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
