"""Config: YAML, environment and flags build one validated object; one message names bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grafana_plugin_backend.config.base import ConfigError, format_duration, parse_duration
from grafana_plugin_backend.config.settings import load_config

GOOD = """
prometheus:
  url: http://prom:9090
  timeout: 10s
step: 30s
history: 2d
window: 64
poll_every: 30s
retrain_every: 12h
queries:
  - name: cpu_busy
    expr: 1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[5m]))
model:
  max_epochs: 5
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "promvae.yml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,seconds", [
    ("60s", 60), ("7d", 7 * 86400), ("24h", 86400), ("1h30m", 5400), ("500ms", 0.5),
    ("2w", 14 * 86400), ("90", 90), (45, 45), (1.5, 1.5),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "7x", "1h 30m", "-5s", "h", "1.2.3s", True, "nan"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.integers(min_value=1, max_value=10**9))
def test_format_duration_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_defaults_without_file_run_the_demo():
    cfg = load_config(None, environ={})
    assert cfg.demo
    assert (cfg.step, cfg.history, cfg.window, cfg.poll_every) == (60, 7 * 86400, 120, 60)
    assert cfg.retrain_every == 86400 and cfg.listen_address == ":8080"
    assert cfg.vae_config().window == 120


def test_yaml_file(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), environ={})
    assert not cfg.demo
    assert cfg.prometheus.url == "http://prom:9090" and cfg.prometheus.timeout == 10
    assert (cfg.step, cfg.history, cfg.window) == (30, 2 * 86400, 64)
    assert [q.name for q in cfg.queries] == ["cpu_busy"]
    vae = cfg.vae_config()
    assert vae.window == 64 and vae.max_epochs == 5


def test_env_overrides_file_and_flags_override_env(tmp_path):
    env = {"PROMVAE_STEP": "2m", "PROMVAE_PROMETHEUS_URL": "https://other:9090",
           "PROMVAE_PROMETHEUS_BASIC_AUTH_USERNAME": "bob", "PROMVAE_MODEL_MAX_EPOCHS": "7",
           "PROMVAE_LISTEN_ADDRESS": ":9999", "PROMVAE_PROMETHEUS_TLS_CONFIG_INSECURE_SKIP_VERIFY":
           "true", "PROMVAE_TEST_PROMETHEUS": "/usr/bin/prometheus"}  # unrelated: ignored
    cfg = load_config(write(tmp_path, GOOD), environ=env,
                      overrides={"listen_address": "127.0.0.1:7070", "storage_path": None})
    assert cfg.step == 120
    assert cfg.prometheus.url == "https://other:9090"
    assert cfg.prometheus.basic_auth.username == "bob"
    assert cfg.prometheus.tls_config.insecure_skip_verify is True
    assert cfg.vae_config().max_epochs == 7
    assert cfg.listen_address == "127.0.0.1:7070"  # flag beats env
    assert cfg.storage_path == "data"  # a flag left unset does not override


def test_queries_from_env_as_yaml():
    env = {"PROMVAE_PROMETHEUS_URL": "http://p:9090",
           "PROMVAE_QUERIES": '[{name: up, expr: "up{job=\\"node\\"}"}]'}
    cfg = load_config(None, environ=env)
    assert cfg.queries[0].name == "up" and cfg.queries[0].expr == 'up{job="node"}'


