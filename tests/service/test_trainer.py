"""Training scheduler: one batch for due series, insufficient data, failures, reloads, retrain."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detector import InsufficientDataError, lead_in_points, min_train_points
from detector.deploy import _regular_after, next_regular, retrain_phase
from detector.memory import fit_bytes_per_series
from grafana_plugin_backend.service import trainer as trainer_mod
from grafana_plugin_backend.service.registry import FAILED, INSUFFICIENT, PENDING, READY, Registry
from grafana_plugin_backend.service.selfmetrics import SelfMetrics
from grafana_plugin_backend.service.trainer import Trainer
from grafana_plugin_backend.source.prometheus import only_series
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
    rig.clock.t = max(rig.trainer.regular_due_at(s) for s in rig.registry.all())  # both slots
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
    """At the series' own slot: 0.5 to 1.5 intervals after the first training, then every
    retrain_every at that phase."""
    rig = Rig(tmp_path, retrain_every="6h")
    rig.add({"i": "a"}, seasonal())
    rig.trainer.run_once()
    (s,) = rig.registry.all()
    due = rig.trainer.regular_due_at(s)
    assert due == next_regular(T0, 6 * 3600, retrain_phase(s.id, 6 * 3600))
    assert 3 * 3600 <= due - T0 < 9 * 3600
    rig.clock.t = due - 60
    assert rig.trainer.run_once() == 0
    rig.clock.t = due
    assert rig.trainer.run_once() == 1
    assert rig.trainer.regular_due_at(s) == due + 6 * 3600
    rig.clock.t = due + 6 * 3600 - 60
    assert rig.trainer.run_once() == 0
    rig.clock.t = due + 6 * 3600
    assert rig.trainer.run_once() == 1
    assert rig.fit.calls == [1, 1, 1]


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
    due = rig.trainer.regular_due_at(s)
    rig.clock.t = due - 3600
    assert rig.trainer.run_once() == 0
    s.adapt_requested = True  # the poller saw a change that stays
    assert rig.trainer.run_once() == 1 and not s.adapt_requested
    assert rig.trainer.regular_due_at(s) == due  # the early retrain kept the slot
    rig.clock.t = due  # the regular slot, 1 h after the early retrain
    assert rig.trainer.run_once() == 1
    assert rig.fit.calls == [1, 1, 1]


# --- bounded batches -------------------------------------------------------------------------

def _trained(rig) -> set[str]:
    return {s.labels["i"] for s in rig.registry.all() if s.model is not None}


def test_a_batch_takes_at_most_training_batch_series(tmp_path):
    rig = Rig(tmp_path, training_batch_series=3)
    for i in range(7):
        rig.add({"i": str(i)}, seasonal(seed=i))
    assert rig.trainer.run_once() == 3
    assert rig.sample("promvae_training_queue_series") == 4  # due, not yet trained
    assert rig.trainer._more  # the run loop starts the next batch without waiting
    assert rig.trainer.run_once() == 3
    assert rig.trainer.run_once() == 1
    assert rig.fit.calls == [3, 3, 1]
    assert rig.sample("promvae_training_queue_series") == 0 and not rig.trainer._more
    # First models in discovery order: the first batch took the first three series.
    assert [s.model.tag for s in rig.registry.all()] == ["fit1"] * 3 + ["fit2"] * 3 + ["fit3"]


def test_the_default_cap_comes_from_training_memory(tmp_path, monkeypatch):
    rig = Rig(tmp_path, training_memory="64MiB")
    per = fit_bytes_per_series(rig.vae, 12 * 60)  # history 12h at 60s
    assert rig.trainer.bytes_per_series == per
    assert rig.trainer.batch_cap == 64 * 2**20 // per
    monkeypatch.setattr(trainer_mod, "fit_bytes_per_series", lambda config, points: 3 * 2**20)
    tiny = Rig(tmp_path, training_memory="8MiB")
    assert tiny.trainer.batch_cap == 2
    tiny = Rig(tmp_path, training_memory="1MiB")  # less than one series: still one at a time
    assert tiny.trainer.batch_cap == 1
    for i in range(3):
        tiny.add({"i": str(i)}, seasonal(seed=i))
    tiny.trainer.run_once()
    assert tiny.fit.calls == [1]


def test_fit_bytes_per_series_grows_with_model_and_history(tmp_path):
    from detector import VAEConfig
    base = fit_bytes_per_series(VAEConfig(), 10080)
    assert 1.5e6 < base < 5e6  # the default model, 7 d at 60 s: a few MB, as measured
    assert fit_bytes_per_series(VAEConfig(hidden=(200, 200)), 10080) > base
    assert fit_bytes_per_series(VAEConfig(), 20160) > base


def test_new_series_before_early_retrains_before_regular_ones(tmp_path):
    rig = Rig(tmp_path, training_batch_series=1, retrain_every="6h")
    for name in ("reg_late", "reg_early", "early"):
        rig.add({"i": name}, seasonal())
    for _ in range(3):
        rig.trainer.run_once()
    by = {s.labels["i"]: s for s in rig.registry.all()}
    # Two regular slots, one overdue longer than the other, and one early retrain asked for.
    rig.clock.t = max(rig.trainer.regular_due_at(s) for s in by.values()) + 60
    by["reg_late"].regular_at -= 6 * 3600  # its slot was one interval earlier still
    by["early"].regular_at = rig.clock.t - 60  # regular retrain not due ...
    by["early"].adapt_requested = True  # ... but a change that stays asks for one now
    rig.add({"i": "new"}, seasonal())
    order = []
    for _ in range(4):
        before = {k: s.model for k, s in by.items()} | {"new": rig.registry.get_by_labels(
            "q", {"i": "new"}).model}
        assert rig.trainer.run_once() == 1
        now = {s.labels["i"]: s.model for s in rig.registry.all()}
        order += [k for k in now if now[k] is not before[k]]
    assert order == ["new", "early", "reg_late", "reg_early"]


class NarrowingSource(FakeSource):
    """A FakeSource that understands only_series(): answers just the label sets named in
    the expression (as Prometheus does), and records every expression it was asked."""

    narrowable = True

    def query_range(self, expr, start, end, step):
        base = expr.split(") and on(")[0][1:] if expr.startswith("(") else expr
        out = super().query_range(base, start, end, step)
        self.calls[-1] = (expr, start, end, step)
        if base == expr:
            return out
        return [rs for rs in out if f'"i", "{rs.labels["i"]}"' in expr]


def test_a_batch_pulls_only_its_own_series(tmp_path, monkeypatch):
    rig = Rig(tmp_path, training_batch_series=3)
    rig.source = rig.trainer.source = NarrowingSource(rig.clock)
    for i in range(7):
        rig.add({"i": str(i)}, seasonal(seed=i))
    monkeypatch.setattr(trainer_mod, "NARROW_GROUP", 2)  # answers bounded to 2 series each
    assert rig.trainer.run_once() == 3
    asked = [expr for expr, *_ in rig.source.calls]
    assert asked == [only_series("metric_a", [{"i": "0"}, {"i": "1"}]),
                     only_series("metric_a", [{"i": "2"}])]
    assert _trained(rig) == {"0", "1", "2"}
    _, start, end, _ = rig.source.calls[0]
    assert end - start == 12 * 3600 - 60  # `history`, whatever the batch


def test_a_source_that_cannot_narrow_is_filtered_here(tmp_path):
    rig = Rig(tmp_path, training_batch_series=2)
    for i in range(4):
        rig.add({"i": str(i)}, seasonal(seed=i))
    assert not getattr(rig.source, "narrowable", False)
    assert rig.trainer.run_once() == 2
    assert [expr for expr, *_ in rig.source.calls] == ["metric_a"]  # the whole query ...
    assert _trained(rig) == {"0", "1"}  # ... and only the batch's series trained


def test_a_batch_holding_every_series_of_a_query_pulls_it_whole(tmp_path):
    rig = Rig(tmp_path)
    rig.source = rig.trainer.source = NarrowingSource(rig.clock)
    for i in range(3):
        rig.add({"i": str(i)}, seasonal(seed=i))
    assert rig.trainer.run_once() == 3
    assert [expr for expr, *_ in rig.source.calls] == ["metric_a"]


def test_retrain_slots_of_series_trained_together_spread_and_survive_a_restart(tmp_path):
    rig = Rig(tmp_path, retrain_every="6h")
    for i in range(40):
        rig.add({"i": str(i)}, seasonal(seed=i))
    assert rig.trainer.run_once() == 40
    slots = sorted(rig.trainer.regular_due_at(s) for s in rig.registry.all())
    assert all(3 * 3600 <= t - T0 < 9 * 3600 for t in slots)
    assert slots[-1] - slots[0] > 4 * 3600  # spread over the interval, not one instant
    # A tick every minute for the next 9 h: no batch holds more than a few of them.
    while rig.clock() < T0 + 9 * 3600:
        rig.clock.advance(60)
        rig.trainer.run_once()
    again_due = sum(1 for t in slots if t + 6 * 3600 <= T0 + 9 * 3600)
    assert sum(rig.fit.calls[1:]) == 40 + again_due and max(rig.fit.calls[1:]) <= 5
    # A restart: a new trainer, the models loaded (regular_at unknown, trained_at kept).
    again = Trainer(rig.cfg, rig.cfg.queries, rig.source, rig.registry, rig.store, rig.metrics,
                    rig.vae, clock=rig.clock, fit_fn=rig.fit)
    for s in rig.registry.all():
        due = rig.trainer.regular_due_at(s)
        s.regular_at = float("nan")
        assert again.regular_due_at(s) == due


def test_the_service_schedule_is_the_replayed_one(tmp_path):
    """detector.deploy replays the service: the same retrain times for the same phase."""
    rig = Rig(tmp_path, retrain_every="6h")
    rig.add({"i": "a"}, seasonal())
    rig.trainer.run_once()
    (s,) = rig.registry.all()
    took_over = []
    while rig.clock() < T0 + 3 * 86400:
        rig.clock.advance(60)
        if rig.trainer.run_once():
            took_over.append(rig.clock())
    grid = T0 + 60.0 * np.arange(3 * 1440 + 1)
    replay = _regular_after(grid, 0, 6 * 3600, retrain_phase(s.id, 6 * 3600))
    assert took_over == [float(grid[j]) for j in replay] and len(took_over) >= 11


def test_queue_gauge_counts_down_during_a_batch(tmp_path):
    rig = Rig(tmp_path, training_batch_series=4)
    for i in range(6):
        rig.add({"i": str(i)}, seasonal(seed=i))
    seen = []
    fit = rig.fit

    def watching(series, step, config, progress=None):
        def spy(done, total):
            progress(done, total)
            seen.append(rig.sample("promvae_training_queue_series"))
        return fit(series, step, config, progress=spy)

    rig.trainer.fit_fn = watching
    rig.trainer.run_once()
    assert seen == [5, 4, 3, 2]  # 6 due: each finished model leaves the queue
    assert rig.sample("promvae_training_queue_series") == 2


def test_readme_says_what_ready_means_during_a_long_first_training():
    from pathlib import Path
    text = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    assert "promvae_training_queue_series" in text
    assert "`/-/ready` answers 503 until every series discovered" in text
    assert "training_batch_series" in text and "training_memory" in text


def test_training_memory_takes_sizes_and_refuses_nonsense(tmp_path):
    from grafana_plugin_backend.config.base import ConfigError
    assert make_config(tmp_path, training_memory="1.5GiB").training_memory == 3 * 2**29
    assert make_config(tmp_path, training_memory=2**30).training_memory == 2**30
    assert make_config(tmp_path).training_memory == 2 * 2**30  # the documented default
    for bad, why in (("lots", "not a size"), ("1KiB", "at least 1MiB")):
        with pytest.raises(ConfigError, match=f"training_memory: .*{why}"):
            make_config(tmp_path, training_memory=bad)
    with pytest.raises(ConfigError, match="training_batch_series"):
        make_config(tmp_path, training_batch_series=-1)


def test_the_backtest_command_replays_the_service_slots(monkeypatch):
    from grafana_plugin_backend import backtest as cmd
    from grafana_plugin_backend.config.settings import load_config
    from grafana_plugin_backend.service.registry import series_id
    from grafana_plugin_backend.source.demo import DemoSource

    seen = {}

    class Stop(Exception):
        pass

    def spy(grids, steps, start, config, deployment, log=None, warmup=None, phases=None):
        seen["phases"] = phases
        raise Stop

    monkeypatch.setattr(cmd, "backtest_range", spy)
    cfg = load_config(None, environ={}, overrides={"retrain_every": "6h", "history": "1d"})
    query = cmd.pick_query(cfg, "cpu_busy", None)
    source = DemoSource()
    with pytest.raises(Stop):
        cmd.run(cfg, source, query, source.t0 - 2 * 86400.0, source.t0)
    found = sorted(source.query_range(query.expr, source.t0 - 3 * 86400.0, source.t0, cfg.step),
                   key=lambda rs: cmd.series_name(rs.labels))
    assert seen["phases"] == [retrain_phase(series_id(query.name, rs.labels), 6 * 3600.0)
                              for rs in found]


def test_a_short_retrain_every_retrains_every_series_at_its_slot(tmp_path):
    # A slot may come half an interval after a training; the retry delay after an attempt
    # must not hold it back (or the service leaves the schedule the backtest replays).
    rig = Rig(tmp_path, retrain_every="1h")
    for i in range(30):
        rig.add({"i": str(i)}, seasonal(seed=i))
    assert rig.trainer.run_once() == 30
    slots = {s.id: rig.trainer.regular_due_at(s) for s in rig.registry.all()}
    assert min(slots.values()) - T0 < 3600  # some slots come before a whole hour has passed
    while rig.clock() < T0 + 1.5 * 3600:
        rig.clock.advance(60)
        rig.trainer.run_once()
        for s in rig.registry.all():
            if rig.clock() >= slots[s.id] + 60:
                assert s.regular_at >= slots[s.id], "retrained late, not at its slot"
