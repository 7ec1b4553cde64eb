"""promvae's detector core: per-series windowed conditional VAEs, trained in batches.

Knows nothing of HTTP or Prometheus. The contract is pyod-like:

    models = fit_many(series, step, config)     # one batched training for K series
    results = score_many(models, series)        # one batched scoring pass
    save_model(models[0], "models", "cpu_busy-1a2b") / load_model("models", "cpu_busy-1a2b")

and, for one series, `Detector(config).fit(values, timestamps)` with `decision_function`,
`score`, `predict` and `threshold_`.
"""

from .backtest import backtest_many, backtest_series, default_train_points
from .config import VAEConfig, lead_in_points, min_train_points
from .estimator import Detector
from .explain import Explanation, explain_window
from .fitted import SeriesModel
from .scoring import ScoreResult, score_many
from .series import Series, regularize
from .store import FORMAT_VERSION, ModelFileError, load_model, save_model
from .train import InsufficientDataError, fit_many

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "Detector",
    "Explanation",
    "InsufficientDataError",
    "ModelFileError",
    "ScoreResult",
    "Series",
    "SeriesModel",
    "VAEConfig",
    "backtest_many",
    "backtest_series",
    "default_train_points",
    "explain_window",
    "fit_many",
    "lead_in_points",
    "load_model",
    "min_train_points",
    "regularize",
    "save_model",
    "score_many",
]
