"""The shipped Grafana dashboards, provisioning and alert rules: valid, parseable PromQL, and
only metric names a running promvae exposes (read from a live /metrics, not a hand list)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from grafana_plugin_backend.web.app import Service, create_app
from tests.service_fixtures import T0, FakeClock, FakeSource, make_config, seasonal

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "dashboards" / "grafana"
PROVISIONING = GRAFANA / "provisioning"
PROM_RULES = ROOT / "dashboards" / "prometheus" / "anomaly-rules.yml"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))
UIDS = {"promvae-overview", "promvae-drilldown", "promvae-health"}
SOURCE_DS = "prometheus"  # uid of the source Prometheus datasource
# Prometheus' own synthetic series: allowed only in expressions evaluated by the source
# Prometheus (its alert rules, Grafana rules on the source datasource), never in dashboards.
SOURCE_ONLY = {"up"}
# What Grafana substitutes before sending a query (concrete stand-ins).
GRAFANA_VARS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h",
                "__range_s": "3600", "__interval_ms": "60000",
                # the drill-down's series variable: a label set as its query_result regex cuts it
                "series": 'anomaly_query="value",device="value",instance="value"'}


# ------------------------------------------------------------------------------------ helpers

def substitute(expr: str) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]) with concrete values."""
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return GRAFANA_VARS.get(name, "value")
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", repl, expr)


