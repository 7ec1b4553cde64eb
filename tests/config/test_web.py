"""The exporter-toolkit web config: parsing, every refusal, the TLS context it builds."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import bcrypt
import pytest

from grafana_plugin_backend.cli import main
from grafana_plugin_backend.config.base import ConfigError
from grafana_plugin_backend.config.settings import load_config
from grafana_plugin_backend.config.web import WebConfig, load_web_config
from tests.service_fixtures import write_server_pki

PASSWORD = "hunter2-web"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM files: a CA, a server cert/key for 127.0.0.1, and a key of another cert."""
    d = tmp_path_factory.mktemp("pki")
    ca, files = write_server_pki(d)
    files.update(other_key=d / "other-key.pem", garbage=d / "garbage.pem")
    ca.issue_cert("other.example").private_key_pem.write_to_path(files["other_key"])
    files["garbage"].write_text("not a certificate\n")
    return {k: str(v) for k, v in files.items()}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return str(path)


def test_full_file_parses_and_builds_a_verifying_tls_context(tmp_path, pki, caplog):
    path = write(tmp_path, f"""
tls_server_config:
  cert_file: {pki['cert']}
  key_file: {pki['key']}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki['ca']}
  min_version: TLS13
  cipher_suites: [TLS_AES_128_GCM_SHA256]
http_server_config:
  http2: true
  headers:
    X-Frame-Options: deny
basic_auth_users:
  alice: '{HASH}'
""")
    with caplog.at_level(logging.WARNING):
        web = load_web_config(path)
    assert web.scheme == "https"
    assert web.users == {"alice": HASH}
    assert web.headers == {"X-Frame-Options": "deny"}
    assert web.tls.client_auth_type == "RequireAndVerifyClientCert"
    ctx = web.tls.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert "cipher_suites" in caplog.text and "http2" in caplog.text
    assert HASH not in repr(web) and HASH not in web.describe()
    assert "RequireAndVerifyClientCert" in web.describe()


def test_defaults_no_client_certs_and_tls12(tmp_path, pki):
    web = load_web_config(write(tmp_path, f"tls_server_config:\n  cert_file: {pki['cert']}\n"
                                          f"  key_file: {pki['key']}\n"))
    ctx = web.tls.ssl_context()
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not web.users


@pytest.mark.parametrize("text", ["", "{}\n", "basic_auth_users:\n"])
def test_empty_file_means_plain_http_without_auth(tmp_path, text):
    assert load_web_config(write(tmp_path, text)) == WebConfig(path=str(tmp_path / "web.yml"))


