"""A PromQL subset evaluated over anomaly_* series, on the AST of the promql-parser package.

Every expression is evaluated over all its evaluation times at once: a scalar is a (T,) array,
an instant vector is a list of label sets with a (S, T) array, NaN marking "no sample".
Selectors read their series from a `Storage` on its own regular grid (the models' step) and
sample it at each evaluation time t:

- anomaly_score, anomaly_flag: the maximum inside (t - step, t], so a one-point spike is not
  averaged away at a coarse step; if that interval holds no point (instant queries, or a step
  finer than the grid), the newest point in (t - 5m, t] like Prometheus' lookback.
- the other anomaly_* metrics: the newest point in (t - 5m, t] (Prometheus' own semantics).

Supported: selectors with =, !=, =~, !~ (offset and @ too), range selectors (top level of an
instant query, or inside max/min/avg/sum/count/last_over_time), sum/avg/min/max/count by and
without, topk/bottomk, scalar arithmetic, comparisons and arithmetic between a vector and a
scalar (with and without bool), unary minus, parentheses. Anything else raises QueryError.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import promql_parser as pp

LOOKBACK = 300.0  # seconds; Prometheus' default lookback delta
ALL_METRICS = ("anomaly_score", "anomaly_flag", "anomaly_expected", "anomaly_lower",
               "anomaly_upper", "anomaly_observed")
PEAK_METRICS = frozenset({"anomaly_score", "anomaly_flag"})  # sampled max-in-step
SUPPORTED = ("selectors on anomaly_* metrics (=, !=, =~, !~), range selectors, "
             "sum/avg/min/max/count by/without, topk/bottomk, max/min/avg/sum/count/"
             "last_over_time, comparison and arithmetic with a scalar (with or without bool), "
             "scalar arithmetic")
_ARITH = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide,
          "%": np.fmod, "^": np.power}
_CMP = {"==": np.equal, "!=": np.not_equal, ">": np.greater, "<": np.less,
        ">=": np.greater_equal, "<=": np.less_equal}
_AGG = ("sum", "avg", "min", "max", "count")
_OVER_TIME = {"max_over_time": "max", "min_over_time": "min", "avg_over_time": "avg",
              "sum_over_time": "sum", "count_over_time": "count", "last_over_time": "last"}
_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_COMPLEXITY = 256  # operators plus nesting levels of one query (see complexity())
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_OPERATORS = re.compile(r"[-+*/%^<>]|[=!]=|\b(?:and|or|unless|atan2)\b", re.IGNORECASE)


class QueryError(Exception):
    """A query that cannot be answered: `error_type` and HTTP `status` as Prometheus uses them."""

    def __init__(self, error_type: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status = status or {"bad_data": 400, "execution": 422, "timeout": 503,
                                 "unavailable": 503}.get(error_type, 422)


def unsupported(what: str) -> QueryError:
    return QueryError("execution", f"{what} is not supported by promvae; supported: {SUPPORTED}")


def complexity(query: str) -> int:
    """Deepest bracket nesting plus the operators outside string literals: a bound on the
    depth of the query's syntax tree, which the parser (native code) and the evaluator walk
    recursively."""
    text = _STRINGS.sub('""', query)
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest + len(_OPERATORS.findall(text))


def parse(query: str) -> pp.Expr:
    """The AST of `query`; QueryError(bad_data) with the parser's message if it is malformed."""
    if not query or not query.strip():
        raise QueryError("bad_data", "empty query: pass a PromQL expression in 'query'")
    # A few thousand nested levels overflow the parser's stack and kill the process.
    if complexity(query) > MAX_COMPLEXITY:
        raise QueryError("bad_data", f"query too complex: more than {MAX_COMPLEXITY} operators "
                         "and nesting levels")
    try:
        return pp.parse(query)
    except (ValueError, RuntimeError) as e:
        raise QueryError("bad_data", f"parse error: {e}") from None


def valid_label_name(name: str) -> bool:
    return bool(_LABEL_NAME.match(name))


# ---- matching -----------------------------------------------------------------------------

def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise QueryError("bad_data", f"invalid regular expression {pattern!r}: {e}") from None


