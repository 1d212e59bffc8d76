"""Write N seeded random LoRA adapters (PEFT format) for a model, for `dgemma bench serve --lora` speed runs.

    python benchmarks/lora_adapters.py --model models/dgemma-py-small --out /tmp/adapters --count 4 --rank 8

Serving speed does not depend on what an adapter learned, only on its rank and targets, so random weights
(scaled small, so the text stays the base model's kind) measure the same cost as trained ones. Each adapter targets
every attention and MLP projection, as `dgemma finetune --lora-rank` does by default.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from dgemma.api import load
from dgemma.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, lora_modules, save_adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/dgemma-py-small")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    base = load(args.model, dtype=torch.float32).model
    for i in range(args.count):
        m = copy.deepcopy(base)
        apply_lora(m, LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=tuple(DEFAULT_TARGETS)))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for mod in lora_modules(m).values():
                mod.lora_A.copy_(torch.randn(mod.lora_A.shape, generator=g) * 0.02)
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.02)
        folder = args.out / f"a{i}"
        save_adapter(m, folder, base_model=str(Path(args.model).resolve()))
        print(f"a{i}={folder}")


if __name__ == "__main__":
    main()
