"""Alertmanager's v2 API, read only: the silences promvae takes feedback from."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import requests

from ..config.base import redact_url

MAX_RESPONSE_BYTES = 16 * 2**20  # a silences list bigger than this is refused, not parsed


class AlertmanagerError(Exception):
    """Alertmanager could not be read; `reason` is a short label for the error counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AlertmanagerClient:
    """GET /api/v2/silences of one Alertmanager (basic auth as user:password@ in the URL)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def describe(self) -> str:
        return f"alertmanager {redact_url(self.url)}"

    def silences(self) -> list[dict[str, Any]]:
        """Every silence Alertmanager holds (active, pending and expired ones)."""
        where = f"{redact_url(self.url)}/api/v2/silences"
        try:
            r = self.session.get(f"{self.url}/api/v2/silences", timeout=self.timeout, stream=True)
            body = r.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
        except requests.Timeout as e:
            raise AlertmanagerError("timeout", f"{where}: no answer within {self.timeout:g} s") from e
        except (requests.ConnectionError, OSError) as e:
            raise AlertmanagerError("unreachable", f"{where}: {e}") from e
        if r.status_code != 200:
            raise AlertmanagerError("http", f"{where}: HTTP {r.status_code}: {body[:200]!r}")
        if len(body) > MAX_RESPONSE_BYTES:
            raise AlertmanagerError("too_large", f"{where}: answer larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            data = json.loads(body)
        except ValueError as e:
            raise AlertmanagerError("bad_response", f"{where}: not JSON: {e}") from e
        if not isinstance(data, list):
            raise AlertmanagerError("bad_response", f"{where}: expected a JSON list of silences")
        return [s for s in data if isinstance(s, dict)]

    def close(self) -> None:
        self.session.close()


def parse_time(value: Any) -> float:
    """Unix seconds of an RFC 3339 time as Alertmanager writes it; ValueError if it is not one."""
    if not isinstance(value, str):
        raise ValueError(f"not a time: {value!r}")  # noqa: TRY004 - a bad field, said as such
    t = datetime.fromisoformat(value.strip())  # 3.11: "Z" and 9 fraction digits are fine
    if t.tzinfo is None:
        raise ValueError(f"time without a time zone: {value!r}")
    return t.timestamp()
