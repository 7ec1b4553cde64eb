"""`promvae serve --web.config.file` for real: HTTPS, basic auth, client certificates, limits."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import pytest
import requests
import trustme

from tests.promstack import PromvaeProcess
from tests.service_fixtures import write_server_pki

PASSWORD = "tls-integration-pw"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
# The demo trains on start; keep it small so the auth checks do not wait on CPU.
TINY_ENV = {"PROMVAE_WINDOW": "16", "PROMVAE_HISTORY": "2h", "PROMVAE_MODEL_HIDDEN": "8",
            "PROMVAE_MODEL_LATENT": "2", "PROMVAE_MODEL_MAX_EPOCHS": "1",
            "PROMVAE_MODEL_MAX_STEPS": "2", "PROMVAE_MODEL_MC_SAMPLES": "2"}


class Served(PromvaeProcess):
    """A running `promvae serve` over HTTPS with the web config `web_config` (YAML text)."""

    def __init__(self, tmp: Path, web_config: str) -> None:
        web = tmp / "web.yml"
        web.write_text(web_config)
        super().__init__(tmp, args=["--web.config.file", str(web)], env=TINY_ENV,
                         scheme="https")
        self.start()

    def wait_healthy(self, **kwargs: object) -> None:
        self.wait_ready(timeout=60, path="/-/healthy", **kwargs)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca, files = write_server_pki(d)
    files.update(client=d / "client.pem", rogue_client=d / "rogue-client.pem")
    ca.issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(files["client"])
    trustme.CA().issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(
        files["rogue_client"])  # a client certificate from another CA
    return {k: str(v) for k, v in files.items()}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str], Served]]:
    started: list[Served] = []

    def start(web_config: str) -> Served:
        workdir = tmp_path / f"promvae{len(started)}"
        workdir.mkdir()
        s = Served(workdir, web_config)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            s.stop()


def test_https_with_basic_auth(serve, pki):
    s = serve(f"tls_server_config:\n  cert_file: {pki['cert']}\n  key_file: {pki['key']}\n"
              f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    s.wait_healthy(verify=pki["ca"])

    def get(path: str, method: str = "GET", **kwargs: object) -> requests.Response:
        # verify= on each call: a Session's verify loses to REQUESTS_CA_BUNDLE.
        return requests.request(method, s.url + path, verify=pki["ca"], timeout=10, **kwargs)

    resp = get("/metrics")
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="promvae"'
    assert get("/metrics", auth=("prometheus", "wrong")).status_code == 401
    assert get("/api/v1/status/models", auth=("nobody", PASSWORD)).status_code == 401
    resp = get("/metrics", auth=("prometheus", PASSWORD))
    assert resp.status_code == 200 and "promvae_series" in resp.text
    assert get("/-/healthy").status_code == 200
    assert get("/-/ready").status_code in (200, 503)

    # Oversized requests are refused by the server before the app: 413/414, never 500.
    # The body is announced, not sent: the server answers before reading it, and a client
    # still writing a 2 MiB body would see the connection closed under it (a race).
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    with socket.create_connection(("127.0.0.1", s.port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        token = base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
        tls.sendall(b"POST /api/v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Authorization: Basic " + token.encode() + b"\r\n"
                    b"Content-Type: application/x-www-form-urlencoded\r\n"
                    b"Content-Length: " + str(2 * 1024 * 1024).encode() + b"\r\n\r\n")
        status_line = tls.recv(4096).split(b"\r\n", 1)[0]
    assert b" 413 " in status_line, status_line
    long_url = get(f"/api/v1/query?query={'a' * 100_000}", auth=("prometheus", PASSWORD))
    assert long_url.status_code == 414

    # Plain HTTP to the TLS port gets a plain 400 saying so, and no data.
    plain = requests.get(f"http://127.0.0.1:{s.port}/metrics", timeout=10)
    assert plain.status_code == 400 and "HTTPS only" in plain.text
    assert "promvae_" not in plain.text

    # A client that connects and says nothing does not hold up the others: the request below
    # is answered while the silent connection is still open (the handshake waits in a worker,
    # not in the accept loop, where it would block until the server timed the client out).
    with socket.create_connection(("127.0.0.1", s.port)) as silent:
        assert get("/-/healthy").status_code == 200
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open, nothing received: not timed out
            silent.recv(1)

    with pytest.raises(requests.exceptions.SSLError):  # the server's CA is not trusted
        requests.get(f"{s.url}/-/healthy", timeout=10)

    assert s.stop() == 0
    log = s.log.read_text()
    assert f"listening on https://127.0.0.1:{s.port}" in log
    assert PASSWORD not in log and HASH not in log
    assert "Traceback" not in log


def test_client_certificate_required(serve, pki):
    s = serve(f"tls_server_config:\n  cert_file: {pki['cert']}\n  key_file: {pki['key']}\n"
              f"  client_auth_type: RequireAndVerifyClientCert\n"
              f"  client_ca_file: {pki['ca']}\n")
    s.wait_healthy(verify=pki["ca"], cert=pki["client"])
    for cert in (None, pki["rogue_client"]):  # no certificate, or one from another CA
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{s.url}/metrics", verify=pki["ca"], cert=cert, timeout=10)
    resp = requests.get(f"{s.url}/metrics", verify=pki["ca"], cert=pki["client"], timeout=10)
    assert resp.status_code == 200
    assert s.stop() == 0
