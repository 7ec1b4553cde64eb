"""Accuracy benchmark on NAB, following /work/shared/data/README.md exactly.

Usage::

    .venv/bin/python benchmarks/accuracy.py --data ../shared/data/nab \
        [--detectors static-z,rolling-z,iforest,naive-vae,adaptive-promql,promvae] [--train-once] \
        [--categories realKnownCause,realTraffic] [--limit-series 2] \
        [--promvae-config key=value,...] [--json results.json] [--check-causality]

Both modes of the protocol: promvae runs **deployed** by default (first model on the training
part, then retrained every 24 h on the trailing 7 days with only the points before each
retrain, streaming calibration and the new-normal policy: the service's defaults, through
detector.deploy), or trains once with ``--train-once``. Labels are never used. Beside AUC-PR
and the event figures, every detector's alarm time is reported: the share of points outside
every labelled window flagged at its own threshold (mean, median, worst series).

Every detector is a function ``(timestamps, values, train_points) -> scores``
that never sees the labels. It may fit on ``values[:train_points]`` only and
must score causally; scores are normalised so that 1.0 is the detector's own
alert threshold, NaN marks unscored warm-up points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.nab import (
    ALL_CATEGORIES,
    EVAL_CATEGORIES,
    NO_ANOMALY_CATEGORY,
    Series,
    evaluate_scored_part,
    infer_step,
    load_nab,
)

Detector = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

BASELINES = ("static-z", "rolling-z", "iforest", "naive-vae", "adaptive-promql")
PROMVAE = ("promvae", "promvae-noseason")
Z_THRESHOLD = 3.0
IFOREST_WINDOW = 60
TRAIN_QUANTILE = 99.0  # own threshold of the learned baselines: 99th pct of training scores


def train_quantile_threshold(train_scores: np.ndarray) -> float:
    """Own threshold of the learned baselines: "raw score above the training 99th percentile".

    A relative margin of 1e-6 makes ``raw / threshold >= 1`` mean *strictly above* p99
    (up to rounding). Without it, a constant or exactly periodic series, whose later
    scores tie with p99, would be flagged at every point.
    """
    p99 = float(np.percentile(train_scores, TRAIN_QUANTILE))
    return p99 * (1.0 + 1e-6) + 1e-12


# ---------------------------------------------------------------------- baselines


def _std_floor(scale: float) -> float:
    """Smallest std used as a divisor, so constant data gives z = 0, not 0/0."""
    return 1e-9 * (1.0 + abs(scale))


def static_z(timestamps: np.ndarray, values: np.ndarray, train_points: int) -> np.ndarray:
    """``|x - train median| / train std``, own threshold z >= 3, so score = z / 3."""
    train = values[:train_points]
    med = float(np.median(train))
    std = max(float(np.std(train)), _std_floor(med))
    return np.abs(values - med) / std / Z_THRESHOLD


def rolling_z(timestamps: np.ndarray, values: np.ndarray, train_points: int) -> np.ndarray:
    """z-score against the mean/std of the previous one day of points (x_t excluded).

    One day = ``round(86400 / step)`` points, step = median timestamp difference.
    Until a full day of history exists the available history is used, provided it
    holds at least ``min(day, train_points)`` points, so every scored point has a
    score; earlier points are NaN. Statistics are exact (sliding windows, no
    running sums), so constant stretches give z = 0 instead of round-off noise.
    """
    n = len(values)
    day = max(2, round(86400.0 / infer_step(timestamps)))
    min_hist = min(day, train_points)
    floor = _std_floor(float(np.median(values[:train_points])))
    scores = np.full(n, np.nan)
    # Warm-up with a partial day of history (t < day).
    for t in range(max(min_hist, 2), min(day, n)):
        hist = values[:t]
        scores[t] = abs(values[t] - hist.mean()) / max(hist.std(), floor)
    # Full-day windows: window j = values[j:j+day] predicts t = j + day.
    if n > day:
        windows = np.lib.stride_tricks.sliding_window_view(values[:-1], day)
        chunk = 4096
        for a in range(0, len(windows), chunk):
            w = windows[a : a + chunk]
            mean = w.mean(axis=1)
            std = np.maximum(w.std(axis=1), floor)
            t = np.arange(a, a + len(w)) + day
            scores[t] = np.abs(values[t] - mean) / std
    return scores / Z_THRESHOLD


def _trailing(values: np.ndarray, timestamps: np.ndarray, span: float, offset: float = 0.0):
    """Index ranges [lo, hi) of the points in (t - offset - span, t - offset] for every t."""
    t = timestamps
    hi = np.searchsorted(t, t - offset, side="right")
    lo = np.searchsorted(t, t - offset - span, side="right")
    return lo, hi


def _range_mean_std(values: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Mean and population std of values[lo:hi] per row (NaN where empty), via prefix sums
    of values centred on their median (so the sums keep their precision)."""
    ok = np.isfinite(values)
    c = float(np.median(values[ok])) if ok.any() else 0.0
    v = np.where(ok, values - c, 0.0)
    s1 = np.concatenate([[0.0], np.cumsum(v)])
    s2 = np.concatenate([[0.0], np.cumsum(v * v)])
    n = np.concatenate([[0], np.cumsum(ok)])
    cnt = (n[hi] - n[lo]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (s1[hi] - s1[lo]) / cnt
        var = np.maximum((s2[hi] - s2[lo]) / cnt - mean**2, 0.0)
    mean[cnt == 0] = np.nan
    var[cnt == 0] = np.nan
    return mean + c, np.sqrt(var)


def adaptive_promql(timestamps: np.ndarray, values: np.ndarray, train_points: int) -> np.ndarray:
    """Grafana's adaptive PromQL anomaly rules (grafana/promql-anomaly-detection,
    rules/adaptive.yml) replayed at the series' own step.

    mid = 1 h average; short-term band = mid ± 2 × the 26 h average of the 1 h stddev, where
    that stddev counts only while it exceeds 0.5 × mid (their coefficient-of-variation
    filter); margin band = mid ± 0.5 × mid; long-term bands = 1 h average ± 2 × 1 h stddev at
    offsets 23h30m and 167h30m. The band is the widest of those present, lower clamped at 0,
    values ≤ 0 are not selected (as their `> 0`), and the alert needs the value outside for
    5 minutes (`for: 5m`: every point of the last 5 minutes). Score = distance from mid in
    units of the band's half-width on the violated side, the minimum over the `for` span, so
    score >= 1 is "the rule fires". Needs no training.
    """
    t = np.asarray(timestamps, dtype=np.float64)
    x = np.where(np.asarray(values, dtype=np.float64) > 0, values, np.nan)
    hour = 3600.0
    lo, hi = _trailing(x, t, hour)
    mid, sd = _range_mean_std(x, lo, hi)
    sd_f = np.where(sd > 0.5 * mid, sd, np.nan)
    lo26, hi26 = _trailing(sd_f, t, 26 * hour)
    st, _ = _range_mean_std(sd_f, lo26, hi26)
    uppers = [mid + 2 * st, mid + 0.5 * mid]
    lowers = [mid - 2 * st, mid - 0.5 * mid]
    for off in (23.5 * hour, 167.5 * hour):
        a, b = _trailing(x, t, hour, off)
        m_off, s_off = _range_mean_std(x, a, b)
        uppers.append(m_off + 2 * s_off)
        lowers.append(m_off - 2 * s_off)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        upper = np.nanmax(np.stack(uppers), axis=0)
        lower = np.maximum(np.nanmin(np.stack(lowers), axis=0), 0.0)
        up = (x - mid) / np.maximum(upper - mid, _std_floor(1.0))
        down = (mid - x) / np.maximum(mid - lower, _std_floor(1.0))
    e = np.fmax(up, down)  # >= 1 outside the band; NaN where unselected
    e = np.where(np.isfinite(e), e, -1.0)  # an absent value never fires and resets `for`
    # for: 5m -> the value is outside at every point of the last 5 minutes (at least 2 points).
    step = infer_step(t)
    span = max(2, math.ceil(300.0 / step) + 1) if step < 300.0 else 2
    windows = np.lib.stride_tricks.sliding_window_view(np.r_[np.full(span - 1, -1.0), e], span)
    return windows.min(axis=1)


def iforest(timestamps: np.ndarray, values: np.ndarray, train_points: int) -> np.ndarray:
    """IsolationForest on sliding windows of 60 points ending at t (raw values).

    Fitted on the windows that lie entirely in the training part (n_estimators=100,
    random_state=0). Raw anomaly score = ``-score_samples`` (in (0, 1], higher is more
    anomalous); own threshold = 99th percentile of the training windows' raw scores
    (in-sample, no contamination parameter; see :func:`train_quantile_threshold`),
    so score = raw / threshold.
    The first 59 points have no full window and are NaN. If the training part is
    shorter than 2 windows' worth, the window shrinks to ``train_points // 2``.
    """
    from sklearn.ensemble import IsolationForest

    width = min(IFOREST_WINDOW, max(2, train_points // 2))
    X = np.lib.stride_tricks.sliding_window_view(values, width)  # row j ends at t = j + width - 1
    X_train = X[: train_points - width + 1]
    model = IsolationForest(n_estimators=100, random_state=0).fit(X_train)
    threshold = train_quantile_threshold(-model.score_samples(X_train))
    scores = np.full(len(values), np.nan)
    scores[width - 1 :] = -model.score_samples(X) / threshold
    return scores


def naive_vae(timestamps: np.ndarray, values: np.ndarray, train_points: int) -> np.ndarray:
    """Naive per-point VAE: input one value, latent 2, MLP 1-16-2 / 2-16-1 (tanh).

    Input normalised by train mean/std; loss = squared error + KL (summed per point,
    averaged over the batch); Adam lr 1e-3, batch 32, 50 epochs, torch seed 0.
    Score = squared reconstruction error decoding the posterior mean (deterministic);
    own threshold = 99th percentile of the training scores (:func:`train_quantile_threshold`).
    """
    import torch

    # A 1-16-2 MLP gains nothing from intra-op threads, and on a loaded machine thread
    # contention makes it 50x slower, so run it single-threaded (restored afterwards).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _naive_vae(values, train_points)
    finally:
        torch.set_num_threads(threads)


def _naive_vae(values: np.ndarray, train_points: int) -> np.ndarray:
    import torch
    from torch import nn

    torch.manual_seed(0)
    train = values[:train_points]
    mean = float(train.mean())
    std = max(float(train.std()), _std_floor(mean))
    x_all = torch.tensor((values - mean) / std, dtype=torch.float32).reshape(-1, 1)
    x_train = x_all[:train_points]

    class PointVAE(nn.Module):
        def __init__(self, hidden: int = 16, latent: int = 2) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(1, hidden), nn.Tanh())
            self.mu = nn.Linear(hidden, latent)
            self.logvar = nn.Linear(hidden, latent)
            self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, 1))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            h = self.enc(x)
            mu, logvar = self.mu(h), self.logvar(h)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return self.dec(z), mu, logvar

    model = PointVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _epoch in range(50):
        for idx in torch.randperm(train_points, generator=gen).split(32):
            xb = x_train[idx]
            recon, mu, logvar = model(xb)
            rec = ((recon - xb) ** 2).sum(dim=1)
            kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)
            loss = (rec + kl).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        err = ((model.dec(model.mu(model.enc(x_all))) - x_all) ** 2).sum(dim=1).numpy()
    err = err.astype(np.float64)
    threshold = train_quantile_threshold(err[:train_points])
    return err / threshold


