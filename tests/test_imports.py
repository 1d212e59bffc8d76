"""`dgemma --help` and every `dgemma SUB --help` answer without importing torch; `python -m dgemma` works."""

import subprocess
import sys

HELPS = [[], ["generate"], ["info"], ["data"], ["data", "prepare"], ["data", "list"], ["eval"], ["bench"], ["train"]]

# One interpreter runs every --help through cli.main, then reports the torch modules it imported (none expected).
SCRIPT = """
import contextlib, io, json, sys
from dgemma.cli.main import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        codes.append((main([*argv, "--help"]), len(out.getvalue())))
print(json.dumps({"codes": codes, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""


def test_help_never_imports_torch():
    import json

    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(HELPS)], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["torch"] == []
    assert all(code == 0 and chars > 50 for code, chars in report["codes"]), report["codes"]


def dgemma(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgemma", *argv], check=False, capture_output=True, text=True,
                          timeout=120)


def test_python_dash_m_dgemma():
    proc = dgemma("--help")
    assert proc.returncode == 0 and "generate" in proc.stdout and "train" in proc.stdout
    proc = dgemma("train", "--help")
    assert proc.returncode == 0 and "--resume" in proc.stdout
    proc = dgemma("nope")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "invalid choice" in proc.stderr
