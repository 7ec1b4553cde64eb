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
