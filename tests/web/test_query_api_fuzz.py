"""Fuzzing the Prometheus-compatible query API with hostile requests.

The service runs in-process over a fake source with real (tiny) models, so the on-demand
scorer, the PromQL evaluator and the parameter parsing all run for real. Whatever the
request, the answer must be Prometheus' JSON envelope (never a 5xx, never a traceback), and
the app must keep answering.
"""

from __future__ import annotations

import json
import math
import string
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from werkzeug.datastructures import MultiDict

from grafana_plugin_backend.query.promql import MAX_COMPLEXITY
from grafana_plugin_backend.web.app import Service, create_app
from tests.service_fixtures import T0, FakeClock, FakeSource, make_config, seasonal

HOUR = 3600.0
ERROR_TYPES = {"bad_data", "execution", "timeout", "canceled", "internal", "unavailable",
               "not_found"}
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- strategies ---------------------------------------------------------------------------

METRICS = ["anomaly_score", "anomaly_flag", "anomaly_expected", "anomaly_lower", "anomaly_upper",
           "anomaly_observed", "up", "anomaly_nope", "__name__"]
TOKENS = METRICS + [
    "(", ")", "{", "}", "[", "]", ",", "=", "!=", "=~", "!~", "+", "-", "*", "/", "%", "^",
    "==", ">", "<", ">=", "<=", " bool ", " and ", " or ", " unless ", " by ", " without ",
    " on ", " ignoring ", " group_left ", " offset ", " @ ", "start()", "end()", ":", "5m",
    "1s", "0s", "100000000y", "-1h", "1e308", "-1e308", "1e309", "NaN", "Inf", "-Inf", "0x1F",
    "0", "1", "2", "18446744073709551617", '"a"', "'b'", "`c`", '".*"', '"(("', '""',
    "instance", "anomaly_query", "job", "sum", "avg", "min", "max", "count", "topk",
    "bottomk", "quantile", "rate", "time", "max_over_time", "last_over_time",
    "count_over_time", "absent", "label_replace", "histogram_quantile", "vector", "scalar",
    "\x00", "\u00e9", "\U0001f4a9", "#", "\n", " ",
]
SELECTOR = st.builds(
    lambda name, matchers: name + ("{" + ",".join(matchers) + "}" if matchers else ""),
    st.sampled_from(METRICS[:6] + [""]),
    st.lists(st.builds(lambda n, op, v: f"{n}{op}{json.dumps(v)}",
                       st.sampled_from(["instance", "anomaly_query", "job", "__name__", "x"]),
                       st.sampled_from(["=", "!=", "=~", "!~"]),
                       st.sampled_from(["a", ".*", "", "a|b", "(", "[", "\\", "é", "\x00"])
                       | st.text(max_size=6)),
             max_size=3),
)
RANGE = st.sampled_from(["[1m]", "[5m]", "[1h]", "[1d]", "[100y]", "[0s]", "[1ms]", "[9999999999999y]"])


def structured() -> st.SearchStrategy[str]:
    """Mostly well-formed queries over the supported subset and just beyond it."""
    leaf = st.one_of(
        SELECTOR,
        st.builds(lambda s, r: s + r, SELECTOR, RANGE),
        st.builds(lambda f, s, r: f"{f}({s}{r})",
                  st.sampled_from(["max_over_time", "min_over_time", "avg_over_time",
                                   "sum_over_time", "count_over_time", "last_over_time", "rate"]),
                  SELECTOR, RANGE),
        st.sampled_from(["1", "1e308", "-1e308", "NaN", "Inf", "time()", "0x10", "1e-320"]),
        st.floats().map(repr),
    )
    mods = st.sampled_from(["", " offset 5m", " offset -1h", " offset 100000y", " @ 1e12",
                            " @ 0", " @ start()", " @ end()", " @ 1e308"])

    def extend(inner):
        return st.one_of(
            st.builds(lambda a, op, b: f"{a} {op} {b}", inner,
                      st.sampled_from(["+", "-", "*", "/", "%", "^", ">", "<", "==", "!=",
                                       "> bool", "and", "or"]), inner),
            st.builds(lambda op, g, a: f"{op} {g} ({a})",
                      st.sampled_from(["sum", "avg", "min", "max", "count", "stddev", "group"]),
                      st.sampled_from(["", "by (instance)", "without (instance)", "by ()",
                                       "by (__name__)"]), inner),
            st.builds(lambda op, k, a: f"{op}({k}, {a})", st.sampled_from(["topk", "bottomk"]),
                      st.sampled_from(["1", "0", "-1", "1e308", "NaN", "2"]), inner),
            st.builds(lambda a: f"({a})", inner),
            st.builds(lambda a: f"-{a}", inner),
        )

    return st.recursive(st.builds(lambda a, m: a + m, leaf, mods), extend, max_leaves=6)


