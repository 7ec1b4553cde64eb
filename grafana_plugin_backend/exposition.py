"""GET /metrics: anomaly_* from current state (custom collector) plus promvae_* self-metrics."""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator

from flask import Blueprint, Response, current_app
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import __version__
from .state import STATES, Registry

ANOMALY_METRICS = {
    "anomaly_score": ("score", ("Anomaly score normalised by the learned threshold: "
                               "1.0 = at threshold, above 1 = anomalous.")),
    "anomaly_flag": ("flag", "1 while the series is judged anomalous (score >= 1, debounced)."),
    "anomaly_expected": ("expected", "Expected value of the source series, in its own units."),
    "anomaly_lower": ("lower", "Lower edge of the expected band, in source units."),
    "anomaly_upper": ("upper", "Upper edge of the expected band, in source units."),
    "anomaly_observed": ("observed", "The source value the score was computed on."),
}
POLL_ERROR_REASONS = ("connection", "timeout", "http", "http_5xx", "bad_query", "bad_response",
                      "too_large", "auth", "score", "internal")
TRAINING_ERROR_REASONS = ("insufficient_data", "fit", "batch", "history", "save", "load")
DROP_REASONS = ("max_series", "duplicate_labels")


class SelfMetrics:
    """promvae_* instruments, registered in the app's own CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.poll_duration = Histogram(
            "promvae_poll_duration_seconds", "Duration of one poll of all queries (incl. scoring).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.poll_errors = Counter("promvae_poll_errors_total",
                                   "Failed polls or scoring passes by reason.", ["reason"],
                                   registry=r)
        self.last_poll = Gauge("promvae_last_successful_poll_timestamp_seconds",
                               "Unix time of the last poll in which every query succeeded.",
                               registry=r)
        self.points_scored = Counter("promvae_points_scored_total",
                                     "Points scored by the live poller (incl. catch-up).",
                                     registry=r)
        self.training_duration = Histogram(
            "promvae_training_duration_seconds", "Duration of one training batch (fit and save).",
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.training_errors = Counter("promvae_training_errors_total",
                                       "Series whose training, saving or loading failed.",
                                       ["reason"], registry=r)
        self.models_trained = Counter("promvae_models_trained_total",
                                      "Models trained (first training and retraining).", registry=r)
        self.models_loaded = Counter("promvae_models_loaded_total",
                                     "Models loaded from the storage path.", registry=r)
        self.training_progress = Gauge("promvae_training_progress_ratio",
                                       "Progress of the running training batch (0-1; 1 when idle).",
                                       registry=r)
        self.training_batch = Gauge("promvae_training_batch_series",
                                    "Series in the running training batch (0 when idle).",
                                    registry=r)
        self.adaptations = Counter("promvae_adaptations_total",
                                   "Flags up for adapt_after, taken as the series' new normal "
                                   "(each retrains the series early).", registry=r)
        self.last_training = Gauge("promvae_last_successful_training_timestamp_seconds",
                                   "Unix time the last training batch finished.", registry=r)
        for reason in POLL_ERROR_REASONS:
            self.poll_errors.labels(reason)
        for reason in TRAINING_ERROR_REASONS:
            self.training_errors.labels(reason)
        self.training_progress.set(1.0)


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
