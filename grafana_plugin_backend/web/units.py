"""Units of a query's values, guessed from Prometheus' naming conventions, and human formatting.

`node_memory_MemAvailable_bytes` is bytes, `rate(node_network_receive_bytes_total[5m])` bytes
per second, `rate(node_cpu_seconds_total[5m])` seconds per second (a busy ratio) and
`a_bytes / b_bytes` a ratio. A query's `unit:` config key overrides the guess.
"""

from __future__ import annotations

import math

import promql_parser as pp

from ..config.base import UNITS

_SCALAR = "scalar"  # a number literal: takes on the other operand's unit
_PER_SECOND = {"rate", "irate", "deriv"}
_SAME = {"increase", "delta", "idelta", "abs", "ceil", "floor", "round", "clamp", "clamp_min",
         "clamp_max", "last_over_time", "max_over_time", "min_over_time", "avg_over_time",
         "quantile_over_time", "sum_over_time", "label_replace", "label_join", "sort",
         "sort_desc", "predict_linear"}
_SUFFIXES = (("_bytes", "bytes"), ("_seconds", "seconds"), ("_ratio", "ratio"),
             ("_percent", "percent"))


def _of_name(name: str) -> str:
    for strip in ("_total", "_bucket", "_sum", "_count", "_created"):
        if name.endswith(strip) and strip != "_count":
            name = name[: -len(strip)]
            break
    for suffix, unit in _SUFFIXES:
        if name.endswith(suffix):
            return unit
    return "none"


def _unit(e: object) -> str:
    if isinstance(e, pp.NumberLiteral):
        return _SCALAR
    if isinstance(e, pp.VectorSelector):
        return _of_name(e.name or "")
    if isinstance(e, pp.MatrixSelector):
        return _unit(e.vector_selector)
    if isinstance(e, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
        return _unit(e.expr)
    if isinstance(e, pp.AggregateExpr):
        return "none" if str(e.op) in ("count", "count_values", "group") else _unit(e.expr)
    if isinstance(e, pp.Call):
        name = e.func.name
        args = list(e.args)
        if name in _PER_SECOND and args:
            inner = _unit(args[0])
            return {"bytes": "bytes_per_second", "seconds": "ratio"}.get(inner, "none")
        if name == "histogram_quantile" and len(args) == 2:  # quantile of the buckets' unit
            names: list[str] = []
            pp.walk(args[1], pre_visit=lambda n: names.append(n.name or "")
                    if isinstance(n, pp.VectorSelector) else None)
            return _of_name(names[0]) if names else "none"
        if name in _SAME:
            arg = next((a for a in args if not isinstance(a, (pp.NumberLiteral,
                                                              pp.StringLiteral))), None)
            return _unit(arg) if arg is not None else "none"
        return "none"
    if isinstance(e, pp.BinaryExpr):
        op, a, b = str(e.op), _unit(e.lhs), _unit(e.rhs)
        if op in ("==", "!=", ">", "<", ">=", "<=", "and", "unless"):
            return a
        if op in ("+", "-", "or"):
            return b if a == _SCALAR else a if b in (_SCALAR, a) else "none"
        if op == "/":
            if a == b and a not in (_SCALAR, "none"):
                return "ratio"
            return a if b == _SCALAR else "none"
        if op == "*":
            if a == "ratio" and isinstance(e.rhs, pp.NumberLiteral) and e.rhs.val == 100:
                return "percent"
            return b if a == _SCALAR else a if b == _SCALAR else "none"
        return "none"
    return "none"


def guess_unit(expr: str) -> str:
    """The unit of `expr`'s values (one of UNITS), "none" when it cannot be told."""
    try:
        unit = _unit(pp.parse(expr))
    except (ValueError, AttributeError, TypeError):
        return "none"
    return unit if unit in UNITS else "none"


def _trim(x: float, digits: int = 3) -> str:
    """`x` with `digits` significant digits, no exponent, no trailing zeros."""
    if x == 0:
        return "0"
    if not 1e-9 <= abs(x) < 1e15:  # beyond every prefix: scientific, not 300 digits
        return f"{x:.{digits}g}"
    places = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    text = f"{x:.{places}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _scaled(x: float, steps: list[tuple[float, str]], sep: str = " ") -> str:
    """x divided by the largest step not above |x| (steps ascending), with that step's name."""
    size, name = steps[0]
    for s, n in steps:
        if abs(x) >= s:
            size, name = s, n
    return f"{_trim(x / size)}{sep}{name}".rstrip()


_BINARY = [(1.0, "B"), (1024.0, "KiB"), (1024.0**2, "MiB"), (1024.0**3, "GiB"),
           (1024.0**4, "TiB"), (1024.0**5, "PiB"), (1024.0**6, "EiB")]
_TIME = [(1e-9, "ns"), (1e-6, "µs"), (1e-3, "ms"), (1.0, "s"), (60.0, "min"), (3600.0, "h"),
         (86400.0, "d"), (86400.0 * 365, "y")]
_SI = [(1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T"), (1e15, "P"), (1e18, "E")]


def human(x: float | None, unit: str = "none") -> str:
    """`x` for people: "4.74 GiB", "1.2 MiB/s", "350 ms", "45.2%", "5.09 G"; "" if not finite."""
    if x is None or not math.isfinite(x):
        return ""
    if unit == "bytes":
        return _scaled(x, _BINARY)
    if unit == "bytes_per_second":
        return _scaled(x, _BINARY) + "/s"
    if unit == "seconds":
        return "0 s" if x == 0 else _scaled(x, _TIME)
    if unit == "ratio":
        return f"{_trim(100.0 * x)}%"
    if unit == "percent":
        return f"{_trim(x)}%"
    if abs(x) >= 1e4:
        return _scaled(x, _SI)
    return _trim(x, 4)
