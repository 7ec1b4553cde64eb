"""The training windows a threshold is fitted on: all of a short history, evenly spread
contiguous blocks of a long one, each smoothed as serving smooths."""

import numpy as np
import pytest
import torch

from detector import VAEConfig, fit_many
from detector import train as tr
from detector.series import Series
from detector.threshold import smooth_scores

CFG = VAEConfig(window=16, hidden=(8,), latent=2, score_scales=(4,), max_epochs=2, max_steps=30,
                smooth=6, mc_samples=4)


def test_a_short_history_scores_every_window_in_one_block():
    n = tr.MAX_THRESHOLD_WINDOWS + CFG.window - 1  # exactly the budget of windows
    ends, n_ends, blocks = tr._threshold_ends(torch.tensor([n, 40]), CFG)
    assert n_ends.tolist() == [tr.MAX_THRESHOLD_WINDOWS, 40 - CFG.window + 1]
    assert ends[0, : n_ends[0]].tolist() == list(range(CFG.window - 1, n))
    assert blocks == [[0], [0]]


def test_a_long_history_scores_evenly_spread_blocks_ending_at_the_newest_window():
    n = 10_080  # 7 days at 60 s
    ends, n_ends, blocks = tr._threshold_ends(torch.tensor([n]), CFG)
    e = ends[0, : n_ends[0]].numpy()
    size = tr.MAX_THRESHOLD_WINDOWS // tr.THRESHOLD_BLOCKS
    assert len(e) == tr.MAX_THRESHOLD_WINDOWS and blocks[0] == list(range(0, len(e), size))
    assert e[0] == CFG.window - 1 and e[-1] == n - 1  # the oldest and the newest window
    assert np.all(np.diff(e) > 0)  # time order: the held-back tail stays the last rows
    starts = e[blocks[0]]
    assert all(np.array_equal(e[b : b + size], np.arange(s, s + size)) for b, s in zip(blocks[0], starts))
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1  # evenly spread over the whole history


def test_each_block_is_smoothed_as_serving_smooths_it():
    rs = np.random.default_rng(0)
    full = rs.standard_normal(1000)
    blocks = [0, 50, 100]
    idx = np.concatenate([np.arange(100, 150), np.arange(400, 450), np.arange(900, 950)])
    got = tr._smooth_blocks(full[idx], blocks, CFG.smooth)
    want = smooth_scores(full, CFG.smooth)[idx]  # what the contiguous series scores there
    lead = np.zeros(len(idx), dtype=bool)
    for b in blocks:
        lead[b : b + CFG.smooth - 1] = True
    assert np.all(np.isnan(got[lead]))  # partial smoothings are lead-in only
    np.testing.assert_allclose(got[~lead], want[~lead])
    # One block is the plain smoothing, its first points included.
    np.testing.assert_array_equal(tr._smooth_blocks(full, [0], 6), smooth_scores(full, 6))


def _series(n: int, seed: int) -> Series:
    t = 1.7e9 + 60.0 * np.arange(n)
    rs = np.random.default_rng(seed)
    return Series(t, np.sin(2 * np.pi * t / 3600) + 0.2 * rs.standard_normal(n))


def test_sampled_blocks_fit_the_threshold_all_windows_fit(monkeypatch):
    """The blocks are a sample of the same score distribution: the threshold and the scale
    statistics stay within noise of scoring every window (7,000 of them here), closer than the newest 4,096 windows did."""
    series = [_series(7000, seed) for seed in range(3)]
    sampled = fit_many(series, 60.0, CFG)
    monkeypatch.setattr(tr, "MAX_THRESHOLD_WINDOWS", 10**6)
    every = fit_many(series, 60.0, CFG)
    for a, b in zip(sampled, every):
        assert a.params["enc0.w"].equal(b.params["enc0.w"])  # the same training
        span = b.threshold_ - b.baseline_
        assert abs(a.baseline_ - b.baseline_) < 0.02 * span
        assert abs(a.threshold_ - b.threshold_) < 0.08 * span  # measured: 0.02; newest 4096: 0.04
        for (m1, s1), (m2, s2) in zip(a.scale_stats, b.scale_stats):
            assert abs(m1 - m2) < 0.1 * s2 and s1 == pytest.approx(s2, rel=0.25)
