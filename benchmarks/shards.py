"""Three local promvae shards x 3,000 series beside one instance x 9,000, on the same machine.

A synthetic Prometheus (benchmarks/load.py's, in a child process) serves 9,000 series
`load_value{instance="host-i"}` with two days of history. First one `promvae serve` models all
9,000; then three shards (--shard.count 3) model 3,000 each, all three running at once on the
same cores. Reported: series per shard, the wall time from process start until every series
is trained and scored (and the ratio of the two set-ups), the RSS of each process, and one
past-range PromQL query over all 9,000 series (an hour that ended two hours ago, at 60 s step, scored on demand)
answered by a real Prometheus fanning out over the shards by remote_read, beside the same
query on the single instance's own query API; each cold (scored on demand) and warm (cached).

Training is bounded (--max-steps, default 20 optimiser steps per batch, 2 epochs), so the
times measure the pipeline (history pulls, batched training, scoring, serving), not a fully
converged model. Run after hours; it takes several minutes on 2 cores:
    .venv/bin/python benchmarks/shards.py [--series 9000] [--shards 3] [--max-steps 20]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.load import EXPR, QUERY, SyntheticPrometheus
from tests.promstack import PrometheusProcess, PromvaeProcess

STEP = 60.0
WINDOW = 16


def shard_config(source_url: str, n_series: int, max_steps: int) -> dict:
    return {"prometheus": {"url": source_url, "timeout": "120s"},
            "queries": [{"name": QUERY, "expr": EXPR}], "step": "60s", "history": "6h",
            "window": WINDOW, "poll_every": "60s", "max_series": n_series + 100,
            # 1 h of live scores: the past-range query (ending 2 h ago) is scored on demand.
            "keep_scores": "1h",
            "query_max_series": 10 * n_series, "query_max_score_points": 50 * 10**6,
            "query_cache_values": 50 * 10**6, "query_timeout": "600s",
            "model": {"hidden": [16], "latent": 4, "score_scales": [4], "max_epochs": 2,
                      "max_steps": max_steps, "mc_samples": 4, "batch_size": 64}}


def metrics(p: PromvaeProcess) -> dict[str, float]:
    """Sample name (with labels) -> value of the self-metrics we read."""
    out = {}
    for line in requests.get(f"{p.url}/metrics", timeout=60).text.splitlines():
        if line.startswith(("promvae_models{", "promvae_shard_series_owned")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_trained(procs: list[PromvaeProcess], total: int, timeout: float,
                 say: Callable[[str], None]) -> float:
    """Seconds until the processes own `total` series between them, all ready and scored."""
    started = time.monotonic()
    last = -math.inf
    while True:
        waited = time.monotonic() - started
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"promvae exited:\n{p.log_text()[-3000:]}")
        try:
            ms = [metrics(p) for p in procs]
            owned = [int(m.get("promvae_shard_series_owned", 0)) for m in ms]
            ready = [int(m.get('promvae_models{state="ready"}', 0)) for m in ms]
            scored = [len(p.get("/api/v1/query", params={"query": "anomaly_score"},
                                timeout=60).json()["data"]["result"]) for p in procs]
        except (requests.RequestException, ValueError, KeyError):
            owned, ready, scored = [0], [0], [0]
        if sum(owned) == total and ready == owned and scored == owned:
            return waited
        if waited > timeout:
            raise RuntimeError(f"not trained after {timeout:.0f} s: owned {owned}, ready "
                               f"{ready}, scored {scored}")
        if waited - last >= 30:
            last = waited
            say(f"    {waited:5.0f} s: owned {owned}, ready {ready}, scored {scored}")
        time.sleep(3)


def rss_mib(p: PromvaeProcess) -> float:
    assert p.proc is not None
    return psutil.Process(p.proc.pid).memory_info().rss / 2**20


def timed(url: str, params: dict, timeout: float = 900) -> tuple[float, dict]:
    started = time.monotonic()
    r = requests.post(url, data=params, timeout=timeout)
    took = time.monotonic() - started
    body = r.json()
    if r.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"{url} {params['query']}: HTTP {r.status_code} {str(body)[:500]}")
    return took, body


def past_query(now: float) -> dict:
    end = math.floor((now - 2 * 3600) / STEP) * STEP
    return {"query": f'count(anomaly_score{{anomaly_query="{QUERY}"}})',
            "start": end - 3600, "end": end, "step": STEP}


def series_in(body: dict) -> int:
    values = [float(v) for _, v in body["data"]["result"][0]["values"]]
    return int(max(values))


def run(n_series: int, shards: int, max_steps: int, say: Callable[[str], None]) -> dict:
    """Run both set-ups and report; returns the figures."""
    wd = Path(tempfile.mkdtemp(prefix="promvae-shards-"))
    source = SyntheticPrometheus(n_series).start()
    procs: list[PromvaeProcess] = []
    prom: PrometheusProcess | None = None
    try:
        say(f"promvae shards benchmark: {shards} shards x {n_series // shards} series vs "
            f"1 instance x {n_series}; training bounded to max_steps={max_steps} per batch, "
            "2 epochs, window 16, 6 h of history at 60 s")
        # ---- one instance with every series
        say(f"  one instance, {n_series} series: training ...")
        (wd / "single").mkdir(exist_ok=True)
        single = PromvaeProcess(wd / "single", shard_config(source.url, n_series, max_steps))
        procs = [single]
        single.start()
        t_single = wait_trained([single], n_series, 3600, say)
        rss_single = rss_mib(single)
        q = past_query(time.time())
        cold_own, body = timed(f"{single.url}/api/v1/query_range", q)
        n_own = series_in(body)
        warm_own, _ = timed(f"{single.url}/api/v1/query_range", q)
        single.stop(timeout=60)
        # ---- shards
        say(f"  {shards} shards at once: training ...")
        procs = []
        for i in range(shards):
            (wd / f"shard{i}").mkdir(exist_ok=True)
            procs.append(PromvaeProcess(wd / f"shard{i}", shard_config(
                source.url, n_series, max_steps),
                args=["--shard.count", str(shards), "--shard.index", str(i)]))
        for p in procs:
            p.start()
        t_shards = wait_trained(procs, n_series, 3600, say)
        owned = [int(metrics(p)["promvae_shard_series_owned"]) for p in procs]
        rss_shards = [rss_mib(p) for p in procs]
        prom = PrometheusProcess(wd / "prometheus", [], extra_args=["--query.timeout=15m"])
        prom.config_path.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "60s"},
            "remote_read": [{"url": f"{p.url}/api/v1/read", "read_recent": True,
                             "remote_timeout": "15m",
                             "required_matchers": {"anomaly_query": QUERY}} for p in procs]}))
        prom.start()
        q = past_query(time.time())
        cold_rr, body = timed(f"{prom.url}/api/v1/query_range", q)
        n_rr = series_in(body)
        warm_rr, _ = timed(f"{prom.url}/api/v1/query_range", q)
        # ---- report
        say("")
        say(f"series per shard:             {owned} (sum {sum(owned)}, jump hash)")
        say(f"training wall time:           1 x {n_series}: {t_single:7.1f} s   "
            f"{shards} x shards at once: {t_shards:7.1f} s   ratio shards/single "
            f"{t_shards / t_single:.2f}")
        say(f"RSS:                          1 x {n_series}: {rss_single:7.0f} MiB   "
            f"shards: {', '.join(f'{r:.0f}' for r in rss_shards)} MiB "
            f"(sum {sum(rss_shards):.0f} MiB, {sum(rss_shards) / rss_single:.2f} x single)")
        say(f"past-range query {q['query']!r}, 1 h at 60 s, ended 2 h ago:")
        say(f"  Prometheus remote read over {shards} shards: cold {cold_rr:6.2f} s, warm "
            f"{warm_rr:6.2f} s, {n_rr} series counted")
        say(f"  single instance's own query API:         cold {cold_own:6.2f} s, warm "
            f"{warm_own:6.2f} s, {n_own} series counted")
        say(f"  remote read / own API: cold {cold_rr / cold_own:.2f}, warm "
            f"{warm_rr / warm_own:.2f}")
        say(f"machine: {psutil.cpu_count()} CPUs; every process shares them (training ran "
            "concurrently in the shard set-up)")
        return {"owned": owned, "t_single": t_single, "t_shards": t_shards,
                "rss_single": rss_single, "rss_shards": rss_shards, "count_rr": n_rr,
                "count_own": n_own, "cold_rr": cold_rr, "cold_own": cold_own}
    finally:
        for p in procs:
            if p.alive():
                p.stop(timeout=60)
        if prom is not None:
            prom.stop()
        source.stop()
        shutil.rmtree(wd, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=9000)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=20,
                    help="optimiser steps per training batch (bounds the training time)")
    args = ap.parse_args()
    run(args.series, args.shards, args.max_steps, lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