@dataclass(frozen=True)
class LabelMatcher:
    """One matcher: op is "=", "!=", "=~" or "!~"; regexes are anchored like Prometheus'."""

    name: str
    op: str
    value: str
    # Compiled once (a bad regex fails here): matches() runs per series on every query.
    _re: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.op in ("=~", "!~"):
            object.__setattr__(self, "_re", _regex(self.value))

    def matches(self, labels: Mapping[str, str]) -> bool:
        v = labels.get(self.name, "")
        if self._re is None:
            return (v == self.value) == (self.op == "=")
        return (self._re.fullmatch(v) is not None) == (self.op == "=~")


_OPS = ((pp.MatchOp.Equal, "="), (pp.MatchOp.NotEqual, "!="), (pp.MatchOp.Re, "=~"),
        (pp.MatchOp.NotRe, "!~"))  # MatchOp is not hashable


def selector_matchers(sel: pp.VectorSelector) -> list[LabelMatcher]:
    """The matchers of a vector selector, the metric name as a __name__ matcher."""
    if sel.matchers.or_matchers:
        raise unsupported("'or' inside a selector")
    out = [] if sel.name is None else [LabelMatcher("__name__", "=", sel.name)]
    for m in sel.matchers.matchers:
        op = next((text for kind, text in _OPS if m.op == kind), None)
        if op is None:
            raise unsupported(f"matcher {m}")
        out.append(LabelMatcher(m.name, op, m.value))  # a bad regex: bad_data before any work
    return out


def parse_selector(text: str) -> list[LabelMatcher]:
    """Matchers of a match[] parameter, which must be a plain vector selector."""
    expr = parse(text)
    if not isinstance(expr, pp.VectorSelector):
        raise QueryError("bad_data", f"match[] must be a series selector like "
                                     f"anomaly_score{{instance=\"a\"}}, got {text!r}")
    return selector_matchers(expr)


def matches_all(labels: Mapping[str, str], matchers: Sequence[LabelMatcher]) -> bool:
    return all(m.matches(labels) for m in matchers)


# ---- storage and values -------------------------------------------------------------------

class Storage(Protocol):
    """Where selectors read series from: the anomaly_* series of promvae."""

    step: float  # grid of the stored points

    def select(self, matchers: Sequence[LabelMatcher]) -> list[dict[str, str]]:
        """Label sets (with __name__) of the series matching every matcher."""
        ...

    def load(self, series: Sequence[Mapping[str, str]], start: float, end: float) -> np.ndarray:
        """Values of `series` on the grid ceil(start/step)*step ... <= end: (S, N), NaN = none."""
        ...


@dataclass
class Vector:
    """Instant vectors at every evaluation time: labels[i] has values[i] (T,), NaN = absent."""

    labels: list[dict[str, str]]
    values: np.ndarray  # (S, T)


@dataclass
class Matrix:
    """A range vector at one evaluation time: per series, timestamps (N,) and values (N,)."""

    series: list[tuple[dict[str, str], np.ndarray, np.ndarray]]


Value = np.ndarray | Vector | Matrix  # a bare ndarray is a scalar (T,)


def grid_start(t: float, step: float) -> float:
    return math.ceil(t / step - 1e-6) * step


