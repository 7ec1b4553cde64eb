"""promvae's service: polls Prometheus, trains per-series VAEs, exposes anomaly scores."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("promvae")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"
