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


def test_a_fleet_refits_its_thresholds_spread_over_the_hour(tmp_path, monkeypatch):
    """Each series' streaming threshold refits hourly at the phase of its id (as the backtest
    replays it), not all in the poll on the hour: 0.2 ms a refit, 2 s at 10,000 series."""
    from detector.calibration import Calibrator

    rig = Rig(tmp_path)
    for i in range(40):
        rig.source.set("metric_a", {"instance": f"i{i}"}, level(3.0))
    rig.poller.poll_once()
    rig.make_ready()
    rig.clock.advance(60)
    rig.poller.poll_once()  # the first scoring feeds the lead-in too
    per_poll = [0]
    real = Calibrator._refit

    def counted(self):
        per_poll[-1] += 1
        real(self)

    monkeypatch.setattr(Calibrator, "_refit", counted)
    for _ in range(120):  # two hours of polls
        rig.clock.advance(60)
        per_poll.append(0)
        assert rig.poller.poll_once()
    assert sum(per_poll) == 80  # each series once an hour
    assert max(per_poll) <= 8  # 40 at once without phases
    phases = {s.calibrator.phase for s in rig.registry.all()}
    assert len(phases) >= 20 and all(p % 60 == 0 and 0 <= p < 3600 for p in phases)


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


# ---- the serving path: bank, incremental scoring, lock ----------------------------------

def random_model(vae, seed: int, trained_to: float):
    """A real SeriesModel with random weights (no training), for the real scoring path."""
    from detector.fitted import SeriesModel
    from detector.model import init_params

    rng = np.random.default_rng(seed)
    return SeriesModel(vae, init_params(vae, [seed]), 60.0, center=float(rng.uniform(0, 5)),
                       scale=float(rng.uniform(0.5, 2)), threshold_=3.0, baseline_=0.0,
                       threshold_method="spot", seed=seed, trained_from=trained_to - 3600,
                       trained_to=trained_to, trained_at=trained_to,
                       n_train=100, scale_stats=[(0.0, 1.0)] * len(vae.score_scales))


def noisy(seed: int, gaps: bool = True):
    """A wavy series with hashed noise and, optionally, missing points and a long gap."""
    def fn(t):
        h = np.sin(t * 12.9898 + seed * 78.233) * 43758.5453
        v = 3 + np.sin(t / 900 + seed) + (h - np.floor(h))
        if gaps:
            v[(h - np.floor(h)) < 0.08] = np.nan
            v[(t >= T0 + 1800) & (t < T0 + 2400)] = np.nan
        return v
    return fn


class Twins:
    """Two pollers over identical sources and registries with the same real models: one
    serves from the bank (incremental), the other scores the full lead-in with score_many."""

    def __init__(self, tmp_path, n: int = 4) -> None:
        from detector import score_many

        self.inc = Rig(tmp_path / "inc")
        self.full = Rig(tmp_path / "full")
        self.inc.poller.score_fn = score_many  # the default: the bank
        self.full.poller.score_fn = lambda m, s: score_many(m, s)  # another fn: full lead-in
        for rig in (self.inc, self.full):
            rig.clock.t = T0 - 7200
            for i in range(n):
                rig.source.set("metric_a", {"instance": f"i{i}"}, noisy(i, gaps=i != 0))
            rig.poller.poll_once()
            for s in rig.registry.all():
                s.model = self.model(rig, int(s.labels["instance"][1:]))
                s.state, s.scored_to, s.model_origin = READY, rig.clock() - 600, "trained"

    def model(self, rig: Rig, seed: int):
        """The bank stores weights in float16: the full-lead-in twin gets the same weights."""
        m = random_model(rig.vae, seed, rig.clock())
        if rig is self.full:
            m.params = {k: v.half().float() for k, v in m.params.items()}
        return m

    def poll(self, seconds: float = 60) -> None:
        for rig in (self.inc, self.full):
            rig.clock.advance(seconds)
            assert rig.poller.poll_once()

    def assert_same(self) -> None:
        for a in self.inc.registry.all():
            b = self.full.registry.get(a.id)
            assert a.recent.keys() == b.recent.keys()
            np.testing.assert_array_equal(a.recent["timestamp"], b.recent["timestamp"])
            for k in a.recent:
                np.testing.assert_array_equal(np.isnan(a.recent[k]), np.isnan(b.recent[k]), err_msg=k)
                np.testing.assert_allclose(a.recent[k], b.recent[k], rtol=1e-5, atol=1e-6, err_msg=k)
            assert a.scored_to == b.scored_to