def _window_indices(times: np.ndarray, width: float, g0: float, step: float,
                    n: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid index ranges [lo, hi] of the windows (t - width, t] for t in `times` (T,)."""
    hi = np.floor((times - g0) / step + 1e-9).astype(np.int64)
    lo = np.floor((times - width - g0) / step + 1e-9).astype(np.int64) + 1
    return np.maximum(lo, 0), np.minimum(hi, n - 1)


def window_reduce(grid: np.ndarray, lo: np.ndarray, hi: np.ndarray, how: str) -> np.ndarray:
    """Reduce rows of `grid` (S, N) over index windows [lo, hi] (T,) each -> (S, T).

    NaN points are absent; a window without a point gives NaN. max/min use a sparse table
    built only up to the largest window, so the cost is O(S N log W + S T).
    """
    s, n = grid.shape
    t = len(lo)
    out = np.full((s, t), np.nan)
    ok = (lo <= hi) & (hi >= 0) & (lo < n)
    if not ok.any() or n == 0:
        return out
    lo_c, hi_c = np.clip(lo, 0, n - 1), np.clip(hi, 0, n - 1)
    finite = np.isfinite(grid)
    if how == "last":
        idx = np.where(finite, np.arange(n)[None, :], -1)
        last = np.maximum.accumulate(idx, axis=1)[:, hi_c]  # (S, T)
        good = ok[None, :] & (last >= lo_c[None, :])
        vals = np.take_along_axis(grid, np.maximum(last, 0), axis=1)
        return np.where(good, vals, np.nan)
    if how in ("sum", "count", "avg"):
        zero = np.where(finite, grid, 0.0)
        csum = np.concatenate([np.zeros((s, 1)), np.cumsum(zero, axis=1)], axis=1)
        ccnt = np.concatenate([np.zeros((s, 1)), np.cumsum(finite, axis=1)], axis=1)
        total = csum[:, hi_c + 1] - csum[:, lo_c]
        count = ccnt[:, hi_c + 1] - ccnt[:, lo_c]
        res = {"sum": total, "count": count}.get(how)
        if res is None:
            with np.errstate(invalid="ignore", divide="ignore"):
                res = total / count
        return np.where(ok[None, :] & (count > 0), res, np.nan)
    if how not in ("max", "min"):
        raise ValueError(f"unknown reduction {how!r}")
    fill = -np.inf if how == "max" else np.inf
    fn = np.maximum if how == "max" else np.minimum
    level = np.where(finite, grid, fill)
    length = np.where(ok, hi_c - lo_c + 1, 1)
    k = np.floor(np.log2(length)).astype(np.int64)
    res = np.full((s, t), fill)
    for j in range(int(k[ok].max()) + 1):
        if j:
            width = 1 << (j - 1)
            level = fn(level[:, :-width], level[:, width:]) if level.shape[1] > width else level
        sel = np.nonzero(ok & (k == j))[0]
        if len(sel):
            a = lo_c[sel]
            b = hi_c[sel] - (1 << j) + 1
            res[:, sel] = fn(level[:, a], level[:, b])
    return np.where(np.isfinite(res), res, np.nan)


# ---- evaluation ---------------------------------------------------------------------------

class Evaluator:
    """Evaluates one parsed query at `times` (T,) with `step` (0 for an instant query)."""

    def __init__(self, storage: Storage, times: np.ndarray, step: float,
                 max_series: int = 1000, lookback: float = LOOKBACK) -> None:
        self.storage = storage
        self.times = np.asarray(times, dtype=np.float64)
        self.step, self.max_series, self.lookback = step, max_series, lookback
        self.selected = 0

    def eval(self, e: pp.Expr) -> Value:
        if isinstance(e, pp.NumberLiteral):
            return np.full(len(self.times), float(e.val))
        if isinstance(e, pp.ParenExpr):
            return self.eval(e.expr)
        if isinstance(e, pp.UnaryExpr):
            v = self.eval(e.expr)
            if isinstance(v, Vector):
                return Vector([_drop_name(lab) for lab in v.labels], -v.values)
            if isinstance(v, Matrix):
                raise unsupported("unary minus on a range vector")
            return -v
        if isinstance(e, pp.VectorSelector):
            return self.vector(e)
        if isinstance(e, pp.MatrixSelector):
            return self.matrix(e)
        if isinstance(e, pp.BinaryExpr):
            return self.binary(e)
        if isinstance(e, pp.AggregateExpr):
            return self.aggregate(e)
        if isinstance(e, pp.Call):
            return self.call(e)
        if isinstance(e, pp.StringLiteral):
            raise unsupported("a string literal")
        if isinstance(e, pp.SubqueryExpr):
            raise unsupported("a subquery")
        raise unsupported(f"expression {type(e).__name__}")

    # selectors
    def _select(self, sel: pp.VectorSelector) -> tuple[list[dict[str, str]], np.ndarray]:
        """Matching label sets and the evaluation times shifted by offset / pinned by @."""
        matchers = selector_matchers(sel)
        for m in matchers:
            if m.name == "__name__" and m.op == "=" and m.value not in ALL_METRICS:
                raise QueryError("execution", f"promvae serves only {', '.join(ALL_METRICS)}; "
                                 f"query {m.value!r} in Prometheus itself")
        series = self.storage.select(matchers)
        self.selected += len(series)
        if self.selected > self.max_series:
            raise QueryError("execution", f"the query selects {self.selected} series, more than "
                             f"the limit of {self.max_series}; narrow it with label matchers "
                             f"such as anomaly_query=\"...\"")
        times = self.times
        if sel.at is not None:
            times = np.full(len(times), self._at(sel.at))
        if sel.offset is not None:
            times = times - sel.offset.total_seconds()
        return series, times

    def _at(self, at: pp.AtModifier) -> float:
        if at.type == pp.AtModifierType.Start:
            return float(self.times[0])
        if at.type == pp.AtModifierType.End:
            return float(self.times[-1])
        return at.at.timestamp()

    def _grid(self, series: list[dict[str, str]], lo: float,
              hi: float) -> tuple[float, np.ndarray]:
        step = self.storage.step
        g0 = grid_start(lo, step)
        if not series or hi < g0:
            return g0, np.empty((len(series), 0))
        return g0, np.asarray(self.storage.load(series, lo, hi), dtype=np.float64)

    def vector(self, sel: pp.VectorSelector) -> Vector:
        series, times = self._select(sel)
        width = max(self.step, self.lookback)
        g0, grid = self._grid(series, float(times.min()) - width, float(times.max()))
        n, step = grid.shape[1], self.storage.step
        lo, hi = _window_indices(times, self.lookback, g0, step, n)
        last = window_reduce(grid, lo, hi, "last")
        peak = [i for i, lab in enumerate(series) if lab.get("__name__") in PEAK_METRICS]
        if peak and self.step > 0:
            lo_s, hi_s = _window_indices(times, self.step, g0, step, n)
            top = window_reduce(grid[peak], lo_s, hi_s, "max")
            last[peak] = np.where(np.isnan(top), last[peak], top)
        return Vector([dict(lab) for lab in series], last)

    def matrix(self, ms: pp.MatrixSelector) -> Matrix:
        if len(self.times) != 1:
            raise QueryError("bad_data", "invalid expression type \"range vector\" for range "
                             "query, must be Scalar or instant Vector")
        series, times = self._select(ms.vector_selector)
        rng = ms.range.total_seconds()
        t = float(times[0])
        g0, grid = self._grid(series, t - rng, t)
        ts = g0 + self.storage.step * np.arange(grid.shape[1])
        inside = ts > t - rng
        out = []
        for lab, row in zip(series, grid):
            keep = inside & np.isfinite(row)
            if keep.any():
                out.append((dict(lab), ts[keep], row[keep]))
        return Matrix(out)

    def call(self, c: pp.Call) -> Value:
        name = c.func.name
        if name == "time":
            return self.times.copy()
        if name not in _OVER_TIME:
            raise unsupported(f"function {name}()")
        arg = c.args[0]
        while isinstance(arg, pp.ParenExpr):
            arg = arg.expr
        if not isinstance(arg, pp.MatrixSelector):
            raise unsupported(f"{name}() of anything but a range selector")
        series, times = self._select(arg.vector_selector)
        rng = arg.range.total_seconds()
        g0, grid = self._grid(series, float(times.min()) - rng, float(times.max()))
        lo, hi = _window_indices(times, rng, g0, self.storage.step, grid.shape[1])
        vals = window_reduce(grid, lo, hi, _OVER_TIME[name])
        # Prometheus keeps the metric name of last_over_time (its samples are the series' own).
        keep = name == "last_over_time"
        return Vector([dict(lab) if keep else _drop_name(lab) for lab in series], vals)

    # operators
    def binary(self, b: pp.BinaryExpr) -> Value:
        op = str(b.op)
        lhs, rhs = self.eval(b.lhs), self.eval(b.rhs)
        if isinstance(lhs, Matrix) or isinstance(rhs, Matrix):
            raise unsupported("a binary operator on a range vector")
        if isinstance(lhs, Vector) and isinstance(rhs, Vector):
            raise unsupported("a binary operator between two vectors")
        if op not in _ARITH and op not in _CMP:
            raise unsupported(f"operator {op}")
        return_bool = bool(b.modifier is not None and b.modifier.return_bool)
        vec = lhs if isinstance(lhs, Vector) else rhs if isinstance(rhs, Vector) else None
        a = lhs.values if isinstance(lhs, Vector) else lhs[None, :] if vec is not None else lhs
        c = rhs.values if isinstance(rhs, Vector) else rhs[None, :] if vec is not None else rhs
        with np.errstate(all="ignore"):
            if op in _ARITH:
                res = _ARITH[op](a, c)
                if op == "%":
                    res = np.where(c == 0, np.nan, res)
            else:
                hit = _CMP[op](a, c)
                # A filter keeps the vector's own sample, whichever side the scalar is on.
                res = (hit.astype(np.float64) if return_bool or vec is None
                       else np.where(hit, vec.values, np.nan))
        if vec is None:
            return res
        res = np.where(np.isnan(vec.values), np.nan, res)  # absent stays absent
        keep_name = op in _CMP and not return_bool
        labels = [dict(lab) if keep_name else _drop_name(lab) for lab in vec.labels]
        return Vector(labels, np.broadcast_to(res, vec.values.shape).copy())

    def aggregate(self, a: pp.AggregateExpr) -> Vector:
        op = str(a.op)
        v = self.eval(a.expr)
        if not isinstance(v, Vector):
            raise unsupported(f"{op}() of anything but an instant vector")
        if op in ("topk", "bottomk"):
            k = self.eval(a.param) if a.param is not None else None
            if not isinstance(k, np.ndarray) or not np.isfinite(k).all():
                raise QueryError("bad_data", f"{op}() needs a number as its first argument")
            return self._topk(v, a, k.astype(np.int64), op == "topk")
        if op not in _AGG:
            raise unsupported(f"aggregation {op}()")
        groups, glabels = _groups(v, a)
        out_l, out_v = [], []
        for key, rows in groups.items():
            x = v.values[rows]
            cnt = np.isfinite(x).sum(0)
            with np.errstate(all="ignore"):
                if op == "sum":
                    r = np.nansum(x, 0)
                elif op == "count":
                    r = cnt.astype(np.float64)
                elif op == "avg":
                    r = np.nansum(x, 0) / cnt
                else:
                    fill = -np.inf if op == "max" else np.inf
                    r = (np.max if op == "max" else np.min)(np.where(np.isfinite(x), x, fill), 0)
            out_l.append(glabels[key])
            out_v.append(np.where(cnt > 0, r, np.nan))
        values = np.array(out_v) if out_v else np.empty((0, len(self.times)))
        return Vector(out_l, values)

    def _topk(self, v: Vector, a: pp.AggregateExpr, k: np.ndarray, top: bool) -> Vector:
        out = np.full(v.values.shape, np.nan)
        order: list[int] = []
        for rows in _groups(v, a)[0].values():
            x = v.values[rows]
            key = np.where(np.isnan(x), np.inf, -x if top else x)  # absent sorts last
            by_rank = np.argsort(key, axis=0, kind="stable")
            rank = np.argsort(by_rank, axis=0)
            chosen = (rank < k[None, :]) & np.isfinite(x)
            out[rows] = np.where(chosen, x, np.nan)
            # Prometheus answers an instant topk/bottomk in rank order within each group
            # (highest first for topk); a range keeps the series order.
            order += [rows[i] for i in by_rank[:, 0]] if out.shape[1] == 1 else rows
        return Vector([dict(v.labels[i]) for i in order], out[order])


def _groups(v: Vector, a: pp.AggregateExpr,
            ) -> tuple[dict[tuple, list[int]], dict[tuple, dict[str, str]]]:
    """Rows of `v` per group of the aggregation's by/without clause, and each group's labels."""
    by = a.modifier is None or a.modifier.type == pp.AggModifierType.By
    names = set(a.modifier.labels) if a.modifier is not None else set()
    groups: dict[tuple, list[int]] = {}
    glabels: dict[tuple, dict[str, str]] = {}
    for i, lab in enumerate(v.labels):
        g = {k: val for k, val in lab.items()
             if (k in names if by else k not in names and k != "__name__")}
        key = tuple(sorted(g.items()))
        groups.setdefault(key, []).append(i)
        glabels[key] = g
    return groups, glabels


def _drop_name(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k != "__name__"}


def check_unique(v: Vector) -> None:
    """Prometheus refuses a result with two series of one label set (e.g. after dropping names)."""
    seen: set[tuple] = set()
    for lab, row in zip(v.labels, v.values):
        if not np.isfinite(row).any():
            continue
        key = tuple(sorted(lab.items()))
        if key in seen:
            raise QueryError("execution", "vector cannot contain metrics with the same labelset: "
                             f"{dict(key)}; aggregate or select one anomaly_* metric")
        seen.add(key)


def evaluate(storage: Storage, query: str, times: np.ndarray, step: float,
             max_series: int = 1000) -> Value:
    """Parse and evaluate `query` at `times` (T,); step 0 for an instant query."""
    expr = parse(query)
    ev = Evaluator(storage, times, step, max_series)
    value = ev.eval(expr)
    if isinstance(value, Vector):
        check_unique(value)
    return value
