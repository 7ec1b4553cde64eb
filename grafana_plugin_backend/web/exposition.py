"""GET /metrics: anomaly_* from current state (custom collector) plus promvae_* self-metrics."""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator

from flask import Blueprint, Response, current_app
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import __version__
from ..service.registry import ANOMALY_METRICS, STATES, Registry
from ..service.selfmetrics import DROP_REASONS, SelfMetrics


class StateCollector:
    """Builds anomaly_* and state-derived promvae_* families from the registry at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        families = {name: GaugeMetricFamily(name, doc)
                    for name, (_, doc) in ANOMALY_METRICS.items()}
        with self._registry.lock:
            rows = [(s.exposed, s.last_result()) for s in self._registry.all()]
            counts = self._registry.counts_by_state()
            dropped = dict(self._registry.dropped)
        for labels, last in rows:
            if last is None or math.isnan(last["score"]):
                continue  # never expose a NaN score: the series cannot be scored right now
            for name, (key, _) in ANOMALY_METRICS.items():
                value = last[key]
                if not math.isnan(value):
                    families[name].add_sample(name, labels, value)
        yield from families.values()
        models = GaugeMetricFamily("promvae_models", "Series by model state.", labels=["state"])
        for state in STATES:
            models.add_metric([state], counts.get(state, 0))
        yield models
        drops = CounterMetricFamily("promvae_series_dropped",
                                    "Series not tracked, by reason (each series counted once).",
                                    labels=["reason"])
        for reason in sorted(set(DROP_REASONS) | set(dropped)):
            drops.add_metric([reason], dropped.get(reason, 0))
        yield drops
        info = GaugeMetricFamily("promvae_build_info", "promvae build information.",
                                 labels=["version", "python_version"])
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


def build_registry(state: Registry) -> tuple[CollectorRegistry, SelfMetrics]:
    """A fresh CollectorRegistry with the state collector, self-metrics and process metrics."""
    disable_created_metrics()  # *_created samples are noise for a scrape target like this
    reg = CollectorRegistry(auto_describe=False)
    metrics = SelfMetrics(reg)
    reg.register(StateCollector(state))
    ProcessCollector(registry=reg)
    return reg, metrics


bp = Blueprint("exposition", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    registry = current_app.extensions["promvae"].metrics_registry
    return Response(generate_latest(registry), mimetype=None,
                    headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
