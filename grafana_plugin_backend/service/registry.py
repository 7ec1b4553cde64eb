"""The series registry: one entry per (query, label set) with its model, raw points and scores."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Model states, as shown in promvae_models{state} and the status API.
PENDING = "pending"  # waiting for the next training batch (or for its stored model to load)
READY = "ready"
INSUFFICIENT = "insufficient_data"
FAILED = "failed"
STATES = (PENDING, READY, INSUFFICIENT, FAILED)

# The anomaly_* families: name -> (result field, HELP text); /metrics and the query API share it.
ANOMALY_METRICS = {
    "anomaly_score": ("score", ("Anomaly score normalised by the learned threshold: "
                               "1.0 = at threshold, above 1 = anomalous.")),
    "anomaly_flag": ("flag", "1 while the series is judged anomalous (score >= 1, debounced)."),
    "anomaly_expected": ("expected", "Expected value of the source series, in its own units."),
    "anomaly_lower": ("lower", "Lower edge of the expected band, in source units."),
    "anomaly_upper": ("upper", "Upper edge of the expected band, in source units."),
    "anomaly_observed": ("observed", "The source value the score was computed on."),
}
RESULT_FIELDS = ("observed", "score", "flag", "expected", "lower", "upper")
_MAX_DROPPED_KEYS = 1_000_000  # ~60 MB of set at most; a fleet 100x over max_series


def series_id(query: str, labels: Mapping[str, str]) -> str:
    """Stable id (and model file name) of a series: a hash of its query and sorted labels."""
    blob = json.dumps([query, sorted(labels.items())], separators=(",", ":"))
    return f"{query[:40]}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def exposed_labels(query: str, labels: Mapping[str, str]) -> dict[str, str]:
    """Labels of the anomaly_* series: source labels minus __name__, plus anomaly_query.

    A source label already called anomaly_query is kept as exported_anomaly_query.
    """
    out = {k: v for k, v in labels.items() if k != "__name__"}
    if "anomaly_query" in out:
        out["exported_anomaly_query"] = out.pop("anomaly_query")
    out["anomaly_query"] = query
    return out


def merge_points(buf_ts: np.ndarray, buf_vals: np.ndarray, ts: np.ndarray, vals: np.ndarray,
                 overwrite: bool = True) -> tuple[np.ndarray, np.ndarray, int, float]:
    """A raw buffer merged with new points: (timestamps, values, observed points newer than
    the buffer, oldest timestamp at or before the buffer's newest that was inserted or
    changed, inf if none). Pure: the poller merges outside the registry lock."""
    ts = np.asarray(ts, dtype=np.float64)
    vals = np.asarray(vals, dtype=np.float64)
    if len(ts) == 0:
        return buf_ts, buf_vals, 0, math.inf
    newest = buf_ts[-1] if len(buf_ts) else -math.inf
    if ts[0] > newest and (len(ts) == 1 or bool(np.all(ts[1:] > ts[:-1]))):
        # Only newer points, in order (every poll): append.
        fresh = int(np.isfinite(vals).sum())
        return np.concatenate([buf_ts, ts]), np.concatenate([buf_vals, vals]), fresh, math.inf
    fresh = int(np.isfinite(vals[ts > newest]).sum())
    changed = math.inf
    old = ts <= newest
    if old.any():
        t_old, v_old = ts[old], vals[old]
        at = np.minimum(np.searchsorted(buf_ts, t_old), len(buf_ts) - 1)
        there = buf_ts[at] == t_old
        prev = buf_vals[at]
        same = there & ((prev == v_old) | (np.isnan(prev) & np.isnan(v_old)))
        moved = ~there if not overwrite else ~same
        if moved.any():
            changed = float(t_old[moved].min())
    parts_t, parts_v = [buf_ts, ts], [buf_vals, vals]
    if not overwrite:
        parts_t.reverse()
        parts_v.reverse()
    all_t = np.concatenate(parts_t)
    all_v = np.concatenate(parts_v)
    order = np.argsort(all_t, kind="stable")
    t, v = all_t[order], all_v[order]
    last = np.r_[t[1:] != t[:-1], True]
    return t[last], v[last], fresh, changed


def trim_index(buf_ts: np.ndarray, scored_to: float, step: float, lead_in: int,
               max_points: int) -> int:
    """How many of the oldest raw points are no longer needed as lead-in."""
    keep_from = -math.inf
    if math.isfinite(scored_to):  # a model exists or is about to load
        keep_from = scored_to - lead_in * step
    elif len(buf_ts):
        keep_from = buf_ts[-1] - lead_in * step
    if len(buf_ts):
        keep_from = max(keep_from, buf_ts[-1] - (max_points - 1) * step)
    return int(np.searchsorted(buf_ts, keep_from - 1e-6 * step))


def merged_recent(recent: Mapping[str, np.ndarray], rows: Mapping[str, np.ndarray],
                  keep_points: int) -> dict[str, np.ndarray]:
    """The recent buffer with scored rows merged in (newest keep_points, rows win on equal
    timestamps). Pure: the poller merges outside the registry lock."""
    keys = ("timestamp",) + RESULT_FIELDS
    old_t = recent.get("timestamp")
    new_t = np.asarray(rows["timestamp"], dtype=np.float64)
    if old_t is None or not len(old_t) or (len(new_t) and new_t[0] > old_t[-1]
                                            and bool(np.all(new_t[1:] > new_t[:-1]))):
        # Newer rows in order (every poll): append and keep the newest.
        if old_t is None or not len(old_t):
            if len(new_t) < 2 or bool(np.all(new_t[1:] > new_t[:-1])):
                return {k: np.asarray(rows[k], dtype=np.float64)[-keep_points:].copy() for k in keys}
        else:  # every poll, for every series: as few numpy calls as it takes
            n_new = len(new_t)
            n_old = max(0, keep_points - n_new)
            out = {}
            for k in keys:
                old, add = recent[k], rows[k]
                if not (isinstance(add, np.ndarray) and add.dtype == np.float64):
                    add = np.asarray(add, dtype=np.float64)
                if n_new > keep_points:
                    add = add[n_new - keep_points:]
                out[k] = np.concatenate((old[max(0, len(old) - n_old):], add)) if n_old else add.copy()
            return out
    out = {k: np.concatenate([recent.get(k, np.empty(0)), np.asarray(rows[k], dtype=np.float64)])
           for k in keys}
    order = np.argsort(out["timestamp"], kind="stable")
    t = out["timestamp"][order]
    last = np.r_[t[1:] != t[:-1], True]
    return {k: out[k][order][last][-keep_points:] for k in out}


RECENT_KEYS = ("timestamp",) + RESULT_FIELDS


def _slack(keep_points: int) -> int:
    return max(8, keep_points // 8)


def appended_recent(s: SeriesState, rows: Mapping[str, np.ndarray],
                    keep_points: int) -> dict[str, np.ndarray]:
    """merged_recent(s.recent, rows, keep_points), in amortised O(new rows) for the poller's
    every-poll case (rows newer than the buffer, in order). The arrays are views of one
    (7, keep_points + slack) block owned by the series: new rows are written after the
    views' end, where no reader looks, and a full block is copied to a fresh one (the old
    stays whole for whoever holds it). Anything else goes through merged_recent.
    Poller only (the block is its own); publish the result under the lock as usual."""
    new_t = rows["timestamp"]
    n = len(new_t)
    old = s.recent
    buf = s._rbuf
    if (buf is None or old is not s._rdict or n == 0 or n > keep_points
            or buf.shape[1] != keep_points + _slack(keep_points)
            or not new_t[0] > old["timestamp"][-1]
            or (n > 1 and not bool(np.all(new_t[1:] > new_t[:-1])))):
        out = merged_recent(old, rows, keep_points)
        m = len(out["timestamp"])
        buf = np.empty((len(RECENT_KEYS), keep_points + _slack(keep_points)))
        for i, k in enumerate(RECENT_KEYS):
            buf[i, :m] = out[k]
        lo, hi = 0, m
    else:
        lo, hi = s._rlo, s._rhi
        if hi + n > buf.shape[1]:  # full: the newest rows to the front of a fresh block
            m = min(hi - lo, keep_points - n)
            fresh = np.empty_like(buf)
            fresh[:, :m] = buf[:, hi - m:hi]
            buf, lo, hi = fresh, 0, m
        for i, k in enumerate(RECENT_KEYS):
            buf[i, hi:hi + n] = rows[k]
        hi += n
        lo = max(lo, hi - keep_points)
    d = {k: buf[i, lo:hi] for i, k in enumerate(RECENT_KEYS)}
    s._rbuf, s._rlo, s._rhi, s._rdict = buf, lo, hi, d
    return d


@dataclass
class SeriesState:
    """Everything promvae knows about one series. Mutate only under Registry.lock."""

    id: str
    query: str
    labels: dict[str, str]
    exposed: dict[str, str]
    state: str = PENDING
    model: Any = None  # detector.SeriesModel
    model_origin: str = ""  # "trained" | "loaded"
    stored: bool = False  # a model file may exist on disk for this id
    last_error: str = ""
    train_failures: int = 0
    last_attempt: float = 0.0  # wall time of the last training attempt
    observed_estimate: int = 0  # observed points known to exist (history + polled)
    last_present: float = math.nan  # newest timestamp the source returned (any value)
    scored_to: float = math.nan  # newest timestamp scored
    buf_ts: np.ndarray = field(default_factory=lambda: np.empty(0))
    buf_vals: np.ndarray = field(default_factory=lambda: np.empty(0))
    recent: dict[str, np.ndarray] = field(default_factory=dict)  # "timestamp" + RESULT_FIELDS
    calibrator: Any = None  # detector.calibration.Calibrator: the streaming threshold, across retrains
    adapt_requested: bool = False  # the new-normal policy asked for an early retrain
    # Judged ranges (detector.feedback.Feedback), saved in the model file; a new one asks for
    # an early retrain through adapt_requested.
    feedback: list = field(default_factory=list)
    regular_at: float = math.nan  # wall time of the last scheduled (not early) training
    # Oldest buffered timestamp add_points inserted or changed at or before the buffer's newest
    # point since the poller last looked: windows over it must be scored again.
    rewritten_from: float = math.inf
    # Called after record() changed the results; the Registry bumps its generation with it.
    on_result: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    # The block behind `recent` when the poller built it (appended_recent): the block, the
    # span of the views in it, and the dict of views (a recent set by anyone else is not it).
    _rbuf: np.ndarray | None = field(default=None, repr=False, compare=False)
    _rlo: int = field(default=0, repr=False, compare=False)
    _rhi: int = field(default=0, repr=False, compare=False)
    _rdict: dict | None = field(default=None, repr=False, compare=False)

    def add_points(self, ts: np.ndarray, vals: np.ndarray, overwrite: bool = True) -> int:
        """Merge points into the raw buffer; returns how many observed points are newer than it.

        overwrite: on equal timestamps the given values win (else the buffered ones do).
        """
        t, v, fresh, changed = merge_points(self.buf_ts, self.buf_vals, ts, vals, overwrite)
        self.buf_ts, self.buf_vals = t, v
        self.observed_estimate += fresh
        self.rewritten_from = min(self.rewritten_from, changed)
        return fresh

    def trim(self, step: float, lead_in: int, max_points: int) -> None:
        """Drop raw points no longer needed as lead-in for the next points to score."""
        first = trim_index(self.buf_ts, self.scored_to, step, lead_in, max_points)
        if first:
            self.buf_ts, self.buf_vals = self.buf_ts[first:], self.buf_vals[first:]

    def record(self, rows: Mapping[str, np.ndarray], keep_points: int) -> None:
        """Append scored rows ("timestamp" + RESULT_FIELDS, each (N,)) to the recent buffer."""
        if not len(rows["timestamp"]):
            return
        self.publish(merged_recent(self.recent, rows, keep_points))

    def publish(self, recent: dict[str, np.ndarray], newest: float | None = None,
                notify: bool = True) -> None:
        """Make `recent` (from merged_recent on the current one) the recent buffer.

        newest: its newest timestamp, if the caller has it as a float already (the poller
        publishes 10,000 series under the lock); notify False: the caller bumps the
        registry's generation once for all it publishes."""
        self.recent = recent
        if newest is None:
            newest = float(recent["timestamp"][-1])
        if not self.scored_to >= newest:  # NaN (never scored) or older; no numpy: under the lock
            self.scored_to = newest
        if notify and self.on_result is not None:
            self.on_result()

    def last_result(self) -> dict[str, float] | None:
        """The newest scored point ("timestamp" + RESULT_FIELDS), or None before any."""
        if not self.recent or not len(self.recent["timestamp"]):
            return None
        return {k: float(v[-1]) for k, v in self.recent.items()}


