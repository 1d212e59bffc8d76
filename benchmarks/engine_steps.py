"""Milliseconds per engine step and tokens/s, diffusion and AR, at 1, 4 and 16 rows, batch-invariant or not.

    python benchmarks/engine_steps.py [--model models/dgemma-py-small] [--steps 20] [--threads 2]

Every row has the same prompt and runs at the model's 4 steps per canvas; the first 5 steps are not timed. The
engine alone, no server: the step costs behind `dgemma bench serve`'s figures. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import torch

    from dgemma.api import load
    from dgemma.engine.engine import Engine
    from dgemma.params import EngineConfig, Request, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "dgemma-py-small"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    ids = lm.tokenizer.encode("def fibonacci(n):\n    ", add_bos=True)
    rows = []
    for mode in ("diffusion", "ar"):
        for batch in (1, 4, 16):
            for inv in (False, True):
                eng = Engine(lm.model, EngineConfig(max_batch=batch, max_model_len=2048, batch_invariant=inv))
                for i in range(batch):
                    eng.add(Request(str(i), ids, SamplingParams(mode=mode, max_new_tokens=1024, max_denoising_steps=4,
                                                                seed=i)))
                for _ in range(5):
                    eng.step()
                t, toks = time.perf_counter(), 0
                for _ in range(args.steps):
                    toks += sum(len(ev.new_ids) for ev in eng.step())
                dt = time.perf_counter() - t
                rows.append({"mode": mode, "rows": batch, "batch_invariant": inv, "ms_per_step": dt / args.steps * 1e3,
                             "tokens_per_s": toks / dt})
                r = rows[-1]
                print(f"{mode:<10}{batch:>4} rows  batch_invariant={inv!s:<6}{r['ms_per_step']:>8.1f} ms/step"
                      f"{r['tokens_per_s']:>9.1f} tok/s", flush=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()
    load_avg = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
    print(json.dumps({"model": args.model, "dtype": str(lm.model.dtype), "threads": args.threads, "git": git,
                      "load_avg_1m_at_end": load_avg, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
