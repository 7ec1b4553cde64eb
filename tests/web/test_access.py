"""HTTP guards: basic auth (bcrypt, cached), open probes, size limits, configured headers."""

from __future__ import annotations

import base64
import io

import bcrypt
import pytest

from grafana_plugin_backend.config.web import WebConfig
from grafana_plugin_backend.web.access import MAX_URL_BYTES, BasicAuthChecker
from grafana_plugin_backend.web.app import create_app
from tests.service_fixtures import FakeClock, FakeSource, make_config

PASSWORD = "correct horse"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
OTHER_HASH = bcrypt.hashpw(b"other", bcrypt.gensalt(rounds=4)).decode()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def make_app(tmp_path, web: WebConfig | None = None, **overrides):
    cfg = make_config(tmp_path, **overrides)
    clock = FakeClock()
    return create_app(cfg, web_config=web, source=FakeSource(clock), clock=clock)


@pytest.fixture
def client(tmp_path):
    web = WebConfig(users={"alice": HASH, "bob": OTHER_HASH},
                    headers={"X-Frame-Options": "deny"})
    return make_app(tmp_path, web, web_max_request_bytes=2048).test_client()


def test_checker_accepts_only_the_right_pair():
    c = BasicAuthChecker({"alice": HASH, "bob": OTHER_HASH})
    assert c.check("alice", PASSWORD)
    assert c.check("bob", "other")
    assert not c.check("alice", "other")  # bob's password is not alice's
    assert not c.check("alice", PASSWORD + " ")
    assert not c.check("carol", PASSWORD)
    assert not c.check("", "")
    assert not c.check("alice", "x" * 100)  # bcrypt refuses > 72 bytes: no 500


def test_checker_caches_successes_only_and_without_the_password():
    c = BasicAuthChecker({"alice": HASH})
    assert c.check("alice", PASSWORD) and c.bcrypt_checks == 1
    assert c.check("alice", PASSWORD) and c.bcrypt_checks == 1  # cached: no bcrypt
    assert not c.check("alice", "wrong") and c.bcrypt_checks == 2
    assert not c.check("alice", "wrong") and c.bcrypt_checks == 3  # failures always cost bcrypt
    assert not c.check("mallory", "wrong") and c.bcrypt_checks == 4  # unknown users too
    keys = list(c._cache)
    assert len(keys) == 1 and len(keys[0]) == 32
    assert PASSWORD.encode() not in keys[0] and PASSWORD.encode().hex().encode() not in keys[0]


def test_checker_cache_is_bounded_and_keyed_by_user_and_password():
    c = BasicAuthChecker({"alice": HASH, "bob": OTHER_HASH}, cache_size=1)
    assert c.check("alice", PASSWORD) and c.check("bob", "other")
    assert c.bcrypt_checks == 2
    assert c.check("alice", PASSWORD) and c.bcrypt_checks == 3  # evicted by bob
    assert not c.check("bob", PASSWORD)  # alice's cached password does not open bob


@pytest.mark.parametrize("path", ["/metrics", "/", "/api/v1/status/models",
                                  "/api/v1/query?query=anomaly_score",
                                  "/api/v1/status/buildinfo", "/nonexistent"])
@pytest.mark.parametrize("headers", [{}, basic("alice", "wrong"), basic("carol", PASSWORD),
                                     basic("alice", ""), {"Authorization": "Bearer xyz"},
                                     {"Authorization": "Basic !!!not-base64"}],
                         ids=["none", "wrong", "unknown-user", "empty", "bearer", "garbage"])
def test_every_endpoint_needs_credentials(client, path, headers):
    resp = client.get(path, headers=headers)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="promvae"'
    assert resp.headers["X-Frame-Options"] == "deny"
    body = resp.get_data(as_text=True)
    assert "alice" not in body and HASH not in body and PASSWORD not in body


def test_api_401_is_prometheus_json(client):
    resp = client.get("/api/v1/status/models")
    assert resp.json == {"status": "error", "errorType": "unauthorized", "error": "Unauthorized"}


@pytest.mark.parametrize("path", ["/metrics", "/", "/api/v1/status/models",
                                  "/api/v1/query?query=anomaly_score"])
