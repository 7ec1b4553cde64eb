"""Latency of a 24 h range query at 60 s step through promvae's query API vs Prometheus itself.

A real Prometheus gets two days of backfilled history for N series; promvae (the default model
size, trained briefly: training length does not change scoring cost) serves HTTP with cheroot
in this process. For 1 and for 100 series it times, over HTTP:

- prometheus: the raw source query (`bench_value{...}`) answered by Prometheus;
- promvae cold: `anomaly_score{...}` with the score cache emptied before each request, so
  every request pulls the source (plus lead-in) from Prometheus and scores it;
- promvae warm: the same request repeated (the dashboard-refresh case, served from cache).

The range ends an hour before now (a past range, where the live buffer does not help).
Needs the Debian `prometheus` package (prometheus and promtool). Run:
    .venv/bin/python benchmarks/query_latency.py
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grafana_plugin_backend.config.settings import load_config
from grafana_plugin_backend.web.app import Service, create_app
from tests.promstack import (
    PrometheusProcess,
    backfill,
    free_port,
    write_openmetrics,
)

STEP = 60.0


def series_values(seed: int, t: np.ndarray) -> np.ndarray:
    x = np.sin(np.floor(t / STEP) * 12.9898 + seed * 78.233) * 43758.5453
    noise = x - np.floor(x) - 0.5
    return 50 + 10 * np.sin(2 * np.pi * (t / 86400.0 + seed / 17)) + 2 * noise


def timed(session: requests.Session, url: str, params: dict, before=None) -> float:
    if before is not None:
        before()
    t0 = time.perf_counter()
    resp = session.post(url, data=params, timeout=600)
    took = time.perf_counter() - t0
    body = resp.json()
    if resp.status_code != 200 or body.get("status") != "success" or not body["data"]["result"]:
        raise SystemExit(f"query failed: {resp.status_code} {resp.text[:300]}")
    return took


def stats(xs: list[float]) -> tuple[float, float]:
    return float(np.median(xs)), float(np.percentile(xs, 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=100)
    ap.add_argument("--runs", type=int, default=30, help="requests per warm/raw measurement")
    ap.add_argument("--cold-runs", type=int, default=5, help="requests per cold measurement")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # as `promvae serve` does by default (torch_threads: 1)
    wd = Path(tempfile.mkdtemp(prefix="promvae-bench-"))
    end = math.floor((time.time() - 60) / STEP) * STEP
    ts = np.arange(end - 2 * 86400, end + 1, STEP)
    items = [("bench_value", {"instance": f"s{i}", "job": "bench"}, ts, series_values(i, ts))
             for i in range(args.series)]
    backfill(write_openmetrics(wd / "history.om", items), wd / "prom-data")
    prom = PrometheusProcess(wd / "prometheus", [], data_dir=wd / "prom-data").start()
    server = None
    try:
        cfg = load_config(None, environ={}, overrides={
            "prometheus.url": prom.url, "step": "60s", "history": "1d", "window": 120,
            "queries": [{"name": "bench", "expr": "bench_value"}],
            "storage_path": str(wd / "storage"), "max_series": 10_000,
            "model": {"max_steps": 40, "max_epochs": 2}})
        svc = Service(cfg)
        app = create_app(cfg, service=svc)
        t0 = time.perf_counter()
        svc.poller.poll_once()
        trained = svc.trainer.run_once()
        print(f"trained {trained} models (default size, 40 steps) in "
              f"{time.perf_counter() - t0:.1f} s")
        from cheroot.wsgi import Server

        port = free_port()
        server = Server(("127.0.0.1", port), app, numthreads=8)
        server.prepare()
        threading.Thread(target=server.serve, daemon=True).start()
        api = f"http://127.0.0.1:{port}/api/v1/query_range"
        scorer = app.extensions["promvae_query"].scorer
        q_end = end - 3600
        window = {"start": q_end - 86400, "end": q_end, "step": "60"}
        session = requests.Session()
        print(f"24 h range at 60 s step (1441 points per series), {args.runs} warm/raw and "
              f"{args.cold_runs} cold requests; seconds")
        print(f"{'series':>6} {'what':<16} {'median':>9} {'p99':>9} {'ratio to prometheus':>20}")
        for n, sel in ((1, '{instance="s0"}'), (args.series, "")):
            raw_url = f"{prom.url}/api/v1/query_range"
            raw = [timed(session, raw_url, {"query": f"bench_value{sel}", **window})
                   for _ in range(args.runs)]
            q = {"query": f"anomaly_score{sel}", **window}
            cold = [timed(session, api, q, before=lambda: scorer.cache.__init__(
                scorer.cache.max_values)) for _ in range(args.cold_runs)]
            warm = [timed(session, api, q) for _ in range(args.runs)]
            base = stats(raw)[0]
            for name, xs in (("prometheus raw", raw), ("promvae cold", cold),
                             ("promvae warm", warm)):
                med, p99 = stats(xs)
                print(f"{n:>6} {name:<16} {med:>9.4f} {p99:>9.4f} {med / base:>19.1f}x")
    finally:
        if server is not None:
            server.stop()
        prom.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
