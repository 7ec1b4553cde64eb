"""Links into the shipped Grafana dashboards, with a series' labels filled in.

The drill-down dashboard (dashboards/grafana/series-drilldown.json) picks one series with its
`series` variable: the label set of an anomaly_score series as Grafana's query_result writes
it inside the braces (labels sorted, `k="v"` joined by commas), used as `anomaly_*{$series}`.
A link sets it to the series' own labels, so it opens on exactly that series whatever labels
it has (instance, device, job, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlencode

DRILLDOWN_UID = "promvae-drilldown"
DRILLDOWN_SLUG = "promvae-series-drilldown"


def series_selector(labels: Mapping[str, str]) -> str:
    """The drill-down's `series` value: `k="v"` for each label but __name__, sorted, joined
    by commas (as the variable's query_result options have them)."""
    def quote(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return ",".join(f'{k}="{quote(v)}"' for k, v in sorted(labels.items()) if k != "__name__")


def drilldown_url(grafana_url: str, labels: Mapping[str, str], time_range: str = "now-6h") -> str:
    """The drill-down dashboard showing the one series with these (exposed) labels."""
    params = [("var-anomaly_query", labels.get("anomaly_query", "")),
              ("var-series", series_selector(labels)), ("from", time_range), ("to", "now")]
    return f"{grafana_url.rstrip('/')}/d/{DRILLDOWN_UID}/{DRILLDOWN_SLUG}?{urlencode(params)}"
