"""Remote read over HTTPS with basic auth: a real Prometheus' remote_read tls_config/basic_auth.

promvae serves the built-in demo behind `--web.config.file` (TLS and a bcrypt user); one
remote_read block has the right credentials, one a wrong password. The first one's series
arrive; the second is refused (401) and Prometheus says so in a warning, losing nothing else.
"""

from __future__ import annotations

import time

import bcrypt
import pytest
import requests
import yaml

from tests.promstack import PrometheusProcess, PromvaeProcess, wait_until
from tests.service_fixtures import write_server_pki

pytestmark = pytest.mark.integration

PASSWORD = "remote-read-pw"
TINY_ENV = {"PROMVAE_WINDOW": "16", "PROMVAE_HISTORY": "2h", "PROMVAE_MODEL_HIDDEN": "8",
            "PROMVAE_MODEL_LATENT": "2", "PROMVAE_MODEL_MAX_EPOCHS": "1",
            "PROMVAE_MODEL_MAX_STEPS": "2", "PROMVAE_MODEL_MC_SAMPLES": "2",
            "OMP_NUM_THREADS": "1"}


def test_remote_read_with_tls_and_basic_auth(tmp_path, prometheus_bin):
    _, pki = write_server_pki(tmp_path)
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": str(pki["cert"]), "key_file": str(pki["key"])},
        "basic_auth_users": {"prom": bcrypt.hashpw(PASSWORD.encode(),
                                                   bcrypt.gensalt(rounds=4)).decode()}}))
    pv = PromvaeProcess(tmp_path, args=["--web.config.file", str(web)], env=TINY_ENV,
                        scheme="https")
    prom = PrometheusProcess(tmp_path / "prometheus", [])
    try:
        pv.start()
        pv.wait_ready(timeout=120, verify=str(pki["ca"]), auth=("prom", PASSWORD))

        def block(password: str, query: str) -> dict:
            return {"url": f"{pv.url}/api/v1/read", "read_recent": True,
                    "required_matchers": {"anomaly_query": query},
                    "basic_auth": {"username": "prom", "password": password},
                    "tls_config": {"ca_file": str(pki["ca"])}}
        prom.config_path.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "15s"},
            "remote_read": [block(PASSWORD, "cpu_busy"), block("wrong", "memory_available")]}))
        prom.start()

        def query(expr: str) -> dict:
            r = requests.get(f"{prom.url}/api/v1/query",
                             params={"query": expr, "time": time.time()}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        body = wait_until(lambda: query('anomaly_score{anomaly_query="cpu_busy"}')
                          if query('anomaly_score{anomaly_query="cpu_busy"}')["data"]["result"]
                          else None, timeout=60, description="demo scores through remote read")
        assert "warnings" not in body
        assert {r["metric"]["anomaly_query"] for r in body["data"]["result"]} == {"cpu_busy"}
        refused = query('anomaly_score{anomaly_query="memory_available"}')
        assert refused["data"]["result"] == []
        assert any("401" in w for w in refused.get("warnings", [])), refused
        metrics = pv.get("/metrics", verify=str(pki["ca"]), auth=("prom", PASSWORD)).text
        (line,) = [x for x in metrics.splitlines() if x.startswith(
            'promvae_http_requests_refused_total{reason="unauthorized"}')]
        assert float(line.rsplit(" ", 1)[1]) >= 1  # the refused reads are counted
    finally:
        prom.stop()
        pv.stop(timeout=30)
    assert "Traceback" not in pv.log.read_text()
