"""Property tests of the detector's pure-numpy parts on hostile input.

Windowing and regularisation (series.py, scoring.py), normalisation and thresholds
(threshold.py) get NaN, ±Inf, ±1e308, constant runs, duplicate and out-of-order timestamps,
series shorter than a window and empty arrays. Each must answer with the documented shape and
finite numbers, or a ValueError with a sentence; nothing else.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from detector import VAEConfig
from detector.scoring import gather_windows, pack, valid_ends
from detector.series import (
    MAX_GRID_POINTS,
    Series,
    normalise,
    regularize,
    robust_stats,
    sliding_windows,
    time_features,
)
from detector.threshold import (
    combine_scales,
    debounce_flags,
    fit_gpd_moments,
    normalise_scores,
    scale_stats,
    smooth_scores,
    spot_threshold,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIAL = [math.nan, math.inf, -math.inf, 1e308, -1e308, 0.0, -0.0, 5e-324]

# Any float64, with the hostile ones drawn often.
hostile = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True),
                    st.floats(-1e6, 1e6))
# Values as series carry them: mostly ordinary, with constant runs, gaps and outbursts.
values_strategy = st.one_of(
    st.lists(hostile, max_size=80),
    st.builds(lambda c, n: [c] * n, hostile, st.integers(0, 80)),  # constant
    st.lists(st.one_of(st.floats(-10, 10), st.sampled_from(SPECIAL)), max_size=80),
)


def hostile_array(max_size: int = 80) -> st.SearchStrategy[np.ndarray]:
    return values_strategy.map(lambda v: np.asarray(v[:max_size], dtype=np.float64))


@st.composite
def samples(draw) -> tuple[np.ndarray, np.ndarray, float]:
    """Timestamps with jitter, duplicates, shuffling and a few non-finite ones; values alike."""
    step = draw(st.sampled_from([1.0, 15.0, 60.0, 0.5, 3600.0]))
    base = draw(st.sampled_from([0.0, 1.7e9, -1e6]))
    pos = draw(st.lists(st.integers(0, 300), max_size=60))
    jitter = draw(st.lists(st.floats(-0.45, 0.45), min_size=len(pos), max_size=len(pos)))
    t = [base + (p + j) * step for p, j in zip(pos, jitter)]
    if t and draw(st.booleans()):  # duplicates of existing timestamps
        t += draw(st.lists(st.sampled_from(t), max_size=10))
    if draw(st.booleans()):
        t += draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), max_size=3))
    t = draw(st.permutations(t)) if t else t
    v = draw(st.lists(hostile, min_size=len(t), max_size=len(t)))
    return np.asarray(t, dtype=np.float64), np.asarray(v, dtype=np.float64), step


# ---- series.py ----------------------------------------------------------------------------

@SETTINGS
@given(samples())
def test_regularize_gives_a_strictly_increasing_regular_grid_keeping_the_newest_sample(data):
    t, v, step = data
    s = regularize(t, v, step)
    assert s.timestamps.shape == s.values.shape and s.values.ndim == 1
    assert np.isfinite(s.timestamps).all()
    assert not np.isinf(s.values).any()  # ±Inf becomes NaN
    finite = np.isfinite(t)
    if not finite.any():
        assert len(s) == 0
        return
    assert np.all(np.diff(s.timestamps) > 0)
    np.testing.assert_allclose(np.diff(s.timestamps), step, rtol=1e-6)
    pos = np.rint(t[finite] / step).astype(np.int64)
    assert len(s) == pos.max() - pos.min() + 1
    # Each grid point holds the sample of the newest timestamp snapping to it (the later
    # input of equal timestamps), NaN where none does.
    newest: dict[int, tuple[float, int]] = {}
    for i, (p, ti) in zip(np.flatnonzero(finite), zip(pos, t[finite])):
        if p not in newest or (ti, i) >= newest[p]:
            newest[p] = (ti, i)
    expect = np.full(len(s), np.nan)
    for p, (_, i) in newest.items():
        expect[p - pos.min()] = v[i] if np.isfinite(v[i]) else np.nan
    np.testing.assert_array_equal(s.values, expect)
    again = regularize(s.timestamps, s.values, step)  # idempotent
    np.testing.assert_array_equal(again.timestamps, s.timestamps)
    np.testing.assert_array_equal(again.values, s.values)


@pytest.mark.parametrize("step", [0.0, -60.0, math.nan, math.inf, -math.inf])
def test_regularize_refuses_a_bad_step(step):
    with pytest.raises(ValueError, match="step must be a positive"):
        regularize(np.array([0.0, 60.0]), np.array([1.0, 2.0]), step)


@pytest.mark.parametrize("t,step", [
    ([0.0, 1e308], 60.0), ([-1e308], 60.0), ([1e300], 1e-300), ([0.0, 60.0], 1e-300),
    ([0.0, 60.0 * MAX_GRID_POINTS], 60.0),
])
def test_regularize_refuses_timestamps_a_grid_cannot_hold(t, step):
    with pytest.raises(ValueError, match="timestamps"):
        regularize(np.array(t), np.ones(len(t)), step)


def test_regularize_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one length"):
        regularize(np.zeros(3), np.zeros(2), 60.0)
    with pytest.raises(ValueError):
        Series(np.zeros((2, 2)), np.zeros((2, 2)))


@SETTINGS
@given(hostile_array())
def test_robust_stats_are_finite_with_a_positive_scale(x):
    center, scale = robust_stats(x)
    assert math.isfinite(center) and math.isfinite(scale) and scale > 0
    obs = np.clip(x[np.isfinite(x)], -1e150, 1e150)
    if len(obs):
        assert obs.min() <= center <= obs.max()


@SETTINGS
@given(hostile_array(), st.sampled_from([1.0, 50.0]))
def test_normalise_is_clipped_and_keeps_nan_where_missing(x, clip):
    center, scale = robust_stats(x)
    z = normalise(x, center, scale, clip)
    assert z.shape == x.shape
    np.testing.assert_array_equal(np.isnan(z), np.isnan(x))
    assert np.all(np.abs(z[~np.isnan(z)]) <= clip)


@SETTINGS
@given(hostile_array())
def test_time_features_are_unit_circles(t):
    t = t[np.isfinite(t)]
    f = time_features(t)
    assert f.shape == (len(t), 4)
    assert np.isfinite(f).all()
    np.testing.assert_allclose(f[:, 0] ** 2 + f[:, 1] ** 2, 1.0, atol=1e-9)
    np.testing.assert_allclose(f[:, 2] ** 2 + f[:, 3] ** 2, 1.0, atol=1e-9)


@SETTINGS
@given(hostile_array(), st.integers(1, 20))
def test_sliding_windows_shape_and_content(x, w):
    win = sliding_windows(x, w)
    assert win.shape == (max(0, len(x) - w + 1), w)
    for i in range(win.shape[0]):
        np.testing.assert_array_equal(win[i], x[i : i + w])


# ---- scoring.py: packing and windows -------------------------------------------------------

@st.composite
def series_batch(draw) -> list[Series]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        v = draw(hostile_array(60))
        t0 = draw(st.sampled_from([0.0, 1.7e9]))
        out.append(Series(t0 + 60.0 * np.arange(len(v)), v))
    return out


@SETTINGS
@given(series_batch(), st.integers(2, 12), st.sampled_from([0.25, 0.5, 1.0]))
def test_pack_and_valid_ends_on_hostile_series(series, window, min_observed):
    cfg = VAEConfig(window=window, hidden=(4,), latent=2, min_observed=min_observed)
    stats = [robust_stats(s.values) for s in series]
    p = pack(series, [c for c, _ in stats], [s for _, s in stats], cfg.clip)
    k, length = len(series), max(1, max(len(s) for s in series))
    assert p.z.shape == p.m.shape == p.t.shape == (k, length)
    assert torch.isfinite(p.z).all() and torch.isfinite(p.t).all()
    assert (p.z.abs() <= cfg.clip).all()
    ends = valid_ends(p, cfg)
    assert ends.shape == (k, length) and ends.dtype == torch.bool
    need = math.ceil(min_observed * window)
    for i, s in enumerate(series):
        n = len(s)
        obs = ~np.isnan(s.values)  # NaN is missing; ±Inf (never left by regularize) saturates
        np.testing.assert_array_equal(p.m[i, :n].numpy(), obs)
        assert not p.m[i, n:].any()
        assert int(p.lengths[i]) == n
        # A window ends at j only inside the series, after a whole window, with enough points.
        expect = np.array([j >= window - 1 and j < n and obs[j - window + 1 : j + 1].sum() >= need
                           for j in range(length)])
        np.testing.assert_array_equal(ends[i].numpy(), expect)
    idx = torch.nonzero(ends)
    if len(idx):
        e = torch.zeros(k, 1, dtype=torch.int64) + idx[0, 1]
        x, m, t_end = gather_windows(p, e, window)
        assert x.shape == m.shape == (k, 1, window)
        row, j = int(idx[0, 0]), int(idx[0, 1])
        np.testing.assert_array_equal(x[row, 0].numpy(), p.z[row, j - window + 1 : j + 1].numpy())
        assert float(t_end[row, 0]) == float(p.t[row, j])


# ---- threshold.py --------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.one_of(st.floats(1e-300, 1e300), st.sampled_from([1e308, 5e-324])),
                min_size=1, max_size=50))
def test_gpd_fit_has_bounded_shape_and_positive_scale(peaks):
    gamma, sigma = fit_gpd_moments(np.asarray(peaks))
    assert 0.0 <= gamma <= 0.45
    assert math.isfinite(sigma) and sigma > 0


@SETTINGS
@given(hostile_array(200), st.floats(1e-4, 1e-2), st.floats(0.9, 0.99))
def test_spot_threshold_is_finite_and_above_the_bulk_or_refuses_clearly(scores, risk, iq):
    finite = scores[np.isfinite(scores)]
    if len(finite) == 0:
        with pytest.raises(ValueError, match="no finite training scores"):
            spot_threshold(scores, risk, iq)
        return
    thr, method = spot_threshold(scores, risk, iq)
    assert method in ("spot", "quantile")
    assert math.isfinite(thr)
    assert thr >= np.median(np.clip(finite, -1e150, 1e150))  # beyond ±1e150 scores saturate


@SETTINGS
@given(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6),
       st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=20))
def test_normalised_scores_are_zero_at_baseline_one_at_threshold_and_monotone(base, thr, raw):
    out = normalise_scores(np.array([base, thr, *raw]), base, thr)
    assert np.isfinite(out).all()
    if thr > base:
        assert out[0] == 0.0 and math.isclose(out[1], 1.0, rel_tol=1e-9)
    order = np.argsort(raw)
    assert np.all(np.diff(out[2:][order]) >= 0)


@SETTINGS
@given(st.integers(0, 60), st.integers(1, 3), st.data())
def test_scale_stats_and_combine_scales_on_hostile_scores(n, n_scales, data):
    raw = np.array(data.draw(st.lists(st.lists(hostile, min_size=n_scales, max_size=n_scales),
                                      min_size=n, max_size=n)), dtype=np.float64)
    raw = raw.reshape(n, n_scales)
    stats = scale_stats(raw)
    assert len(stats) == n_scales
    for med, spread in stats:
        assert math.isfinite(med) and math.isfinite(spread) and spread > 0
    # Scores as the model makes them (bounded, NaN where unscored) combine to finite values.
    bounded = np.where(np.isfinite(raw), np.clip(raw, -1e6, 1e6), np.nan)
    stats = scale_stats(bounded)
    combined = combine_scales(bounded, stats)
    assert combined.shape == (n,)
    np.testing.assert_array_equal(np.isnan(combined), np.isnan(bounded).any(axis=1))
    assert not np.isinf(combined).any()


@SETTINGS
@given(hostile_array(120), st.integers(1, 20))
def test_smooth_scores_is_the_mean_of_the_last_n_finite_scores(raw, n):
    out = smooth_scores(raw, n)
    assert out.shape == raw.shape
    ok = np.isfinite(raw)
    np.testing.assert_array_equal(np.isnan(out), ~ok)
    assert np.isfinite(out[ok]).all()  # even after ±1e308: no overflow, no inf - inf
    for i in np.flatnonzero(ok):
        w = raw[max(0, i - n + 1) : i + 1]
        f = w[np.isfinite(w)]
        # The mean, without overflowing on 1e308; a mean of finite values is at most the
        # largest float (the sum of the parts can round past it).
        big = np.finfo(np.float64).max
        with np.errstate(over="ignore"):
            expect = float(np.clip(np.sum(f / len(f)), -big, big))
        assert math.isclose(out[i], expect, rel_tol=1e-9, abs_tol=1e-9 * max(1.0, np.abs(f).max()))


@SETTINGS
@given(hostile_array(120), st.integers(1, 10))
def test_debounce_flags_rise_only_after_n_scores_at_or_above_one(score, n):
    flag = debounce_flags(score, n)
    assert flag.shape == score.shape
    np.testing.assert_array_equal(np.isnan(flag), ~np.isfinite(score))
    assert set(np.unique(flag[~np.isnan(flag)])) <= {0.0, 1.0}
    for i in np.flatnonzero(np.isfinite(score)):
        w = score[i - n + 1 : i + 1] if i >= n - 1 else np.array([])
        assert flag[i] == float(len(w) == n and bool(np.all(np.isfinite(w) & (w >= 1.0))))


@given(arrays(np.float64, st.integers(0, 5), elements=hostile))
@settings(max_examples=30, deadline=None)
def test_empty_and_tiny_inputs_never_crash(x):
    robust_stats(x)
    smooth_scores(x, 3)
    debounce_flags(x, 2)
    sliding_windows(x, 4)
    time_features(x[np.isfinite(x)])
    if len(x):
        regularize(np.arange(len(x)) * 60.0, x, 60.0)
    assume(np.isfinite(x).any())
    thr, _ = spot_threshold(x, 1e-3, 0.98)
    assert math.isfinite(thr)


def test_smooth_scores_at_the_largest_float_stays_finite():
    # Found by hypothesis in CI-like run: three scores at 1.8e308 averaged to inf.
    big = np.finfo(np.float64).max
    assert np.isfinite(smooth_scores(np.full(3, big), 20)).all()
    assert np.isfinite(smooth_scores(np.full(3, -big), 20)).all()