QUERY = st.one_of(
    structured(),
    st.lists(st.sampled_from(TOKENS), max_size=12).map("".join),
    st.text(max_size=40),
    # Around the nesting limit; far deeper ones are in test_deep_and_huge_queries.
    st.integers(1, 400).map(lambda n: "(" * n + "anomaly_score" + ")" * n),
    st.integers(1, 400).map(lambda n: "1" + "+1" * n),
    st.integers(1, 400).map(lambda n: "-" * n + "1"),
    st.integers(1, 400).map(lambda n: "sum(" * n + "anomaly_score" + ")" * n),
)
NUMBER_TEXT = st.sampled_from(["inf", "-inf", "+Inf", "nan", "NaN", "1e308", "-1e308", "1e309",
                               "0", "-0", "-1", "1e-300", "5e-324", "9" * 400, "0x10", "1_000",
                               " 1", "", "\x00", "1.5.5", "18446744073709551616"])
TIME = st.one_of(
    NUMBER_TEXT,
    st.floats().map(repr),
    st.floats(T0 - 2 * 24 * HOUR, T0 + HOUR).map(str),
    st.sampled_from(["2023-11-15T00:00:00Z", "2023-11-15T00:00:00+00:00", "2023-11-15T00:00:00z",
                     "2023-11-15", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z",
                     "2023-13-45T99:99:99Z", "now", "yesterday", "1700000000.5"]),
    st.text(max_size=12),
)
STEP = st.one_of(
    NUMBER_TEXT,
    st.sampled_from(["15", "60", "60s", "5m", "1h", "1d", "1y", "0s", "-5m", "1ms", "0.001",
                     "1e-9", "100000000y", "5 m", "5M", "1h30m", "P1D", "s"]),
    st.floats().map(repr),
    st.text(max_size=8),
)
LIMIT = st.one_of(st.sampled_from(["", "0", "1", "-1", "2", "1e3", "9" * 30, "abc", "1.5",
                                   "nan", "\x00"]), st.integers(-10, 10**20).map(str))
MATCH = st.lists(st.one_of(SELECTOR, st.text(max_size=20), st.sampled_from(TOKENS)), max_size=4)
LABEL_NAME = st.one_of(st.sampled_from(["__name__", "instance", "anomaly_query", "job", "x",
                                        "0bad", "é", "a-b", "%00", "..", "a%2Fb"]),
                       st.text(string.ascii_letters + "_%./", min_size=1, max_size=10))


# ---- the app ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    clock = FakeClock(T0)
    source = FakeSource(clock, start=T0 - 24 * HOUR)
    source.set("metric_a", {"instance": "a", "job": "app"}, seasonal(10.0, seed=1))
    source.set("metric_a", {"instance": "b", "job": "app"}, seasonal(5.0, seed=2))
    source.set("metric_a", {"instance": "c\u00e9", "job": "weird \"job\""}, lambda t: np.full(len(t), 42.0))
    # The fake source never fails and no query here can run for ten minutes: any 503
    # (unavailable, timeout) is a bug, not the machine being slow.
    cfg = make_config(tmp_path_factory.mktemp("fuzz"), history="6h",
                      query_max_score_points=200_000, query_timeout=600.0)
    svc = Service(cfg, source=source, clock=clock)  # real fit_many and score_many
    app = create_app(cfg, service=svc)
    svc.poller.poll_once()
    svc.trainer.run_once()
    svc.poller.poll_once()
    assert svc.registry.counts_by_state()["ready"] == 3
    yield app
    torch.set_num_threads(before)


def send(client, method: str, path: str, params: list[tuple[str, str]]):
    if method == "GET":
        return client.get(path, query_string=params)
    return client.post(path, data=MultiDict(params))  # form-encoded, as Grafana sends it


