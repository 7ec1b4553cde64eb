"""service.allocator: training-sized blocks come from the heap and stay there until release.

The thresholds are process-wide, so each case runs in a fresh interpreter and reads glibc's
own accounting (mallinfo2: bytes in mmapped blocks, bytes of heap), not timings or RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from grafana_plugin_backend.service import allocator

_PRELUDE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from grafana_plugin_backend.service import allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def info():
        m = libc.mallinfo2()
        return {"mmapped": m.hblkhd, "heap": m.arena}

    tuned = sys.argv[1] == "tuned" and allocator.tune_for_training()
    STEP = 538 * 64 * 120  # floats in one (K, B, W) tensor of a 538-series batch: 16.5 MB
""")


def _run(body: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body), mode],
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


STEP_BYTES = 538 * 64 * 120 * 4

pytestmark = pytest.mark.skipif(allocator._libc() is None or not hasattr(allocator._libc(), "mallinfo2"),
                                reason="glibc's mallopt, malloc_trim and mallinfo2 only")

_ONE_BLOCK = """
    before = info()
    x = torch.ones(STEP)
    after = info()
    print(json.dumps({"tuned": tuned, "mmapped": after["mmapped"] - before["mmapped"]}))
"""


def test_training_sized_blocks_come_from_the_heap():
    plain, tuned = _run(_ONE_BLOCK, "plain"), _run(_ONE_BLOCK, "tuned")
    assert plain["mmapped"] >= STEP_BYTES  # glibc's default: mmapped, faulted in on each use
    assert tuned["tuned"] and tuned["mmapped"] == 0


_STEPS = """
    xs = [torch.ones(STEP) for _ in range(8)]  # one step's working set, ~130 MB
    del xs
    kept = info()["heap"]
    released = allocator.release()
    print(json.dumps({"kept": kept, "released": released, "after": info()["heap"]}))
"""


def test_freed_step_memory_stays_until_release():
    r = _run(_STEPS, "tuned")
    assert r["kept"] >= 8 * STEP_BYTES  # the next step reuses it instead of faulting it in
    assert r["released"] and r["after"] < r["kept"] - 4 * STEP_BYTES
