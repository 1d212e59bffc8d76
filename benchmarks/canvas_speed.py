"""The speed half of the canvas-length sweep: the bundled model's architecture with each canvas length (weights do
not depend on it), diffusion at the sweep's pace (C/4 steps per canvas, adaptive stopping off) against greedy AR,
256 new tokens after a 64-token prompt, batch 1, on the fast engine. Prints a table, then one JSON line.

    .venv/bin/python benchmarks/canvas_speed.py [MODEL] [--threads N]
"""

import argparse
import json
import statistics
import time

import torch

from dgemma.api import load
from dgemma.bench.speed import _device
from dgemma.engine.generate import ARParams, DiffusionParams, generate_ar, generate_diffusion
from dgemma.model import DiffusionGemma


def timed(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="models/dgemma-py-small")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load(args.model, dtype=torch.float32).model
    prompt = torch.randint(5, base.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    t_ar, ar = timed(lambda: generate_ar(base, prompt, ARParams(max_new_tokens=args.new_tokens)))
    ar_tps = len(ar.tokens[0]) / t_ar
    rows = []
    for C in (16, 32, 64, 128):
        model = DiffusionGemma(base.config.replace(canvas_length=C)).eval()
        model.load_state_dict(base.state_dict())
        p = DiffusionParams(max_new_tokens=args.new_tokens, max_denoising_steps=C // 4, stability_threshold=None,
                            confidence_threshold=None, seed=0)
        t, out = timed(lambda model=model, p=p: generate_diffusion(model, prompt, p))
        tps = len(out.tokens[0]) / t
        rows.append({"canvas": C, "steps": C // 4, "diffusion_tokens_per_s": tps, "ar_tokens_per_s": ar_tps,
                     "diffusion_over_ar": tps / ar_tps, "passes": out.stats.decoder_passes[0],
                     "encoder_passes": out.stats.encoder_passes, "ms_per_decoder_pass": 1e3 * t / (
                         out.stats.decoder_passes[0] + out.stats.encoder_passes)})
    print(f"device: {_device()}; AR {ar_tps:.1f} tok/s ({1e3 * t_ar / len(ar.tokens[0]):.1f} ms/token)")
    print(f"{'canvas':>6}{'steps':>6}{'tok/s':>8}{'vs AR':>7}{'passes':>8}{'ms/pass':>9}")
    for r in rows:
        print(f"{r['canvas']:>6}{r['steps']:>6}{r['diffusion_tokens_per_s']:>8.1f}{r['diffusion_over_ar']:>7.2f}"
              f"{r['passes']:>8}{r['ms_per_decoder_pass']:>9.1f}")
    print(json.dumps({"device": _device(), "model": args.model, "rows": rows}))


if __name__ == "__main__":
    main()
