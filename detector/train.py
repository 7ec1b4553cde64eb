"""Batched training: K per-series VAEs in one tensor program, with per-model Adam and early stopping.

Each model draws its own minibatches from its own windows, keeps its own Adam moments and step
count, its own best weights and its own patience counter. Nothing in a model's trajectory
depends on the other models in the batch, so training K together equals training each alone
(up to float rounding), which tests/test_train.py checks.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import feedback as fbk
from . import rng
from .config import VAEConfig, min_train_points
from .feedback import Feedback
from .fitted import SeriesModel
from .model import Params, flatten, init_params, m_elbo_loss, m_elbo_windows, select, unflatten
from .scoring import (
    Packed,
    cond_features,
    gather_windows,
    pack,
    score_windows,
    seasonality_mask,
    valid_ends,
)
from .series import Series, robust_stats
from .threshold import combine_scales, scale_stats, smooth_scores, spot_threshold

log = logging.getLogger(__name__)

MAX_VAL_WINDOWS = 256  # validation windows per model, evenly spread over the held-back tail
# Training windows scored per model to fit its threshold (each with mc_samples draws: this
# scoring cost more than 20 training steps). Up to this many, every window, contiguous; more
# (7 days at 1 minute is 10,000), and THRESHOLD_BLOCKS contiguous blocks of them spread
# evenly over the history, the last one ending at the newest window: the same distribution
# from fewer windows, and all of the history's days instead of the newest ones.
MAX_THRESHOLD_WINDOWS = 2048
THRESHOLD_BLOCKS = 16
GAP_QUANTILE = 0.5  # the held-back tail's median gap: the more stable of the quantiles tried on NAB


class InsufficientDataError(ValueError):
    """A series has too few observed points or valid windows to train a model."""


@dataclass
class _Prepared:
    index: int
    series: Series
    center: float
    scale: float


def _prepare(series: Sequence[Series], config: VAEConfig) -> tuple[list[_Prepared], dict[int, Exception]]:
    ok, failed = [], {}
    need = min_train_points(config)
    for i, s in enumerate(series):
        n_obs = s.observed()
        if n_obs < need:
            failed[i] = InsufficientDataError(
                f"{n_obs} observed points, need at least {need} (window {config.window})"
            )
            continue
        center, scale = robust_stats(s.values)
        ok.append(_Prepared(i, s, center, scale))
    return ok, failed


def _pack_prepared(prepared: list[_Prepared], config: VAEConfig, seeds: Sequence[int] | None):
    """Seeds, seasonality masks, packed tensors and valid window ends of prepared series."""
    seed_list = [int(seeds[p.index]) if seeds is not None else config.seed for p in prepared]
    seasonality = [seasonality_mask(_span(p.series)) for p in prepared]
    packed = pack(
        [p.series for p in prepared], [p.center for p in prepared], [p.scale for p in prepared], config.clip, seasonality
    )
    return seed_list, seasonality, packed, valid_ends(packed, config)


def _span(s: Series) -> float:
    obs = np.isfinite(s.values)
    return float(s.timestamps[obs][-1] - s.timestamps[obs][0]) if obs.any() else 0.0


def _split(valid: torch.Tensor, config: VAEConfig):
    """Per model: training window ends and held-back tail ends, padded. valid (K, T) bool.

    Returns (train ends, n_train, val ends, n_val, holdout (K,) bool), where holdout is
    False for a model too short to hold a tail back: it validates on its training windows.
    """
    k = valid.shape[0]
    train_l, val_l, holdout = [], [], []
    for j in range(k):
        ends = torch.nonzero(valid[j]).flatten()
        n_val = int(len(ends) * config.val_fraction)
        if n_val < 4 or len(ends) - n_val < config.batch_size // 4:
            tr, va = ends, ends  # too short to hold back: validate on training windows
        else:
            tr, va = ends[: len(ends) - n_val], ends[len(ends) - n_val :]
        holdout.append(len(tr) < len(ends))
        if len(va) > MAX_VAL_WINDOWS:
            va = va[torch.linspace(0, len(va) - 1, MAX_VAL_WINDOWS).round().long()]
        train_l.append(tr)
        val_l.append(va)
    n_train = torch.tensor([len(t) for t in train_l])
    n_val = torch.tensor([len(v) for v in val_l])
    tr_pad = torch.nn.utils.rnn.pad_sequence(train_l, batch_first=True, padding_value=0)
    va_pad = torch.nn.utils.rnn.pad_sequence(val_l, batch_first=True, padding_value=0)
    return tr_pad, n_train, va_pad, n_val, torch.tensor(holdout, dtype=torch.bool)


def _batch(packed: Packed, ends: torch.Tensor, config: VAEConfig):
    x, m, t_end = gather_windows(packed, ends, config.window)
    cond = cond_features(t_end, packed.cond_mask) if config.seasonal else None
    return x, m, cond


def _val_loss(p: Params, packed: Packed, config: VAEConfig, va: torch.Tensor, n_val: torch.Tensor):
    """Mean deterministic (z = posterior mean) loss over each model's validation windows: (K,).

    In chunks of a minibatch's windows: the same tensors as a training step, so the blocks
    the steps freed are reused; all 256 at once were 66 MB tensors at 538 series, above
    glibc's mmap threshold, faulted in on every pass (twice the time, and a peak).
    """
    with torch.no_grad():
        per_w = torch.cat([m_elbo_windows(p, config, *_batch(packed, va[:, a:a + config.batch_size], config), None)
                           for a in range(0, va.shape[1], config.batch_size)], 1)  # (K, Nv)
        real = torch.arange(va.shape[1])[None, :] < n_val[:, None]
        return (per_w * real).sum(1) / n_val.clamp_min(1)


def fit_many(
    series: Sequence[Series],
    step: float | Sequence[float],
    config: VAEConfig,
    progress: Callable[[int, int], None] | None = None,
    seeds: Sequence[int] | None = None,
    feedback: Sequence[Sequence[Feedback]] | None = None,
    pause: Callable[[], None] | None = None,
) -> list[SeriesModel | Exception]:
    """Train one model per series, all in one batched program.

    series: each on a regular grid of `step` seconds (see `regularize`), NaN = missing;
    `step` is one value for all or one per series.
    Returns, per input series, a SeriesModel or the Exception that kept it from training.
    seeds: per-series seeds (default: config.seed for all, so a model does not depend on its
    position in the batch). progress(done, total) is called as models finish.
    feedback: per series, the judged ranges (detector.feedback) training honours: EXCLUDE
    ranges are left out of training, normalisation and threshold fit; NORMAL ranges (false
    alarms) are trained on as usual and lift the threshold until they score at most
    NORMAL_TARGET. Each model keeps its records in `SeriesModel.feedback`.
    pause: called before every training step and threshold-fit chunk; it may block (the
    service waits there while a poll runs: fresh scores first, training after).
    """
    t_start = time.time()
    if feedback is not None and len(feedback) != len(series):
        raise ValueError(f"{len(feedback)} feedback lists for {len(series)} series")
    fb = [list(feedback[i]) if feedback is not None else [] for i in range(len(series))]
    steps = [float(step if isinstance(step, (int, float)) else step[i]) for i in range(len(series))]
    series = [_without_excluded(s, f) for s, f in zip(series, fb)]
    prepared, failed = _prepare(series, config)
    results: list[SeriesModel | Exception] = [failed.get(i) for i in range(len(series))]  # type: ignore[misc]
    if not prepared:
        return results
    seed_list, seasonality, packed, valid = _pack_prepared(prepared, config, seeds)
    # EXCLUDE windows (bad data) neither train nor fit the threshold; NORMAL windows (false
    # alarms) are ordinary data and afterwards floor the threshold (_accept_normal).
    t_np = packed.t.numpy()
    normal, excluded = [], []
    for j, p in enumerate(prepared):
        reach = (config.window - 1) * steps[p.index]
        normal.append(fbk.window_mask(t_np[j], fb[p.index], fbk.NORMAL, reach))
        excluded.append(fbk.window_mask(t_np[j], fb[p.index], fbk.EXCLUDE, reach))
    marked = torch.from_numpy(np.stack(normal)) & valid
    trainable = valid & ~torch.from_numpy(np.stack(excluded))
    keep = trainable.sum(1) >= 2
    split = _split(trainable, config)
    _, _, va, _, holdout = split
    k = len(prepared)

    best_p, best_loss = _train(packed, split[:4], keep, config, seed_list, progress, pause)

    # Thresholds from each model's scores on its own training windows (_threshold_ends).
    ends, n_ends, blocks = _threshold_ends(packed.lengths, config)
    raw, _, _ = score_windows(best_p, config, packed, ends, seed_list, pause)
    now = time.time()
    for j, prep in enumerate(prepared):
        if not keep[j]:
            why = " outside the ranges excluded by feedback" if valid[j].sum() >= 2 else ""
            results[prep.index] = InsufficientDataError(f"fewer than 2 windows with enough observed points{why}")
            continue
        e = ends[j, : int(n_ends[j])]
        r = np.where(trainable[j, e].numpy()[:, None], raw[j, : int(n_ends[j])], np.nan)  # (N, S)
        n_held = int((e >= int(va[j, 0])).sum()) if holdout[j] else 0
        gap = _held_out_gap(r, n_held)
        r = _held_out_shift(r, n_held)
        stats = scale_stats(r)
        scores = _smooth_blocks(combine_scales(r, stats), blocks[j], config.smooth)
        try:
            thr, method = spot_threshold(scores, config.risk, config.init_quantile)
        except ValueError as err:
            results[prep.index] = err
            continue
        baseline = float(np.nanmedian(scores))
        applied: dict = {}
        if fb[prep.index]:
            thr, applied = _accept_normal(best_p, config, packed, j, seed_list[j], marked[j].numpy(),
                                          valid[j].numpy(), stats, gap, baseline, thr)
            applied["excluded_points"] = int(fbk.point_mask(prep.series.timestamps, fb[prep.index],
                                                            fbk.EXCLUDE).sum())
        s = prep.series
        obs = np.isfinite(s.values)
        # A series never seen below 0 (ratios, byte rates) keeps its band at or above 0.
        extra = {"nonnegative": bool(np.nanmin(s.values) >= 0)}
        if applied:
            extra["feedback"] = applied
        results[prep.index] = SeriesModel(
            config=config,
            params={n: v.clone() for n, v in select(best_p, j).items()},
            step=steps[prep.index],
            center=prep.center,
            scale=prep.scale,
            threshold_=thr,
            baseline_=baseline,
            threshold_method=method,
            seed=seed_list[j],
            trained_from=float(s.timestamps[obs][0]),
            trained_to=float(s.timestamps[obs][-1]),
            trained_at=now,
            n_train=int(obs.sum()),
            seasonality=seasonality[j],
            scale_stats=stats,
            train_loss=float(best_loss[j]),
            extra=extra,
            feedback=fb[prep.index],
        )
    log.debug("fit_many: %d models in %.1f s", k, time.time() - t_start)
    return results


def _threshold_ends(lengths: torch.Tensor, config: VAEConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Window ends each model's threshold is fitted on: (K, E) padded, their count (K,) and
    per model the offsets (into its ends) where a new contiguous block starts.

    A series with up to MAX_THRESHOLD_WINDOWS windows gives all of them, one block; a longer
    one THRESHOLD_BLOCKS blocks of MAX_THRESHOLD_WINDOWS / THRESHOLD_BLOCKS contiguous ends,
    evenly spaced, the last ending at its newest window. Contiguous, so that smoothing sees
    what it sees when serving; ends in time order, so the held-back tail stays the last rows.
    """
    ends_l, blocks = [], []
    size = MAX_THRESHOLD_WINDOWS // THRESHOLD_BLOCKS
    for n in lengths.tolist():
        first, last = config.window - 1, max(config.window - 1, int(n) - 1)
        if last - first + 1 <= MAX_THRESHOLD_WINDOWS:
            ends_l.append(torch.arange(first, last + 1))
            blocks.append([0])
            continue
        starts = np.linspace(first, last - size + 1, THRESHOLD_BLOCKS).round().astype(np.int64)
        ends_l.append(torch.from_numpy(np.concatenate([np.arange(a, a + size) for a in starts])))
        blocks.append([b * size for b in range(THRESHOLD_BLOCKS)])
    n_ends = torch.tensor([len(e) for e in ends_l])
    ends = torch.nn.utils.rnn.pad_sequence(ends_l, batch_first=True, padding_value=config.window - 1)
    return ends, n_ends, blocks


