"""Serving many models: weights held once, stacked per model shape, and incremental scoring.

A poll scores the newest point of every series. `score_many` would restack every model's
weights and re-score the `lead_in_points` windows the smoothing looks back over, where one
window per series is new. The bank keeps

- the weights of every installed model in fixed blocks of stacked tensors per VAEConfig
  (a slot per series; the model's own `params` become views of its slot, so the weights
  exist once), stored in float16 when they fit (half the bytes; scoring upcasts a block to
  float32, the math stays fp32);
- per series, the raw per-scale scores and newest-point mu/std of the newest
  `smooth + debounce - 2` windows (what the smoothing and debounce of the next point read),

so `score` computes only the windows that are new. Each window's score depends only on its
points, its model and its end time (the latent draws are keyed by it), so the rows match
`score_many` on the full lead-in (to float32 rounding of the batched matmuls). A series
without a usable cache (new model, restart, a gap in the polls, rewritten points) is scored
on its full lead-in and returns every row, as `score_many` does.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import VAEConfig, lead_in_points
from .fitted import SeriesModel
from .model import Params, layer_shapes
from .scoring import Packed, ScoreResult, finish, pack, score_windows, valid_ends
from .series import Series

BLOCK = 1024  # slots per block of stacked weights (never reallocated: models view them)
PASS = 32  # slots scored per pass: their float32 weights fit a 7.5 MB scratch (default model)
STORAGE = torch.float16
_FP16_MAX = 65504.0


@dataclass
class Job:
    """Score `series` (the full lead-in before `first`, as for score_many) with the model of
    `key`. stale_from: buffered values at or after this time changed since the last poll,
    so cached windows ending there are stale."""

    key: Hashable
    series: Series
    first: float
    stale_from: float = math.inf


class _Group:
    """The slots of one (VAEConfig, storage dtype): blocks of stacked weights, per-slot
    constants of scoring and the raw-score cache."""

    def __init__(self, config: VAEConfig, dtype: torch.dtype, block: int) -> None:
        self.config, self.dtype, self.block = config, dtype, block
        self.depth = config.smooth + config.debounce - 2  # cached windows before the first new
        self.blocks: list[Params] = []
        self._buf: Params = {}  # float32 scratch for PASS slots' weights
        self.free: list[int] = []
        self.models: list[SeriesModel | None] = []
        n_s = len(config.score_scales)
        self.seed = np.zeros(0, np.int64)
        self.cond = np.zeros((0, 4), np.float32)
        self.consts = np.zeros((0, 6))  # center, scale, baseline, span, nonnegative, band_k
        self.med = np.zeros((0, n_s))
        self.spread = np.ones((0, n_s))
        self.cache_end = np.zeros(0)  # end time of the newest cached window; NaN = none
        self.c_raw = np.zeros((0, self.depth, n_s))
        self.c_mu = np.zeros((0, self.depth))
        self.c_sd = np.zeros((0, self.depth))

    def _grow(self) -> None:
        b = self.block
        shapes = {}
        for name, n_in, n_out in layer_shapes(self.config):
            shapes[f"{name}.w"], shapes[f"{name}.b"] = (n_in, n_out), (1, n_out)
        self.blocks.append({k: torch.zeros((b,) + s, dtype=self.dtype) for k, s in shapes.items()})
        base = len(self.models)
        self.models += [None] * b
        self.free += list(range(base + b - 1, base - 1, -1))  # lowest slot first

        def more(a: np.ndarray, fill: float) -> np.ndarray:
            return np.concatenate([a, np.full((b,) + a.shape[1:], fill, a.dtype)])

        self.seed, self.cond, self.consts = more(self.seed, 0), more(self.cond, 0), more(self.consts, 0)
        self.med, self.spread = more(self.med, 0.0), more(self.spread, 1.0)
        self.cache_end = more(self.cache_end, np.nan)
        self.c_raw, self.c_mu, self.c_sd = more(self.c_raw, np.nan), more(self.c_mu, np.nan), more(self.c_sd, np.nan)

    def put(self, model: SeriesModel) -> int:
        if not self.free:
            self._grow()
        g = self.free.pop()
        blk, j = divmod(g, self.block)
        p = self.blocks[blk]
        for name, v in model.params.items():
            p[name][j].copy_(v.detach()[0])
        model.params = {name: p[name][j:j + 1] for name in p}  # the weights now live here once
        self.models[g] = model
        cfg = self.config
        self.seed[g] = model.seed
        d, w = model.seasonality
        self.cond[g] = (d, d, w, w)
        span = model.threshold_ - model.baseline_
        if not span > 0:  # as normalise_scores
            span = max(abs(model.threshold_), 1e-9)
        self.consts[g] = (model.center, model.scale, model.baseline_, span,
                          bool(model.extra.get("nonnegative")), cfg.band_k)
        stats = model.scale_stats or [(0.0, 1.0)] * len(cfg.score_scales)
        self.med[g] = [m for m, _ in stats]
        self.spread[g] = [s for _, s in stats]
        self.cache_end[g] = np.nan
        return g

    def take(self, g: int) -> None:
        """Free slot g; its model keeps a private copy of its weights (it may still be used)."""
        model = self.models[g]
        if model is not None:
            model.params = {k: v.clone() for k, v in model.params.items()}
        self.models[g] = None
        self.cache_end[g] = np.nan
        self.free.append(g)

    def params(self, slots: np.ndarray) -> Iterator[tuple[np.ndarray, Params]]:
        """float32 weights of `slots` (sorted), at most PASS at a time: (positions in slots,
        Params). The Params are views of one scratch buffer, valid until the next item:
        converting into memory already mapped is ~10x faster than a fresh tensor per poll."""
        blk = slots // self.block
        for b in np.unique(blk):
            pos_b = np.flatnonzero(blk == b)
            src = self.blocks[int(b)]
            for a in range(0, len(pos_b), PASS):
                pos = pos_b[a:a + PASS]
                local = slots[pos] % self.block
                k = len(pos)
                out = {}
                for name, v in src.items():
                    dst = self._scratch(name, v)[:k]
                    lo = int(local[0])
                    if int(local[-1]) - lo + 1 == k:  # consecutive slots: a slice, no gather
                        dst.copy_(v[lo:lo + k])
                    else:
                        dst.copy_(v.index_select(0, torch.from_numpy(local)))
                    out[name] = dst
                yield pos, out

    def _scratch(self, name: str, v: torch.Tensor) -> torch.Tensor:
        buf = self._buf.get(name)
        if buf is None:
            buf = self._buf[name] = torch.empty((PASS,) + tuple(v.shape[1:]), dtype=torch.float32)
        return buf


class ModelBank:
    """Installed models by key (a series id), stacked per VAEConfig; see the module docstring.

    Not thread-safe: one owner (the poller) installs, removes and scores. A model's `params`
    view the bank while it is installed; removing or replacing it gives the model its own copy.
    """

    def __init__(self, storage: torch.dtype = STORAGE, block: int = BLOCK) -> None:
        self.storage, self.block = storage, block
        self._groups: dict[tuple[VAEConfig, torch.dtype], _Group] = {}
        self._where: dict[Hashable, tuple[_Group, int]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where

    def keys(self) -> list[Hashable]:
        return list(self._where)

    def model(self, key: Hashable) -> SeriesModel | None:
        where = self._where.get(key)
        return None if where is None else where[0].models[where[1]]

    def install(self, key: Hashable, model: SeriesModel) -> None:
        """Make `model` the one scoring `key` (no-op if it already is). A new model drops the
        cached windows: they were scored by the old one."""
        where = self._where.get(key)
        if where is not None and where[0].models[where[1]] is model:
            return
        self.remove(key)
        dtype = self.storage
        if dtype == torch.float16 and not all(
                bool(torch.isfinite(v).all()) and float(v.abs().max()) <= _FP16_MAX
                for v in model.params.values()):
            dtype = torch.float32  # weights beyond float16's range keep full precision
        group = self._groups.get((model.config, dtype))
        if group is None:
            group = self._groups[(model.config, dtype)] = _Group(model.config, dtype, self.block)
        self._where[key] = (group, group.put(model))

    def remove(self, key: Hashable) -> None:
        where = self._where.pop(key, None)
        if where is not None:
            where[0].take(where[1])

    def nbytes(self) -> int:
        """Bytes held: weight blocks, float32 scratch, per-slot constants and caches."""
        total = 0
        for g in self._groups.values():
            total += sum(v.numel() * v.element_size() for p in g.blocks for v in p.values())
            total += sum(v.numel() * v.element_size() for v in g._buf.values())
            total += sum(a.nbytes for a in (g.seed, g.cond, g.consts, g.med, g.spread,
                                            g.cache_end, g.c_raw, g.c_mu, g.c_sd))
        return total

    def score(self, jobs: Sequence[Job]) -> list[ScoreResult]:
        """Results per job: every row of its series when scored on the full lead-in, else the
        rows from `first` - (debounce - 1) on (what the debounce of `first` reads; their own
        `flag` is debounced over the returned rows only). Rows equal score_many's on the same
        series, to float32 rounding. KeyError for a key without a model."""
        out: list[ScoreResult | None] = [None] * len(jobs)
        full: dict[_Group, list[int]] = {}
        inc: dict[tuple[_Group, int, int], list[int]] = {}
        for i, job in enumerate(jobs):
            group, g = self._where[job.key]
            ts = job.series.timestamps
            i0 = int(np.searchsorted(ts, job.first - 1e-6))
            n_new = len(ts) - i0
            if n_new <= 0:
                raise ValueError(f"job {job.key!r}: no point at or after {job.first}")
            n_comp = self._to_compute(group, g, ts, i0, job.stale_from)
            if n_comp:
                inc.setdefault((group, n_comp, n_new), []).append(i)
            else:
                full.setdefault(group, []).append(i)
        for group, idx in full.items():
            self._score_full(group, [jobs[i] for i in idx], idx, out)
        for (group, n_comp, n_new), idx in inc.items():
            self._score_new(group, n_comp, n_new, [jobs[i] for i in idx], idx, out)
        return out  # type: ignore[return-value]

    @staticmethod
    def _to_compute(group: _Group, g: int, ts: np.ndarray, i0: int, stale_from: float) -> int:
        """Windows to compute with the cache (the newest ones, after the cached), or 0: no
        usable cache. Usable: the cached windows end on a point of the series before the
        first new one, lie whole inside its lead-in and none of them is stale."""
        lead_in = lead_in_points(group.config)
        if i0 < lead_in:
            return 0
        if group.depth == 0:
            return len(ts) - i0
        end = group.cache_end[g]
        if not end < stale_from:  # NaN (none) or stale
            return 0
        j = int(np.searchsorted(ts, end - 1e-6))
        if not (lead_in - 1 <= j <= i0 - 1 and abs(ts[j] - end) < 1e-6):
            return 0
        return len(ts) - 1 - j

    def _score_full(self, group: _Group, jobs: list[Job], idx: list[int],
                    out: list[ScoreResult | None]) -> None:
        """score_many's path on the bank's weights; fills the caches from the newest windows."""
        cfg = group.config
        slots = np.array([self._where[j.key][1] for j in jobs])
        order = np.argsort(slots, kind="stable")
        for pos, p in group.params(slots[order]):
            sel = order[pos]
            ss = [jobs[k].series for k in sel]
            c = group.consts[slots[sel]]
            packed = pack(ss, c[:, 0].tolist(), c[:, 1].tolist(), cfg.clip)
            packed.cond_mask = torch.from_numpy(group.cond[slots[sel]])
            length = packed.z.shape[1]
            first = min(cfg.window - 1, length - 1)
            valid = valid_ends(packed, cfg).numpy()
            raw = np.full((len(sel), length, len(cfg.score_scales)), np.nan)
            mu, sd = np.full((len(sel), length), np.nan), np.full((len(sel), length), np.nan)
            if length >= cfg.window:
                ends = torch.arange(first, length).expand(len(sel), length - first).clone()
                raw_e, mu_e, sd_e = score_windows(p, cfg, packed, ends, group.seed[slots[sel]].tolist())
                raw[:, first:], mu[:, first:], sd[:, first:] = raw_e, mu_e, sd_e
            for r, k in enumerate(sel):
                s, g = ss[r], int(slots[k])
                n = len(s)
                model = group.models[g]
                out[idx[k]] = finish(model, cfg, s, valid[r, :n], raw[r, :n], mu[r, :n], sd[r, :n])
                # Cache the newest windows if each lies whole inside the series (else they
                # were warm-up here, but are real windows of the next, longer lead-in).
                d = group.depth
                if n >= cfg.window - 1 + d:
                    group.c_raw[g] = np.where(valid[r, n - d:n, None], raw[r, n - d:n], np.nan)
                    group.c_mu[g], group.c_sd[g] = mu[r, n - d:n], sd[r, n - d:n]
                    group.cache_end[g] = s.timestamps[-1]

    def _score_new(self, group: _Group, n_comp: int, n_new: int, jobs: list[Job], idx: list[int],
                   out: list[ScoreResult | None]) -> None:
        """Jobs with a usable cache, n_comp windows after it and n_new new points each: score
        those windows only, in one batch per block, and finish all rows at once (vectorised
        over series). n_comp > n_new where the oldest new points were missing."""
        cfg = group.config
        w, d, deb = cfg.window, group.depth, cfg.debounce
        k_all = len(jobs)
        slots = np.array([self._where[j.key][1] for j in jobs])
        span = w - 1 + n_comp  # points the computed windows cover
        vals = np.stack([j.series.values[-span:] for j in jobs])  # the cached end >= w - 2
        times = np.stack([j.series.timestamps[-span:] for j in jobs])
        c = group.consts[slots]
        with np.errstate(over="ignore", invalid="ignore"):
            z = (vals - c[:, 0:1]) / c[:, 1:2]  # as series.normalise, row-wise
        z = np.clip(z, -cfg.clip, cfg.clip)
        obs = np.isfinite(z)
        packed = Packed(torch.from_numpy(np.where(obs, z, 0.0).astype(np.float32)),
                        torch.from_numpy(obs.astype(np.float32)), torch.from_numpy(times),
                        torch.full((k_all,), span, dtype=torch.int64),
                        torch.from_numpy(group.cond[slots]))
        valid = valid_ends(packed, cfg).numpy()[:, w - 1:]  # (K, n_comp)
        n_s = len(cfg.score_scales)
        raw = np.empty((k_all, n_comp, n_s))
        mu, sd = np.empty((k_all, n_comp)), np.empty((k_all, n_comp))
        order = np.argsort(slots, kind="stable")
        for pos, p in group.params(slots[order]):
            sel = torch.from_numpy(order[pos])
            sub = Packed(packed.z[sel], packed.m[sel], packed.t[sel], packed.lengths[sel],
                         packed.cond_mask[sel])
            ends = torch.arange(w - 1, span).expand(len(sel), n_comp).clone()
            r_e, m_e, s_e = score_windows(p, cfg, sub, ends, group.seed[slots[order[pos]]].tolist())
            raw[order[pos]], mu[order[pos]], sd[order[pos]] = r_e, m_e, s_e
        raw = np.where(valid[..., None], raw, np.nan)
        all_raw = np.concatenate([group.c_raw[slots], raw], axis=1)  # (K, d + n_comp, S)
        all_mu = np.concatenate([group.c_mu[slots], mu], axis=1)
        all_sd = np.concatenate([group.c_sd[slots], sd], axis=1)
        # As combine_scales, smooth_scores and normalise_scores, along the last axis.
        combined = ((all_raw - group.med[slots][:, None, :]) / group.spread[slots][:, None, :]).mean(-1)
        r = _smooth_rows(combined, cfg.smooth)
        n_rows = n_new + deb - 1  # the new rows and what the debounce of the first one reads
        lo = d + n_comp - n_rows
        r = r[:, lo:]
        ok = np.isfinite(r)
        score = (r - c[:, 2:3]) / c[:, 3:4]
        expected = np.where(ok, all_mu[:, lo:] * c[:, 1:2] + c[:, 0:1], np.nan)
        half = np.where(ok, c[:, 5:6] * all_sd[:, lo:] * c[:, 1:2], np.nan)
        lower, upper = expected - half, expected + half
        nonneg = c[:, 4] > 0
        if nonneg.any():
            expected[nonneg] = np.maximum(expected[nonneg], 0.0)
            lower[nonneg] = np.maximum(lower[nonneg], 0.0)
        upper = np.maximum(upper, lower)
        if d:
            group.c_raw[slots] = all_raw[:, -d:]
            group.c_mu[slots], group.c_sd[slots] = all_mu[:, -d:], all_sd[:, -d:]
        group.cache_end[slots] = times[:, -1]
        flag = _debounce_rows(score, deb)
        for r_i, job in enumerate(jobs):
            s = job.series
            out[idx[r_i]] = ScoreResult(
                timestamps=s.timestamps[-n_rows:].copy(), observed=s.values[-n_rows:].copy(),
                raw=r[r_i], score=score[r_i], flag=flag[r_i],
                expected=expected[r_i], lower=lower[r_i], upper=upper[r_i])


def _smooth_rows(raw: np.ndarray, n: int) -> np.ndarray:
    """threshold.smooth_scores along the last axis of (K, N)."""
    ok = np.isfinite(raw)
    if n <= 1 or raw.shape[-1] == 0:
        return np.where(ok, raw, np.nan)
    k = raw.shape[0]
    pad = np.concatenate([np.zeros((k, n - 1)), np.where(ok, raw, 0.0)], axis=1)
    okp = np.concatenate([np.zeros((k, n - 1), dtype=bool), ok], axis=1)
    win = np.lib.stride_tricks.sliding_window_view(pad, n, axis=1)  # (K, N, n)
    cnt = np.lib.stride_tricks.sliding_window_view(okp, n, axis=1).sum(-1)
    with np.errstate(over="ignore"):
        out = (win / np.maximum(cnt, 1)[..., None]).sum(-1)
    big = np.finfo(np.float64).max
    np.clip(out, -big, big, out=out)
    out[~ok] = np.nan
    return out


def _debounce_rows(score: np.ndarray, n: int) -> np.ndarray:
    """threshold.debounce_flags along the last axis of (K, N)."""
    fin = np.isfinite(score)
    above = np.where(fin, score >= 1.0, False).astype(np.int64)
    if n <= 1:
        run_ok = above.astype(bool)
    else:
        c = np.concatenate([np.zeros((len(score), 1), np.int64), np.cumsum(above, axis=1)], axis=1)
        run_ok = np.zeros(score.shape, dtype=bool)
        run_ok[:, n - 1:] = (c[:, n:] - c[:, :-n]) == n
    out = run_ok.astype(np.float64)
    out[~fin] = np.nan
    return out
