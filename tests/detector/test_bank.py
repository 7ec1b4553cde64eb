"""ModelBank: weights held once per model shape, and incremental scoring equal to score_many."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detector import Series, VAEConfig, lead_in_points, score_many
from detector.bank import Job, ModelBank
from detector.fitted import SeriesModel
from detector.model import init_params

STEP = 60.0
T0 = 1_700_000_000.0
FIELDS = ("raw", "score", "flag", "expected", "lower", "upper", "observed")
# Smoothing and debounce both > 1, two scales: every cached piece is exercised.
CONFIG = VAEConfig(window=16, hidden=(12,), latent=3, score_scales=(16, 6), mc_samples=4,
                   smooth=5, debounce=2)


def random_model(config: VAEConfig, seed: int, rng: np.random.Generator) -> SeriesModel:
    p = init_params(config, [seed])
    return SeriesModel(config, p, STEP, center=float(rng.uniform(-5, 5)),
                       scale=float(rng.uniform(0.5, 3)), threshold_=float(rng.uniform(1, 4)),
                       baseline_=float(rng.uniform(-1, 0.5)), threshold_method="spot", seed=seed,
                       trained_from=0.0, trained_to=T0, trained_at=T0, n_train=100,
                       seasonality=(bool(seed % 2), bool(seed % 3 == 0)),
                       scale_stats=[(float(rng.normal()), float(rng.uniform(0.5, 2)))
                                    for _ in config.score_scales],
                       extra={"nonnegative": seed % 4 == 0})


def history(rng: np.random.Generator, n: int, gaps: bool = True) -> np.ndarray:
    t = np.arange(n)
    v = 3 * np.sin(t / 20 + rng.uniform(0, 6)) + rng.normal(0, 0.5, n) + rng.uniform(-2, 2)
    if gaps:
        v[rng.random(n) < 0.1] = np.nan  # scattered missing points
        a = int(rng.integers(0, n - 30))
        v[a:a + int(rng.integers(5, 25))] = np.nan  # a gap: some windows cannot be judged
    return v


def assert_rows_equal(inc, full) -> None:
    """The bank's rows equal score_many's rows at the same timestamps. Its flags are its own
    debounce over the rows it returns: compared from the first new point on."""
    n = len(inc.timestamps)
    assert n <= len(full.timestamps)
    np.testing.assert_array_equal(inc.timestamps, full.timestamps[-n:])
    for f in FIELDS:
        a, b = getattr(inc, f), getattr(full, f)[-n:]
        if f == "flag" and n < len(full.timestamps):
            a, b = a[CONFIG.debounce - 1:], b[CONFIG.debounce - 1:]
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f)


class Fleet:
    """K series, their models in a bank, polled one step (or several) at a time."""

    def __init__(self, k: int, n: int, seed: int = 0, config: VAEConfig = CONFIG) -> None:
        self.rng = np.random.default_rng(seed)
        self.config = config
        self.lead_in = lead_in_points(config)
        self.values = np.stack([history(self.rng, n) for _ in range(k)])
        self.times = T0 + STEP * np.arange(n)
        self.models = [random_model(config, i, self.rng) for i in range(k)]
        self.bank = ModelBank(block=4)  # small blocks: a poll spans several
        for i, m in enumerate(self.models):
            self.bank.install(f"s{i}", m)
        self.pos = self.lead_in + 40  # newest point scored so far (index)

    def job_series(self, i: int, upto: int, n_new: int) -> Series:
        a = max(0, upto - n_new + 1 - self.lead_in)
        return Series(self.times[a:upto + 1], self.values[i, a:upto + 1])

    def poll(self, n_new: int = 1, only: list[int] | None = None) -> list[tuple]:
        """Score n_new new points of each series; returns (bank result, score_many result)."""
        upto = self.pos + n_new
        keys = only if only is not None else list(range(len(self.models)))
        series = [self.job_series(i, upto, n_new) for i in keys]
        jobs = [Job(f"s{i}", s, float(self.times[upto - n_new + 1])) for i, s in zip(keys, series)]
        inc = self.bank.score(jobs)
        full = score_many([self.models[i] for i in keys], series)
        self.pos = upto
        return list(zip(inc, full))


def test_incremental_scores_equal_score_many_on_the_full_lead_in():
    fleet = Fleet(k=9, n=400)
    first = fleet.poll(1)  # no cache yet: the full lead-in, every row
    for inc, full in first:
        assert len(inc.timestamps) == len(full.timestamps)
        assert_rows_equal(inc, full)
    for _ in range(25):  # one new point per poll: only the new window is scored
        for inc, full in fleet.poll(1):
            assert len(inc.timestamps) == CONFIG.debounce  # the new row and what debounce reads
            assert_rows_equal(inc, full)
    scored = [r for inc, _ in fleet.poll(1) for r in inc.score]
    assert np.isfinite(scored).sum() > 0


def test_incremental_scores_only_the_new_windows(monkeypatch):
    fleet = Fleet(k=5, n=300)
    fleet.poll(1)
    from detector import bank

    seen = []
    real = bank.score_windows

    def spy(p, config, packed, ends, seeds):
        seen.append(tuple(ends.shape))
        return real(p, config, packed, ends, seeds)

    monkeypatch.setattr(bank, "score_windows", spy)
    fleet.poll(1)
    assert sum(k * e for k, e in seen) == 5  # one window per series, not lead_in of them
    seen.clear()
    fleet.poll(7)
    assert sum(k * e for k, e in seen) == 5 * 7


def test_catch_up_of_many_points_and_mixed_counts():
    fleet = Fleet(k=6, n=600, seed=3)
    fleet.poll(1)
    for inc, full in fleet.poll(50):  # an outage: 50 points at once
        assert len(inc.timestamps) == 50 + CONFIG.debounce - 1
        assert_rows_equal(inc, full)
    for n_new in (3, 1, 17, 1):
        for inc, full in fleet.poll(n_new):
            assert_rows_equal(inc, full)


def test_a_series_skipped_by_a_poll_falls_back_to_its_full_lead_in():
    fleet = Fleet(k=4, n=300, seed=5)
    fleet.poll(1)
    fleet.poll(1, only=[0, 1])  # series 2 and 3 miss a poll: their cache ends too early
    pairs = fleet.poll(1, only=[2, 3])
    for inc, full in pairs:
        assert len(inc.timestamps) == len(full.timestamps)  # full lead-in, every row
        assert_rows_equal(inc, full)


def test_a_new_model_drops_the_cache():
    fleet = Fleet(k=3, n=300, seed=7)
    fleet.poll(1)
    fleet.poll(1)
    old = fleet.models[1]
    new = random_model(CONFIG, 99, fleet.rng)  # a retrain
    fleet.bank.install("s1", new)
    fleet.models[1] = new
    assert fleet.bank.model("s1") is new
    assert old.params["enc0.w"].data_ptr() != new.params["enc0.w"].data_ptr()
    pairs = fleet.poll(1)
    assert len(pairs[1][0].timestamps) == len(pairs[1][1].timestamps)  # rescored in full
    assert len(pairs[0][0].timestamps) == CONFIG.debounce  # the others stay incremental
    for inc, full in pairs:
        assert_rows_equal(inc, full)
    for inc, full in fleet.poll(1):
        assert_rows_equal(inc, full)


def test_a_restart_has_no_cache_and_scores_the_full_lead_in():
    fleet = Fleet(k=3, n=300, seed=11)
    fleet.poll(1)
    fleet.poll(1)
    fleet.bank = ModelBank()  # a new process: models loaded, nothing cached
    for i, m in enumerate(fleet.models):
        fleet.bank.install(f"s{i}", m)
    for inc, full in fleet.poll(1):
        assert len(inc.timestamps) == len(full.timestamps)
        assert_rows_equal(inc, full)


def test_rewritten_points_make_their_windows_stale():
    fleet = Fleet(k=2, n=300, seed=13)
    fleet.poll(1)
    fleet.poll(1)
    t_changed = fleet.pos - 3
    fleet.values[:, t_changed] = 40.0  # a late sample replaced a point already scored
    upto = fleet.pos + 1
    series = [fleet.job_series(i, upto, 1) for i in range(2)]
    first = float(fleet.times[upto])
    jobs = [Job(f"s{i}", s, first, stale_from=float(fleet.times[t_changed]))
            for i, s in enumerate(series)]
    for inc, full in zip(fleet.bank.score(jobs), score_many(fleet.models, series)):
        assert len(inc.timestamps) == len(full.timestamps)
        assert_rows_equal(inc, full)


def test_short_buffers_and_warm_up_match_score_many():
    fleet = Fleet(k=3, n=200, seed=17)
    # A series that has just started: fewer points than the lead-in before the first new one.
    for upto in range(CONFIG.window - 3, CONFIG.window + 12):
        series = [Series(fleet.times[: upto + 1], fleet.values[i, : upto + 1]) for i in range(3)]
        jobs = [Job(f"s{i}", s, float(fleet.times[upto])) for i, s in enumerate(series)]
        for inc, full in zip(fleet.bank.score(jobs), score_many(fleet.models, series)):
            assert_rows_equal(inc, full)


def test_weights_are_held_once_in_float16_views():
    fleet = Fleet(k=6, n=100)
    m = fleet.models[0]
    assert all(v.dtype == torch.float16 for v in m.params.values())
    # Two models of one block share its storage: nothing was copied per model.
    a, b = fleet.models[0].params["dec0.w"], fleet.models[1].params["dec0.w"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    n_weights = sum(v.numel() for v in m.params.values())
    assert fleet.bank.nbytes() < 2 * 8 * 2.2 * n_weights  # 2 blocks of 4 slots, fp16 plus a little
    fleet.bank.remove("s0")  # a removed model keeps its own copy of its weights
    assert m.params["dec0.w"].untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert "s0" not in fleet.bank and len(fleet.bank) == 5
    held = fleet.bank.nbytes()
    fleet.bank.install("s9", random_model(CONFIG, 9, fleet.rng))  # reuses the freed slot
    assert fleet.bank.nbytes() == held and len(fleet.bank) == 6


def test_float16_storage_keeps_scores_close_to_float32():
    rng = np.random.default_rng(2)
    models32 = [random_model(CONFIG, i, rng) for i in range(4)]
    rng = np.random.default_rng(2)
    models16 = [random_model(CONFIG, i, rng) for i in range(4)]
    bank = ModelBank()
    for i, m in enumerate(models16):
        bank.install(i, m)
    t = T0 + STEP * np.arange(200)
    series = [Series(t, history(np.random.default_rng(i), 200, gaps=False)) for i in range(4)]
    a = score_many(models32, series)
    b = score_many(models16, series)
    for x, y in zip(a, b):
        ok = np.isfinite(x.score)
        np.testing.assert_allclose(y.score[ok], x.score[ok], atol=2e-2)
        np.testing.assert_allclose(y.expected[ok], x.expected[ok], rtol=1e-2, atol=1e-2)


def test_weights_beyond_float16_range_stay_float32():
    rng = np.random.default_rng(4)
    m = random_model(CONFIG, 1, rng)
    m.params["dec_mu.w"][0, 0, 0] = 1e6
    bank = ModelBank()
    bank.install("big", m)
    assert m.params["dec_mu.w"].dtype == torch.float32 and m.params["dec_mu.w"][0, 0, 0] == 1e6


def test_a_key_without_a_model_is_a_clear_error():
    bank = ModelBank()
    with pytest.raises(KeyError):
        bank.score([Job("nope", Series(np.array([T0]), np.array([1.0])), T0)])
    assert math.isinf(Job("x", Series(np.empty(0), np.empty(0)), 0.0).stale_from)
