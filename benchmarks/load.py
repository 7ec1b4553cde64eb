"""Bounded load on loopback against `promvae serve` with 1,000 trained series: latency, RSS.

A synthetic Prometheus (a child process of this one) answers /api/v1/query_range with
N series `load_value{instance="host-i"}` (daily sinusoid, a faster wave and hashed noise: a
pure function of time, so repeated pulls agree) and two days of history. promvae runs as a
`python -m grafana_plugin_backend.cli serve` subprocess against it with a small model, so
N models train in a minute or two; the clock starts once every series is ready and scored.

Then `--clients` threads (one requests.Session each) send, for `--duration` seconds:
/metrics scrapes, instant queries (topk, a whole-query selector, a scalar), range queries
over the last hour at 60 s step for one series (as a Grafana panel does), and range queries
over a past hour (on-demand scoring, mostly cache misses). Reported: requests/s and
p50/p99 latency per kind, errors (non-2xx or connection errors; must be 0), and the RSS of
the promvae process (psutil, sampled from this process every 10 s). `--soak` runs 10
minutes and checks RSS growth between minute 2 and minute 10 (acceptance: under 5 %).

The load generator and the synthetic source run on the same cores as promvae; their CPU
time is printed next to promvae's. Run:
    .venv/bin/python benchmarks/load.py [--soak] [--clients 32] [--duration 60] [--series 1000]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import psutil
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.promstack import free_port

STEP = 60.0
SOURCE_HISTORY = 2 * 86400.0  # the synthetic Prometheus holds two days before its start
QUERY = "load"  # anomaly_query of every series
EXPR = "load_value"
RSS_EVERY = 10.0  # seconds between RSS samples
SOAK_DURATION = 600.0
SOAK_FROM = 120.0  # growth is measured from minute 2 (after caches and allocators warm up)
SOAK_LIMIT = 5.0  # percent
# Brief enough that 1,000 models train in a minute or two on 2 cores; scoring cost, which
# is what the load exercises, depends on the model size only mildly.
MODEL = {"hidden": [16], "latent": 4, "max_steps": 50, "max_epochs": 2}
WINDOW = 32
QUICK_MODEL = {"hidden": [8], "latent": 2, "score_scales": [4], "max_epochs": 2, "max_steps": 8,
               "mc_samples": 2, "batch_size": 16, "patience": 1}
QUICK_WINDOW = 16
# Relative frequency of each request kind (a dashboard-heavy mix with regular scrapes).
WEIGHTS = {"metrics": 2, "instant_topk": 3, "instant_selector": 2, "instant_scalar": 2,
           "range_1h": 6, "range_ondemand": 1}
KINDS = tuple(WEIGHTS)


# ---- the synthetic Prometheus -------------------------------------------------------------

def source_values(ids: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Values of series `ids` (S,) at unix times `t` (T,): (S, T)."""
    i = ids[:, None].astype(np.float64)
    x = np.sin(np.floor(t[None, :] / STEP) * 12.9898 + i * 78.233) * 43758.5453
    noise = x - np.floor(x) - 0.5
    return (50 + 10 * np.sin(2 * np.pi * (t[None, :] / 86400.0 + i / 17))
            + 3 * np.sin(2 * np.pi * (t[None, :] / 5400.0 + i / 7)) + 2 * noise)


@dataclass(frozen=True)
class Metric:
    """One metric the synthetic Prometheus serves: `n_series` series `name{instance="host-i"}`
    whose values are `values(ids, t)` (a module-level function, so a spawned child can load it)."""

    name: str
    n_series: int
    values: Callable[[np.ndarray, np.ndarray], np.ndarray] = source_values
    job: str = "load"


