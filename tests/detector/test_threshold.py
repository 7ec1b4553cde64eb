import numpy as np
import pytest

from detector.threshold import debounce_flags, fit_gpd_moments, normalise_scores, spot_threshold


def test_gpd_moments_recovers_exponential_tail():
    x = np.random.default_rng(0).exponential(2.0, 200_000)
    gamma, sigma = fit_gpd_moments(x)
    assert abs(gamma) < 0.02 and abs(sigma - 2.0) < 0.05


def test_spot_threshold_matches_the_risk_on_fresh_data():
    r = np.random.default_rng(1)
    train = r.gumbel(0, 1, 20_000)
    thr, method = spot_threshold(train, risk=1e-3, init_quantile=0.98)
    assert method == "spot"
    fresh = r.gumbel(0, 1, 2_000_000)
    rate = float(np.mean(fresh > thr))
    assert 3e-4 < rate < 3e-3  # the tail extrapolation lands near the asked risk


def test_spot_threshold_falls_back_on_short_tails_and_ignores_nan():
    thr, method = spot_threshold(np.r_[np.arange(20.0), np.nan, np.inf], risk=1e-3, init_quantile=0.98)
    assert method == "quantile" and thr >= 19.0
    with pytest.raises(ValueError):
        spot_threshold(np.array([np.nan]), 1e-3, 0.98)


def test_normalised_score_is_one_at_threshold_and_monotone():
    raw = np.array([-5.0, 0.0, 2.0, 4.0, 100.0])
    s = normalise_scores(raw, baseline=0.0, threshold=4.0)
    assert s[1] == 0.0 and s[3] == 1.0
    assert np.all(np.diff(s) > 0)


def test_debounce_needs_consecutive_points_and_nan_breaks_runs():
    s = np.array([1.2, 0.5, 1.1, 1.3, 1.4, np.nan, 2.0, 2.0])
    np.testing.assert_array_equal(debounce_flags(s, 1)[:5], [1, 0, 1, 1, 1])
    f = debounce_flags(s, 2)
    np.testing.assert_array_equal(f[:5], [0, 0, 0, 1, 1])
    assert np.isnan(f[5]) and f[6] == 0 and f[7] == 1


def test_smoothing_is_a_causal_mean_over_finite_scores():
    from detector.threshold import smooth_scores

    r = np.array([np.nan, 2.0, 4.0, np.nan, 6.0, 8.0])
    s = smooth_scores(r, 3)
    assert np.isnan(s[0]) and np.isnan(s[3])
    np.testing.assert_allclose(s[[1, 2, 4, 5]], [2.0, 3.0, 5.0, 7.0])
    # The future never changes the past.
    r2 = r.copy()
    r2[-1] = 1e9
    np.testing.assert_array_equal(smooth_scores(r2, 3)[:-1], s[:-1])


def test_debounce_of_a_few_points_equals_the_vectorised_path():
    """The service debounces a point or two per series per poll in Python floats; the
    result is the array path's (NaN and inf break a run and stay unflagged)."""
    from detector.threshold import debounce_flags

    r = np.random.default_rng(0)
    for _ in range(2000):
        n = int(r.integers(0, 5))
        s = r.choice([0.5, 1.0, 2.0, np.nan, np.inf, -np.inf], int(r.integers(0, 9)))
        long = debounce_flags(np.concatenate([s, np.zeros(20)]), n)[:len(s)]  # > 8: arrays
        np.testing.assert_array_equal(debounce_flags(s, n), long)
