"""Operational endpoints: /-/healthy, /-/ready, the model status API and the HTML status pages
(the list of series, filtered and sorted, and a page per series with its chart and what drives
its score)."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template_string, request
from markupsafe import Markup

from .. import __version__
from ..query.explain import explain
from ..query.promql import QueryError
from ..service.feedback import describe_feedback
from ..service.progress import FirstScore, first_score, human_wait
from ..service.registry import FAILED, INSUFFICIENT, PENDING, READY, STATES, SeriesState
from . import svgchart
from .links import drilldown_url
from .units import guess_unit, human

log = logging.getLogger(__name__)

bp = Blueprint("status", __name__)


def _num(x: float | None) -> float | None:
    """JSON-safe number: NaN and ±Inf become null."""
    return float(x) if x is not None and math.isfinite(x) else None


def _iso(t: float | None) -> str:
    if t is None or not math.isfinite(t):
        return ""
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _calibration(s: SeriesState) -> dict[str, Any] | None:
    """The streaming threshold and the new-normal policy's state of a series."""
    c = s.calibrator
    if c is None:
        return None
    return {
        # In model-normalised units: anomaly_score = (x - baseline) / (threshold - baseline).
        "threshold": _num(c.threshold), "baseline": _num(c.baseline),
        "reference_points": len(c.reference) * c.stride,
        "flagged_since": _num(c.run_start) if c.run else None,
        "adaptations": c.adaptations,
        "last_adapted_at": _num(c.adapted_at[-1]) if c.adapted_at else None,
        "early_retrain_pending": bool(s.adapt_requested),
    }


def model_status(s: SeriesState, first: FirstScore | None = None) -> dict[str, Any]:
    """One series' entry in GET /api/v1/status/models (call under the registry lock);
    `first`: when a series without scores gets its first (see progress.py)."""
    m, last = s.model, s.last_result()
    return {
        "id": s.id,
        "anomaly_query": s.query,
        "labels": dict(s.labels),
        "state": s.state,
        "origin": s.model_origin or None,
        "trained_at": _num(m.trained_at) if m is not None else None,
        "trained_from": _num(m.trained_from) if m is not None else None,
        "trained_to": _num(m.trained_to) if m is not None else None,
        "training_points": m.n_train if m is not None else None,
        "threshold": _num(m.threshold_) if m is not None else None,
        "calibration": _calibration(s),
        "feedback": describe_feedback(s.feedback),
        "last_score": _num(last["score"]) if last else None,
        "last_flag": _num(last["flag"]) if last else None,
        "last_observed": _num(last["observed"]) if last else None,
        "last_scored_at": _num(last["timestamp"]) if last else None,
        "scored_to": _num(s.scored_to),
        "last_present": _num(s.last_present),
        "observed_points": s.observed_estimate,
        "train_failures": s.train_failures,
        "last_error": s.last_error or None,
        "first_score": None if first is None else {
            "observed_points": first.observed, "needed_points": first.needed,
            "expected_at": _num(first.expected_at), "text": first.text},
    }


def _error(status: int, error_type: str, message: str) -> tuple[Response, int]:
    return jsonify(status="error", errorType=error_type, error=message), status


@bp.get("/-/healthy")
def healthy() -> Response:
    return Response("promvae is Healthy.\n", mimetype="text/plain")


@bp.get("/-/ready")
def ready() -> tuple[Response, int]:
    """Ready: stored models are loaded and every known series has had its first training
    attempt. Ready with 0 models means promvae works and waits for history: the second line
    says how many series are scored and when the first of the others will be."""
    svc = current_app.extensions["promvae"]
    if not svc.is_ready():
        counts = svc.registry.counts_by_state()
        total = sum(counts.values())
        # A large first training runs in batches: say how far it is.
        progress = (f" ({counts[READY]} of {total} series trained, {svc.trainer.queued} queued)"
                    if total else "")
        return Response(f"promvae is not ready: loading or training the first models{progress}."
                        "\n", mimetype="text/plain"), 503
    now = svc.clock()
    with svc.registry.lock:
        series = svc.registry.all()
        firsts = [f for f in (first_score_of(svc, s, now) for s in series) if f is not None]
    line = f"{len(series) - len(firsts)} of {len(series)} series scored"
    soonest = min((f.expected_at for f in firsts if math.isfinite(f.expected_at)), default=None)
    if firsts:
        line += f"; {len(firsts)} waiting"
        if soonest is not None:
            line += f", the next first score in {human_wait(soonest - now)}"
        line += " (see /api/v1/status/models)"
    return Response(f"promvae is Ready.\n{line}.\n", mimetype="text/plain"), 200