def check(resp) -> dict:
    """The Prometheus envelope: 2xx/4xx, JSON, status success or error, no traceback."""
    text = resp.get_data(as_text=True)
    assert resp.status_code < 500, (resp.status_code, text[:500])
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    assert resp.mimetype == "application/json", (resp.status_code, resp.mimetype, text[:200])
    body = json.loads(text)
    assert body["status"] in ("success", "error"), body
    if currently_in_test_context():
        event(f"{resp.status_code} {body.get('errorType', '')}")
    if body["status"] == "error":
        assert set(body) == {"status", "errorType", "error"}, body
        assert body["errorType"] in ERROR_TYPES, body
        assert isinstance(body["error"], str) and body["error"]
        assert resp.status_code >= 400
    else:
        assert resp.status_code == 200 and "data" in body
    return body


def check_samples(body: dict) -> None:
    """Sample values are strings Prometheus can write, timestamps finite numbers."""
    if body["status"] != "success" or not isinstance(body["data"], dict):
        return
    data = body["data"]
    rows = data["result"]
    if data["resultType"] == "scalar":
        rows = [{"value": rows}]
    for r in rows:
        for t, v in r.get("values", []) + ([r["value"]] if "value" in r else []):
            assert isinstance(t, (int, float)) and math.isfinite(t)
            assert isinstance(v, str)
            float(v.replace("+Inf", "inf").replace("-Inf", "-inf"))


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def test_healthy_before(client):
    assert client.get("/-/healthy").status_code == 200


@SETTINGS
@given(st.sampled_from(["GET", "POST"]), QUERY, st.none() | TIME)
def test_instant_queries(client, method, query, t):
    params = [("query", query)] + ([("time", t)] if t is not None else [])
    check_samples(check(send(client, method, "/api/v1/query", params)))


@SETTINGS
@given(st.sampled_from(["GET", "POST"]), QUERY, st.none() | TIME, st.none() | TIME,
       st.none() | STEP)
def test_range_queries(client, method, query, start, end, step):
    params = [("query", query)]
    for name, value in (("start", start), ("end", end), ("step", step)):
        if value is not None:
            params.append((name, value))
    check_samples(check(send(client, method, "/api/v1/query_range", params)))


@SETTINGS
@given(st.sampled_from(["GET", "POST"]), st.sampled_from(["1", "anomaly_score", "anomaly_score[5m]"]),
       st.floats(T0 - 30 * HOUR, T0 + HOUR), st.floats(0, 12 * HOUR),
       st.sampled_from(["1", "15", "60", "61.5", "300", "1e-3", "3600", "86400"]))
def test_plausible_range_queries_succeed_or_refuse_cleanly(client, method, query, start, span, step):
    body = check(send(client, method, "/api/v1/query_range",
                      [("query", query), ("start", repr(start)), ("end", repr(start + span)),
                       ("step", step)]))
    check_samples(body)
    points = math.floor(((start + span) - start) / float(step) + 1e-9) + 1
    if points > 11_000:
        assert body["errorType"] == "bad_data" and "11,000" in body["error"], body
        return
    if query == "anomaly_score[5m]":
        assert body["errorType"] == "bad_data" and "range vector" in body["error"], body
        return
    assert body["status"] == "success", body
    assert body["data"]["resultType"] == "matrix"
    grid = start + float(step) * np.arange(points)
    for row in body["data"]["result"]:
        times = np.array([t for t, _ in row["values"]])
        assert np.isin(np.round(times, 3), np.round(grid, 3)).all(), row  # the query's times
        if query == "1":
            assert row["metric"] == {} and len(times) == points
            assert {v for _, v in row["values"]} == {"1"}
        else:
            assert row["metric"]["__name__"] == "anomaly_score"
            assert row["metric"]["instance"] in {"a", "b", "c\u00e9"}
            assert all(math.isfinite(float(v)) for _, v in row["values"])
    if query == "anomaly_score" and ((grid >= T0 - 20 * HOUR) & (grid <= T0)).any():
        assert body["data"]["result"], (start, span, step)  # asked at scored times


