"""The OpenAPI document (grafana_plugin_backend/web/openapi.yaml) matches the routes the app serves."""

from __future__ import annotations

import re

import pytest
import yaml

from grafana_plugin_backend.web.app import create_app
from tests.service_fixtures import make_config

METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture
def app(tmp_path):
    return create_app(make_config(tmp_path))


@pytest.fixture
def doc(app) -> dict:
    resp = app.test_client().get("/api/v1/openapi.yaml")
    assert resp.status_code == 200 and resp.mimetype == "application/yaml"
    return yaml.safe_load(resp.get_data(as_text=True))


def served(app) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule.rule)
        out |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


def documented(doc: dict) -> set[tuple[str, str]]:
    return {(path, m) for path, item in doc["paths"].items() for m in item if m in METHODS}


def test_every_route_is_documented_and_every_documented_route_exists(app, doc):
    assert doc["openapi"].startswith("3.0")
    assert served(app) - documented(doc) == set(), "routes missing from openapi.yaml"
    assert documented(doc) - served(app) == set(), "documented routes the app does not serve"


def test_path_parameters_match_the_routes(doc):
    for path, item in doc["paths"].items():
        names = set(re.findall(r"{([^}]+)}", path))
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if "$ref" not in p and p["in"] == "path"}
            assert declared == names, (path, method)


def test_every_reference_resolves(doc):
    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                target = doc
                for part in ref.removeprefix("#/").split("/"):
                    target = target[part]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(doc)


def test_error_types_are_prometheus_ones(doc):
    enum = doc["components"]["schemas"]["Error"]["properties"]["errorType"]["enum"]
    assert set(enum) == {"bad_data", "execution", "timeout", "canceled", "internal",
                         "unavailable", "not_found"}