def matrix_body(n_series: int, start: float, end: float, step: float, t0: float, *,
                metric: Metric | None = None, history: float = SOURCE_HISTORY,
                ids: Sequence[int] | None = None) -> bytes:
    """A Prometheus query_range answer for every series on start + k*step <= min(end, now).

    `metric` (default: EXPR with `n_series` series of source_values) is what is served, from
    t0 - `history` on; `ids` restricts the answer to those series, as a selector would.
    """
    m = metric or Metric(EXPR, n_series)
    end = min(end, time.time())
    first = max(start, start + math.ceil((t0 - history - start) / step) * step)
    n = math.floor((end - first) / step + 1e-9) + 1 if end >= first else 0
    result = []
    idx = np.arange(m.n_series) if ids is None else np.array(
        sorted(i for i in set(ids) if 0 <= i < m.n_series), dtype=np.int64)
    if n > 0 and len(idx):
        grid = first + step * np.arange(n)
        vals = m.values(idx, grid)
        times = [f"{t:.3f}".rstrip("0").rstrip(".") for t in grid]
        for i, row in zip(idx.tolist(), vals.tolist()):
            pairs = ",".join(f'[{t},"{v:.4f}"]' for t, v in zip(times, row))
            result.append(f'{{"metric":{{"__name__":"{m.name}","instance":"host-{i}",'
                          f'"job":"{m.job}"}},"values":[{pairs}]}}')
    return ('{"status":"success","data":{"resultType":"matrix","result":['
            + ",".join(result) + "]}}").encode()


_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# What only_series() (source/prometheus.py) appends to narrow a query to some series.
_WANTED_INSTANCE = re.compile(r'label_replace\(vector\(1\), "instance", "host-(\d+)"')


def pick_metric(metrics: Sequence[Metric], query: str) -> Metric | None:
    """The metric a query reads: the only one, or the one whose name the query mentions."""
    if len(metrics) == 1:
        return metrics[0]  # whatever the query (load.py's source answers everything)
    names = set(_IDENT.findall(query))
    return next((m for m in metrics if m.name in names), None)


def wanted_ids(query: str) -> list[int] | None:
    """Series a query narrowed by only_series() asks for (None: not narrowed, all)."""
    if " and on(" not in query:
        return None
    found = _WANTED_INSTANCE.findall(query)
    return [int(i) for i in found] if found else None


