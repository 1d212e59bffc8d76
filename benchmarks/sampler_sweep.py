"""Sweep diffusion sampler settings on tuning prompts and score each setting like `dgemma eval` does.

    python benchmarks/sampler_sweep.py --model models/dgemma-py-small --data data/py \
        --set entropy_bound=0.1,1,3,10 --set max_denoising_steps=4,6 --out benchmarks/results/sampler_sweep.jsonl

The prompts come from the **training** split's Python files (function signature + docstring), so that the choice of
defaults is made without looking at `dgemma eval`'s held-out prompts. Every combination of the `--set` values is
run; a combination with t_min >= t_max is skipped, and `--set t=0.4:0.8,0.1:0.3` sweeps t_min:t_max pairs. AR on
the same prompts comes first: greedy, and sampled too with `--ar-temperature 0,0.8`. One JSON line per setting goes
to stdout (and to --out), then a table sorted by judge perplexity.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

from dgemma.api import load
from dgemma.engine.generate import ARParams, DiffusionParams
from dgemma.evals.eval import Judge, default_diffusion_params, generate_all, judge_dir, score, split_prompts, stop_ids

FIELDS = tuple(f.name for f in dataclasses.fields(DiffusionParams))


def parse_set(text: str) -> tuple[str, list]:
    key, _, values = text.partition("=")
    if key == "t" and values:  # temperature schedule pairs, t_min:t_max
        try:
            return key, [tuple(float(x) for x in v.split(":", 1)) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"--set {text!r}: want t=TMIN:TMAX,TMIN:TMAX,...") from None
    if key not in FIELDS or not values:
        raise SystemExit(f"--set {text!r}: want KEY=V1,V2,... with KEY one of {', '.join(FIELDS)}")
    conv = (int if key in ("max_denoising_steps", "max_new_tokens", "stability_threshold")
            else str if key == "sampler" else float)
    return key, [None if v == "none" else conv(v) for v in values.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/dgemma-py-small")
    ap.add_argument("--data", default="data/py")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--split", default="train", choices=["train", "val"])
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge", default="auto")
    ap.add_argument("--set", action="append", default=[], type=parse_set, metavar="KEY=V1,V2")
    ap.add_argument("--ar-temperature", default="0", metavar="T1,T2",
                    help="AR rows to run: greedy (0) and/or sampled at these temperatures (seeded)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    torch.manual_seed(a.seed)
    lm = load(a.model)
    prompts = split_prompts(Path(a.data), a.prompts, a.split)
    jd = judge_dir(a.judge)
    judge = Judge.load(jd) if jd is not None else None
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")

    base = {"model": lm.name, "split": a.split, "prompts": len(prompts), "max_new_tokens": a.max_new_tokens}
    for temp in (float(t) for t in a.ar_temperature.split(",")):
        ar = generate_all(lm, prompts, "ar", ARParams(max_new_tokens=a.max_new_tokens, eos_token_ids=stop_ids(lm),
                                                      temperature=temp, seed=a.seed), a.batch_size)
        emit({**base, "mode": "ar", "ar_temperature": temp, **score(prompts, ar, judge)})
    keys = [k for k, _ in a.set]
    for combo in itertools.product(*(v for _, v in a.set)):
        p = default_diffusion_params(lm, max_new_tokens=a.max_new_tokens, seed=a.seed)
        for k, v in zip(keys, combo):
            if k == "t":
                p.t_min, p.t_max = v
            else:
                setattr(p, k, v)
        if p.t_min >= p.t_max:
            continue
        t0 = time.perf_counter()
        res = generate_all(lm, prompts, "diffusion", p, a.batch_size)
        settings = {k: getattr(p, k) for k in ("sampler", "max_denoising_steps", "entropy_bound", "commit_threshold",
                                                "t_min", "t_max", "stability_threshold", "confidence_threshold")}
        emit({**base, "mode": "diffusion", **settings, **score(prompts, res, judge),
              "wall_s": round(time.perf_counter() - t0, 1)})

    print(f"\n{'sampler':>13} {'steps':>5} {'eb':>6} {'commit':>6} {'t_min':>5} {'t_max':>5} {'parse':>6} "
          f"{'judge_ppl':>9} {'dist2':>6} {'pass/tok':>8}")
    for r in sorted(rows, key=lambda r: r.get("judge_ppl") or math.inf):
        name = r.get("sampler") or f"AR T={r.get('ar_temperature', 0)}"
        print(f"{name:>13} {r.get('max_denoising_steps', '')!s:>5} {r.get('entropy_bound', '')!s:>6} "
              f"{r.get('commit_threshold', '')!s:>6} {r.get('t_min', '')!s:>5} "
              f"{r.get('t_max', '')!s:>5} {r['parse_rate']:>6.3f} {r.get('judge_ppl') or float('nan'):>9.1f} "
              f"{r['distinct_2']:>6.3f} {r['passes_per_token']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
