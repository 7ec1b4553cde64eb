"""The status pages in a real headless browser (Debian's chromium) against `promvae serve`.

promvae runs on the built-in demo source with a tiny model; once series are scored, chromium
loads the series list and a series' page: they render, the chart is there with every layer,
the explanation is shown, no console message at all (errors, warnings, exceptions), nothing
to load that could fail, and the screenshot shows the chart's colours.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from tests import browser
from tests.promstack import PromvaeProcess, require_binary, wait_until

pytestmark = pytest.mark.integration

TINY_ENV = {"PROMVAE_WINDOW": "16", "PROMVAE_HISTORY": "6h", "PROMVAE_MODEL_HIDDEN": "8",
            "PROMVAE_MODEL_LATENT": "2", "PROMVAE_MODEL_MAX_EPOCHS": "2",
            "PROMVAE_MODEL_MAX_STEPS": "8", "PROMVAE_MODEL_MC_SAMPLES": "2",
            "PROMVAE_GRAFANA_URL": "http://grafana.invalid:3000", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_binary(browser.CHROMIUM_BIN, "chromium")  # skips, or fails under CI=true


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[tuple[PromvaeProcess, dict]]:
    pv = PromvaeProcess(tmp_path_factory.mktemp("status-browser"), env=TINY_ENV)
    pv.start()
    try:
        pv.wait_ready(timeout=120)

        def scored() -> dict | None:
            models = pv.get("/api/v1/status/models").json()["data"]
            done = [m for m in models if m["last_score"] is not None]
            return max(done, key=lambda m: m["last_score"]) if done else None

        top = wait_until(scored, timeout=120, description="a scored series")
        yield pv, top
    finally:
        pv.stop(timeout=30)
    assert "Traceback" not in pv.log.read_text()


def test_the_harness_sees_console_errors(chromium):
    page = browser.load("data:text/html,<p>x</p><script>console.error('boom');nope()</script>"
                        "<img src='http://127.0.0.1:9/missing.png'>")
    assert any("boom" in m for m in page.console), page.log[-2000:]
    assert any("nope is not defined" in m for m in page.console), page.console
    assert "<p>x</p>" in page.dom
    assert browser.subresources(page.dom) == ["http://127.0.0.1:9/missing.png"]


def test_series_list_renders_without_console_messages(chromium, service):
    pv, top = service
    page = browser.load(f"{pv.url}/")
    assert page.console == [], page.console
    assert browser.subresources(page.dom) == ["data:,"]  # nothing to load but the blank icon
    assert '<table id="series">' in page.dom
    rows = re.findall(r'<a href="/series/([^"]+)">', page.dom)
    assert top["id"] in rows and len(rows) == len(pv.get("/api/v1/status/models").json()["data"])
    assert 'http://grafana.invalid:3000/d/promvae-drilldown/' in page.dom
    # Filters work in the browser too (a GET form): only ready series of one query.
    page = browser.load(f"{pv.url}/?state=ready&query={quote(top['anomaly_query'])}&sort=query")
    assert page.console == [] and "series shown" in page.dom
    assert set(re.findall(r"<td>([a-z_]+)</td><td><a href=", page.dom)) == {top["anomaly_query"]}


def test_series_page_shows_chart_and_explanation(chromium, service, tmp_path):
    pv, top = service
    url = f"{pv.url}/series/{top['id']}"
    page = browser.load(url)
    assert page.console == [], page.console
    assert browser.subresources(page.dom) == ["data:,"]
    svg = page.dom[page.dom.index('<svg'):page.dom.index("</svg>")]
    assert 'id="chart"' in svg
    observed = re.search(r'class="observed" d="(M[^"]+)"', svg)
    assert observed and observed.group(1).count("L") > 10  # a line through many points
    for layer in ('class="band"', 'class="expected"', 'class="score"', 'class="threshold"'):
        assert layer in svg, layer
    assert '<table id="explanation">' in page.dom and "share of the score" in page.dom
    assert re.search(r"<td class=\"num\">\d+%", page.dom)  # shares as percentages
    assert 'id="grafana" href="http://grafana.invalid:3000/d/promvae-drilldown/' in page.dom

    png = tmp_path / "series.png"
    shot = browser.load(url, screenshot=png, width=1200, height=1100)
    assert shot.console == [], shot.console
    with Image.open(png) as img:  # decodes
        assert img.size == (1200, 1100)
        rgb = np.asarray(img.convert("RGB")).astype(int)

    def share_near(colour: tuple[int, int, int], tol: int = 12) -> float:
        return float(np.mean(np.all(np.abs(rgb - np.array(colour)) <= tol, axis=-1)))

    assert share_near((230, 85, 13)) > 1e-4  # the score line (#e6550d) was painted
    assert share_near((17, 17, 17), 20) > 1e-4  # the observed line (#111)
    assert share_near((255, 255, 255), 0) > 0.3  # and it is a page, not a blank or error tile
