"""Incremental polling: positions, lead-in, catch-up after outages and restarts, TTL, failures."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detector import lead_in_points
from grafana_plugin_backend.service.poller import Poller, grid_floor
from grafana_plugin_backend.service.registry import PENDING, READY, Registry
from grafana_plugin_backend.service.selfmetrics import SelfMetrics
from tests.service_fixtures import (
    T0,
    FakeClock,
    FakeModel,
    FakeSource,
    fake_score_many,
    make_config,
)


class Rig:
    """A poller over a FakeSource with fake models and scoring."""

    def __init__(self, tmp_path, **cfg_overrides) -> None:
        self.clock = FakeClock()
        self.cfg = make_config(tmp_path, **cfg_overrides)
        self.vae = self.cfg.vae_config()
        self.lead_in = lead_in_points(self.vae)
        self.source = FakeSource(self.clock)
        self.registry = Registry(self.cfg.max_series)
        self.prom = CollectorRegistry()
        self.metrics = SelfMetrics(self.prom)
        self.score_calls: list[int] = []

        def score(models, series):
            self.score_calls.append(len(models))
            return fake_score_many(models, series)

        self.poller = Poller(self.cfg, self.cfg.queries, self.source, self.registry, self.metrics,
                             self.vae, clock=self.clock, score_fn=score)

    def make_ready(self) -> None:
        """Give every registered series a model trained up to now."""
        for s in self.registry.all():
            s.model = FakeModel(self.vae, 60.0, self.clock(), self.clock())
            s.state = READY
            s.scored_to = self.clock()

    def sample(self, name: str, **labels: str) -> float | None:
        return self.prom.get_sample_value(name, labels)


def level(v: float):
    return lambda t: np.full(len(t), v)


def test_first_poll_discovers_series_then_polls_incrementally(tmp_path):
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, level(3.0))
    rig.source.set("metric_a", {"instance": "b", "job": "x"}, level(4.0))
    assert rig.poller.poll_once()
    assert len(rig.registry) == 2
    assert all(s.state == PENDING for s in rig.registry.all())
    _, start, end, step = rig.source.calls[-1]
    assert (end, step) == (T0, 60.0) and start == T0 - rig.lead_in * 60
    rig.clock.advance(150)
    rig.poller.poll_once()
    _, start, end, _ = rig.source.calls[-1]
    assert (start, end) == (T0 + 60, T0 + 120)  # only the new points
    assert rig.sample("promvae_last_successful_poll_timestamp_seconds") == T0 + 150


def test_ready_series_score_new_points_in_one_batch(tmp_path):
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, level(3.0))
    rig.source.set("metric_a", {"instance": "b"}, level(25.0))
    rig.poller.poll_once()
    rig.make_ready()
    rig.clock.advance(180)
    rig.poller.poll_once()
    assert rig.score_calls == [2]  # one batched call for both series
    a = rig.registry.get_by_labels("q", {"instance": "a"})
    b = rig.registry.get_by_labels("q", {"instance": "b"})
    assert list(a.recent["timestamp"]) == [T0 + 60, T0 + 120, T0 + 180]
    assert a.last_result()["score"] == pytest.approx(0.3)  # lead-in was supplied: no NaN
    assert b.last_result()["flag"] == 1.0
    assert a.scored_to == T0 + 180
    assert rig.sample("promvae_points_scored_total") == 6
    rig.poller.poll_once()  # nothing new: nothing scored again
    assert rig.score_calls == [2]


def test_outage_keeps_state_counts_errors_and_catches_up(tmp_path):
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, lambda t: t - T0)
    rig.poller.poll_once()
    rig.make_ready()
    rig.clock.advance(60)
    rig.poller.poll_once()
    before = rig.registry.all()[0].last_result()
    rig.source.fail = "connection"
    for _ in range(3):
        rig.clock.advance(60)
        assert not rig.poller.poll_once()
    assert rig.sample("promvae_poll_errors_total", reason="connection") == 3
    assert rig.registry.all()[0].last_result() == before  # last good state kept
    assert rig.registry.positions["q"] == T0 + 60
    rig.source.fail = None
    rig.clock.advance(60)
    assert rig.poller.poll_once()
    s = rig.registry.all()[0]
    assert list(s.recent["timestamp"]) == [T0 + 60 * k for k in range(1, 6)]  # missed points
    assert s.last_result()["observed"] == 300.0


def test_restart_recovers_position_and_scores_missed_points(tmp_path):
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, lambda t: (t - T0) / 60)
    s = rig.registry.restore("q", {"instance": "a"}, scored_to=T0 - 600, last_present=T0 - 600)
    s.model, s.state = FakeModel(rig.vae, 60.0, T0 - 3600, T0 - 3600), READY
    s.model_origin = "loaded"
    rig.registry.positions["q"] = T0 - 600
    rig.poller.poll_once()
    _, start, _, _ = rig.source.calls[-1]
    assert start == T0 - 600 - rig.lead_in * 60  # lead-in for the first missed point
    # The missed points, and the last one scored before the restart (nothing was exposed).
    assert list(s.recent["timestamp"]) == [T0 - 600 + 60 * k for k in range(11)]
    assert np.all(np.isfinite(s.recent["score"]))


def test_a_restart_within_the_step_exposes_scores_at_once(tmp_path):
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, level(4.0))
    s = rig.registry.restore("q", {"instance": "a"}, scored_to=T0, last_present=T0)
    s.model, s.state = FakeModel(rig.vae, 60.0, T0 - 3600, T0 - 3600), READY
    s.model_origin = "loaded"
    rig.registry.positions["q"] = T0
    rig.poller.poll_once()  # no new point since the restart
    assert list(s.recent["timestamp"]) == [T0] and s.recent["score"][0] == 0.4
    rig.poller.poll_once()
    assert list(s.recent["timestamp"]) == [T0]  # scored once more, not again and again
    assert rig.score_calls == [1]


def test_catch_up_is_bounded_by_max_catchup(tmp_path):
    rig = Rig(tmp_path, max_catchup="10m")
    rig.source.set("metric_a", {"instance": "a"}, level(1.0))
    rig.registry.positions["q"] = T0 - 86400
    rig.poller.poll_once()
    _, start, _, _ = rig.source.calls[-1]
    assert start == T0 - 600 - rig.lead_in * 60


def test_absent_series_gets_nan_points_and_leaves_after_ttl(tmp_path):
    rig = Rig(tmp_path, series_ttl="5m")
    rig.source.set("metric_a", {"instance": "a"}, level(3.0))
    rig.source.set("metric_a", {"instance": "b"}, level(3.0))
    rig.poller.poll_once()
    rig.make_ready()
    rig.source.remove("metric_a", {"instance": "b"})
    rig.clock.advance(120)
    rig.poller.poll_once()
    b = rig.registry.get_by_labels("q", {"instance": "b"})
    assert math.isnan(b.last_result()["score"])  # missing now: not scored, not exposed
    rig.clock.advance(240)
    rig.poller.poll_once()
    assert rig.registry.get_by_labels("q", {"instance": "b"}) is None
    assert rig.registry.get_by_labels("q", {"instance": "a"}) is not None
    assert b.id in rig.registry.vanished  # it had a model: remembered for retention


def test_a_series_that_breaks_scoring_is_isolated(tmp_path):
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, level(3.0))
    rig.source.set("metric_a", {"instance": "bad"}, level(7.0))
    rig.poller.poll_once()
    rig.make_ready()

    def picky(models, series):
        if any(np.nanmax(s.values) == 7.0 for s in series):
            raise FloatingPointError("boom")
        return fake_score_many(models, series)

    rig.poller.score_fn = picky
    rig.clock.advance(60)
    rig.poller.poll_once()
    good = rig.registry.get_by_labels("q", {"instance": "a"})
    bad = rig.registry.get_by_labels("q", {"instance": "bad"})
    assert good.last_result()["score"] == pytest.approx(0.3)
    assert bad.last_result() is None and bad.scored_to == T0 + 60  # skipped, not retried forever
    assert rig.sample("promvae_poll_errors_total", reason="score") == 1


def test_one_failing_query_does_not_stop_the_others(tmp_path):
    rig = Rig(tmp_path, queries=[{"name": "q1", "expr": "m1"}, {"name": "q2", "expr": "m2"}])

    class Half(FakeSource):
        def query_range(self, expr, start, end, step):
            if expr == "m1":
                raise RuntimeError("unexpected")
            return super().query_range(expr, start, end, step)

    rig.poller.source = src = Half(rig.clock)
    src.set("m2", {"i": "a"}, level(1.0))
    assert not rig.poller.poll_once()
    assert rig.sample("promvae_poll_errors_total", reason="internal") == 1
    assert len(rig.registry.of_query("q2")) == 1


def test_new_series_wake_the_trainer_and_the_loop_stops(tmp_path):
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, level(1.0))
    woken = threading.Event()
    rig.poller.on_new_series = woken.set
    stop = threading.Event()
    t = threading.Thread(target=rig.poller.run, args=(stop,))
    t.start()
    assert woken.wait(10)
    stop.set()
    rig.poller.wake()
    t.join(10)
    assert not t.is_alive()


def test_grid_floor():
    assert grid_floor(119.9, 60) == 60 and grid_floor(120.0, 60) == 120


def test_points_polled_before_a_stored_model_loads_are_scored_after(tmp_path):
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, lambda t: (t - T0) / 60)
    s = rig.registry.restore("q", {"instance": "a"}, scored_to=T0 - 600, last_present=T0 - 600)
    rig.registry.positions["q"] = T0 - 600
    rig.poller.poll_once()  # the trainer has not loaded the model yet
    assert s.last_result() is None
    s.model, s.state = FakeModel(rig.vae, 60.0, T0 - 3600, T0 - 3600), READY
    rig.clock.advance(60)
    rig.poller.poll_once()
    assert list(s.recent["timestamp"]) == [T0 - 600 + 60 * k for k in range(1, 12)]
    assert np.all(np.isfinite(s.recent["score"]))


def test_a_flag_that_stays_for_adapt_after_asks_for_an_early_retrain(tmp_path):
    rig = Rig(tmp_path, adapt_after="10m")
    values = {"v": 3.0}
    rig.source.set("metric_a", {"instance": "a"}, lambda t: np.full(len(t), values["v"]))
    rig.poller.poll_once()
    rig.make_ready()
    (s,) = rig.registry.all()
    for _ in range(5):  # quiet: score 0.3
        rig.clock.advance(60)
        rig.poller.poll_once()
    assert not s.adapt_requested and s.recent["flag"][-1] == 0
    values["v"] = 30.0  # the level moved to score 3 and stays there
    flags = []
    for _ in range(12):
        rig.clock.advance(60)
        rig.poller.poll_once()
        flags.append(s.recent["flag"][-1])
    assert flags[:9] == [1.0] * 9  # an alert while it is new...
    assert s.adapt_requested  # ...and after 10 minutes the series is due for an early retrain
    assert rig.sample("promvae_adaptations_total") == 1.0
    assert s.calibrator.adaptations == 1


def test_the_policy_can_be_turned_off(tmp_path):
    rig = Rig(tmp_path, adapt_after="0s")
    rig.source.set("metric_a", {"instance": "a"}, level(30.0))
    rig.poller.poll_once()
    rig.make_ready()
    for _ in range(20):
        rig.clock.advance(60)
        rig.poller.poll_once()
    (s,) = rig.registry.all()
    assert not s.adapt_requested and s.recent["flag"][-1] == 1.0
    assert rig.sample("promvae_adaptations_total") == 0.0
