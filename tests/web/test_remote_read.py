"""POST /api/v1/read: Prometheus' remote-read protocol over the on-demand scores.

The service runs in-process over a fake source with a day of history and the fake score
value / 10 (tests/service_fixtures.py), so the expected samples are exact. Requests are built
as Prometheus builds them: a protobuf ReadRequest, snappy block format.
"""

from __future__ import annotations

import cramjam
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from grafana_plugin_backend.web import remote_read
from grafana_plugin_backend.web.app import Service, create_app
from grafana_plugin_backend.web.prompb import (
    LabelMatcher,
    Query,
    ReadHints,
    ReadRequest,
    ReadResponse,
)
from tests.service_fixtures import (
    T0,
    FakeClock,
    FakeFit,
    FakeSource,
    fake_score_many,
    make_config,
)
from tests.web.spike_world import HOUR, SPIKE, A, B, spike_world

EQ, NEQ, RE, NRE = LabelMatcher.EQ, LabelMatcher.NEQ, LabelMatcher.RE, LabelMatcher.NRE
HEADERS = {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf",
           "X-Prometheus-Remote-Read-Version": "0.1.0"}


@pytest.fixture
def world(tmp_path):
    return spike_world(tmp_path)


@pytest.fixture
def client(world):
    return world[0].test_client()


def query(start: float, end: float, *matchers: tuple[int, str, str], **hints) -> Query:
    return Query(start_timestamp_ms=int(start * 1000), end_timestamp_ms=int(end * 1000),
                 matchers=[LabelMatcher(type=t, name=n, value=v) for t, n, v in matchers],
                 hints=ReadHints(**hints) if hints else None)


def post(client, *queries: Query, types=(), raw: bytes | None = None):
    body = raw if raw is not None else bytes(cramjam.snappy.compress_raw(
        ReadRequest(queries=queries, accepted_response_types=types).SerializeToString()))
    return client.post("/api/v1/read", data=body, headers=HEADERS)


def read(resp) -> ReadResponse:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"] == "application/x-protobuf"
    assert resp.headers["Content-Encoding"] == "snappy"
    return ReadResponse.FromString(bytes(cramjam.snappy.decompress_raw(resp.get_data())))


def refused(resp, status: int, *words: str) -> str:
    text = resp.get_data(as_text=True)
    assert resp.status_code == status, (resp.status_code, text)
    assert resp.mimetype == "text/plain", resp.mimetype
    assert "Traceback" not in text and text.strip()
    for w in words:
        assert w in text, text
    return text


def as_dict(resp: ReadResponse, i: int = 0) -> dict[tuple, tuple[list[int], list[float]]]:
    out = {}
    for ts in resp.results[i].timeseries:
        names = [lab.name for lab in ts.labels]
        assert names == sorted(names), names  # sorted by name, as the protocol wants
        key = tuple((lab.name, lab.value) for lab in ts.labels)
        out[key] = ([s.timestamp for s in ts.samples], [s.value for s in ts.samples])
    return out


def key(name: str, labels: dict[str, str]) -> tuple:
    return tuple(sorted({**labels, "anomaly_query": "q", "__name__": name}.items()))


def test_a_past_range_is_scored_on_demand_on_the_model_grid(client):
    start, end = SPIKE - 600, SPIKE + 600  # before the 1 h live buffer
    got = as_dict(read(post(client, query(start, end, (EQ, "__name__", "anomaly_score")))))
    assert set(got) == {key("anomaly_score", A), key("anomaly_score", B)}
    ts, vs = got[key("anomaly_score", A)]
    grid = [int(t * 1000) for t in np.arange(start, end + 1, 60.0)]
    assert ts == grid  # every grid point in [start, end], ascending, in milliseconds
    expect = [2.5 if SPIKE <= t / 1000 < SPIKE + 180 else 0.5 for t in ts]
    assert vs == pytest.approx(expect)
    assert got[key("anomaly_score", B)][1] == pytest.approx([0.3] * len(grid))


