"""NAB loading and the evaluation metrics of /work/shared/data/README.md.

Everything here is pure numpy except :func:`auc_pr`, which is sklearn's
``average_precision_score`` as the protocol prescribes.

Conventions used by all metric functions:

* ``labels`` is a 0/1 array over the *scored* part of one series; a window
  is a maximal run of consecutive 1s (NAB windows never touch, so runs and
  windows coincide; the loader checks this).
* ``scores`` is a float array of the same length; NaN (warm-up) is treated as
  the minimum score and is never flagged (see :func:`sanitize_scores`).
* A point is flagged at threshold ``thr`` iff ``score >= thr``.
* Event precision is ``TP_events / (TP_events + FA_runs)`` and is 0 when
  nothing is flagged (sklearn's ``zero_division=0`` convention); F1 is 0
  when precision + recall is 0.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

EVAL_CATEGORIES: tuple[str, ...] = ("realKnownCause", "realTraffic", "artificialWithAnomaly")
NO_ANOMALY_CATEGORY = "artificialNoAnomaly"
ALL_CATEGORIES: tuple[str, ...] = EVAL_CATEGORIES + (NO_ANOMALY_CATEGORY,)
OWN_THRESHOLD = 1.0
MAX_FLAGGED_FRACTION = 0.1


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Series:
    """One NAB series with its point labels and training-part length."""

    key: str  # "category/name.csv", as in combined_windows.json
    category: str
    timestamps: np.ndarray  # (N,) float unix seconds, file order
    values: np.ndarray  # (N,) float
    labels: np.ndarray  # (N,) int8, 1 inside an anomaly window
    train_points: int

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def scored_labels(self) -> np.ndarray:
        return self.labels[self.train_points :]

    @property
    def n_scored_windows(self) -> int:
        return len(label_runs(self.scored_labels))


def training_points(n: int) -> int:
    """Length of the training part: ``min(floor(0.15 * n), 750)`` (NAB's probation)."""
    return int(min(math.floor(0.15 * n), 750))


def _to_unix_seconds(strings: object) -> np.ndarray:
    """NAB times ('YYYY-MM-DD HH:MM:SS[.ffffff]', UTC) as unix seconds."""
    out = []
    for text in strings:  # type: ignore[attr-defined]
        dt = datetime.fromisoformat(str(text).strip())
        out.append((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp())
    return np.asarray(out, dtype=np.float64)


def load_series(data_dir: Path, key: str, windows: list[list[str]]) -> Series:
    """Read ``data_dir/data/<key>`` and label it with its ``[start, end]`` windows (inclusive)."""
    with open(data_dir / "data" / key, newline="") as f:
        rows = list(csv.DictReader(f))
    timestamps = _to_unix_seconds(r["timestamp"] for r in rows)
    values = np.asarray([float(r["value"]) for r in rows], dtype=np.float64)
    labels = np.zeros(len(values), dtype=np.int8)
    for start, end in windows:
        lo, hi = _to_unix_seconds([start, end])
        labels[(timestamps >= lo) & (timestamps <= hi)] = 1
    # Every window must be one contiguous run of points, otherwise runs != windows.
    n_nonempty = sum(
        bool(np.any((timestamps >= lo) & (timestamps <= hi)))
        for lo, hi in (_to_unix_seconds(w) for w in windows)
    )
    if len(label_runs(labels)) != n_nonempty:
        raise ValueError(f"{key}: windows are not contiguous runs of points")
    return Series(
        key=key,
        category=key.split("/", 1)[0],
        timestamps=timestamps,
        values=values,
        labels=labels,
        train_points=training_points(len(values)),
    )


def load_nab(
    data_dir: Path,
    categories: tuple[str, ...] = ALL_CATEGORIES,
    limit_per_category: int | None = None,
) -> list[Series]:
    """Load all series of ``categories`` (sorted by name), optionally the first N of each."""
    with open(data_dir / "labels" / "combined_windows.json") as f:
        all_windows: dict[str, list[list[str]]] = json.load(f)
    out: list[Series] = []
    for category in categories:
        files = sorted((data_dir / "data" / category).glob("*.csv"))
        if limit_per_category is not None:
            files = files[:limit_per_category]
        for path in files:
            key = f"{category}/{path.name}"
            if key not in all_windows:
                raise KeyError(f"{key} missing from combined_windows.json")
            out.append(load_series(data_dir, key, all_windows[key]))
    return out


def infer_step(timestamps: np.ndarray) -> float:
    """Typical sampling step in seconds: median absolute positive difference."""
    d = np.abs(np.diff(timestamps))
    d = d[d > 0]
    if len(d) == 0:
        raise ValueError("cannot infer step from fewer than two distinct timestamps")
    return float(np.median(d))


# ------------------------------------------------------------------------ metrics


def sanitize_scores(scores: np.ndarray) -> np.ndarray:
    """Replace NaN/-inf by a value below every finite score and below 1, +inf by one above.

    The replacement keeps the ranking of finite scores, ranks NaN points last
    (never flagged at any threshold a finite score reaches, nor at the own
    threshold 1.0), and makes the array acceptable to sklearn.
    """
    s = np.asarray(scores, dtype=np.float64).copy()
    finite = np.isfinite(s)
    lo = min(float(s[finite].min()), 0.0) - 1.0 if finite.any() else -1.0
    hi = max(float(s[finite].max()), OWN_THRESHOLD) + 1.0 if finite.any() else OWN_THRESHOLD + 1.0
    s[np.isnan(s) | np.isneginf(s)] = lo
    s[np.isposinf(s)] = hi
    return s


def label_runs(mask: np.ndarray) -> np.ndarray:
    """Maximal runs of true values as a (k, 2) int array of ``[start, stop)`` indices."""
    m = np.asarray(mask, dtype=bool).astype(np.int8)
    d = np.diff(np.concatenate(([0], m, [0])))
    starts = np.flatnonzero(d == 1)
    stops = np.flatnonzero(d == -1)
    return np.stack([starts, stops], axis=1) if len(starts) else np.zeros((0, 2), dtype=np.int64)


def count_runs(mask: np.ndarray) -> int:
    """Number of maximal runs of true values."""
    m = np.asarray(mask, dtype=bool)
    if len(m) == 0:
        return 0
    return int(m[0]) + int(np.count_nonzero(m[1:] & ~m[:-1]))


@dataclass(frozen=True)
class EventCounts:
    """Event-level counts for one flag array; derived rates as properties."""

    windows: int  # windows in the scored part
    detected: int  # windows with at least one flagged point
    false_alarms: int  # runs of consecutive flagged points outside windows
    n_points: int  # scored points

    @property
    def precision(self) -> float:
        den = self.detected + self.false_alarms
        return self.detected / den if den else 0.0

    @property
    def recall(self) -> float:
        return self.detected / self.windows if self.windows else 0.0

    @property
    def f1(self) -> float:
        return _f1(self.precision, self.recall)

    @property
    def false_alarms_per_1k(self) -> float:
        return 1000.0 * self.false_alarms / self.n_points if self.n_points else 0.0


def _f1(p: float, r: float) -> float:
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def event_counts(labels: np.ndarray, flags: np.ndarray) -> EventCounts:
    """Detected windows and false-alarm runs for a boolean ``flags`` array."""
    y = np.asarray(labels).astype(bool)
    f = np.asarray(flags).astype(bool)
    if y.shape != f.shape:
        raise ValueError(f"labels {y.shape} and flags {f.shape} differ in shape")
    runs = label_runs(y)
    csum = np.concatenate(([0], np.cumsum(f)))
    detected = int(np.count_nonzero(csum[runs[:, 1]] - csum[runs[:, 0]] > 0))
    return EventCounts(
        windows=len(runs),
        detected=detected,
        false_alarms=count_runs(f & ~y),
        n_points=len(y),
    )


def _score_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct scores in decreasing order and each point's group index into them.

    Flagging at threshold ``values[g]`` flags exactly the points with group <= g.
    """
    neg_values, inv = np.unique(-scores, return_inverse=True)
    return -neg_values, inv.reshape(-1)


def best_point_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best point-wise F1 over all thresholds (NaN scores never flagged)."""
    y = np.asarray(labels).astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return 0.0
    values, g = _score_groups(sanitize_scores(scores))
    flagged = np.cumsum(np.bincount(g, minlength=len(values)))
    tp = np.cumsum(np.bincount(g[y], minlength=len(values)))
    return float(np.max(2.0 * tp / (flagged + n_pos)))


def auc_pr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Point-wise average precision (sklearn), NaN scores ranked last."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(labels).astype(int)
    if y.sum() == 0:
        return float("nan")
    return float(average_precision_score(y, sanitize_scores(scores)))


@dataclass(frozen=True)
class BestEventF1:
    """Result of :func:`best_event_f1`; ``threshold`` is inf when nothing may be flagged."""

    f1: float
    threshold: float
    counts: EventCounts
    flagged_fraction: float


def best_event_f1(
    labels: np.ndarray, scores: np.ndarray, max_flagged_fraction: float = MAX_FLAGGED_FRACTION
) -> BestEventF1:
    """Best event F1 over *every* threshold that flags at most ``max_flagged_fraction`` points.

    Exact, not a quantile grid: every distinct score value is a candidate, and
    the counts for all of them are obtained at once in O(n log n). Adding the
    points of one score group to the flagged set (a) detects a window when the
    first of its points is added, (b) adds one false-alarm run per added
    outside point, minus one for each outside neighbour pair that becomes
    joined (the pair joins at the later of its two groups).
    """
    y = np.asarray(labels).astype(bool)
    s = sanitize_scores(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    n = len(y)
    runs = label_runs(y)
    nothing = BestEventF1(0.0, math.inf, EventCounts(len(runs), 0, 0, n), 0.0)
    if n == 0:
        return nothing
    values, g = _score_groups(s)
    G = len(values)
    flagged = np.cumsum(np.bincount(g, minlength=G))
    allowed = flagged <= max_flagged_fraction * n
    if not allowed.any():
        return nothing

    first_hit = np.array([g[a:b].min() for a, b in runs], dtype=np.int64)
    detected = np.cumsum(np.bincount(first_hit, minlength=G))
    out = ~y
    joined = out[:-1] & out[1:]
    joins_at = np.maximum(g[:-1], g[1:])[joined]
    fa = np.cumsum(np.bincount(g[out], minlength=G)) - np.cumsum(np.bincount(joins_at, minlength=G))

    den = detected + fa
    precision = np.divide(detected, den, out=np.zeros(G), where=den > 0)
    recall = detected / len(runs) if len(runs) else np.zeros(G)
    ps = precision + recall
    f1 = np.divide(2 * precision * recall, ps, out=np.zeros(G), where=ps > 0)
    f1[~allowed] = -1.0
    best = int(np.argmax(f1))  # ties -> highest threshold (fewest flags)
    if f1[best] <= 0.0:
        return nothing
    counts = EventCounts(len(runs), int(detected[best]), int(fa[best]), n)
    return BestEventF1(float(f1[best]), float(values[best]), counts, float(flagged[best] / n))


def evaluate_scored_part(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """All protocol metrics for the scored part of one series (labels, raw scores)."""
    y = np.asarray(labels).astype(bool)
    s = sanitize_scores(scores)
    own = event_counts(y, s >= OWN_THRESHOLD)
    best = best_event_f1(y, s)
    has_windows = own.windows > 0
    return {
        "n_scored": len(y),
        "n_windows": own.windows,
        "n_nan_scores": int(np.count_nonzero(np.isnan(np.asarray(scores, dtype=np.float64)))),
        "auc_pr": auc_pr(y, s) if has_windows else math.nan,
        "best_f1": best_point_f1(y, s) if has_windows else math.nan,
        "event_f1_10pct": best.f1 if has_windows else math.nan,
        "event_f1_10pct_threshold": best.threshold if has_windows else math.nan,
        "own_flagged_fraction": float(np.mean(s >= OWN_THRESHOLD)) if len(s) else 0.0,
        # Alarm time: the share of points outside every window that are flagged. A flag that
        # stays up for weeks is one false-alarm event but a muted alert.
        "own_quiet_flagged": float(np.mean(s[~y] >= OWN_THRESHOLD)) if (~y).any() else math.nan,
        "own_event_precision": own.precision if has_windows else math.nan,
        "own_event_recall": own.recall if has_windows else math.nan,
        "own_event_f1": own.f1 if has_windows else math.nan,
        "own_detected": own.detected,
        "own_false_alarms": own.false_alarms,
        "own_false_alarms_per_1k": own.false_alarms_per_1k,
    }