def test_the_bank_scores_incrementally_what_the_full_lead_in_scores(tmp_path):
    tw = Twins(tmp_path)
    tw.poll()  # first scoring: ten missed points, on the full lead-in
    tw.assert_same()
    calls = []
    real = tw.inc.poller.bank.score

    def counting(jobs):
        res = real(jobs)
        calls.append([len(r.timestamps) for r in res])
        return res

    tw.inc.poller.bank.score = counting
    for _ in range(40):  # through the gap and out of it
        tw.poll()
        tw.assert_same()
    assert all(n == [1] * 4 for n in calls[1:])  # one new row per series per poll
    tw.poll(600)  # an outage: ten points at once
    tw.assert_same()
    # Ten new rows each; a series whose first missed points are missing in the source starts
    # its lead-in later than the cached windows and is scored in full (same results).
    assert calls[-1][0] == 10 and all(n == 10 or n > tw.inc.lead_in for n in calls[-1])
    scores = np.concatenate([s.recent["score"] for s in tw.inc.registry.all()])
    assert np.isfinite(scores).sum() > 100


def test_a_retrained_model_replaces_the_bank_slot_and_its_cache(tmp_path):
    tw = Twins(tmp_path, n=2)
    tw.poll()
    tw.poll()
    bank = tw.inc.poller.bank
    s = tw.inc.registry.get_by_labels("q", {"instance": "i1"})
    old = s.model
    for rig in (tw.inc, tw.full):
        rig.registry.get(s.id).model = tw.model(rig, 77)  # what Trainer._install does
    assert bank.model(s.id) is old
    tw.poll()
    assert bank.model(s.id) is s.model
    assert old.params["enc0.w"].untyped_storage().data_ptr() != \
        s.model.params["enc0.w"].untyped_storage().data_ptr()  # the old one keeps a copy
    tw.assert_same()
    for _ in range(3):
        tw.poll()
        tw.assert_same()
    # A series that leaves the registry leaves the bank.
    tw.inc.registry.remove(s.id, T0)
    tw.poll()
    assert s.id not in bank and len(bank) == 1


def test_a_restart_scores_the_full_lead_in_then_goes_incremental(tmp_path):
    tw = Twins(tmp_path, n=2)
    tw.poll()
    tw.poll()
    p = tw.inc.poller  # a new process: same registry state, empty bank
    tw.inc.poller = Poller(p.cfg, p.queries, p.source, p.registry, p.metrics, tw.inc.vae,
                           clock=p.clock)
    for _ in range(3):
        tw.poll()
        tw.assert_same()


def test_the_lock_is_free_while_scoring(tmp_path):
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, level(3.0))
    rig.poller.poll_once()
    rig.make_ready()
    got = []

    def slow_score(models, series):  # another thread wants the lock meanwhile
        def take():
            ok = rig.registry.lock.acquire(timeout=5)
            got.append(ok)
            if ok:
                rig.registry.lock.release()
        t = threading.Thread(target=take)
        t.start()
        t.join(10)
        return fake_score_many(models, series)

    rig.poller.score_fn = slow_score
    rig.clock.advance(60)
    rig.poller.poll_once()
    assert got == [True]
    assert rig.registry.all()[0].last_result()["score"] == pytest.approx(0.3)


def test_the_lock_is_free_while_the_bank_scores(tmp_path):
    tw = Twins(tmp_path, n=1)
    tw.poll()
    got = []
    real = tw.inc.poller.bank.score

    def take():
        ok = tw.inc.registry.lock.acquire(timeout=5)
        got.append(ok)
        if ok:
            tw.inc.registry.lock.release()

    def slow(jobs):  # another thread wants the lock while the bank scores
        t = threading.Thread(target=take)
        t.start()
        t.join(10)
        return real(jobs)

    tw.inc.poller.bank.score = slow
    tw.poll()
    assert got == [True]
    tw.assert_same()