@bp.get("/api/v1/openapi.yaml")
def openapi() -> Response:
    """promvae's HTTP API as an OpenAPI 3.0 document (package data)."""
    text = resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")
    return Response(text, mimetype="application/yaml")


@bp.get("/api/v1/status/models")
def models() -> Response:
    svc = current_app.extensions["promvae"]
    query = request.args.get("anomaly_query")
    state = request.args.get("state")
    now = svc.clock()
    with svc.registry.lock:
        data = [model_status(s, first_score_of(svc, s, now)) for s in svc.registry.all()
                if (query is None or s.query == query) and (state is None or s.state == state)]
    return jsonify(status="success", data=data)


@bp.get("/api/v1/status/models/<sid>")
def model(sid: str) -> Response | tuple[Response, int]:
    svc = current_app.extensions["promvae"]
    with svc.registry.lock:
        s = svc.registry.get(sid)
        if s is None:
            return _error(404, "not_found", f"no live series with id {sid!r}")
        data = model_status(s, first_score_of(svc, s, svc.clock()))
        recent = {k: v.copy() for k, v in s.recent.items()}
    names = ("timestamp", "observed", "score", "flag", "expected", "lower", "upper")
    n = len(recent.get("timestamp", []))
    data["recent"] = {"fields": list(names),
                      "values": [[_num(float(recent[k][i])) for k in names] for i in range(n)]}
    return jsonify(status="success", data=data)


# ---- the HTML status page -----------------------------------------------------------------

