"""Unit tests of the benchmark metrics (benchmarks/nab.py) on hand-built arrays."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.nab import (
    best_event_f1,
    best_point_f1,
    count_runs,
    evaluate_scored_part,
    event_counts,
    label_runs,
    sanitize_scores,
    training_points,
)

#                 0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17 18 19
LABELS = np.array([0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0])  # 3 windows


def flags_at(*idx: int) -> np.ndarray:
    f = np.zeros(len(LABELS), dtype=bool)
    f[list(idx)] = True
    return f


def test_label_runs_and_count_runs() -> None:
    assert label_runs(LABELS).tolist() == [[2, 5], [10, 12], [16, 19]]
    assert label_runs(np.zeros(4)).shape == (0, 2)
    assert label_runs(np.ones(3)).tolist() == [[0, 3]]
    assert count_runs(np.array([1, 1, 0, 1, 0, 0, 1], dtype=bool)) == 3
    assert count_runs(np.array([], dtype=bool)) == 0


def test_event_counts_known_precision_recall() -> None:
    # Window 1 hit twice (counts once), window 3 hit; outside: run {6,7} and run {14} -> 2 FAs.
    c = event_counts(LABELS, flags_at(2, 4, 6, 7, 14, 17))
    assert (c.windows, c.detected, c.false_alarms, c.n_points) == (3, 2, 2, 20)
    assert c.precision == pytest.approx(2 / 4)
    assert c.recall == pytest.approx(2 / 3)
    assert c.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert c.false_alarms_per_1k == pytest.approx(1000 * 2 / 20)


def test_flag_run_crossing_window_edge_counts_outside_part_as_false_alarm() -> None:
    # Flags 3..7: window 1 detected; the outside part 5..7 is one false-alarm run.
    c = event_counts(LABELS, flags_at(3, 4, 5, 6, 7))
    assert (c.detected, c.false_alarms) == (1, 1)
    # Flags 0..19 everywhere: all windows detected; outside runs are 0-1, 5-9, 12-15, 19.
    c = event_counts(LABELS, np.ones(20, dtype=bool))
    assert (c.detected, c.false_alarms) == (3, 4)
    assert c.precision == pytest.approx(3 / 7)
    assert c.recall == 1.0


def test_event_counts_nothing_flagged() -> None:
    c = event_counts(LABELS, np.zeros(20, dtype=bool))
    assert (c.detected, c.false_alarms, c.precision, c.recall, c.f1) == (0, 0, 0.0, 0.0, 0.0)


def test_sanitize_scores_nan_is_minimum_and_never_flagged() -> None:
    s = sanitize_scores(np.array([np.nan, 2.0, -5.0, np.inf, 0.5]))
    assert np.all(np.isfinite(s))
    assert s[0] < -5.0 and s[0] < 1.0
    assert s[3] > 2.0
    assert s[1:3].tolist() == [2.0, -5.0]


def test_best_event_f1_respects_ten_percent_budget() -> None:
    # 100 points, one window at 50..54. Highest scores: 10 isolated outside points,
    # then the window. Flagging the window needs 15 points (> 10 %), so not allowed.
    labels = np.zeros(100, dtype=int)
    labels[50:55] = 1
    scores = np.zeros(100)
    scores[np.arange(7, 100, 10)] = 5.0  # 7, 17, ..., 97: isolated, outside the window
    scores[50:55] = 4.0
    assert best_event_f1(labels, scores).f1 == 0.0
    assert math.isinf(best_event_f1(labels, scores).threshold)
    # With a 20 % budget the window becomes reachable: 1 TP, 10 FA.
    res = best_event_f1(labels, scores, max_flagged_fraction=0.2)
    assert res.threshold == 4.0
    assert (res.counts.detected, res.counts.false_alarms) == (1, 10)
    assert res.f1 == pytest.approx(2 * (1 / 11) * 1 / (1 / 11 + 1))
    # A single window point on top: precision 1, recall 1, flagging 1 %.
    scores[52] = 9.0
    res = best_event_f1(labels, scores)
    assert (res.f1, res.threshold, res.flagged_fraction) == (1.0, 9.0, 0.01)


def brute_force_best_event_f1(labels: np.ndarray, scores: np.ndarray, frac: float) -> float:
    s = sanitize_scores(scores)
    best = 0.0
    for thr in np.unique(s):
        flags = s >= thr
        if flags.sum() <= frac * len(s):
            best = max(best, event_counts(labels, flags).f1)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_best_event_f1_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    labels = np.zeros(n, dtype=int)
    for start in rng.choice(n - 20, size=3, replace=False):
        labels[start : start + rng.integers(1, 15)] = 1
    scores = rng.normal(size=n) + 2.0 * labels * rng.random()
    scores = np.round(scores, 1)  # ties
    scores[rng.random(n) < 0.05] = np.nan
    for frac in (0.1, 0.3):
        assert best_event_f1(labels, scores, frac).f1 == pytest.approx(
            brute_force_best_event_f1(labels, scores, frac)
        )


@pytest.mark.parametrize("seed", range(5))
def test_best_point_f1_matches_sklearn(seed: int) -> None:
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(seed)
    labels = (rng.random(200) < 0.2).astype(int)
    scores = np.round(rng.normal(size=200) + labels, 1)
    p, r, _ = precision_recall_curve(labels, scores)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    assert best_point_f1(labels, scores) == pytest.approx(f1.max())


def test_evaluate_scored_part_own_threshold() -> None:
    scores = np.full(20, 0.2)
    scores[[3, 11, 7]] = [1.0, 1.5, 3.0]  # windows 1 and 2 hit, one FA at 7
    scores[0] = np.nan
    m = evaluate_scored_part(LABELS, scores)
    assert m["own_event_precision"] == pytest.approx(2 / 3)
    assert m["own_event_recall"] == pytest.approx(2 / 3)
    assert m["own_event_f1"] == pytest.approx(2 / 3)
    assert m["own_false_alarms"] == 1
    assert m["own_false_alarms_per_1k"] == pytest.approx(50.0)
    assert m["n_nan_scores"] == 1
    # No windows: only false-alarm counts are meaningful.
    m = evaluate_scored_part(np.zeros(20, dtype=int), scores)
    assert math.isnan(m["auc_pr"]) and m["own_false_alarms"] == 3


def test_training_points() -> None:
    assert training_points(4032) == 604
    assert training_points(1127) == 169
    assert training_points(22695) == 750
