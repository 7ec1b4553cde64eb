"""Training scheduler: one batch for due series, insufficient data, failures, reloads, retrain."""

from __future__ import annotations

import logging
import threading

import numpy as np
from prometheus_client import CollectorRegistry

from detector import InsufficientDataError, lead_in_points, min_train_points
from grafana_plugin_backend.service.registry import FAILED, INSUFFICIENT, PENDING, READY, Registry
from grafana_plugin_backend.service.selfmetrics import SelfMetrics
from grafana_plugin_backend.service.trainer import Trainer
from tests.service_fixtures import (
    T0,
    FakeClock,
    FakeFit,
    FakeModel,
    FakeSource,
    FakeStore,
    make_config,
    nan_series,
    seasonal,
)


class Rig:
    def __init__(self, tmp_path, **overrides) -> None:
        self.clock = FakeClock()
        self.cfg = make_config(tmp_path, **overrides)
        self.vae = self.cfg.vae_config()
        self.source = FakeSource(self.clock)
        self.registry = Registry(self.cfg.max_series)
        self.prom = CollectorRegistry()
        self.metrics = SelfMetrics(self.prom)
        self.store = FakeStore()
        self.fit = FakeFit(self.clock)
        self.trained_events = 0

        def on_trained() -> None:
            self.trained_events += 1

        self.trainer = Trainer(self.cfg, self.cfg.queries, self.source, self.registry, self.store,
                               self.metrics, self.vae, clock=self.clock, fit_fn=self.fit,
                               on_trained=on_trained)

    def add(self, labels, fn) -> None:
        self.source.set("metric_a", labels, fn)
        self.registry.upsert("q", labels)

    def sample(self, name, **labels):
        return self.prom.get_sample_value(name, labels)


def test_all_new_series_train_in_one_batch_and_get_lead_in(tmp_path, caplog):
    rig = Rig(tmp_path)
    for i in range(3):
        rig.add({"i": str(i)}, seasonal(seed=i))
    with caplog.at_level(logging.INFO, logger="grafana_plugin_backend.service.trainer"):
        assert rig.trainer.run_once() == 3
    assert rig.fit.calls == [3]
    assert "trained 3/3 series" in caplog.text
    for s in rig.registry.all():
        assert s.state == READY and s.model_origin == "trained" and s.id in rig.store.models
        keep = rig.cfg.keep_points  # the newest keep_scores get scored
        assert s.scored_to == T0 - keep * 60
        assert len(s.buf_ts) == lead_in_points(rig.vae) + keep
    _, start, end, _ = rig.source.calls[0]
    assert end == T0 and start == T0 - 12 * 3600 + 60  # `history` of data, grid-aligned
    assert rig.sample("promvae_models_trained_total") == 3
    assert rig.sample("promvae_training_progress_ratio") == 1.0
    assert rig.trained_events == 1
    assert rig.trainer.run_once() == 0  # nothing due any more


def test_all_nan_series_is_insufficient_data_and_not_fitted(tmp_path):
    rig = Rig(tmp_path)
    rig.add({"i": "nan"}, nan_series)
    rig.add({"i": "ok"}, seasonal())
    rig.trainer.run_once()
    assert rig.fit.calls == [1]
    nan = rig.registry.get_by_labels("q", {"i": "nan"})
    assert nan.state == INSUFFICIENT and nan.model is None
    assert nan.last_error == ""  # waiting for data is not an error ...
    assert rig.sample("promvae_training_errors_total", reason="insufficient_data") == 0
    assert rig.trainer.run_once() == 0  # not retried while nothing changes


def test_insufficient_series_trains_once_enough_points_arrived(tmp_path, caplog):
    """A fresh Prometheus: the log says how much history there really is, how many points
    are missing and when the first score comes; nothing is counted as an error."""
    rig = Rig(tmp_path)
    need = min_train_points(rig.vae)
    start = T0 - (need - 10) * 60
    rig.add({"i": "young"}, lambda t: np.where(t >= start, 5.0 + np.sin(t), np.nan))
    rig.add({"i": "old"}, seasonal())
    with caplog.at_level(logging.INFO, logger="grafana_plugin_backend.service.trainer"):
        rig.trainer.run_once()
    s = rig.registry.get_by_labels("q", {"i": "young"})
    have = need - 9  # from `start` to T0, both included
    assert s.state == INSUFFICIENT and s.last_error == "" and s.observed_estimate == have
    assert (f"{have} of {need} observed points needed ({have} min of history so far); "
            "first score in about 9 min, at 00:09 UTC") in caplog.text
    assert "training 1 series (1 new, 0 retraining) on 12 h of history (history 12h)" \
        in caplog.text  # the old series' real span, not just the configured history
    assert rig.sample("promvae_training_errors_total", reason="insufficient_data") == 0
    rig.clock.advance(20 * 60)
    s.add_points(np.arange(T0 + 60, T0 + 1260, 60.0), np.ones(20))  # what the poller would do
    assert rig.trainer.run_once() == 1
    assert s.state == READY


