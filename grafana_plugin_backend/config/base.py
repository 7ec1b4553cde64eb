"""What every config file shares: the error type, durations, YAML reading, URL redaction, units.

The bottom of the package: the service config (settings.py) and the web config (web.py) both
build on it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

# Units a query's values may be declared in (`queries[].unit`); web/units.py formats them.
UNITS = ("bytes", "bytes_per_second", "seconds", "ratio", "percent", "none")

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
          "y": 31536000.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")

class ConfigError(ValueError):
    """A config with one or more bad keys; `errors` lists one sentence per key."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = list(errors)
        super().__init__(f"invalid {source}:\n" + "\n".join(f"  - {e}" for e in self.errors))


def parse_duration(value: Any) -> float:
    """Seconds from a Prometheus-style duration ("60s", "1h30m", "7d") or a plain number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(
                    f"not a duration: {value!r} (use e.g. 60s, 5m, 24h, 7d)") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {value!r} (must be finite and not negative)")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact Prometheus-style spelling of `seconds` ("7d", "90s")."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds:g}s"


def read_yaml_mapping(path: str | Path, source: str) -> dict[str, Any]:
    """The top-level mapping of YAML file `path` ({} if empty); ConfigError naming `source`."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError([f"cannot read {path}: {e.strerror}"], source) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], source) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(["top level must be a mapping of keys"], source)
    return loaded or {}


def redact_url(url: str) -> str:
    """`url` without credentials in its user-info part (http://user:pw@host -> http://host)."""
    return re.sub(r"^(\w+://)[^/@]*@", r"\1", url)
