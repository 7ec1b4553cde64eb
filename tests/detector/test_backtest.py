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
