"""Warnings about queries that are valid PromQL but will not model well.

A raw counter (`http_requests_total` rather than `rate(http_requests_total[5m])`) only ever
grows: its model learns a ramp from its history, and every later value is above anything it
has seen, so the series is flagged from then on (until a counter reset looks normal again).
"""

from __future__ import annotations

import promql_parser as pp

from .settings import Config

# Names Prometheus' conventions give to cumulative series: counters, and the parts of
# histograms and summaries.
COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
# Functions that turn a counter into something stationary (per-second rates, increases,
# counts of resets or changes).
COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase", "resets", "changes"})


def _metric_name(sel: pp.VectorSelector) -> str:
    if sel.name:
        return sel.name
    for m in sel.matchers.matchers:
        if m.name == "__name__" and m.op == pp.MatchOp.Equal:
            return m.value
    return ""


def raw_counters(expr: str) -> list[str]:
    """Names of counter-like series `expr` uses without rate()/increase() around them."""
    found: list[str] = []

    def walk(e: pp.Expr) -> None:
        if isinstance(e, pp.Call):
            if e.func.name in COUNTER_FUNCTIONS:
                return  # whatever it wraps is made stationary
            for a in e.args:
                walk(a)
        elif isinstance(e, pp.VectorSelector):
            name = _metric_name(e)
            if name.endswith(COUNTER_SUFFIXES) and name not in found:
                found.append(name)
        elif isinstance(e, pp.MatrixSelector):
            walk(e.vector_selector)
        elif isinstance(e, pp.BinaryExpr):
            walk(e.lhs)
            walk(e.rhs)
        elif isinstance(e, (pp.AggregateExpr, pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
            walk(e.expr)

    try:
        walk(pp.parse(expr))
    except ValueError:
        return []  # parse errors are reported by the config's validation
    return found


def query_warnings(cfg: Config) -> list[str]:
    """One sentence per query that will likely model badly (check-config and the start log)."""
    out = []
    for q in cfg.queries:
        names = raw_counters(q.expr)
        if names:
            listed = ", ".join(names)
            out.append(f"query {q.name}: {listed} looks like a counter used without rate(): it "
                       "only grows, so its model learns a ramp and flags every new high; use "
                       f"e.g. rate({names[0]}[5m])")
    return out
