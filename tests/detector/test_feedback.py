"""Feedback records (detector.feedback) and what training does with them (detector.train)."""

import json
import math

import numpy as np
import pytest
import torch

from detector import ModelFileError, Series, VAEConfig, fit_many, load_model, save_model, score_many
from detector import feedback as fbk
from detector.feedback import EXCLUDE, NORMAL, Feedback, FeedbackError
from detector.series import robust_stats
from detector.synthetic import seasonal_series

T0 = 1_700_000_000.0
STEP = 300.0
N, AT, REPEAT = 1200, 1000, 1000 + 288  # the pattern, and its repeat a day later
PATTERN = 1.5 * np.array([6, 10, 14, 16, 16, 16, 16, 14, 10, 6, 3, 1.0])


# -- records -----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"start": T0 + 60, "end": T0}, "before end"),
    ({"start": T0, "end": T0}, "before end"),
    ({"start": T0, "end": T0 + 40 * 86400}, "days"),
    ({"start": T0 * 1000, "end": T0 * 1000 + 60}, "not milliseconds"),
    ({"start": 1_700_000, "end": 1_700_060}, "year 2000"),
    ({"start": math.nan, "end": T0}, "finite"),
    ({"start": "1700000000", "end": T0}, "finite"),
    ({"start": True, "end": T0}, "finite"),
    ({"start": T0, "end": T0 + 60, "kind": "ignore"}, "kind"),
    ({"start": T0, "end": T0 + 60, "source": "email"}, "source"),
    ({"start": T0, "end": T0 + 60, "ref": "x" * 200}, "ref"),
    ({"start": T0, "end": T0 + 60, "comment": 3}, "strings"),
])
def test_bad_records_are_refused_with_a_sentence(kw, match):
    with pytest.raises(FeedbackError, match=match):
        Feedback(**kw)


def test_a_new_record_may_not_end_far_in_the_future():
    with pytest.raises(FeedbackError, match="future"):
        fbk.check_new(Feedback(start=T0, end=T0 + 2 * 86400), now=T0)
    assert fbk.check_new(Feedback(start=T0 - 600, end=T0 + 3600), now=T0).end == T0 + 3600


def test_record_round_trip_and_unknown_fields():
    fb = Feedback(start=T0, end=T0 + 600, kind=EXCLUDE, comment="c" * 5000, source="alertmanager",
                  ref="abc", created_at=T0 + 1)
    assert len(fb.comment) == fbk.MAX_COMMENT
    assert Feedback.from_dict(json.loads(json.dumps(fb.to_dict()))) == fb
    with pytest.raises(FeedbackError, match="unknown feedback fields: colour"):
        Feedback.from_dict({**fb.to_dict(), "colour": "red"})
    with pytest.raises(FeedbackError, match="needs start and end"):
        Feedback.from_dict({"start": T0})
    with pytest.raises(FeedbackError, match="JSON object"):
        Feedback.from_dict([T0, T0 + 1])


def test_merge_deduplicates_by_reference_and_keeps_the_newest():
    a = Feedback(T0, T0 + 60, source="alertmanager", ref="s1")
    moved = Feedback(T0, T0 + 120, source="alertmanager", ref="s1")  # the same silence, read again
    recs, added = fbk.merge([a], moved)
    assert not added and recs == [a]
    recs, added = fbk.merge(recs, Feedback(T0, T0 + 60))  # an API record without a reference
    assert added and len(recs) == 2
    assert fbk.merge(recs, Feedback(T0, T0 + 60))[1] is False
    many: list = []
    for i in range(fbk.MAX_RECORDS + 5):
        many, _ = fbk.merge(many, Feedback(T0 + i, T0 + i + 60))
    assert len(many) == fbk.MAX_RECORDS and many[-1].start == T0 + fbk.MAX_RECORDS + 4
    assert fbk.prune(many, T0 + 100) == [r for r in many if r.end >= T0 + 100]


def test_window_mask_covers_every_window_that_holds_a_marked_point():
    t = T0 + STEP * np.arange(40)
    fb = [Feedback(t[10], t[12], kind=NORMAL), Feedback(t[30], t[31], kind=EXCLUDE)]
    m = fbk.window_mask(t, fb, NORMAL, reach=3 * STEP)  # windows of 4 points
    assert np.nonzero(m)[0].tolist() == list(range(10, 16))
    assert np.nonzero(fbk.point_mask(t, fb, EXCLUDE))[0].tolist() == [30, 31]


# -- training ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg():
    return VAEConfig(window=16, hidden=(24, 24), latent=3, max_epochs=30, max_steps=300, batch_size=32,
                     mc_samples=4, score_scales=(16, 8), smooth=3)


def _with_pattern(seed: int) -> tuple[Series, Series, Feedback]:
    """Training history with the pattern at AT; the continuation with a repeat at REPEAT."""
    full = seasonal_series(N + 300, step=STEP, seed=seed)
    v = full.values.copy()
    v[AT:AT + len(PATTERN)] += PATTERN
    train = Series(full.timestamps[:N], v[:N])
    v[REPEAT:REPEAT + len(PATTERN)] += PATTERN
    fb = Feedback(start=float(full.timestamps[AT]), end=float(full.timestamps[AT + len(PATTERN) - 1]),
                  comment="promvae: false alarm, nightly backup")
    return train, Series(full.timestamps, v), fb


@pytest.fixture(scope="module")
def marked_normal(cfg):
    train, later, fb = _with_pattern(seed=5)
    plain, normal = fit_many([train, train], STEP, cfg, feedback=[[], [fb]])
    return train, later, fb, plain, normal


