import numpy as np
import pytest
import torch

from detector import Series, VAEConfig, explain_window, fit_many, score_many
from detector.scoring import pack, score_windows
from detector.model import stack

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
    assert ex.timestamps[-1] == t[spike + 3] and len(ex.timestamps) == W
    i = W - 1 - 3  # the spike's place in the window
    assert ex.top(1) == [i]
    assert ex.share[i] > 0.8
    assert np.isnan(ex.share[i - 9]) and np.isnan(ex.observed[i - 9]) and np.isnan(ex.nll[i - 9])
    assert np.isfinite(ex.expected).all()  # the model still expects a value where none came
    ok = np.isfinite(ex.share)
    assert (ex.share[ok] >= 0).all() and ex.share[ok].sum() == pytest.approx(1.0)
    # The spike lies outside its band; the expectation tracks the sine, not the spike.
    assert not ex.lower[i] <= ex.observed[i] <= ex.upper[i]
    assert abs(ex.expected[i] - (v[spike] - 150.0)) < 10.0
    # Points of the newest half count in both scales, older ones only in the whole window.
    assert np.nanmin(ex.weight[W // 2:]) > np.nanmax(ex.weight[: W // 2])


def test_explanation_adds_up_to_what_scoring_computes(fitted):
    """The per-point split reproduces score_windows' per-scale raw scores and score_many's
    band at the window's newest point (same latent draws)."""
    model, t, v = fitted
    ser = Series(t[1600:1800], v[1600:1800])
    end = 150
    ex = explain_window(model, ser, ser.timestamps[end])
    config = model.config
    packed = pack([ser], [model.center], [model.scale], config.clip, [model.seasonality])
    raw, _, _ = score_windows(stack([model.params]), config, packed,
                              torch.tensor([[end]]), [model.seed])
    np.testing.assert_allclose(ex.scale_raw, raw[0, 0], rtol=1e-4, atol=1e-4)
    for si, n in enumerate(config.score_scales):  # weights are the scales' mean over the tail
        assert ex.scale_raw[si] == pytest.approx(np.mean(ex.nll[-n:]), rel=1e-9)
    res = score_many([model], [ser])[0]
    assert ex.expected[-1] == pytest.approx(res.expected[end], rel=1e-4)
    assert ex.upper[-1] == pytest.approx(res.upper[end], rel=1e-4)
    assert ex.lower[-1] == pytest.approx(res.lower[end], rel=1e-4)
    # The unsmoothed combined raw score, averaged as scoring smooths, gives the raw score.
    raws = [explain_window(model, ser, ser.timestamps[end - k]).raw for k in range(config.smooth)]
    assert np.mean(raws) == pytest.approx(res.raw[end], rel=1e-4, abs=1e-4)


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
    with pytest.raises(ValueError, match="empty"):
        explain_window(model, Series(np.empty(0), np.empty(0)), t[0])
