"""Cost of serving several LoRA adapters from one engine, measured inside one process (no HTTP, no client).

    python benchmarks/multi_lora_engine.py --model models/dgemma-py-small --adapters /tmp/adapters --repeats 5

`dgemma bench serve --lora` measures the same thing end to end, but its base-only and mixed levels run one after the
other, so a machine whose speed drifts by 20% between levels blurs the ratio. Here each repeat runs three batches of
`--concurrency` requests back to back in one engine: every request on the base model; the requests spread over the
base and every adapter (request i gets model i mod (adapters + 1)), with `MultiLoRALinear.forward` (one batched
product per rank); and the same spread with `forward_grouped` (one product pair per adapter, the slow twin). The
order rotates every repeat. Tokens/s are committed tokens over wall time; the ratios are medians over the repeats.
Both modes (AR and diffusion) by default; diffusion at the model's denoising steps (generation_config.json).
Prints a table, then one JSON line.

Make adapters with `python benchmarks/lora_adapters.py --model MODEL --out DIR --count 4`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dgemma.api import load
from dgemma.engine.engine import Engine
from dgemma.fsio import git_dirty, git_revision
from dgemma.lora import MultiLoRALinear, attach_adapters
from dgemma.params import EngineConfig, Request, SamplingParams


def run_batch(engine: Engine, prompts: list[list[int]], adapters: list[str | None], mode: str,
              max_tokens: int, steps: int) -> tuple[int, float]:
    """All requests added at once, stepped to the end: (committed tokens, seconds). No EOS stop (eos_token_ids
    None), so every request makes max_tokens tokens; `steps`: denoising steps per canvas."""
    t = time.perf_counter()
    for i, (ids, adapter) in enumerate(zip(prompts, adapters)):
        p = SamplingParams(mode=mode, max_new_tokens=max_tokens, seed=i, temperature=0.0, adapter=adapter,
                           max_denoising_steps=steps)
        engine.add(Request(f"{mode}-{i}-{time.monotonic_ns()}", ids, p))
    tokens = 0
    while engine.has_work():
        tokens += sum(len(ev.new_ids) for ev in engine.step())
    return tokens, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/dgemma-py-small")
    ap.add_argument("--adapters", required=True, type=Path, help="a folder of adapter folders (lora_adapters.py --out)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default="ar,diffusion")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-batch-invariant", action="store_true", help="as `dgemma serve --no-batch-invariant`")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model, dtype=torch.float32)
    folders = sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file())
    if not folders:
        raise SystemExit(f"error: no adapter folders in {args.adapters}; write some with benchmarks/lora_adapters.py")
    served = copy.deepcopy(lm.model)
    attach_adapters(served, {p.name: str(p) for p in folders})
    names = [None] + [p.name for p in folders]
    config = EngineConfig(max_batch=args.concurrency, max_model_len=1024, batch_invariant=not args.no_batch_invariant)
    engine = Engine(served, config)
    prompts = [lm.tokenizer.encode(f"def f{i}(x):\n    return", add_bos=True) for i in range(args.concurrency)]
    spread = [names[i % len(names)] for i in range(args.concurrency)]
    batched = MultiLoRALinear.forward
    steps = int(lm.generation_config.get("max_denoising_steps", SamplingParams.max_denoising_steps))

    def variant(name: str, mode: str) -> tuple[int, float]:
        MultiLoRALinear.forward = MultiLoRALinear.forward_grouped if name == "grouped" else batched
        try:
            return run_batch(engine, prompts, [None] * len(prompts) if name == "base" else spread, mode,
                             args.max_tokens, steps)
        finally:
            MultiLoRALinear.forward = batched

    variants = ["base", "batched", "grouped"]
    result: dict = {"bench": "multi_lora_engine", "model": args.model, "adapters": [p.name for p in folders],
                    "concurrency": args.concurrency, "max_tokens": args.max_tokens, "repeats": args.repeats,
                    "threads": args.threads, "batch_invariant": not args.no_batch_invariant, "modes": {}}
    for mode in args.modes.split(","):
        for name in variants:  # warm-up, unmeasured
            variant(name, mode)
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.repeats):
            for name in variants[r % 3:] + variants[:r % 3]:
                tokens, seconds = variant(name, mode)
                rates[name].append(tokens / seconds)
        base = rates["base"]
        result["modes"][mode] = {
            "tokens_per_s": {v: statistics.median(x) for v, x in rates.items()},
            "all_tokens_per_s": rates,
            "batched_vs_base": statistics.median(b / a for a, b in zip(base, rates["batched"])),
            "grouped_vs_base": statistics.median(g / a for a, g in zip(base, rates["grouped"])),
        }
    rev = git_revision(Path(__file__).parent)
    result["git"], result["git_dirty"] = rev, git_dirty(Path(__file__).parent)
    result["cpu_count"] = len(os.sched_getaffinity(0))
    result["load_average"] = os.getloadavg()
    print(f"{'mode':<10} {'base tok/s':>10} {'batched':>9} {'grouped':>9} {'batched/base':>13} {'grouped/base':>13}")
    for mode, m in result["modes"].items():
        t = m["tokens_per_s"]
        print(f"{mode:<10} {t['base']:>10.1f} {t['batched']:>9.1f} {t['grouped']:>9.1f} "
              f"{m['batched_vs_base']:>13.2f} {m['grouped_vs_base']:>13.2f}")
    print(f"(medians over {args.repeats} repeats; {args.concurrency} requests x {args.max_tokens} tokens, spread over "
          f"the base and {len(folders)} adapters; git {rev}, {result['cpu_count']} cores allowed, {args.threads} "
          f"threads, load {result['load_average'][0]:.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
