"""Eager vs compiled (dgemma/engine/compiled.py) milliseconds per piece at N = 1, 16, 32, 512 rows, 1 and 2 threads.

    python benchmarks/compiled_pieces.py [--model models/dgemma-py-small] [--sizes 1,16,32,512] [--reps 15]

Pieces: `layers` is every layer's pre-attention + post-attention and the final norm of one pass (attention itself,
eager in both, left out); `pre` and `post` are those pieces summed over the layers; `sampler_eb` and `sampler_conf`
are the LM head + soft-cap + per-position sampler work (static.position_stats, soft embedding from the raw logits)
for the entropy-bound and confidence samplers. Eager and compiled run alternately and the table gives the medians
and their ratio (this machine is shared: compare the ratio, not the absolute figures). Compile time per bucket is
the first call's wall time (tracing + inductor; a warm on-disk inductor cache makes it smaller). Prints a table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import torch

    from dgemma.api import load
    from dgemma.engine.compiled import CompiledLayers, CompiledSampler
    from dgemma.engine.static import position_stats
    from dgemma.model import rope_cos_sin

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "dgemma-py-small"))
    ap.add_argument("--sizes", default="1,16,32,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    threads = [int(x) for x in args.threads.split(",")]
    model = load(args.model).model
    cfg = model.config
    cl, cs = CompiledLayers(model), CompiledSampler(model)

    def pre_eager(h, rope):
        for layer in model.layers:
            layer.self_attn.project(layer.input_layernorm(h), *rope[layer.layer_type])

    def pre_comp(h, rope):
        for i, layer in enumerate(model.layers):
            cl.pre_attention(i, h, *rope[layer.layer_type])

    def post_eager(h, os):
        for layer, o in zip(model.layers, os):
            layer.after_attention(h, layer.self_attn.o_proj(o.transpose(1, 2).reshape(1, h.shape[1], -1)), False)

    def post_comp(h, os):
        for i, o in enumerate(os):
            cl.post_attention(i, h, o, False)

    def layers_eager(h, rope):
        for layer in model.layers:
            attn = layer.self_attn
            q, _, _ = attn.project(layer.input_layernorm(h), *rope[layer.layer_type])  # q stands in for attention
            h = layer.after_attention(h, attn.o_proj(q.transpose(1, 2).reshape(1, h.shape[1], -1)), False)
        return model.norm(h)

    def layers_comp(h, rope):
        for i, layer in enumerate(model.layers):
            q, _, _ = cl.pre_attention(i, h, *rope[layer.layer_type])
            h = cl.post_attention(i, h, q.contiguous(), False)
        return cl.final_norm(h)

    def sampler_eager(hidden, temp, u, confidence):
        position_stats(model.logits(hidden[None]), temp, None, model, soft_from="raw",
                       method=None if confidence else "inverse_cdf", confidence=confidence, uniforms=u)

    def sampler_comp(hidden, temp, u, confidence):
        cs.sampler_chunk(hidden, temp, u, confidence)

    rows, compile_s = [], {}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for N in sizes:
            pos = torch.arange(100, 100 + N)
            rope = {t: rope_cos_sin(getattr(model, f"inv_freq_{t}"), pos, model.dtype)
                    for t in ("sliding_attention", "full_attention")}
            h = torch.randn(1, N, cfg.hidden_size, generator=gen)
            os = [torch.randn(1, layer.self_attn.num_heads, N, layer.self_attn.head_dim, generator=gen)
                  for layer in model.layers]
            hidden = torch.randn(N, cfg.hidden_size, generator=gen) * 3
            temp = 0.3 + torch.rand(N, 1, generator=gen)
            u = 1 - torch.rand(N, generator=gen)
            cases = {
                "layers": (layers_eager, layers_comp, (h, rope)),
                "pre": (pre_eager, pre_comp, (h, rope)),
                "post": (post_eager, post_comp, (h, os)),
                "sampler_eb": (sampler_eager, sampler_comp, (hidden, temp, u, False)),
                "sampler_conf": (sampler_eager, sampler_comp, (hidden, temp, None, True)),
            }
            for name in ("layers", "sampler_eb", "sampler_conf"):  # first calls compile every graph of the bucket
                t0 = time.perf_counter()
                cases[name][1](*cases[name][2])
                compile_s[f"{name}@{N}"] = round(time.perf_counter() - t0, 2)
            for nt in threads:
                torch.set_num_threads(nt)
                for name, (fe, fc, a) in cases.items():
                    fe(*a)
                    fc(*a)
                    te, tc = [], []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        fe(*a)
                        t1 = time.perf_counter()
                        fc(*a)
                        te.append(t1 - t0)
                        tc.append(time.perf_counter() - t1)
                    e, c = sorted(te)[len(te) // 2] * 1e3, sorted(tc)[len(tc) // 2] * 1e3
                    rows.append({"piece": name, "N": N, "threads": nt, "eager_ms": round(e, 3),
                                 "compiled_ms": round(c, 3), "speedup": round(e / c, 2)})
                    r = rows[-1]
                    print(f"{name:>13} N={N:<4} threads={nt}  eager {e:8.2f} ms  compiled {c:8.2f} ms  "
                          f"x{r['speedup']:.2f}", flush=True)
    print("compile seconds (first call per piece and bucket):", compile_s)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()
    print(json.dumps({"model": args.model, "dtype": str(model.dtype), "git": git, "torch": torch.__version__,
                      "buckets": {N: cl.bucket(N) for N in sizes}, "dense_experts": cl.dense,
                      "dense_rows": cl.dense_rows, "sampler_chunk": cs.chunk, "graphs": cl.compilations,
                      "sampler_graphs": cs.compilations, "compile_seconds": compile_s, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
