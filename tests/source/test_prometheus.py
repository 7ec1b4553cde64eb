"""Prometheus access: chunking under 11,000 points, auth, TLS options, errors mapped to reasons."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grafana_plugin_backend.config.settings import BasicAuth, PrometheusConfig
from grafana_plugin_backend.source.prometheus import (
    MAX_POINTS,
    PrometheusSource,
    SourceError,
    chunk_ranges,
    merge_chunks,
    parse_matrix,
)
from tests.promstack import QuietHandler, ServerThread


class FakePrometheus(ServerThread):
    """A loopback HTTP server answering /api/v1/query_range from a scripted behaviour."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.mode = "ok"  # ok | 500 | 400 | badjson | slow
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                owner.requests.append({"path": url.path, "params": params,
                                       "headers": dict(self.headers)})
                if owner.mode == "slow":
                    time.sleep(1.0)
                if owner.mode in ("500", "400"):
                    body = json.dumps({"status": "error", "errorType": "bad_data",
                                       "error": "boom"}).encode()
                    self.send_response(int(owner.mode))
                elif owner.mode == "badjson":
                    body = b'{"status": "success", "data": {"result": [{"metric"'
                    self.send_response(200)
                else:
                    start, end = float(params["start"]), float(params["end"])
                    step = float(params["step"])
                    n = int((end - start) / step) + 1
                    values = [[start + i * step, str(float(start + i * step))] for i in range(n)]
                    body = json.dumps({"status": "success", "data": {
                        "resultType": "matrix",
                        "result": [{"metric": {"__name__": "m", "instance": "a"},
                                    "values": values},
                                   {"metric": {"__name__": "m", "instance": "b"},
                                    "values": [[start, "NaN"], [end, "+Inf"]]}]}}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self._serve(Handler)


@pytest.fixture
def fake_prom() -> Iterator[FakePrometheus]:
    with FakePrometheus() as srv:
        yield srv


@given(start=st.integers(0, 10**6), n=st.integers(1, 60_000), step=st.sampled_from([1, 15, 60]),
       cap=st.sampled_from([1, 7, 11_000]))
def test_chunks_cover_the_grid_exactly_and_stay_under_the_cap(start, n, step, cap):
    end = start + (n - 1) * step
    chunks = chunk_ranges(start, end, step, cap)
    points = []
    for s, e in chunks:
        k = round((e - s) / step) + 1
        assert 1 <= k <= cap
        points.extend(s + i * step for i in range(k))
    assert points == [start + i * step for i in range(n)]


def test_chunk_ranges_empty_when_end_before_start():
    assert chunk_ranges(100, 99, 1) == []


def test_history_pull_is_chunked_and_merged(fake_prom):
    src = PrometheusSource(PrometheusConfig(url=fake_prom.url, timeout=5))
    start, step = 1_700_000_000.0, 60.0
    end = start + (25_000 - 1) * step
    result = src.query_range("m", start, end, step)
    ranges = [r["params"] for r in fake_prom.requests]
    assert len(ranges) == 3
    for p in ranges:
        assert (float(p["end"]) - float(p["start"])) / step + 1 <= MAX_POINTS
    a = next(r for r in result if r.labels["instance"] == "a")
    assert len(a.timestamps) == 25_000
    assert np.all(np.diff(a.timestamps) == step) and a.values[-1] == end
    b = next(r for r in result if r.labels["instance"] == "b")
    assert np.isnan(b.values[0]) and np.isinf(b.values[-1])  # NaN / +Inf survive parsing
    assert a.labels["__name__"] == "m"


def test_bearer_token_file_is_read_on_each_request(fake_prom, tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    src = PrometheusSource(PrometheusConfig(url=fake_prom.url, bearer_token_file=str(token)))
    src.query_range("m", 0, 60, 60)
    token.write_text("second")
    src.query_range("m", 0, 60, 60)
    auths = [r["headers"].get("Authorization") for r in fake_prom.requests]
    assert auths == ["Bearer first", "Bearer second"]


def test_basic_auth_with_password_file_and_extra_headers(fake_prom, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = PrometheusConfig(url=fake_prom.url, headers={"X-Scope-OrgID": "t1"},
                           basic_auth=BasicAuth(username="u", password_file=str(pw)))
    PrometheusSource(cfg).query_range("m", 0, 60, 60)
    headers = fake_prom.requests[0]["headers"]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"u:s3cret").decode()
    assert headers["X-Scope-OrgID"] == "t1"


# TLS (CA, client certificate, insecure_skip_verify) is tested against a real Prometheus
# behind TLS: tests/integration/test_promclient_tls.py.


@pytest.mark.parametrize("mode,reason", [("500", "http_5xx"), ("400", "bad_query"),
                                         ("badjson", "bad_response")])
def test_errors_map_to_reasons(fake_prom, mode, reason):
    fake_prom.mode = mode
    src = PrometheusSource(PrometheusConfig(url=fake_prom.url, retries=0, timeout=5))
    with pytest.raises(SourceError) as info:
        src.query_range("m", 0, 60, 60)
    assert info.value.reason == reason
    assert len(fake_prom.requests) == 1  # no retry of a deterministic error


def test_timeout_is_bounded(fake_prom):
    fake_prom.mode = "slow"
    src = PrometheusSource(PrometheusConfig(url=fake_prom.url, retries=2, timeout=0.2))
    with pytest.raises(SourceError) as info:
        src.query_range("m", 0, 60, 60)
    assert info.value.reason == "timeout"
    assert len(fake_prom.requests) == 1  # a read timeout is not retried


def test_connection_refused():
    src = PrometheusSource(PrometheusConfig(url="http://127.0.0.1:9", retries=0, timeout=2))
    with pytest.raises(SourceError) as info:
        src.query_range("m", 0, 60, 60)
    assert info.value.reason == "connection"
    assert "127.0.0.1:9" in str(info.value)


def test_parse_matrix_rejects_non_matrix():
    with pytest.raises(SourceError):
        parse_matrix([1700000000, "2"])  # a scalar result
    with pytest.raises(SourceError):
        parse_matrix({"oops": 1})


def test_merge_chunks_keeps_label_sets_apart():
    from grafana_plugin_backend.source.prometheus import RangeSeries

    a1 = RangeSeries({"i": "a"}, np.array([0.0]), np.array([1.0]))
    a2 = RangeSeries({"i": "a"}, np.array([60.0]), np.array([2.0]))
    b = RangeSeries({"i": "a", "j": "x"}, np.array([0.0]), np.array([9.0]))
    merged = merge_chunks([[a1, b], [a2]])
    assert len(merged) == 2
    a = next(m for m in merged if m.labels == {"i": "a"})
    assert list(a.values) == [1.0, 2.0]


def test_credentials_in_the_url_stay_out_of_messages():
    src = PrometheusSource(PrometheusConfig(url="http://user:hunter2@127.0.0.1:9", retries=0,
                                            timeout=2))
    assert "hunter2" not in src.describe()
    with pytest.raises(SourceError) as info:
        src.query_range("m", 0, 60, 60)
    assert "hunter2" not in str(info.value) and "127.0.0.1:9" in str(info.value)


# ---- only_series --------------------------------------------------------------------------

_label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: n != "__name__")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(_label_names, st.text(max_size=12), max_size=4), min_size=1,
                max_size=5))
def test_only_series_always_builds_valid_promql(labelsets):
    import promql_parser

    from grafana_plugin_backend.source.prometheus import only_series

    text = only_series('sum by (instance) (rate(x{job="a"}[5m]))', labelsets)
    promql_parser.parse(text)  # raises on invalid PromQL


def test_each_thread_pulls_with_its_own_session(fake_prom):
    # The poller, the trainer and the query threads share one source; requests does not
    # promise a Session is thread-safe, so each thread gets its own (and keeps it).
    import threading

    src = PrometheusSource(PrometheusConfig(url=fake_prom.url, timeout=5))
    sessions: dict[str, list[object]] = {}

    def pull(name: str) -> None:
        for _ in range(2):
            src.query_range("m", 0, 60, 60)
            sessions.setdefault(name, []).append(src._client._session)

    threads = [threading.Thread(target=pull, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pull("main")
    assert len(fake_prom.requests) == 8
    per_thread = [ss[0] for ss in sessions.values()]
    assert all(ss[0] is ss[1] for ss in sessions.values())  # reused within a thread
    assert len({id(s) for s in per_thread}) == 4  # never shared between threads
    src.close()
