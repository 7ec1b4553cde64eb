import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from detector import Series, VAEConfig, fit_many, lead_in_points, score_many
from detector.synthetic import ANOMALY_KINDS, labelled_example

STEP = 300.0
DAY = 288  # points per day at 5 minutes


@pytest.fixture(scope="module")
def quality_config() -> VAEConfig:
    # Smaller than the service default so the test stays fast; same architecture.
    return VAEConfig(window=48, hidden=(64, 64), latent=6, max_steps=600, score_scales=(48, 24))


@pytest.fixture(scope="module")
def trained(quality_config):
    # Labels run on for a window after the event: the detector sees it that long.
    after = quality_config.window + quality_config.smooth
    examples = {
        k: labelled_example(k, n=10 * DAY, train=6 * DAY, seed=i, step=STEP, after=after)
        for i, k in enumerate(ANOMALY_KINDS)
    }
    heads = [Series(e.series.timestamps[: 6 * DAY], e.series.values[: 6 * DAY]) for e in examples.values()]
    models = fit_many(heads, STEP, quality_config)  # all four kinds in one batched training
    results = score_many(models, [e.series for e in examples.values()])
    return examples, dict(zip(examples, models)), dict(zip(examples, results))


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_injected_anomalies_rank_high(trained, kind):
    examples, _, results = trained
    e, r = examples[kind], results[kind]
    s = r.score[6 * DAY :]
    y = e.labels[6 * DAY :]
    ap = average_precision_score(y, s)
    # Random scores give AP = share of anomalous points (≤ 10 % here).
    assert ap > 0.5, f"{kind}: AUC-PR {ap:.3f}"
    assert np.nanmax(s[y == 1]) > 1.0, f"{kind}: the anomaly never crosses the threshold"


def test_quiet_stretches_rarely_flag(trained):
    examples, _, results = trained
    false_alarms = 0
    for kind, e in examples.items():
        quiet = (e.labels == 0) & (np.arange(len(e.labels)) >= 6 * DAY)
        flagged = np.nan_to_num(results[kind].flag) * quiet
        false_alarms += int(np.sum(np.diff(np.r_[0, flagged]) == 1))  # runs of flags
        assert flagged.sum() / quiet.sum() < 0.05, kind  # one alarm lasts about half a window
    # Four days of quiet data per series, four series: at most one false alarm each.
    assert false_alarms <= len(examples)


def test_band_contains_most_normal_points_in_source_units(trained):
    examples, _, results = trained
    r, e = results["spike"], examples["spike"]
    normal = (e.labels == 0) & np.isfinite(r.lower)
    inside = (r.observed[normal] >= r.lower[normal]) & (r.observed[normal] <= r.upper[normal])
    assert inside.mean() > 0.9
    assert np.all(r.lower[normal] <= r.expected[normal]) and np.all(r.expected[normal] <= r.upper[normal])


def test_gaps_never_give_nan_for_windows_with_enough_points(trained, quality_config):
    examples, models, _ = trained
    s = examples["spike"].series
    v = s.values.copy()
    v[7 * DAY : 7 * DAY + 10] = np.nan  # short gap: windows keep > half their points
    v[8 * DAY : 8 * DAY + 200] = np.nan  # long gap: windows inside it cannot be judged
    (r,) = score_many([models["spike"]], [Series(s.timestamps, v)])
    w = quality_config.window
    obs = np.isfinite(v).astype(float)
    counts = np.convolve(obs, np.ones(w), "valid")  # observed points per window ending at w-1..
    enough = np.zeros(len(v), bool)
    enough[w - 1 :] = counts >= np.ceil(quality_config.min_observed * w)
    assert np.all(np.isfinite(r.score[enough]))
    assert np.all(np.isnan(r.score[~enough]))
    assert np.all(np.isfinite(r.expected[enough]))


def test_scores_are_causal_and_independent_of_the_batch(trained, quality_config):
    examples, models, results = trained
    s = examples["level_shift"].series
    cut = 8 * DAY
    start = cut - 100 - lead_in_points(quality_config)
    # Scoring a slice with enough lead-in gives the same scores as scoring the whole series.
    part = Series(s.timestamps[start:cut], s.values[start:cut])
    (r,) = score_many([models["level_shift"]], [part])
    np.testing.assert_allclose(r.score[-100:], results["level_shift"].score[cut - 100 : cut], rtol=1e-4, atol=1e-5)


def test_a_series_never_below_zero_keeps_its_band_at_or_above_zero(quality_config):
    # A byte rate: mostly near 0 with bursts; the Gaussian band would reach below 0.
    r = np.random.default_rng(7)
    n = 4 * DAY
    t = 1_700_000_000.0 + STEP * np.arange(n)
    v = np.abs(r.standard_normal(n)) * 1e5 * (r.random(n) < 0.3)
    (m,) = fit_many([Series(t[: 3 * DAY], v[: 3 * DAY])], STEP, quality_config)
    assert m.extra["nonnegative"]
    (res,) = score_many([m], [Series(t, v)])
    ok = np.isfinite(res.lower)
    assert ok.sum() > DAY and np.all(res.lower[ok] >= 0) and np.all(res.expected[ok] >= 0)
    assert np.all(res.upper[ok] >= res.lower[ok])
    # A series that does go below 0 keeps its band as the model has it.
    (m2,) = fit_many([Series(t[: 3 * DAY], v[: 3 * DAY] - 5e4)], STEP, quality_config)
    assert not m2.extra["nonnegative"]
