import numpy as np
import pytest

from detector.series import normalise, regularize, robust_stats, sliding_windows, time_features


def test_regularize_sorts_dedups_and_marks_gaps():
    t = np.array([180.0, 0.0, 60.0, 60.0, 300.0])
    v = np.array([3.0, 0.0, 1.0, 1.5, np.inf])
    s = regularize(t, v, 60.0)
    assert list(s.timestamps) == [0.0, 60.0, 120.0, 180.0, 240.0, 300.0]
    # Duplicate timestamp: the later sample wins; missing grid points and Inf are NaN.
    np.testing.assert_array_equal(s.values[:2], [0.0, 1.5])
    assert np.isnan(s.values[2]) and s.values[3] == 3.0
    assert np.isnan(s.values[4]) and np.isnan(s.values[5])


def test_regularize_snaps_jitter_and_rejects_bad_step():
    s = regularize(np.array([0.4, 59.7, 121.0]), np.array([1.0, 2.0, 3.0]), 60.0)
    np.testing.assert_array_equal(s.values, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="step"):
        regularize(np.array([0.0]), np.array([1.0]), 0.0)


def test_regularize_empty_and_all_nan():
    assert len(regularize(np.array([]), np.array([]), 60.0)) == 0
    s = regularize(np.arange(5) * 60.0, np.full(5, np.nan), 60.0)
    assert len(s) == 5 and s.observed() == 0


@pytest.mark.parametrize(
    "values",
    [np.full(100, 7.0), np.r_[np.zeros(95), np.ones(5) * 100], np.r_[np.full(50, 1e300), np.full(50, -1e300)]],
)
def test_robust_stats_always_positive_finite_scale(values):
    center, scale = robust_stats(values)
    assert np.isfinite(center) and np.isfinite(scale) and scale > 0


def test_robust_stats_median_and_iqr():
    x = np.random.default_rng(0).normal(10, 2, 100_000)
    center, scale = robust_stats(x)
    assert abs(center - 10) < 0.05 and abs(scale - 2) < 0.05


def test_normalise_clips_and_keeps_nan():
    z = normalise(np.array([0.0, 1e300, -np.inf, np.nan]), 0.0, 1.0, clip=50.0)
    assert z[0] == 0 and z[1] == 50 and z[2] == -50 and np.isnan(z[3])


def test_sliding_windows_shape_and_content():
    w = sliding_windows(np.arange(10.0), 4)
    assert w.shape == (7, 4) and list(w[-1]) == [6, 7, 8, 9]
    assert sliding_windows(np.arange(3.0), 4).shape == (0, 4)


def test_time_features_are_cyclic():
    f = time_features(np.array([0.0, 86400.0, 7 * 86400.0, 43200.0]))
    assert f.shape == (4, 4)
    np.testing.assert_allclose(f[0, :2], f[1, :2], atol=1e-9)  # same time of day
    np.testing.assert_allclose(f[0], f[2], atol=1e-9)  # same time of week
    assert f[3, 1] < -0.99  # noon is opposite midnight
