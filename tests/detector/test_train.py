import numpy as np
import pytest
import torch

from detector import InsufficientDataError, Series, fit_many, score_many
from detector.synthetic import seasonal_series


def _series(n: int, seed: int, step: float = 300.0) -> Series:
    return seasonal_series(n, step=step, seed=seed)


def test_batched_training_equals_training_each_alone(tiny_config):
    # Different lengths and a gap: they train together through masks and padding.
    a, b, c = _series(400, 1), _series(300, 2), _series(500, 3)
    b.values[100:140] = np.nan
    together = fit_many([a, b, c], 300.0, tiny_config)
    alone = [fit_many([s], 300.0, tiny_config)[0] for s in (a, b, c)]
    for m_batch, m_alone, s in zip(together, alone, (a, b, c)):
        for name, w in m_batch.params.items():
            torch.testing.assert_close(w, m_alone.params[name], rtol=1e-4, atol=1e-5)
        r1, r2 = score_many([m_batch, m_alone], [s, s])
        np.testing.assert_allclose(r1.score, r2.score, rtol=1e-3, atol=1e-4)
        assert m_batch.threshold_ == pytest.approx(m_alone.threshold_, rel=1e-3)


def test_models_in_one_batch_differ_and_are_finite(tiny_config):
    models = fit_many([_series(400, 1), _series(400, 2)], 300.0, tiny_config)
    assert not torch.equal(models[0].params["dec_mu.w"], models[1].params["dec_mu.w"])
    for m in models:
        assert all(torch.isfinite(v).all() for v in m.params.values())
        assert np.isfinite(m.threshold_) and m.threshold_ > m.baseline_


def test_series_that_cannot_train_get_an_error_not_a_crash(tiny_config):
    empty = Series(np.arange(300) * 300.0, np.full(300, np.nan))
    short = _series(20, 1)
    sparse = _series(400, 1)
    sparse.values[::2] = np.nan  # half missing everywhere: no window has enough points
    sparse.values[::3] = np.nan
    good = _series(400, 4)
    res = fit_many([empty, short, sparse, good], 300.0, tiny_config)
    assert isinstance(res[0], InsufficientDataError) and "observed points" in str(res[0])
    assert isinstance(res[1], InsufficientDataError)
    assert isinstance(res[2], InsufficientDataError)
    assert not isinstance(res[3], Exception)


def test_constant_and_huge_series_train_and_score_finite(tiny_config):
    const = Series(np.arange(400) * 300.0, np.full(400, 42.0))
    huge = _series(400, 5)
    huge.values *= 1e300
    models = fit_many([const, huge], 300.0, tiny_config)
    assert not any(isinstance(m, Exception) for m in models)
    res = score_many(models, [const, huge])
    for r in res:
        scored = r.score[tiny_config.window - 1 :]
        assert np.all(np.isfinite(scored))
    # A constant series that moves is anomalous.
    moved = Series(const.timestamps, const.values.copy())
    moved.values[-5:] = 43.0
    (r,) = score_many([models[0]], [moved])
    assert r.score[-1] > 1


def test_progress_reports_reach_the_total(tiny_config):
    seen = []
    fit_many([_series(400, s) for s in range(3)], 300.0, tiny_config, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (3, 3) and all(t == 3 for _, t in seen)


def test_pause_comes_before_every_step_and_threshold_chunk_and_changes_nothing(tiny_config):
    """The service's trainer waits in pause() while a poll runs; the models are the same."""
    import torch

    series = [_series(400, s) for s in range(2)]
    calls = []
    paused = fit_many(series, 300.0, tiny_config, pause=lambda: calls.append(1))
    plain = fit_many(series, 300.0, tiny_config)
    assert len(calls) > tiny_config.max_steps // 2  # the steps run (early stopping may end some)
    for a, b in zip(paused, plain):
        assert a.threshold_ == b.threshold_
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_held_out_gap_lifts_in_sample_scores_never_lowers_them():
    from detector.train import _held_out_shift

    raw = np.c_[np.r_[np.zeros(80), np.full(20, 3.0)], np.r_[np.full(80, 5.0), np.zeros(20)]]
    out = _held_out_shift(raw, 20)
    assert np.all(out[:80, 0] == 3.0) and np.all(out[80:, 0] == 3.0)  # lifted by the gap
    assert np.all(out[:, 1] == raw[:, 1])  # held-back scores lower: nothing moves
    assert _held_out_shift(raw, 2) is raw  # too short a tail to say anything
