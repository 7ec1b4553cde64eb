"""Regular retrains at each series' own slot: the replay (detector.deploy) takes the slots
the service uses (trainer.regular_due_at; tests/service/test_trainer.py checks the two agree)."""

import numpy as np
import pytest

from detector import VAEConfig
from detector.deploy import Deployment, deployed_many, next_regular, retrain_phase
from detector.series import Series

DAY = 86400.0
TINY = VAEConfig(window=16, hidden=(8,), latent=2, score_scales=(4,), max_epochs=2, max_steps=10,
                 mc_samples=2)


def test_next_regular_keeps_a_phase_and_waits_at_least_half_an_interval():
    every, phase = 6 * 3600.0, 1234.0
    t = next_regular(1.7e9, every, phase)
    assert (t - phase) % every == pytest.approx(0.0, abs=1e-6)
    assert every / 2 <= t - 1.7e9 < 1.5 * every
    # Retrained at (or a little after) its slot, the next slot is one interval on.
    assert next_regular(t + 120, every, phase) == pytest.approx(t + every)
    # A stable hash of the id, spread over the interval.
    phases = [retrain_phase(f"q-{i}", every) for i in range(2000)]
    assert retrain_phase("q-7", every) == phases[7]
    assert min(phases) >= 0 and max(phases) < every
    assert np.histogram(phases, bins=6, range=(0, every))[0].min() > 250


def test_the_replay_retrains_at_the_given_phase():
    step = 300.0
    t = 1.7e9 + step * np.arange(int(4 * DAY / step))
    grid = Series(t, np.sin(2 * np.pi * t / DAY) + 0.1 * np.cos(t / 777.0))
    cut = int(DAY / step)
    dep = Deployment(retrain_every=DAY, history=DAY, adapt_after=None, calibrate=False)
    phase = retrain_phase("q-abc", DAY)
    (r,) = deployed_many([grid], [cut], [step], TINY, dep, phases=[phase])
    want, last = [], float(t[cut + 1])
    while (slot := next_regular(last, DAY, phase)) <= t[-1]:
        last = float(t[np.searchsorted(t, slot - 1e-6)])
        want.append(last)
    assert r.retrains == want and len(want) >= 2
    (default,) = deployed_many([grid], [cut], [step], TINY, dep)  # the first model's phase
    assert default.retrains == [float(t[cut + 1] + k * DAY) for k in (1, 2)]


def test_backtest_range_hands_the_phases_to_the_replay(monkeypatch):
    from detector import backtest as bt

    seen = {}

    def spy(grids, cuts, steps, config, deployment, progress=None, phases=None):
        seen["phases"] = phases
        return [ValueError("stop")] * len(grids)

    monkeypatch.setattr(bt, "deployed_many", spy)
    step = 300.0
    t = 1.7e9 + step * np.arange(int(3 * DAY / step))
    grids = [Series(t, np.sin(t / 900.0 + i)) for i in range(2)]
    bt.backtest_range(grids, [step] * 2, t[0] + 2 * DAY, TINY, Deployment(), phases=[5.0, 7.0])
    assert seen["phases"] == [5.0, 7.0]
