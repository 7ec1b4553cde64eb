"""Credentials never leak: not in logs, status pages, API answers, error messages or config errors.

Every secret is a distinctive string; the service runs against a Prometheus URL where nothing
listens (so every query fails with an error naming the URL), everything it logs at DEBUG and
every endpoint's answer is collected, and none may contain any secret.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme

from grafana_plugin_backend.config.base import ConfigError
from grafana_plugin_backend.config.settings import describe, load_config
from grafana_plugin_backend.config.web import WebConfig
from grafana_plugin_backend.source.prometheus import SourceError
from grafana_plugin_backend.web.app import create_app
from tests.promstack import free_port, wait_until

URL_SECRET = "urlpw-7Qx3vv"
PASSWORD_SECRET = "inlinepw-K9z2vv"
HEADER_SECRET = "hdrtoken-P4m8vv"
TOKEN_SECRET = "bearer-Z1r6vv"
PWFILE_SECRET = "filepw-W5n0vv"
WEB_PASSWORD = "webpw-H2c7vv"
WEB_HASH = bcrypt.hashpw(WEB_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
AUTH = {"Authorization": "Basic " + base64.b64encode(f"admin:{WEB_PASSWORD}".encode()).decode()}

PATHS = ["/", "/metrics", "/-/healthy", "/-/ready", "/api/v1/status/models",
         "/api/v1/status/buildinfo", "/api/v1/status/config", "/api/v1/status/flags",
         "/api/v1/labels", "/api/v1/label/__name__/values", "/api/v1/series?match[]=anomaly_score",
         "/api/v1/metadata", "/api/v1/rules", "/api/v1/query?query=anomaly_score",
         "/api/v1/query_range?query=anomaly_score&start=0&end=600&step=60",
         "/api/v1/query?query=anomaly_score{"]


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(cert_file, key_file, a line of the key's PEM body) of a real client certificate."""
    d = tmp_path_factory.mktemp("tls")
    cert = trustme.CA().issue_cert("promvae.example")
    cert.cert_chain_pems[0].write_to_path(d / "cert.pem")
    cert.private_key_pem.write_to_path(d / "key.pem")
    key_line = (d / "key.pem").read_text().splitlines()[2]
    return str(d / "cert.pem"), str(d / "key.pem"), key_line


def configs(tmp_path: Path, key_pair: tuple[str, str, str]) -> dict[str, dict[str, Any]]:
    cert, key, _ = key_pair
    (tmp_path / "token").write_text(TOKEN_SECRET + "\n")
    (tmp_path / "password").write_text(PWFILE_SECRET + "\n")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every query fails with an error
    tls = {"cert_file": cert, "key_file": key}
    return {
        "url_password_header": {
            "url": f"https://promuser:{URL_SECRET}@{dead}/",
            "basic_auth": {"username": "promuser", "password": PASSWORD_SECRET},
            "headers": {"Authorization": f"Bearer {HEADER_SECRET}"}, "tls_config": tls},
        "bearer_token_file": {"url": f"http://{dead}", "bearer_token_file": str(tmp_path / "token"),
                              "tls_config": tls},
        "password_file": {"url": f"http://{dead}", "basic_auth": {
            "username": "promuser", "password_file": str(tmp_path / "password")}},
    }


def secrets(key_pair: tuple[str, str, str]) -> list[str]:
    return [URL_SECRET, PASSWORD_SECRET, HEADER_SECRET, TOKEN_SECRET, PWFILE_SECRET,
            WEB_PASSWORD, WEB_HASH, key_pair[2]]


def assert_no_secret(text: str, key_pair: tuple[str, str, str], where: str) -> None:
    for s in secrets(key_pair):
        assert s not in text, f"secret {s[:6]}... leaked in {where}"


@pytest.mark.parametrize("name", ["url_password_header", "bearer_token_file", "password_file"])
def test_no_secret_in_logs_answers_or_errors(tmp_path, key_pair, caplog, capfd, name):
    prometheus = configs(tmp_path, key_pair)[name]
    cfg = load_config(None, environ={}, overrides={
        "prometheus": {**prometheus, "retries": 0, "timeout": "2s"},
        "queries": [{"name": "q", "expr": "up"}], "storage_path": str(tmp_path / "storage"),
        "window": 16, "history": "1h", "poll_every": "1h"})
    caplog.set_level(logging.DEBUG)
    app = create_app(cfg, web_config=WebConfig(users={"admin": WEB_HASH}))
    svc = app.extensions["promvae"]
    svc.start()  # logs the config and source; the poller's first poll fails
    try:
        errors = svc.metrics_registry.get_sample_value
        wait_until(lambda: errors("promvae_poll_errors_total", {"reason": "connection"}),
                   timeout=30, description="a failed poll")
    finally:
        svc.stop(timeout=30)
    with pytest.raises(SourceError) as err:
        svc.source.query_range("up", 0.0, 600.0, 60.0)
    logging.getLogger("test").error("query failed: %s", err.value)  # as a caller would log it

    client = app.test_client()
    answers = []
    for path in PATHS:
        for headers in (AUTH, {}, {"Authorization": "Basic " + base64.b64encode(
                b"admin:" + WEB_PASSWORD[::-1].encode()).decode()}):
            resp = client.get(path, headers=headers)
            assert resp.status_code != 500, path
            answers.append(f"{path} {resp.status_code} {resp.headers}\n{resp.get_data(True)}")
    assert client.get("/metrics", headers=AUTH).status_code == 200  # the password worked
    assert_no_secret("\n".join(answers), key_pair, "an HTTP answer")
    assert_no_secret(str(err.value), key_pair, "a SourceError")
    assert_no_secret(describe(cfg) + repr(cfg) + svc.source.describe(), key_pair, "describe/repr")
    records = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "cannot reach Prometheus" in records  # the failure path was taken and logged
    assert_no_secret(records + caplog.text, key_pair, "the log")
    out, err_text = capfd.readouterr()
    assert_no_secret(out + err_text, key_pair, "stdout/stderr")


def test_no_secret_in_config_errors(tmp_path, key_pair):
    prometheus = configs(tmp_path, key_pair)["url_password_header"]
    bad = [{"prometheus": {**prometheus, "timeout": "soon"}},  # another key is bad
           {"prometheus": {**prometheus, "url": f"ftp://promuser:{URL_SECRET}@host/"}},
           {"prometheus": {**prometheus, "basic_auth": {"password": ["x", PASSWORD_SECRET]}}},
           {"prometheus": {**prometheus, "bearer_token_file": str(tmp_path / "token")}}]
    for overrides in bad:
        with pytest.raises(ConfigError) as err:
            load_config(None, environ={}, overrides={**overrides,
                                                      "queries": [{"name": "q", "expr": "up"}]})
        assert_no_secret(str(err.value), key_pair, f"ConfigError {err.value}")
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  admin: '{WEB_HASH}'\n  eve: {WEB_PASSWORD}\n"
                   "tls_server_config:\n  cert_file: /x\n")
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={}, overrides={"web_config_file": str(web)})
    assert "basic_auth_users.eve: not a bcrypt hash" in str(err.value)
    assert_no_secret(str(err.value), key_pair, "a web config error")
