"""The remote-read message classes are generated from remote.proto and match the protocol."""

from __future__ import annotations

from pathlib import Path

import cramjam

from grafana_plugin_backend.web import prompb
from grafana_plugin_backend.web.prompb import generate


def test_the_committed_module_is_what_the_schema_generates(tmp_path):
    fresh = generate.generate(tmp_path).read_bytes()
    committed = (Path(generate.HERE) / generate.MODULE).read_bytes()
    assert fresh == committed, ("remote_pb2.py differs from what remote.proto generates: run "
                                "python -m grafana_plugin_backend.web.prompb.generate")


def test_field_numbers_are_the_protocols():
    """Wire-level: the bytes Prometheus' own encoder writes for a known request and answer."""
    q = prompb.Query(start_timestamp_ms=1, end_timestamp_ms=2,
                     matchers=[prompb.LabelMatcher(type=prompb.LabelMatcher.RE, name="a",
                                                   value="b")],
                     hints=prompb.ReadHints(step_ms=3, func="f", range_ms=7, by=True,
                                            grouping=["g"]))
    req = prompb.ReadRequest(queries=[q], accepted_response_types=[1])
    # ReadRequest.queries=1 (Query: start=1, end=2, matchers=3 {type=1,name=2,value=3},
    # hints=4 {step_ms=1, func=2, grouping=5, by=6, range_ms=7}), accepted_response_types=2.
    inner = (b"\x08\x01\x10\x02" + b"\x1a\x08\x08\x02\x12\x01a\x1a\x01b"
             + b"\x22\x0c\x08\x03\x12\x01f\x2a\x01g\x30\x01\x38\x07")
    assert req.SerializeToString() == b"\x0a" + bytes([len(inner)]) + inner + b"\x12\x01\x01"
    ts = prompb.TimeSeries(labels=[prompb.Label(name="n", value="v")],
                           samples=[prompb.Sample(value=1.0, timestamp=5)])
    resp = prompb.ReadResponse(results=[prompb.QueryResult(timeseries=[ts])])
    series = b"\x0a\x06\x0a\x01n\x12\x01v" + b"\x12\x0b\x09" + b"\x00" * 6 + b"\xf0\x3f\x10\x05"
    result = b"\x0a" + bytes([len(series)]) + series
    assert resp.SerializeToString() == b"\x0a" + bytes([len(result)]) + result


def test_snappy_block_format_round_trips():
    body = prompb.ReadRequest(queries=[prompb.Query(end_timestamp_ms=9)]).SerializeToString()
    packed = bytes(cramjam.snappy.compress_raw(body))
    assert packed[0] == len(body)  # block format: a varint length, no stream identifier
    assert bytes(cramjam.snappy.decompress_raw(packed)) == body