def test_right_credentials_open_every_endpoint(client, path):
    resp = client.get(path, headers=basic("alice", PASSWORD))
    assert resp.status_code == 200
    assert resp.headers["X-Frame-Options"] == "deny"
    assert client.get(path, headers=basic("bob", "other")).status_code == 200


def test_probes_stay_open(client):
    assert client.get("/-/healthy").status_code == 200
    assert client.get("/-/healthy", headers=basic("alice", "wrong")).status_code == 200
    # Nothing polled or loaded yet: not ready (503), and still answered without credentials.
    for headers in ({}, basic("alice", "wrong")):
        resp = client.get("/-/ready", headers=headers)
        assert resp.status_code == 503 and "not ready" in resp.get_data(as_text=True)
    svc = client.application.extensions["promvae"]
    svc.trainer.run_once()  # stored models loaded (none)
    svc.poller.poll_once()  # one successful poll, no series pending training
    for headers in ({}, basic("alice", "wrong")):
        resp = client.get("/-/ready", headers=headers)
        assert resp.status_code == 200 and "Ready" in resp.get_data(as_text=True)


def test_no_users_means_no_auth(tmp_path):
    client = make_app(tmp_path, WebConfig(headers={"X-Content-Type-Options": "nosniff"}))
    resp = client.test_client().get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert make_app(tmp_path / "b").test_client().get("/metrics").status_code == 200


def test_web_config_file_of_the_config_is_enforced(tmp_path):
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  alice: '{HASH}'\n")
    client = make_app(tmp_path, web_config_file=str(web)).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=basic("alice", PASSWORD)).status_code == 200


def test_request_body_over_the_limit_is_413(client):
    auth = basic("alice", PASSWORD)
    ok = client.post("/api/v1/query", data={"query": "anomaly_score"}, headers=auth)
    assert ok.status_code == 200
    resp = client.post("/api/v1/query", data={"query": "anomaly_score", "pad": "x" * 4096},
                       headers=auth)
    assert resp.status_code == 413
    assert resp.json["errorType"] == "bad_data"
    assert "at most 2048 bytes" in resp.json["error"]
    assert client.post("/metrics", data="x" * 4096, headers=auth).status_code == 413


def test_body_without_length_over_the_limit_is_413_not_500(tmp_path):
    app = make_app(tmp_path, web_max_request_bytes=2048)
    body = ("query=anomaly_score&pad=" + "x" * 4096).encode()
    resp = app.test_client().post(  # a chunked body, as a server hands it over de-chunked
        "/api/v1/query", input_stream=io.BytesIO(body),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        environ_overrides={"wsgi.input_terminated": True})
    assert resp.status_code == 413
    assert "at most 2048 bytes" in resp.json["error"]


def test_url_over_the_limit_is_414(client):
    auth = basic("alice", PASSWORD)
    resp = client.get("/api/v1/query?query=" + "a" * MAX_URL_BYTES, headers=auth)
    assert resp.status_code == 414
    assert "URL too long" in resp.json["error"]
    assert client.get("/metrics?" + "a" * MAX_URL_BYTES).status_code == 414


def test_refused_requests_are_counted_by_reason(tmp_path):
    web = WebConfig(users={"alice": HASH})
    app = make_app(tmp_path, web, web_max_request_bytes=2048)
    client = app.test_client()
    auth = basic("alice", PASSWORD)
    client.get("/metrics")
    client.get("/metrics", headers=basic("alice", "guess"))
    client.post("/api/v1/query", data={"pad": "x" * 4096}, headers=auth)
    client.get("/api/v1/query?query=" + "a" * MAX_URL_BYTES, headers=auth)
    client.get("/api/v1/query", query_string={"query": "1+1"}, headers=auth)  # not refused
    sample = app.extensions["promvae"].metrics_registry.get_sample_value
    counts = {r: sample("promvae_http_requests_refused_total", {"reason": r})
              for r in ("unauthorized", "too_large", "uri_too_long")}
    assert counts == {"unauthorized": 2, "too_large": 1, "uri_too_long": 1}
    text = client.get("/metrics", headers=auth).get_data(as_text=True)
    assert 'promvae_http_requests_refused_total{reason="unauthorized"} 2.0' in text
