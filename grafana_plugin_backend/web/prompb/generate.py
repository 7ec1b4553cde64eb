"""Generate remote_pb2.py from remote.proto with grpcio-tools' bundled protoc.

Run as `python -m grafana_plugin_backend.web.prompb.generate` after editing remote.proto.
The generator version is pinned in pyproject.toml's test extras, and tests/test_prompb.py
regenerates the module and compares it with the committed one, so the two cannot drift.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "remote.proto"
MODULE = "remote_pb2.py"


def generate(out_dir: Path) -> Path:
    """Run protoc on remote.proto into `out_dir`; the generated module's path."""
    from grpc_tools import protoc  # a test/dev dependency only: the service imports remote_pb2

    code = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}",
                        str(HERE / PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed on {HERE / PROTO} (exit {code})")
    return out_dir / MODULE


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp)).read_bytes()
    (HERE / MODULE).write_bytes(fresh)
    print(f"wrote {HERE / MODULE} ({len(fresh)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
