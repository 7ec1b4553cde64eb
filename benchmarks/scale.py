"""promvae at fleet scale: 1,000, 3,000 and 10,000 series with the default model, measured from outside.

For each size a synthetic Prometheus (benchmarks/load.py's, in a child process) serves N
series spread over `--queries` metrics of realistic shapes (CPU-like daily waves, business-
hours request rates, sawtooth memory, spiky latency, slowly filling disks), as 500 hosts x 20
queries would be at 10,000. The real `python -m grafana_plugin_backend.cli serve` runs as a
subprocess against it with the DEFAULT model architecture, window, history (7 d) and 60 s
step; only the training steps are bounded (`--max-steps`; default: one epoch plus
STEADY_STEPS, 150 at 7 d, see below; issue 11's table used 20), and `max_series` /
`query_max_series` are raised to N where their defaults are smaller (a fleet user must too).

Measured per size:
- training throughput: FLOPs of the training steps (computed from the architecture, see
  `train_flops`) over their wall time, read from the service's log, beside the fp32 matmul
  peak measured in this run (torch, at the thread count the service uses) and as a share of
  it. The steady rate is timed from the first validation (the trainer logs "trained 0/N" at
  the end of the first epoch) to the end of the loop ("trained N/N"), so it needs more steps
  than one epoch; the loop rate, from "training N series" to "trained N/N", also holds the
  packing of the history into tensors, a fixed cost that 20 steps do not amortise;
- wall time of the bounded first training (service start to every series scored) and of its
  parts (history pull, training loop, threshold fit and save), and an extrapolation to the
  default max_steps: the loop's fixed cost plus the steps at the steady rate (the whole loop
  scaled by FLOPs when no steady rate was timed), the rest as measured (an upper bound:
  early stopping may end a model sooner);
- peak RSS during training (psutil every 0.5 s, and the kernel's VmHWM), steady RSS after a
  few polls, and bytes per series ((steady - RSS when the HTTP server first answered) / N);
- poll tick (pull, score, publish) from `promvae_poll_duration_seconds` over `--polls` polls,
  and the registry lock held per poll from `promvae_registry_lock_held_seconds` when the
  service exposes it ("n/a (not exposed)" otherwise);
- `/metrics` scrape time (median of 5), size and sample count, checked with promtool;
- one instant query (`anomaly_score`) and one 1 h range query (step 60 s) over all series
  through the query API.
Then how each figure grows from the smallest to the largest size (ratio, ratio per 10x
series; "linear" means ratio <= series ratio), and the acceptance of issue 11 (PASS/FAIL
beside each 10,000-series figure).

The physical floor on this machine (issue 11), from the default model: window W=120, hidden
(100, 100), latent Z=8, C=4 time features. Its linear layers (in x out) are enc 124x100,
100x100, 2 x 100x8 and dec 12x100, 100x100, 2 x 100x120: 59,200 multiply-adds per window
(59,856 weights with biases), so one forward pass of one window is 2 x 59,200 = 118,400 FLOP
and a training step (forward + backward ~ 3x forward) of a 64-window minibatch
3 x 118,400 x 64 = 22.7 MFLOP per model.
- Full training of 10,000 series at 1,500 steps x 64 windows:
  10,000 x 1,500 x 64 x 3 x 118,400 = 3.41e14 FLOP, ~345 TFLOP: about 19 minutes at a
  300 GFLOP/s matmul peak (3.41e14 / 3e11 = 1,137 s).
- Scoring one new window per series with 16 latent samples: 10,000 x 16 x 118,400 = 1.9e10,
  ~19 GFLOP per poll, about 0.1 s at that peak (0.06 s; the encoder really runs once per
  window, not 16 times, so ~12 GFLOP).
The run prints the same floors for its own sizes at the peak it measured.

Progress goes to stderr, the Markdown tables to stdout, `--out FILE.json` keeps the raw
figures. Run (the full acceptance run takes the box for a long time):
    .venv/bin/python benchmarks/scale.py [--series 1000,3000,10000] [--max-steps N] [--out f.json]
A quick look: --series 200,500 --max-steps 5 --history 1d.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import load
from benchmarks.load import STEP, Metric, PromvaeProcess, RssSampler, SyntheticPrometheus
from detector import VAEConfig
from detector.model import layer_shapes
from detector.train import MAX_VAL_WINDOWS
from grafana_plugin_backend.config.base import format_duration, parse_duration
from grafana_plugin_backend.config.settings import Config
from tests.promstack import PROMETHEUS_BIN, StackError, start_prometheus

GIB = 2**30
# Issue 11's acceptance at 10,000 series: figure -> (limit, "max" or "min").
ACCEPTANCE = {"peak_rss_bytes": (6 * GIB, "max"), "steady_rss_bytes": (2.5 * GIB, "max"),
              "train_share_of_peak": (0.35, "min"), "poll_s": (3.0, "max"),
              "lock_s": (0.1, "max"), "metrics_s": (1.0, "max")}
ACCEPTANCE_SERIES = 10_000
RSS_EVERY = 0.5  # seconds between RSS samples: a training peak lasts seconds
READY_CHECK_EVERY = 10.0  # seconds between /metrics scrapes while waiting (each costs promvae)
LOCK_METRIC = "promvae_registry_lock_held_seconds"
POLL_METRIC = "promvae_poll_duration_seconds"
# The synthetic source holds this much more than the service's history: the run itself
# takes time, and every pull must find the full history.
SOURCE_MARGIN = 6 * 3600.0
# Steps after the first epoch in the default bound: the steady training rate is timed over
# them (between the first validation and the end of the loop).
STEADY_STEPS = 25


# ---- the fleet's shapes (pure functions of series and time, as load.source_values) --------

def _noise(ids: np.ndarray, t: np.ndarray, salt: float) -> np.ndarray:
    """Hashed uniform noise in [-0.5, 0.5) per (series, step): the same value in every pull."""
    i = ids[:, None].astype(np.float64)
    x = np.sin(np.floor(t[None, :] / STEP) * 12.9898 + i * 78.233 + salt) * 43758.5453
    return x - np.floor(x) - 0.5


def business_rate(ids: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Requests/s: a weekday working-hours plateau (hosts in three time zones), low weekends."""
    i = ids[:, None].astype(np.float64)
    hour = (t[None, :] % 86400.0) / 3600.0 + 8 * (ids[:, None] % 3)
    hour = hour % 24
    work = 1 / (1 + np.exp(-2 * (hour - 9))) / (1 + np.exp(-2 * (18 - hour)))
    weekday = ((np.floor(t[None, :] / 86400.0) + 3) % 7) < 5  # 1970-01-01 was a Thursday
    base = 50 + 10 * (i % 7)
    return base * (0.2 + 0.8 * work * np.where(weekday, 1.0, 0.3)) * (1 + 0.2 * _noise(ids, t, 1.0))


