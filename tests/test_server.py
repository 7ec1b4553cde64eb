"""Serving for real: `promvae serve` on the demo, SIGTERM, restart with models loaded."""

from __future__ import annotations

import pytest
import requests

from grafana_plugin_backend.server import parse_listen_address
from tests.promstack import PromvaeProcess, wait_until

TINY_ENV = {"PROMVAE_WINDOW": "16", "PROMVAE_HISTORY": "6h", "PROMVAE_MODEL_HIDDEN": "8",
            "PROMVAE_MODEL_LATENT": "2", "PROMVAE_MODEL_MAX_EPOCHS": "2",
            "PROMVAE_MODEL_MAX_STEPS": "8", "PROMVAE_MODEL_MC_SAMPLES": "2"}


@pytest.mark.parametrize("address,expected", [
    (":8080", ("0.0.0.0", 8080)), ("127.0.0.1:9", ("127.0.0.1", 9)),
    ("[::1]:8080", ("::1", 8080)), ("localhost:80", ("localhost", 80)),
])
def test_parse_listen_address(address, expected):
    assert parse_listen_address(address) == expected


def test_demo_serves_scores_stops_on_sigterm_and_restarts_with_loaded_models(tmp_path):
    pv = PromvaeProcess(tmp_path, env=TINY_ENV)
    pv.start()
    try:
        pv.wait_ready(timeout=120)

        def all_scored() -> dict | None:
            fams = pv.families()
            return fams if len(fams["anomaly_score"].samples) == 12 else None

        fams = wait_until(all_scored, timeout=60, description="12 demo scores")
        by_instance = {(s.labels["anomaly_query"], s.labels["instance"]): s.value
                       for s in fams["anomaly_score"].samples}
        assert by_instance[("cpu_busy", "web-2:9100")] > 1  # the ongoing incident
        assert requests.get(pv.url, timeout=5).status_code == 200
        assert pv.stop() == 0
    finally:
        pv.stop()
    assert (pv.storage / "index.json").exists()
    assert len(list((pv.storage / "models").glob("*.safetensors"))) == 12
    assert "Traceback" not in pv.log.read_text()

    pv.start()  # the same port and storage
    try:
        pv.wait_ready(timeout=60)
        fams = pv.families()
        assert fams["promvae_models_loaded"].samples[0].value == 12
        assert fams["promvae_models_trained"].samples[0].value == 0
    finally:
        pv.stop()


def test_port_in_use_exits_1_with_a_clear_log(tmp_path, caplog):
    import logging
    import socket

    from grafana_plugin_backend.config.settings import load_config
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