BAD = [
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\nrate: 1\n",
     "rate: unknown key"),
    ("tls_server_config: [1]\n", "tls_server_config: must be a mapping"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  color: red\n",
     "tls_server_config.color: unknown key"),
    ("tls_server_config:\n  cert_file: {cert}\n", "tls_server_config.key_file: required"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_auth_type: Maybe\n",
     "client_auth_type: must be one of"),
    (("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAnyClientCert\n"), "RequireAnyClientCert is not supported"),
    (("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n"), "client_ca_file: required"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: {ca}\n",
     "does not verify client certificates"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: SSL3\n",
     "min_version: must be one of"),
    (("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS13\n"
     "  max_version: TLS12\n"), "min_version TLS13 is above max_version TLS12"),
    ("tls_server_config:\n  cert_file: /nonexistent/cert.pem\n  key_file: {key}\n",
     "cert_file: cannot read '/nonexistent/cert.pem'"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {other_key}\n",
     "the key does not belong to the certificate"),
    ("tls_server_config:\n  cert_file: {garbage}\n  key_file: {key}\n",
     "tls_server_config: cannot use cert_file"),
    (("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {garbage}\n"),
     "client_ca_file: cannot use"),
    ("tls_server_config:\n  cert: inline\n  key_file: {key}\n", "inline PEM is not supported"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_allowed_sans: [a]\n",
     "client_allowed_sans: not supported"),
    ("tls_server_config:\n  cert_file: [a]\n  key_file: {key}\n", "cert_file: must be a string"),
    ("http_server_config:\n  keepalive: true\n", "http_server_config.keepalive: unknown key"),
    ("http_server_config:\n  headers:\n    Set-Cookie: a=b\n", "headers.Set-Cookie: not allowed"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: [deny]\n", "one-line string"),
    ("basic_auth_users: [alice]\n", "basic_auth_users: must be a mapping"),
    ("basic_auth_users:\n  'al:ice': '" + HASH + "'\n", "without ':'"),
    ("basic_auth_users:\n  alice: 12345\n", "basic_auth_users.alice: not a bcrypt hash"),
    ("- a\n", "top level must be a mapping"),
    ("a: [\n", "not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_file_is_refused_naming_the_key(tmp_path, pki, text, message):
    with pytest.raises(ConfigError) as err:
        load_web_config(write(tmp_path, text.format(**pki)))
    assert message in str(err.value)
    assert str(tmp_path / "web.yml") in str(err.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*No such file"):
        load_web_config(tmp_path / "absent.yml")


def test_every_bad_key_is_reported_at_once_and_secrets_are_not_echoed(tmp_path, pki):
    text = ("colour: blue\nhttp_server_config:\n  keepalive: 1\nbasic_auth_users:\n"
            "  alice: plaintext-pw-oops\n  bob: '" + HASH[:-1] + "'\n")
    with pytest.raises(ConfigError) as err:
        load_web_config(write(tmp_path, text))
    assert len(err.value.errors) == 4
    assert "plaintext-pw-oops" not in str(err.value)
    assert HASH[:-1] not in str(err.value)
    assert "bcrypt.hashpw" in str(err.value)  # tells how to make a hash


def test_config_key_env_var_and_flag_are_validated(tmp_path, pki):
    good = write(tmp_path, f"basic_auth_users:\n  alice: '{HASH}'\n")
    cfg = load_config(None, environ={"PROMVAE_WEB_CONFIG_FILE": good})
    assert cfg.web_config_file == good
    bad = tmp_path / "bad.yml"
    bad.write_text("basic_auth_users:\n  alice: nope\n")
    with pytest.raises(ConfigError, match=f"web_config_file {bad}: basic_auth_users.alice"):
        load_config(None, environ={}, overrides={"web_config_file": str(bad)})
    with pytest.raises(ConfigError, match="web_max_request_bytes: must be at least 1024"):
        load_config(None, environ={}, overrides={"web_max_request_bytes": "10"})


def test_cli_refuses_a_bad_web_config_with_exit_1(tmp_path, pki, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("tls_server_config:\n  cert_file: /nonexistent.pem\n  key_file: x\n")
    assert main(["serve", "--web.config.file", str(bad),
                 "--storage.path", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "cert_file: cannot read '/nonexistent.pem'" in err
    assert "Traceback" not in err
    conf = tmp_path / "promvae.yml"
    conf.write_text("window: 16\n")
    assert main(["check-config", str(conf), "--web.config.file", str(bad)]) == 1
    good = write(tmp_path, f"tls_server_config:\n  cert_file: {pki['cert']}\n"
                           f"  key_file: {pki['key']}\nbasic_auth_users:\n  alice: '{HASH}'\n")
    assert main(["check-config", str(conf), "--web.config.file", good]) == 0
    out = capsys.readouterr().out
    assert "https" in out and "1 basic auth users" in out and HASH not in out


def test_example_file_is_valid():
    example = Path(__file__).resolve().parents[2] / "dashboards/promvae/web-config.example.yml"
    web = load_web_config(example)
    assert list(web.users) == ["prometheus"]
    assert bcrypt.checkpw(b"change-me", web.users["prometheus"].encode())
    assert web.tls is None
