"""Feedback on a series: time ranges a person has judged, and what training does with them.

Two kinds, because "this alarm was wrong" and "this data is wrong" ask for opposite things:

- NORMAL ("false alarm"): the range was normal. The next training keeps it as ordinary data
  (windows and threshold fit alike), then scores it with the new model, as serving does and
  lifted by the held-out gap as fresh data would score. If it scores above NORMAL_TARGET,
  the threshold is lifted until it scores NORMAL_TARGET, so a repeat of the pattern stays
  below 1. The lift is the price in sensitivity and is kept, not hidden:
  extra["feedback"]["threshold_lifted"] (how many times wider the 0-to-1 span became).
- EXCLUDE ("bad data": an outage, a broken exporter, a load test): the range's points are
  left out of training, of the robust normalisation and of the threshold fit; nothing is
  lifted.

A false alarm is not excluded: a model that never sees the pattern and a threshold fitted
without its scores make its repeat score higher, not lower (measured on seasonal series: the
held-out range needed a threshold lift of 1.2 to 13 times, median 7, where the kept range
needed 1.0 to 1.4, and its repeats still scored above 1 more often).

Records are plain data (JSON with the model, see store.py); `Feedback(...)` validates what
any record must satisfy, `check_new` what a fresh one from a user must satisfy on top.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

NORMAL = "normal"
EXCLUDE = "exclude"
KINDS = (NORMAL, EXCLUDE)
SOURCES = ("api", "alertmanager")

MAX_SPAN = 31 * 86400.0  # a longer "false alarm" is a new normal or a misconfigured alert
MAX_FUTURE = 86400.0  # end at most this far past now: a silence may run on a little
MIN_TIMESTAMP = 946684800.0  # 2000-01-01: earlier is a unit mix-up (days, minutes), not a date
MAX_TIMESTAMP = 4102444800.0  # 2100-01-01: later is milliseconds, not seconds
MAX_COMMENT = 1024  # characters kept of a comment
MAX_REF = 128  # characters of an external id (an Alertmanager silence id is 36)
MAX_RECORDS = 64  # records kept per series: the newest win
NORMAL_TARGET = 0.8  # a NORMAL range scores at most this after retraining: headroom for a repeat


class FeedbackError(ValueError):
    """A feedback record is invalid; the message says which field and why."""


@dataclass(frozen=True)
class Feedback:
    """One judged range [start, end] of one series, unix seconds.

    source: "api" or "alertmanager"; ref: the external id (a silence id) that makes a record
    read twice the same record; created_at: when promvae accepted it.
    """

    start: float
    end: float
    kind: str = NORMAL
    comment: str = ""
    source: str = "api"
    ref: str = ""
    created_at: float = 0.0

    def __post_init__(self) -> None:
        for name in ("start", "end", "created_at"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise FeedbackError(f"{name} must be a finite number of unix seconds, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not self.start < self.end:
            raise FeedbackError(f"start ({self.start:g}) must be before end ({self.end:g})")
        if self.end - self.start > MAX_SPAN:
            raise FeedbackError(f"the range spans {(self.end - self.start) / 86400:.1f} days; at most "
                                f"{MAX_SPAN / 86400:.0f} days can be marked at once")
        if self.start < MIN_TIMESTAMP:
            raise FeedbackError(f"start {self.start:g} is before the year 2000: timestamps are unix seconds")
        if self.end > MAX_TIMESTAMP:
            raise FeedbackError(f"end {self.end:g} is after the year 2100: timestamps are unix seconds, "
                                "not milliseconds")
        if self.kind not in KINDS:
            raise FeedbackError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.source not in SOURCES:
            raise FeedbackError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not isinstance(self.comment, str) or not isinstance(self.ref, str):
            raise FeedbackError("comment and ref must be strings")
        if len(self.ref) > MAX_REF:
            raise FeedbackError(f"ref is {len(self.ref)} characters long, at most {MAX_REF}")
        object.__setattr__(self, "comment", self.comment[:MAX_COMMENT])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Feedback:
        """A record from `to_dict` output; FeedbackError on unknown keys or bad values."""
        if not isinstance(d, dict):
            raise FeedbackError(f"a feedback record is a JSON object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise FeedbackError(f"unknown feedback fields: {', '.join(unknown)}")
        if "start" not in d or "end" not in d:
            raise FeedbackError("a feedback record needs start and end")
        return cls(**d)

    def same_as(self, other: Feedback) -> bool:
        """The same judgement: one external id, or (without one) the same range and kind."""
        if self.ref or other.ref:
            return (self.source, self.ref) == (other.source, other.ref)
        return (self.start, self.end, self.kind) == (other.start, other.end, other.kind)


def check_new(fb: Feedback, now: float) -> Feedback:
    """`fb` if a user may submit it now; FeedbackError if it ends too far in the future."""
    if fb.end > now + MAX_FUTURE:
        raise FeedbackError(f"end {fb.end:g} is more than {MAX_FUTURE / 3600:.0f} h in the future")
    return fb


def merge(records: Iterable[Feedback], new: Feedback) -> tuple[list[Feedback], bool]:
    """records plus `new` unless it is already there; the newest MAX_RECORDS kept.

    Returns (records, added).
    """
    out = list(records)
    if any(r.same_as(new) for r in out):
        return out, False
    out.append(new)
    return out[-MAX_RECORDS:], True


def prune(records: Iterable[Feedback], oldest: float) -> list[Feedback]:
    """The records whose range ends at or after `oldest` (older ones can no longer be trained on)."""
    return [r for r in records if r.end >= oldest]


def point_mask(timestamps: np.ndarray, records: Sequence[Feedback], kind: str) -> np.ndarray:
    """(N,) bool: the points inside a range of `kind`."""
    t = np.asarray(timestamps, dtype=np.float64)
    out = np.zeros(len(t), dtype=bool)
    for r in records:
        if r.kind == kind:
            out |= (t >= r.start) & (t <= r.end)
    return out


def window_mask(end_times: np.ndarray, records: Sequence[Feedback], kind: str,
                reach: float) -> np.ndarray:
    """(…) bool: windows ending at `end_times` that hold a point of a range of `kind`.

    reach: seconds a window spans before its end ((window - 1) · step).
    """
    t = np.asarray(end_times, dtype=np.float64)
    out = np.zeros(t.shape, dtype=bool)
    for r in records:
        if r.kind == kind:
            out |= (t >= r.start) & (t - reach <= r.end)
    return out
