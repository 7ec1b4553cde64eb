"""Series-level shards: which promvae instance owns which series, and what it says about that.

Each series (query name + source labels, the identity of its model) belongs to exactly one of
`count` shards by jump consistent hashing (Lamping & Veach, 2014) of a 64-bit hash of its
identity: going from N to N+1 shards moves about 1/(N+1) of the series, all of them to the
new shard, and every other series keeps its shard and its model. Nothing coordinates the
shards: each one discovers every series of its queries and keeps its own. The user's
Prometheus scrapes every shard and reaches their on-demand scores through remote read.

The index comes from --shard.index, else from a StatefulSet pod name (config/pod.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

_JUMP_MUL = 2862933555777941757
_MASK = 2**64 - 1


def identity_hash(query: str, labels: Mapping[str, str]) -> int:
    """A stable 64-bit hash of a series' identity (independent of label order and process)."""
    blob = json.dumps([query, sorted(labels.items())], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "little")


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in [0, buckets) of a 64-bit `key` (jump consistent hash)."""
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _JUMP_MUL + 1) & _MASK
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


@dataclass(frozen=True)
class Shard:
    """This instance's place among `count` shards; owns() says which series are its own."""

    index: int = 0
    count: int = 1

    def owner(self, query: str, labels: Mapping[str, str]) -> int:
        return jump_hash(identity_hash(query, labels), self.count)

    def owns(self, query: str, labels: Mapping[str, str]) -> bool:
        return self.count == 1 or self.owner(query, labels) == self.index

    def describe(self) -> str:
        return f"shard {self.index} of {self.count}"
