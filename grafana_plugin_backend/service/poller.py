"""Incremental polling: pull the new points of every query, discover series, score in one batch."""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import numpy as np

from detector import Series, lead_in_points, regularize, score_many
from detector.bank import Job, ModelBank
from detector.calibration import Calibrator, refit_offset
from detector.deploy import retrain_phase
from detector.threshold import debounce_flags

from ..config.base import format_duration
from ..config.settings import Config, QueryConfig
from ..source.prometheus import Source, SourceError
from . import allocator
from .registry import (
    READY,
    Registry,
    SeriesState,
    appended_recent,
    merge_points,
    series_id,
    trim_index,
)
from .selfmetrics import SelfMetrics

log = logging.getLogger(__name__)

RELEASE_AFTER = 64  # models installed in one poll before freed heap memory is returned


EMPTY_WARN_EVERY = 3600.0  # a query that stays empty is named again this often
MAX_TRAINING_PAUSE = 30.0  # the longest the trainer waits for a poll (a poll hung on Prometheus)


def grid_floor(t: float, step: float) -> float:
    """The newest multiple of `step` at or before `t`."""
    return math.floor(t / step + 1e-9) * step


class Poller:
    """One tick: pull (position, now] of each query, update the registry, score the new points.

    The registry lock is held only to look series up, take a snapshot of what to score and
    publish results; merging buffers, scoring and calibrating run outside it (the poller
    is the only writer of raw buffers, recent results and calibrators, so a snapshot stays
    valid; a buffer the trainer changed meanwhile is merged again under the lock). With the
    real scorer (score_many) the models of ready series live in a ModelBank, which scores
    only the windows that are new; another score_fn (tests, fakes) gets the full lead-in.
    """

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
        self.empty_since: dict[str, float] = {}  # query -> when it began returning nothing
        self.bank = ModelBank()  # models of the ready series, when score_fn is score_many
        self.lock_held = 0.0  # seconds the registry lock was held in the last poll
        # Per query, label items -> series id: the id is a SHA-256 over sorted JSON (10 us),
        # the same for a label set every poll.
        self._ids: dict[str, dict[tuple, str]] = {}
        self._refit_phases: dict[str, float] = {}  # series id -> its calibrator's refit phase
        # Clear while a poll runs: the trainer waits between its steps meanwhile (wait_idle),
        # so a fleet's poll does not share two cores and the GIL with a training batch.
        self.idle = threading.Event()
        self.idle.set()
        self._polls_started, self._outwaited = 0, -1

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The registry lock, its hold time added to this poll's total.

        The cyclic garbage collector waits meanwhile: a full collection over 10,000 series'
        objects takes a few hundred ms, and must not run while /metrics waits for the lock.
        """
        gc_was = gc.isenabled()
        gc.disable()
        try:
            with self.registry.lock:
                t = time.perf_counter()
                try:
                    yield
                finally:
                    self._held += time.perf_counter() - t
        finally:
            if gc_was:
                gc.enable()

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

    def wait_idle(self, timeout: float = MAX_TRAINING_PAUSE) -> None:
        """Return once no poll runs: the trainer's pause between steps. A poll that outlasts
        `timeout` (Prometheus slow to answer) is waited for once, not at every step."""
        if self.idle.is_set():
            return
        poll = self._polls_started
        if poll != self._outwaited and not self.idle.wait(timeout):
            self._outwaited = poll

    def poll_once(self) -> bool:
        """Poll every query and score; True if every query succeeded. Never raises."""
        self._polls_started += 1
        self.idle.clear()
        try:
            return self._poll_once()
        finally:
            self.idle.set()

    def _poll_once(self) -> bool:
        started = time.monotonic()
        self._held = 0.0
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
        self.lock_held = self._held
        self.metrics.lock_held.observe(self._held)
        if new and self.on_new_series is not None:
            self.on_new_series()
        if self.persist is not None:
            self.persist()
        return ok

    def _pull_start(self, q: QueryConfig, end: float) -> float:
        """Where this poll starts: after the last pulled point, or earlier to refill lead-in."""
        pos = self.registry.positions.get(q.name)
        start = pos + self.step if pos is not None else end - self.lead_in * self.step
        # Read without the lock: the trainer sets a first model's buffer before its
        # scored_to, so a read between the two can only start the pull earlier (harmless).
        for s in self.registry.of_query(q.name):
            scored_to, buf_ts = s.scored_to, s.buf_ts
            if math.isfinite(scored_to) and (not len(buf_ts) or buf_ts[-1] < scored_to):
                start = min(start, scored_to - self.lead_in * self.step)
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
        self._note_result(q, len(result))
        known = {s.id: s for s in self.registry.of_query(q.name)}
        ids = self._ids.setdefault(q.name, {})
        if len(ids) > 2 * len(result) + 1024:  # label sets gone since: forget them
            ids.clear()
        pulled: dict[str, Any] = {}
        unknown = []
        for rs in result:
            key = tuple(rs.labels.items())
            sid = ids.get(key)
            if sid is None:
                sid = ids[key] = series_id(q.name, rs.labels)
            s = known.get(sid)
            if s is None:
                unknown.append(rs)
            else:
                pulled[s.id] = rs
        new = 0
        if unknown:
            with self._locked():  # register the new ones
                for rs in unknown:
                    s = self.registry.upsert(q.name, rs.labels)
                    if s is not None:
                        new += s.id not in known
                        known[s.id], pulled[s.id] = s, rs
        # Snapshot without the lock: the poller is the buffers' writer; a buffer the
        # trainer replaced meanwhile is seen by identity below and merged again.
        members = [(s, s.buf_ts, s.buf_vals, s.scored_to) for s in known.values()]
        merged = [self._merge(s, t, v, scored_to, pulled.get(s.id), end)
                  for s, t, v, scored_to in members]
        # The newest pulled timestamp per series, as a float before the lock is taken.
        lasts = [float(rs.timestamps[-1]) if rs is not None and len(rs.timestamps) else math.nan
                 for rs in (pulled.get(m[0].id) for m in members)]
        with self._locked():  # 10,000 series at a fleet: plain attribute work only
            for (s, t, v, _), m, last in zip(members, merged, lasts):
                if s.buf_ts is t and s.buf_vals is v:  # unchanged since the snapshot
                    s.buf_ts, s.buf_vals = m[0], m[1]
                    if m[2]:
                        s.observed_estimate += m[2]
                    s.rewritten_from = min(s.rewritten_from, m[3])
                else:  # the trainer filled it meanwhile: merge again, here
                    rs = pulled.get(s.id)
                    if rs is not None and len(rs.timestamps):
                        s.add_points(rs.timestamps, rs.values)
                    if not len(s.buf_ts) or s.buf_ts[-1] < end:
                        s.add_points(np.array([end]), np.array([np.nan]))
                    s.trim(self.step, self.lead_in, self.max_buffer)
                if math.isfinite(last) and not s.last_present >= last:  # NaN or older (nanmax)
                    s.last_present = last
            self.registry.positions[q.name] = end
            gone = self.registry.expire(q.name, end, self.cfg.series_ttl, self.clock())
        for s in gone:
            log.info("series %s %s vanished %.0f s ago; no longer exposed", q.name, s.exposed,
                     end - s.last_present)
        if new:
            log.info("query %s: %d new series", q.name, new)
        return new

    def _merge(self, s: SeriesState, buf_ts: np.ndarray, buf_vals: np.ndarray,
               scored_to: float, rs: Any, end: float) -> tuple[np.ndarray, np.ndarray, int, float]:
        """A series' buffer with the pulled points, a NaN at `end` if absent now, trimmed."""
        t, v, fresh, changed = buf_ts, buf_vals, 0, math.inf
        if rs is not None and len(rs.timestamps):
            t, v, fresh, changed = merge_points(t, v, rs.timestamps, rs.values)
        if not len(t) or t[-1] < end:  # absent now: a gap
            t, v = np.append(t, end), np.append(v, np.nan)
        first = trim_index(t, scored_to, self.step, self.lead_in, self.max_buffer)
        return t[first:], v[first:], fresh, changed

    def _score_all(self) -> int:
        """Score every unscored point of every ready series in one batched pass."""
        ready = []
        with self._locked():  # a snapshot: references only, no numpy
            for s in self.registry.all():
                if s.state == READY and s.model is not None:
                    ready.append((s, s.model, s.buf_ts, s.buf_vals, s.scored_to,
                                  s.recent, s.rewritten_from))
                    if s.rewritten_from != math.inf:
                        s.rewritten_from = math.inf
        if len(self._refit_phases) > 2 * len(ready) + 1024:  # series gone since: forget them
            self._refit_phases.clear()
        use_bank = self.score_fn is score_many
        if use_bank:
            self._sync_bank(ready)
        jobs: list[tuple[SeriesState, Any, float, Series, float]] = []
        for s, model, buf_ts, buf_vals, scored_to, recent, rewritten in ready:
            if not len(buf_ts):
                continue
            exposed = len(recent.get("timestamp", ())) > 0
            if math.isfinite(scored_to):
                # A model loaded at restart, nothing exposed yet: score the newest scored
                # point again, so /metrics has scores now rather than one step later.
                again = s.model_origin == "loaded" and not exposed
                i = int(np.searchsorted(buf_ts, scored_to, side="left" if again else "right"))
            else:
                i = len(buf_ts) - 1
            if i >= len(buf_ts):
                continue
            first = float(buf_ts[i])
            jobs.append((s, model, first, self._lead_in(buf_ts, buf_vals, first, exposed),
                         rewritten))
        if not jobs:
            return 0
        results = self._score_jobs(jobs, use_bank)
        scored, adapted = 0, 0
        # (series, recent to publish or None, its newest timestamp, or where to skip to; NaN
        # with None: the early retrain asked for)
        publish: list[tuple[SeriesState, dict[str, np.ndarray] | None, float]] = []
        for (s, model, first, ser, _), res in zip(jobs, results):
            if res is None:
                publish.append((s, None, float(ser.timestamps[-1])))  # skip what it choked on
                continue
            i0 = int(np.searchsorted(res.timestamps, first, side="left"))  # rows from `first` on
            score, flag = self._calibrate(s, res, model)
            if s.calibrator.adapt_due:
                s.calibrator.adapt_due = False
                if not s.adapt_requested:
                    adapted += 1
                    log.info("series %s %s flagged for %s: its new level is the new normal; "
                             "retraining early", s.query, s.exposed,
                             format_duration(self.calibration.adapt_after * self.step))
                    publish.append((s, None, math.nan))  # asks for the early retrain below
            rows = {"timestamp": res.timestamps[i0:], "observed": res.observed[i0:],
                    "score": score[i0:], "flag": flag[i0:],
                    "expected": res.expected[i0:], "lower": res.lower[i0:],
                    "upper": res.upper[i0:]}
            if len(rows["timestamp"]):
                recent = appended_recent(s, rows, self.keep_scores)
                publish.append((s, recent, float(recent["timestamp"][-1])))
            scored += len(res.timestamps) - i0
        # Publishing only: the buffers are trimmed to the new scored_to by the next poll's
        # merge (they hold one poll's points more meanwhile).
        with self._locked():
            for s, recent, t in publish:
                if recent is not None:
                    s.publish(recent, t, notify=False)
                elif math.isfinite(t):  # skip to t
                    s.scored_to = t
                else:
                    s.adapt_requested = True
            if publish:
                self.registry.results_changed()  # once, not once per series
        self.metrics.points_scored.inc(scored)
        if adapted:
            self.metrics.adaptations.inc(adapted)
            if self.on_adapt is not None:
                self.on_adapt()
        return scored

    def _lead_in(self, buf_ts: np.ndarray, buf_vals: np.ndarray, first: float,
                 scored_before: bool) -> Series:
        """The points to score from `first` on, on the grid, with lead_in points before it.

        A series this process has scored before kept its lead-in (trim): the oldest lead-in
        points it lacks are missing in the source, and become NaN. Every poll then sees the
        same windows: the smoothing does not shrink by a window because the oldest point is
        missing, and the bank's cache fits. (A buffer that is simply short, after the first
        training, keeps its warm-up.)
        """
        want = first - self.lead_in * self.step
        lo = int(np.searchsorted(buf_ts, want - 1e-6))
        t, v = buf_ts[lo:], buf_vals[lo:]
        n = len(t)
        if n and t[-1] - t[0] == (n - 1) * self.step and t[0] == np.rint(t[0] / self.step) * self.step:
            # Sorted, unique (merge_points) and every grid point present: already regular.
            ser = Series(t, np.where(np.isinf(v), np.nan, v) if np.isinf(v).any() else v)
        else:
            ser = regularize(t, v, self.step)
        missing = round((ser.timestamps[0] - want) / self.step) if scored_before and len(ser) else 0
        if missing > 0:
            q0 = np.rint(ser.timestamps[0] / self.step)
            head = (q0 - np.arange(missing, 0, -1)) * self.step
            ser = Series(np.concatenate([head, ser.timestamps]),
                         np.concatenate([np.full(missing, np.nan), ser.values]))
        return ser

    def _sync_bank(self, ready: list[tuple]) -> None:
        """Install new models (first, retrained, loaded) in the bank; drop those gone."""
        keep, installed = set(), 0
        for s, model, *_ in ready:
            keep.add(s.id)
            try:
                installed += self.bank.model(s.id) is not model
                self.bank.install(s.id, model)
            except Exception as e:  # noqa: BLE001 - one model is a boundary; scored alone
                log.error("model of series %s %s cannot be served from the bank: %s",
                          s.query, s.exposed, e)
        for key in set(self.bank.keys()) - keep:
            self.bank.remove(key)
        if installed >= RELEASE_AFTER:
            # The models' float32 originals, freed once the bank holds them as float16, stay
            # mapped in the heap: at 10,000 models 2.3 GB of RSS holding nothing.
            allocator.release()

    def _score_jobs(self, jobs: list[tuple], use_bank: bool) -> list[Any]:
        """Results per job (None where scoring failed): the bank's incremental pass, or
        score_fn on the full lead-in; a failing batch is retried one series at a time."""
        def batch(part: list[tuple]) -> list[Any]:
            if use_bank:
                return self.bank.score([Job(s.id, ser, first, stale) for s, _, first, ser, stale in part])
            return self.score_fn([j[1] for j in part], [j[3] for j in part])

        try:
            return batch(jobs)
        except Exception:
            log.exception("batched scoring of %d series failed; scoring one by one", len(jobs))
        results = []
        for job in jobs:
            s = job[0]
            try:
                results.append(batch([job])[0])
            except Exception as e:  # noqa: BLE001 - one series' scoring is a boundary
                self.metrics.poll_errors.labels("score").inc()
                log.error("scoring series %s %s failed: %s", s.query, s.exposed, e)
                results.append(None)
                self.bank.remove(s.id)  # its cache may be half-written: rescore in full
        return results

    def _calibrate(self, s: SeriesState, res: Any, model: Any) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated scores and flags of a result: the streaming threshold of the series
        (detector.calibration), fed each new point once. The poller alone feeds calibrators,
        so this runs outside the lock (readers copy what they show or save)."""
        if s.calibrator is None:
            s.calibrator = Calibrator(self.calibration)
        phase = self._refit_phases.get(s.id)
        if phase is None:  # the series' retrain phase, as the backtest replays it
            phase = self._refit_phases[s.id] = refit_offset(
                retrain_phase(s.id, self.cfg.retrain_every), self.calibration.refit, self.step)
        s.calibrator.phase = phase  # also on one restored from disk
        # The model's identity: a retrain ends the bridge of an admitted new normal.
        key = getattr(model, "trained_to", None)
        score = s.calibrator.apply(res.timestamps, res.score, self.step,
                                   model_key=None if key is None else float(key))
        return score, debounce_flags(score, self.debounce)

    def _note_result(self, q: QueryConfig, n: int) -> None:
        """Count the series a query returned; say so when it returns none (a typo in a label,
        a metric not scraped yet): an empty answer is not an error, and would pass unseen."""
        self.metrics.query_series.labels(q.name).set(n)
        if n:
            since = self.empty_since.pop(q.name, None)
            if since is not None:
                log.info("query %s returns %d series again (none since %s)", q.name, n,
                         datetime.fromtimestamp(since, tz=UTC).strftime("%Y-%m-%d %H:%M UTC"))
            return
        now = self.clock()
        since = self.empty_since.setdefault(q.name, now)
        if since == now or (now - since) % EMPTY_WARN_EVERY < self.cfg.poll_every:
            how_long = f"for {format_duration(now - since)} now" if now > since else "first poll"
            log.warning("query %s returned no series (%s): nothing to model; check its expr "
                        "in Prometheus: %s", q.name, how_long, q.expr)