class SourceServer(ThreadingHTTPServer):
    """The synthetic Prometheus: `n_series` series (or `metrics`) from `t0` - `history` on."""

    daemon_threads = True

    def __init__(self, n_series: int, metrics: Sequence[Metric] | None = None,
                 history: float = SOURCE_HISTORY) -> None:
        super().__init__(("127.0.0.1", 0), SourceHandler)
        self.n_series, self.t0, self.history = n_series, time.time(), history
        self.metrics = tuple(metrics) if metrics else (Metric(EXPR, n_series),)
        self.counts = {"/api/v1/query_range": 0, "/api/v1/query": 0}

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up (promvae stopped, a timed-out pull) is no error to print."""
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class SourceHandler(BaseHTTPRequestHandler):
    """Answers query_range (every series of the metric the query names, or of the only one,
    narrowed as only_series() asks) and an empty instant query."""

    server: SourceServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(parse_qs(urlsplit(self.path).query))

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        params = parse_qs(urlsplit(self.path).query)
        params.update(parse_qs(self.rfile.read(size).decode()))
        self._answer(params)

    def _answer(self, params: dict[str, list[str]]) -> None:
        path = urlsplit(self.path).path
        srv = self.server
        try:
            if path == "/api/v1/query_range":
                query = params.get("query", [""])[0]
                metric = pick_metric(srv.metrics, query)
                ids = wanted_ids(query) if metric is not None else []
                body = matrix_body(srv.n_series, float(params["start"][0]),
                                   float(params["end"][0]), float(params["step"][0]), srv.t0,
                                   metric=metric, history=srv.history, ids=ids)
            elif path == "/api/v1/query":
                body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
            else:
                self.send_error(404)
                return
        except (KeyError, ValueError) as e:
            self.send_error(400, str(e))
            return
        srv.counts[path] += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_source(conn: Connection, n_series: int, metrics: Sequence[Metric] | None = None,
                 history: float = SOURCE_HISTORY) -> None:
    """Child process: serve the synthetic Prometheus; send its port, then pull counts on demand."""
    srv = SourceServer(n_series, metrics, history)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    conn.send(srv.server_address[1])
    while conn.recv() != "stop":
        conn.send(dict(srv.counts))
    srv.shutdown()


class SyntheticPrometheus:
    """The synthetic source in a child process (its own GIL): start(), counts(), stop()."""

    def __init__(self, n_series: int, metrics: Sequence[Metric] | None = None,
                 history: float = SOURCE_HISTORY) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve_source, args=(child, n_series, metrics, history),
                                   daemon=True)
        self.url = ""

    def start(self) -> SyntheticPrometheus:
        self.process.start()
        if not self._conn.poll(60):
            raise RuntimeError("the synthetic Prometheus did not start within 60 s")
        self.url = f"http://127.0.0.1:{self._conn.recv()}"
        return self

    def counts(self) -> dict[str, int]:
        self._conn.send("counts")
        return self._conn.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            self._conn.send("stop")
            self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()


# ---- the promvae process ------------------------------------------------------------------

class PromvaeProcess:
    """`python -m grafana_plugin_backend.cli serve` with a config for the synthetic source."""

    def __init__(self, workdir: Path, source_url: str, n_series: int, quick: bool,
                 config: dict | None = None) -> None:
        """`config` (a promvae config mapping) replaces load.py's own, the URL set to the source."""
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "promvae.log"
        cfg = {"prometheus": {"url": source_url}, "queries": [{"name": QUERY, "expr": EXPR}],
               "step": "60s", "history": "12h" if quick else "1d",
               "window": QUICK_WINDOW if quick else WINDOW, "max_series": max(1000, n_series),
               "model": QUICK_MODEL if quick else MODEL}
        if config is not None:
            cfg = {**config, "prometheus": {**config.get("prometheus", {}), "url": source_url}}
        self.config_path = workdir / "promvae.yml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen | None = None

    def start(self) -> PromvaeProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "grafana_plugin_backend.cli", "serve",
                 "--config.file", str(self.config_path),
                 "--web.listen-address", f"127.0.0.1:{self.port}",
                 "--storage.path", str(self.workdir / "storage")],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def scrape_state(url: str) -> tuple[dict[str, float], int]:
    """(promvae_models by state, number of anomaly_score samples) from one /metrics scrape."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    states, scores = {}, 0
    for line in text.splitlines():
        if line.startswith("promvae_models{"):
            state = line.split('state="', 1)[1].split('"', 1)[0]
            states[state] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("anomaly_score{"):
            scores += 1
    return states, scores


def wait_ready(server: PromvaeProcess, n_series: int, timeout: float,
               say: Callable[[str], None]) -> float:
    """Poll /metrics until every series is ready and has a score; returns the seconds waited."""
    started = time.monotonic()
    last_said = -math.inf
    while True:
        waited = time.monotonic() - started
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"promvae exited with code {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            states, scores = scrape_state(server.url)
        except requests.RequestException:
            states, scores = {}, 0
        if states.get("ready", 0) >= n_series and scores >= n_series:
            say(f"  ready after {waited:.0f} s: {n_series} series trained and scored")
            return waited
        if waited > timeout:
            raise RuntimeError(f"promvae not ready after {timeout:.0f} s ({states}, {scores} "
                               f"scored):\n{server.log_tail()}")
        if waited - last_said >= 10:
            last_said = waited
            desc = ", ".join(f"{k} {v:.0f}" for k, v in states.items()) or "not answering yet"
            say(f"  {waited:4.0f} s: {desc}; {scores} series scored")
        time.sleep(2)


class RssSampler:
    """Samples the RSS of one process every `every` seconds in a thread: (t, bytes) pairs."""

    def __init__(self, pid: int, every: float = RSS_EVERY) -> None:
        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t0 = 0.0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._t0 = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> int:
        rss = self.proc.memory_info().rss
        self.samples.append((time.monotonic() - self._t0, rss))
        return rss

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ---- the load -----------------------------------------------------------------------------

def schedule(length: int = 170) -> list[str]:
    """Request kinds in smooth weighted round-robin order, each kind once up front."""
    total = sum(WEIGHTS.values())
    current = dict.fromkeys(KINDS, 0)
    out = list(KINDS)
    while len(out) < length:
        for k in KINDS:
            current[k] += WEIGHTS[k]
        best = max(KINDS, key=lambda k: current[k])
        current[best] -= total
        out.append(best)
    return out


def build_request(kind: str, rng: np.random.Generator, n_series: int,
                  panel_series: int = 0) -> tuple[str, str, dict]:
    """(method, path, params) of one request of `kind`; range_1h picks among the first
    `panel_series` series (0: all), range_ondemand among all."""
    now = math.floor(time.time() / STEP) * STEP
    pick = panel_series if kind == "range_1h" and panel_series else n_series
    one = f'anomaly_score{{instance="host-{int(rng.integers(pick))}"}}'
    if kind == "metrics":
        return "GET", "/metrics", {}
    if kind == "instant_topk":
        return "GET", "/api/v1/query", {"query": "topk(5, anomaly_score)"}
    if kind == "instant_selector":
        return "GET", "/api/v1/query", {"query": f'anomaly_score{{anomaly_query="{QUERY}"}}'}
    if kind == "instant_scalar":
        return "GET", "/api/v1/query", {"query": "1+1"}
    if kind == "range_1h":
        return "POST", "/api/v1/query_range", {"query": one, "start": now - 3600, "end": now,
                                               "step": "60"}
    if kind == "range_ondemand":  # a past hour 2-22 h ago: outside the live buffer
        end = now - STEP * int(rng.integers(120, 1320))
        return "POST", "/api/v1/query_range", {"query": one, "start": end - 3600, "end": end,
                                               "step": "60"}
    raise ValueError(f"unknown request kind {kind!r}")


@dataclass
class Tally:
    """What the clients saw: latencies per kind, errors with a few example messages."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    empty: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, took: float, error: str | None, empty: bool) -> None:
        with self.lock:
            self.latencies[kind].append(took)
            if error is not None:
                self.errors[kind] += 1
                if len(self.examples) < 5:
                    self.examples.append(f"{kind}: {error}")
            self.empty[kind] += empty


