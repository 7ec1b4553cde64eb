"""The status page's inline SVG chart: well-formed for any input, with each layer drawn."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from grafana_plugin_backend.web.svgchart import nice_ticks, render
from grafana_plugin_backend.web.units import human

NS = "{http://www.w3.org/2000/svg}"
T0 = 1_700_006_400.0


def rows(observed, score, n=None):
    n = n or len(np.atleast_1d(observed))
    obs = np.broadcast_to(np.asarray(observed, dtype=float), (n,)).copy()
    sc = np.broadcast_to(np.asarray(score, dtype=float), (n,)).copy()
    with np.errstate(over="ignore"):  # obs * 1.1 of 1.7e308 is inf on purpose
        return {"timestamp": T0 + 60.0 * np.arange(n), "observed": obs, "expected": obs * 0.9,
                "lower": obs * 0.8, "upper": obs * 1.1, "score": sc,
                "flag": np.where(np.isfinite(sc), (sc >= 1).astype(float), np.nan)}


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg"
    text = svg.lower()
    assert "nan" not in text.replace("nanos", "") and "inf" not in text, svg[:300]
    return root


def classes(root: ET.Element) -> list[str]:
    return [e.get("class", "") for e in root.iter()]


def test_every_layer_is_drawn():
    score = np.r_[np.full(50, 0.3), np.full(5, 2.0), np.full(45, 0.3)]
    obs = 1e9 + 1e8 * np.sin(np.arange(100) / 10)
    obs[20:23] = np.nan  # a gap: the line breaks there
    root = parse(render(rows(obs, score), lambda v: human(v, "bytes"), 60.0,
                        marks=[T0 + 60 * 52], title='a "title" <b>'))
    c = classes(root)
    for name in ("band", "expected", "observed", "score", "threshold", "driver"):
        assert name in c, name
    assert c.count("flag") == 2
    observed = next(e for e in root.iter() if e.get("class") == "observed")
    assert observed.get("d").count("M") == 2  # two segments around the gap
    ticks = [e.text for e in root.iter() if e.get("class") == "tick"]
    assert any(t and t.endswith("MiB") or t and t.endswith("GiB") for t in ticks)
    assert root.find(f"{NS}title").text == 'a "title" <b>'


@pytest.mark.parametrize(("observed", "score", "n"), [
    (np.nan, np.nan, 10), (5.0, 0.5, 1), (5.0, 0.5, 30), (0.0, 0.0, 5),
    (1e300, 1e300, 20), (-1e300, -1e300, 20), (1.7e308, np.inf, 3),
    (np.array([1e-300, 1e300]), np.array([-5.0, 1e9]), None),
    (np.array([-1.7e308, 1.7e308, 0.0]), np.array([-1e308, 1e308, 1.0]), None),
])
def test_any_input_gives_a_well_formed_chart(observed, score, n):
    root = parse(render(rows(observed, score, n), lambda v: human(v, "none"), 60.0))
    assert "frame" in classes(root)


def test_empty_input():
    empty = {k: np.empty(0) for k in ("timestamp", "observed", "expected", "lower", "upper",
                                      "score", "flag")}
    parse(render(empty, str, 60.0))


def test_nice_ticks():
    assert nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(0.13, 0.57) == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert nice_ticks(5, 5) == [5]
    assert nice_ticks(float("nan"), 1) == []
