"""deploy/helm/promvae rendered by Helm's own engine (helm-python-sdk) and checked against schemas.

Kubernetes resources are validated strictly with kubernetes-validate (the cluster's OpenAPI
schemas); PodMonitor and PrometheusRule with models generated from the Prometheus Operator's
CRDs (cloudcoil), where a field the schema does not know is an error too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as operator

from grafana_plugin_backend.config.settings import load_config

helm = pytest.importorskip("helm_python.chart", reason="helm-python-sdk is a test dependency")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "promvae"
KUBE_VERSION = "1.30.0"
OPERATOR = {"PodMonitor": operator.PodMonitor, "PrometheusRule": operator.PrometheusRule}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values or {}, name="promvae", namespace="monitoring", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def only(docs: list[dict], kind: str) -> dict:
    (d,) = by_kind(docs, kind)
    return d


def _same(model: Any, doc: Any, where: str = "") -> None:
    """Every field of `doc` survived validation: none unknown to the schema, none coerced."""
    if isinstance(doc, dict):
        assert isinstance(model, dict), where
        for k, v in doc.items():
            assert k in model, f"{where}.{k}: not in the operator's schema"
            _same(model[k], v, f"{where}.{k}")
    elif isinstance(doc, list):
        assert isinstance(model, list) and len(model) == len(doc), where
        for i, (m, d) in enumerate(zip(model, doc)):
            _same(m, d, f"{where}[{i}]")
    else:
        assert model == doc, (where, model, doc)


def validate(docs: list[dict]) -> None:
    for d in docs:
        if d["kind"] in OPERATOR:
            model = OPERATOR[d["kind"]].model_validate(d)
            _same(model.model_dump(by_alias=True, exclude_unset=True, mode="json"), d,
                  d["kind"])
        else:
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)


VARIANTS = {
    "defaults": {},
    "one shard, no operator, no persistence": {
        "shards": 1, "podMonitor": {"enabled": False}, "prometheusRule": {"enabled": False},
        "persistence": {"enabled": False}, "dashboards": {"enabled": False}},
    "web config with TLS, explicit resources": {
        "webConfig": {"content": "tls_server_config: {cert_file: a, key_file: b}\n",
                      "tls": True},
        "resources": {"requests": {"memory": "1Gi"}}, "podMonitor": {"labels": {"r": "x"}}},
}


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_rendered_resource_is_valid(values):
    docs = render(values)
    assert docs
    validate(docs)


def test_a_bad_resource_fails_validation():
    """The validators are not lenient: an unknown field and a wrong type are both errors."""
    docs = render()
    sts = only(docs, "StatefulSet")
    sts["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate([sts])
    pm = only(docs, "PodMonitor")
    pm["spec"]["podMetricsEndpoints"][0]["honorLabel"] = True
    with pytest.raises(AssertionError, match="not in the operator's schema"):
        validate([pm])


def test_statefulset_of_shards_with_a_volume_each_and_headless_service():
    docs = render({"shards": 4})
    sts = only(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 4
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert "--shard.count=4" in c["args"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in \
        c["env"]  # the index is the pod's ordinal
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/var/lib/promvae"} in c["volumeMounts"]
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert set(services) == {"promvae", "promvae-headless"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/-/ready"


@pytest.mark.parametrize("shards, series, base, per, request_mi", [
    (3, 3000, 400, 1024, 400 + 1000), (4, 10_000, 400, 1024, 400 + 2500),
    (3, 1000, 300, 512, 300 + 167)])  # 334 series per shard x 0.5 Mi, rounded up
def test_memory_request_follows_the_series_per_shard(shards, series, base, per, request_mi):
    docs = render({"shards": shards, "expectedSeries": series,
                   "memory": {"baseMi": base, "perSeriesKi": per, "limitPercent": 150}})
    (c,) = only(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["requests"]["memory"] == f"{request_mi}Mi"
    assert c["resources"]["limits"]["memory"] == f"{request_mi * 150 // 100}Mi"


def test_the_config_map_is_a_valid_promvae_config(tmp_path):
    docs = render({"config": {"queries": [{"name": "x", "expr": "up"}], "step": "30s",
                              "storage_path": "/elsewhere"}})
    (text,) = [d["data"]["promvae.yml"] for d in by_kind(docs, "ConfigMap")
               if "promvae.yml" in d["data"]]
    path = tmp_path / "promvae.yml"
    path.write_text(text)
    cfg = load_config(path, environ={})
    assert cfg.step == 30 and [q.name for q in cfg.queries] == ["x"]
    assert cfg.storage_path == "/var/lib/promvae"  # the volume's mount point wins


def test_dashboards_are_the_repositorys_labelled_for_the_sidecar():
    shipped = sorted((ROOT / "dashboards" / "grafana").glob("*.json"))
    linked = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert [p.name for p in linked] == [p.name for p in shipped], \
        "link every dashboards/grafana/*.json into deploy/helm/promvae/files/dashboards"
    maps = [d for d in by_kind(render(), "ConfigMap") if "grafana_dashboard" in
            d["metadata"]["labels"]]
    assert len(maps) == len(shipped)
    got = {name: text for m in maps for name, text in m["data"].items()}
    for p in shipped:
        assert got[p.name] == p.read_text().rstrip("\n"), p.name  # the same bytes
        json.loads(got[p.name])
    assert all(m["metadata"]["labels"]["grafana_dashboard"] == "1" for m in maps)


def test_prometheus_rule_carries_the_shipped_alert_rules():
    shipped = yaml.safe_load((ROOT / "dashboards" / "prometheus" / "anomaly-rules.yml")
                             .read_text())
    rule = only(render(), "PrometheusRule")
    assert rule["spec"]["groups"] == shipped["groups"]
    pm = only(render(), "PodMonitor")
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["honorLabels"] is True  # source job/instance labels survive
    assert {"targetLabel": "job", "replacement": "promvae"} in ep["relabelings"]


def test_web_config_secret_is_mounted_and_tls_switches_probes_to_https():
    docs = render({"webConfig": {"content": "basic_auth_users: {}\n", "tls": True}})
    secret = only(docs, "Secret")
    assert secret["stringData"]["web-config.yml"].strip() == "basic_auth_users: {}"
    spec = only(docs, "StatefulSet")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert "--web.config.file=/etc/promvae/web/web-config.yml" in c["args"]
    assert {"name": "web", "secret": {"secretName": secret["metadata"]["name"]}} in \
        spec["volumes"]
    assert c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert only(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["scheme"] == "https"
    docs = render({"webConfig": {"existingSecret": "mine"}})
    assert not by_kind(docs, "Secret")
    assert {"name": "web", "secret": {"secretName": "mine"}} in \
        only(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]


def test_optional_parts_can_be_left_out():
    docs = render(VARIANTS["one shard, no operator, no persistence"])
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"PodMonitor", "PrometheusRule", "Secret"}
    sts = only(docs, "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "data", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]
    assert len(by_kind(docs, "ConfigMap")) == 1  # promvae.yml only


def test_helm_lint_finds_no_errors():
    report = helm.lint(CHART, strict=True, kube_version="v" + KUBE_VERSION)
    assert not report.get("errors"), report
    assert all(m["severity"] < 2 for m in report.get("messages") or []), report
