"""Streaming calibration: rarer flags on drifting scores, the new-normal policy, grid refits."""

import numpy as np

from detector.calibration import CalibrationConfig, Calibrator

STEP = 300.0
T0 = 1_700_000_000.0 - (1_700_000_000.0 % 3600)


def drifting_scores(n: int = 3000, seed: int = 0) -> np.ndarray:
    """Model-normalised scores whose level creeps up: the model's own threshold (1.0) is
    crossed more and more often, as on data the model was not trained on."""
    r = np.random.default_rng(seed)
    return 0.3 * r.standard_normal(n) + np.linspace(0.0, 1.0, n)


def test_streaming_threshold_flags_drift_rarely_where_the_model_threshold_floods():
    s = drifting_scores()
    t = T0 + STEP * np.arange(len(s))
    cal = Calibrator(CalibrationConfig(adapt_after=0))
    out = cal.apply(t, s, STEP)
    late = slice(1500, None)
    own, calibrated = np.mean(s[late] >= 1), np.mean(out[late] >= 1)
    assert own > 0.2  # the model's own threshold floods
    assert calibrated < 0.1 and calibrated < own / 2
    assert cal.threshold > 1.0


def test_calibration_never_flags_more_than_the_model_threshold():
    r = np.random.default_rng(1)
    s = 0.05 * r.standard_normal(3000)  # far below the model's threshold
    t = T0 + STEP * np.arange(len(s))
    cal = Calibrator(CalibrationConfig(adapt_after=0))
    out = cal.apply(t, s, STEP)
    assert cal.threshold >= 1.0
    assert not np.any(out[s < 1] >= 1)


def test_a_level_shift_that_stays_becomes_the_new_normal():
    r = np.random.default_rng(2)
    s = 0.2 * r.standard_normal(2000)
    s[1200:] += 4.0  # the series moved and stays there
    t = T0 + STEP * np.arange(len(s))
    cfg = CalibrationConfig(adapt_after=36)
    cal = Calibrator(cfg)
    out = cal.apply(t, s, STEP)
    assert np.all(out[1200:1200 + 30] >= 1)  # an alert when it happens
    assert cal.adaptations >= 1 and cal.adapt_due
    assert cal.adapted_at[0] == t[1200 + 35]
    assert np.mean(out[1400:] >= 1) < 0.05  # not for weeks
    # With the policy off, the flag stays up.
    off = Calibrator(CalibrationConfig(adapt_after=0)).apply(t, s, STEP)
    assert np.mean(off[1400:] >= 1) > 0.9


def test_one_point_at_a_time_equals_one_block():
    """The service feeds a point per poll, a backtest a day at once: same scores."""
    s = drifting_scores(1500, seed=3)
    s[700:760] += 5.0
    t = T0 + STEP * np.arange(len(s))
    block = Calibrator(CalibrationConfig()).apply(t, s, STEP)
    one = Calibrator(CalibrationConfig())
    single = np.concatenate([one.apply(t[i:i + 1], s[i:i + 1], STEP) for i in range(len(s))])
    np.testing.assert_allclose(single, block)


def test_points_fed_twice_count_once_and_state_restores():
    s = drifting_scores(800, seed=4)
    t = T0 + STEP * np.arange(len(s))
    a = Calibrator(CalibrationConfig())
    a.apply(t[:500], s[:500], STEP)
    a.apply(t[400:500], s[400:500], STEP)  # a restart rescores the newest points
    b = Calibrator.restore(a.config, a.reference.copy(), a.state())
    c = Calibrator(CalibrationConfig())
    c.apply(t[:500], s[:500], STEP)
    np.testing.assert_array_equal(a.reference, c.reference)
    np.testing.assert_allclose(b.apply(t[500:], s[500:], STEP), c.apply(t[500:], s[500:], STEP))


def test_for_step_converts_durations():
    c = CalibrationConfig.for_step(60.0, adapt_after=3 * 3600.0)
    assert c.adapt_after == 180 and c.refit == 60 and c.span == 14 * 1440
    assert CalibrationConfig.for_step(60.0, adapt_after=None).adapt_after == 0