def client(url: str, n_series: int, panel_series: int, index: int, n_clients: int,
           deadline: float, tally: Tally, all_seen: threading.Event) -> None:
    """Send requests back to back until the deadline (and until every kind has been sent)."""
    order = schedule()
    pos = index * len(order) // max(n_clients, 1)
    rng = np.random.default_rng(index)
    with requests.Session() as session:
        while time.monotonic() < deadline or not all_seen.is_set():
            kind = order[pos % len(order)]
            pos += 1
            method, path, params = build_request(kind, rng, n_series, panel_series)
            error, empty = None, False
            t0 = time.perf_counter()
            try:
                if method == "GET":
                    resp = session.get(url + path, params=params, timeout=120)
                else:
                    resp = session.post(url + path, data=params, timeout=120)
                body = resp.content
                if not 200 <= resp.status_code < 300:
                    error = f"HTTP {resp.status_code} {body[:200]!r}"
                elif kind.startswith(("range", "instant_topk", "instant_selector")):
                    empty = b'"result":[]' in body
            except requests.RequestException as e:
                error = f"{type(e).__name__}: {e}"
            tally.add(kind, time.perf_counter() - t0, error, empty)
            if not all_seen.is_set() and all(tally.latencies[k] for k in KINDS):
                all_seen.set()