def label_values_selector(query: str) -> str | None:
    """The PromQL of a `label_values(selector, label)` or `query_result(expr)` variable query."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.DOTALL)
    m = m or re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.DOTALL)
    return m.group(1) if m else None


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next((m.value for m in node.matchers.matchers
                                      if m.name == "__name__"), None)
            assert name, f"selector without a metric name in {expr!r}"
            names.add(name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names


def node_types(expr: str) -> set[str]:
    seen: set[str] = set()
    promql_parser.walk(promql_parser.parse(expr),
                       pre_visit=lambda n: seen.add(type(n).__name__))
    return seen


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def dashboard_exprs(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation query and variable query."""
    for p in all_panels(dash["panels"]):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"]
    for a in dash["annotations"]["list"]:
        if a.get("expr"):
            yield f"annotation {a['name']!r}", a["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            selector = label_values_selector(q)
            assert selector is not None, f"variable {v['name']}: unsupported query {q!r}"
            yield f"variable {v['name']}", selector


def grafana_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROVISIONING / "alerting" / "promvae-rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def prometheus_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(PROM_RULES.read_text())["groups"] for r in g["rules"]]


def every_expr() -> Iterator[tuple[str, str, str]]:
    """(where, expr, datasource uid or '${datasource}') over dashboards and both rule sets."""
    for path in DASHBOARDS:
        for where, expr in dashboard_exprs(load_dashboard(path)):
            yield f"{path.name}: {where}", expr, "${datasource}"
    for r in grafana_rules():
        for d in r["data"]:
            if d["datasourceUid"] != "__expr__":
                yield f"grafana rule {r['title']} {d['refId']}", d["model"]["expr"], \
                    d["datasourceUid"]
    for r in prometheus_rules():
        yield f"prometheus rule {r['alert']}", r["expr"], SOURCE_DS


# ------------------------------------------------------------------------------------ live names

@pytest.fixture(scope="module")
def exposed_names(tmp_path_factory) -> set[str]:
    """Sample names on GET /metrics of the real app after a poll, a training and a poll."""
    clock = FakeClock()
    source = FakeSource(clock, start=T0 - 24 * 3600)
    source.set("metric_a", {"instance": "a", "job": "node"}, seasonal(seed=1))
    cfg = make_config(tmp_path_factory.mktemp("dashboards"))
    app = create_app(cfg, service=Service(cfg, source=source, clock=clock))
    svc = app.extensions["promvae"]
    svc.poller.poll_once()
    assert svc.trainer.run_once() == 1
    clock.advance(60)
    svc.poller.poll_once()
    text = app.test_client().get("/metrics").get_data(as_text=True)
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert "anomaly_score" in names and "promvae_poll_errors_total" in names, sorted(names)
    return names


# ------------------------------------------------------------------------------------ tests

def test_the_three_dashboards_exist_with_fixed_uids():
    uids = [load_dashboard(p)["uid"] for p in DASHBOARDS]
    assert sorted(uids) == sorted(UIDS)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path):
    dash = load_dashboard(path)
    assert "promvae" in dash["tags"]
    assert dash.get("id") is None  # provisioned dashboards must not pin a database id
    panels = list(all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    for link in dash["links"]:
        assert link["url"].removeprefix("/d/") in UIDS


@pytest.mark.parametrize(("where", "expr", "ds"),
                         [pytest.param(*e, id=e[0]) for e in every_expr()])
def test_every_expression_parses_and_uses_exposed_metrics(where, expr, ds, exposed_names):
    concrete = substitute(expr)
    assert "$" not in concrete, where
    try:
        names = metric_names(concrete)
    except ValueError as e:
        pytest.fail(f"{where}: {expr!r} does not parse: {e}")
    allowed = exposed_names | (SOURCE_ONLY if ds == SOURCE_DS else set())
    unknown = names - allowed
    assert not unknown, f"{where}: metrics not exposed by promvae: {sorted(unknown)}"


def test_the_checks_reject_bad_expressions(exposed_names):
    # The helpers above must be able to fail: a typo'd metric and a syntax error.
    assert metric_names(substitute('anomaly_scor{anomaly_query="$anomaly_query"}')) \
        - exposed_names == {"anomaly_scor"}
    with pytest.raises(ValueError):
        metric_names("sum by (instance (anomaly_score)")
    assert substitute("rate(x[$__rate_interval]) + ${foo:csv} + [[bar]]") == \
        "rate(x[5m]) + value + value"


def test_anomaly_dashboards_stay_in_the_query_api_subset():
    # They default to the promvae datasource: selectors on anomaly_*, comparisons with
    # scalars and aggregations only (DESIGN.md), no functions or range selectors.
    for path in DASHBOARDS:
        dash = load_dashboard(path)
        if dash["uid"] == "promvae-health":
            continue
        assert dash["templating"]["list"][0]["current"]["value"] == "promvae"
        for where, expr in dashboard_exprs(dash):
            concrete = substitute(expr)
            assert all(n.startswith("anomaly_") for n in metric_names(concrete)), where
            extra = node_types(concrete) - {"VectorSelector", "AggregateExpr", "BinaryExpr",
                                            "NumberLiteral", "ParenExpr"}
            assert not extra, f"{path.name} {where}: {sorted(extra)} in {expr!r}"


def test_health_dashboard_defaults_to_the_source_prometheus():
    dash = load_dashboard(GRAFANA / "promvae-health.json")
    assert dash["templating"]["list"][0]["current"]["value"] == SOURCE_DS
    text = json.dumps(dash)
    for name in ("promvae_poll_duration_seconds_bucket", "promvae_training_duration_seconds",
                 "promvae_poll_errors_total", "promvae_training_errors_total", "promvae_models",
                 "promvae_series_dropped_total", "promvae_last_successful_poll_timestamp_seconds"):
        assert name in text, name


def test_drilldown_band_threshold_and_flag_annotations():
    dash = load_dashboard(GRAFANA / "series-drilldown.json")
    panels = {p["title"]: p for p in dash["panels"]}
    band = panels["Observed and expected band"]
    legends = {t["refId"]: (t["expr"].split("{")[0], t["legendFormat"]) for t in band["targets"]}
    assert {e for e, _ in legends.values()} == {"anomaly_observed", "anomaly_expected",
                                                "anomaly_lower", "anomaly_upper"}
    fills = [(o["matcher"]["options"], prop["value"]) for o in band["fieldConfig"]["overrides"]
             for prop in o["properties"] if prop["id"] == "custom.fillBelowTo"]
    assert len(fills) == 1
    upper_ref, below = fills[0]
    assert legends[upper_ref][0] == "anomaly_upper"
    assert below == next(lg for e, lg in legends.values() if e == "anomaly_lower")
    score = panels["Anomaly score"]["fieldConfig"]["defaults"]
    assert score["custom"]["thresholdsStyle"]["mode"] != "off"
    assert [s["value"] for s in score["thresholds"]["steps"]] == [None, 1]
    (flag,) = [a for a in dash["annotations"]["list"] if a.get("expr")]
    assert re.fullmatch(r"anomaly_flag\{.*\} == 1", flag["expr"])
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names[:3] == ["datasource", "anomaly_query", "series"]


def test_overview_links_to_the_drilldown():
    dash = load_dashboard(GRAFANA / "anomaly-overview.json")
    text = json.dumps(dash)
    assert "/d/promvae-drilldown/" in text and "topk(" in text
    assert any(p["type"] == "state-timeline" and "anomaly_flag" in p["targets"][0]["expr"]
               for p in dash["panels"])


def test_datasources_provisioning():
    doc = yaml.safe_load((PROVISIONING / "datasources" / "promvae.yml").read_text())
    ds = {d["uid"]: d for d in doc["datasources"]}
    assert ds["promvae"]["type"] == "prometheus"
    assert ds["promvae"]["url"] == "http://promvae:8080"
    assert ds["promvae"]["jsonData"]["httpMethod"] == "POST"
    assert ds["promvae"]["jsonData"]["disableRecordingRules"] is True
    assert ds[SOURCE_DS]["type"] == "prometheus"
    assert ds[SOURCE_DS]["url"] == "http://prometheus:9090"
    assert sum(bool(d.get("isDefault")) for d in ds.values()) == 1


def test_dashboard_provider_provisioning():
    doc = yaml.safe_load((PROVISIONING / "dashboards" / "promvae.yml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/var/lib/grafana/dashboards")


def test_grafana_rules_mirror_the_prometheus_rules():
    prom = {r["alert"]: r for r in prometheus_rules()}
    graf = {r["title"]: r for r in grafana_rules()}
    assert set(graf) == set(prom)
    assert len({r["uid"] for r in graf.values()}) == len(graf)
    datasources = {d["uid"] for d in yaml.safe_load(
        (PROVISIONING / "datasources" / "promvae.yml").read_text())["datasources"]}
    for title, rule in graf.items():
        assert rule["labels"] == prom[title]["labels"], title
        assert rule["for"] == prom[title].get("for", "0s"), title
        steps = {d["refId"]: d for d in rule["data"]}
        cond = steps[rule["condition"]]
        assert cond["datasourceUid"] == "__expr__"
        assert cond["model"]["type"] == "threshold"
        reduced = steps[cond["model"]["expression"]]
        assert reduced["model"]["type"] == "reduce" and reduced["model"]["reducer"] == "last"
        query = steps[reduced["model"]["expression"]]
        assert query["datasourceUid"] in datasources
        for d in rule["data"]:
            assert d["model"]["refId"] == d["refId"]
            if d["datasourceUid"] == "__expr__":
                assert d["model"]["datasource"] == {"type": "__expr__", "uid": "__expr__"}
                (c,) = d["model"]["conditions"]
                assert set(c) == {"evaluator", "operator", "query", "reducer", "type"}
        assert rule["annotations"]["__dashboardUid__"] in UIDS


def test_alert_links_name_existing_dashboards():
    for r in prometheus_rules():
        assert r["annotations"]["dashboard_uid"] in UIDS


# ------------------------------------------------------------------ drill-down: any label set

@pytest.fixture(scope="module")
def disk_app(tmp_path_factory):
    """A real app whose query returns one series per device: instance alone does not tell
    them apart (node-exporter's disk metrics)."""
    clock = FakeClock()
    source = FakeSource(clock, start=T0 - 24 * 3600)
    for i, device in enumerate(("sda", "sdb", "nvme0n1")):
        source.set("disk_busy", {"instance": "host:9100", "device": device},
                   seasonal(seed=i))
    source.set("disk_busy", {"instance": "other:9100", "device": "sda"}, seasonal(seed=9))
    cfg = make_config(tmp_path_factory.mktemp("disk"),
                      queries=[{"name": "disk", "expr": "disk_busy"}])
    app = create_app(cfg, service=Service(cfg, source=source, clock=clock))
    svc = app.extensions["promvae"]
    svc.poller.poll_once()
    assert svc.trainer.run_once() == 4
    clock.advance(60)
    svc.poller.poll_once()
    return app


def grafana_query_result(client, query: str) -> list[str]:
    """What Grafana's query_result() variable lists: metric{k="v",...} value timestamp_ms,
    from an instant query, labels in the order of the JSON answer."""
    body = client.post("/api/v1/query", data={"query": query, "time": str(T0 + 60)}).get_json()
    out = []
    for r in body["data"]["result"]:
        m = dict(r["metric"])
        name = m.pop("__name__", "")
        labels = ",".join(f'{k}="{v}"' for k, v in m.items())
        out.append(f"{name}{{{labels}}} {r['value'][1]} {int(r['value'][0] * 1000)}")
    return out


def test_drilldown_picks_any_series_by_its_labels(disk_app):
    from grafana_plugin_backend.web.links import series_selector

    dash = load_dashboard(GRAFANA / "series-drilldown.json")
    var = {v["name"]: v for v in dash["templating"]["list"]}["series"]
    assert not var["multi"] and not var["includeAll"]  # panels show one series
    query = var["query"]["query"].replace("$anomaly_query", "disk")
    regex = re.compile(var["regex"].strip("/"))
    client = disk_app.test_client()
    options = [regex.search(text).group(1)
               for text in grafana_query_result(client, label_values_selector(query))]
    assert len(options) == 4 and all('device="' in o for o in options)
    svc = disk_app.extensions["promvae"]
    targets = [t["expr"] for p in all_panels(dash["panels"]) for t in p.get("targets", [])]
    assert targets and all("{$series}" in e for e in targets)
    for option in options:
        for expr in targets:
            body = client.post("/api/v1/query", data={
                "query": expr.replace("$series", option), "time": str(T0 + 60)}).get_json()
            assert body["status"] == "success", (expr, body)
            (r,) = [x for x in body["data"]["result"] if "metric" in x] or [None]
            assert r is not None, (option, expr)
        # The links promvae builds (status page, alert annotations) name the option itself.
        labels = dict(re.findall(r'(\w+)="([^"]*)"', option))
        s = svc.registry.get_by_labels("disk", {k: v for k, v in labels.items()
                                                if k != "anomaly_query"})
        assert s is not None and series_selector(s.exposed) == option


def test_anomaly_alerts_carry_observed_value_band_and_a_series_link():
    """Both rule sets: observed, expected and band annotations, and a drill-down link whose
    Series variable is built from every label (the Prometheus ones are executed by promtool
    in tests/test_alert_rules.py; Grafana's use the same link template)."""
    prom = {r["alert"]: r for r in prometheus_rules()}
    graf = {r["title"]: r for r in grafana_rules()}
    for title in ("AnomalyDetected", "AnomalyScoreVeryHigh"):
        p, g = prom[title]["annotations"], graf[title]["annotations"]
        for notes in (p, g):
            assert {"observed", "expected", "band", "dashboard"} <= set(notes), title
            assert "var-series=" in notes["dashboard"] and "range $k, $v := $labels" in \
                notes["dashboard"], title
        assert p["dashboard"] == g["dashboard"], title
        # Grafana: each $values reference is a reduce of the matching anomaly_* query.
        steps = {d["refId"]: d for d in graf[title]["data"]}
        for key, metric in (("observed", "anomaly_observed"), ("expected", "anomaly_expected"),
                            ("band", "anomaly_lower"), ("band", "anomaly_upper")):
            refs = re.findall(r"\$values\.(\w+)", g[key])
            assert refs, (title, key)
            queried = {steps[steps[r]["model"]["expression"]]["model"]["expr"] for r in refs}
            assert metric in queried, (title, key, queried)
