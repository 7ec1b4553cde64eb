"""Backtest reports: flag episodes, their rates and the worst incidents, per series and in total.

Input is what a backtest produced for each series (a ScoreResult on the series' grid); output
is plain numbers and plain text. Only points with a finite flag count as evaluated time:
warm-up, gaps and the time before a series' first model are neither flagged nor quiet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from .scoring import ScoreResult

DAY = 86400.0


@dataclass(frozen=True)
class Episode:
    """A run of consecutive flagged points; times are unix seconds of its first and last point."""

    start: float
    end: float
    peak: float  # highest score in the run
    peak_at: float
    points: int

    def duration(self, step: float) -> float:
        """Seconds the flag was up: the last flagged point covers one step."""
        return self.end - self.start + step


@dataclass
class SeriesReport:
    """What a backtest found on one series."""

    name: str
    step: float
    evaluated_points: int = 0  # points with a flag (0 or 1)
    flagged_points: int = 0
    episodes: list[Episode] = field(default_factory=list)  # in time order
    peak: float = math.nan  # highest score over the evaluated points
    peak_at: float = math.nan
    first_scored: float = math.nan
    note: str = ""  # how the first model was trained, retrains, or why the series failed
    error: str = ""  # non-empty: the series could not be backtested

    @property
    def evaluated_days(self) -> float:
        return self.evaluated_points * self.step / DAY

    @property
    def episodes_per_day(self) -> float:
        d = self.evaluated_days
        return len(self.episodes) / d if d > 0 else math.nan

    @property
    def flagged_share(self) -> float:
        n = self.evaluated_points
        return self.flagged_points / n if n else math.nan

    def worst(self, n: int) -> list[Episode]:
        """The n episodes with the highest peak score, highest first."""
        return sorted(self.episodes, key=lambda e: (-e.peak, e.start))[:n]


def episodes(timestamps: np.ndarray, score: np.ndarray, flag: np.ndarray) -> list[Episode]:
    """Runs of flag == 1 over (N,) arrays; a NaN flag (gap, warm-up) ends a run."""
    f = np.asarray(flag, dtype=np.float64)
    on = np.where(np.isfinite(f), f >= 1.0, False).astype(np.int8)
    edges = np.diff(np.concatenate([[0], on, [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)  # exclusive
    out = []
    s = np.asarray(score, dtype=np.float64)
    for a, b in zip(starts, ends):
        seg = np.where(np.isfinite(s[a:b]), s[a:b], -np.inf)
        k = a + int(np.argmax(seg))
        out.append(Episode(float(timestamps[a]), float(timestamps[b - 1]), float(s[k]),
                           float(timestamps[k]), int(b - a)))
    return out


def summarize(name: str, result: ScoreResult, step: float, start: float = -math.inf,
              end: float = math.inf, note: str = "") -> SeriesReport:
    """The report of one series over the points with start <= t <= end."""
    t = np.asarray(result.timestamps, dtype=np.float64)
    keep = (t >= start) & (t <= end)
    t, score, flag = t[keep], result.score[keep], result.flag[keep]
    ok = np.isfinite(flag)
    rep = SeriesReport(name, float(step), int(ok.sum()), int((flag[ok] >= 1).sum()),
                       episodes(t, score, flag), note=note)
    finite = np.isfinite(score)
    if finite.any():
        k = int(np.argmax(np.where(finite, score, -np.inf)))
        rep.peak, rep.peak_at = float(score[k]), float(t[k])
        rep.first_scored = float(t[np.flatnonzero(finite)[0]])
    return rep


@dataclass
class QueryReport:
    """The report of one query: its series, sorted by peak score, and totals."""

    query: str
    start: float
    end: float
    mode: str  # e.g. "deployed: retrain every 24 h on 7 d"
    series: list[SeriesReport]

    def __post_init__(self) -> None:
        self.series = sorted(self.series, key=_rank)

    @property
    def backtested(self) -> list[SeriesReport]:
        return [s for s in self.series if not s.error]

    @property
    def episodes(self) -> int:
        return sum(len(s.episodes) for s in self.series)

    @property
    def evaluated_days(self) -> float:
        """Series-days of evaluated time, over all series."""
        return sum(s.evaluated_days for s in self.series)

    @property
    def episodes_per_day(self) -> float:
        """Episodes per series-day, over all series."""
        d = self.evaluated_days
        return self.episodes / d if d > 0 else math.nan

    @property
    def flagged_share(self) -> float:
        n = sum(s.evaluated_points for s in self.series)
        return sum(s.flagged_points for s in self.series) / n if n else math.nan

    def worst(self, n: int) -> list[tuple[SeriesReport, Episode]]:
        """The n episodes with the highest peak score over all series, highest first."""
        pairs = [(s, e) for s in self.series for e in s.episodes]
        return sorted(pairs, key=lambda p: (-p[1].peak, p[1].start, p[0].name))[:n]

    def top(self, n: int) -> list[SeriesReport]:
        """The n backtested series with the highest peak score (the ones a plot shows)."""
        return [s for s in self.series if not s.error and math.isfinite(s.peak)][:n]


def _rank(s: SeriesReport) -> tuple:
    peak = s.peak if math.isfinite(s.peak) else -math.inf
    return (bool(s.error), -peak, s.name)


def fmt_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")


def fmt_duration(seconds: float) -> str:
    """Compact duration: 45s, 12 min, 3.5 h, 2.0 d."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / DAY:.1f} d"