# ------------------------------------------------------------------------ promvae


def parse_overrides(text: str | None) -> dict[str, Any]:
    """Parse ``key=value,...``; values become bool, None, int, float or str.

    A value with colons becomes a tuple of such values: ``hidden=64:64`` -> ``(64, 64)``.
    """
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--promvae-config item {item!r} is not key=value")
        raw = raw.strip()
        out[key.strip()] = tuple(map(_parse_scalar, raw.split(":"))) if ":" in raw else _parse_scalar(raw)
    return out


def _parse_scalar(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def make_promvae_detectors(overrides: dict[str, Any], train_once: bool = False,
                           deployment_overrides: dict[str, Any] | None = None) -> dict[str, Detector]:
    """The promvae columns: name -> detector. Edit the configs here to tweak the benchmark.

    Deployed mode (default) replays the service: daily retrains on the trailing 7 days,
    streaming calibration, the new-normal policy (detector.deploy, the service's defaults).
    Each detector also has `.many`, which runs every series in one batched backtest.
    deployment_overrides: Deployment fields to change (an A/B of one part of the deployment,
    e.g. calibrate=False or adapt_after=None), in seconds as the config keys.
    Raises ImportError if the detector package is not available yet.
    """
    from detector import VAEConfig, backtest_many
    from detector.deploy import DEPLOYED

    known = {f.name for f in dataclasses.fields(DEPLOYED)}
    unknown = sorted(set(deployment_overrides or {}) - known)
    if unknown:
        raise ValueError(f"unknown --deployment keys {unknown}; choose from {sorted(known)}")
    deployment = None if train_once else dataclasses.replace(DEPLOYED, **(deployment_overrides or {}))
    configs = {
        "promvae": VAEConfig(**overrides),
        "promvae-noseason": VAEConfig(**{**overrides, "seasonal": False}),
    }

    def bind(config: Any) -> Detector:
        def many(items: list[tuple[np.ndarray, np.ndarray, int]]) -> list:
            return backtest_many(items, config, deployment=deployment,
                                 log=lambda m: print(f"promvae: {m}", file=sys.stderr))

        def run(timestamps: np.ndarray, values: np.ndarray, train_points: int) -> np.ndarray:
            (scores,) = many([(timestamps, values, train_points)])
            if isinstance(scores, Exception):
                raise scores
            return scores

        run.many = many  # type: ignore[attr-defined]
        return run

    return {name: bind(cfg) for name, cfg in configs.items()}


def config_description(name: str, overrides: dict[str, Any]) -> str | None:
    """Readable VAEConfig of a promvae column, recorded in the --json output."""
    try:
        from detector import VAEConfig
    except ImportError:
        return None
    kw = {**overrides, "seasonal": False} if name == "promvae-noseason" else overrides
    cfg = VAEConfig(**kw)
    return repr(cfg) if not dataclasses.is_dataclass(cfg) else str(dataclasses.asdict(cfg))


def build_detectors(names: list[str], overrides: dict[str, Any],
                    train_once: bool = False,
                    deployment_overrides: dict[str, Any] | None = None) -> dict[str, Detector]:
    """Resolve detector names; promvae columns are skipped with a warning if unavailable."""
    baselines: dict[str, Detector] = {
        "static-z": static_z,
        "rolling-z": rolling_z,
        "iforest": iforest,
        "naive-vae": naive_vae,
        "adaptive-promql": adaptive_promql,
    }
    out: dict[str, Detector] = {}
    promvae: dict[str, Detector] | None = None
    for name in names:
        if name in baselines:
            out[name] = baselines[name]
        elif name in PROMVAE:
            if promvae is None:
                try:
                    promvae = make_promvae_detectors(overrides, train_once, deployment_overrides)
                except ImportError as exc:
                    print(f"WARNING: skipping {name}: cannot import detector ({exc})", file=sys.stderr)
                    promvae = {}
            if name in promvae:
                out[name] = promvae[name]
        else:
            raise SystemExit(f"unknown detector {name!r}; choose from {BASELINES + PROMVAE}")
    return out


# --------------------------------------------------------------------- evaluation


def run_detector(detector: Detector, series: Series) -> np.ndarray:
    """Scores for one series, checked for shape; labels are never passed."""
    scores = np.asarray(
        detector(series.timestamps.copy(), series.values.copy(), series.train_points),
        dtype=np.float64,
    ).reshape(-1)
    if scores.shape != (series.n,):
        raise ValueError(f"detector returned shape {scores.shape}, expected ({series.n},)")
    return scores


def check_causality(detector: Detector, series: Series, scores: np.ndarray) -> bool:
    """Rescore a prefix ending mid-way through the scored part; prefix scores must match."""
    cut = series.train_points + (series.n - series.train_points) // 2
    truncated = dataclasses.replace(
        series,
        timestamps=series.timestamps[:cut],
        values=series.values[:cut],
        labels=series.labels[:cut],
    )
    prefix = run_detector(detector, truncated)
    return bool(np.allclose(prefix, scores[:cut], rtol=1e-5, atol=1e-6, equal_nan=True))


def nanmean(xs: list[float]) -> float:
    arr = np.asarray(xs, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else math.nan


HEADLINE = (
    ("auc_pr", "AUC-PR"),
    ("best_f1", "best F1"),
    ("event_f1_10pct", "event F1 (≤10%)"),
    ("own_event_precision", "own P"),
    ("own_event_recall", "own R"),
    ("own_event_f1", "own F1"),
    ("own_false_alarms_per_1k", "FA/1k"),
)


def summarize(results: list[dict[str, Any]], detectors: list[str]) -> dict[str, Any]:
    """Per-category means (series with >= 1 scored window) and their mean; no-anomaly totals."""
    summary: dict[str, Any] = {"categories": {}, "mean": {}, "no_anomaly": {}, "alarm_time": {}}
    categories = [c for c in EVAL_CATEGORIES if any(r["category"] == c for r in results)]
    for det in detectors:
        per_cat: dict[str, dict[str, float]] = {}
        for cat in categories:
            rows = [r[det] for r in results if r["category"] == cat and r[det]["n_windows"] > 0]
            per_cat[cat] = {"n_series": len(rows)} | {
                key: nanmean([row[key] for row in rows]) for key, _ in HEADLINE
            }
        summary["categories"][det] = per_cat
        summary["mean"][det] = {
            key: nanmean([per_cat[c][key] for c in categories]) for key, _ in HEADLINE
        }
        summary["mean"][det]["n_categories"] = len(categories)
        quiet = [(r["series"], r[det]["own_quiet_flagged"]) for r in results
                 if np.isfinite(r[det]["own_quiet_flagged"])]
        if quiet:
            q = np.array([v for _, v in quiet])
            worst = int(np.argmax(q))
            noa = [v for k, v in quiet if k.startswith(NO_ANOMALY_CATEGORY)]
            summary["alarm_time"][det] = {
                "n_series": len(q),
                "mean": float(q.mean()),
                "median": float(np.median(q)),
                "worst": float(q[worst]),
                "worst_series": quiet[worst][0],
                "above_10pct": int((q > 0.10).sum()),
                "no_anomaly_mean": float(np.mean(noa)) if noa else math.nan,
            }
        rows = [r[det] for r in results if r["category"] == NO_ANOMALY_CATEGORY]
        if rows:
            fa = sum(row["own_false_alarms"] for row in rows)
            points = sum(row["n_scored"] for row in rows)
            summary["no_anomaly"][det] = {
                "n_series": len(rows),
                "false_alarms": fa,
                "false_alarms_per_1k": 1000.0 * fa / points if points else math.nan,
                "series_with_alarms": sum(row["own_false_alarms"] > 0 for row in rows),
            }
    return summary


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.2f} %"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def format_report(summary: dict[str, Any], detectors: list[str]) -> str:
    """The two plain-text tables of the benchmark."""
    out: list[str] = []
    k = max((m["n_categories"] for m in summary["mean"].values()), default=0)
    if k:
        label = f"mean ({k} categories)" if k > 1 else "mean (1 category)"
        out.append(
            "Scored part = after the first min(floor(0.15 n), 750) points. Category rows: mean over "
            "the category's series with >= 1 window in the scored part (n). "
            f"'{label}' = unweighted mean of the {k} per-category means (not a mean over series). "
            "own = at the detector's own threshold (score >= 1). FA/1k = false-alarm events per "
            "1,000 scored points at own threshold. Event precision = 0 when nothing is flagged."
        )
        header = ["detector", "category", "n"] + [title for _, title in HEADLINE]
        rows: list[list[str]] = []
        for det in detectors:
            for cat, m in summary["categories"][det].items():
                rows.append(
                    [det, cat, str(m["n_series"])]
                    + [_fmt(m[key], 2 if key.endswith("per_1k") else 3) for key, _ in HEADLINE]
                )
            m = summary["mean"][det]
            rows.append(
                [det, label, ""]
                + [_fmt(m[key], 2 if key.endswith("per_1k") else 3) for key, _ in HEADLINE]
            )
        out.append(_table(header, rows))
    if summary["alarm_time"]:
        out.append("")
        out.append(
            "Alarm time at the own threshold (score >= 1): share of the points outside every "
            "labelled window that are flagged, over all series (artificialNoAnomaly included):"
        )
        header = ["detector", "series", "mean", "median", "worst", "series > 10%",
                  NO_ANOMALY_CATEGORY, "worst series"]
        rows = [
            [det, str(m["n_series"]), _pct(m["mean"]), _pct(m["median"]), _pct(m["worst"]),
             str(m["above_10pct"]), _pct(m["no_anomaly_mean"]), m["worst_series"]]
            for det, m in summary["alarm_time"].items()
        ]
        out.append(_table(header, rows))
    if summary["no_anomaly"]:
        out.append("")
        out.append(
            f"{NO_ANOMALY_CATEGORY} (no anomalies: every flag is a false alarm), own threshold, "
            "totals over its series:"
        )
        header = ["detector", "series", "series with alarms", "false-alarm events", "FA/1k"]
        rows = [
            [
                det,
                str(m["n_series"]),
                str(m["series_with_alarms"]),
                str(m["false_alarms"]),
                _fmt(m["false_alarms_per_1k"], 2),
            ]
            for det, m in summary["no_anomaly"].items()
        ]
        out.append(_table(header, rows))
    return "\n".join(out)


def _json_safe(obj: Any) -> Any:
    """Strict JSON: numpy scalars to Python, NaN/inf to null."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="NAB directory (data/, labels/)")
    p.add_argument("--detectors", default=",".join(BASELINES + ("promvae",)),
                   help=f"comma list of {', '.join(BASELINES + PROMVAE)}")
    p.add_argument("--train-once", action="store_true",
                   help="promvae trains once on the training part (no retrains, no calibration)")
    p.add_argument("--categories", default=",".join(ALL_CATEGORIES), help="comma list")
    p.add_argument("--limit-series", type=int, default=None, help="first N series per category")
    p.add_argument("--promvae-config", default=None, help="VAEConfig overrides: key=value,...")
    p.add_argument("--deployment", default=None,
                   help="deployed-mode overrides, key=value,... of detector.deploy.Deployment "
                        "(seconds; e.g. calibrate=false,adapt_after=none)")
    p.add_argument("--json", type=Path, default=None, help="write per-series results here")
    p.add_argument(
        "--check-causality",
        action="store_true",
        help="rescore each series truncated mid-way and require identical prefix scores",
    )
    p.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first detector exception (default: score that series as all-NaN)",
    )
    args = p.parse_args(argv)

    categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    unknown = set(categories) - set(ALL_CATEGORIES)
    if unknown:
        raise SystemExit(f"unknown categories {sorted(unknown)}; choose from {ALL_CATEGORIES}")
    overrides = parse_overrides(args.promvae_config)
    deployment_overrides = parse_overrides(args.deployment)
    if deployment_overrides and args.train_once:
        raise SystemExit("--deployment changes the deployed mode: it has no effect with --train-once")
    detectors = build_detectors([d.strip() for d in args.detectors.split(",") if d.strip()], overrides,
                                args.train_once, deployment_overrides)
    if not detectors:
        raise SystemExit("no detector to run")
    names = list(detectors)

    all_series = load_nab(args.data, categories, args.limit_series)
    results: list[dict[str, Any]] = []
    totals = dict.fromkeys(names, 0.0)
    causal_failures: list[str] = []
    failures: list[str] = []
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
    # Detectors that batch (promvae) run every series in one backtest: the retrains of all
    # series are one K axis. Their time is split over the series by length.
    batched: dict[str, list] = {}
    for name, detector in detectors.items():
        if hasattr(detector, "many"):
            t0 = time.perf_counter()
            batched[name] = detector.many([(s.timestamps.copy(), s.values.copy(), s.train_points)
                                           for s in all_series])
            totals[name] += time.perf_counter() - t0
    total_n = sum(s.n for s in all_series)
    for i, series in enumerate(all_series, 1):
        row: dict[str, Any] = {
            "series": series.key,
            "category": series.category,
            "n": series.n,
            "train_points": series.train_points,
        }
        timings = []
        for name, detector in detectors.items():
            t0 = time.perf_counter()
            error = None
            try:
                if name in batched:
                    scores = batched[name][i - 1]
                    if isinstance(scores, Exception):
                        raise scores
                    scores = np.asarray(scores, dtype=np.float64)
                else:
                    scores = run_detector(detector, series)
            except Exception as exc:  # a failed series counts against the detector
                if args.fail_fast:
                    raise
                error = f"{type(exc).__name__}: {exc}"
                print(f"WARNING: {name} failed on {series.key}: {error}", file=sys.stderr)
                failures.append(f"{name} on {series.key}: {error}")
                scores = np.full(series.n, np.nan)
            seconds = time.perf_counter() - t0
            if name in batched:
                seconds = totals[name] * series.n / total_n
            else:
                totals[name] += seconds
            metrics = evaluate_scored_part(series.scored_labels, scores[series.train_points :])
            metrics["seconds"] = seconds
            metrics["error"] = error
            if args.check_causality and error is None:
                metrics["causal"] = check_causality(detector, series, scores)
                if not metrics["causal"]:
                    causal_failures.append(f"{name} on {series.key}")
            row[name] = metrics
            timings.append(f"{name} {seconds:.2f}s")
        results.append(row)
        print(f"[{i}/{len(all_series)}] {series.key} (n={series.n}): " + ", ".join(timings), file=sys.stderr)
    print("total seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()), file=sys.stderr)

    summary = summarize(results, names)
    if any(n in PROMVAE for n in names):
        print("promvae mode: " + ("train once (first model only, its own threshold)" if args.train_once
              else "deployed (retrain every 24h on the trailing 7d, streaming calibration, "
                   "new-normal policy after 3h: the service's defaults)"
              + (f", changed: {deployment_overrides}" if deployment_overrides else "")))
    print(format_report(summary, names))
    if failures:
        print("\nDETECTOR FAILURES (scored as all-NaN, i.e. never flagged, and kept in the means):")
        for f in failures:
            print(f"  {f}")
    if causal_failures:
        print("\nCAUSALITY CHECK FAILED (prefix scores changed when the future was removed):")
        for f in causal_failures:
            print(f"  {f}")
    elif args.check_causality:
        print("\ncausality check passed for all detectors and series")

    if args.json:
        doc = {
            "protocol": "/work/shared/data/README.md",
            "detectors": names,
            "promvae_overrides": overrides,
            "promvae_mode": "train-once" if args.train_once else "deployed",
            "deployment_overrides": deployment_overrides,
            "promvae_configs": {n: config_description(n, overrides) for n in names if n in PROMVAE},
            "series": results,
            "summary": summary,
        }
        args.json.write_text(json.dumps(_json_safe(doc), indent=2, allow_nan=False))
    return 1 if causal_failures or failures else 0


if __name__ == "__main__":
    sys.exit(main())
