"""promvae_* self-metrics: the instruments the poller and the trainer update as they work.

They live in the service layer, beside the code that counts, so neither the poller nor the
trainer needs the web layer; web/exposition.py registers and serves them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.lock_held = Histogram(
            "promvae_registry_lock_held_seconds",
            "Total time one poll held the registry lock (lookups, snapshot, publishing "
            "results); /metrics and queries wait for it meanwhile.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r)
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
        self.training_queue = Gauge("promvae_training_queue_series",
                                    "Series due for training and not yet trained, the running "
                                    "batch's unfinished ones included (0 when all are trained).",
                                    registry=r)
        self.adaptations = Counter("promvae_adaptations_total",
                                   "Flags up for adapt_after, taken as the series' new normal "
                                   "(each retrains the series early).", registry=r)
        self.last_training = Gauge("promvae_last_successful_training_timestamp_seconds",
                                   "Unix time the last training batch finished.", registry=r)
        self.query_series = Gauge("promvae_query_series", "Series the last successful poll "
                                  "of each query returned (0: the query selects nothing).",
                                  ["anomaly_query"], registry=r)
        for reason in POLL_ERROR_REASONS:
            self.poll_errors.labels(reason)
        for reason in TRAINING_ERROR_REASONS:
            self.training_errors.labels(reason)
        self.training_progress.set(1.0)
