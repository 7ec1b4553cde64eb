"""When will a new series get its first score? Computed live from what is known about it.

A series is trained once `min_train_points` (window + 32) observed points exist; on a fresh
Prometheus that is the history still to come, one point per `step`. After training, the next
poll scores it. The answer is recomputed on every call from the series' current count of
observed points (history at its last training attempt plus every polled point since), so it
never goes stale the way a message written at the last attempt does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from ..config.base import format_duration
from .registry import FAILED, PENDING, READY, SeriesState


@dataclass(frozen=True)
class FirstScore:
    """Expected first score of a series that has none yet."""

    observed: int  # observed points known to exist now
    needed: int  # observed points training needs
    expected_at: float  # unix seconds; NaN when it cannot be told (e.g. training failed)
    text: str  # one sentence for people


def human_wait(seconds: float) -> str:
    """"about 2 h 10 min", "about 40 s"."""
    s = max(0.0, seconds)
    if s >= 86400:
        return f"about {s / 86400:.1f} d"
    if s >= 3600:
        h, m = divmod(round(s / 60), 60)
        return f"about {h} h {m} min" if m else f"about {h} h"
    if s >= 60:
        return f"about {round(s / 60)} min"
    return f"about {max(1, round(s))} s"


def _at(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%H:%M UTC")


def first_score(s: SeriesState, *, step: float, min_points: int, now: float,
                retry_after: float, has_scores: bool) -> FirstScore | None:
    """The expected first score of `s` (call under the registry lock); None once scored."""
    if has_scores:
        return None
    observed = int(s.observed_estimate)
    if s.state == READY:
        return FirstScore(observed, min_points, now + step,
                          "model ready: scored at the next poll")
    if s.state == FAILED:
        retry = s.last_attempt + retry_after
        return FirstScore(observed, min_points, math.nan,
                          f"training failed; next attempt {_at(max(retry, now))}")
    if s.state == PENDING and not s.last_attempt:
        return FirstScore(observed, min_points, math.nan,
                          "history not read yet: waiting for the first training batch")
    missing = max(0, min_points - observed)
    if missing == 0:
        text = (f"{observed} observed points, enough to train: first score after the next "
                "training batch")
        return FirstScore(observed, min_points, now + step, text)
    wait = missing * step
    text = (f"{observed} of {min_points} observed points; first score in {human_wait(wait)} "
            f"(at {_at(now + wait)}, one point per {format_duration(step)})")
    return FirstScore(observed, min_points, now + wait, text)
