"""promvae's Prometheus client against a real Prometheus behind TLS, client certificates and
basic auth (Prometheus' --web.config.file, the exporter-toolkit format promvae serves too).

The TLS options come from a YAML config file, as a user writes them, through load_config. The
machine's REQUESTS_CA_BUNDLE (set on many CI images) must not replace the configured CA.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests
import trustme
import yaml

from grafana_plugin_backend.config.settings import Config, load_config
from grafana_plugin_backend.source.prometheus import PrometheusSource, SourceError
from tests.promstack import PrometheusProcess, StackError
from tests.service_fixtures import write_server_pki

pytestmark = pytest.mark.integration

USER, PASSWORD = "promvae", "tls-to-prometheus"


class TLSPrometheus(PrometheusProcess):
    """Prometheus serving HTTPS only, with a client certificate and basic auth required."""

    def __init__(self, workdir: Path, pki: dict[str, Path]) -> None:
        web = workdir / "web.yml"
        workdir.mkdir(parents=True, exist_ok=True)
        web.write_text(yaml.safe_dump({
            "tls_server_config": {"cert_file": str(pki["cert"]), "key_file": str(pki["key"]),
                                  "client_auth_type": "RequireAndVerifyClientCert",
                                  "client_ca_file": str(pki["ca"])},
            "basic_auth_users": {USER: bcrypt.hashpw(PASSWORD.encode(),
                                                     bcrypt.gensalt(rounds=4)).decode()},
        }))
        self.pki = pki
        super().__init__(workdir, [], extra_args=[f"--web.config.file={web}"])

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise StackError(f"prometheus exited during startup:\n{self.log_tail()}")
            try:
                r = requests.get(f"{self.url}/-/ready", timeout=1.0, verify=str(self.pki["ca"]),
                                 cert=str(self.pki["client"]), auth=(USER, PASSWORD))
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise StackError(f"prometheus (TLS) not ready after {timeout:.0f}s:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, files = write_server_pki(d)
    client = ca.issue_cert("promvae.example")
    files["client"], files["client_key"] = d / "client.pem", d / "client-key.pem"
    client.cert_chain_pems[0].write_to_path(files["client"])
    client.private_key_pem.write_to_path(files["client_key"])
    other = trustme.CA()  # a CA Prometheus' certificate does not come from
    files["other_ca"] = d / "other-ca.pem"
    other.cert_pem.write_to_path(files["other_ca"])
    rogue = other.issue_cert("promvae.example")  # a client certificate Prometheus refuses
    files["rogue"], files["rogue_key"] = d / "rogue.pem", d / "rogue-key.pem"
    rogue.cert_chain_pems[0].write_to_path(files["rogue"])
    rogue.private_key_pem.write_to_path(files["rogue_key"])
    # TLSPrometheus.wait_ready passes one file holding the client's key and certificate
    both = d / "client-both.pem"
    client.private_key_and_cert_chain_pem.write_to_path(both)
    return {**files, "client_both": both}


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory, prometheus_bin: str,
         pki: dict[str, Path]) -> Iterator[TLSPrometheus]:
    p = TLSPrometheus(tmp_path_factory.mktemp("tls-prom"),
                      {**pki, "client": pki["client_both"]})
    try:
        p.start()
        yield p
    finally:
        p.stop()


def config(tmp_path: Path, url: str, **tls: Any) -> Config:
    """A promvae config file with prometheus.tls_config = `tls`, loaded as `serve` loads it."""
    auth = tls.pop("basic_auth", {"username": USER, "password": PASSWORD})
    path = tmp_path / "promvae.yml"
    path.write_text(yaml.safe_dump({
        "prometheus": {"url": url, "timeout": "5s", "retries": 0, "tls_config": tls,
                       "basic_auth": auth},
        "queries": [{"name": "q", "expr": "vector(7)"}],
        "storage_path": str(tmp_path / "storage"),
    }))
    return load_config(path, environ={})


def pull(cfg: Config) -> list:
    end = float(int(time.time()) // 60 * 60)
    return PrometheusSource(cfg.prometheus).query_range("vector(7)", end - 600, end, 60.0)


def test_ca_client_certificate_and_basic_auth_reach_prometheus(tmp_path, prom, pki):
    cfg = config(tmp_path, prom.url, ca_file=str(pki["ca"]), cert_file=str(pki["client"]),
                 key_file=str(pki["client_key"]))
    (series,) = pull(cfg)
    assert len(series.timestamps) == 11 and set(series.values.tolist()) == {7.0}


def test_the_system_trust_store_does_not_know_the_private_ca(tmp_path, prom, pki):
    cfg = config(tmp_path, prom.url, cert_file=str(pki["client"]),
                 key_file=str(pki["client_key"]))  # no ca_file
    with pytest.raises(SourceError) as e:
        pull(cfg)
    assert e.value.reason == "connection" and "certificate" in str(e.value), e.value


def test_a_ca_that_did_not_sign_prometheus_is_refused(tmp_path, prom, pki):
    cfg = config(tmp_path, prom.url, ca_file=str(pki["other_ca"]),
                 cert_file=str(pki["client"]), key_file=str(pki["client_key"]))
    with pytest.raises(SourceError) as e:
        pull(cfg)
    assert e.value.reason == "connection" and "certificate" in str(e.value), e.value


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # as asked
def test_insecure_skip_verify_connects_without_the_ca(tmp_path, prom, pki):
    cfg = config(tmp_path, prom.url, insecure_skip_verify=True,
                 cert_file=str(pki["client"]), key_file=str(pki["client_key"]))
    (series,) = pull(cfg)
    assert set(series.values.tolist()) == {7.0}


@pytest.mark.parametrize("client", [None, "rogue"], ids=["no-client-cert", "foreign-client-cert"])
def test_prometheus_refuses_a_missing_or_foreign_client_certificate(tmp_path, prom, pki, client):
    tls: dict[str, Any] = {"ca_file": str(pki["ca"])}
    if client:
        tls.update(cert_file=str(pki[client]), key_file=str(pki[f"{client}_key"]))
    with pytest.raises(SourceError) as e:
        pull(config(tmp_path, prom.url, **tls))
    assert e.value.reason == "connection", e.value


def test_a_wrong_password_over_tls_is_an_auth_error(tmp_path, prom, pki):
    cfg = config(tmp_path, prom.url, ca_file=str(pki["ca"]), cert_file=str(pki["client"]),
                 key_file=str(pki["client_key"]),
                 basic_auth={"username": USER, "password": "wrong"})
    with pytest.raises(SourceError) as e:
        pull(cfg)
    assert e.value.reason == "auth", e.value
