"""Incremental polling: pull the new points of every query, discover series, score in one batch."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from detector import Series, lead_in_points, regularize, score_many
from detector.calibration import Calibrator
from detector.threshold import debounce_flags

from ..config.base import format_duration
from ..config.settings import Config, QueryConfig
from ..source.prometheus import Source, SourceError
from .registry import READY, Registry, SeriesState
from .selfmetrics import SelfMetrics

log = logging.getLogger(__name__)


def grid_floor(t: float, step: float) -> float:
    """The newest multiple of `step` at or before `t`."""
    return math.floor(t / step + 1e-9) * step


class Poller:
    """One tick: pull (position, now] of each query, update the registry, score the new points."""

    def __init__(self, cfg: Config, queries: Sequence[QueryConfig], source: Source,
                 registry: Registry, metrics: SelfMetrics, vae_config: Any, *,
                 clock: Callable[[], float] = time.time,
                 score_fn: Callable = score_many,
                 persist: Callable[[], None] | None = None,
                 on_new_series: Callable[[], None] | None = None,
                 on_adapt: Callable[[], None] | None = None) -> None:
        self.cfg, self.queries, self.source = cfg, list(queries), source
        self.registry, self.metrics = registry, metrics
        self.step = cfg.step
        self.lead_in = lead_in_points(vae_config)
        self.keep_scores = cfg.keep_points
        self.max_buffer = self.lead_in + int(cfg.max_catchup // cfg.step) + 1
        self.clock, self.score_fn = clock, score_fn
        self.persist, self.on_new_series, self.on_adapt = persist, on_new_series, on_adapt
        self.calibration = cfg.deployment().calibration(cfg.step)
        self.debounce = vae_config.debounce
        self._wake = threading.Event()
        self.polls_ok = 0  # polls in which every query succeeded

    def wake(self) -> None:
        """Make the background loop poll now (e.g. right after a training batch)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Poll every poll_every until `stop` is set."""
        while not stop.is_set():
            started = time.monotonic()
            self._wake.clear()
            self.poll_once()
            wait = max(0.0, self.cfg.poll_every - (time.monotonic() - started))
            self._wake.wait(wait)
            if stop.is_set():
                break

    def poll_once(self) -> bool:
        """Poll every query and score; True if every query succeeded. Never raises."""
        started = time.monotonic()
        end = grid_floor(self.clock() - self.cfg.poll_delay, self.step)
        ok, new = True, 0
        for q in self.queries:
            try:
                new += self._poll_query(q, end)
            except SourceError as e:
                ok = False
                self.metrics.poll_errors.labels(e.reason).inc()
                log.warning("poll of query %s failed (%s): %s", q.name, e.reason, e)
            except Exception:  # one tick is a boundary: log, count, keep the last good state
                ok = False
                self.metrics.poll_errors.labels("internal").inc()
                log.exception("poll of query %s failed", q.name)
        try:
            self._score_all()
        except Exception:
            self.metrics.poll_errors.labels("score").inc()
            log.exception("scoring failed")
        if ok:
            self.polls_ok += 1
            self.metrics.last_poll.set(self.clock())
        self.metrics.poll_duration.observe(time.monotonic() - started)
        if new and self.on_new_series is not None:
            self.on_new_series()
        if self.persist is not None:
            self.persist()
        return ok

    def _pull_start(self, q: QueryConfig, end: float) -> float:
        """Where this poll starts: after the last pulled point, or earlier to refill lead-in."""
        pos = self.registry.positions.get(q.name)
        start = pos + self.step if pos is not None else end - self.lead_in * self.step
        with self.registry.lock:
            for s in self.registry.of_query(q.name):
                if math.isfinite(s.scored_to) and (not len(s.buf_ts) or s.buf_ts[-1] < s.scored_to):
                    start = min(start, s.scored_to - self.lead_in * self.step)
        floor = end - self.cfg.max_catchup - self.lead_in * self.step
        if start < floor:
            log.warning("query %s: %.0f s of data missed; scoring the newest %.0f s only",
                        q.name, end - start, self.cfg.max_catchup)
        return grid_floor(max(start, floor), self.step)

    def _poll_query(self, q: QueryConfig, end: float) -> int:
        """Pull and file the new points of one query; returns how many series are new."""
        start = self._pull_start(q, end)
        if start > end:
            return 0
        result = self.source.query_range(q.expr, start, end, self.step)
        new, seen = 0, set()
        with self.registry.lock:
            for rs in result:
                known = self.registry.get_by_labels(q.name, rs.labels)
                s = known or self.registry.upsert(q.name, rs.labels)
                if s is None:
                    continue
                new += known is None
                seen.add(s.id)
                if len(rs.timestamps):
                    s.add_points(rs.timestamps, rs.values)
                    s.last_present = float(np.nanmax([s.last_present, rs.timestamps[-1]]))
            for s in self.registry.of_query(q.name):
                if not len(s.buf_ts) or s.buf_ts[-1] < end:
                    s.add_points(np.array([end]), np.array([np.nan]))  # absent now: a gap
                s.trim(self.step, self.lead_in, self.max_buffer)
            self.registry.positions[q.name] = end
        for s in self.registry.expire(q.name, end, self.cfg.series_ttl, self.clock()):
            log.info("series %s %s vanished %.0f s ago; no longer exposed", q.name, s.exposed,
                     end - s.last_present)
        if new:
            log.info("query %s: %d new series", q.name, new)
        return new

    def _score_all(self) -> int:
        """Score every unscored point of every ready series in one batched call."""
        jobs: list[tuple[SeriesState, Any, float, Series]] = []
        with self.registry.lock:
            for s in self.registry.all():
                if s.state != READY or s.model is None or not len(s.buf_ts):
                    continue
                if math.isfinite(s.scored_to):
                    # A model loaded at restart, nothing exposed yet: score the newest scored
                    # point again, so /metrics has scores now rather than one step later.
                    again = s.model_origin == "loaded" and not len(s.recent.get("timestamp", ()))
                    side = "left" if again else "right"
                    i = int(np.searchsorted(s.buf_ts, s.scored_to, side=side))
                else:
                    i = len(s.buf_ts) - 1
                if i >= len(s.buf_ts):
                    continue
                first = float(s.buf_ts[i])
                lo = int(np.searchsorted(s.buf_ts, first - self.lead_in * self.step - 1e-6))
                ser = regularize(s.buf_ts[lo:], s.buf_vals[lo:], self.step)
                jobs.append((s, s.model, first, ser))
        if not jobs:
            return 0
        try:
            results = self.score_fn([j[1] for j in jobs], [j[3] for j in jobs])
        except Exception:
            log.exception("batched scoring of %d series failed; scoring one by one", len(jobs))
            results = []
            for s, model, _, ser in jobs:
                try:
                    results.append(self.score_fn([model], [ser])[0])
                except Exception as e:  # noqa: BLE001 - one series' scoring is a boundary
                    self.metrics.poll_errors.labels("score").inc()
                    log.error("scoring series %s %s failed: %s", s.query, s.exposed, e)
                    results.append(None)
        scored, adapted = 0, 0
        with self.registry.lock:
            for (s, _, first, ser), res in zip(jobs, results):
                if res is None:
                    s.scored_to = float(ser.timestamps[-1])  # skip the points it choked on
                    continue
                sel = res.timestamps >= first
                score, flag = self._calibrate(s, res)
                if s.calibrator.adapt_due:
                    s.calibrator.adapt_due = False
                    if not s.adapt_requested:
                        s.adapt_requested = True
                        adapted += 1
                        log.info("series %s %s flagged for %s: its new level is the new normal; "
                                 "retraining early", s.query, s.exposed,
                                 format_duration(self.calibration.adapt_after * self.step))
                rows = {"timestamp": res.timestamps[sel], "observed": res.observed[sel],
                        "score": score[sel], "flag": flag[sel],
                        "expected": res.expected[sel], "lower": res.lower[sel],
                        "upper": res.upper[sel]}
                s.record(rows, self.keep_scores)
                s.trim(self.step, self.lead_in, self.max_buffer)
                scored += int(sel.sum())
        self.metrics.points_scored.inc(scored)
        if adapted:
            self.metrics.adaptations.inc(adapted)
            if self.on_adapt is not None:
                self.on_adapt()
        return scored

    def _calibrate(self, s: SeriesState, res: Any) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated scores and flags of a result (call under the lock): the streaming
        threshold of the series (detector.calibration), fed each new point once."""
        if s.calibrator is None:
            s.calibrator = Calibrator(self.calibration)
        score = s.calibrator.apply(res.timestamps, res.score, self.step)
        return score, debounce_flags(score, self.debounce)
