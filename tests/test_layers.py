"""The package layers hold: the import contracts of pyproject.toml's [tool.importlinter] pass.

grafana_plugin_backend is cli > server | probe | backtest > web > query > service > source >
config, each importing only below itself, no cycles inside a layer, and detector/ importing nothing of the
service, HTTP or Prometheus' clients. lint-imports reads the contracts from pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_import_contracts_are_kept():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_every_module_of_the_service_sits_in_a_declared_layer():
    # exhaustive = true in the layers contract: a new top-level module must be given a layer.
    top = {p.stem for p in (ROOT / "grafana_plugin_backend").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert top == {"cli", "server", "probe", "backtest", "web", "query", "service", "source",
                   "config"}