def _peak(result, at: int, cfg) -> float:
    return float(np.nanmax(result.score[at:at + len(PATTERN) + cfg.window + cfg.smooth]))


def test_a_false_alarm_marked_normal_no_longer_fires_on_its_repeat(marked_normal, cfg):
    _, later, fb, plain, normal = marked_normal
    r_plain, r_normal = score_many([plain, normal], [later, later])
    # Retrained on the same data without feedback, the repeat a day later still fires; with
    # the range marked normal neither the range nor its repeat does.
    assert _peak(r_plain, REPEAT, cfg) >= 1.0
    assert _peak(r_normal, REPEAT, cfg) < 1.0
    assert _peak(r_normal, AT, cfg) <= fbk.NORMAL_TARGET + 1e-6
    applied = normal.extra["feedback"]
    assert applied["normal_windows"] == len(PATTERN) + cfg.window - 1
    assert applied["threshold_lifted"] > 1.0 and normal.threshold_ > plain.threshold_
    assert normal.feedback == [fb] and plain.feedback == []


def test_normal_feedback_changes_the_threshold_only(marked_normal):
    _, _, _, plain, normal = marked_normal
    # NORMAL ranges are ordinary training data: same weights, same baseline, same scales.
    for name, w in plain.params.items():
        torch.testing.assert_close(w, normal.params[name])
    assert (plain.baseline_, plain.scale_stats, plain.center) == (normal.baseline_, normal.scale_stats, normal.center)


def test_a_quiet_range_marked_normal_costs_nothing(cfg):
    train = seasonal_series(600, step=STEP, seed=2)
    fb = Feedback(start=float(train.timestamps[300]), end=float(train.timestamps[320]))
    plain, normal = fit_many([train, train], STEP, cfg, feedback=[[], [fb]])
    assert normal.extra["feedback"]["threshold_lifted"] == 1.0
    assert normal.threshold_ == plain.threshold_


def test_excluded_range_leaves_training_normalisation_and_threshold(cfg):
    clean = seasonal_series(800, step=STEP, seed=4)
    broken = Series(clean.timestamps, clean.values.copy())
    broken.values[100:400] = 0.0  # a broken exporter reported 0 for a day
    fb = Feedback(start=float(clean.timestamps[100]), end=float(clean.timestamps[399]), kind=EXCLUDE)
    as_is, excluded, ref = fit_many([broken, broken, clean], STEP, cfg, feedback=[[], [fb], []])
    assert excluded.n_train == as_is.n_train - 300 == 500
    assert excluded.extra["feedback"]["excluded_points"] == 300
    # The robust normalisation no longer sees the zeros: it is the clean points'.
    kept = np.r_[clean.values[:100], clean.values[400:]]
    assert (excluded.center, excluded.scale) == pytest.approx(robust_stats(kept))
    assert abs(as_is.center - ref.center) > abs(excluded.center - ref.center)
    # Trained on the zeros, a model finds a new outage normal once it has begun; with the
    # zeros excluded the outage keeps firing.
    outage = Series(clean.timestamps, clean.values.copy())
    outage.values[-40:] = 0.0
    r_as_is, r_excl = score_many([as_is, excluded], [outage, outage])
    assert np.nanmin(r_excl.score[-20:]) >= 1.0 > np.nanmax(r_as_is.score[-20:])


def test_feedback_that_leaves_no_windows_is_an_insufficient_data_error(cfg):
    s = seasonal_series(300, step=STEP, seed=1)
    fb = Feedback(start=float(s.timestamps[0]), end=float(s.timestamps[-1]), kind=EXCLUDE)
    (res,) = fit_many([s], STEP, cfg, feedback=[[fb]])
    assert isinstance(res, Exception) and "observed points" in str(res)


def test_feedback_list_must_match_the_series(cfg):
    with pytest.raises(ValueError, match="2 feedback lists for 1 series"):
        fit_many([seasonal_series(300, step=STEP)], STEP, cfg, feedback=[[], []])


# -- store -------------------------------------------------------------------------------

def test_feedback_is_stored_with_the_model(tmp_path, marked_normal):
    _, later, fb, _, normal = marked_normal
    save_model(normal, tmp_path, "m")
    back = load_model(tmp_path, "m")
    assert back.feedback == [fb]
    assert back.extra["feedback"] == normal.extra["feedback"]
    r1, r2 = score_many([normal, back], [later, later])
    np.testing.assert_allclose(r1.score, r2.score, rtol=1e-6, atol=1e-9)  # float32 weights


def _rewrite_meta(path, change):
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = json.loads(header["__metadata__"]["promvae"])
    change(meta)
    header["__metadata__"]["promvae"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + blob[8 + n:])


def test_a_model_file_from_before_feedback_loads_with_none(tmp_path, marked_normal):
    *_, normal = marked_normal
    path = save_model(normal, tmp_path, "old")
    _rewrite_meta(path, lambda meta: meta.pop("feedback"))
    assert load_model(tmp_path, "old").feedback == []


def test_a_stored_record_that_is_invalid_makes_the_file_incompatible(tmp_path, marked_normal):
    *_, normal = marked_normal
    path = save_model(normal, tmp_path, "bad")
    _rewrite_meta(path, lambda meta: meta["feedback"][0].update(end=0.0))
    with pytest.raises(ModelFileError, match="incompatible.*before end"):
        load_model(tmp_path, "bad")
