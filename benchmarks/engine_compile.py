"""The stepped engine with and without `compile=True`, alternating in one process: ms per step, diffusion and AR,
1 and 16 rows (`dgemma.bench.speed.engine_split`: same prompt on every row, 4 steps per canvas, adaptive stopping off).

    python benchmarks/engine_compile.py [--model models/dgemma-py-small] [--threads 1] [--rounds 3]

Both variants are warmed first (every bucket compiled), then timed in turns, so machine noise hits both alike;
the recompile count of every timed run must be 0. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import torch

    from dgemma.api import load
    from dgemma.bench.speed import engine_split

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "dgemma-py-small"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model, dtype=torch.float32).model
    cases = [("ar", 1), ("diffusion", 1), ("ar", 16), ("diffusion", 16)]
    times: dict[str, list[float]] = {}
    for mode, rows in cases:
        for compile in (False, True):  # warm-up: every shape the timed runs see
            engine_split(model, mode, rows, 8, 1.0, 1.0, compile=compile)
        for _ in range(args.rounds):
            for compile in (False, True):
                e = engine_split(model, mode, rows, 16 if rows == 1 else 8, 1.0, 1.0, compile=compile)
                if e["recompiles"] != 0:
                    raise AssertionError(f"{mode} x{rows}: {e['recompiles']} compilations during the timed steps")
                times.setdefault(f"{mode}/{rows}/{'compiled' if compile else 'eager'}", []).append(e["step_ms"])
    out = []
    print(f"{'mode':<10}{'rows':>5}{'eager ms':>10}{'compiled ms':>13}{'speed-up':>10}")
    for mode, rows in cases:
        eager = statistics.median(times[f"{mode}/{rows}/eager"])
        comp = statistics.median(times[f"{mode}/{rows}/compiled"])
        out.append({"mode": mode, "rows": rows, "eager_ms": eager, "compiled_ms": comp, "speedup": eager / comp,
                    "eager_runs_ms": times[f"{mode}/{rows}/eager"], "compiled_runs_ms": times[f"{mode}/{rows}/compiled"]})
        print(f"{mode:<10}{rows:>5}{eager:>10.2f}{comp:>13.2f}{eager / comp:>9.2f}x")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()
    load_avg = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
    print(json.dumps({"model": args.model, "threads": args.threads, "rounds": args.rounds, "git": git,
                      "load_avg_1m_at_end": load_avg, "rows": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
