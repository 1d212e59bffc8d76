"""`dgemma bench`: generation speed, measured side by side in one run. Prints a table, then one JSON line last.

    dgemma bench --quick                     # a few minutes on a 2-core CPU (run in CI as a smoke test)
    dgemma bench --model PATH --plot bench.png
    dgemma bench --threads 1,2,4 --compile   # other thread counts; the engine step split under torch.compile

Sections 1, 2 and 4 run once per thread count (`--threads`, default 1,2: torch.set_num_threads), side by side:
1. Against the reference: the same weights through transformers 5.23.0 `generate()` and through dgemma's compat
   mode (identical tokens asserted), warm, alternating runs; the ratio of median wall times. Needs transformers
   (the test extra); skipped with a note otherwise.
2. Diffusion against AR decoding of the same weights: several lengths, default settings and fixed step counts
   (adaptive stopping off), against greedy AR: tokens/s, forward passes, tokens per forward, time to the first
   committed token (peak memory at the largest thread count only: it does not depend on threads).
3. Against the machine: measured matmul throughput (fp32, bf16) and copy bandwidth at each thread count; at the
   largest, the fraction of the fp32 matmul throughput one static-path denoising step and one AR step reach.
4. The engine step split (dgemma.engine.engine.Engine, diffusion and AR, 1 and 16 identical rows, 4 steps per canvas,
   adaptive stopping off, no row finishing): ms per step split into layers, LM head, sampler and overhead (from
   Engine.timing), tokens/s, the step's matmul FLOP/s as a fraction of the fp32 and bf16 matmul peaks of 3, and the
   torch.compile graphs compiled during the timed steps (`--compile`; 0 expected once warm, 0 without compile).
Engine options (reference / fast / int8 ...) and sampler memory run once, at the largest thread count.

JSON: the top-level keys hold the largest thread count's figures, except the headline ratios
`speedup_vs_transformers` and `diffusion_over_ar_256`, which are the minimum over thread counts; every per-thread
figure is under `by_threads: {"1": {...}, "2": {...}}`. `section_s` gives each section's wall seconds.
Ratios are taken inside one run because this machine is shared and noisy.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from dgemma.fsio import git_revision, write_json_atomic
from dgemma.options import BenchConfig, add_bench


def add_cli(subparsers) -> None:
    """Register `bench` (flags in options.add_bench, mirroring BenchConfig); dispatch with `run_cli(args)`."""
    add_bench(subparsers).set_defaults(func=run_cli)


def run_cli(args) -> int:
    run(BenchConfig(model=args.model, quick=args.quick, repeats=args.repeats, plot=args.plot, out=args.out,
                    threads=tuple(args.threads), compile=args.compile))
    return 0


def _git() -> str:
    """The short revision, or "unknown": the `git` field of the bench JSONs (speed, train, structured)."""
    return git_revision() or "unknown"


def _device() -> str:
    from dgemma.hw import cpu_name

    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---------------------------------------------------------------------------------------------------------------
# 3. the machine
def machine_limits(quick: bool) -> dict:
    """Matmul GFLOP/s (square fp32 and bf16 products) and copy GB/s at the current thread count: the best of a few
    runs each, since these are peaks and a shared machine only ever makes a run slower."""
    n = 1024 if quick else 2048
    res = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # Quick: bf16 at half the size. CPUs without native bf16 run it at ~1 GFLOP/s, seconds per 1024^3 product.
        m = n // 2 if quick and dt == torch.bfloat16 else n
        a, b = torch.randn(m, m, dtype=dt), torch.randn(m, m, dtype=dt)
        a @ b
        sec = _best(lambda a=a, b=b: a @ b, 3)
        res[f"matmul_gflops_{name}"] = 2 * m**3 / sec / 1e9
    x = torch.empty(64 * 2**20 // 4)  # 64 MiB
    y = torch.empty_like(x)
    y.copy_(x)
    sec = _best(lambda: y.copy_(x), 5)
    res["copy_gbytes_per_s"] = 2 * x.numel() * 4 / sec / 1e9
    return res


def _matmul_flops(model, tokens: float, context: float, head: bool = True, self_conditioning: bool = False) -> float:
    """Matmul FLOPs of one pass over `tokens` new positions (all rows together), each attending to `context` keys
    of its own row (a sliding layer's to at most its window): q/k/v/o projections, attention scores and values,
    dense MLP, router and the top-k experts; with `head` the LM head over every position; with `self_conditioning`
    a denoising step's self-conditioning too: the soft embedding (probabilities [tokens, V] @ E [V, H]) and its
    gated MLP. Norms, softmax, RoPE and the sampler's elementwise work are not matmuls and are not counted."""
    c = model.config
    H, V, f = c.hidden_size, c.vocab_size, 0.0
    for i in range(c.num_hidden_layers):
        d, kv = c.layer_head_dim(i), c.layer_kv_heads(i)
        nh = c.num_attention_heads
        keys = min(context, c.sliding_window) if c.is_sliding(i) else context
        f += 2 * tokens * H * (2 * nh * d + kv * d * (2 if c.is_sliding(i) else 1))
        f += 2 * 2 * tokens * nh * d * keys
        f += 2 * tokens * 3 * H * c.intermediate_size
        f += 2 * tokens * (c.num_experts * H + c.top_k_experts * 3 * H * c.moe_intermediate_size)
    if head:
        f += 2 * tokens * H * V
    if self_conditioning:
        f += 2 * tokens * V * H + 2 * tokens * 3 * H * c.intermediate_size
    return f


@torch.inference_mode()
def step_fractions(model, peak_fp32: float, peak_bf16: float, repeats: int) -> dict:
    """One denoising step (canvas over a 256-token context, self-conditioning on) and one AR step, on the fast
    engine, against the machine's matmul throughput."""
    from dgemma.engine.static import StaticCache, StaticPasses

    c = model.config
    C = c.canvas_length
    eng = StaticPasses(model)
    ids = torch.randint(5, c.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(model, 1, 256 + C, 256)
    eng.encode(cache, ids)
    masks = eng.decoder_masks(cache, C)
    canvas = torch.randint(5, c.vocab_size, (1, C))
    soft = model.soft_embed(torch.randn(1, C, c.vocab_size))

    def denoise_step():  # the decoder pass plus the next step's soft embedding (part of every step)
        logits = eng.denoise(cache, canvas, soft, masks)
        return model.soft_embed(logits)

    denoise_step()
    t_dn, _ = _timed(denoise_step, repeats * 3)
    one = torch.tensor([[7]])

    def ar_step():
        h = eng.encode(cache, one)
        cache.length -= 1  # rewind: every timed step writes the same position
        return model.logits(h)

    ar_step()
    t_ar, _ = _timed(ar_step, repeats * 3)
    f_dn = _matmul_flops(model, C, 256 + C, self_conditioning=True)
    f_ar = _matmul_flops(model, 1, 257)
    return {"denoise_step_ms": t_dn * 1e3, "ar_step_ms": t_ar * 1e3,
            "denoise_step_gflops": f_dn / t_dn / 1e9, "ar_step_gflops": f_ar / t_ar / 1e9,
            "denoise_step_matmul_fraction": f_dn / t_dn / 1e9 / peak_fp32,
            "denoise_step_bf16_matmul_fraction": f_dn / t_dn / 1e9 / peak_bf16,
            "ar_step_matmul_fraction": f_ar / t_ar / 1e9 / peak_fp32,
            "denoise_over_ar_step_cost": t_dn / t_ar}


@torch.inference_mode()
def sampler_memory(vocab_size: int, canvas: int, batch: int, hidden: int) -> dict:
    """Peak bytes allocated by one sampler step plus the next self-conditioning embedding: the reference
    (sample_step + soft_embed over whole [B, C, V] tensors) against the chunked sampler."""
    from dgemma.bench.memtrack import track_memory
    from dgemma.config import preset
    from dgemma.engine.static import sample_chunked
    from dgemma.model import DiffusionGemma
    from dgemma.sampler import sample_step

    cfg = preset("tiny").replace(vocab_size=vocab_size, hidden_size=hidden, head_dim=hidden // 4,
                                 global_head_dim=hidden // 2, num_hidden_layers=1, layer_types=("full_attention",))
    model = DiffusionGemma(cfg).eval()
    torch.nn.init.normal_(model.embed_tokens.weight)
    raw = torch.randn(batch, canvas, vocab_size)
    cv = torch.randint(0, vocab_size, (batch, canvas))
    temp = torch.tensor(0.6)
    with track_memory() as ref:
        sample_step(raw / temp, cv, 0.1, vocab_size, torch.Generator().manual_seed(0))
        model.soft_embed(raw)
    with track_memory() as fast:
        sample_chunked(raw, temp, cv, 0.1, torch.Generator().manual_seed(0), model, "raw")
    return {"vocab_size": vocab_size, "canvas": canvas, "batch": batch, "logits_mb": raw.numel() * 4 / 2**20,
            "reference_peak_mb": ref.peak_bytes / 2**20, "chunked_peak_mb": fast.peak_bytes / 2**20}


# ---------------------------------------------------------------------------------------------------------------
# 1. against transformers
def vs_transformers(model, repeats: int, new_tokens: int, steps: int) -> dict:
    try:
        from transformers import DiffusionGemmaForBlockDiffusion  # noqa: F401
    except ImportError:
        return {"skipped": "transformers not installed (pip install -e .[test])"}
    import tempfile

    from transformers import DiffusionGemmaForBlockDiffusion as HF
    from transformers.utils import logging as hf_logging

    from dgemma.checkpoint import save_checkpoint
    from dgemma.engine.generate import DiffusionParams, generate_diffusion

    hf_logging.set_verbosity_error()  # dgemma checkpoints carry no vision tower; its "missing" report is noise here
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, Path(tmp) / "m")

        hf = HF.from_pretrained(Path(tmp) / "m", dtype=torch.float32).eval()
    c = model.config
    ids = torch.randint(5, c.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": new_tokens, "max_denoising_steps": steps}

    def ref():
        torch.manual_seed(0)
        with torch.inference_mode():
            return hf.generate(ids, **kw).sequences

    params = DiffusionParams(max_new_tokens=new_tokens, max_denoising_steps=steps, seed=0, compat=True)
    slow = DiffusionParams(**{**params.__dict__, "engine": "reference"})

    def ours():
        return generate_diffusion(model, ids, params).sequences

    def ours_reference():
        return generate_diffusion(model, ids, slow).sequences

    a, b, c_ = ref(), ours(), ours_reference()  # warm-up, and the identity check
    if not (torch.equal(a, b) and torch.equal(a, c_)):
        raise AssertionError("compat mode and transformers generate() produced different tokens")
    t_ref, t_ours, t_slow = [], [], []
    for _ in range(repeats):  # alternate so that machine noise hits all sides alike
        t_ref.append(_timed(ref, 1)[0])
        t_ours.append(_timed(ours, 1)[0])
        t_slow.append(_timed(ours_reference, 1)[0])
    med = statistics.median
    return {"transformers_s": med(t_ref), "dgemma_s": med(t_ours), "dgemma_reference_engine_s": med(t_slow),
            "speedup": med(t_ref) / med(t_ours), "speedup_reference_engine": med(t_ref) / med(t_slow),
            "identical_tokens": True, "new_tokens": int(a.shape[1] - ids.shape[1])}


# ---------------------------------------------------------------------------------------------------------------
# 2. diffusion vs AR
def diffusion_vs_ar(model, lengths: list[int], fixed_steps: list[int], repeats: int,
                    generation_config: dict | None = None, memory: bool = True) -> list[dict]:
    """Rows of tokens/s, passes and time to the first token; `memory`: also each run's peak MB (one more untimed run
    each, so that the tracking does not slow the timed one; None without)."""
    from dgemma.bench.memtrack import track_memory
    from dgemma.engine.generate import ARParams, DiffusionParams, generate_ar, generate_diffusion

    def peak_mb(fn) -> float | None:  # a separate, untimed run: tracking every allocation slows it down
        if not memory:
            return None
        with track_memory() as mem:
            fn()
        return mem.peak_bytes / 2**20

    c = model.config
    prompt = torch.randint(5, c.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    rows = []
    generate_ar(model, prompt, ARParams(max_new_tokens=4))  # warm-up
    for n in lengths:
        t_ar, ar = _timed(lambda n=n: generate_ar(model, prompt, ARParams(max_new_tokens=n)), repeats)
        got_ar = len(ar.tokens[0])
        rows.append({"mode": "ar", "new_tokens": n, "tokens_per_s": got_ar / t_ar, "passes": ar.stats.decoder_passes[0],
                     "tokens_per_forward": got_ar / ar.stats.decoder_passes[0],
                     "first_token_s": ar.stats.first_token_seconds, "steps": None,
                     "peak_mb": peak_mb(lambda n=n: generate_ar(model, prompt, ARParams(max_new_tokens=n)))})
        for steps in ["default", *fixed_steps]:
            if steps == "default":  # the model's generation_config.json, EOS off so that lengths compare
                p = DiffusionParams.from_generation_config(generation_config, max_new_tokens=n, seed=0)
                p.eos_token_ids, p.pad_token_id = None, None
            else:  # a fixed step count: adaptive stopping off
                p = DiffusionParams(max_new_tokens=n, max_denoising_steps=steps, stability_threshold=None,
                                    confidence_threshold=None, seed=0)
            t, out = _timed(lambda p=p: generate_diffusion(model, prompt, p), repeats)
            got = len(out.tokens[0])
            spc = out.stats.steps_per_canvas[0]
            rows.append({"mode": "diffusion", "new_tokens": n, "steps": steps, "tokens_per_s": got / t,
                         "passes": out.stats.decoder_passes[0],
                         "tokens_per_forward": got / max(out.stats.decoder_passes[0], 1),
                         "steps_per_canvas": sum(spc) / len(spc), "first_token_s": out.stats.first_token_seconds,
                         "speedup_vs_ar": (got / t) / (got_ar / t_ar),
                         "peak_mb": peak_mb(lambda p=p: generate_diffusion(model, prompt, p))})
    return rows


def engine_options(model, new_tokens: int, steps: int, repeats: int, full: bool) -> list[dict]:
    """Diffusion (fixed steps, adaptive stopping off) and greedy AR tokens/s for each engine option, same prompt."""
    import copy

    from dgemma.engine.generate import ARParams, DiffusionParams, generate_ar, generate_diffusion
    from dgemma.quant import quantize_int8

    c = model.config
    prompt = torch.randint(5, c.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
    variants = [("reference", model, {"engine": "reference"}), ("fast", model, {}),
                ("fast+int8", quantize_int8(copy.deepcopy(model)), {})]
    if full:
        variants += [("fast+compile", model, {"compile": True}),
                     ("fast+bf16", copy.deepcopy(model).to(torch.bfloat16), {})]
    rows = []
    for name, m, opts in variants:
        dp = DiffusionParams(max_new_tokens=new_tokens, max_denoising_steps=steps, stability_threshold=None,
                             confidence_threshold=None, seed=0, **opts)
        ap = ARParams(max_new_tokens=new_tokens, **opts)
        generate_diffusion(m, prompt, dp)  # warm-up (and compilation)
        generate_ar(m, prompt, ap)
        r = 1 if name == "fast+bf16" else repeats  # bf16 matmuls are very slow on CPUs without native bf16
        t_d, d = _timed(lambda m=m, dp=dp: generate_diffusion(m, prompt, dp), r)
        t_a, a = _timed(lambda m=m, ap=ap: generate_ar(m, prompt, ap), r)
        rows.append({"engine": name, "diffusion_tokens_per_s": len(d.tokens[0]) / t_d,
                     "ar_tokens_per_s": len(a.tokens[0]) / t_a, "steps": steps, "new_tokens": new_tokens})
    base = rows[0]
    for r in rows:
        r["diffusion_vs_reference"] = r["diffusion_tokens_per_s"] / base["diffusion_tokens_per_s"]
        r["ar_vs_reference"] = r["ar_tokens_per_s"] / base["ar_tokens_per_s"]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 4. the engine step split
def _graphs_compiled(eng=None) -> int | None:
    """Graphs compiled so far: the engine's own compiled pieces (compiled.py compiles with inductor directly, one
    graph per piece and row bucket) plus any torch.compile (dynamo) graphs in this process (None: that counter cannot
    be read in this torch)."""
    own = 0
    if eng is not None and eng.runner.compiled is not None:
        own = eng.runner.compiled.compilations + eng.compiled_sampler.compilations
    if "torch._dynamo" not in sys.modules:  # dynamo never ran
        return own
    try:  # a private counter: read defensively, a benchmark must not fail on a torch upgrade
        from torch._dynamo.utils import counters

        return own + int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return None


def engine_split(model, mode: str, batch: int, steps: int, peak_fp32: float, peak_bf16: float,
                 compile: bool = False, steps_per_canvas: int = 4, prompt_tokens: int = 32) -> dict:
    """Time `steps` engine steps of `batch` identical rows (same prompt, fixed steps per canvas, adaptive stopping
    off, max_new_tokens long enough that no row finishes) after a warm-up; split each step from Engine.timing
    deltas, and set its matmul FLOP/s against the fp32 and bf16 matmul peaks (GFLOP/s) of this thread count."""
    from dgemma.engine.engine import TIMING_KEYS, Engine
    from dgemma.params import EngineConfig, Request, SamplingParams

    c = model.config
    C, diffusion = c.canvas_length, mode == "diffusion"
    if diffusion:
        # Whole canvases: every window of k * steps_per_canvas steps holds exactly k commit encoder passes.
        steps = -(-steps // steps_per_canvas) * steps_per_canvas
        # Prefill, two canvases and the first step of a third: every shape the steady state sees (a second
        # context length too, on which torch.compile may recompile once with dynamic shapes).
        warmup = 2 * steps_per_canvas + 1
        new_tokens = C * (-(-(warmup + steps) // steps_per_canvas) + 2)
    else:
        warmup = 4
        new_tokens = warmup + steps + 4
    prompt = torch.randint(5, c.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(3)).tolist()
    eng = Engine(model, EngineConfig(max_batch=batch, max_model_len=prompt_tokens + new_tokens + C, compile=compile))
    for i in range(batch):
        eng.add(Request(str(i), prompt, SamplingParams(
            mode=mode, max_new_tokens=new_tokens, max_denoising_steps=steps_per_canvas, stability_threshold=None,
            confidence_threshold=None, seed=i)))
    for _ in range(warmup):
        eng.step()

    def context() -> float:  # mean committed positions per row
        return statistics.fmean(eng.pool.length[s] for s in eng.rows)

    ctx0, t0, enc0, graphs0 = context(), dict(eng.timing), eng.counters["encoder_passes"], _graphs_compiled(eng)
    tokens, wall = 0, time.perf_counter()
    for _ in range(steps):
        tokens += sum(len(ev.new_ids) for ev in eng.step())
    wall = time.perf_counter() - wall
    graphs1 = _graphs_compiled(eng)
    if len(eng.rows) != batch:
        raise AssertionError(f"{batch - len(eng.rows)} of {batch} rows finished during the timed steps")
    ctx = (ctx0 + context()) / 2  # it grows about linearly over the window
    dt = {k: (eng.timing[k] - t0[k]) / steps for k in TIMING_KEYS}  # seconds per step
    enc_per_step = (eng.counters["encoder_passes"] - enc0) / steps
    if diffusion:
        # One decoder pass over B*C canvas positions (keys: the committed context + the canvas) with its LM head and
        # self-conditioning, plus each step's share of the commit encoder passes, no LM head, keys growing over the
        # canvas from ctx to ctx + C (mean ctx + C/2). A commit pass encodes the tokens its row just committed, so
        # over whole canvases the encoded positions per step are the committed tokens per step. (Counting passes
        # would not do: at 16 rows the prompts take two prefill steps, so two half-batch commit passes per canvas.)
        flops = _matmul_flops(model, batch * C, ctx + C, self_conditioning=True)
        flops += _matmul_flops(model, tokens / steps, ctx + C / 2, head=False)
    else:  # one encoder pass of one token per row, and the LM head on those tokens
        flops = _matmul_flops(model, batch, ctx + 1)
    step_s = dt["step"]
    layers = dt["encoder_layers"] + dt["decoder_layers"]
    gflops = flops / step_s / 1e9
    return {"mode": mode, "batch": batch, "threads": torch.get_num_threads(), "compile": compile,
            "steps_per_canvas": steps_per_canvas if diffusion else None, "warmup_steps": warmup, "timed_steps": steps,
            "context": ctx, "step_ms": step_s * 1e3, "layers_ms": layers * 1e3,
            "encoder_layers_ms": dt["encoder_layers"] * 1e3, "decoder_layers_ms": dt["decoder_layers"] * 1e3,
            "head_ms": dt["head"] * 1e3, "sampler_ms": dt["sampler"] * 1e3,
            "overhead_ms": (step_s - layers - dt["head"] - dt["sampler"]) * 1e3,
            "encoder_passes_per_step": enc_per_step, "tokens_per_step": tokens / steps, "tokens_per_s": tokens / wall,
            "matmul_gflop_per_step": flops / 1e9, "gflops": gflops, "fp32_matmul_fraction": gflops / peak_fp32,
            "bf16_matmul_fraction": gflops / peak_bf16,
            "recompiles": None if graphs0 is None or graphs1 is None else graphs1 - graphs0}


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for steps in sorted({r["steps"] for r in rows if r["mode"] == "diffusion"}, key=str):
        pts = [(r["new_tokens"], r["speedup_vs_ar"]) for r in rows if r["mode"] == "diffusion" and r["steps"] == steps]
        ax.plot(*zip(*pts), "o-", label=f"diffusion, {steps} steps/canvas")
    ax.axhline(1.0, color="grey", ls="--", label="AR (greedy), same weights")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("new tokens")
    ax.set_ylabel("tokens/s relative to AR")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _at_threads(model, tiny, lm, cfg: BenchConfig, memory: bool, clock) -> dict:
    """Sections 1, 2, 3 (the machine) and 4 at the current torch thread count."""
    quick, C = cfg.quick, model.config.canvas_length
    n = torch.get_num_threads()
    res: dict = {"threads": n}
    with clock(f"machine@{n}"):
        res.update(machine_limits(quick))
    with clock(f"vs_transformers@{n}"):  # quick: at most 2 timed runs a side (CI runs this once per thread count)
        reps = min(cfg.repeats, 2) if quick else cfg.repeats
        res["vs_transformers_tiny"] = vs_transformers(tiny, reps, 2 * tiny.config.canvas_length, 8)
        res["vs_transformers_model"] = vs_transformers(model, reps, 2 * C, 8)
    speedups = [res[k]["speedup"] for k in ("vs_transformers_tiny", "vs_transformers_model") if "speedup" in res[k]]
    res["speedup_vs_transformers"] = min(speedups) if speedups else None
    lengths = [64, 256] if quick else [64, 128, 256, 512, 1024]
    fixed = [4, 16] if quick else [4, 8, 16, 32]
    with clock(f"diffusion_vs_ar@{n}"):
        rows = diffusion_vs_ar(model, lengths, fixed, 1 if quick else cfg.repeats, lm.generation_config, memory)
    res["diffusion_vs_ar"] = rows
    d256 = [r for r in rows if r["mode"] == "diffusion" and r["new_tokens"] == 256 and r["steps"] == "default"]
    res["diffusion_over_ar_256"] = d256[0]["speedup_vs_ar"] if d256 else None
    with clock(f"engine_split@{n}"):
        res["engine_split"] = [
            engine_split(model, mode, batch, (8 if batch > 1 else 16) if quick else 16, res["matmul_gflops_fp32"],
                         res["matmul_gflops_bf16"], compile=cfg.compile)
            for mode in ("diffusion", "ar") for batch in (1, 16)]
    return res


def run(cfg: BenchConfig) -> dict:
    from dgemma.api import DEFAULT_MODEL, load

    start = time.perf_counter()
    torch.manual_seed(0)
    spec = cfg.model or (str(DEFAULT_MODEL) if (DEFAULT_MODEL / "config.json").is_file() else "random:mini")
    lm = load(spec, dtype=torch.float32)
    model = lm.model
    tiny = load("random:tiny").model
    threads = list(cfg.threads)
    top = max(threads)  # the top-level figures; the old single-column bench ran at torch's default, all cores
    result: dict = {"model": spec, "device": _device(), "git": _git(), "quick": cfg.quick, "threads": threads,
                    "top_level_threads": top, "compile": cfg.compile}
    sections: dict[str, float] = {}

    @contextmanager
    def clock(name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sections[name] = sections.get(name, 0.0) + time.perf_counter() - t0

    before = torch.get_num_threads()
    by: dict[str, dict] = {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            by[str(n)] = _at_threads(model, tiny, lm, cfg, memory=n == top, clock=clock)
        torch.set_num_threads(top)
        at_top = by[str(top)]
        for k in ("matmul_gflops_fp32", "matmul_gflops_bf16", "copy_gbytes_per_s"):
            result[k] = at_top[k]
        with clock("step_fractions"):
            result.update(step_fractions(model, at_top["matmul_gflops_fp32"], at_top["matmul_gflops_bf16"],
                                         cfg.repeats))
        c = model.config
        with clock("sampler_memory"):
            result["sampler_memory"] = [sampler_memory(c.vocab_size, c.canvas_length, 8, c.hidden_size)]
            if not cfg.quick:  # the released shape's vocabulary and canvas, one request
                result["sampler_memory"].append(sampler_memory(262144, 256, 1, 256))
        with clock("engine_options"):
            result["engine_options"] = engine_options(model, 64 if cfg.quick else 128, 8, 1 if cfg.quick else
                                                      cfg.repeats, not cfg.quick)
    finally:
        torch.set_num_threads(before)
    for k in ("vs_transformers_tiny", "vs_transformers_model", "diffusion_vs_ar", "engine_split"):
        result[k] = at_top[k]
    # Headline ratios: the least favourable thread count.
    for k in ("speedup_vs_transformers", "diffusion_over_ar_256"):
        vals = [v[k] for v in by.values() if v[k] is not None]
        result[k] = min(vals) if vals else None
    counts = [e["recompiles"] for v in by.values() for e in v["engine_split"]]
    result["recompiles"] = None if None in counts else sum(counts)
    result["default_steps"] = (lm.generation_config or {}).get("max_denoising_steps", 48)
    # What the step costs allow: a canvas of C tokens costs (steps + 1 encoder pass) passes of the denoise-step
    # cost, against C AR steps.
    C = model.config.canvas_length
    ratio = result["denoise_over_ar_step_cost"]
    result["diffusion_over_ar_bound"] = {str(n): C / ((n + 1) * ratio) for n in (4, 8, 16, 32)}
    result["by_threads"] = by
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["section_s"] = {**sections, "total": time.perf_counter() - start}
    if cfg.plot:
        _plot(result["diffusion_vs_ar"], cfg.plot)
    _print(result)
    finish(result, cfg.out)
    return result


def finish(result: dict, out: str | None) -> None:
    """Write the result JSON to `out` (beside it first, then renamed in) and print it as the last line."""
    if out:
        write_json_atomic(out, result)
    print(json.dumps(result))


def _print(r: dict) -> None:
    by, threads = r["by_threads"], r["threads"]
    print(f"device: {r['device']}  git {r['git']}  model {r['model']}")
    print(f"threads measured side by side: {', '.join(map(str, threads))} (single-column figures: "
          f"{r['top_level_threads']} threads; headline ratios: the minimum over thread counts)")
    for n in threads:
        m = by[str(n)]
        print(f"machine @{n} threads: matmul fp32 {m['matmul_gflops_fp32']:.1f} GFLOP/s, bf16 "
              f"{m['matmul_gflops_bf16']:.1f} GFLOP/s, copy {m['copy_gbytes_per_s']:.1f} GB/s")
    print(f"one denoising step {r['denoise_step_ms']:.1f} ms ({r['denoise_step_gflops']:.1f} GFLOP/s, "
          f"{100 * r['denoise_step_matmul_fraction']:.0f}% of fp32 matmul); one AR step {r['ar_step_ms']:.1f} ms "
          f"({100 * r['ar_step_matmul_fraction']:.0f}%); a denoising step costs {r['denoise_over_ar_step_cost']:.1f} AR steps")
    print(f"one denoising step at bf16 matmul throughput: {100 * r['denoise_step_bf16_matmul_fraction']:.0f}%; "
          "diffusion/AR tokens/s the step costs allow at 4/8/16/32 steps: "
          + ", ".join(f"{v:.2f}" for v in r["diffusion_over_ar_bound"].values()))
    for m in r["sampler_memory"]:
        print(f"sampler peak memory, vocab {m['vocab_size']}, {m['batch']}x{m['canvas']} canvas: reference "
              f"{m['reference_peak_mb']:.1f} MB, chunked {m['chunked_peak_mb']:.1f} MB (logits {m['logits_mb']:.1f} MB)")
    print(f"{'engine':<14}{'diffusion tok/s':>16}{'vs ref':>8}{'AR tok/s':>10}{'vs ref':>8}")
    for e in r["engine_options"]:
        print(f"{e['engine']:<14}{e['diffusion_tokens_per_s']:>16.1f}{e['diffusion_vs_reference']:>8.2f}"
              f"{e['ar_tokens_per_s']:>10.1f}{e['ar_vs_reference']:>8.2f}")
    for name in ("vs_transformers_tiny", "vs_transformers_model"):
        for n in threads:
            v = by[str(n)][name]
            if "speedup" in v:
                print(f"{name} @{n} threads: transformers {v['transformers_s']:.3f}s, dgemma {v['dgemma_s']:.3f}s -> "
                      f"{v['speedup']:.2f}x (reference engine {v['speedup_reference_engine']:.2f}x; identical tokens, "
                      f"{v['new_tokens']} new)")
            else:
                print(f"{name} @{n} threads: {v}")
    # Diffusion vs AR: tok/s and vs AR per thread count side by side; passes, TTFT and peak memory at the top count.
    top = by[str(r["top_level_threads"])]["diffusion_vs_ar"]
    print(f"{'mode':<10}{'steps':>8}{'new':>6}" + "".join(f"{f'tok/s@{n}':>10}{f'vsAR@{n}':>8}" for n in threads)
          + f"{'passes':>8}{'tok/fwd':>9}{'TTFT s':>8}{'peak MB':>9}")
    for i, row in enumerate(top):
        cols = "".join(f"{by[str(n)]['diffusion_vs_ar'][i]['tokens_per_s']:>10.1f}"
                       f"{by[str(n)]['diffusion_vs_ar'][i].get('speedup_vs_ar', 1.0):>8.2f}" for n in threads)
        print(f"{row['mode']:<10}{row['steps']!s:>8}{row['new_tokens']:>6}{cols}{row['passes']:>8}"
              f"{row['tokens_per_forward']:>9.2f}{row['first_token_s']:>8.3f}{row['peak_mb'] or 0:>9.1f}")
    top_split = by[str(r["top_level_threads"])]["engine_split"]
    print(f"engine step split: the same prompt on every row, {top_split[0]['steps_per_canvas']} steps per canvas, "
          f"adaptive stopping off, no row finishing; ms per step{', torch.compile' if r['compile'] else ''} (layers = encoder + "
          "decoder; overhead = step - layers - head - sampler)")
    print(f"{'mode':<10}{'rows':>5}{'thr':>4}{'step':>8}{'layers':>8}{'head':>7}{'sampler':>8}{'overhd':>8}"
          f"{'tok/s':>9}{'GFLOP/s':>9}{'%fp32':>7}{'%bf16':>7}{'recomp':>7}")
    for i in range(len(top_split)):
        for n in threads:
            e = by[str(n)]["engine_split"][i]
            rc = "n/a" if e["recompiles"] is None else str(e["recompiles"])
            print(f"{e['mode']:<10}{e['batch']:>5}{n:>4}{e['step_ms']:>8.1f}{e['layers_ms']:>8.1f}{e['head_ms']:>7.1f}"
                  f"{e['sampler_ms']:>8.1f}{e['overhead_ms']:>8.1f}{e['tokens_per_s']:>9.1f}{e['gflops']:>9.1f}"
                  f"{100 * e['fp32_matmul_fraction']:>7.1f}{100 * e['bf16_matmul_fraction']:>7.0f}{rc:>7}")
    if any(by[str(n)]["matmul_gflops_bf16"] < by[str(n)]["matmul_gflops_fp32"] for n in threads):
        print("note: this machine's bf16 matmul is slower than its fp32 one (no fast bf16), so an fp32 step can run "
              "above 100% of the bf16 peak: that is a fact about the machine, not an error")
    print("seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in r["section_s"].items()))