def sawtooth_memory(ids: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Heap bytes: grows for 30-85 minutes, then a collection drops it (per-host period)."""
    i = ids[:, None].astype(np.float64)
    period = 1800.0 + 300.0 * (ids[:, None] % 12)
    phase = (t[None, :] / period + i / 13) % 1.0
    return 1e9 * (0.4 + 0.4 * phase) + 2e7 * _noise(ids, t, 2.0)


def spiky_latency(ids: np.ndarray, t: np.ndarray) -> np.ndarray:
    """p99 latency in seconds: a log-normal-ish floor with a rare 5x spike (a real anomaly)."""
    i = ids[:, None].astype(np.float64)
    base = 0.05 + 0.01 * (i % 5)
    spike = _noise(ids, t, 3.0) > 0.498  # ~1 step in 500
    return base * np.exp(0.3 * _noise(ids, t, 4.0)) * np.where(spike, 5.0, 1.0)


def disk_fill(ids: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Filesystem use ratio: fills over each week, emptied by a weekly cleanup, jittered."""
    i = ids[:, None].astype(np.float64)
    week = ((t[None, :] / (7 * 86400.0)) + i / 11) % 1.0
    return 0.3 + 0.1 * (i % 4) / 4 + 0.3 * week + 0.002 * _noise(ids, t, 5.0)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "cpu": load.source_values, "requests": business_rate, "heap": sawtooth_memory,
    "latency": spiky_latency, "disk": disk_fill}


def fleet(n_series: int, n_queries: int) -> list[Metric]:
    """`n_series` split over `n_queries` metrics (the first ones one more), shapes in turn."""
    n_queries = max(1, min(n_queries, n_series))
    names = list(SHAPES)
    out = []
    for j in range(n_queries):
        shape = names[j % len(names)]
        out.append(Metric(f"fleet_{shape}_{j}", n_series // n_queries + (j < n_series % n_queries),
                          SHAPES[shape], job="fleet"))
    return out


# ---- what the numbers should be: FLOPs, matmul peak -------------------------------------

@dataclass(frozen=True)
class TrainCost:
    """FLOPs of one model's training loop on `points` observed points (see `train_flops`)."""

    steps: int          # Adam steps run (the budget: early stopping cannot end a short run)
    checks: int         # validation passes (each epoch end and at the budget)
    flop_step: int      # one step: forward + backward of a minibatch
    flop_check: int     # one validation pass (forward, posterior mean)
    steps_per_epoch: int

    @property
    def flop(self) -> int:
        return self.steps * self.flop_step + self.checks * self.flop_check


def train_flops(cfg: VAEConfig, points: int) -> TrainCost:
    """FLOPs of detector.train._train for one model, as _split and the budget compute them.

    A linear layer (in x out) costs 2·in·out FLOP per window forward; backward costs 2x that
    (gradients of its input and of its weight), except the first encoder layer, whose input
    (the data) needs no gradient. Elementwise work (activations, the loss, Adam, random
    draws, gathers) is not counted: it is the overhead the share of peak shows.
    """
    shapes = layer_shapes(cfg)
    fwd = sum(2 * i * o for _, i, o in shapes)
    enc0_in, enc0_out = shapes[0][1], shapes[0][2]
    train_window = 3 * fwd - 2 * enc0_in * enc0_out
    n_windows = max(0, points - cfg.window + 1)
    n_val = int(n_windows * cfg.val_fraction)
    if n_val < 4 or n_windows - n_val < cfg.batch_size // 4:
        n_train, n_val = n_windows, n_windows
    else:
        n_train = n_windows - n_val
    spe = max(1, math.ceil(n_train / cfg.batch_size))
    steps = min(spe * cfg.max_epochs, cfg.max_steps)
    checks = steps // spe + (1 if steps % spe else 0)
    return TrainCost(steps, checks, train_window * cfg.batch_size,
                     fwd * min(n_val, MAX_VAL_WINDOWS), spe)


