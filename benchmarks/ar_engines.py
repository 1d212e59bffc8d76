"""AR decoding on the fast and reference engines, alternated run by run (this VM's noise hits both alike):
tokens/s of 6 runs each, 128 greedy tokens after a 32-token prompt, batch 1.

    .venv/bin/python benchmarks/ar_engines.py [MODEL]
"""

import json
import sys
import time

import torch

from dgemma.api import load
from dgemma.bench.speed import _device
from dgemma.engine.generate import ARParams, generate_ar

model = load(sys.argv[1] if len(sys.argv) > 1 else "models/dgemma-py-small", dtype=torch.float32).model
prompt = torch.randint(5, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
runs: dict[str, list[float]] = {"reference": [], "fast": []}
for engine in runs:  # warm-up
    generate_ar(model, prompt, ARParams(max_new_tokens=16, engine=engine))
for _ in range(6):
    for engine, times in runs.items():
        t0 = time.perf_counter()
        out = generate_ar(model, prompt, ARParams(max_new_tokens=128, engine=engine))
        times.append(len(out.tokens[0]) / (time.perf_counter() - t0))
print(json.dumps({"device": _device(), "tokens_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()}}))
