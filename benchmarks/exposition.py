"""GET /metrics at fleet size: time and bytes of a scrape over HTTP, with and without gzip.

Fake scored series (no models, no poller) behind the production server (cheroot), scraped with
requests. "after poll" is the first scrape after every series recorded a new result (the
anomaly_* block is rendered then); "cached" is a scrape with no new results in between.

    .venv/bin/python benchmarks/exposition.py [--series 1000,3000,10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grafana_plugin_backend.server import make_server
from grafana_plugin_backend.service.registry import Registry
from grafana_plugin_backend.web.app import create_app
from tests.fake_results import fill, result_rows
from tests.promstack import free_port
from tests.service_fixtures import FakeClock, FakeSource, make_config

ENCODINGS = {"identity": "identity", "gzip": "gzip"}  # Prometheus sends Accept-Encoding: gzip


def new_results(registry: Registry, ts: float, rng: np.random.Generator) -> None:
    """Every series records one new point, as a poll does (full-precision values: their repr
    is most of the formatting cost)."""
    with registry.lock:
        for s in registry.all():
            expected = float(rng.normal(50, 20))
            s.record(result_rows(ts, score=float(rng.gamma(2.0, 0.25)), expected=expected,
                                 observed=expected + float(rng.normal(0, 5)),
                                 lower=expected - float(rng.random()) * 10,
                                 upper=expected + float(rng.random()) * 10), 10)


def measure(n: int, repeat: int) -> list[tuple[str, str, float, int]]:
    """(encoding, case, median seconds, bytes on the wire) for n series."""
    port = free_port()
    clock = FakeClock()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(Path(tmp), max_series=n, listen_address=f"127.0.0.1:{port}")
        app = create_app(cfg, source=FakeSource(clock), clock=clock)
        registry = app.extensions["promvae"].registry
        fill(registry, n)
        server = make_server(cfg, app)
        server.prepare()
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        session = requests.Session()
        rng = np.random.default_rng(1)
        url = f"http://127.0.0.1:{port}/metrics"
        rows = []
        try:
            for enc, header in ENCODINGS.items():
                times: dict[str, list[float]] = {"after poll": [], "cached": []}
                size = 0
                for k in range(repeat):
                    new_results(registry, 2e9 + 60 * (k + 1) + (enc == "gzip") * 1e6, rng)
                    for case_times in times.values():  # "after poll", then "cached"
                        t0 = time.perf_counter()
                        r = session.get(url, headers={"Accept-Encoding": header}, stream=True)
                        size = len(r.raw.read(decode_content=False))
                        case_times.append(time.perf_counter() - t0)
                        r.raise_for_status()
                rows += [(enc, case, statistics.median(ts), size) for case, ts in times.items()]
        finally:
            server.stop()
            thread.join(10)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", default="1000,3000,10000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"{'series':>7} {'encoding':>9} {'case':>11} {'median ms':>10} {'bytes':>10}")
    for n in (int(x) for x in args.series.split(",")):
        for enc, case, sec, size in measure(n, args.repeat):
            print(f"{n:7d} {enc:>9} {case:>11} {sec * 1000:10.1f} {size:10d}", flush=True)


if __name__ == "__main__":
    main()