# Well-formed queries of the supported subset: each must succeed, and a range query at the
# model's step must equal instant queries at each of its times (Prometheus' definition of a
# range query; anomaly_score's max-in-step sampling is the newest point at that step).
VALID_SELECTOR = st.builds(
    lambda name, matchers, offset: name + "{" + ",".join(matchers) + "}" + offset,
    st.sampled_from(METRICS[:6]),
    st.lists(st.builds(lambda n, op, v: f"{n}{op}{json.dumps(v)}",
                       st.sampled_from(["instance", "job", "anomaly_query"]),
                       st.sampled_from(["=", "!=", "=~", "!~"]),
                       st.sampled_from(["a", "b", "c\u00e9", ".*", "a|b", "", "app", "q", "c.*"])),
             max_size=2),
    st.sampled_from(["", "", " offset 5m", " offset 1h"]),
)
VALID_NUMBER = st.sampled_from(["0", "0.5", "1", "2", "10"])


def valid_queries() -> st.SearchStrategy[str]:
    leaf = st.one_of(
        VALID_SELECTOR,
        st.builds(lambda f, sel, r: f"{f}({sel.replace(' offset', r + ' offset', 1)})"
                  if " offset" in sel else f"{f}({sel}{r})",
                  st.sampled_from(["max_over_time", "min_over_time", "avg_over_time",
                                   "sum_over_time", "count_over_time", "last_over_time"]),
                  VALID_SELECTOR, st.sampled_from(["[1m]", "[5m]", "[20m]", "[1h]"])),
    )

    def extend(inner):
        return st.one_of(
            st.builds(lambda a, op, n: f"({a}) {op} {n}", inner,
                      st.sampled_from(["+", "-", "*", "/", ">", "<", ">=", "==", "!=",
                                       "> bool", "<= bool"]), VALID_NUMBER),
            st.builds(lambda n, op, a: f"{n} {op} ({a})", VALID_NUMBER,
                      st.sampled_from(["+", "-", "*", "<", ">", ">=", "< bool"]), inner),
            st.builds(lambda op, g, a: f"{op} {g} ({a})", st.sampled_from(["sum", "avg",
                      "min", "max", "count"]),
                      st.sampled_from(["", "by (instance)", "without (instance)", "by (job)"]),
                      inner),
            st.builds(lambda op, k, a: f"{op}({k}, {a})", st.sampled_from(["topk", "bottomk"]),
                      st.sampled_from(["1", "2", "3"]), inner),
            st.builds(lambda a: f"({a})", inner),
            st.builds(lambda a: f"-({a})", inner),
        )

    return st.recursive(leaf, extend, max_leaves=4)


def _by_labels(result: list[dict], key: str) -> dict:
    return {tuple(sorted(r["metric"].items())): r[key] for r in result}


@SETTINGS
@given(valid_queries(), st.floats(T0 - 26 * HOUR, T0 + 600), st.integers(0, 120),
       st.sampled_from(["GET", "POST"]))