def _smooth_blocks(combined: np.ndarray, blocks: list[int], n: int) -> np.ndarray:
    """smooth_scores within each contiguous block of `combined` (N,) starting at `blocks`.

    One block is the plain smoothing. Of several (sampled) blocks, each block's first n - 1
    scores average fewer windows than serving does: they are lead-in only (NaN), so every
    score the threshold sees is a full smoothing, as when serving.
    """
    if len(blocks) == 1:
        return smooth_scores(combined, n)
    out = np.empty(len(combined))
    for a, b in itertools.pairwise([*blocks, len(combined)]):
        out[a:b] = smooth_scores(combined[a:b], n)
        out[a : min(b, a + n - 1)] = np.nan
    return out


def _without_excluded(s: Series, records: Sequence[Feedback]) -> Series:
    """`s` with the points of its EXCLUDE ranges missing (the same object if it has none)."""
    drop = fbk.point_mask(s.timestamps, records, fbk.EXCLUDE) if records else None
    if drop is None or not drop.any():
        return s
    return Series(s.timestamps, np.where(drop, np.nan, s.values))


def _accept_normal(p: Params, config: VAEConfig, packed: Packed, j: int, seed: int,
                   marked: np.ndarray, valid: np.ndarray, stats: list[tuple[float, float]],
                   gap: np.ndarray, baseline: float, thr: float) -> tuple[float, dict]:
    """The threshold of model j lifted so its NORMAL windows score at most NORMAL_TARGET.

    marked, valid (T,) bool. The marked windows are scored as serving scores them (scales
    standardised, smoothed) plus the held-out gap (S,), as fresh data would score: a repeat
    of the pattern is fresh data. Every end whose smoothed score averages a marked window
    counts. Returns (threshold, what was applied).
    """
    idx = np.nonzero(marked)[0]
    if not len(idx):
        return thr, {"normal_windows": 0}
    n = int(packed.lengths[j])
    lo = max(config.window - 1, int(idx[0]) - (config.smooth - 1))
    hi = min(n - 1, int(idx[-1]) + config.smooth - 1)
    rows = torch.tensor([j])
    raw, _, _ = score_windows(select(p, rows), config, _subset(packed, rows), torch.arange(lo, hi + 1)[None, :], [seed])
    r = np.where(valid[lo : hi + 1, None], raw[0], np.nan) + gap
    smoothed = smooth_scores(combine_scales(r, stats), config.smooth)
    # An end's smoothed score holds the smooth - 1 windows before it.
    hit = np.convolve(marked[lo : hi + 1].astype(np.int64), np.ones(config.smooth, dtype=np.int64))
    seen = smoothed[hit[: hi + 1 - lo] > 0]
    seen = seen[np.isfinite(seen)]
    span = thr - baseline
    peak = float(seen.max()) if len(seen) else math.nan
    before = (peak - baseline) / span if span > 0 and math.isfinite(peak) else math.nan
    applied = {"normal_windows": len(idx), "normal_peak_score": before if math.isfinite(before) else None,
               "threshold_lifted": 1.0}
    if math.isfinite(before) and before > fbk.NORMAL_TARGET:
        applied["threshold_lifted"] = before / fbk.NORMAL_TARGET  # span multiplied by this
        thr = baseline + (peak - baseline) / fbk.NORMAL_TARGET
    return thr, applied


