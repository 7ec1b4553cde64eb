"""`promvae backtest --query` against a real Prometheus holding eight days of backfilled history.

Three series at 1 minute; series "b" had a level shift (six amplitudes up for 90 minutes) two
days before the end. The backtest of the last week pulls the week plus a day of history
before it (11,520 points per series: two range requests under Prometheus' 11,000-point
limit), replays the deployed service and must name b's shift as the worst incident of the
query; the PNG must decode with two panels per series.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from detector.plot import META_PANELS, META_SERIES
from grafana_plugin_backend.backtest import parse_time
from grafana_plugin_backend.cli import main
from tests.promstack import backfill, wave, write_openmetrics

pytestmark = pytest.mark.integration

STEP = 60.0
METRIC = "app_value"
SHIFT_AGO = 2 * 86400.0  # the shift starts this long before the history's end
SHIFT_LEN = 90 * 60.0
MODEL = {"hidden": [16], "latent": 2, "max_steps": 150, "max_epochs": 15, "mc_samples": 4,
         "score_scales": [16, 4], "batch_size": 32}


def test_backtest_week_on_prometheus_names_the_injected_shift(tmp_path, prometheus_factory,
                                                               promtool_bin, capsys):
    end = math.floor((time.time() - 60) / STEP) * STEP
    ts = np.arange(end - 8 * 86400, end + 1, STEP)
    shift = end - SHIFT_AGO
    a, b, c = (wave(level, amp, seed, STEP)(ts) for level, amp, seed in
               [(100, 10, 1), (50, 5, 2), (7, 1, 3)])
    b[(ts >= shift) & (ts < shift + SHIFT_LEN)] += 30.0
    items = [(METRIC, {"instance": "a", "job": "app"}, ts, a),
             (METRIC, {"instance": "b", "job": "app"}, ts, b),
             (METRIC, {"instance": "c", "job": "app"}, ts, c)]
    backfill(write_openmetrics(tmp_path / "history.om", items), tmp_path / "prom-data")
    prom = prometheus_factory(data_dir=tmp_path / "prom-data")
    cfg = tmp_path / "promvae.yml"
    cfg.write_text(yaml.safe_dump({
        "prometheus": {"url": prom.url, "timeout": "20s", "retries": 0},
        "queries": [{"name": "app", "expr": METRIC}], "step": "60s", "history": "1d",
        "retrain_every": "1d", "window": 16, "model": MODEL}))
    png = tmp_path / "report.png"
    began = time.monotonic()
    assert main(["backtest", "--config.file", str(cfg), "--query", "app", "--range", "7d",
                 "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    print(out)  # the report, for whoever reads the test log
    print(f"(backtest took {time.monotonic() - began:.1f} s)")
    assert f"pulling app from prometheus {prom.url}" in err
    assert "up to 11520 points per series, 2 range request(s) of at most 11000 points" in err
    assert "pulled 3 series" in err and "trained and scored 3 series" in err
    assert out.startswith("backtest of app: ") and "(7.0 d), deployed: retrain every 1d" in out
    assert "too little history" not in out  # every first model had the day before the range
    for inst in "abc":
        assert re.search(rf'^  app_value\{{instance="{inst}", job="app"\}} +7\.0 d ', out, re.MULTILINE)
    worst = out.split("worst incidents of the query")[1].splitlines()[1]
    assert worst.startswith('  app_value{instance="b", job="app"}: '), worst
    when = re.search(r": (\S+ \S+) to (\S+ \S+) UTC \((.+?)\), peak (\S+)", worst)
    begin, stop = parse_time(when.group(1), end), parse_time(when.group(2), end)
    assert shift - 60 <= begin <= shift + 1200 and stop >= shift + 600  # overlaps the shift
    assert float(when.group(4)) > 1
    totals = re.search(r"^totals: 3 series \(0 not backtested\), 21\.0 d of series time "
                       r"evaluated, (\d+) flag episodes", out, re.MULTILINE)
    assert totals and int(totals.group(1)) >= 1
    with Image.open(png) as img:
        img.load()
        assert img.format == "PNG"
        assert img.text[META_PANELS] == "6"
        assert img.text[META_SERIES].split("\n")[0] == 'app_value{instance="b", job="app"}'