def test_an_adopted_change_does_not_leave_the_series_deaf_after_its_retrains():
    # Admitted scores are a bridge to the retrains: once a model trained `bridge` after the
    # change began scores the series, they leave the reference and the threshold is what it
    # was. Models keyed by trained_to, in seconds.
    r = np.random.default_rng(5)
    s = 0.3 * r.standard_normal(3000)
    s[1000:1300] += 6.0  # the old model meets the new level: flagged, then adopted
    t = T0 + STEP * np.arange(len(s))
    cfg = CalibrationConfig(adapt_after=36, bridge=288)  # a day at 5 min
    cal = Calibrator(cfg)
    cal.apply(t[:1000], s[:1000], STEP, model_key=t[0])
    before = cal.threshold
    out_old = cal.apply(t[1000:1300], s[1000:1300], STEP, model_key=t[0])
    assert cal.adaptations == 1 and np.all(out_old[:30] >= 1)
    assert cal.bridge_start == t[1000]
    bridged = cal.threshold
    assert bridged > 3 * before  # while the old model scores the new level: no flood
    # The early retrain, then a regular one 20 h into the new level: both saw little of it.
    cal.apply(t[1300:1400], s[1300:1400], STEP, model_key=t[1036])
    cal.apply(t[1400:1600], s[1400:1600], STEP, model_key=t[1240])
    assert cal.threshold > 3 * before  # still bridging
    cal.apply(t[1600:1700], s[1600:1700], STEP, model_key=t[1288])  # a day after the change
    assert cal.threshold < 1.2 * before  # hears the next anomaly again
    late = cal.apply(t[1700:], s[1700:] + np.where(np.arange(1300) == 600, 3.0, 0.0), STEP,
                     model_key=t[1288])
    assert late[600] >= 1  # a 10-sigma spike a week later is flagged
    # A restart keeps the bridge state.
    a = Calibrator(cfg)
    a.apply(t[:1300], s[:1300], STEP, model_key=t[0])
    b = Calibrator.restore(a.config, a.reference.copy(), a.state())
    assert (b.model_key, b.bridged, b.bridge_start) == (a.model_key, a.bridged, a.bridge_start)
    # bridge 0: the admitted scores stay (for the span), whatever models come.
    keep = Calibrator(CalibrationConfig(adapt_after=36, bridge=0))
    keep.apply(t[:1300], s[:1300], STEP, model_key=t[0])
    keep.apply(t[1300:1700], s[1300:1700], STEP, model_key=t[1600])
    assert keep.threshold > 3 * before


def test_the_reference_is_float32_and_bounded():
    """16 KB a series at most (MAX_REFERENCE float32), whatever the span; restored the same."""
    import math as _math

    from detector.calibration import MAX_REFERENCE, CalibrationConfig, Calibrator

    cfg = CalibrationConfig.for_step(60.0)  # 14 days at 1 minute: 20,160 points
    c = Calibrator(cfg)
    t = 60.0 * np.arange(30_000)
    c.apply(t, np.random.default_rng(0).normal(0, 0.1, len(t)), 60.0)
    assert c.reference.dtype == np.float32
    assert len(c.reference) == _math.ceil(cfg.span / c.stride) <= MAX_REFERENCE
    back = Calibrator.restore(cfg, c.reference, c.state())
    assert back.reference.dtype == np.float32


def test_refits_come_at_the_series_phase_on_the_grid(monkeypatch):
    """A fleet refits spread over the hour: each calibrator at its own phase, not all of them
    in the poll at the boundary (0.2 ms a refit, 2 s at 10,000 series)."""
    from detector.calibration import refit_offset

    cfg = CalibrationConfig(min_reference=1, refit=12)  # hourly at 5 min
    assert refit_offset(0.0, cfg.refit, STEP) == 0.0
    assert refit_offset(86400.0 + 1000.0, cfg.refit, STEP) == 900.0  # on the grid, mod 1 h
    t = T0 + STEP * np.arange(48)
    s = np.zeros(len(t))
    refits: list[float] = []
    for phase in (0.0, 900.0):
        cal = Calibrator(cfg, phase=phase)
        monkeypatch.setattr(cal, "_refit", lambda c=cal: refits.append(float(c.last_t)))
        refits.clear()
        cal.apply(t, s, STEP)
        assert refits and all((x - phase) % 3600 == 0 for x in refits)
        assert len(refits) == 4
