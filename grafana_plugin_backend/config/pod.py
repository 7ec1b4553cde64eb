"""Where an instance's shard index comes from without --shard.index: its StatefulSet pod name.

A pod name (POD_NAME, else the host name) ending in -<ordinal>, such as promvae-2, gives index 2.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

_ORDINAL = re.compile(r"-(\d+)$")


def ordinal_of(name: str) -> int | None:
    """The StatefulSet ordinal of a pod name such as promvae-2 (None if it has none)."""
    m = _ORDINAL.search(name.strip())
    return int(m.group(1)) if m else None


def index_from_environment(environ: Mapping[str, str] | None = None,
                           hostname: str | None = None) -> tuple[int | None, str]:
    """(ordinal, where it came from) from POD_NAME, else the host name (`hostname`, by default
    this machine's)."""
    environ = os.environ if environ is None else environ
    hostname = socket.gethostname() if hostname is None else hostname
    for where, name in (("POD_NAME", environ.get("POD_NAME", "")), ("host name", hostname)):
        if name:
            n = ordinal_of(name)
            if n is not None:
                return n, f"{where} {name!r}"
    return None, "neither POD_NAME nor the host name ends in -<number>"
