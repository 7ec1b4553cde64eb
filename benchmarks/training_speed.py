"""Training and scoring speed of the batched detector, as ratios measured in one run.

(a) the machine's dense fp32 matmul peak with torch; (b) batched training throughput for
K = 1, 16, 128, 1024 models on 7 days of 1-minute synthetic history each; (c) the same network
trained one model at a time for K = 16; (d) scoring the newest window of 10,000 series;
(e) bytes per model on disk and load time for 1,000 models.

Throughput is the marginal cost of training steps: each measurement runs the real
`train_weights` loop twice with different step budgets and divides the extra windows by the extra
time, so setup and threshold fitting cancel out.

    python benchmarks/training_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import Series, VAEConfig, lead_in_points, load_model, save_model, score_many
from detector.fitted import SeriesModel
from detector.model import flops_per_window, init_params, select
from detector.synthetic import seasonal_series
from detector.train import train_weights

STEP = 60.0
WEEK_POINTS = 7 * 1440


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best-of dense fp32 matmul GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def history(k: int, points: int) -> list[Series]:
    base = seasonal_series(points, step=STEP, seed=0)
    rng = np.random.default_rng(1)
    # Distinct series without generating K AR processes: shifted levels, scales and noise.
    return [
        Series(base.timestamps, base.values * rng.uniform(0.5, 2) + rng.uniform(-20, 20) + rng.normal(0, 1, points))
        for _ in range(k)
    ]


def step_throughput(series: list[Series], config: VAEConfig, steps: int) -> float:
    """Training windows per second of the batched loop (`train_weights`), at the margin.

    Runs the loop with budgets of `steps` and 4·`steps` steps (early stopping off, so every
    model runs every step) and divides the extra windows by the extra time: packing the data
    and the final validation cancel out, what remains is the per-step cost.
    """
    times = []
    for n in (steps, 4 * steps):
        cfg = dataclasses.replace(config, max_steps=n, max_epochs=10**6, patience=10**6)
        t = time.perf_counter()
        train_weights(series, cfg)
        times.append(time.perf_counter() - t)
    return len(series) * config.batch_size * 3 * steps / max(times[1] - times[0], 1e-9)


def random_models(config: VAEConfig, k: int) -> list[SeriesModel]:
    p = init_params(config, list(range(k)))
    return [
        SeriesModel(config, select(p, i), STEP, 0.0, 1.0, 10.0, 0.0, "spot", i, 0.0, 1.0, 1.0, 100,
                    scale_stats=[(0.0, 1.0)] * len(config.score_scales))
        for i in range(k)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller K list and fewer steps (smoke run)")
    args = ap.parse_args(argv)
    config = VAEConfig()
    fpw = flops_per_window(config)
    train_flops = 3 * fpw  # forward + backward ≈ 3 forward passes
    ks = [1, 16, 128] if args.quick else [1, 16, 128, 1024]
    steps = 5 if args.quick else 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; VAE window {config.window}, "
          f"hidden {config.hidden}, latent {config.latent}, minibatch {config.batch_size} per model; "
          f"{fpw / 1e3:.0f} kFLOP per window forward")

    peak = matmul_peak()
    print(f"(a) dense fp32 matmul peak: {peak:.1f} GFLOP/s")

    print("(b) batched training, 7 days of 1-minute history per model")
    print(f"    {'K':>5} {'windows/s':>12} {'per model':>10} {'GFLOP/s':>9} {'of peak':>8}")
    data = history(max(ks), WEEK_POINTS)
    train_weights(data[:2], dataclasses.replace(config, max_steps=2))  # warm-up
    rates = {}
    for k in ks:
        wps = step_throughput(data[:k], config, steps)
        rates[k] = wps
        gf = wps * train_flops / 1e9
        print(f"    {k:>5} {wps:>12.0f} {wps / k:>10.0f} {gf:>9.1f} {gf / peak:>7.1%}")

    k_single = 16
    # The loop's time is the sum of each model's time; its rate is total windows over that.
    t_single = sum(1.0 / step_throughput([s], config, steps) for s in data[:k_single])
    single_wps = k_single / t_single
    print(f"(c) one model at a time, K={k_single}: {single_wps:.0f} windows/s "
          f"({single_wps * train_flops / 1e9:.1f} GFLOP/s)")

    n_score = 2000 if args.quick else 10_000
    models = random_models(config, n_score)
    # What one poll scores per series: the newest point, with the lead-in its window and
    # score smoothing need (so config.smooth windows per series).
    n_pts = lead_in_points(config) + 1
    newest = [Series(d.timestamps[-n_pts:], d.values[-n_pts:]) for d in data[:1]] * n_score
    score_many(models[:16], newest[:16])
    t = time.perf_counter()
    score_many(models, newest)
    dt = time.perf_counter() - t
    print(f"(d) scoring the newest point of {n_score} series ({config.smooth} windows each for "
          f"smoothing, L={config.mc_samples} latent samples): {dt:.2f} s ({n_score / dt:.0f} series/s)")

    n_store = 200 if args.quick else 1000
    with tempfile.TemporaryDirectory() as d:
        for i in range(n_store):
            save_model(models[i], d, f"m{i}")
        size = sum(f.stat().st_size for f in Path(d).iterdir()) / n_store
        t = time.perf_counter()
        for i in range(n_store):
            load_model(d, f"m{i}")
        dt = time.perf_counter() - t
    print(f"(e) model files: {size / 1024:.0f} KiB per model; loading {n_store} models: {dt:.2f} s")

    k_ref = 128 if 128 in rates else max(rates)
    print("ratios:")
    print(f"    batched K={k_ref} vs one model at a time (same minibatch of {config.batch_size} per model): "
          f"{rates[k_ref] / single_wps:.1f}x the windows/s, i.e. {k_ref} models train in "
          f"{single_wps / rates[k_ref]:.1%} of the one-at-a-time time")
    print(f"    batched K={k_ref} achieved vs matmul peak: {rates[k_ref] * train_flops / 1e9 / peak:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