SORTS = ("score", "state", "query", "trained")
ANOMALOUS = "anomalous"  # pseudo-state of the filter: score >= 1 now
_STATE_ORDER = {st: i for i, st in enumerate((FAILED, INSUFFICIENT, PENDING, READY))}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:14px}td,th{padding:3px 9px;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top}th{background:#f4f4f4}.hot{background:#fdd}.hot td.num.score
{font-weight:bold}.num{text-align:right;white-space:nowrap}code{font-size:13px}.muted{color:#777}
form.filters{margin:.8em 0;display:flex;gap:.8em;align-items:center;flex-wrap:wrap}
.share{display:inline-block;height:10px;background:#e6550d;vertical-align:middle}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dl.facts dt{color:#555}
dl.facts dd{margin:0}a{color:#1f5fa8}
"""

_INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="30">
<link rel="icon" href="data:,">
<title>promvae</title><style>{{ style }}</style></head><body>
<h1>promvae <small class="muted">{{ version }}</small></h1>
<p>Source: <b>{{ origin }}</b> &middot; {{ total }} series &middot;
{% for st, c in counts.items() %}{{ st }}: {{ c }}{% if not loop.last %}, {% endif %}{% endfor %}
&middot; {{ "ready" if ready else "not ready yet (loading or training the first models)" }}
&middot; {{ anomalous }} anomalous now</p>
<p>Last successful poll: {{ last_poll or "none yet" }}. Training: {{ training }}.</p>
<p><a href="/metrics">/metrics</a>
&middot; <a href="/api/v1/status/models">/api/v1/status/models</a>
&middot; <a href="/-/ready">/-/ready</a>
{% if grafana %}&middot; <a href="{{ grafana }}">Grafana</a>{% endif %}</p>
<form class="filters" method="get" action="/">
<label>State <select name="state" id="state">
<option value="">all</option>
{% for st in states %}<option value="{{ st }}"{% if st == f_state %} selected{% endif %}>{{ st }}
</option>{% endfor %}</select></label>
<label>Query <select name="query" id="query"><option value="">all</option>
{% for qn in queries %}<option{% if qn == f_query %} selected{% endif %}>{{ qn }}</option>
{% endfor %}</select></label>
<label>Labels contain <input name="q" id="q" value="{{ f_text }}" size="18"></label>
<label>Sort by <select name="sort" id="sort">
{% for so in sorts %}<option{% if so == f_sort %} selected{% endif %}>{{ so }}</option>
{% endfor %}</select></label>
<button type="submit">Apply</button>
{% if filtered %}<span class="muted">{{ rows|length }} of {{ total }} series shown
&middot; <a href="/">clear</a></span>{% endif %}
</form>
<table id="series"><tr><th>query</th><th>labels</th><th>state</th><th class="num">score</th>
<th>flag</th><th class="num">observed</th><th class="num">expected [lower, upper]</th>
<th>model trained</th>{% if grafana %}<th></th>{% endif %}</tr>
{% for r in rows %}<tr{% if r.hot %} class="hot"{% endif %}>
<td>{{ r.query }}</td><td><a href="/series/{{ r.id }}"><code>{{ r.labels or "(no labels)" }}</code>
</a></td><td>{{ r.state }}{% if r.error %}<br><small class="muted">{{ r.error }}</small>{% endif %}
{% if r.eta %}<br><small class="muted">{{ r.eta }}</small>{% endif %}</td>
<td class="num score">{{ r.score }}</td><td>{{ r.flag }}</td><td class="num">{{ r.observed }}</td>
<td class="num">{{ r.band }}</td><td>{{ r.trained }}</td>
{% if grafana %}<td><a href="{{ r.grafana }}">Grafana</a></td>{% endif %}</tr>
{% endfor %}</table>
{% if not rows %}<p class="muted">No series {{ "match the filters" if filtered else "yet" }}.</p>
{% endif %}
<p class="muted">Scores are normalised: 1.0 is the learned threshold of each series.
Rows with a score of 1 or more are highlighted; click a series for its chart and what drives
its score. This page refreshes every 30 s.</p>
</body></html>"""

_SERIES = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="60">
<link rel="icon" href="data:,">
<title>promvae: {{ query }} {{ labels }}</title><style>{{ style }}{{ chart_css }}</style>
</head><body>
<p><a href="/">&larr; all series</a></p>
<h1>{{ query }} <small><code>{{ labels or "(no labels)" }}</code></small></h1>
<dl class="facts" id="facts">
<dt>state</dt><dd>{{ state }}{% if error %} <span class="muted">({{ error }})</span>{% endif %}
</dd>
{% if eta %}<dt>first score</dt><dd id="eta">{{ eta }}</dd>{% endif %}
{% if last %}<dt>now</dt><dd>score <b>{{ last.score }}</b>{% if last.flagged %}, flagged{% endif %}
&middot; observed {{ last.observed }} &middot; expected {{ last.expected }}
[{{ last.lower }}, {{ last.upper }}] <span class="muted">at {{ last.time }}</span></dd>{% endif %}
{% if model %}<dt>model</dt><dd>trained {{ model.trained }} on {{ model.span }} of history
({{ model.points }} points), {{ model.origin }}</dd>{% endif %}
<dt>unit</dt><dd>{{ unit }}</dd>
{% if grafana %}<dt>Grafana</dt><dd><a id="grafana" href="{{ grafana }}">open the drill-down
dashboard</a></dd>{% endif %}
<dt>JSON</dt><dd><a href="/api/v1/status/models/{{ sid }}">status</a> &middot;
<a href="/api/v1/explain?series={{ sid }}">explanation</a></dd>
</dl>
{% if chart %}<h2>Last {{ chart_span }}</h2>{{ chart }}
<p class="muted">Black: observed; dashed blue: expected, shaded blue: its band; orange: anomaly
score, dashed red: its threshold 1.0; red shading: flagged; red circles: the points that
drive the newest score.</p>
{% else %}<p class="muted" id="nochart">No scores yet.</p>{% endif %}
<h2>What drives the newest score</h2>
{% if explanation %}<p id="explain-summary">At {{ explanation.time }} the score is
<b>{{ explanation.score }}</b>. It averages {{ explanation.windows }} windows of
{{ explanation.window }} points; each point counts by how far it lies from what the model
expects there. The points with the largest shares:</p>
<table id="explanation"><tr><th>time (UTC)</th><th class="num">observed</th>
<th class="num">expected [lower, upper]</th><th class="num">share of the score</th></tr>
{% for p in explanation.top %}<tr{% if p.outside %} class="hot"{% endif %}><td>{{ p.time }}</td>
<td class="num">{{ p.observed }}</td><td class="num">{{ p.band }}</td>
<td class="num">{{ p.share }} <span class="share" style="width:{{ p.width }}px"></span></td></tr>
{% endfor %}</table>
{% else %}<p class="muted" id="explain-none">{{ explain_error }}</p>{% endif %}
</body></html>"""


def _fmt(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _ago(t: float, now: float) -> str:
    if not math.isfinite(t):
        return ""
    d = max(0.0, now - t)
    for size, name in ((86400, "d"), (3600, "h"), (60, "min")):
        if d >= size:
            return f"{d / size:.0f} {name} ago"
    return f"{d:.0f} s ago"


def unit_of(svc: Any, query: str) -> str:
    """The unit of a query's values: its `unit:` key, else guessed from its expression."""
    cache = svc.__dict__.setdefault("_units", {})
    if query not in cache:
        q = next((q for q in svc.queries if q.name == query), None)
        cache[query] = (q.unit or guess_unit(q.expr)) if q is not None else "none"
    return cache[query]


def first_score_of(svc: Any, s: SeriesState, now: float) -> FirstScore | None:
    """When `s` gets its first score, if it has none (call under the registry lock)."""
    recent = s.recent.get("timestamp")
    return first_score(s, step=float(svc.cfg.step), min_points=svc.trainer.min_points, now=now,
                       retry_after=svc.trainer.retry_after,
                       has_scores=recent is not None and len(recent) > 0)


def first_score_text(svc: Any, s: SeriesState, now: float) -> str:
    fs = first_score_of(svc, s, now)
    return fs.text if fs is not None else ""


def _labels_text(s: SeriesState) -> str:
    return ", ".join(f'{k}="{v}"' for k, v in sorted(s.exposed.items()) if k != "anomaly_query")


def _bad(message: str) -> Response:
    return Response(message + "\n", status=400, mimetype="text/plain")


def _grafana(svc: Any, s: SeriesState) -> str:
    base = svc.cfg.grafana_url
    return drilldown_url(base, s.exposed) if base else ""


@bp.get("/")
def index() -> Response | str:
    svc = current_app.extensions["promvae"]
    f_state = request.args.get("state", "")
    f_query = request.args.get("query", "")
    f_text = request.args.get("q", "")
    f_sort = request.args.get("sort", "") or "score"
    if f_state not in ("", ANOMALOUS, *STATES):
        return _bad(f"unknown state {f_state[:100]!r}: use {ANOMALOUS}, {', '.join(STATES)}")
    if f_sort not in SORTS:
        return _bad(f"unknown sort {f_sort[:100]!r}: use {', '.join(SORTS)}")
    names = [q.name for q in svc.queries]
    now = svc.clock()
    rows, total, anomalous = [], 0, 0
    with svc.registry.lock:
        for s in svc.registry.all():
            total += 1
            last, m = s.last_result(), s.model
            score = last["score"] if last else math.nan
            hot = math.isfinite(score) and score >= 1.0
            anomalous += hot
            labels = _labels_text(s)
            if f_query and s.query != f_query:
                continue
            if f_state == ANOMALOUS and not hot or f_state not in ("", ANOMALOUS, s.state):
                continue
            if f_text and f_text.lower() not in f"{s.query} {labels}".lower():
                continue
            unit = unit_of(svc, s.query)
            band = ""
            if last and math.isfinite(last["expected"]):
                band = (f"{human(last['expected'], unit)} [{human(last['lower'], unit)}, "
                        f"{human(last['upper'], unit)}]")
            rows.append({
                "id": s.id, "query": s.query, "state": s.state, "error": s.last_error,
                "eta": first_score_text(svc, s, now), "labels": labels,
                "score": _fmt(score), "sort": score if math.isfinite(score) else -math.inf,
                "hot": hot, "flag": _fmt(last["flag"]) if last else "",
                "observed": human(last["observed"], unit) if last else "", "band": band,
                "trained": _ago(m.trained_at, now) if m is not None else "",
                "trained_at": m.trained_at if m is not None else -math.inf,
                "grafana": _grafana(svc, s),
            })
        counts = svc.registry.counts_by_state()
    keys = {
        "score": lambda r: (-r["sort"], r["query"], r["labels"]),
        "state": lambda r: (_STATE_ORDER.get(r["state"], 9), -r["sort"], r["query"], r["labels"]),
        "query": lambda r: (r["query"], r["labels"]),
        "trained": lambda r: (-r["trained_at"], r["query"], r["labels"]),
    }
    rows.sort(key=keys[f_sort])
    sample = svc.metrics_registry.get_sample_value
    last_poll = sample("promvae_last_successful_poll_timestamp_seconds") or 0.0
    progress = sample("promvae_training_progress_ratio") or 0.0
    batch = int(sample("promvae_training_batch_series") or 0)
    queued = int(sample("promvae_training_queue_series") or 0)
    training = f"{batch} series, {progress:.0%} done" if batch else "idle"
    if queued > batch:
        training += f"; {queued} series queued in all"
    return render_template_string(
        _INDEX, style=_STYLE, version=__version__, origin=svc.source.describe(), total=total,
        counts=counts, ready=svc.is_ready(), anomalous=anomalous,
        last_poll=_iso(last_poll) if last_poll else "", training=training, rows=rows,
        states=(ANOMALOUS, *STATES), queries=names, sorts=SORTS, f_state=f_state,
        f_query=f_query, f_text=f_text, f_sort=f_sort,
        filtered=bool(f_state or f_query or f_text), grafana=svc.cfg.grafana_url)


CHART_FIELDS = ("timestamp", "observed", "expected", "lower", "upper", "score", "flag")


@bp.get("/series/<sid>")
def series_page(sid: str) -> Response | str | tuple[str, int]:
    svc = current_app.extensions["promvae"]
    now = svc.clock()
    with svc.registry.lock:
        s = svc.registry.get(sid)
        if s is None:
            return Response(f"no live series with id {sid[:200]!r}; see / for the list\n",
                            status=404, mimetype="text/plain")
        recent = {k: s.recent[k].copy() for k in CHART_FIELDS if k in s.recent}
        m, state, error, last = s.model, s.state, s.last_error, s.last_result()
        eta = first_score_text(svc, s, now)
    unit = unit_of(svc, s.query)

    def fmt(v: float) -> str:
        return human(v, unit)

    explanation, explain_error, marks = None, "", []
    if m is not None and state == READY and last is not None:
        try:
            ex = explain(svc, s)
        except QueryError as e:
            explain_error = f"No explanation: {e}"
        except Exception as e:
            log.exception("explaining %s for its status page failed", s.id)
            explain_error = f"No explanation: internal error ({type(e).__name__}); see the log"
        else:
            top = []
            for p in ex["top"]:
                inside = (p["observed"] is not None and p["lower"] is not None
                          and p["lower"] <= p["observed"] <= p["upper"])
                top.append({"time": _iso(p["timestamp"]), "observed": fmt(p["observed"]),
                            "band": f"{fmt(p['expected'])} [{fmt(p['lower'])}, "
                                    f"{fmt(p['upper'])}]",
                            "share": f"{(p['share'] or 0.0):.0%}",
                            "width": round(120 * (p["share"] or 0.0)),
                            "outside": not inside})
            marks = [p["timestamp"] for p in ex["top"][:3] if (p["share"] or 0) >= 0.1]
            explanation = {"time": _iso(ex["time"]), "score": _fmt(ex["score"]),
                           "window": ex["window"], "windows": ex["windows"], "top": top}
    else:
        explain_error = "No explanation before the first scored point."
    chart, chart_span = "", ""
    if recent and len(recent.get("timestamp", ())):
        title = f"{s.query} {_labels_text(s)}: observed, expected band, anomaly score"
        chart = Markup(svgchart.render(recent, fmt, float(svc.cfg.step), marks, title))
        chart_span = human_wait(max(float(recent["timestamp"][-1] - recent["timestamp"][0]),
                                    float(svc.cfg.step))).removeprefix("about ")
    facts_last = None
    if last is not None:
        facts_last = {"score": _fmt(last["score"]), "flagged": last["flag"] >= 1,
                      "observed": fmt(last["observed"]), "expected": fmt(last["expected"]),
                      "lower": fmt(last["lower"]), "upper": fmt(last["upper"]),
                      "time": _iso(last["timestamp"])}
    model = None
    if m is not None:
        model = {"trained": _ago(m.trained_at, now), "origin": s.model_origin or "",
                 "span": human_wait(max(0.0, m.trained_to - m.trained_from + m.step)
                                    ).removeprefix("about "),
                 "points": m.n_train}
    return render_template_string(
        _SERIES, style=_STYLE, chart_css=svgchart.CSS, query=s.query, labels=_labels_text(s),
        sid=s.id, state=state, error=error, eta=eta, last=facts_last, model=model, unit=unit,
        grafana=_grafana(svc, s), chart=chart, chart_span=chart_span, explanation=explanation,
        explain_error=explain_error)
