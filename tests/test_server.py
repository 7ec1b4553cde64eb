"""Serving for real: `promvae serve` on the demo, SIGTERM, restart with models loaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from grafana_plugin_backend.server import parse_listen_address
from tests.promstack import free_port, wait_until

TINY_ENV = {"PROMVAE_WINDOW": "16", "PROMVAE_HISTORY": "6h", "PROMVAE_MODEL_HIDDEN": "8",
            "PROMVAE_MODEL_LATENT": "2", "PROMVAE_MODEL_MAX_EPOCHS": "2",
            "PROMVAE_MODEL_MAX_STEPS": "8", "PROMVAE_MODEL_MC_SAMPLES": "2"}


@pytest.mark.parametrize("address,expected", [
    (":8080", ("0.0.0.0", 8080)), ("127.0.0.1:9", ("127.0.0.1", 9)),
    ("[::1]:8080", ("::1", 8080)), ("localhost:80", ("localhost", 80)),
])
def test_parse_listen_address(address, expected):
    assert parse_listen_address(address) == expected


def start(storage: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, **TINY_ENV}
    return subprocess.Popen(
        [sys.executable, "-m", "grafana_plugin_backend.cli", "serve",
         "--web.listen-address", f"127.0.0.1:{port}", "--storage.path", str(storage)],
        env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)


def ready(proc: subprocess.Popen, url: str, log: Path) -> bool:
    assert proc.poll() is None, f"promvae exited:\n{log.read_text()[-3000:]}"
    try:
        return requests.get(f"{url}/-/ready", timeout=2).ok
    except requests.RequestException:
        return False


def metrics(url: str) -> dict:
    text = requests.get(f"{url}/metrics", timeout=5).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_demo_serves_scores_stops_on_sigterm_and_restarts_with_loaded_models(tmp_path):
    storage, log = tmp_path / "storage", tmp_path / "promvae.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(storage, port, log)
    try:
        wait_until(lambda: ready(proc, url, log), timeout=120, description="promvae ready",
                   ignore_exceptions=())
        def all_scored() -> dict | None:
            fams = metrics(url)
            return fams if len(fams["anomaly_score"].samples) == 12 else None

        fams = wait_until(all_scored, timeout=60, description="12 demo scores")
        by_instance = {(s.labels["anomaly_query"], s.labels["instance"]): s.value
                       for s in fams["anomaly_score"].samples}
        assert by_instance[("cpu_busy", "web-2:9100")] > 1  # the ongoing incident
        assert requests.get(url, timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (storage / "index.json").exists()
    assert len(list((storage / "models").glob("*.safetensors"))) == 12
    assert "Traceback" not in log.read_text()

    proc = start(storage, port, log)
    try:
        wait_until(lambda: ready(proc, url, log), timeout=60,
                   description="promvae ready after restart", ignore_exceptions=())
        fams = metrics(url)
        assert fams["promvae_models_loaded"].samples[0].value == 12
        assert fams["promvae_models_trained"].samples[0].value == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()



def test_port_in_use_exits_1_with_a_clear_log(tmp_path, caplog):
    import logging
    import socket

    from grafana_plugin_backend.config import load_config
    from grafana_plugin_backend.server import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = load_config(None, environ={}, overrides={
            "listen_address": f"127.0.0.1:{port}", "storage_path": str(tmp_path / "s")})
        with caplog.at_level(logging.ERROR):
            assert serve(cfg) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    assert "Address already in use" in caplog.text
