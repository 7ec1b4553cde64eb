"""End to end on hostile series: Detector.fit and score with a tiny model.

Fitting a series full of NaN, ±Inf, ±1e308, constant runs, duplicate or shuffled timestamps,
or too few points must give a model whose scores are finite (NaN only where a window cannot be
judged), or a ValueError with a sentence; scoring any hostile series with a fitted model must
never give ±Inf.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from detector import Detector, ScoreResult, VAEConfig

CFG = VAEConfig(window=16, hidden=(8,), latent=2, max_epochs=3, max_steps=30, batch_size=16,
                mc_samples=2, score_scales=(16, 8), smooth=3, debounce=2, patience=2)
STEP = 60.0
N = 96
SPECIAL = [math.nan, math.inf, -math.inf, 1e308, -1e308]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def hostile_series(draw, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps, values): a base shape with hostile points, gaps and timestamp disorder."""
    t = 1.7e9 + STEP * np.arange(n)
    kind = draw(st.sampled_from(["sine", "constant", "noise", "level_shift"]))
    if kind == "sine":
        v = 10 + np.sin(2 * np.pi * np.arange(n) / 24)
    elif kind == "constant":
        v = np.full(n, draw(st.sampled_from([0.0, 42.0, 1e308, -1e308, 5e-324, 1e-300])))
    elif kind == "noise":
        v = np.random.default_rng(draw(st.integers(0, 99))).normal(0, draw(st.sampled_from([1e-12, 1.0, 1e150])), n)
    else:
        v = np.where(np.arange(n) < n // 2, 0.0, draw(st.sampled_from([1.0, 1e300])))
    v = v.astype(np.float64)
    for i in draw(st.lists(st.integers(0, n - 1), max_size=n // 3)):
        v[i] = draw(st.sampled_from(SPECIAL))
    if draw(st.booleans()):  # a gap, or everything missing
        a = draw(st.integers(0, n - 1))
        v[a : a + draw(st.integers(1, n))] = np.nan
    if draw(st.booleans()):  # duplicate timestamps, then shuffled
        dup = draw(st.lists(st.integers(0, n - 1), max_size=8))
        t, v = np.concatenate([t, t[dup]]), np.concatenate([v, v[dup] + 1.0])
    if draw(st.booleans()):
        order = np.random.default_rng(draw(st.integers(0, 99))).permutation(len(t))
        t, v = t[order], v[order]
    if draw(st.booleans()):  # shorter than a window, or than training needs
        keep = draw(st.integers(0, CFG.window + 40))
        t, v = t[:keep], v[:keep]
    return t, v


def check_result(res: ScoreResult, grid_values: np.ndarray) -> None:
    n = len(grid_values)
    for name in ("timestamps", "observed", "raw", "score", "flag", "expected", "lower", "upper"):
        arr = getattr(res, name)
        assert arr.shape == (n,), name
        if name != "observed":
            assert not np.isinf(arr).any(), f"{name} has ±Inf"
    assert set(np.unique(res.flag[~np.isnan(res.flag)])) <= {0.0, 1.0}
    # A point whose whole window was observed is scored (after the smoothing warm-up).
    for i in range(CFG.window - 1, n):
        if np.isfinite(grid_values[i - CFG.window + 1 : i + 1]).all():
            assert np.isfinite(res.score[i]), i
            assert np.isfinite(res.expected[i]) and res.lower[i] <= res.upper[i]


@settings(max_examples=40, deadline=None)
@given(hostile_series(), hostile_series())
def test_fit_on_hostile_series_gives_a_usable_model_or_a_clear_error(train, test):
    det = Detector(CFG, step=STEP)
    try:
        det.fit(train[1], train[0])
    except ValueError as e:  # InsufficientDataError is one
        assert len(str(e)) > 10 and "Traceback" not in str(e)
        event(f"refused: {type(e).__name__}")
        return
    event("fitted")
    m = det.model_
    assert math.isfinite(det.threshold_) and math.isfinite(m.baseline_)
    assert math.isfinite(m.center) and math.isfinite(m.scale) and m.scale > 0
    assert all(math.isfinite(a) and math.isfinite(b) and b > 0 for a, b in m.scale_stats)
    assert all(torch.isfinite(p).all() for p in m.params.values())
    for t, v in (train, test):
        grid = det._series(v, t)
        check_result(det.score(v, t), grid.values)


def test_scoring_a_clean_model_on_hostile_values_never_gives_inf():
    rng = np.random.default_rng(0)
    values = 10 + np.sin(2 * np.pi * np.arange(200) / 24) + rng.normal(0, 0.1, 200)
    det = Detector(CFG, step=STEP).fit(values)
    hostile = values.copy()
    hostile[[50, 51, 120]] = [1e308, -1e308, np.inf]
    hostile[150:] = 5e307  # a level the model never saw
    res = det.score(hostile)
    check_result(res, np.where(np.isfinite(hostile), hostile, np.nan))
    assert np.nanmax(res.score[150:]) > 1.0  # and it is flagged, not hidden by clipping
