"""Fuzzing POST /api/v1/read with hostile bodies: never a 5xx but 503, never a traceback.

The app is the query API fuzz's (real tiny models over a fake source), so the matcher
conversion, the on-demand scorer and the encoder all run for real.
"""

from __future__ import annotations

import cramjam
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from grafana_plugin_backend.web.prompb import (
    LabelMatcher,
    Query,
    ReadHints,
    ReadRequest,
    ReadResponse,
)
from tests.web.test_query_api_fuzz import SETTINGS, T0, app  # noqa: F401 - `app` is a fixture

MS = int(T0 * 1000)
TIMES = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(MS - 30 * 3600_000, MS + 3600_000),
                  st.sampled_from([0, -1, MS, 2**53, 2**53 + 1, -2**63, 2**63 - 1]))
NAMES = st.one_of(st.sampled_from(["__name__", "instance", "job", "anomaly_query", "", "x",
                                   "\x00", "é"]), st.text(max_size=8))
VALUES = st.one_of(
    st.sampled_from(["anomaly_score", "anomaly_flag", "anomaly_.*", ".*", "", "a", "a|b", "(",
                     "[", "\\", "(a+)+", "x" * 5000, "a|" * 3000 + "b", "c\u00e9", "q"]),
    st.text(max_size=12))
MATCHER = st.builds(LabelMatcher, type=st.integers(0, 2**31 - 1) | st.integers(0, 4),
                    name=NAMES, value=VALUES)
HINTS = st.none() | st.builds(ReadHints, step_ms=st.integers(-2**63, 2**63 - 1),
                              func=st.sampled_from(["", "series", "rate", "max", "x"]),
                              start_ms=TIMES, end_ms=TIMES, range_ms=st.integers(0, 2**40))
QUERY = st.builds(Query, start_timestamp_ms=TIMES, end_timestamp_ms=TIMES,
                  matchers=st.lists(MATCHER, max_size=4), hints=HINTS)
REQUEST = st.builds(ReadRequest, queries=st.lists(QUERY, max_size=3),
                    accepted_response_types=st.lists(st.integers(0, 3), max_size=3))


def snappy(b: bytes) -> bytes:
    return bytes(cramjam.snappy.compress_raw(b))


def check(resp, queries: int | None = None) -> None:
    text = resp.get_data(as_text=True) if resp.status_code != 200 else ""
    assert resp.status_code < 500 or resp.status_code == 503, (resp.status_code, text[:300])
    event(str(resp.status_code))
    if resp.status_code != 200:
        assert resp.mimetype == "text/plain", resp.mimetype
        assert text.strip() and "Traceback" not in text, text[:300]
        return
    got = ReadResponse.FromString(bytes(cramjam.snappy.decompress_raw(resp.get_data())))
    if queries is not None:
        assert len(got.results) == queries
    for r in got.results:
        for ts in r.timeseries:
            names = [lab.name for lab in ts.labels]
            assert names == sorted(names) and "__name__" in names
            stamps = [s.timestamp for s in ts.samples]
            assert stamps == sorted(set(stamps))


@pytest.fixture(scope="module")
def client(app):  # noqa: F811 - the imported fixture
    return app.test_client()


def post(client, body: bytes):
    return client.post("/api/v1/read", data=body, headers={"Content-Encoding": "snappy"})


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(client, body):
    check(post(client, body))


@SETTINGS
@given(st.binary(max_size=300))
def test_snappy_of_random_bytes(client, body):
    check(post(client, snappy(body)))


@SETTINGS
@given(REQUEST)
def test_structured_requests(client, req):
    check(post(client, snappy(req.SerializeToString())), len(req.queries))


@SETTINGS
@given(QUERY)
def test_plausible_queries_over_the_scored_range(client, q):
    q.start_timestamp_ms = MS - 7 * 3600_000 + abs(q.start_timestamp_ms) % (6 * 3600_000)
    q.end_timestamp_ms = q.start_timestamp_ms + abs(q.end_timestamp_ms) % (2 * 3600_000)
    check(post(client, snappy(ReadRequest(queries=[q]).SerializeToString())), 1)


def test_healthy_after(client):
    assert client.get("/-/healthy").status_code == 200
