"""Deployed backtests: retrains on schedule, causal, early retrains for a change that stays."""

import numpy as np
import pytest

from detector import VAEConfig
from detector.deploy import Deployment, deployed_many
from detector.synthetic import inject, seasonal_series

STEP = 300.0
DAY = 288


@pytest.fixture(scope="module")
def small() -> VAEConfig:
    return VAEConfig(window=32, hidden=(32, 32), latent=4, max_steps=120, score_scales=(32, 16))


@pytest.fixture(scope="module")
def shifted():
    s = seasonal_series(10 * DAY, step=STEP, seed=5)
    return inject(s, "level_shift", 6 * DAY, 4 * DAY, 12.0)  # ~6 sigma, and it stays


def test_retrains_every_day_and_adopts_a_change_that_stays(small, shifted):
    (r,) = deployed_many([shifted], [3 * DAY - 1], [STEP], small, Deployment())
    t0 = shifted.timestamps[3 * DAY]
    regular = [t for t in r.retrains if t not in r.early]
    assert regular[:3] == [t0 + 86400 * k for k in (1, 2, 3)]
    assert len(regular) == 6 and r.failed == 0
    score = r.result.score
    # The shift is an alert when it happens...
    assert np.nanmax(score[6 * DAY: 6 * DAY + 36]) >= 1
    # ...and the policy adopts it: an early retrain within hours, then the flag goes down.
    at = shifted.timestamps[6 * DAY]
    after = [t for t in r.early if t > at]
    assert r.adaptations >= 1 and after and after[0] <= at + 6 * 3600
    # The admitted scores bridge to the second retrain after the change (the regular one, a
    # day of the new level in its history), then leave the calibration reference: one more
    # short flag there (3 h here) is the price of not staying deaf for calibration_span.
    assert np.mean(score[7 * DAY:] >= 1) < 0.08
    # Without the policy, the flag stays up until daily retrains learn the new level.
    (off,) = deployed_many([shifted], [3 * DAY - 1], [STEP], small, Deployment(adapt_after=None))
    day = slice(6 * DAY, 7 * DAY)
    assert not off.early and off.adaptations == 0
    assert np.mean(off.result.score[day] >= 1) > 2 * np.mean(score[day] >= 1)


def test_deployed_scores_are_causal(small, shifted):
    cut = 7 * DAY
    (full,) = deployed_many([shifted], [3 * DAY - 1], [STEP], small, Deployment())
    head = type(shifted)(shifted.timestamps[:cut], shifted.values[:cut])
    (part,) = deployed_many([head], [3 * DAY - 1], [STEP], small, Deployment())
    np.testing.assert_allclose(part.result.score, full.result.score[:cut], rtol=1e-5, atol=1e-6)


def test_a_series_too_short_for_its_first_model_gets_the_error(small):
    s = seasonal_series(40, step=STEP)
    (r,) = deployed_many([s], [20], [STEP], small, Deployment())
    assert isinstance(r, Exception)


def test_adoption_without_early_retrain_raises_the_threshold_only(small, shifted):
    # The A/B knob of benchmarks/accuracy.py (adapt_retrain=false): the change is admitted
    # (counted) but no model is trained for it before the next regular slot.
    (r,) = deployed_many([shifted], [3 * DAY - 1], [STEP], small, Deployment(adapt_retrain=False))
    assert r.adaptations >= 1 and not r.early
    t0 = shifted.timestamps[3 * DAY]
    assert [t for t in r.retrains] == [t0 + 86400 * k for k in range(1, len(r.retrains) + 1)]
