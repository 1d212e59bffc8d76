"""Batch-1 speed of the stepped engine against an earlier commit's engine, same weights, same prompt.

    python benchmarks/engine_batch1.py --against ad38999 [--model models/dgemma-py-small] [--repeats 5]

The earlier commit is checked out into a temporary git worktree; each repeat times one diffusion call (256 new
tokens, the model's 4 steps per canvas and adaptive stopping, which never fires for this model, so both do the same work) and one greedy AR call
(128 new tokens) in this tree and in that one, alternating, in fresh processes of the same Python. Prints a table,
then one JSON line. Speed only: the seeds' random streams differ between the engines (per-request generators).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time, torch
from dgemma.api import load
from dgemma.engine.generate import ARParams, DiffusionParams, generate_ar, generate_diffusion
torch.set_num_threads(int(sys.argv[3]))
lm = load(sys.argv[1], dtype=torch.float32)
ids = torch.tensor([lm.tokenizer.encode("def fibonacci(n):\n    ", add_bos=True)])
d = DiffusionParams(max_new_tokens=256, max_denoising_steps=4, seed=0)
a = ARParams(max_new_tokens=128, seed=0)
generate_diffusion(lm.model, ids, DiffusionParams(max_new_tokens=32, max_denoising_steps=2, seed=0))  # warm-up
out = {}
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); r = generate_diffusion(lm.model, ids, d); out.setdefault("diffusion_s", []).append(time.perf_counter() - t)
    t = time.perf_counter(); q = generate_ar(lm.model, ids, a); out.setdefault("ar_s", []).append(time.perf_counter() - t)
out["diffusion_tokens"], out["ar_tokens"] = len(r.tokens[0]), len(q.tokens[0])
print(json.dumps(out))
"""


def run_child(tree: Path, model: str, repeats: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    res = subprocess.run([sys.executable, "-c", CHILD, model, str(repeats), str(threads)], env=env, cwd=tree, check=False,
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"benchmark child in {tree} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", required=True, help="git revision of the earlier engine")
    ap.add_argument("--model", default=str(ROOT / "models" / "dgemma-py-small"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of fresh processes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        git("worktree", "add", "--detach", str(old), args.against)
        try:
            runs = {"new": [], "old": []}
            for _ in range(args.rounds):
                runs["new"].append(run_child(ROOT, args.model, args.repeats, args.threads))
                runs["old"].append(run_child(old, args.model, args.repeats, args.threads))
        finally:
            git("worktree", "remove", "--force", str(old))
    med = {k: {m: statistics.median([x for r in v for x in r[m]]) for m in ("diffusion_s", "ar_s")}
           for k, v in runs.items()}
    result = {"new_commit": git("rev-parse", "--short", "HEAD"), "old_commit": args.against,
              "model": args.model, "threads": args.threads, "repeats": args.repeats * args.rounds,
              "diffusion_tokens": runs["new"][0]["diffusion_tokens"], "ar_tokens": runs["new"][0]["ar_tokens"],
              "median_s": med,
              "diffusion_new_over_old_speed": med["old"]["diffusion_s"] / med["new"]["diffusion_s"],
              "ar_new_over_old_speed": med["old"]["ar_s"] / med["new"]["ar_s"],
              "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), "unknown")}
    print(f"{'engine':<8}{'diffusion 256 tok (s)':>24}{'AR 128 tok (s)':>18}")
    for k in ("old", "new"):
        print(f"{k:<8}{med[k]['diffusion_s']:>24.3f}{med[k]['ar_s']:>18.3f}")
    print(f"new/old speed: diffusion {result['diffusion_new_over_old_speed']:.2f}x, AR {result['ar_new_over_old_speed']:.2f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