def _num(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "-"


def _incident(s: SeriesReport, e: Episode) -> str:
    return (f"{fmt_time(e.start)} to {fmt_time(e.end + s.step)} UTC "
            f"({fmt_duration(e.duration(s.step))}), peak {e.peak:.2f} at {fmt_time(e.peak_at)}")


def _notes(series: Sequence[SeriesReport]) -> list[str]:
    """The notes section: each note's parts ("; "-separated), one line for a part that every
    series shares (a cold start of them all would repeat a dozen times)."""
    holders: dict[str, list[str]] = {}
    for s in series:
        for part in filter(None, s.note.split("; ")):
            holders.setdefault(part, []).append(s.name)
    if not holders:
        return []
    lines = ["notes"]
    for part, names in holders.items():
        if len(names) == len(series) > 1:
            lines.append(f"  all {len(names)} series: {part}")
        else:
            lines.extend(f"  {name}: {part}" for name in names)
    return lines


def format_report(rep: QueryReport, worst: int = 3, total_worst: int = 5) -> str:
    """The plain-text report: one table row per series, their worst incidents, the totals."""
    lines = [(f"backtest of {rep.query}: {fmt_time(rep.start)} to {fmt_time(rep.end)} UTC "
              f"({fmt_duration(rep.end - rep.start)}), {rep.mode}")]
    width = max([len("series")] + [len(s.name) for s in rep.series])
    lines.append(f"  {'series':<{width}}  {'evaluated':>9}  {'episodes':>8}  {'per day':>7}  "
                 f"{'flagged':>7}  {'peak':>6}")
    for s in rep.series:
        if s.error:
            lines.append(f"  {s.name:<{width}}  not backtested: {s.error}")
            continue
        lines.append(f"  {s.name:<{width}}  {fmt_duration(s.evaluated_days * DAY):>9}  "
                     f"{len(s.episodes):>8}  {_num(s.episodes_per_day, '.2f'):>7}  "
                     f"{_num(100 * s.flagged_share, '.2f') + '%':>7}  {_num(s.peak, '.2f'):>6}")
    lines.extend(_notes(rep.series))
    with_episodes = [s for s in rep.series if s.episodes]
    if with_episodes:
        lines.append(f"worst incidents per series (up to {worst})")
        for s in with_episodes:
            lines.append(f"  {s.name}")
            lines.extend(f"    {_incident(s, e)}" for e in s.worst(worst))
    ok = rep.backtested
    failed = len(rep.series) - len(ok)
    lines.append(
        f"totals: {len(rep.series)} series ({failed} not backtested), "
        f"{fmt_duration(rep.evaluated_days * DAY)} of series time evaluated, "
        f"{rep.episodes} flag episodes ({_num(rep.episodes_per_day, '.2f')} per series-day), "
        f"{_num(100 * rep.flagged_share, '.2f')}% of time flagged")
    if rep.episodes:
        lines.append(f"worst incidents of the query (up to {total_worst})")
        lines.extend(f"  {s.name}: {_incident(s, e)}" for s, e in rep.worst(total_worst))
    else:
        lines.append("no flag episodes")
    return "\n".join(lines) + "\n"


def format_reports(reports: Sequence[QueryReport], worst: int = 3) -> str:
    return "\n".join(format_report(r, worst) for r in reports)
