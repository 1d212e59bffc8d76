"""The floor plan: pyproject.toml's import-linter contracts hold, and they catch a wrong import; no private name is
imported from another folder."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dgemma"
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=300, check=False)


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(PACKAGE, tmp_path / "dgemma", ignore=shutil.ignore_patterns("__pycache__", "assets", "web"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in r.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize("module, line, contract", [
    ("serve/loop.py", "from dgemma.train import objective", "layers"),  # the server never imports training
    ("engine/engine.py", "from dgemma.api import load", "layers"),  # generation sits below the text API
    ("model.py", "import dgemma.engine.engine", "layers"),  # the core knows no wing
    ("train/objective.py", "from dgemma.engine import engine", "independent"),
    ("params.py", "import torch", "torch"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, line, contract):
    root = _copy(tmp_path)
    target = root / "dgemma" / module
    # a lazy import deep inside a function counts as much as one at the top
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {line}  # noqa\n")
    r = _lint(root)
    assert r.returncode != 0, r.stdout
    broken = r.stdout[r.stdout.index("Broken contracts"):]
    assert contract in broken and module.removesuffix(".py").replace("/", ".") in broken, broken


def _folder(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else "dgemma"


def test_no_private_name_is_imported_from_another_folder():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dgemma"):
                for alias in node.names:
                    if alias.name.startswith("_") and _folder(node.module) != _folder(here):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
    assert not bad, "\n".join(bad)
