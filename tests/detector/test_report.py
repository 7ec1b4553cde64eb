import math
import re

import numpy as np

from detector.report import Episode, QueryReport, episodes, format_report, summarize
from detector.scoring import ScoreResult

STEP = 60.0
T0 = 1_700_000_000.0


def result(score: np.ndarray, flag: np.ndarray) -> ScoreResult:
    n = len(score)
    t = T0 + STEP * np.arange(n)
    v = np.ones(n)
    return ScoreResult(t, v, score.copy(), score.copy(), flag.copy(), v, v - 1, v + 1)


def test_episodes_are_runs_of_flags_broken_by_gaps():
    t = np.arange(10.0)
    s = np.array([0, 2, 3, 0, np.nan, 1.5, 1.2, np.nan, 5, 0])
    f = np.array([0, 1, 1, 0, np.nan, 1, 1, np.nan, 1, 0])
    eps = episodes(t, s, f)
    assert eps == [Episode(1, 2, 3.0, 2, 2), Episode(5, 6, 1.5, 5, 2), Episode(8, 8, 5.0, 8, 1)]
    assert episodes(t, s, np.zeros(10)) == []
    # a flag running to the last point still closes its episode
    assert episodes(t[:3], s[:3], np.array([0, 1, 1]))[-1].end == 2


def test_summary_rates_count_only_evaluated_time():
    n = 2 * 1440  # two days at 1 min
    score = np.full(n, 0.2)
    flag = np.zeros(n)
    score[:100] = flag[:100] = np.nan  # warm-up: neither quiet nor flagged
    score[1000:1030], flag[1000:1030] = 4.0, 1.0
    score[2000:2010], flag[2000:2010] = 2.0, 1.0
    score[2005] = 6.5
    rep = summarize("s", result(score, flag), STEP)
    assert rep.evaluated_points == n - 100 and rep.flagged_points == 40
    assert math.isclose(rep.flagged_share, 40 / (n - 100))
    assert math.isclose(rep.episodes_per_day, 2 / ((n - 100) / 1440))
    assert rep.peak == 6.5 and rep.peak_at == T0 + 2005 * STEP
    worst = rep.worst(5)
    assert [e.peak for e in worst] == [6.5, 4.0] and worst[1].points == 30
    assert worst[1].duration(STEP) == 30 * STEP
    assert rep.first_scored == T0 + 100 * STEP


def test_summary_keeps_only_the_requested_range():
    score = np.zeros(100)
    flag = np.zeros(100)
    score[10:20], flag[10:20] = 3.0, 1.0
    rep = summarize("s", result(score, flag), STEP, start=T0 + 50 * STEP)
    assert rep.evaluated_points == 50 and rep.episodes == [] and rep.peak == 0.0


def test_query_report_sorts_by_peak_and_totals():
    quiet = summarize("quiet", result(np.zeros(1440), np.zeros(1440)), STEP)
    s = np.zeros(1440)
    f = np.zeros(1440)
    s[600:660], f[600:660] = 3.0, 1.0
    loud = summarize('{instance="web-2"}', result(s, f), STEP)
    broken = summarize("broken", result(np.full(10, np.nan), np.full(10, np.nan)), STEP)
    broken.error = "not enough data"
    rep = QueryReport("cpu", T0, T0 + 86400, "deployed", [broken, quiet, loud])
    assert [r.name for r in rep.series] == ['{instance="web-2"}', "quiet", "broken"]
    assert rep.episodes == 1 and math.isclose(rep.episodes_per_day, 0.5)
    assert math.isclose(rep.flagged_share, 60 / 2880)
    assert [r.name for r in rep.top(5)] == ['{instance="web-2"}', "quiet"]
    text = format_report(rep)
    assert "backtest of cpu: 2023-11-14 22:13 to 2023-11-15 22:13 UTC (24.0 h), deployed" in text
    # the incident line: start, end (one step after the last flagged point), length, peak
    assert ('{instance="web-2"}: 2023-11-15 08:13 to 2023-11-15 09:13 UTC (1.0 h), '
            'peak 3.00 at 2023-11-15 08:13') in text
    assert re.search(r"\n  broken +not backtested: not enough data\n", text)
    assert "totals: 3 series (1 not backtested)" in text and "1 flag episodes (0.50 per" in text
    assert "2.08% of time flagged" in text


def test_report_without_episodes_says_so():
    quiet = summarize("quiet", result(np.zeros(100), np.zeros(100)), STEP)
    assert "no flag episodes" in format_report(QueryReport("q", T0, T0 + 6000, "m", [quiet]))


def test_notes_shared_by_every_series_are_said_once():
    a = summarize("a", result(np.zeros(100), np.zeros(100)), STEP, note="cold start; 1 adopted")
    b = summarize("b", result(np.zeros(100), np.zeros(100)), STEP, note="cold start")
    text = format_report(QueryReport("q", T0, T0 + 6000, "m", [a, b]))
    assert "notes\n  all 2 series: cold start\n  a: 1 adopted\n" in text
    assert text.count("cold start") == 1