def test_valid_queries_succeed_and_a_range_is_its_instants(client, query, start, n, method):
    end = start + 60.0 * n
    body = check(send(client, method, "/api/v1/query_range", [
        ("query", query), ("start", repr(start)), ("end", repr(end)), ("step", "60")]))
    assert body["status"] == "success", (query, body)
    assert body["data"]["resultType"] == "matrix"
    check_samples(body)
    ranged = _by_labels(body["data"]["result"], "values")
    assert len(ranged) == len(body["data"]["result"]), "two series with one label set"
    for t in sorted({start, start + 60.0 * (n // 2), end}):
        one = check(send(client, method, "/api/v1/query", [("query", query), ("time", repr(t))]))
        assert one["status"] == "success", (query, t, one)
        assert one["data"]["resultType"] == "vector"
        check_samples(one)
        instant = _by_labels(one["data"]["result"], "value")
        assert all(v[0] == pytest.approx(t, abs=1e-3) for v in instant.values())
        want = {lab: float(v) for lab, values in ranged.items() for ts, v in values
                if abs(ts - t) < 1e-3}
        got = {lab: float(v[1]) for lab, v in instant.items()}
        assert got.keys() == want.keys(), (query, t, got, want)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (query, t)


@SETTINGS
@given(st.sampled_from(["GET", "POST"]),
       st.sampled_from(["/api/v1/labels", "/api/v1/series", "/api/v1/label/{}/values",
                        "/api/v1/metadata", "/api/v1/query_exemplars"]),
       LABEL_NAME, MATCH, st.none() | LIMIT, st.none() | TIME, st.none() | TIME,
       st.none() | st.text(max_size=10))
def test_metadata_endpoints(client, method, path, name, match, limit, start, end, metric):
    path = path.format(name)
    if method == "POST" and ("/label/" in path or "/metadata" in path):
        method = "GET"  # GET-only routes (a POST is a 405, checked below)
    params = [("match[]", m) for m in match]
    for key, value in (("limit", limit), ("start", start), ("end", end), ("metric", metric)):
        if value is not None:
            params.append((key, value))
    resp = send(client, method, path, params)
    if (resp.status_code in (308, 404) and resp.mimetype != "application/json"
            and ("/" in unquote(name) or unquote(name).strip(".") == "")):
        return  # a label name that is not one path segment: Flask's routing, not a route
    check(resp)


@SETTINGS
@given(st.none() | SELECTOR | st.text(max_size=30) | st.sampled_from(
           ['{instance="a"}', 'anomaly_score{instance="b",job="app"}', '{job="app"}',
            "q-0123456789abcdef", "", "{", "sum(anomaly_score)"]),
       st.none() | TIME)
def test_explain(client, series, t):
    params = [(k, v) for k, v in (("series", series), ("time", t)) if v is not None]
    body = check(send(client, "GET", "/api/v1/explain", params))
    if body["status"] == "success":
        shares = [r[-1] for r in body["data"]["points"]["values"] if r[-1] is not None]
        assert all(x >= 0 for x in shares) and abs(sum(shares) - 1) < 1e-6


@pytest.mark.parametrize("path", ["/api/v1/label/__name__/values", "/api/v1/metadata",
                                  "/api/v1/status/buildinfo", "/api/v1/rules"])
def test_wrong_method_is_an_error_not_a_crash(client, path):
    resp = client.delete(path)
    assert resp.status_code == 405


def test_huge_parameters(client):
    big = "9" * 200_000
    for path in ("/api/v1/query", "/api/v1/query_range", "/api/v1/labels"):
        for params in ([("query", big), ("time", big)], [("query", "1"), ("start", big), ("end", big),
                                                          ("step", big)],
                       [("match[]", "anomaly_score{x=\"" + big + "\"}")] * 3, [("limit", big)]):
            check(send(client, "POST", path, params))


@pytest.mark.parametrize("query", [
    "(" * 20_000 + "anomaly_score" + ")" * 20_000, "1" + "+1" * 20_000, "-" * 20_000 + "1",
    "sum(" * 3_000 + "anomaly_score" + ")" * 3_000, "(" * 3_000 + "1" + "+1)" * 3_000,
    "x" * 100_000, "anomaly_score{instance=~\"" + "a|" * 5000 + "b\"}",
])
def test_deep_and_huge_queries(client, query):
    """Deeply nested queries crashed the parser's native code (SIGSEGV): a clean bad_data."""
    for method in ("GET", "POST"):
        for path, extra in (("/api/v1/query", []),
                            ("/api/v1/query_range", [("start", "0"), ("end", "60"), ("step", "15")])):
            check(send(client, method, path, [("query", query), *extra]))


def test_nesting_at_the_limit_still_evaluates(client):
    depth = MAX_COMPLEXITY // 2
    q = "(" * depth + "-" * (MAX_COMPLEXITY - depth - 1) + "1" + ")" * depth
    body = check(send(client, "GET", "/api/v1/query", [("query", q), ("time", "4")]))
    assert body["status"] == "success", body
    body = check(send(client, "POST", "/api/v1/query", [("query", "(" * 20_000 + "1" + ")" * 20_000)]))
    assert body["errorType"] == "bad_data" and "too complex" in body["error"]


def test_operators_inside_strings_do_not_count_towards_the_limit(client):
    q = 'max(anomaly_score{instance=~"' + "a-b|" * 2000 + 'c", job!="(((+"})'
    body = check(send(client, "POST", "/api/v1/query", [("query", q), ("time", repr(T0))]))
    assert body["status"] == "success", body


def test_healthy_after(client):
    assert client.get("/-/healthy").status_code == 200
    check(send(client, "GET", "/api/v1/query", [("query", "1+1"), ("time", "4")]))
