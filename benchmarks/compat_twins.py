"""Transformers-compatible diffusion (`compat=True`): the fast loop (static cache, chunked sampler, engine="fast")
against its slow twin (the reference loop, engine="reference"), alternating in one process on the same prompts.

    taskset -c 1 python benchmarks/compat_twins.py --threads 1 --rounds 3

Prints each round's seconds, then one JSON line: the median seconds per side, their ratio and whether the tokens
were identical in every round (they must be: the fast loop is only worth keeping if it is faster at equal tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import torch

from dgemma.api import encode_prompts, load
from dgemma.engine.generate import generate_diffusion
from dgemma.fsio import git_revision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/dgemma-py-small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    prompts = ["def add(a, b):", "class Stack:", "import os\n\ndef walk(path):", "def fib(n):"][:args.batch]
    ids, mask = encode_prompts(lm, prompts * max(1, args.batch // 4))
    base = lm.defaults("diffusion", max_new_tokens=args.max_new_tokens, seed=0, compat=True)
    times = {"fast": [], "reference": []}
    tokens = {}
    same = True
    for r in range(args.rounds + 1):  # round 0 warms up
        for side in ("fast", "reference") if r % 2 == 0 else ("reference", "fast"):
            p = dataclasses.replace(base, engine=side)
            t0 = time.perf_counter()
            out = generate_diffusion(lm.model, ids, p, attention_mask=mask)
            dt = time.perf_counter() - t0
            seqs = out.sequences.tolist()
            if side in tokens:
                same &= tokens[side] == seqs
            tokens[side] = seqs
            if r:
                times[side].append(dt)
                print(f"round {r} {side:>9}: {dt:.3f} s", flush=True)
    same &= tokens["fast"] == tokens["reference"]
    fast, ref = statistics.median(times["fast"]), statistics.median(times["reference"])
    git = git_revision()
    print(json.dumps({"bench": "compat_twins", "model": args.model, "batch": len(ids), "max_new_tokens":
                      args.max_new_tokens, "threads": args.threads, "rounds": args.rounds, "fast_s": fast,
                      "reference_s": ref, "reference_over_fast": ref / fast, "identical_tokens": same, "git": git,
                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
