import numpy as np
import pytest
from PIL import Image

from detector.plot import META_PANELS, META_SERIES, build_figure, write_plot
from detector.report import QueryReport, summarize
from detector.scoring import ScoreResult

STEP = 60.0
T0 = 1_700_000_000.0


def result(peak: float, n: int = 1440) -> ScoreResult:
    t = T0 + STEP * np.arange(n)
    v = 10 + np.sin(np.arange(n) / 100)
    score = np.full(n, 0.2)
    score[:20] = np.nan
    score[700:740] = peak
    flag = np.where(np.isfinite(score), (score >= 1).astype(float), np.nan)
    return ScoreResult(t, v, score, score, flag, v, v - 1, v + 1)


def report(peaks: dict[str, float]) -> tuple[QueryReport, dict[str, ScoreResult]]:
    results = {name: result(p) for name, p in peaks.items()}
    reps = [summarize(name, r, STEP) for name, r in results.items()]
    return QueryReport("q", T0, T0 + 1440 * STEP, "deployed", reps), results


@pytest.mark.parametrize("top, panels", [(2, 4), (3, 6), (10, 6)])
def test_png_decodes_with_two_panels_per_top_series(tmp_path, top, panels):
    rep, results = report({"a": 3.0, "b": 0.5, "c": 7.0})
    path = tmp_path / "r.png"
    assert write_plot(path, rep, results, top=top) == panels
    with Image.open(path) as img:
        img.load()  # decodes every byte, not just the header
        assert img.format == "PNG" and img.width > 500
        assert img.height > 150 * panels  # the figure grows with its panels
        assert img.text[META_PANELS] == str(panels)
        shown = img.text[META_SERIES].split("\n")
    assert shown == ["c", "a", "b"][: panels // 2]  # by peak score, highest first
    fig = build_figure(rep, results, top)
    assert len(fig.axes) == panels


def test_flag_episodes_are_shaded_and_threshold_drawn(tmp_path):
    rep, results = report({"a": 3.0})
    fig = build_figure(rep, results, 1)
    obs, score = fig.axes
    # one shaded span per episode on both panels, and the 1.0 line on the score panel
    assert len(obs.patches) == 1 and len(score.patches) == 1
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in score.lines)


def test_nothing_scored_still_writes_a_png(tmp_path):
    rep, results = report({})
    path = tmp_path / "empty.png"
    assert write_plot(path, rep, results) == 0
    with Image.open(path) as img:
        img.load()
        assert img.text[META_PANELS] == "0"
