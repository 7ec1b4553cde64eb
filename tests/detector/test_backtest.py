import csv
import io

import numpy as np
import pytest

from detector import default_train_points
from detector.backtest import CSV_HEADER, infer_step, read_csv, run_backtest_csv
from detector.synthetic import labelled_example


def test_default_train_points_is_nabs_rule():
    assert default_train_points(1000) == 150
    assert default_train_points(10_000) == 750


def test_read_csv_parses_nab_times_unix_and_missing_values():
    raw, ts, vs = read_csv(io.StringIO("timestamp,value\n2014-04-01 00:00:00,1.5\n2014-04-01 00:05:00,\n1396311000,NaN\n"))
    assert raw[0] == "2014-04-01 00:00:00" and ts[0] == 1396310400.0 and ts[1] == 1396310700.0
    assert ts[2] == 1396311000.0 and vs[0] == 1.5 and np.isnan(vs[1]) and np.isnan(vs[2])
    with pytest.raises(ValueError, match="line 2"):
        read_csv(io.StringIO("timestamp,value\nyesterday,1\n"))


def test_infer_step():
    assert infer_step(np.array([0, 300, 600, 1200, 1500.0])) == 300.0


def test_backtest_csv_rows_and_incidents(tiny_config):
    e = labelled_example("level_shift", n=1200, train=600, seed=2, step=300.0)
    src = "timestamp,value\n" + "".join(f"{int(t)},{v}\n" for t, v in zip(e.series.timestamps, e.series.values))
    out = io.StringIO()
    incidents = run_backtest_csv(io.StringIO(src), out, tiny_config, train_points=600)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == CSV_HEADER and len(rows) == 1 + 1200
    w = tiny_config.window
    assert all(r[2] == "" for r in rows[1:w])  # warm-up rows carry no score
    assert all(r[2] != "" for r in rows[w:])
    assert all(r[3] in ("0", "1") for r in rows[w:])
    assert incidents and all(peak >= 1 for _, _, peak in incidents)


def test_first_cut_uses_the_history_before_the_range_or_starts_cold(tiny_config):
    from detector import min_train_points
    from detector.backtest import first_cut
    from detector.series import Series

    need = min_train_points(tiny_config)
    t = 1000.0 + 60.0 * np.arange(400)
    v = np.ones(400)
    assert first_cut(Series(t, v), t[300], tiny_config) == (299, False)
    # too little before the range: a new series to the service, trained once it has `need`
    assert first_cut(Series(t, v), t[10], tiny_config) == (need - 1, True)
    gappy = v.copy()
    gappy[:50] = np.nan  # missing points do not count towards `need`
    assert first_cut(Series(t, gappy), t[0], tiny_config) == (50 + need - 1, True)
    # with a warm-up the first model waits until the series spans it (here 300 points) ...
    assert first_cut(Series(t, v), t[10], tiny_config, warmup=300 * 60.0) == (299, True)
    assert first_cut(Series(t, v), t[350], tiny_config, warmup=300 * 60.0) == (349, False)
    assert first_cut(Series(t, gappy), t[0], tiny_config, warmup=300 * 60.0) == (349, True)
    # ... unless the series is shorter than the warm-up: then as a new series in the service
    assert first_cut(Series(t[:250], v[:250]), t[0], tiny_config, warmup=300 * 60.0) == (need - 1, True)
    with pytest.raises(ValueError, match=f"only 40 observed points; a model needs {need}"):
        first_cut(Series(t[:40], v[:40]), t[0], tiny_config)


@pytest.mark.parametrize("deployed", [True, False])
def test_backtest_range_scores_only_after_the_first_model(tiny_config, deployed):
    from detector.backtest import backtest_range
    from detector.deploy import Deployment
    from detector.series import Series
    from detector.synthetic import inject, seasonal_series

    at, end = 1100, 1136  # three hours far above any daily peak
    g = inject(seasonal_series(1500, step=300.0, seed=3), "level_shift", at, end - at, 80.0)
    start = float(g.timestamps[800])
    short = Series(g.timestamps[:30], g.values[:30])
    dep = Deployment(retrain_every=86400.0, history=3 * 86400.0) if deployed else None
    ok, bad = backtest_range([g, short], [300.0, 300.0], start, tiny_config, dep)
    assert isinstance(bad, ValueError) and "observed points" in str(bad)
    assert not ok.cold_start and ok.first_model_at == start
    assert ok.first_history == 800 * 300.0
    assert np.all(np.isnan(ok.result.score[:800])) and np.all(np.isnan(ok.result.flag[:800]))
    assert np.isfinite(ok.result.score[800:]).all()
    assert (ok.retrains > 0) == deployed
    flagged = np.flatnonzero(ok.result.flag == 1)
    assert flagged.size and np.any((flagged >= at) & (flagged < end + 50))