def _subset(packed: Packed, rows: torch.Tensor) -> Packed:
    if len(rows) == packed.z.shape[0]:
        return packed
    return Packed(packed.z[rows], packed.m[rows], packed.t[rows], packed.lengths[rows], packed.cond_mask[rows])


def _inject_missing(m: torch.Tensor, keys: torch.Tensor, it: int, config: VAEConfig) -> torch.Tensor:
    """Donut's missing-data injection: hide about `missing_injection` of each window's points.

    m (K, B, W). Draws ceil(rate · W) positions per window instead of one coin per point: the
    same expected share for small rates, and a hundred times fewer random numbers, which
    otherwise cost as much as the matmuls.
    """
    n = math.ceil(config.missing_injection * config.window)
    if n == 0:
        return m
    u = rng.uniform(keys, it, m.shape[1:2] + (n,))  # (K, B, n)
    pos = (u * config.window).long().clamp_max(config.window - 1)
    # Each drawn position is hidden with probability rate·W/n, so the expected share is exact.
    hide_p = config.missing_injection * config.window / n
    hide = (rng.uniform(keys, -1 - it, m.shape[1:2] + (n,)) < hide_p).float()
    return m.scatter(2, pos, (1 - hide) * m.gather(2, pos))


def _held_out_shift(raw: np.ndarray, n_val: int) -> np.ndarray:
    """Shift in-sample scores by how much worse the model does on windows it never trained on.

    raw (N, S): scores of the newest training windows, the last n_val of them the held-back
    tail. A model scores the windows it was fitted on better than fresh data; fitting the
    threshold on those scores alone puts it too low and floods on-call with false alarms.
    Each scale's in-sample scores are moved up by the gap between the held-back and the
    in-sample median (never down), so the threshold is fitted on scores as fresh data gets.
    """
    gap = _held_out_gap(raw, n_val)
    if not gap.any():
        return raw
    out = raw.copy()
    out[:-n_val] += gap
    return out


