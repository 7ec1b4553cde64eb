"""Prometheus' remote-read messages, generated from remote.proto (see generate.py)."""

from .remote_pb2 import (  # noqa: F401 - the package's public names
    Label,
    LabelMatcher,
    Query,
    QueryResult,
    ReadHints,
    ReadRequest,
    ReadResponse,
    Sample,
    TimeSeries,
)