def score_flops(cfg: VAEConfig) -> int:
    """FLOPs of scoring one window: the encoder once, the decoder once per latent sample."""
    shapes = layer_shapes(cfg)
    n_enc = len(cfg.hidden) + 2
    enc = sum(2 * i * o for _, i, o in shapes[:n_enc])
    dec = sum(2 * i * o for _, i, o in shapes[n_enc:])
    return enc + cfg.mc_samples * dec


def matmul_peak(threads: int, n: int = 1024, seconds: float = 1.5) -> float:
    """Best fp32 GFLOP/s of an n x n matmul at `threads` torch threads (best of >= 5 runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        torch.mm(a, b, out=c)
        best, runs, until = math.inf, 0, time.perf_counter() + seconds
        while runs < 5 or time.perf_counter() < until:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - t0)
            runs += 1
        return 2 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(before)


def bmm_model(threads: int, cfg: VAEConfig, k: int = 256, seconds: float = 1.0) -> float:
    """GFLOP/s of the model's widest training matmul (K models x batch @ in x hidden)."""
    _, n_in, n_out = layer_shapes(cfg)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = torch.randn(k, cfg.batch_size, n_in), torch.randn(k, n_in, n_out)
        torch.bmm(x, w)
        best, runs, until = math.inf, 0, time.perf_counter() + seconds
        while runs < 5 or time.perf_counter() < until:
            t0 = time.perf_counter()
            torch.bmm(x, w)
            best = min(best, time.perf_counter() - t0)
            runs += 1
        return 2 * k * cfg.batch_size * n_in * n_out / best / 1e9
    finally:
        torch.set_num_threads(before)


# ---- reading the service ----------------------------------------------------------------

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_BATCH_START = re.compile(r"\btraining (\d+) series \(")
_LOOP_END = re.compile(r"\btrained (\d+)/(\d+) series, ")
_BATCH_END = re.compile(r"\btraining batch done: (\d+)/(\d+) series trained in ([\d.]+) s")


@dataclass
class TrainingLog:
    """Training batches read from the service's log: series and seconds per phase."""

    batches: list[int] = field(default_factory=list)  # series per batch
    loop_s: float = 0.0    # "training N series" -> "trained N/N": packing and the steps
    fit_s: float = 0.0     # "trained N/N" -> "batch done": threshold fit, install, save
    batch_s: float = 0.0   # what the service says each batch took (history pull included)
    complete: int = 0      # batches seen from start to end
    steady_s: float = 0.0  # first "trained d/N" (d < N: the first validation) -> "trained N/N"
    steady_models: list[int] = field(default_factory=list)  # N of each batch timed so


def parse_training_log(text: str) -> TrainingLog:
    """The batches of a promvae log (format "%(asctime)s LEVEL logger: message")."""
    out = TrainingLog()
    start = first_check = loop_end = None
    models = 0
    for line in text.splitlines():
        m = _LOG_TIME.match(line)
        if m is None:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if (b := _BATCH_START.search(line)) is not None:
            start, first_check, loop_end = t, None, None
            out.batches.append(int(b.group(1)))
        elif (e := _LOOP_END.search(line)) is not None and start is not None and loop_end is None:
            if e.group(1) == e.group(2):
                loop_end, models = t, int(e.group(2))
            elif first_check is None:
                first_check = t
        elif (d := _BATCH_END.search(line)) is not None:
            out.batch_s += float(d.group(3))
            if start is not None and loop_end is not None:
                out.loop_s += loop_end - start
                out.fit_s += t - loop_end
                out.complete += 1
                if first_check is not None:
                    out.steady_s += loop_end - first_check
                    out.steady_models.append(models)
            start = first_check = loop_end = None
    return out