def _held_out_gap(raw: np.ndarray, n_val: int) -> np.ndarray:
    """(S,) the held-back minus the in-sample median score per scale, at least 0; zeros when
    the tail is too short (or too long) to say anything. raw (N, S) as in _held_out_shift."""
    if n_val < 4 or n_val >= len(raw) - 4:
        return np.zeros(raw.shape[-1])
    fit, held = raw[:-n_val], raw[-n_val:]
    with np.errstate(all="ignore"):
        gap = np.nanquantile(held, GAP_QUANTILE, axis=0) - np.nanquantile(fit, GAP_QUANTILE, axis=0)  # (S,)
    return np.where(np.isfinite(gap), np.maximum(gap, 0.0), 0.0)


class _Trainer:
    """Fused Adam over the stacked parameters: row r of every tensor is one model, so the
    moments are per model and one kernel updates all K models.

    Models that stop (early stopping or budget) are dropped from the tensors together with
    their Adam state once they are half of the rows, so finished models cost nothing; their
    result is the best snapshot kept by the caller.
    """

    def __init__(self, flat: torch.Tensor, config: VAEConfig):
        self.config = config
        self.rows = torch.arange(flat.shape[0])
        self._make({n: v.clone() for n, v in unflatten(flat, config).items()}, None)

    def _make(self, params: Params, state: dict | None) -> None:
        self.params = {n: v.requires_grad_(True) for n, v in params.items()}
        self.opt = torch.optim.Adam(
            list(self.params.values()), lr=self.config.lr, weight_decay=self.config.weight_decay, fused=True
        )
        if state is not None:
            for n, v in self.params.items():
                self.opt.state[v] = state[n]

    @property
    def flat(self) -> torch.Tensor:
        return flatten(self.params, self.config)

    def compact(self, active: torch.Tensor) -> torch.Tensor:
        keep = active[self.rows]
        if int(keep.sum()) * 2 <= len(self.rows):
            state = {}
            for n, v in self.params.items():
                st = self.opt.state.get(v, {})
                state[n] = {k: (s[keep].clone() if torch.is_tensor(s) and s.ndim == v.ndim else s) for k, s in st.items()}
            self._make({n: v.detach()[keep].clone() for n, v in self.params.items()}, state if state and all(state.values()) else None)
            self.rows = self.rows[keep]
        return self.rows

    def step(self, x: torch.Tensor, m: torch.Tensor, cond: torch.Tensor | None, eps: torch.Tensor) -> None:
        """One Adam step of every row on its own minibatch x, m (R, B, W)."""
        self.opt.zero_grad(set_to_none=True)
        # Rows of models that are done still compute (until compaction) but their loss is
        # not used: only the best snapshot of a finished model is kept.
        m_elbo_loss(self.params, self.config, x, m, cond, eps).sum().backward()
        self.opt.step()


