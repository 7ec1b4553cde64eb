"""The promvae command: check-config, backtest, and bad configs without tracebacks."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

from grafana_plugin_backend.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_check_config_ok(capsys):
    assert main(["check-config", str(ROOT / "promvae.example.yml")]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "query cpu_busy" in out


def test_check_config_warns_of_a_counter_without_rate_and_still_passes(tmp_path, capsys):
    cfg = tmp_path / "c.yml"
    cfg.write_text("prometheus: {url: 'http://prom:9090'}\n"
                   "queries: [{name: reqs, expr: 'sum by (job) (http_requests_total)'}]\n")
    assert main(["check-config", str(cfg)]) == 0  # a warning, not an error: it may be meant
    err = capsys.readouterr().err
    assert "warning: query reqs: http_requests_total looks like a counter" in err
    assert main(["check-config", str(ROOT / "promvae.example.yml")]) == 0
    assert "warning" not in capsys.readouterr().err  # the shipped example is clean


def test_check_config_names_every_bad_key_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("step: soon\nwindow: -1\nqueries: [{name: a, expr: 'rate(x[5m]'}]\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    for key in ("step", "window", "queries[0].expr", "prometheus.url"):
        assert key in err
    assert "Traceback" not in err


def test_serve_refuses_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("poll_every: never\n")
    assert main(["serve", "--config.file", str(bad)]) == 1
    assert "poll_every" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and "promvae" in capsys.readouterr().out


def test_backtest_csv(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "c.yml"
    cfg.write_text("window: 16\nmodel: {hidden: [8], latent: 2, max_epochs: 2, max_steps: 8,"
                   " mc_samples: 2, batch_size: 16, score_scales: [4]}\n")
    n = 300
    t = 1_700_000_000 + 300 * np.arange(n)
    v = np.sin(np.arange(n) / 10.0)
    v[250] = 40.0
    text = "timestamp,value\n" + "".join(
        f"{np.datetime64(int(ts), 's').astype(object):%Y-%m-%d %H:%M:%S},{x}\n"
        for ts, x in zip(t, v))
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    assert main(["backtest", "--train-points", "200", "--config.file", str(cfg)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == "timestamp,value,score,flag,expected,lower,upper"
    assert len(lines) == n + 1
    first = lines[1].split(",")
    assert first[0] == "2023-11-14 22:13:20" and first[2] == ""  # warm-up: no score
    spike = lines[251].split(",")
    assert float(spike[2]) > 1 and spike[3] == "1"
    assert "first model on the first 200" in captured.err and "deployed" in captured.err
    assert "incidents flagged" in captured.err
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    assert main(["backtest", "--train-points", "200", "--config.file", str(cfg), "--train-once"]) == 0
    once = capsys.readouterr()
    assert "train once" in once.err and len(once.out.strip().splitlines()) == n + 1


def test_serve_with_an_unusable_storage_path_exits_cleanly(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["serve", "--storage.path", str(blocker), "--web.listen-address",
                 "127.0.0.1:0"]) == 1
    assert "not writable" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--query", "nope", "--range", "7d"], "no query named 'nope' in the built-in demo"),
    (["--query", "cpu_busy", "--expr", "up", "--range", "7d"], "exactly one of --query NAME and"),
    (["--query", "cpu_busy"], "give the time range: --range DURATION"),
    (["--query", "cpu_busy", "--range", "a week"], "--range: not a duration: 'a week'"),
    (["--query", "cpu_busy", "--range", "1d", "--start", "now-2d"], "--range or --start, not both"),
    (["--query", "cpu_busy", "--start", "now", "--end", "now-1d"], "the range is empty"),
    (["--query", "cpu_busy", "--start", "last tuesday"], "cannot parse time 'last tuesday'"),
    (["--query", "cpu_busy", "--range", "1d", "--input", "x.csv"],
     "--input is for CSV input, not for --query/--expr"),
    (["--expr", "up", "--range", "1d", "--train-points", "9"], "--train-points is for CSV input"),
    (["--range", "7d", "--plot", "x.png"], "--range, --plot need --query NAME or --expr PROMQL"),
    (["--query", "cpu_busy", "--range", "1d", "--top", "0"], "--top must be at least 1"),
    (["--query", "cpu_busy", "--range", "1d", "--plot", "/nonexistent/dir/r.png"],
     "--plot /nonexistent/dir/r.png: no such directory"),
])
def test_backtest_query_bad_arguments_exit_2_with_one_line(capsys, args, message):
    assert main(["backtest", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("promvae backtest: ") and message in err


def test_backtest_query_without_series_exits_1(capsys):
    assert main(["backtest", "--expr", "no_such_metric", "--range", "1h"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("promvae backtest: pulling no_such_metric from built-in demo")
    assert err[-1].startswith("promvae backtest: query no_such_metric returned no series from ")


def test_backtest_query_unreachable_prometheus_exits_1(tmp_path, capsys):
    from tests.promstack import free_port

    cfg = tmp_path / "c.yml"
    cfg.write_text(f"prometheus: {{url: 'http://127.0.0.1:{free_port()}', retries: 0}}\n"
                   "queries: [{name: app, expr: app_value}]\n")
    assert main(["backtest", "--config.file", str(cfg), "--query", "app", "--range", "1h"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("promvae backtest: cannot reach Prometheus at http://127.0.0.1:")
