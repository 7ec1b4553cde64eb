"""What AUC-PR a detector that goes quiet after its alert can reach on the NAB protocol.

Usage::

    .venv/bin/python benchmarks/ceiling.py --data ../shared/data/nab [--hold 1h,3h,6h,12h,window]

The protocol's AUC-PR (../shared/data/README.md) is point-wise over whole anomaly windows, and
NAB centres each window on its labelled anomaly: half of every window comes before the anomaly,
where a causal detector cannot know it yet, and the other half lasts hours after it. A product
that adopts a lasting change as the new normal after `adapt_after` (issue #10) scores the rest
of the window as typical. This script scores NAB with an *oracle*, no model: 1 from each labelled
anomaly for `hold` (cut at its window's end), 0 everywhere else, then evaluates it exactly as
benchmarks/accuracy.py does. No detector whose scores return to typical `hold` after the onset
ranks better than this oracle, whatever it does with its first hours: the table is the ceiling
of AUC-PR for each hold, beside the detector's figures in the same protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from grafana_plugin_backend.config.base import parse_duration

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import nab  # type: ignore[no-redef]
else:
    from . import nab

WINDOW = None  # hold until the window ends: the best any causal detector can do


def parse_hold(text: str) -> float | None:
    """'3h', '90m', '600s' or 'window' -> seconds (None = to the window's end)."""
    if text.strip().lower() == "window":
        return WINDOW
    try:
        return parse_duration(text)  # the config keys' spelling: 3h, 90m, 1h30m
    except ValueError:
        raise ValueError(f"hold {text!r}: give a duration like 3h, 90m, 600s, or 'window'") from None


def oracle_scores(timestamps: np.ndarray, labels: np.ndarray, anomalies: Sequence[float],
                  hold: float | None) -> np.ndarray:
    """1 from each labelled anomaly time for `hold` seconds (None: to its window's end), never
    past the window holding it; 0 elsewhere. An anomaly outside every window marks nothing."""
    scores = np.zeros(len(timestamps))
    runs = nab.label_runs(labels)
    for t0 in anomalies:
        i = int(np.searchsorted(timestamps, t0))
        inside = [(a, b) for a, b in runs if a <= i < b]
        if not inside:
            continue
        _, end = inside[0]
        stop = end if hold is None else min(end, int(np.searchsorted(timestamps, t0 + hold)))
        scores[i:stop] = 1.0
    return scores


def ceiling(series: Sequence[nab.Series], anomalies: dict[str, list[float]],
            holds: Sequence[float | None]) -> list[dict]:
    """Per hold: AUC-PR of the oracle, mean over each category's series with a window in the
    scored part, and the unweighted mean of the category means (accuracy.py's headline)."""
    rows = []
    for hold in holds:
        per: dict[str, list[float]] = {}
        for s in series:
            sc = oracle_scores(s.timestamps, s.labels, anomalies.get(s.key, []), hold)
            m = nab.evaluate_scored_part(s.labels[s.train_points:], sc[s.train_points:])
            if m["n_windows"]:
                per.setdefault(s.category, []).append(m["auc_pr"])
        cats = {c: float(np.mean(v)) for c, v in per.items()}
        rows.append({"hold_s": hold, "categories": cats,
                     "auc_pr": float(np.mean(list(cats.values()))) if cats else float("nan")})
    return rows


def load_anomalies(data_dir: Path) -> dict[str, list[float]]:
    with open(data_dir / "labels" / "combined_labels.json") as f:
        raw: dict[str, list[str]] = json.load(f)
    return {k: [float(t) for t in nab._to_unix_seconds(v)] for k, v in raw.items()}


def _hold_name(hold: float | None) -> str:
    return "to the window's end" if hold is None else f"{hold / 3600:g} h"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="NAB directory (data/, labels/)")
    ap.add_argument("--hold", default="1h,3h,6h,12h,window",
                    help="comma list of holds: durations (3h, 90m) or 'window'")
    args = ap.parse_args(argv)
    try:
        holds = [parse_hold(h) for h in args.hold.split(",") if h.strip()]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    series = [s for s in nab.load_nab(args.data) if s.category != "artificialNoAnomaly"]
    rows = ceiling(series, load_anomalies(args.data), holds)
    cats = sorted({c for r in rows for c in r["categories"]})
    print("Oracle: score 1 from each labelled anomaly for the hold (cut at its window's end), "
          "0 elsewhere; AUC-PR as benchmarks/accuracy.py computes it.")
    print("| score 1 after the anomaly for | AUC-PR (mean of categories) | "
          + " | ".join(cats) + " |")
    print("|---|---|" + "---|" * len(cats))
    for r in rows:
        print(f"| {_hold_name(r['hold_s'])} | {r['auc_pr']:.3f} | "
              + " | ".join(f"{r['categories'].get(c, float('nan')):.3f}" for c in cats) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