def run_load(url: str, n_series: int, panel_series: int, clients: int,
             duration: float) -> tuple[Tally, float]:
    """`clients` threads for `duration` s; returns the tally and the wall time it took."""
    tally, all_seen = Tally(), threading.Event()
    started = time.monotonic()
    threads = [threading.Thread(target=client, name=f"client-{i}",
                                args=(url, n_series, panel_series, i, clients,
                                      started + duration, tally, all_seen))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally, time.monotonic() - started


# ---- the report ---------------------------------------------------------------------------

@dataclass
class Result:
    """Everything the report prints; `ok` is the pass/fail verdict."""

    n_series: int
    clients: int
    elapsed: float
    tally: Tally
    rss: list[tuple[float, int]]
    cpu: dict[str, float]
    source_pulls: int
    soak: bool
    ok: bool = True
    growth: float = math.nan

    @property
    def errors(self) -> int:
        return sum(self.tally.errors.values())

    @property
    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.tally.latencies.items()}


def rss_at(samples: list[tuple[float, int]], t: float) -> int:
    """The RSS sample taken nearest to `t` seconds."""
    return min(samples, key=lambda s: abs(s[0] - t))[1]


def slope(samples: list[tuple[float, int]], since: float) -> float:
    """Least-squares slope of RSS over samples at or after `since` s, in MiB per minute."""
    pts = np.array([s for s in samples if s[0] >= since - 1e-6], dtype=np.float64)
    if len(pts) < 2:
        return math.nan
    return float(np.polyfit(pts[:, 0] / 60.0, pts[:, 1] / 2**20, 1)[0])


