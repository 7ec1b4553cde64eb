"""Links into the shipped Grafana dashboards, with a series' labels filled in.

The drill-down dashboard (dashboards/grafana/series-drilldown.json) picks series with the
variables anomaly_query, label and value, plus the ad-hoc filter variable `filters`; a link
for one series sets label=anomaly_query (so value is the query) and one ad-hoc filter per
other label, which selects exactly that series whatever labels it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlencode

DRILLDOWN_UID = "promvae-drilldown"
DRILLDOWN_SLUG = "promvae-series-drilldown"


def adhoc_filter(key: str, value: str) -> str:
    """One ad-hoc filter as Grafana writes it in URLs: key|=|value ("|" in values escaped)."""
    return f"{key}|=|{value.replace('|', '__gfp__')}"


def drilldown_url(grafana_url: str, labels: Mapping[str, str], time_range: str = "now-6h") -> str:
    """The drill-down dashboard showing the one series with these (exposed) labels."""
    query = labels.get("anomaly_query", "")
    params = [("var-anomaly_query", query), ("var-label", "anomaly_query"), ("var-value", query)]
    params += [("var-filters", adhoc_filter(k, v)) for k, v in sorted(labels.items())
               if k not in ("anomaly_query", "__name__")]
    params += [("from", time_range), ("to", "now")]
    base = grafana_url.rstrip("/")
    return f"{base}/d/{DRILLDOWN_UID}/{DRILLDOWN_SLUG}?{urlencode(params)}"