def test_failed_fit_keeps_the_previous_model(tmp_path):
    rig = Rig(tmp_path, retrain_every="1h")
    rig.add({"i": "a"}, seasonal())
    rig.add({"i": "b"}, seasonal(level=50.0))
    rig.trainer.run_once()
    old = {s.id: s.model for s in rig.registry.all()}
    rig.fit.fail_if = lambda s: RuntimeError("diverged") if np.nanmean(s.values) > 40 else None
    rig.clock.advance(3601)
    assert rig.trainer.run_once() == 1
    a = rig.registry.get_by_labels("q", {"i": "a"})
    b = rig.registry.get_by_labels("q", {"i": "b"})
    assert a.model is not old[a.id] and a.model.tag == "fit2"
    assert b.model is old[b.id] and b.state == READY  # kept its previous model
    assert b.train_failures == 1 and "diverged" in b.last_error
    assert rig.sample("promvae_training_errors_total", reason="fit") == 1


def test_failed_first_fit_is_failed_state_and_insufficient_error_maps(tmp_path):
    rig = Rig(tmp_path)
    rig.add({"i": "a"}, seasonal())
    rig.add({"i": "b"}, seasonal(level=50.0))
    rig.fit.fail_if = lambda s: (InsufficientDataError("2 windows") if np.nanmean(s.values) > 40
                                 else ValueError("bad"))
    rig.trainer.run_once()
    assert rig.registry.get_by_labels("q", {"i": "a"}).state == FAILED
    assert rig.registry.get_by_labels("q", {"i": "b"}).state == INSUFFICIENT


def test_a_crashing_batch_is_counted_and_nothing_is_lost(tmp_path):
    rig = Rig(tmp_path)
    rig.add({"i": "a"}, seasonal())

    def crash(*args, **kwargs):
        raise MemoryError("out of memory")

    rig.trainer.fit_fn = crash
    assert rig.trainer.run_once() == 0
    assert rig.registry.all()[0].state == FAILED
    assert rig.sample("promvae_training_errors_total", reason="batch") == 1


def test_save_failure_keeps_model_in_memory(tmp_path):
    rig = Rig(tmp_path)
    rig.add({"i": "a"}, seasonal())
    rig.store.fail_save = True
    rig.trainer.run_once()
    s = rig.registry.all()[0]
    assert s.state == READY and not s.stored
    assert rig.sample("promvae_training_errors_total", reason="save") == 1


def test_history_pull_failure_is_retried(tmp_path):
    rig = Rig(tmp_path)
    rig.add({"i": "a"}, seasonal())
    rig.source.fail = "timeout"
    assert rig.trainer.run_once() == 0
    assert rig.registry.all()[0].state == PENDING
    assert rig.sample("promvae_training_errors_total", reason="history") == 1
    rig.source.fail = None
    assert rig.trainer.run_once() == 1


def test_stored_models_load_instead_of_training(tmp_path):
    rig = Rig(tmp_path)
    s = rig.registry.restore("q", {"i": "a"}, scored_to=T0 - 120, last_present=T0 - 120)
    rig.store.models[s.id] = FakeModel(rig.vae, 60.0, T0 - 3600, T0 - 3600)
    broken = rig.registry.restore("q", {"i": "b"}, scored_to=T0, last_present=T0)
    rig.source.set("metric_a", {"i": "b"}, seasonal())
    rig.trainer.run_once()
    assert s.state == READY and s.model_origin == "loaded" and s.scored_to == T0 - 120
    assert broken.state == READY and broken.model_origin == "trained"  # missing file: retrained
    assert rig.fit.calls == [1]
    assert rig.sample("promvae_models_loaded_total") == 1
    assert rig.sample("promvae_training_errors_total", reason="load") == 1


def test_model_with_other_window_is_retrained(tmp_path):
    rig = Rig(tmp_path)
    s = rig.registry.restore("q", {"i": "a"}, scored_to=T0, last_present=T0)
    other = make_config(tmp_path, window=32).vae_config()
    rig.store.models[s.id] = FakeModel(other, 60.0, T0, T0)
    rig.source.set("metric_a", {"i": "a"}, seasonal())
    rig.trainer.run_once()
    assert s.model_origin == "trained" and s.model.config.window == rig.cfg.window


def test_retraining_every_retrain_every(tmp_path):
    rig = Rig(tmp_path, retrain_every="6h")
    rig.add({"i": "a"}, seasonal())
    rig.trainer.run_once()
    rig.clock.advance(3 * 3600)
    assert rig.trainer.run_once() == 0
    rig.clock.advance(3 * 3600)
    assert rig.trainer.run_once() == 1
    assert rig.fit.calls == [1, 1]


def test_shutdown_cancels_a_running_batch(tmp_path):
    rig = Rig(tmp_path)
    rig.add({"i": "a"}, seasonal())
    rig.add({"i": "b"}, seasonal())
    stop = threading.Event()

    def slow_fit(series, step, config, progress=None):
        stop.set()  # shutdown arrives mid-training
        progress(1, len(series))
        raise AssertionError("progress should have cancelled the batch")

    rig.trainer.fit_fn = slow_fit
    rig.trainer.run(stop)  # returns instead of hanging
    assert all(s.state == PENDING for s in rig.registry.all())


def test_an_early_retrain_comes_at_once_and_keeps_the_schedule(tmp_path):
    rig = Rig(tmp_path, retrain_every="6h")
    rig.add({"i": "a"}, seasonal())
    rig.trainer.run_once()
    (s,) = rig.registry.all()
    rig.clock.advance(2 * 3600)
    assert rig.trainer.run_once() == 0
    s.adapt_requested = True  # the poller saw a change that stays
    assert rig.trainer.run_once() == 1 and not s.adapt_requested
    rig.clock.advance(4 * 3600)  # 6 h after the regular training, 4 h after the early one
    assert rig.trainer.run_once() == 1
    assert rig.fit.calls == [1, 1, 1]