class Registry:
    """All live series, capped at `max_series`; label sets never merge."""

    def __init__(self, max_series: int) -> None:
        self.lock = threading.RLock()
        self.max_series = max_series
        self._series: dict[str, SeriesState] = {}
        # Per query, its series in registration order: a poll walks its query's series
        # (of_query, expire), not the fleet's, once per query.
        self._by_query: dict[str, dict[str, SeriesState]] = {}
        self._by_exposed: dict[tuple, str] = {}
        self._dropped_keys: set[int] = set()  # 64-bit hashes of (query, series id)
        self._dropped_overflow = False
        self.dropped: dict[str, int] = {}
        self.vanished: dict[str, dict[str, Any]] = {}  # id -> {query, labels, vanished_at}
        self.positions: dict[str, float] = {}  # query -> newest timestamp polled
        self.membership = 0  # bumped whenever a series is added or removed (index writes)
        # Shards: series for which owns(query, labels) is False belong to another instance;
        # they are neither kept nor counted as dropped. disowned: ids of the previous run's
        # index that another shard owns now (shard.count changed).
        self.owns: Callable[[str, Mapping[str, str]], bool] | None = None
        self.disowned: list[str] = []
        # Bumped whenever the newest results of the registry may have changed (a series
        # recorded results or was removed): /metrics re-renders anomaly_* only when it moves.
        self.generation = 0

    def results_changed(self) -> None:
        """Bump the generation (under the lock); call it when publishing without record()."""
        self.generation += 1

    def __len__(self) -> int:
        return len(self._series)

    def get(self, sid: str) -> SeriesState | None:
        with self.lock:
            return self._series.get(sid)

    def all(self) -> list[SeriesState]:
        with self.lock:
            return list(self._series.values())

    def get_by_labels(self, query: str, labels: Mapping[str, str]) -> SeriesState | None:
        with self.lock:
            return self._series.get(series_id(query, labels))

    def of_query(self, query: str) -> list[SeriesState]:
        with self.lock:
            return list(self._by_query.get(query, {}).values())

    def _drop(self, reason: str, key: tuple[str, str]) -> None:
        """Count a dropped series once, however often it is seen again."""
        # 8 bytes of hash per key instead of the key's strings: a fleet over max_series sees
        # the same dropped series every poll, and forgetting them (clearing the set) would
        # count them all again.
        h = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big")
        if h in self._dropped_keys:
            return
        if len(self._dropped_keys) >= _MAX_DROPPED_KEYS:
            if not self._dropped_overflow:
                self._dropped_overflow = True
                log.warning("more than %d distinct series dropped; further drops are no longer "
                            "counted in promvae_series_dropped", _MAX_DROPPED_KEYS)
            return
        self._dropped_keys.add(h)
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def upsert(self, query: str, labels: Mapping[str, str]) -> SeriesState | None:
        """The series of (query, labels), registering it if new; None if dropped (and counted)."""
        labels = dict(labels)
        sid = series_id(query, labels)
        with self.lock:
            s = self._series.get(sid)
            if s is not None:
                return s
            if self.owns is not None and not self.owns(query, labels):
                return None
            exposed = exposed_labels(query, labels)
            ekey = (query, tuple(sorted(exposed.items())))
            if ekey in self._by_exposed:
                self._drop("duplicate_labels", (query, sid))
                return None
            if len(self._series) >= self.max_series:
                self._drop("max_series", (query, sid))
                return None
            gone = self.vanished.pop(sid, None)
            s = SeriesState(id=sid, query=query, labels=labels, exposed=exposed,
                            stored=gone is not None, on_result=self.results_changed)
            self._series[sid] = s
            self._by_query.setdefault(query, {})[sid] = s
            self.membership += 1
            self._by_exposed[ekey] = sid
            return s

    def restore(self, query: str, labels: Mapping[str, str], scored_to: float,
                last_present: float) -> SeriesState | None:
        """Register a series known from the index of a previous run (its model is on disk)."""
        s = self.upsert(query, labels)
        if s is None and self.owns is not None and not self.owns(query, labels):
            self.disowned.append(series_id(query, labels))
        if s is not None:
            s.stored = True
            s.scored_to = scored_to
            s.last_present = last_present
        return s

    def expire(self, query: str, now_data: float, ttl: float, wall: float) -> list[SeriesState]:
        """Remove series of `query` absent for longer than `ttl` (data time); returns them."""
        gone = []
        with self.lock:
            for s in list(self._by_query.get(query, {}).values()):
                if not math.isfinite(s.last_present):
                    continue
                if now_data - s.last_present > ttl:
                    self.remove(s.id, wall)
                    gone.append(s)
        return gone

    def remove(self, sid: str, wall: float) -> None:
        with self.lock:
            s = self._series.pop(sid, None)
            if s is None:
                return
            members = self._by_query.get(s.query)
            if members is not None:
                members.pop(sid, None)
                if not members:
                    del self._by_query[s.query]
            self.membership += 1
            self._by_exposed.pop((s.query, tuple(sorted(s.exposed.items()))), None)
            self.results_changed()
            if s.stored or s.model is not None:
                self.vanished[sid] = {"query": s.query, "labels": s.labels, "vanished_at": wall}

    def counts_by_state(self) -> dict[str, int]:
        with self.lock:
            counts = dict.fromkeys(STATES, 0)
            for s in self._series.values():
                counts[s.state] = counts.get(s.state, 0) + 1
            return counts
