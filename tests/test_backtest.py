"""`promvae backtest --query`: time ranges, query choice, and a run on the built-in demo source."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from detector.plot import META_PANELS, META_SERIES
from grafana_plugin_backend.backtest import (
    BacktestError,
    parse_time,
    pick_query,
    series_name,
    time_range,
)
from grafana_plugin_backend.cli import main
from grafana_plugin_backend.config.settings import load_config
from grafana_plugin_backend.source.demo import DAY, DemoSource

NOW = 1_764_633_600.0  # 2025-12-02 00:00 UTC


def test_parse_time_forms():
    assert parse_time("1700000000", NOW) == 1_700_000_000.0
    assert parse_time("2025-12-01T00:00:00Z", NOW) == NOW - 86400
    assert parse_time("2025-12-01 00:00", NOW) == NOW - 86400  # UTC unless it says otherwise
    assert parse_time("2025-12-01T02:00:00+02:00", NOW) == NOW - 86400
    assert parse_time("now", NOW) == NOW and parse_time("now-36h", NOW) == NOW - 1.5 * 86400
    for bad in ("yesterday", "now-soon", ""):
        with pytest.raises(BacktestError, match="cannot parse time"):
            parse_time(bad, NOW)


def test_time_range_from_range_or_start_end():
    assert time_range("7d", None, None, NOW) == (NOW - 7 * 86400, NOW)
    assert time_range("1d", None, "now-1d", NOW) == (NOW - 2 * 86400, NOW - 86400)
    assert time_range(None, "now-2d", None, NOW) == (NOW - 2 * 86400, NOW)
    cases = {("7d", "now-1d", None): "not both", (None, None, None): "give the time range",
             ("7x", None, None): "--range: not a duration", ("0s", None, None): "is empty",
             (None, "now", "now-1h"): "is empty", ("1h", None, "now+1d"): "cannot parse",
             ("1h", None, str(NOW + 86400)): "in the future"}
    for (rng, start, end), message in cases.items():
        with pytest.raises(BacktestError, match=re.escape(message)):
            time_range(rng, start, end, NOW)


def test_pick_query_by_name_or_expression(tmp_path):
    demo = load_config(None, environ={})
    assert pick_query(demo, "cpu_busy", None).expr.startswith("1 - avg by (instance)")
    assert pick_query(demo, None, " up ").expr == "up"
    with pytest.raises(BacktestError, match=r"no query named 'cpu' in the built-in demo "
                                            r"\(queries: cpu_busy, memory_available"):
        pick_query(demo, "cpu", None)
    f = tmp_path / "c.yml"
    f.write_text("prometheus: {url: http://127.0.0.1:1}\nqueries: [{name: app, expr: app_value}]\n")
    cfg = load_config(f, environ={})
    assert pick_query(cfg, "app", None).expr == "app_value"
    with pytest.raises(BacktestError, match=r"no query named 'cpu_busy' in the config \(queries: app\)"):
        pick_query(cfg, "cpu_busy", None)
    for name, expr in ((None, None), ("app", "x")):
        with pytest.raises(BacktestError, match="exactly one of --query NAME and --expr"):
            pick_query(cfg, name, expr)


def test_series_name_is_prometheus_spelling():
    assert series_name({"instance": "a:1", "__name__": "up", "job": "j"}) == 'up{instance="a:1", job="j"}'
    assert series_name({"instance": "a"}) == '{instance="a"}'


SMALL = ("step: 120s\nhistory: 1d\nretrain_every: 1d\nwindow: 16\n"
         "model: {hidden: [16], latent: 2, max_steps: 150, max_epochs: 15, mc_samples: 4,"
         " batch_size: 32, score_scales: [16, 4]}\n")


# A Friday noon: the demo's weekly seasonality drops its level on Saturday and Sunday, so
# with a day of history a backtest whose range or first training day holds a weekend edge
# (run on a Saturday or a Monday) flags that first: its worst incident depends on the day.
DEMO_NOW = 1_796_385_600.0  # 2026-12-04 12:00 UTC, a Friday


def test_demo_backtest_finds_the_network_drop(tmp_path, capsys, monkeypatch):
    """The demo's network_receive drop on cache-1 (2 d 3 h before start, 30 min) is the worst
    incident of its query over the last three days; the PNG shows the top two series."""
    import time

    from grafana_plugin_backend import backtest

    monkeypatch.setattr(time, "time", lambda: DEMO_NOW)
    monkeypatch.setattr(backtest, "make_source", lambda cfg: DemoSource(clock=lambda: DEMO_NOW))
    cfg = tmp_path / "c.yml"
    cfg.write_text(SMALL)
    png = tmp_path / "r.png"
    assert main(["backtest", "--config.file", str(cfg), "--query", "network_receive",
                 "--range", "3d", "--plot", str(png), "--top", "2"]) == 0
    out, err = capsys.readouterr()
    assert "pulling network_receive from built-in demo" in err and "wrote " + str(png) in err
    assert out.startswith("backtest of network_receive: ")
    assert "deployed: retrain every 1d on 1d" in out
    rows = re.findall(r"^  (\{instance=\"[^\"]+\"\}) +(\S+ \w+) +(\d+) ", out, re.MULTILINE)
    assert {r[0] for r in rows} == {'{instance="cache-1:9100"}', '{instance="web-1:9100"}',
                                    '{instance="web-2:9100"}'}
    worst = out.split("worst incidents of the query")[1].splitlines()[1]
    assert worst.startswith('  {instance="cache-1:9100"}: ')
    drop = DEMO_NOW - 2 * DAY - 3 * 3600  # the demo places it relative to its start
    when = re.search(r": (\S+ \S+) to (\S+ \S+) UTC", worst)
    begin, end = (parse_time(when.group(k), NOW) for k in (1, 2))
    # the episode overlaps the drop, starting at most 20 min after it ended
    assert begin <= drop + 1800 + 1200 and end >= drop
    with Image.open(png) as img:
        img.load()
        assert img.text[META_PANELS] == "4"
        assert img.text[META_SERIES].split("\n")[0] == '{instance="cache-1:9100"}'


def test_max_series_caps_the_backtest(tmp_path, capsys):
    cfg = tmp_path / "c.yml"
    cfg.write_text(SMALL + "max_series: 2\n")
    assert main(["backtest", "--config.file", str(cfg), "--query", "cpu_busy", "--range", "2d",
                 "--train-once"]) == 0
    out, err = capsys.readouterr()
    assert "query cpu_busy has 4 series; backtesting the first 2 by name (max_series)" in err
    assert "trained once on the history before the range" in out
    assert re.search(r"^totals: 2 series ", out, re.MULTILINE)
