"""On-demand scoring of any past range: the storage behind the Prometheus-compatible query API.

A query for [start, end] pulls each query's source series for [start - lead-in, end] through
the same Source the poller uses (chunked under Prometheus' 11,000-point limit), scores them
with each series' current model in one batched score_many pass, and returns the points on the
model grid (the service's `step`). Where the live poller already holds scored points (its
recent buffer), those are used instead, so an instant query at "now" gives what /metrics shows.

Scored points are cached in chunks of `chunk_points` grid points per series, keyed by the
series id, the model (a retrained model makes a new key) and the chunk index. An entry is
valid up to the newest point that was `settle` seconds old when it was scored, so late
samples are never frozen out; a chunk's newer points come from the live buffer or are scored
again. The cache is an LRU bounded by the number of stored values.

Series that vanished from the source keep their model on disk for `model_retention`; they
stay queryable for past ranges (their model is loaded on demand, a few kept in memory).

Limits (config keys): query_max_score_points bounds the points one query scores,
query_cache_values the cache, query_timeout the time a query may take (checked between the
source reads and between scoring batches, so a cancelled query stops within one batch).

Sampling at the query's step is promql.py's business: anomaly_score and anomaly_flag take
the maximum inside each step, the other metrics the newest point (Prometheus' semantics).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from detector import ModelFileError, lead_in_points, regularize, score_many

from ..service.poller import grid_floor
from ..service.registry import (
    ANOMALY_METRICS,
    READY,
    RESULT_FIELDS,
    SeriesState,
    exposed_labels,
    series_id,
)
from ..source.prometheus import SourceError, only_series
from .promql import ALL_METRICS, LabelMatcher, QueryError, grid_start, matches_all

log = logging.getLogger(__name__)

FIELD_OF = {name: field for name, (field, _) in ANOMALY_METRICS.items()}
CHUNK_POINTS = 120  # grid points per cached chunk (2 h at a 60 s step): little waste at the edges
SETTLE = 300.0  # seconds after which a chunk's source data is taken as final
# Series per score_many call: big enough to batch the matmuls, small enough that a query
# past its deadline stops soon (and memory per call stays bounded).
SCORE_BATCH = 16
GONE_MODELS = 64  # models of vanished series kept loaded (about 240 KB each)
# On-demand pulls for at most this many series of a query ask Prometheus for just those
# (only_series); more, and the whole query is pulled (the narrowing expression grows per series).
NARROW_MAX = 32


Chunk = tuple[dict[str, np.ndarray], float]  # ({field: (C,)}, valid up to this time)


def _token(model: Any) -> tuple[int, float]:
    """Identity of a model instance: a retrained model never shares its cache entries."""
    return id(model), float(getattr(model, "trained_at", 0.0))


class ScoreCache:
    """LRU of scored chunks: key -> ({field: (C,)}, valid_to), bounded by the values held."""

    def __init__(self, max_values: int) -> None:
        self.max_values = max_values
        self.values = 0
        self._lock = threading.Lock()
        self._data: OrderedDict[tuple, Chunk] = OrderedDict()

    def get(self, key: tuple) -> Chunk | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
            return hit

    def put(self, key: tuple, chunk: Chunk) -> None:
        size = sum(len(v) for v in chunk[0].values())
        if size > self.max_values:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.values -= sum(len(v) for v in old[0].values())
            self._data[key] = chunk
            self.values += size
            while self.values > self.max_values:
                _, gone = self._data.popitem(last=False)
                self.values -= sum(len(v) for v in gone[0].values())


class OnDemandScorer:
    """Scores registry series over any range; one instance per service."""

    def __init__(self, service: Any) -> None:
        cfg = service.cfg
        self.svc = service
        self.step = float(cfg.step)
        self.lead_in = lead_in_points(service.vae_config)
        self.chunk_points = CHUNK_POINTS
        self.max_score_points = cfg.query_max_score_points
        self.timeout = cfg.query_timeout
        self.settle = max(SETTLE, float(cfg.poll_delay))
        self.cache = ScoreCache(cfg.query_cache_values)
        self._gone: OrderedDict[str, SeriesState] = OrderedDict()  # vanished, model loaded
        self._gone_lock = threading.Lock()  # _gone is shared by concurrent queries
        self.score_fn = getattr(service.poller, "score_fn", score_many)
        self._exprs = {q.name: q.expr for q in service.queries}
        self._score_lock = threading.Lock()  # one on-demand scoring pass at a time
        self.passes = 0  # scoring passes run (tests read it to see the cache work)

    def session(self) -> Session:
        """A Storage for one query evaluation (remembers which series its label sets name)."""
        return Session(self)

    def labelsets(self, names: Sequence[str] = ALL_METRICS,
                  ) -> list[tuple[dict[str, str], SeriesState]]:
        """(labels with __name__, series) of the anomaly_* series named `names` of every
        registered series, and of the vanished series whose model is still on disk
        (queryable for past ranges)."""
        with self.svc.registry.lock:
            states = self.svc.registry.all()
            gone = dict(self.svc.registry.vanished)
        with self._gone_lock:
            for sid in [sid for sid in self._gone if sid not in gone]:  # back, or deleted
                del self._gone[sid]
            loaded = [self._gone.get(sid) for sid in gone]
        for (sid, info), s in zip(gone.items(), loaded):
            if s is None:
                query, labels = str(info["query"]), dict(info["labels"])
                s = SeriesState(id=sid, query=query, labels=labels,
                                exposed=exposed_labels(query, labels), stored=True)
            states.append(s)
        return [({**s.exposed, "__name__": name}, s) for s in states for name in names]

    def _load_gone(self, states: Sequence[SeriesState]) -> None:
        """Load the stored model of each vanished series in `states` (a few stay loaded)."""
        registry = self.svc.registry
        for s in states:
            if s.model is not None or registry.get(s.id) is s:
                with self._gone_lock:
                    if s.id in self._gone:
                        self._gone.move_to_end(s.id)
                continue
            try:
                s.model = self.svc.store.load(s.id)
            except ModelFileError as e:
                log.warning("vanished series %s %s: model not loadable (%s)", s.query,
                            s.exposed, e)
                continue
            s.state = READY
            with self._gone_lock:
                self._gone[s.id] = s
                while len(self._gone) > GONE_MODELS:
                    self._gone.popitem(last=False)

    def rows(self, states: Sequence[SeriesState], g0: float, g1: float,
             deadline: float = math.inf) -> dict[str, dict]:
        """Per series id: {field: (N,)} on the grid g0, g0+step, ..., g1 (NaN = no point).

        Per chunk, in order of preference: the live poller's recent points, the cache (whose
        entries are valid up to the time they had settled), a fresh scoring pass.
        `deadline` (time.monotonic()) cancels the query with a timeout error.
        """
        step, c = self.step, self.chunk_points
        n = math.floor((g1 - g0) / step + 1e-9) + 1 if g1 >= g0 else 0
        grids = {f: np.full((len(states), n), np.nan) for f in RESULT_FIELDS}  # rows are views
        out = {s.id: {f: grids[f][i] for f in RESULT_FIELDS} for i, s in enumerate(states)}
        if n == 0:
            return out
        self._load_gone(states)
        live = []  # (series, model, first live time, its live points inside [g0, g1])
        eps = 1e-6 * step
        with self.svc.registry.lock:
            for s in states:
                if s.state != READY or s.model is None:
                    continue
                rts = s.recent.get("timestamp")
                scored = np.isfinite(s.recent["score"]) if rts is not None else None
                if rts is None or not len(rts) or not scored.any():
                    live.append((s, s.model, math.inf, {}))
                    continue
                # The buffer covers from its first scored point: before it lies the warm-up
                # of a buffer filled without lead-in (the first training), scored on demand.
                live_from = float(rts[int(np.argmax(scored))])
                # Copy only the part in range: an instant query over 1,000 series would
                # otherwise copy hours of points per series (recent timestamps are sorted).
                a, b = np.searchsorted(rts, [g0 - eps, g1 + eps])
                live.append((s, s.model, live_from,
                             {k: v[a:b].copy() for k, v in s.recent.items()}))
        k0 = math.floor(g0 / (c * step) + 1e-9)
        k1 = math.floor(g1 / (c * step) + 1e-9)
        chunks: dict[str, dict[int, Chunk]] = {}
        todo: list[tuple[SeriesState, Any]] = []
        lo_todo, hi_todo = math.inf, -math.inf
        for s, model, live_from, _ in live:
            have = chunks.setdefault(s.id, {})
            missing = False
            for k in range(k0, k1 + 1):
                need_from = max(k * c * step, g0)
                need_to = min((k + 1) * c * step - step, g1)
                if need_from >= live_from - eps:
                    continue  # the live buffer covers this part
                hit = self.cache.get((s.id, _token(model), k))
                if hit is not None and (hit[1] >= need_to or hit[1] + step >= live_from):
                    have[k] = hit
                    continue
                missing = True
                lo_todo = min(lo_todo, k * c * step)
                hi_todo = max(hi_todo, (k + 1) * c * step - step)
            if missing:
                todo.append((s, model))
        if todo:
            hi_todo = min(hi_todo, math.floor(self.svc.clock() / step) * step)
            for sid, got in self._score(todo, lo_todo, hi_todo, deadline).items():
                chunks[sid].update(got)
        base = round(g0 / step)
        for s, _, _, recent in live:
            dest = out[s.id]
            for k, (part, valid_to) in chunks.get(s.id, {}).items():
                first = k * c  # grid index of the chunk's first point
                a = max(first, base)
                b = min(first + c, round(min(g1, valid_to) / step) + 1)
                if a >= b:
                    continue
                for f in RESULT_FIELDS:
                    dest[f][a - base:b - base] = part[f][a - first:b - first]
            if len(recent.get("timestamp", ())):  # the live points (what /metrics exposed)
                self._place(dest, recent["timestamp"], recent, g0, n)
        return out

    def _place(self, dest: dict[str, np.ndarray], ts: np.ndarray,
               values: Mapping[str, np.ndarray], g0: float, n: int) -> None:
        """Write the scored points at `ts` into `dest`'s grid g0, g0+step, ... (n points);
        unscored points (NaN score) are left out in every field, as on /metrics."""
        idx = np.rint((ts - g0) / self.step).astype(np.int64)
        ok = (idx >= 0) & (idx < n) & np.isfinite(values["score"])
        for f in RESULT_FIELDS:
            dest[f][idx[ok]] = values[f][ok]

    def _check(self, deadline: float, doing: str) -> None:
        if time.monotonic() > deadline:
            raise QueryError("timeout", f"query timed out in {doing} (query_timeout "
                             f"{self.timeout:g} s); narrow the time range or the series")

    def _score(self, todo: list[tuple[SeriesState, Any]], lo: float, hi: float,
               deadline: float = math.inf) -> dict[str, dict[int, Chunk]]:
        """Pull and score [lo, hi] (lo chunk-aligned) for `todo` in one batch.

        Chunks are cached with the newest time that had settled (valid_to); later points of
        a chunk are scored again by the next query that needs them.
        """
        step, c = self.step, self.chunk_points
        if hi < lo:
            return {}
        n = math.floor((hi - lo) / step + 1e-9) + 1
        if n * len(todo) > self.max_score_points:
            raise QueryError("execution", f"scoring {len(todo)} series over {n} points each "
                             f"exceeds the limit of {self.max_score_points} points per query; "
                             "narrow the time range or the series")
        pull_from = lo - self.lead_in * step
        by_query: dict[str, list[tuple[SeriesState, Any]]] = {}
        for s, model in todo:
            by_query.setdefault(s.query, []).append((s, model))
        if not self._score_lock.acquire(timeout=max(0.0, min(deadline - time.monotonic(),
                                                             self.timeout))):
            raise QueryError("timeout", "query timed out waiting for another query's scoring "
                             f"pass (query_timeout {self.timeout:g} s)")
        try:
            models, series, owners = [], [], []
            for name, members in by_query.items():
                expr = self._exprs.get(name)
                if expr is None:
                    continue
                self._check(deadline, "reading the source series")
                if (getattr(self.svc.source, "narrowable", False) and len(members) <= NARROW_MAX
                        and len(members) < len(self.svc.registry.of_query(name))):
                    expr = only_series(expr, [s.labels for s, _ in members])
                try:
                    found = self.svc.source.query_range(expr, pull_from, hi, step)
                except SourceError as e:
                    raise QueryError("unavailable", f"cannot read the source series of "
                                     f"{name!r}: {e}") from None
                by_id = {series_id(name, rs.labels): rs for rs in found}
                for s, model in members:
                    rs = by_id.get(s.id)
                    if rs is None or not len(rs.timestamps):
                        continue
                    models.append(model)
                    series.append(regularize(rs.timestamps, rs.values, step))
                    owners.append((s, model))
            results = []
            for a in range(0, len(models), SCORE_BATCH):
                self._check(deadline, f"scoring ({a} of {len(models)} series done)")
                results += self.score_fn(models[a:a + SCORE_BATCH], series[a:a + SCORE_BATCH])
            self.passes += 1
        finally:
            self._score_lock.release()
        settled = math.floor((self.svc.clock() - self.settle) / step) * step
        k_lo = round(lo / (c * step))
        n_chunks = math.floor((hi - lo) / (c * step) + 1e-9) + 1
        out: dict[str, dict[int, Chunk]] = {s.id: {} for s, _ in todo}
        for (s, model), res in zip(owners, results):
            grid = {f: np.full(n_chunks * c, np.nan) for f in RESULT_FIELDS}
            self._place(grid, res.timestamps, {f: getattr(res, f) for f in RESULT_FIELDS},
                        lo, n_chunks * c)
            for j in range(n_chunks):
                k = k_lo + j
                part = {f: grid[f][j * c:(j + 1) * c] for f in RESULT_FIELDS}
                out[s.id][k] = (part, hi)
                valid_to = min(settled, hi)
                if valid_to >= k * c * step:
                    self.cache.put((s.id, _token(model), k), (part, valid_to))
        for s, _ in todo:  # series the source no longer returns: nothing to score
            for k in range(k_lo, k_lo + n_chunks):
                out[s.id].setdefault(k, ({f: np.full(c, np.nan) for f in RESULT_FIELDS}, hi))
        return out


class Session:
    """promql.Storage over the scorer, for one query evaluation."""

    def __init__(self, scorer: OnDemandScorer) -> None:
        self.scorer = scorer
        self.step = scorer.step
        self.deadline = time.monotonic() + scorer.timeout
        self._refs: dict[tuple, tuple[SeriesState, str]] = {}

    def select(self, matchers: Sequence[LabelMatcher]) -> list[dict[str, str]]:
        # Metric names first: `anomaly_score{...}` then builds and matches one label set per
        # series instead of six (this is most of an instant query's cost at 1,000 series).
        by_name = [m for m in matchers if m.name == "__name__"]
        names = [n for n in ALL_METRICS if matches_all({"__name__": n}, by_name)]
        out = []
        for labels, s in self.scorer.labelsets(names):
            if matches_all(labels, matchers):
                self._refs[tuple(sorted(labels.items()))] = (s, FIELD_OF[labels["__name__"]])
                out.append(labels)
        return out

    def load(self, series: Sequence[Mapping[str, str]], start: float, end: float) -> np.ndarray:
        step = self.step
        g0 = grid_start(start, step)
        g1 = grid_floor(end, step)
        n = math.floor((g1 - g0) / step + 1e-9) + 1 if g1 >= g0 else 0
        refs = [self._refs[tuple(sorted(lab.items()))] for lab in series]
        states = list({s.id: s for s, _ in refs}.values())
        started = time.monotonic()
        rows = self.scorer.rows(states, g0, g1, self.deadline)  # (0,) rows if n == 0
        log.debug("loaded %d series x %d points in %.3f s", len(states), n,
                  time.monotonic() - started)
        out = np.full((len(series), n), np.nan)
        for i, (s, field) in enumerate(refs):
            out[i] = rows[s.id][field]
        return out