def test_lock_hold_per_poll_is_a_self_metric(tmp_path):
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, level(3.0))
    rig.poller.poll_once()
    rig.make_ready()
    rig.clock.advance(60)
    rig.poller.poll_once()
    assert rig.sample("promvae_registry_lock_held_seconds_count") == 2
    total = rig.sample("promvae_registry_lock_held_seconds_sum")
    assert 0 < rig.poller.lock_held < total  # the last poll's hold, and the sum of both


def test_points_rewritten_in_the_buffer_are_rescored(tmp_path):
    from grafana_plugin_backend.service.registry import SeriesState

    s = SeriesState(id="x", query="q", labels={}, exposed={})
    s.add_points(np.array([0.0, 60, 120]), np.array([1.0, np.nan, 3.0]))
    assert s.rewritten_from == math.inf  # appended: nothing rewritten
    s.add_points(np.array([180.0]), np.array([4.0]))
    s.add_points(np.array([60.0, 120.0]), np.array([np.nan, 3.0]))  # the same values again
    assert s.rewritten_from == math.inf
    s.add_points(np.array([60.0, 240.0]), np.array([2.0, 5.0]))  # a late sample at 60
    assert s.rewritten_from == 60.0
    assert list(s.buf_vals) == [1.0, 2.0, 3.0, 4.0, 5.0]
    s.rewritten_from = math.inf
    s.add_points(np.array([-60.0]), np.array([7.0]), overwrite=False)  # older history
    assert s.rewritten_from == -60.0 and s.buf_ts[0] == -60.0


def test_training_waits_while_a_poll_runs(tmp_path):
    """wait_idle (the trainer's pause between steps) returns only once the poll is done;
    a poll that outlasts the timeout is waited for once, not at every step."""
    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, level(3.0))
    rig.poller.poll_once()
    rig.make_ready()
    order = []

    def score_and_watch(models, series):
        waiter = threading.Thread(target=lambda: (rig.poller.wait_idle(5), order.append("trained")))
        waiter.start()
        waiter.join(0.3)  # it waits: the poll is not done
        order.append("scored")
        rig.poller.score_fn = fake_score_many
        rig._waiter = waiter
        return fake_score_many(models, series)

    rig.poller.score_fn = score_and_watch
    rig.clock.advance(60)
    assert rig.poller.poll_once()
    rig._waiter.join(5)
    assert order == ["scored", "trained"]
    rig.poller.wait_idle(5)  # idle: returns at once

    stuck = threading.Event()

    def hung(models, series):
        waits = []
        for _ in range(3):  # three training steps during one long poll
            t = threading.Thread(target=lambda: rig.poller.wait_idle(0.2))
            t.start()
            t.join(5)
            waits.append(t.is_alive())
        stuck.set()
        return fake_score_many(models, series)

    rig.poller.score_fn = hung
    rig.clock.advance(60)
    assert rig.poller.poll_once() and stuck.is_set()
    assert rig.poller._outwaited == rig.poller._polls_started  # outwaited once, then not again


def test_the_trainer_passes_its_pause_to_the_fit(tmp_path):
    from grafana_plugin_backend.service.store import ModelStore
    from grafana_plugin_backend.service.trainer import Cancelled, Trainer

    seen = []

    def fit(series, step, config, progress=None, pause=None):
        seen.append(pause)
        return [RuntimeError("no model")] * len(series)

    rig = Rig(tmp_path)
    rig.source.set("metric_a", {"instance": "a"}, level(3.0))
    rig.poller.poll_once()
    store = ModelStore(rig.cfg.storage_path)
    trainer = Trainer(rig.cfg, rig.cfg.queries, rig.source, rig.registry, store, rig.metrics,
                      rig.vae, clock=rig.clock, fit_fn=fit, pause=rig.poller.wait_idle)
    trainer.run_once()
    assert len(seen) == 1
    seen[0]()  # waits while a poll runs (none here)...
    trainer.stop_event.set()
    with pytest.raises(Cancelled):  # ...and is where a stop cancels the batch, at any step
        seen[0]()