def _train(
    packed: Packed,
    split: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    keep: torch.Tensor,
    config: VAEConfig,
    seed_list: list[int],
    progress: Callable[[int, int], None] | None,
    pause: Callable[[], None] | None = None,
) -> tuple[Params, torch.Tensor]:
    """The batched training loop: -> best weights (K, …) and best validation loss (K,)."""
    k = packed.z.shape[0]
    tr, n_tr, va, n_va = split
    # The trainer copies the initial weights, so they are the best snapshot's storage: one
    # copy of the weights less per series (memory per series bounds the batch size).
    best = flatten(init_params(config, seed_list), config)  # (K, P)
    trainer = _Trainer(best, config)
    best_loss = torch.full((k,), math.inf)
    bad_epochs = torch.zeros(k, dtype=torch.int64)
    steps_per_epoch = torch.clamp((n_tr + config.batch_size - 1) // config.batch_size, min=1)
    budget = torch.clamp(steps_per_epoch * config.max_epochs, max=config.max_steps)
    stopped = ~keep
    keys_b = rng.model_keys(seed_list, rng.BATCH)
    keys_z = rng.model_keys(seed_list, rng.LATENT)
    keys_m = rng.model_keys(seed_list, rng.MISSING)
    b = config.batch_size
    last_done = -1
    for it in range(int(budget.max())):
        if pause is not None:
            pause()
        active = (~stopped) & (it < budget)
        if not active.any():
            break
        n_rows = len(trainer.rows)
        rows = trainer.compact(active)  # model index of each row still training
        if len(rows) != n_rows or it == 0:  # per-row views change only on compaction
            sub = _subset(packed, rows)
            kb, kz, km, n_r, tr_r = keys_b[rows], keys_z[rows], keys_m[rows], n_tr[rows][:, None], tr[rows]
        u = rng.uniform(kb, it, (b,))  # (R, B)
        pick = torch.minimum((u * n_r).long(), (n_r - 1).clamp_min(0))
        ends = tr_r.gather(1, pick)
        x, m, cond = _batch(sub, ends, config)
        m = _inject_missing(m, km, it, config)
        eps = rng.normal(kz, it, (b, config.latent))
        trainer.step(x, m, cond, eps)

        at_budget = active & (it + 1 >= budget)
        check = (active & (((it + 1) % steps_per_epoch) == 0)) | at_budget
        if check.any():
            vl = torch.full((k,), math.inf)
            with torch.no_grad():
                flat_now = trainer.flat.detach()  # one (R, P) copy, not one per use
                vl[rows] = _val_loss(unflatten(flat_now, config), sub, config, va[rows], n_va[rows])
                better = check & (vl < best_loss)
                row_better = better[rows]
                best[rows[row_better]] = flat_now[row_better]  # only the improved rows move
                del flat_now
            best_loss = torch.where(better, vl, best_loss)
            bad_epochs = torch.where(better, 0, torch.where(check, bad_epochs + 1, bad_epochs))
            stopped = stopped | (check & (bad_epochs >= config.patience))
            done = int((stopped | (it + 1 >= budget)).sum())
            if progress is not None and done != last_done:
                progress(done, k)
            last_done = done
    if progress is not None and last_done != k:
        progress(k, k)
    return unflatten(best, config), best_loss


def train_weights(series: Sequence[Series], config: VAEConfig, seeds: Sequence[int] | None = None) -> Params:
    """Only the batched training loop, no thresholds: for benchmarks that time training alone.

    All series must have enough data (see min_train_points). Returns stacked weights (K, …).
    """
    prepared, failed = _prepare(series, config)
    if failed:
        raise next(iter(failed.values()))
    seed_list, _, packed, valid = _pack_prepared(prepared, config, seeds)
    best, _ = _train(packed, _split(valid, config)[:4], valid.sum(1) >= 2, config, seed_list, None)
    return best
