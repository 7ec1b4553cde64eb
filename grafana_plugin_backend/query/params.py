"""Query parameters and sample formatting as the Prometheus HTTP API spells them."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np

from ..config.base import parse_duration
from .promql import QueryError

MAX_ABS_TIME = 9.2e15  # seconds: Prometheus' timestamps are int64 milliseconds


def parse_time(name: str, text: str | None, default: float | None = None) -> float:
    """Unix seconds from float seconds or RFC3339; QueryError(bad_data) if neither."""
    if text is None or text == "":
        if default is None:
            raise QueryError("bad_data", f"missing parameter {name!r}")
        return default
    try:
        t = float(text)
    except ValueError:
        try:
            dt = datetime.fromisoformat(text.replace("z", "Z"))  # RFC3339 allows a lower-case z
            # RFC3339 always has an offset; a time without one is UTC, not the server's zone.
            t = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
        except ValueError:
            raise QueryError("bad_data", f"invalid parameter {name!r}: cannot parse {text!r} to "
                             "a valid timestamp (use unix seconds or RFC3339)") from None
    if not math.isfinite(t):
        raise QueryError("bad_data", f"invalid parameter {name!r}: {text!r} is not finite")
    if abs(t) > MAX_ABS_TIME:
        raise QueryError("bad_data", f"invalid parameter {name!r}: {text!r} is out of range "
                         f"(at most {MAX_ABS_TIME:g} seconds from 1970)")
    return t


def parse_step(text: str | None) -> float:
    """Seconds from float seconds ("15") or a duration ("60s", "5m")."""
    if text is None or text == "":
        raise QueryError("bad_data", "missing parameter 'step'")
    try:
        step = parse_duration(text)
    except ValueError:
        raise QueryError("bad_data", f"invalid parameter 'step': cannot parse {text!r} to a "
                         "valid duration (use seconds like 15 or a duration like 60s)") from None
    if step <= 0:
        raise QueryError("bad_data", "zero or negative query resolution step widths are not "
                         "accepted. Try a positive integer")
    return step


def fmt_value(v: float) -> str:
    """A sample value as Prometheus writes it: "2", "0.125", "NaN", "+Inf", "-Inf"."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return np.format_float_positional(v, trim="-")


def fmt_time(t: float) -> float | int:
    """Timestamps as JSON numbers with millisecond precision."""
    t = round(float(t), 3)
    return int(t) if t.is_integer() else t