def report(r: Result, say: Callable[[str], None]) -> None:
    mib = 2**20
    total = sum(r.counts.values())
    say(f"\n{r.clients} clients, {r.elapsed:.1f} s, {r.n_series} series; latencies in ms")
    say(f"{'kind':<17}{'requests':>9}{'req/s':>9}{'p50':>9}{'p99':>9}{'max':>9}{'errors':>8}"
        f"{'empty':>7}")
    for k in KINDS:
        xs = np.array(r.tally.latencies[k]) * 1000
        p50, p99, top = (np.percentile(xs, 50), np.percentile(xs, 99), xs.max()) \
            if len(xs) else (math.nan,) * 3
        say(f"{k:<17}{len(xs):>9}{len(xs) / r.elapsed:>9.1f}{p50:>9.1f}{p99:>9.1f}{top:>9.1f}"
            f"{r.tally.errors[k]:>8}{r.tally.empty[k]:>7}")
    alls = np.concatenate([np.array(v) for v in r.tally.latencies.values()]) * 1000
    say(f"{'all':<17}{total:>9}{total / r.elapsed:>9.1f}{np.percentile(alls, 50):>9.1f}"
        f"{np.percentile(alls, 99):>9.1f}{alls.max():>9.1f}{r.errors:>8}"
        f"{sum(r.tally.empty.values()):>7}")
    for e in r.tally.examples:
        say(f"  error: {e}")
    say(f"source pulls during the load (on-demand scoring): {r.source_pulls}")
    say(f"RSS of promvae: {r.rss[0][1] / mib:.1f} MiB at start, {r.rss[-1][1] / mib:.1f} MiB "
        f"at end ({len(r.rss)} samples, peak {max(s[1] for s in r.rss) / mib:.1f} MiB)")
    cores = psutil.cpu_count() or 1
    say(f"CPU seconds during the load on {cores} cores (all share them): "
        + ", ".join(f"{k} {v:.1f} s ({v / r.elapsed / cores:.0%})" for k, v in r.cpu.items())
        + f"; load average {os.getloadavg()[0]:.1f}. The load generator and the source "
        "compete with promvae for the cores, so throughput is a lower bound")
    if r.soak:
        a, b = rss_at(r.rss, SOAK_FROM), r.rss[-1][1]
        say("RSS every minute (MiB): " + " ".join(
            f"{rss_at(r.rss, m * 60.0) / mib:.0f}" for m in range(int(r.elapsed // 60) + 1)))
        say(f"soak: RSS {a / mib:.1f} MiB at minute {SOAK_FROM / 60:.0f}, {b / mib:.1f} MiB at "
            f"minute {r.elapsed / 60:.0f}: growth {r.growth:+.2f} % (limit {SOAK_LIMIT:.0f} %); "
            f"slope over minutes {SOAK_FROM / 60:.0f}-{r.elapsed / 60:.0f}: "
            f"{slope(r.rss, SOAK_FROM):+.3f} MiB/min")
    say("PASS" if r.ok else "FAIL")


def cpu_seconds(p: psutil.Process | None = None) -> float:
    """CPU seconds used by process `p`, or by the whole machine (all cores) without it."""
    if p is not None:
        t = p.cpu_times()
        return t.user + t.system
    m = psutil.cpu_times()
    return sum(m) - m.idle - sum(getattr(m, k, 0.0) for k in ("iowait", "guest", "guest_nice"))


def run(n_series: int = 1000, clients: int = 32, duration: float = 60.0, soak: bool = False,
        quick: bool = False, panel_series: int = 0, ready_timeout: float = 1800.0,
        say: Callable[[str], None] = print) -> Result:
    """Start the source and promvae, wait until ready, run the load; returns the result."""
    workdir = Path(tempfile.mkdtemp(prefix="promvae-load-"))
    source = SyntheticPrometheus(n_series)
    server: PromvaeProcess | None = None
    keep = True  # the work dir (with promvae's log) stays unless the run passed
    try:
        source.start()
        server = PromvaeProcess(workdir, source.url, n_series, quick).start()
        say(f"promvae pid {server.pid} on {server.url} (log {server.log_path}, kept on "
            f"failure); synthetic Prometheus {source.url} with {n_series} series; waiting for "
            "models")
        wait_ready(server, n_series, ready_timeout, say)
        procs = {"promvae": psutil.Process(server.pid), "load generator": psutil.Process(),
                 "synthetic source": psutil.Process(source.process.pid)}
        cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
        machine0 = cpu_seconds()
        pulls0 = source.counts()["/api/v1/query_range"]
        sampler = RssSampler(server.pid).start()
        panels = f"{panel_series} series" if panel_series else "any series"
        say(f"load: {clients} clients for {duration:.0f} s, range_1h over {panels}; RSS "
            f"{sampler.samples[0][1] / 2**20:.1f} MiB")
        tally, elapsed = run_load(server.url, n_series, panel_series, clients, duration)
        sampler.stop()
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in procs.items()}
        cpu["other processes"] = max(0.0, cpu_seconds() - machine0 - sum(cpu.values()))
        pulls = source.counts()["/api/v1/query_range"] - pulls0
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"promvae exited during the load:\n{server.log_tail()}")
        r = Result(n_series, clients, elapsed, tally, sampler.samples, cpu, pulls, soak)
        r.ok = r.errors == 0
        if soak:
            a = rss_at(r.rss, SOAK_FROM)
            r.growth = 100.0 * (r.rss[-1][1] - a) / a
            r.ok = r.ok and r.growth < SOAK_LIMIT
        keep = not r.ok
        return r
    finally:
        if server is not None:
            server.stop()
        source.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--panel-series", type=int, default=0, metavar="N",
                    help="range_1h picks among the first N series, as a dashboard showing "
                         "the same few (default 0: any of --series, mostly cache misses)")
    ap.add_argument("--soak", action="store_true",
                    help=f"run {SOAK_DURATION / 60:.0f} minutes and check RSS growth")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 50 series, 4 clients, 5 s, a tiny model")
    args = ap.parse_args()
    if args.quick:
        args.series, args.clients, args.duration = 50, 4, 5.0
    if args.soak:
        args.duration = SOAK_DURATION
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        r = run(args.series, args.clients, args.duration, args.soak, args.quick,
                args.panel_series, say=lambda s: print(s, flush=True))
    except RuntimeError as e:
        print(f"load: {e}", file=sys.stderr)
        return 1
    report(r, lambda s: print(s, flush=True))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