def test_one_message_names_every_bad_key(tmp_path):
    text = """
prometheus:
  url: ftp://prom
  timout: 5s
step: 1.5s
history: 7x
window: two
poll_every: -1
frobnicate: 1
queries:
  - name: a
    expr: rate(foo[5m]
  - name: a
    expr: up
  - {name: "bad name", expr: up}
model:
  epochz: 3
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={"PROMVAE_MODEL_LATENT": "x"})
    msg = str(info.value)
    for key in ("prometheus.url", "prometheus.timout", "step", "history", "window", "poll_every",
                "frobnicate", "queries[0].expr", "duplicate name 'a'", "queries[2].name",
                "model.epochz", "model.latent"):
        assert key in msg, key
    assert msg.startswith(f"invalid config file {tmp_path / 'promvae.yml'}")
    assert len(info.value.errors) >= 12


def test_secrets_stay_out_of_errors(tmp_path):
    text = ("prometheus: {url: http://p:9090, basic_auth: {username: u, password: [hunter2]}}\n"
            "queries: [{name: a, expr: up}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert "prometheus.basic_auth.password" in str(info.value)
    assert "hunter2" not in str(info.value)
    cfg = load_config(None, environ={"PROMVAE_PROMETHEUS_URL": "http://p:9090",
                                     "PROMVAE_QUERIES": "[{name: a, expr: up}]",
                                     "PROMVAE_PROMETHEUS_BASIC_AUTH_USERNAME": "u",
                                     "PROMVAE_PROMETHEUS_BASIC_AUTH_PASSWORD": "hunter2"})
    assert "hunter2" not in repr(cfg)


@pytest.mark.parametrize("text,key", [
    ("queries: [{name: a, expr: up}]\n", "prometheus.url"),
    ("prometheus: {url: 'http://p:9090'}\n", "queries"),
    (("prometheus: {url: 'http://p:9090', bearer_token_file: /nonexistent/token}\n"
     "queries: [{name: a, expr: up}]\n"), "prometheus.bearer_token_file"),
    ("history: 1h\n", "history"),
    ("model: {window: 10}\n", "model.window"),
    ("model: {risk: 2.0}\n", "model"),
    ("listen_address: 8080\n", "listen_address"),
    ("log_level: loud\n", "log_level"),
    ("- just\n- a list\n", "top level"),
    ("step: [1, 2\n", "not valid YAML"),
])
def test_single_problems(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert key in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yml", environ={})


def test_example_config_is_valid():
    example = Path(__file__).resolve().parents[2] / "promvae.example.yml"
    cfg = load_config(example, environ={})
    names = [q.name for q in cfg.queries]
    assert {"cpu_busy", "memory_available"} <= set(names)
    assert any("disk" in n for n in names) and any("network" in n for n in names)


def test_window_sized_model_defaults_follow_the_window():
    from detector import VAEConfig

    cfg = load_config(None, environ={"PROMVAE_WINDOW": "16"})
    vae = cfg.vae_config()
    assert vae.window == 16
    assert vae.score_scales == (16, 8)
    assert load_config(None, environ={}).vae_config() == VAEConfig()  # defaults untouched


def test_tls_files_are_loaded_as_a_certificate_and_its_key(tmp_path):
    """A CA file that holds no certificate, or a key that is not the certificate's, is refused
    when the config loads (not at the first poll, as a vague connection error)."""
    import trustme

    ca = trustme.CA()
    leaf, other = ca.issue_cert("promvae.example"), trustme.CA().issue_cert("x.example")
    files = {"ca": ca.cert_pem, "cert": leaf.cert_chain_pems[0], "key": leaf.private_key_pem,
             "other_key": other.private_key_pem}
    for name, pem in files.items():
        pem.write_to_path(tmp_path / f"{name}.pem")
    (tmp_path / "x.pem").write_text("x")

    def errors(**tls: str) -> list[str]:
        tls = {k: str(tmp_path / f"{v}.pem") for k, v in tls.items()}
        try:
            load_config(None, environ={}, overrides={
                "prometheus.url": "https://p:9090", "queries": [{"name": "q", "expr": "up"}],
                "prometheus.tls_config": tls})
        except ConfigError as e:
            return e.errors
        return []

    assert errors(ca_file="ca", cert_file="cert", key_file="key") == []
    for bad in ("x", "key"):  # not a certificate; a private key instead of the CA
        (msg,) = errors(ca_file=bad)
        assert msg.startswith("prometheus.tls_config.ca_file:") and "no PEM certificate" in msg
    (msg,) = errors(cert_file="cert", key_file="other_key")
    assert "cert_file" in msg and "its unencrypted PEM private key" in msg
    (msg,) = errors(cert_file="x", key_file="key")
    assert "cert_file" in msg
