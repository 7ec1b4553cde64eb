"""The shipped Prometheus rules, Prometheus config and Alertmanager config, checked by the real
promtool and amtool (Debian packages `prometheus` and `prometheus-alertmanager`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.promstack import require_binary

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "dashboards" / "prometheus"
AM_CONFIG = ROOT / "dashboards" / "alertmanager" / "alertmanager.yml"
RULES = PROM_DIR / "anomaly-rules.yml"
RULE_TESTS = PROM_DIR / "anomaly-rules.test.yml"
EXPECTED_ALERTS = {"AnomalyDetected", "AnomalyScoreVeryHigh", "PromvaeDown", "PromvaePollFailing",
                   "PromvaeTrainingFailing", "PromvaeScoresStale"}


def _tool(env: str, default: str, package: str) -> str:
    path = os.environ.get(env, default)
    if not os.access(path, os.X_OK):
        found = shutil.which(Path(default).name)
        if found is None:
            return require_binary(default, package)  # skips, or fails under CI=true
        path = found
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("PROMVAE_TEST_PROMTOOL", "/usr/bin/promtool", "prometheus")


@pytest.fixture(scope="module")
def amtool() -> str:
    return _tool("PROMVAE_TEST_AMTOOL", "/usr/bin/amtool", "prometheus-alertmanager")


def run(*cmd: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


def test_promtool_check_rules(promtool):
    assert "SUCCESS: 6 rules found" in ok(run(promtool, "check", "rules", RULES))


def test_promtool_unit_tests_pass(promtool):
    assert "SUCCESS" in ok(run(promtool, "test", "rules", RULE_TESTS.name, cwd=PROM_DIR))


def test_promtool_unit_tests_can_fail(promtool, tmp_path):
    # The same tests against rules with AnomalyDetected's `for` halved must fail (not vacuous).
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "AnomalyDetected":
                rule["for"] = "2m"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc))
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "AnomalyDetected" in result.stdout + result.stderr


def test_every_rule_has_unit_tests_firing_and_not_firing():
    doc = yaml.safe_load(RULE_TESTS.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    assert set(rules()) == EXPECTED_ALERTS
    assert firing == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


def test_rules_severity_and_links():
    for name, rule in rules().items():
        assert rule["labels"]["severity"] == "warning", name  # paging is opt-in
        assert rule["labels"]["component"] in ("anomaly", "promvae"), name
        assert rule["annotations"]["dashboard_uid"].startswith("promvae-"), name
        assert f"/d/{rule['annotations']['dashboard_uid']}/" in rule["annotations"]["dashboard"]
    assert "anomaly_flag" in rules()["AnomalyDetected"]["expr"]
    assert "promvae_last_successful_poll_timestamp_seconds" in rules()["PromvaeScoresStale"]["expr"]


def test_promtool_check_prometheus_config(promtool):
    out = ok(run(promtool, "check", "config", "prometheus.yml", cwd=PROM_DIR))
    assert "1 rule files found" in out


def test_prometheus_config_scrapes_promvae_with_honor_labels():
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["promvae"]["honor_labels"] is True
    assert jobs["promvae"]["static_configs"][0]["targets"] == ["promvae:8080"]
    assert jobs["node"]["static_configs"][0]["targets"] == ["node-exporter:9100"]
    assert cfg["rule_files"] == ["anomaly-rules.yml"]
    targets = cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]


def test_amtool_check_config(amtool):
    out = ok(run(amtool, "check-config", AM_CONFIG))
    assert "SUCCESS" in out and "1 inhibit rules" in out


@pytest.mark.parametrize(("labels", "receivers"), [
    (["component=anomaly", "severity=warning", "anomaly_query=cpu_busy", "instance=a"],
     "oncall-webhook"),
    (["component=anomaly", "severity=page", "anomaly_query=cpu_busy", "instance=a"],
     "pager,oncall-webhook"),
    (["component=promvae", "severity=warning", "alertname=PromvaeDown"], "oncall-webhook"),
])
def test_amtool_routes(amtool, labels, receivers):
    out = ok(run(amtool, "config", "routes", "test", f"--config.file={AM_CONFIG}",
                 f"--verify.receivers={receivers}", *labels))
    assert out.splitlines()[0] == receivers


def test_alertmanager_groups_anomalies_and_inhibits_them_while_promvae_is_unhealthy():
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    anomaly = [r for r in cfg["route"]["routes"] if r["matchers"] == ['component="anomaly"']]
    assert anomaly and anomaly[0]["group_by"] == ["anomaly_query", "instance"]
    (inhibit,) = cfg["inhibit_rules"]
    assert inhibit["target_matchers"] == ['component="anomaly"']
    source = " ".join(inhibit["source_matchers"])
    for alert in ("PromvaeDown", "PromvaePollFailing", "PromvaeScoresStale"):
        assert alert in source
