"""Background training: load stored models, train new series and retrain old ones in batches.

A batch holds at most `batch_cap` series (training_batch_series, or what training_memory holds
at fit_many's measured bytes per series), the most urgent first: first models, then early
retrains (a change that stays), then regular retrains by how overdue their slot is. Each
batch pulls the history of its own series only, so memory is bounded by the cap, not by
the fleet. Regular retrains come at each series' own slot (detector.deploy.next_regular),
spread over retrain_every, so a fleet trained at once does not come due at once again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from detector import (
    InsufficientDataError,
    ModelFileError,
    Series,
    fit_many,
    lead_in_points,
    min_train_points,
    regularize,
)
from detector.deploy import next_regular, retrain_phase
from detector.memory import fit_bytes_per_series

from ..config.base import format_duration
from ..config.settings import Config, QueryConfig
from ..source.prometheus import Source, SourceError, only_series
from . import allocator
from .poller import grid_floor
from .progress import human_wait
from .registry import FAILED, INSUFFICIENT, PENDING, READY, Registry, SeriesState, series_id
from .selfmetrics import SelfMetrics
from .store import ModelStore, collect_garbage

log = logging.getLogger(__name__)

PROGRESS_EVERY = 5.0  # seconds between progress log lines
# Series per narrowed history pull: each label set adds a label_replace to the expression
# (keep it well under URL limits), and an answer holds at most this many series' history.
NARROW_GROUP = 32


class Cancelled(Exception):
    """Training was stopped because the service is shutting down."""


class Trainer:
    """Picks the series that need a model, pulls their history and fits them in one batch."""

    def __init__(self, cfg: Config, queries: Sequence[QueryConfig], source: Source,
                 registry: Registry, store: ModelStore, metrics: SelfMetrics, vae_config: Any, *,
                 clock: Callable[[], float] = time.time, fit_fn: Callable = fit_many,
                 persist: Callable[[], None] | None = None,
                 on_trained: Callable[[], None] | None = None,
                 pause: Callable[[], None] | None = None) -> None:
        self.cfg, self.source, self.registry = cfg, source, registry
        self.queries = {q.name: q for q in queries}
        self.store, self.metrics, self.vae_config = store, metrics, vae_config
        self.clock, self.fit_fn = clock, fit_fn
        self.persist, self.on_trained = persist, on_trained
        self.pause = pause  # passed to fit_fn: it may block between steps (Poller.wait_idle)
        self.step = cfg.step
        self.lead_in = lead_in_points(vae_config)
        self.min_points = min_train_points(vae_config)
        # After a first training the poller scores this much of the history's tail at once, so
        # /metrics and the query API's live buffer cover `keep_scores` without on-demand work.
        self.initial_points = cfg.keep_points
        # Failed series: the next attempt. At most half of retrain_every, the nearest a regular
        # slot can follow a training (detector.deploy.next_regular), or a short retrain_every
        # would have its slots held back by it, off the schedule the backtest replays.
        self.retry_after = min(cfg.retrain_every / 2, 3600.0)
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self.loaded_once = False  # the stored models of the previous run were loaded
        points = max(1, int(cfg.history // cfg.step))
        self.bytes_per_series = fit_bytes_per_series(vae_config, points)
        self.batch_cap = cfg.training_batch_series or max(
            1, cfg.training_memory // self.bytes_per_series)
        self.queued = 0  # series due and not yet trained (the running batch included)
        self._more = False  # the last batch left due series behind: start the next at once
        self._phases: dict[str, float] = {}  # series id -> retrain_phase

    def wake(self) -> None:
        """Run a batch soon (new series were discovered)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Load stored models, then train whatever is due until `stop` is set."""
        self.stop_event = stop
        while not stop.is_set():
            self._wake.clear()
            self._more = False
            try:
                self.run_once()
            except Cancelled:
                log.info("training stopped for shutdown; previous models kept")
                break
            except Exception:  # one tick is a boundary: log, count, try again later
                self.metrics.training_errors.labels("batch").inc()
                log.exception("training tick failed")
            if not self._more:
                self._wake.wait(min(self.cfg.poll_every, 60.0))

    def load_stored(self) -> int:
        """Load the model file of every pending series that has one; returns how many loaded."""
        loaded = 0
        for s in [s for s in self.registry.all() if s.state == PENDING and s.stored]:
            if self.stop_event.is_set():
                break
            try:
                model = self.store.load(s.id)
            except (ModelFileError, OSError) as e:
                self.metrics.training_errors.labels("load").inc()
                log.error("cannot load the model of %s %s, it will be retrained: %s",
                          s.query, s.exposed, e)
                with self.registry.lock:
                    s.stored, s.last_error = False, str(e)
                continue
            if model.step != self.step or model.config.window != self.cfg.window:
                log.warning("model of %s %s was trained with step %gs window %d; retraining",
                            s.query, s.exposed, model.step, model.config.window)
                with self.registry.lock:
                    s.stored = False
                continue
            with self.registry.lock:
                s.model, s.state, s.model_origin = model, READY, "loaded"
                s.feedback = list(getattr(model, "feedback", []))  # they survive the restart
                if not math.isfinite(s.scored_to):
                    s.scored_to = model.trained_to
            self.metrics.models_loaded.inc()
            loaded += 1
        if loaded:
            log.info("loaded %d stored models from %s", loaded, self.store.models_dir)
            if self.on_trained is not None:
                self.on_trained()  # score what was missed right away
        return loaded

    def due(self, now: float) -> list[SeriesState]:
        """Series that need training now, most urgent first: new, grown past insufficient,
        failed long ago (first models, least recently tried first), then early retrains,
        then regular retrains by their slot (the most overdue first)."""
        with self.registry.lock:
            series = self.registry.all()
            if len(self._phases) > 2 * len(series) + 1000:  # series come and go: forget old ones
                self._phases.clear()
            todo = [s for s in series if self._is_due(s, now)]
            return sorted(todo, key=self._urgency)  # stable: ties keep discovery order

    def _urgency(self, s: SeriesState) -> tuple[int, float]:
        if s.model is None:
            return 0, s.last_attempt
        if s.adapt_requested:
            return 1, s.last_attempt
        return 2, self.regular_due_at(s)

    def regular_due_at(self, s: SeriesState) -> float:
        """Wall time of the next regular retrain of a series with a model: its own slot,
        at least retrain_every / 2 after its last regular training (detector.deploy)."""
        since = s.regular_at if math.isfinite(s.regular_at) else s.model.trained_at
        every = self.cfg.retrain_every
        phase = self._phases.get(s.id)
        if phase is None:  # a hash per series, once: due() runs under the registry lock
            phase = self._phases[s.id] = retrain_phase(s.id, every)
        return next_regular(since, every, phase)

    def _is_due(self, s: SeriesState, now: float) -> bool:
        retry = now - s.last_attempt >= self.retry_after
        if s.state == PENDING:
            return not s.stored  # stored models are loaded, not trained
        if s.state == INSUFFICIENT:
            return s.observed_estimate >= self.min_points or retry
        if s.state == FAILED:
            return retry
        if s.adapt_requested:
            return True  # a change that stays: learn it now, not at the next slot
        # Early retrains do not move the schedule (as detector.deploy replays it).
        return retry and now >= self.regular_due_at(s)

    def run_once(self) -> int:
        """Load new stored models, then train the `batch_cap` most urgent due series in one
        batch; returns models fit. `queued` says how many due series are left after it."""
        self.load_stored()
        self.loaded_once = True
        collect_garbage(self.registry, self.store, self.cfg.model_retention, self.clock())
        due = self.due(self.clock())
        todo = due[: self.batch_cap]
        self._set_queue(len(due))
        if not todo:
            return 0
        if len(due) > len(todo):
            log.info("%d series due for training: this batch takes the %d most urgent "
                     "(training_batch_series %d)", len(due), len(todo), self.batch_cap)
        started = time.monotonic()
        data = self._pull_history(todo)
        if not data:
            return 0
        self._more = len(due) > len(todo)
        fit = [(s, ser) for s, ser in data if self._enough(s, ser)]
        if not fit:
            self._after_batch(started, 0, len(data))
            return 0
        n_new = sum(1 for s, _ in fit if s.model is None)
        n_early = sum(1 for s, _ in fit if s.adapt_requested and s.model is not None)
        if n_early:
            log.info("retraining %d series early: a change that stays is their new normal", n_early)
        log.info("training %d series (%d new, %d retraining) on %s of history (history %s)",
                 len(fit), n_new, len(fit) - n_new, _spans([ser for _, ser in fit], self.step),
                 _human(self.cfg.history))
        self.metrics.training_batch.set(len(fit))
        self.metrics.training_progress.set(0.0)
        queue_at_start = self.queued
        try:
            # Feedback (service.feedback) only when some series has it: a fit_fn without the
            # keyword keeps working.
            with self.registry.lock:
                judged = [list(s.feedback) for s, _ in fit]
            extra: dict[str, Any] = {"feedback": judged} if any(judged) else {}
            if self.pause is not None:
                extra["pause"] = self._pause
            results = self.fit_fn([ser for _, ser in fit], self.step, self.vae_config,
                                  progress=self._progress(started, queue_at_start), **extra)
        except Cancelled:
            raise
        except Exception as e:
            self.metrics.training_errors.labels("batch").inc(len(fit))
            log.exception("training batch of %d series failed; previous models kept", len(fit))
            for s, _ in fit:
                self._failed(s, f"batch failed: {e}")
            self._after_batch(started, 0, len(fit))
            return 0
        del data  # the batch's history: only the tails kept by _install stay
        trained = 0
        for (s, ser), res in zip(fit, results):
            if isinstance(res, Exception):
                reason = "insufficient_data" if isinstance(res, InsufficientDataError) else "fit"
                if reason == "fit":  # too little data is waiting, not an error
                    self.metrics.training_errors.labels(reason).inc()
                log.warning("training %s %s failed (%s): %s", s.query, s.exposed, reason, res)
                self._failed(s, str(res), insufficient=reason == "insufficient_data")
                continue
            self._install(s, ser, res)
            trained += 1
        self._after_batch(started, trained, len(fit))
        return trained

    def _pull_history(self, todo: list[SeriesState]) -> list[tuple[SeriesState, Series]]:
        """The batch's series' history on the step grid: per query, only those series
        (narrowed range queries of NARROW_GROUP series each, when the source can narrow and
        the batch holds part of the query), each pull chunked in time by the source."""
        end = grid_floor(self.clock() - self.cfg.poll_delay, self.step)
        start = end - self.cfg.history + self.step
        out = []
        by_query: dict[str, list[SeriesState]] = {}
        for s in todo:
            by_query.setdefault(s.query, []).append(s)
        for name, members in by_query.items():
            q = self.queries.get(name)
            if q is None:
                continue
            for group, expr in self._pulls(name, q.expr, members):
                try:
                    result = self.source.query_range(expr, start, end, self.step)
                except SourceError as e:
                    self.metrics.training_errors.labels("history").inc()
                    log.warning("history pull of %d series of query %s failed (%s): %s; will "
                                "retry", len(group), name, e.reason, e)
                    with self.registry.lock:  # behind the others in the queue, not stuck first
                        for s in group:
                            s.last_attempt = self.clock()
                    continue
                # Only the batch's series are kept (a source that cannot narrow sends all).
                wanted = {s.id for s in group}
                found = {}
                for rs in result:
                    sid = series_id(name, rs.labels)
                    if sid in wanted:
                        found[sid] = rs
                del result
                for s in group:
                    rs = found.pop(s.id, None)
                    if rs is None:
                        ser = Series(np.empty(0), np.empty(0))
                    else:
                        ser = regularize(rs.timestamps, rs.values, self.step)
                    out.append((s, ser))
        return out

    def _pulls(self, name: str, expr: str, members: list[SeriesState]
               ) -> list[tuple[list[SeriesState], str]]:
        """(series, expression) of each history pull for `members` of query `name`."""
        narrow = getattr(self.source, "narrowable", False)
        if not narrow or len(members) >= len(self.registry.of_query(name)):
            return [(members, expr)]
        groups = [members[a:a + NARROW_GROUP] for a in range(0, len(members), NARROW_GROUP)]
        return [(g, only_series(expr, [s.labels for s in g])) for g in groups]

    def _enough(self, s: SeriesState, ser: Series) -> bool:
        """True if `ser` can be trained; else marks `s` insufficient_data (or keeps its model)."""
        observed = ser.observed()
        with self.registry.lock:
            s.observed_estimate = observed
            s.last_attempt = self.clock()
        if observed >= self.min_points:
            return True
        # Waiting for data is not an error: no error counted, no last_error kept (it would go
        # stale as points arrive); the status API and page compute the progress live.
        self._failed(s, "", insufficient=True)
        wait = (self.min_points - observed) * self.step
        log.info("series %s %s: %d of %d observed points needed (%s of history so far); first "
                 "score in %s, at %s", s.query, s.exposed, observed, self.min_points,
                 _spans([ser], self.step), human_wait(wait),
                 datetime.fromtimestamp(self.clock() + wait, tz=UTC).strftime("%H:%M UTC"))
        return False

    def _failed(self, s: SeriesState, error: str, insufficient: bool = False) -> None:
        with self.registry.lock:
            s.last_error = error
            s.last_attempt = self.clock()
            s.train_failures += 0 if insufficient else 1
            if s.model is None:
                s.state = INSUFFICIENT if insufficient else FAILED

    def _install(self, s: SeriesState, ser: Series, model: Any) -> None:
        """Save and activate a fresh model; a first model also seeds lead-in and recent scores."""
        with self.registry.lock:
            # Feedback that came in during training is saved with the model and trains next.
            late = [r for r in s.feedback if r not in getattr(model, "feedback", [])]
            if hasattr(model, "feedback"):
                model.feedback = list(s.feedback)
        try:
            self.store.save(s.id, model)
            stored = True
        except Exception as e:  # noqa: BLE001 - e.g. disk full: the model serves from memory
            self.metrics.training_errors.labels("save").inc()
            log.error("cannot save the model of %s %s (kept in memory): %s", s.query, s.exposed, e)
            stored = False
        self.metrics.models_trained.inc()
        with self.registry.lock:
            first = s.model is None
            if not s.adapt_requested:
                s.regular_at = self.clock()
            s.adapt_requested = bool(late)
            s.model, s.state, s.model_origin = model, READY, "trained"
            s.stored = s.stored or stored
            s.last_error = ""
            if first and not math.isfinite(s.scored_to):
                tail = self.lead_in + self.initial_points
                s.add_points(ser.timestamps[-tail:], ser.values[-tail:], overwrite=False)
                s.scored_to = float(ser.timestamps[-1]) - self.initial_points * self.step

    def _set_queue(self, n: int) -> None:
        self.queued = max(0, n)
        self.metrics.training_queue.set(self.queued)

    def _pause(self) -> None:
        """Between training steps: a stop cancels here (not only as models finish, which at
        a fleet's batch can be minutes away), else wait while a poll runs."""
        if self.stop_event.is_set():
            raise Cancelled()
        if self.pause is not None:
            self.pause()

    def _progress(self, started: float, queue_at_start: int) -> Callable[[int, int], None]:
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if self.stop_event.is_set():
                raise Cancelled()
            self.metrics.training_progress.set(done / max(total, 1))
            self._set_queue(queue_at_start - done)
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY or done == total:
                last[0] = now
                log.info("trained %d/%d series, %.0f s", done, total, now - started)

        return progress

    def _after_batch(self, started: float, trained: int, total: int) -> None:
        allocator.release()  # the batch's working memory, kept in the heap between its steps
        self._set_queue(len(self.due(self.clock())))
        took = time.monotonic() - started
        self.metrics.training_duration.observe(took)
        self.metrics.training_progress.set(1.0)
        self.metrics.training_batch.set(0)
        self.metrics.last_training.set(self.clock())
        log.info("training batch done: %d/%d series trained in %.1f s", trained, total, took)
        if self.persist is not None:
            self.persist()
        if trained and self.on_trained is not None:
            self.on_trained()


def _human(seconds: float) -> str:
    return format_duration(seconds)


def _spans(series: Sequence[Series], step: float) -> str:
    """The history the series really hold, first observed point to last: "23 min", "2 h to 7 d"."""
    spans = []
    for ser in series:
        obs = ser.timestamps[np.isfinite(ser.values)]
        spans.append(float(obs[-1] - obs[0]) + step if len(obs) else 0.0)
    if not spans:
        return "no"
    lo, hi = (human_wait(x).removeprefix("about ") if x > 0 else "0 s"
              for x in (min(spans), max(spans)))
    return lo if lo == hi else f"{lo} to {hi}"