def test_remote_read_agrees_with_the_query_api(client):
    start, end = SPIKE - 300, SPIKE + 300
    resp = client.get("/api/v1/query_range", query_string={
        "query": 'anomaly_observed{instance="a"}', "start": start, "end": end, "step": 60})
    (series,) = resp.get_json()["data"]["result"]
    got = as_dict(read(post(client, query(start, end, (EQ, "__name__", "anomaly_observed"),
                                          (EQ, "instance", "a")))))
    ts, vs = got[key("anomaly_observed", A)]
    assert [[t / 1000, v] for t, v in zip(ts, vs)] == [[t, float(v)] for t, v in series["values"]]


def test_live_points_near_now_are_served(client, world):
    svc = world[1]
    got = as_dict(read(post(client, query(T0 - 300, T0 + 3600, (EQ, "__name__", "anomaly_flag"),
                                          (EQ, "instance", "b")))))
    ts, vs = got[key("anomaly_flag", B)]
    assert ts[-1] == int(T0 * 1000)  # clipped at now: no samples from the future
    last = svc.registry.get_by_labels("q", B).last_result()
    assert vs[-1] == last["flag"] == 0.0


def test_matcher_kinds_and_one_result_per_query_in_order(client):
    t = (SPIKE, SPIKE + 120)
    resp = read(post(client,
                     query(*t, (RE, "__name__", "anomaly_(score|flag)"), (NEQ, "instance", "a")),
                     query(*t, (EQ, "__name__", "anomaly_upper"), (NRE, "instance", "b|c")),
                     query(*t, (EQ, "__name__", "up")),
                     query(*t, (RE, "job", "ap.")),
                     query(*t, (RE, "job", "ap"))))  # anchored: "ap" does not match "app"
    assert len(resp.results) == 5
    assert set(as_dict(resp, 0)) == {key("anomaly_score", B), key("anomaly_flag", B)}
    assert set(as_dict(resp, 1)) == {key("anomaly_upper", A)}
    assert as_dict(resp, 2) == {}
    assert len(as_dict(resp, 3)) == 12  # six metrics x two series
    assert as_dict(resp, 4) == {}


def test_a_series_hint_returns_label_sets_without_scoring(client, world):
    scorer = world[0].extensions["promvae_query"].scorer
    passes = scorer.passes
    got = as_dict(read(post(client, query(-62135596800, 253402300799, (EQ, "instance", "a"),
                                          func="series"))))
    assert len(got) == 6 and all(ts == [] for ts, _ in got.values())
    assert scorer.passes == passes


def test_no_accepted_types_or_samples_among_them_is_served(client):
    q = query(SPIKE, SPIKE + 60, (EQ, "__name__", "anomaly_score"))
    assert len(read(post(client, q)).results[0].timeseries) == 2
    both = (ReadRequest.STREAMED_XOR_CHUNKS, ReadRequest.SAMPLES)
    assert len(read(post(client, q, types=both)).results[0].timeseries) == 2
    refused(post(client, q, types=(ReadRequest.STREAMED_XOR_CHUNKS,)), 400, "SAMPLES")


def snappy(b: bytes) -> bytes:
    return bytes(cramjam.snappy.compress_raw(b))


@pytest.mark.parametrize("body, words", [
    (b"", ["empty body"]),
    (b"\x40\xff\xffnot snappy", ["snappy"]),
    (b"\x05abc", ["snappy"]),  # a header promising 5 bytes, 3 given
    (snappy(b"\x0a\x05\x08"), ["protobuf"]),  # a truncated Query
    (snappy(b"\xff" * 20), ["protobuf"]),
    (bytes(cramjam.snappy.compress(b"framed, not block")), ["snappy"]),
    (b"\x80\x80\x80\x80\x08", ["decompresses to", "more than"]),  # claims 2 GiB
])
def test_malformed_bodies_are_400_plain_text(client, body, words):
    refused(post(client, raw=body), 400, *words)


