"""`import dgemma`: the public names load lazily (no torch on import), each resolves, and the README's Python example
runs as written."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_dgemma_loads_no_torch():
    code = "import sys, dgemma; dir(dgemma); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_every_public_name_resolves():
    import dgemma

    assert sorted(dgemma.__all__) == sorted(dgemma._PUBLIC)
    for name in dgemma.__all__:
        assert getattr(dgemma, name).__name__ == name
    assert dgemma.checkpoint.load_checkpoint  # submodules and folders too
    assert dgemma.engine.engine.Engine is dgemma.Engine
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        dgemma.nothing_here  # noqa: B018


def test_the_readme_python_example_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "import dgemma" in code and "from dgemma." not in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("max_new_tokens=64", "max_new_tokens=8"), "README.md", "exec"), {})  # noqa: S102  (the README's own code)
    assert out.getvalue().endswith("\n"), "the example printed nothing"
