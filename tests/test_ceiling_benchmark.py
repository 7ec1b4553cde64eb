"""benchmarks/ceiling.py: the oracle that alerts from each labelled anomaly for a hold."""

import numpy as np
import pytest

from benchmarks import ceiling, nab

STEP = 60.0


def _series(n: int = 100, window: tuple[int, int] = (40, 60)) -> nab.Series:
    labels = np.zeros(n, dtype=np.int8)
    labels[window[0]:window[1]] = 1
    return nab.Series(key="toy/a.csv", category="toy", timestamps=np.arange(n) * STEP,
                      values=np.zeros(n), labels=labels, train_points=0)


def test_oracle_holds_from_the_anomaly_and_stops_at_the_window_end() -> None:
    s = _series()
    t0 = 50 * STEP
    assert np.flatnonzero(ceiling.oracle_scores(s.timestamps, s.labels, [t0], 300.0)).tolist() \
        == list(range(50, 55))
    # A hold longer than the window is cut at its end; None holds to the end.
    for hold in (3600.0, None):
        assert np.flatnonzero(ceiling.oracle_scores(s.timestamps, s.labels, [t0], hold)).tolist() \
            == list(range(50, 60))
    # An anomaly outside every window marks nothing.
    assert not ceiling.oracle_scores(s.timestamps, s.labels, [10 * STEP], None).any()


def test_ceiling_is_the_average_precision_of_the_oracle() -> None:
    # 20 window points, 5 held at 1: precision 1 up to recall 1/4, then the tied zeros at the
    # base rate 20/100 for the other 3/4: AP = 0.25 + 0.75 * 0.2.
    (short, full) = ceiling.ceiling([_series()], {"toy/a.csv": [50 * STEP]}, [300.0, None])
    assert short["auc_pr"] == pytest.approx(0.25 + 0.75 * 0.2)
    assert short["categories"] == {"toy": pytest.approx(short["auc_pr"])}
    assert full["auc_pr"] == pytest.approx(0.5 + 0.5 * 0.2)


def test_hold_parsing() -> None:
    assert ceiling.parse_hold("3h") == 10800.0 and ceiling.parse_hold("90m") == 5400.0
    assert ceiling.parse_hold("window") is None
    with pytest.raises(ValueError, match="give a duration"):
        ceiling.parse_hold("3x")