def self_metrics(url: str) -> dict[str, float]:
    """promvae_* samples of one /metrics scrape: 'name{labels}' -> value."""
    text = requests.get(f"{url}/metrics", timeout=120).text
    out = {}
    for line in text.splitlines():
        if line.startswith("promvae_"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def lock_figures(m: dict[str, float]) -> tuple[float, float] | None:
    """(sum, count) of the lock-hold histogram or summary, or (value, NaN) of a gauge."""
    if f"{LOCK_METRIC}_sum" in m and f"{LOCK_METRIC}_count" in m:
        return m[f"{LOCK_METRIC}_sum"], m[f"{LOCK_METRIC}_count"]
    if LOCK_METRIC in m:
        return m[LOCK_METRIC], math.nan
    return None


def vm_hwm(pid: int) -> int:
    """The kernel's peak RSS of a process (VmHWM), 0 where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_scored(server: PromvaeProcess, n_series: int, timeout: float,
                say: Callable[[str], None]) -> float:
    """Wait until every series is ready and scored (as load.wait_ready, scraping less often)."""
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"promvae exited with code {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            states, scores = load.scrape_state(server.url)
        except requests.RequestException:
            states, scores = {}, 0
        if states.get("ready", 0) >= n_series and scores >= n_series:
            return time.monotonic() - started
        if waited > timeout:
            raise RuntimeError(f"promvae not ready after {timeout:.0f} s ({states}, {scores} "
                               f"scored):\n{server.log_tail()}")
        desc = ", ".join(f"{k} {v:.0f}" for k, v in states.items()) or "not answering yet"
        say(f"  {waited:5.0f} s: {desc}; {scores} series scored")
        time.sleep(min(READY_CHECK_EVERY, 1.0 + waited / 5))  # small runs finish in seconds


def wait_healthy(server: PromvaeProcess, timeout: float = 120.0) -> float:
    """Seconds until /-/healthy answers."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"promvae exited with code {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/-/healthy", timeout=5).ok:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"promvae did not answer within {timeout:.0f} s:\n{server.log_tail()}")


def timed(fn: Callable[[], requests.Response], repeat: int) -> tuple[float, requests.Response]:
    """Median seconds of `repeat` calls (body read), and the last response."""
    times, resp = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        resp = fn()
        _ = resp.content
        times.append(time.perf_counter() - t0)
    assert resp is not None
    return statistics.median(times), resp


def prometheus_scrape(url: str, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Scrape promvae's /metrics once with a real Prometheus: its duration, samples, error."""
    target = url.removeprefix("http://")
    out: dict[str, Any] = {"prom_scrape_s": None, "prom_samples": None, "prom_error": None}
    if not Path(PROMETHEUS_BIN).exists():
        out["prom_error"] = "n/a (no prometheus binary)"
        return out
    prom = None
    try:
        prom = start_prometheus(workdir / "prometheus", scrape_configs=[
            {"job_name": "promvae", "scrape_interval": "10s", "scrape_timeout": "10s",
             "static_configs": [{"targets": [target]}]}], scrape_interval="10s")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ts = [t for t in prom.targets() if t["labels"].get("job") == "promvae"]
            if ts and ts[0]["health"] != "unknown":
                t = ts[0]
                out["prom_scrape_s"] = float(t.get("lastScrapeDuration") or 0) or None
                out["prom_error"] = t.get("lastError") or (None if t["health"] == "up"
                                                           else t["health"])
                break
            time.sleep(0.5)
        else:
            out["prom_error"] = "no scrape within 60 s"
        if out["prom_error"] is None:
            # The scrape's own series may not be queryable the instant the target turns up.
            for _ in range(20):
                found = prom.query('scrape_samples_scraped{job="promvae"}')
                if found:
                    out["prom_samples"] = int(float(found[0]["value"][1]))
                    break
                time.sleep(0.5)
    except (StackError, requests.RequestException, OSError) as e:
        out["prom_error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        if prom is not None:
            prom.stop()
    say("  real Prometheus scrape: " + (f"{out['prom_scrape_s']:.3f} s, {out['prom_samples']} "
                                        "samples, no error" if out["prom_error"] is None
                                        else f"error: {out['prom_error']}"))
    return out


def promtool_check(body: bytes) -> str:
    """'ok', or promtool's first complaints about a /metrics body ('n/a' without promtool)."""
    exe = shutil.which("promtool")
    if exe is None:
        return "n/a (no promtool)"
    r = subprocess.run([exe, "check", "metrics"], check=False, input=body, capture_output=True, timeout=120)
    text = (r.stdout + r.stderr).decode(errors="replace").strip()
    return "ok" if r.returncode == 0 and not text else " | ".join(text.splitlines()[:3])


# ---- one size ---------------------------------------------------------------------------

@dataclass
class Options:
    series: tuple[int, ...] = (1000, 3000, 10000)
    queries: int = 20
    max_steps: int | None = None   # None: one epoch plus STEADY_STEPS (see auto_max_steps)
    history: float | None = None   # None: the service default
    window: int | None = None      # None: the service default (smoke tests only)
    poll_every: float | None = None  # None: the service default
    polls: int = 2
    threads: int | None = None     # None: what the service uses (torch_threads)
    ready_timeout: float = 4 * 3600.0
    scrapes: int = 5
    queries_repeat: int = 3


def service_config(opt: Options, metrics: Sequence[Metric], n_series: int) -> dict[str, Any]:
    """The promvae config a user would write: defaults, but for the queries, max_steps and
    the cardinality caps raised to N."""
    d = Config()
    cfg: dict[str, Any] = {
        "queries": [{"name": m.name, "expr": m.name} for m in metrics],
        "step": format_duration(STEP),
        "max_series": max(d.max_series, n_series),
        "query_max_series": max(d.query_max_series, n_series),
        "model": {"max_steps": opt.max_steps},
    }
    if opt.history is not None:
        cfg["history"] = format_duration(opt.history)
    if opt.window is not None:
        cfg["window"] = opt.window
    if opt.poll_every is not None:
        cfg["poll_every"] = format_duration(opt.poll_every)
    return cfg


def auto_max_steps(opt: Options) -> int:
    """One epoch of the default model on the run's history, plus STEADY_STEPS."""
    d = Config()
    history = opt.history if opt.history is not None else d.history
    cfg = Config(window=opt.window or d.window).vae_config()
    return train_flops(cfg, round(history / STEP)).steps_per_epoch + STEADY_STEPS


def model_config(opt: Options, max_steps: int | None = None) -> VAEConfig:
    d = Config()
    model = {"max_steps": max_steps if max_steps is not None else opt.max_steps}
    return Config(window=opt.window or d.window, model=model).vae_config()


def service_threads(opt: Options) -> int:
    if opt.threads:
        return opt.threads
    return Config().torch_threads or os.cpu_count() or 1


def run_size(n_series: int, opt: Options, say: Callable[[str], None]) -> dict[str, Any]:
    """One promvae at `n_series` series, from start to queries; returns its figures."""
    if opt.max_steps is None:
        opt = dataclasses.replace(opt, max_steps=auto_max_steps(opt))
    d = Config()
    history = opt.history if opt.history is not None else d.history
    poll_every = opt.poll_every if opt.poll_every is not None else d.poll_every
    threads = service_threads(opt)
    vcfg, vfull = model_config(opt), model_config(opt, VAEConfig().max_steps)
    points = round(history / STEP)
    cost, cost_full = train_flops(vcfg, points), train_flops(vfull, points)
    r: dict[str, Any] = {"series": n_series, "threads": threads, "history_s": history,
                         "window": vcfg.window, "steps_run": cost.steps,
                         "steps_full_default": cost_full.steps}
    say(f"[{n_series} series] matmul peak at {threads} thread(s)...")
    r["matmul_peak_gflops"] = matmul_peak(threads)
    r["bmm_model_gflops"] = bmm_model(threads, vcfg)
    say(f"  {r['matmul_peak_gflops']:.1f} GFLOP/s (n=1024 mm), model-shaped bmm "
        f"{r['bmm_model_gflops']:.1f} GFLOP/s")

    metrics = fleet(n_series, opt.queries)
    r["queries"] = len(metrics)
    workdir = Path(tempfile.mkdtemp(prefix="promvae-scale-"))
    source = SyntheticPrometheus(n_series, metrics, history + SOURCE_MARGIN)
    server: PromvaeProcess | None = None
    sampler: RssSampler | None = None
    keep = True
    try:
        source.start()
        server = PromvaeProcess(workdir, source.url, n_series, False,
                                config=service_config(opt, metrics, n_series))
        t_start = time.monotonic()
        server.start()
        sampler = RssSampler(server.pid, every=RSS_EVERY).start()
        say(f"  promvae pid {server.pid} on {server.url} (log {server.log_path}); "
            f"{len(metrics)} queries, history {format_duration(history)}, max_steps "
            f"{opt.max_steps} (default {vfull.max_steps}), window {vcfg.window}")
        wait_healthy(server)
        r["baseline_rss_bytes"] = psutil.Process(server.pid).memory_info().rss
        proc = psutil.Process(server.pid)
        waited = wait_scored(server, n_series, opt.ready_timeout, say)
        r["first_ready_s"] = time.monotonic() - t_start
        train_samples = list(sampler.samples)
        r["peak_rss_sampled_bytes"] = max(s for _, s in train_samples)
        r["hwm_rss_bytes"] = vm_hwm(server.pid)
        r["peak_rss_bytes"] = max(r["peak_rss_sampled_bytes"], r["hwm_rss_bytes"])
        r["cpu_to_ready_s"] = load.cpu_seconds(proc)
        say(f"  every series trained and scored after {r['first_ready_s']:.0f} s "
            f"(waited {waited:.0f} s); peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB")

        tl = parse_training_log(server.log_path.read_text(errors="replace"))
        r["train_batches"] = len(tl.batches)
        r["train_batches_timed"] = tl.complete
        r["trained_in_batches"] = sum(tl.batches)
        r["train_loop_s"] = tl.loop_s if tl.complete else None
        r["fit_s"] = tl.fit_s if tl.complete else None
        r["batch_s"] = tl.batch_s if tl.batches else None
        r["train_flop"] = cost.flop * (sum(tl.batches) or n_series)  # retries train twice
        r["train_full_flop"] = cost_full.flop * n_series
        # The steps after the first validation (at the end of epoch 1) up to the budget.
        steady_flop = ((cost.steps - cost.steps_per_epoch) * cost.flop_step
                       + (cost.checks - 1) * cost.flop_check)
        r["train_steady_s"] = tl.steady_s if tl.steady_models else None
        r["train_gflops"] = r["train_share_of_peak"] = r["train_loop_gflops"] = None
        r["full_default_loop_s"] = r["full_default_wall_s"] = None
        if tl.complete and tl.loop_s > 0:
            r["train_loop_gflops"] = r["train_flop"] / tl.loop_s / 1e9
            full_loop = tl.loop_s * cost_full.flop / cost.flop
            if tl.steady_models and tl.steady_s > 0 and steady_flop > 0:
                rate = sum(tl.steady_models) * steady_flop / tl.steady_s
                r["train_gflops"] = rate / 1e9
                r["train_share_of_peak"] = r["train_gflops"] / r["matmul_peak_gflops"]
                fixed = max(0.0, tl.loop_s - r["train_flop"] / rate)
                r["train_fixed_s"] = fixed
                full_loop = fixed + r["train_full_flop"] / rate
            else:
                say(f"  no steady training rate: it needs --max-steps above one epoch "
                    f"({cost.steps_per_epoch} steps here); the loop rate includes packing")
            r["full_default_loop_s"] = full_loop
            r["full_default_wall_s"] = r["first_ready_s"] - tl.loop_s + full_loop
        else:
            say("  training loop times not found in the log (its messages changed?): "
                "throughput n/a")

        # Steady polls: the first poll after everything is scored may still be finishing.
        time.sleep(3)
        m0 = self_metrics(server.url)
        lock0 = lock_figures(m0)
        c0, s0 = m0.get(f"{POLL_METRIC}_count", 0.0), m0.get(f"{POLL_METRIC}_sum", 0.0)
        p0 = m0.get("promvae_points_scored_total", 0.0)
        say(f"  waiting for {opt.polls} poll(s) (poll_every {format_duration(poll_every)})...")
        deadline = time.monotonic() + poll_every * (opt.polls + 1) + 120
        while True:
            time.sleep(min(READY_CHECK_EVERY, max(1.0, poll_every / 2)))
            m1 = self_metrics(server.url)
            if m1.get(f"{POLL_METRIC}_count", 0.0) >= c0 + opt.polls:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {opt.polls} polls in {poll_every * opt.polls:.0f}"
                                   f" s:\n{server.log_tail()}")
        n_polls = m1[f"{POLL_METRIC}_count"] - c0
        r["polls"] = int(n_polls)
        r["poll_s"] = (m1[f"{POLL_METRIC}_sum"] - s0) / n_polls
        r["points_per_poll"] = (m1.get("promvae_points_scored_total", 0.0) - p0) / n_polls
        lock1 = lock_figures(m1)
        if lock0 is not None and lock1 is not None:
            if math.isnan(lock1[1]):
                r["lock_s"] = lock1[0]  # a gauge: the last poll's hold
            else:
                held_n = lock1[1] - lock0[1]
                # One observation per poll (the poller's total hold in that poll).
                r["lock_s"] = (lock1[0] - lock0[0]) / held_n if held_n > 0 else None
            r["lock_exposed"] = True
        else:
            r["lock_s"], r["lock_exposed"] = None, False
        r["steady_rss_bytes"] = psutil.Process(server.pid).memory_info().rss
        r["bytes_per_series"] = (r["steady_rss_bytes"] - r["baseline_rss_bytes"]) / n_series
        lock_txt = (f"{r['lock_s'] * 1000:.1f} ms" if r["lock_s"] is not None
                    else "n/a (not exposed)")
        say(f"  poll {r['poll_s']:.2f} s over {r['polls']} polls ({r['points_per_poll']:.0f} "
            f"points each), lock {lock_txt}; steady RSS {r['steady_rss_bytes'] / GIB:.2f} GiB")

        session = requests.Session()
        r["metrics_s"], resp = timed(lambda: session.get(f"{server.url}/metrics", timeout=120),
                                     opt.scrapes)
        body = resp.content
        r["metrics_bytes"] = len(body)
        r["metrics_samples"] = sum(1 for ln in body.split(b"\n") if ln and not ln.startswith(b"#"))
        r["metrics_check"] = promtool_check(body)
        say(f"  /metrics {r['metrics_s']:.3f} s, {len(body) / 2**20:.1f} MiB, "
            f"{r['metrics_samples']} samples; promtool: {r['metrics_check']}")

        r.update(prometheus_scrape(server.url, workdir, say))

        now = math.floor(time.time() / STEP) * STEP
        queries = {"instant": ("/api/v1/query", {"query": "anomaly_score", "time": now}),
                   "range": ("/api/v1/query_range", {"query": "anomaly_score",
                                                     "start": now - 3600, "end": now,
                                                     "step": "60"})}
        for kind, (path, params) in queries.items():
            took, resp = timed(lambda path=path, params=params: session.post(
                f"{server.url}{path}", data=params, timeout=600), opt.queries_repeat)
            if resp.ok:
                result = resp.json()["data"]["result"]
                r[f"{kind}_s"] = took
                r[f"{kind}_series"] = len(result)
                r[f"{kind}_points"] = sum(len(x.get("values", [1])) for x in result)
                r[f"{kind}_error"] = None
            else:
                r[f"{kind}_s"] = r[f"{kind}_series"] = r[f"{kind}_points"] = None
                r[f"{kind}_error"] = f"HTTP {resp.status_code}: {resp.text[:200]}"
            r[f"{kind}_bytes"] = len(resp.content)
            say(f"  {kind} query: " + (f"{took:.3f} s, {r[f'{kind}_series']} series, "
                                      f"{r[f'{kind}_points']} points" if resp.ok
                                      else r[f"{kind}_error"]))
        session.close()
        r["rss_end_bytes"] = psutil.Process(server.pid).memory_info().rss
        r["cpu_total_s"] = load.cpu_seconds(proc)
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"promvae exited during the run:\n{server.log_tail()}")
        keep = False
        return r
    finally:
        if sampler is not None:
            try:
                sampler.stop()
            except psutil.Error:
                pass
        if server is not None:
            server.stop()
        source.stop()
        if keep:
            say(f"  kept {workdir} (promvae.log) for a look")
        else:
            log_copy = Path(tempfile.gettempdir()) / f"promvae-scale-{n_series}.log"
            try:  # the service's log outlives the run: what it did is worth a look afterwards
                shutil.copyfile(workdir / "promvae.log", log_copy)
                say(f"  promvae's log kept as {log_copy}")
            except OSError:
                pass
            shutil.rmtree(workdir, ignore_errors=True)


# ---- the report -------------------------------------------------------------------------

# (key, label, unit kind, lower is better) of every figure in the tables.
FIGURES = [
    ("matmul_peak_gflops", "matmul peak (GFLOP/s)", "g", False),
    ("train_gflops", "training steps, steady (GFLOP/s)", "g", False),
    ("train_share_of_peak", "training steps, share of peak", "%", False),
    ("train_loop_gflops", "training loop incl. packing (GFLOP/s)", "g", False),
    ("train_loop_s", "training loops (s)", "s", True),
    ("fit_s", "threshold fit + save (s)", "s", True),
    ("first_ready_s", "bounded first training, start to all scored (s)", "s", True),
    ("full_default_wall_s", "full default training, extrapolated (s)", "s", True),
    ("peak_rss_bytes", "peak RSS during training", "b", True),
    ("steady_rss_bytes", "steady RSS", "b", True),
    ("bytes_per_series", "bytes per series (steady - baseline)", "b", True),
    ("poll_s", "poll tick (s)", "s", True),
    ("lock_s", "registry lock held per poll (s)", "s", True),
    ("metrics_s", "/metrics scrape (s)", "s", True),
    ("metrics_bytes", "/metrics size", "b", True),
    ("prom_scrape_s", "/metrics scraped by a real Prometheus (s)", "s", True),
    ("instant_s", "instant query anomaly_score (s)", "s", True),
    ("range_s", "1 h range query anomaly_score (s)", "s", True),
]


def fmt(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if kind == "b":
        return f"{v / GIB:.2f} GiB" if abs(v) >= GIB / 4 else (
            f"{v / 2**20:.1f} MiB" if abs(v) >= 2**20 else f"{v / 1024:.1f} KiB")
    if kind == "%":
        return f"{100 * v:.1f} %"
    if kind == "g":
        return f"{v:.1f}"
    return f"{v:.3f}" if v < 10 else f"{v:.0f}"


def verdict(key: str, v: Any) -> str:
    if key not in ACCEPTANCE:
        return ""
    limit, how = ACCEPTANCE[key]
    shown = fmt(limit, "b" if key.endswith("bytes") else "%" if key.endswith("peak") else "s")
    rule = f"{'≤' if how == 'max' else '≥'} {shown}"
    if v is None:
        return f"n/a ({rule})"
    ok = v <= limit if how == "max" else v >= limit
    return f"{'PASS' if ok else 'FAIL'} ({rule})"


def growth(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """How each figure grows from the smallest size to the largest."""
    if len(results) < 2:
        return []
    a, b = results[0], results[-1]
    n_ratio = b["series"] / a["series"]
    out = []
    for key, label, _, lower_better in FIGURES:
        x, y = a.get(key), b.get(key)
        row = {"figure": key, "label": label, "from": x, "to": y, "series_ratio": n_ratio,
               "ratio": None, "per_10x": None, "linear": None}
        if x and y and x > 0 and y > 0:
            ratio = y / x
            row["ratio"] = ratio
            row["per_10x"] = ratio ** (1 / math.log10(n_ratio)) if n_ratio > 1 else None
            row["linear"] = ratio <= n_ratio if lower_better else None
        out.append(row)
    return out


def report(results: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The Markdown tables: figures per size with the acceptance, growth, floors."""
    sizes = [r["series"] for r in results]
    title = (f"promvae scale benchmark {meta['started']}: default model "
             f"({meta['weights_per_model']:,} weights), window {meta['window']}, history "
             f"{format_duration(meta['history_s'])}, step {format_duration(STEP)}, max_steps "
             f"{meta['max_steps']} (default {VAEConfig().max_steps}), {meta['queries']} queries, "
             f"torch threads {meta['threads']}; load average {meta['load_average']:.1f} on "
             f"{meta['cores']} cores at the start (the box is shared: figures are lower bounds)")
    lines = [title, ""]
    at = next((r for r in results if r["series"] == ACCEPTANCE_SERIES), None)
    head = ["figure", *(f"{n:,} series" for n in sizes), f"acceptance at {ACCEPTANCE_SERIES:,}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, kind, _ in FIGURES:
        cells = [fmt(r.get(key), kind) for r in results]
        if key == "lock_s":
            cells = [c if r.get("lock_exposed") else "n/a (not exposed)"
                     for c, r in zip(cells, results)]
        v = verdict(key, at.get(key)) if at is not None else (
            "" if key not in ACCEPTANCE and key != "prom_scrape_s" else "not run")
        if key == "prom_scrape_s" and at is not None:
            v = ("PASS (scraped without errors)" if at.get("prom_error") is None
                 else f"FAIL ({at['prom_error']})")
        lines.append("| " + " | ".join([label, *cells, v]) + " |")
    extra = [("training batches (series trained)",
              lambda r: f"{r['train_batches']} ({r['trained_in_batches']})"),
             ("steps run / full default", lambda r: f"{r['steps_run']} / {r['steps_full_default']}"),
             ("history pull etc. (batch - loops - fit, s)", lambda r: fmt(
                 max(0.0, r["batch_s"] - r["train_loop_s"] - r["fit_s"])
                 if r.get("batch_s") is not None and r.get("train_loop_s") is not None else None, "s")),
             ("full default training loops, extrapolated (s)",
              lambda r: fmt(r.get("full_default_loop_s"), "s")),
             ("loop's fixed cost (packing etc., s)", lambda r: fmt(r.get("train_fixed_s"), "s")),
             ("peak RSS, sampled / VmHWM", lambda r: f"{fmt(r['peak_rss_sampled_bytes'], 'b')} / "
                                                     f"{fmt(r['hwm_rss_bytes'], 'b')}"),
             ("RSS at HTTP start (baseline)", lambda r: fmt(r["baseline_rss_bytes"], "b")),
             ("points scored per poll", lambda r: f"{r['points_per_poll']:.0f}"),
             ("/metrics samples, promtool", lambda r: f"{r['metrics_samples']:,}, "
                                                      f"{r['metrics_check']}"),
             ("real Prometheus: samples scraped, error", lambda r: f"{r['prom_samples']}, "
                                                                 f"{r['prom_error'] or 'none'}"),
             ("instant / range series returned", lambda r: f"{r['instant_series']} / "
                                                           f"{r['range_series']}"
              if r.get("instant_error") is None and r.get("range_error") is None
              else f"{r.get('instant_error') or r['instant_series']} / "
                   f"{r.get('range_error') or r['range_series']}"),
             ("promvae CPU s to all scored", lambda r: f"{r['cpu_to_ready_s']:.0f}")]
    for label, get in extra:
        try:
            cells = [get(r) for r in results]
        except (KeyError, TypeError):
            continue
        lines.append("| " + " | ".join([label, *cells, ""]) + " |")
    if at is None:
        lines.append(f"\nNo {ACCEPTANCE_SERIES:,}-series run: the acceptance column applies to "
                     f"{ACCEPTANCE_SERIES:,} series only.")
    rows = growth(results)
    if rows:
        heading = (f"Growth from {sizes[0]:,} to {sizes[-1]:,} series "
                   f"({rows[0]['series_ratio']:.1f}x; linear: ratio ≤ series ratio)")
        lines += ["", heading, "",
                  "| figure | ratio | per 10x series | at most linear |", "|---|---|---|---|"]
        for g in rows:
            lin = "—" if g["linear"] is None and g["ratio"] is not None else (
                "n/a" if g["linear"] is None else ("yes" if g["linear"] else "NO"))
            lines.append(f"| {g['label']} | {fmt(g['ratio'], 'g') + 'x' if g['ratio'] else 'n/a'}"
                         f" | {fmt(g['per_10x'], 'g') + 'x' if g['per_10x'] else 'n/a'} | {lin} |")
        lower_better = {k: lb for k, _, _, lb in FIGURES}
        costs = [g for g in rows if lower_better[g["figure"]]]
        if at is not None:
            ok = all(g["linear"] for g in costs if g["linear"] is not None)
            lines.append(f"| every cost figure at most linear | | | "
                         f"{'PASS' if ok else 'FAIL'} |")
    floor = ("Physical floor at the matmul peak measured here (default model, "
             f"{meta['train_window_flop']:,} FLOP per training window, "
             f"{meta['score_window_flop']:,} FLOP per scored window):")
    lines += ["", floor, ""]
    for r in results:
        peak = r["matmul_peak_gflops"] * 1e9
        lines.append(f"- {r['series']:,} series: full default training {r['train_full_flop'] / 1e12:.1f}"
                     f" TFLOP = {r['train_full_flop'] / peak:.0f} s; one new window per series "
                     f"per poll {r['series'] * meta['score_window_flop'] / 1e9:.1f} GFLOP = "
                     f"{r['series'] * meta['score_window_flop'] / peak:.3f} s")
    dflt = Config().vae_config()
    fwd = sum(2 * i * o for _, i, o in layer_shapes(dflt))
    lines.append(f"- issue 11's figure (default model): 10,000 series x {dflt.max_steps:,} steps x "
                 f"{dflt.batch_size} windows x 3 x {fwd:,} FLOP = "
                 f"{10_000 * dflt.max_steps * dflt.batch_size * 3 * fwd / 1e12:.0f} TFLOP; "
                 f"10,000 x {dflt.mc_samples} samples x {fwd:,} = "
                 f"{10_000 * dflt.mc_samples * fwd / 1e9:.0f} GFLOP per poll")
    return "\n".join(lines)


def parse_series(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of series counts: {text!r}") from None
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"series counts must be positive: {text!r}")
    return tuple(sorted(sizes))


def parse_seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(opt: Options, say: Callable[[str], None]) -> dict[str, Any]:
    """Every size in turn; the raw figures with what they were measured on."""
    if opt.max_steps is None:
        opt = dataclasses.replace(opt, max_steps=auto_max_steps(opt))
    vcfg = model_config(opt)
    shapes = layer_shapes(vcfg)
    fwd = sum(2 * i * o for _, i, o in shapes)
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cores": psutil.cpu_count(), "load_average": os.getloadavg()[0],
            "torch": torch.__version__, "threads": service_threads(opt),
            "max_steps": opt.max_steps, "queries": opt.queries,
            "history_s": opt.history if opt.history is not None else Config().history,
            "window": vcfg.window, "poll_every_s": opt.poll_every or Config().poll_every,
            "weights_per_model": sum(i * o + o for _, i, o in shapes),
            "forward_window_flop": fwd,
            "train_window_flop": train_flops(vcfg, vcfg.window + 64).flop_step // vcfg.batch_size,
            "score_window_flop": score_flops(vcfg), "acceptance": ACCEPTANCE}
    results = []
    for n in opt.series:
        results.append(run_size(n, opt, say))
    return {"meta": meta, "sizes": results, "growth": growth(results)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=parse_series, default=(1000, 3000, 10000),
                    help="comma-separated series counts (default 1000,3000,10000)")
    ap.add_argument("--queries", type=int, default=20, help="queries the series are spread over")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="training steps per model (default: one epoch plus "
                         f"{STEADY_STEPS}, 150 at 7 d; the default model trains up to 1,500)")
    ap.add_argument("--history", type=parse_seconds, default=None,
                    help="training history (default: the service's, 7d)")
    ap.add_argument("--poll-every", type=parse_seconds, default=None,
                    help="poll interval (default: the service's, 60s)")
    ap.add_argument("--polls", type=int, default=2, help="steady polls measured per size")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the matmul peak (default: the service's torch_threads)")
    ap.add_argument("--window", type=int, default=None, help=argparse.SUPPRESS)  # smoke tests
    ap.add_argument("--out", type=Path, default=None, help="write the raw figures as JSON")
    args = ap.parse_args(argv)
    opt = Options(series=args.series, queries=args.queries, max_steps=args.max_steps,
                  history=args.history, window=args.window, poll_every=args.poll_every,
                  polls=max(1, args.polls), threads=args.threads)

    def say(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    try:
        out = run(opt, say)
    except RuntimeError as e:
        say(f"scale: {e}")
        return 1
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1, default=float))
        say(f"raw figures in {args.out}")
    print(report(out["sizes"], out["meta"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
