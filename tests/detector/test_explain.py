import numpy as np
import pytest
import torch

from detector import Series, VAEConfig, explain_window, fit_many, score_many
from detector.model import stack
from detector.scoring import pack, score_windows

STEP = 60.0
W = 32


@pytest.fixture(scope="module")
def fitted():
    config = VAEConfig(window=W, hidden=(32,), latent=3, max_steps=300, score_scales=(W, W // 2),
                       mc_samples=8, smooth=4)
    n = 2000
    t = 1_700_000_000.0 + STEP * np.arange(n)
    rs = np.random.default_rng(3)
    v = 100.0 + 20.0 * np.sin(2 * np.pi * np.arange(n) / 120) + rs.normal(0, 0.5, n)
    model = fit_many([Series(t[:1500], v[:1500])], STEP, config)[0]
    assert not isinstance(model, Exception), model
    return model, t, v


def test_a_spike_gets_most_of_the_share(fitted):
    model, t, v = fitted
    v = v.copy()
    spike = 1700
    v[spike] += 150.0
    v[spike - 9] = np.nan  # a missing point inside the window
    ex = explain_window(model, Series(t, v), t[spike + 3])
    span = W + model.config.smooth - 1  # the points of the smoothed windows
    assert ex.timestamps[-1] == t[spike + 3] and len(ex.timestamps) == span
    assert ex.windows == model.config.smooth
    i = span - 1 - 3  # the spike's place
    assert ex.top(1) == [i]
    assert ex.share[i] > 0.8
    assert np.isnan(ex.share[i - 9]) and np.isnan(ex.observed[i - 9]) and np.isnan(ex.nll[i - 9])
    assert np.isfinite(ex.expected).all()  # the model still expects a value where none came
    ok = np.isfinite(ex.share)
    assert (ex.share[ok] >= 0).all() and ex.share[ok].sum() == pytest.approx(1.0)
    # The spike lies outside its band; the expectation stays near the sine, not the spike.
    assert not ex.lower[i] <= ex.observed[i] <= ex.upper[i]
    assert abs(ex.expected[i] - (v[spike] - 150.0)) < 0.2 * abs(ex.expected[i] - v[spike])
    # Points in the newest half of a window count in both scales, older ones in one: the
    # points of the newest window's second half weigh more than those older than any window's.
    assert np.nanmin(ex.weight[-W // 2:]) > np.nanmax(ex.weight[: span - W])


def test_explanation_adds_up_to_what_scoring_computes(fitted):
    """The per-point split reproduces score_windows' per-scale raw scores of the newest
    window, score_many's smoothed raw score at t and its bands at every point (same draws)."""
    model, t, v = fitted
    ser = Series(t[1600:1800], v[1600:1800])
    end = 150
    ex = explain_window(model, ser, ser.timestamps[end])
    config = model.config
    packed = pack([ser], [model.center], [model.scale], config.clip, [model.seasonality])
    raw, _, _ = score_windows(stack([model.params]), config, packed,
                              torch.tensor([[end]]), [model.seed])
    np.testing.assert_allclose(ex.scale_raw, raw[0, 0], rtol=1e-4, atol=1e-4)
    res = score_many([model], [ser])[0]
    assert ex.raw == pytest.approx(res.raw[end], rel=1e-4, abs=1e-4)
    rows = np.searchsorted(ser.timestamps, ex.timestamps)
    np.testing.assert_allclose(ex.expected, res.expected[rows], rtol=1e-4)
    np.testing.assert_allclose(ex.lower, res.lower[rows], rtol=1e-4)
    np.testing.assert_allclose(ex.upper, res.upper[rows], rtol=1e-4)
    # Shares are weighted surprises: the weights reproduce the smoothed raw score from the
    # points' NLLs when no point is missing (each window's scales average their tails).
    assert np.isfinite(ex.weight).all() and np.all(ex.weight > 0)


def test_near_the_start_fewer_windows_are_averaged(fitted):
    model, t, v = fitted
    ser = Series(t[:200], v[:200])
    ex = explain_window(model, ser, t[W])  # windows end at W - 1 and W only
    assert ex.windows == 2 and len(ex.timestamps) == W + 1
    assert np.isnan(ex.expected[: W - 1]).all() and np.isfinite(ex.expected[W - 1:]).all()
    res = score_many([model], [ser])[0]
    assert ex.raw == pytest.approx(res.raw[W], rel=1e-4, abs=1e-4)


def test_bad_requests_are_clear_errors(fitted):
    model, t, v = fitted
    ser = Series(t[:100], v[:100])
    with pytest.raises(ValueError, match="not a point"):
        explain_window(model, ser, t[50] + 7.0)
    with pytest.raises(ValueError, match="not a point"):
        explain_window(model, ser, t[500])
    with pytest.raises(ValueError, match="a window needs 32"):
        explain_window(model, ser, t[10])
    gappy = v[:100].copy()
    gappy[40:70] = np.nan
    with pytest.raises(ValueError, match="observed points"):
        explain_window(model, Series(t[:100], gappy), t[69])
    assert explain_window(model, Series(t[:100], gappy), t[86]).windows == 2  # 85 and 86
    with pytest.raises(ValueError, match="empty"):
        explain_window(model, Series(np.empty(0), np.empty(0)), t[0])
