"""`promvae check-config --probe` against a real Prometheus with backfilled history.

Three queries: disk devices with 40 and 10 minutes of history (too little for a window of 16:
48 observed points), memory with 3 hours (enough), and one that returns nothing. The probe
must count each one's series and history as Prometheus has them, say when training can start
and what the history supports, and exit 1 because one query returns no series. A Prometheus
that is not there is a clear failure, not a traceback.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from tests.promstack import backfill, free_port, write_openmetrics

pytestmark = pytest.mark.integration

STEP = 60.0


def run_probe(tmp_path, url: str, queries: list[dict]) -> subprocess.CompletedProcess:
    cfg = tmp_path / "promvae.yml"
    cfg.write_text(yaml.safe_dump({
        "prometheus": {"url": url, "timeout": "10s", "retries": 0}, "queries": queries,
        "step": "60s", "history": "6h", "window": 16,
        "model": {"hidden": [8], "latent": 2}}))
    env = {"PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "grafana_plugin_backend.cli", "check-config",
                           str(cfg), "--probe"], capture_output=True, text=True, timeout=120,
                          env=env, check=False)


def test_probe_reports_series_history_and_what_it_supports(tmp_workdir, prometheus_factory):
    end = math.floor(time.time() / STEP) * STEP

    def span(minutes: int) -> np.ndarray:
        return np.arange(end - minutes * STEP, end + STEP / 2, STEP)

    ts40, ts10, ts180 = span(40), span(10), span(180)
    history = write_openmetrics(tmp_workdir / "history.om", [
        ("probe_disk_busy", {"instance": "a", "device": "sda"}, ts40, 0.2 + 0 * ts40),
        ("probe_disk_busy", {"instance": "a", "device": "sdb"}, ts10, 0.3 + 0 * ts10),
        ("probe_mem_bytes", {"instance": "a"}, ts180, 5e9 + 0 * ts180),
    ])
    backfill(history, tmp_workdir / "prom-data")
    prom = prometheus_factory(data_dir=tmp_workdir / "prom-data")
    proc = run_probe(tmp_workdir, prom.url, [
        {"name": "disk", "expr": "probe_disk_busy"},
        {"name": "mem", "expr": "probe_mem_bytes / 1"},
        {"name": "empty", "expr": "probe_nothing_here"}])
    out = proc.stdout
    assert proc.returncode == 1, (proc.returncode, out, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "the probe found problems" in proc.stderr

    # Counts as Prometheus has them (a point or so more if the minute turned: lookback).
    m = re.search(r"query disk: 2 series; history (\d+) min to (\d+) min, (\d+) to (\d+) "
                  r"observed points at step 1m \(history 6h\)", out)
    assert m, out
    lo_min, hi_min, lo_pts, hi_pts = map(int, m.groups())
    assert 11 <= lo_min <= 13 and 41 <= hi_min <= 43, out
    assert 11 <= lo_pts <= 13 and 41 <= hi_pts <= 43, out
    m = re.search(r"2 of 2 series need more history: window 16 needs 48 observed points; the "
                  r"first in about (\d+) min", out)
    assert m and 5 <= int(m.group(1)) <= 7, out
    assert re.search(r"this history supports: window up to (9|10|11) at step 1m; step (51|52|"
                     r"53|54)s or less for window 16", out), out
    m = re.search(r"query mem: 1 series; history 3 h( 1 min| 2 min)?, (\d+) observed", out)
    assert m and 181 <= int(m.group(2)) <= 183, out
    assert "all can train now (window 16 needs 48 observed points)" in out
    assert "query empty: returns no series now: check the expression" in out


def test_probe_of_an_absent_prometheus_fails_clearly(tmp_path):
    proc = run_probe(tmp_path, f"http://127.0.0.1:{free_port()}",
                     [{"name": "disk", "expr": "probe_disk_busy"}])
    assert proc.returncode == 1
    assert "query disk: FAILED (connection" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