@pytest.mark.parametrize("q, words", [
    (query(T0, T0 - 60, (EQ, "__name__", "anomaly_score")), ["before start"]),
    (Query(start_timestamp_ms=-2**63, end_timestamp_ms=2**63 - 1,
           matchers=[LabelMatcher(type=EQ, name="__name__", value="anomaly_score")]),
     ["out of range"]),
    (query(SPIKE, T0, (RE, "instance", "(")), ["invalid regular expression"]),
    (query(SPIKE, T0, (RE, "instance", "a|" * 5000 + "b")), ["at most 4096"]),
    (query(SPIKE, T0, (7, "instance", "a")), ["unknown matcher type 7"]),
    (query(SPIKE, T0, (EQ, "", "a")), ["without a label name"]),
    (query(SPIKE, T0, *[(EQ, "instance", "a")] * 65), ["at most 64"]),
])
def test_bad_queries_are_400_plain_text(client, q, words):
    refused(post(client, q), 400, *words)


def test_limits_of_the_query_api_apply(world):
    app, _, source, _ = world
    client = app.test_client()
    app.config["PROMVAE_QUERY_MAX_SERIES"] = 3
    refused(post(client, query(SPIKE, T0, (EQ, "anomaly_query", "q"))), 422, "query_max_series")
    app.config["PROMVAE_QUERY_MAX_SERIES"] = 1000
    app.extensions["promvae_query"].scorer.max_score_points = 100
    refused(post(client, query(SPIKE, SPIKE + 3600, (EQ, "__name__", "anomaly_score"))), 422,
            "query_max_score_points")
    app.extensions["promvae_query"].scorer.max_score_points = 2_000_000
    source.fail = "connection"
    refused(post(client, query(SPIKE - 2 * HOUR, SPIKE, (EQ, "__name__", "anomaly_score"))), 503,
            "unavailable")


def test_errors_are_counted_and_the_endpoint_keeps_answering(client):
    before = metric(client, "promvae_query_errors_total", {"type": "bad_data"})
    refused(post(client, raw=b"junk"), 400)
    refused(post(client, query(T0, T0 - 1)), 400)
    assert metric(client, "promvae_query_errors_total", {"type": "bad_data"}) == before + 2
    assert read(post(client, query(T0 - 60, T0, (EQ, "instance", "a"))))


def test_an_unexpected_failure_is_a_422_not_a_500(client, monkeypatch):
    def boom(q):
        raise RuntimeError("bug")
    monkeypatch.setattr(remote_read, "answer", boom)
    refused(post(client, query(T0 - 60, T0)), 422, "internal error", "RuntimeError")


def test_a_get_is_405(client):
    assert client.get("/api/v1/read").status_code == 405


def test_basic_auth_and_body_size_guard_it_with_plain_text(tmp_path):
    import bcrypt

    from grafana_plugin_backend.config.web import load_web_config

    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  prom: "
                   + bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode() + "\n")
    cfg = make_config(tmp_path, web_max_request_bytes=2048)
    clock = FakeClock(T0)
    app = create_app(cfg, web_config=load_web_config(web),
                     service=Service(cfg, source=FakeSource(clock), clock=clock,
                                     fit_fn=FakeFit(clock), score_fn=fake_score_many))
    client = app.test_client()
    body = snappy(ReadRequest(queries=[query(T0 - 60, T0)]).SerializeToString())
    refused(client.post("/api/v1/read", data=body, headers=HEADERS), 401, "Unauthorized")
    auth = {"Authorization": "Basic cHJvbTpzZWNyZXQ=", **HEADERS}  # prom:secret
    assert client.post("/api/v1/read", data=body, headers=auth).status_code == 200
    refused(client.post("/api/v1/read", data=b"x" * 4096, headers=auth), 413, "too large")


def metric(client, name: str, labels: dict[str, str]) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"{name}{labels} not exposed")
