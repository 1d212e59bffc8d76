"""GPU benchmark (issue 4, item 4): the real 26B-A4B shape with random weights, diffusion against AR decoding.

    bash benchmarks/gpu.sh                                      # on a lent H100/H200 (picks python, nvidia-smi, timeout)
    python benchmarks/gpu_bench.py --out benchmarks/results/gpu  # the same, by hand
    python benchmarks/gpu_bench.py --scale small --device cpu   # scaled-down shape on a CPU (what the test runs)

One run measures, on one device, with the same weights:
1. the machine: a large matmul in the model dtype (the peak the denoise step is compared with) and copy bandwidth;
2. one denoising step (a canvas over a cached prompt, with self-conditioning logits) and one AR step through
   `model.denoise`/`model.encode` (the reference path), each warmed up, synchronised and timed as a median, with
   their FLOP rate against the measured matmul peak and a roofline floor (FLOPs over the peak, weight bytes over
   the bandwidth);
3. generation: `generate_diffusion` at fixed step counts (adaptive stopping and EOS off, so every canvas runs
   all its steps) against greedy `generate_ar` of as many tokens, alternating, as committed tokens/s, on the fast
   engine where dgemma has one (feature-detected; `engine_step_ms` is one more step on it, from two step counts);
4. optionally, transformers' `generate()` on a model of fewer layers (the full shape does not fit twice): saved by
   dgemma, loaded by transformers, timed against dgemma on the same weights. Skipped with a reason when
   transformers (with DiffusionGemma) is missing, memory or disk is short, or time is running out; a failure there
   is recorded and never loses the main results.
The weights are built directly on the device in the model dtype (no host copy of 25 B fp32 parameters). If the
shape does not fit the device memory, the depth is cut to what fits (or `--layers N`), and the JSON says so.

Prints a readable table, then one JSON line last. With `--out DIR` it also writes DIR/gpu_bench.json (after every
phase, so a run killed by a timeout keeps what it measured) and DIR/gpu_bench.log.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    import dgemma.config  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`: the package sits one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgemma.config import ModelConfig, preset
from dgemma.engine.generate import ARParams, DiffusionParams, generate_ar, generate_diffusion
from dgemma.model import DiffusionGemma

GiB = 2**30


@dataclass
class GpuBenchConfig:
    scale: str = "full"  # "full": the 26b-a4b preset; "small": the same structure scaled down for a CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu (bf16 matmuls are slow on AVX2 CPUs)
    layers: int | None = None  # cut the depth; None: the preset's, or fewer if it does not fit the device memory
    prompt_tokens: int | None = None  # None: the scale's default (full 512, small 96)
    new_tokens: int | None = None  # None: one canvas
    steps: list[int] = field(default_factory=list)  # fixed denoising steps per canvas; first is the headline
    step_repeats: int | None = None  # timed single steps (median)
    gen_repeats: int | None = None  # timed generate calls per mode (median)
    engine: str = "fast"  # passed as DiffusionParams/ARParams.engine when dgemma has that field
    compile: bool = False  # passed as .compile when dgemma has that field
    sampler_chunk: int | None = None  # .sampler_chunk of the fast engine; None: the canvas on cuda, 0: engine default
    hf: str = "auto"  # "auto": transformers generate() where possible; "off": skip it
    hf_layers: int | None = None  # depth of the model the transformers comparison runs on
    budget_s: float = 420.0  # optional phases are skipped when they would run past this many seconds
    seed: int = 0
    out: str | None = None


# Per-scale defaults for the fields left None/empty above.
SCALES: dict[str, dict] = {
    "full": {"prompt_tokens": 512, "steps": [16, 8], "step_repeats": 10, "gen_repeats": 3, "hf_layers": 6},
    "small": {"prompt_tokens": 96, "steps": [4, 2], "step_repeats": 3, "gen_repeats": 1, "hf_layers": 2},
}


def model_config(scale: str) -> ModelConfig:
    cfg = preset("26b-a4b")
    if scale == "small":  # the 26B structure (5 sliding : 1 full, k = v on full layers, top-k experts), shrunk
        cfg = cfg.replace(vocab_size=4096, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                          layer_types=(), num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          global_head_dim=128, num_global_key_value_heads=1, sliding_window=64, num_experts=16,
                          top_k_experts=4, moe_intermediate_size=128, canvas_length=32, max_position_embeddings=8192)
    elif scale != "full":
        raise ValueError(f"unknown scale {scale!r}; choose 'full' or 'small'")
    return cfg


def with_layers(cfg: ModelConfig, n: int) -> ModelConfig:
    """The same shape with `n` layers, in the default pattern (every 6th full, the last one full)."""
    return cfg.replace(num_hidden_layers=n, layer_types=())


# ---------------------------------------------------------------------------------------------------------------
# Output: everything printed also goes to the log; the result dict is rewritten after each phase.
class Report:
    def __init__(self, out: str | None):
        self.dir = Path(out) if out else None
        self.log = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.log = open(self.dir / "gpu_bench.log", "w", buffering=1)  # noqa: SIM115 (closed in close())
        self.result: dict = {"phase_s": {}}
        self.t_mark = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Record the seconds since the previous mark under phase_s[phase] and save."""
        now = time.perf_counter()
        self.result["phase_s"][phase] = round(now - self.t_mark, 3)
        self.t_mark = now
        self.save()

    def say(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.log is not None:
            self.log.write(msg + "\n")

    def save(self) -> None:
        if self.dir is None:
            return
        tmp = self.dir / ".gpu_bench.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        os.replace(tmp, self.dir / "gpu_bench.json")

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


class Interrupted(BaseException):
    """SIGTERM (the wrapper's timeout): stop measuring, print what was measured. A BaseException, like
    KeyboardInterrupt, so that no library's `except Exception` swallows it."""


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


# ---------------------------------------------------------------------------------------------------------------
# Device, timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1, before=None) -> tuple[list[float], object]:
    """Wall seconds per call of `fn()`, synchronised before and after. With `before`, each call is
    `fn(before())` and `before()` runs untimed (a fresh cache, say)."""
    def call():
        return fn() if before is None else fn(before())

    out = None
    for _ in range(warmup):
        out = call()
    times = []
    for _ in range(repeats):
        arg = before() if before is not None else None
        sync(device)
        t0 = time.perf_counter()
        out = fn() if before is None else fn(arg)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


def describe_device(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / GiB, 1), sm_count=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
        info["device"] = f"{p.name} ({p.total_memory / GiB:.0f} GiB), CUDA {torch.version.cuda}, torch {torch.__version__}"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"{cpu} (CPU), {torch.get_num_threads()} threads, torch {torch.__version__}"
    return info


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent, check=False).stdout.strip()
        return (out + ("-dirty" if dirty else "")) if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_limits(device: torch.device, dtype: torch.dtype) -> dict:
    """Measured ceilings: one large square matmul in `dtype` (TFLOP/s) and a device-to-device copy (GB/s)."""
    n, copy_bytes, inner = (8192, GiB, 10) if device.type == "cuda" else (1024, 64 * 2**20, 2)
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)  # random data: zeros run faster
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)

    def mm():
        for _ in range(inner):
            torch.matmul(a, b)

    t, _ = timed(mm, device, repeats=5, warmup=1)
    x = torch.empty(copy_bytes // 4, device=device)
    y = torch.empty_like(x)

    def cp():
        for _ in range(inner):
            y.copy_(x)

    tc, _ = timed(cp, device, repeats=5, warmup=1)
    return {"matmul_dtype": str(dtype).replace("torch.", ""), "matmul_n": n,
            "matmul_peak_tflops": 2 * n**3 * inner / statistics.median(t) / 1e12,
            "copy_gbytes_per_s": 2 * x.numel() * 4 * inner / statistics.median(tc) / 1e9}


# ---------------------------------------------------------------------------------------------------------------
# Model
def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int, std: float = 0.02):
    """A DiffusionGemma made directly on `device` in `dtype`: parameters are never materialised elsewhere.

    Same recipe as model.init_weights (normal(0, std) matrices, ones elsewhere), drawn on the device."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # nn.Linear & co. allocate (and run their default init) in `dtype` on `device`
    try:
        with torch.device(device):
            model = DiffusionGemma(cfg)
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=g)
            else:
                p.fill_(1.0)
    return model.eval()


def fit_layers(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, requested: int | None) -> tuple[int, str]:
    """Depth to build: the requested one, else the preset's, cut to what the device's free memory holds."""
    if requested is not None:
        return requested, "--layers"
    if device.type != "cuda":
        return cfg.num_hidden_layers, "preset"
    free, _ = torch.cuda.mem_get_info(device)
    margin = 6 * GiB  # activations: fp32 [C, V] logits and the sampler's temporaries, prefill, allocator slack
    per_byte = torch.finfo(dtype).bits // 8
    full = cfg.num_parameters()["total"] * per_byte
    if full + margin <= free:
        return cfg.num_hidden_layers, "preset"
    one = with_layers(cfg, 1).num_parameters()["total"] * per_byte
    per_layer = (full - one) / max(cfg.num_hidden_layers - 1, 1)
    n = max(1, int((free - margin - one) // per_layer) + 1)
    return min(n, cfg.num_hidden_layers), (f"cut: {full / GiB:.1f} GiB of weights + {margin / GiB:.0f} GiB margin "
                                           f"exceed {free / GiB:.1f} GiB free")


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and bytes of one pass (the roofline)
def pass_flops(cfg: ModelConfig, tokens: int, context: int, denoise: bool) -> float:
    """FLOPs of one pass over `tokens` positions after `context` cached ones: 2 x active parameters x tokens
    (tied LM head included; self-conditioning only in the denoiser, with its [T, V] x [V, H] soft embedding)
    plus attention scores and values over the keys each layer sees."""
    H, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    active = cfg.num_parameters()["active_per_token"]
    sc_mlp = 3 * H * I + H
    flops = 2.0 * (active - (0 if denoise else sc_mlp)) * tokens
    if denoise:
        flops += 2.0 * tokens * V * H
    for i in range(cfg.num_hidden_layers):
        kept = min(cfg.sliding_window - 1, context) if cfg.is_sliding(i) else context
        flops += 4.0 * tokens * cfg.num_attention_heads * cfg.layer_head_dim(i) * (kept + tokens)
    return flops


def pass_weight_bytes(cfg: ModelConfig, tokens: int, denoise: bool, bytes_per: int) -> float:
    """Weight bytes one pass must read at least: everything but the experts, plus the experts its tokens touch
    (expected share under uniform top-k routing, 1 - (1 - k/E)^T); the denoiser reads the tied embedding twice."""
    n = cfg.num_parameters()
    H, I = cfg.hidden_size, cfg.intermediate_size
    touched = 1.0 - (1.0 - cfg.top_k_experts / cfg.num_experts) ** tokens
    w = n["total"] - n["experts"] + n["experts"] * touched
    w += n["embedding"] if denoise else -(3 * H * I + H)
    return w * bytes_per


def roofline(cfg: ModelConfig, prompt: int, steps: int, peak_tflops: float, gbytes_per_s: float,
             bytes_per: int) -> dict:
    C = cfg.canvas_length

    def floor(tokens, context, denoise):
        t_flop = pass_flops(cfg, tokens, context, denoise) / (peak_tflops * 1e12)
        t_byte = pass_weight_bytes(cfg, tokens, denoise, bytes_per) / (gbytes_per_s * 1e9)
        return max(t_flop, t_byte), "compute" if t_flop > t_byte else "memory"

    dn, dn_bound = floor(C, prompt, True)
    enc, _ = floor(C, prompt, False)  # the encoder pass that commits a canvas
    ar, ar_bound = floor(1, prompt, False)
    return {"denoise_step_floor_ms": dn * 1e3, "denoise_step_bound": dn_bound, "ar_step_floor_ms": ar * 1e3,
            "ar_step_bound": ar_bound,
            "diffusion_over_ar_floor": (C * ar) / (steps * dn + enc),  # per canvas, prompt prefill left out
            "denoise_step_weight_gb": pass_weight_bytes(cfg, C, True, bytes_per) / 1e9,
            "ar_step_weight_gb": pass_weight_bytes(cfg, 1, False, bytes_per) / 1e9}


# ---------------------------------------------------------------------------------------------------------------
# Engine options, feature-detected: dgemma's params may gain `engine` and `compile` fields.
@dataclass(frozen=True)
class EngineOptions:
    engine: str = "fast"
    compile: bool = False
    sampler_chunk: int | None = None  # fast engine: canvas positions per sampler chunk; None: its own default


def engine_kwargs(cls, opts: EngineOptions) -> tuple[dict, str, bool]:
    """The keyword arguments of `cls` (DiffusionParams or ARParams) this dgemma has for `opts`, the engine that
    will run, and whether it is compiled."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw: dict = {}
    if "engine" in names:
        kw["engine"] = opts.engine
    if opts.compile and "compile" in names:
        kw["compile"] = True
    if opts.sampler_chunk and "sampler_chunk" in names and kw.get("engine") == "fast":
        kw["sampler_chunk"] = opts.sampler_chunk
    return kw, kw.get("engine", "reference (no engine option)"), bool(kw.get("compile", False))


def _scalars(extra: dict) -> dict:
    return {k: v for k, v in (extra or {}).items() if isinstance(v, (str, int, float, bool)) or v is None}


# ---------------------------------------------------------------------------------------------------------------
# Phases
@torch.inference_mode()
def measure_steps(model: DiffusionGemma, prompt: torch.Tensor, repeats: int, rep: Report) -> dict:
    """One prefill, one denoising step (canvas over the cached prompt, self-conditioning on), one AR step."""
    from dgemma.cache import KVCache

    cfg, device = model.config, model.device
    g = torch.Generator(device=device).manual_seed(2)

    def fresh():
        return KVCache.empty(cfg)

    t_pre, _ = timed(lambda c: model.encode(prompt, c), device, max(2, repeats // 3), warmup=1, before=fresh)
    cache = fresh()
    model.encode(prompt, cache)
    canvas = torch.randint(5, cfg.vocab_size, (1, cfg.canvas_length), device=device, generator=g)
    sc = (torch.randn(1, cfg.canvas_length, cfg.vocab_size, device=device, generator=g) * 3).to(model.dtype)
    t_dn, _ = timed(lambda: model.denoise(canvas, cache, sc), device, repeats, warmup=2)
    one = torch.tensor([[7]], device=device)
    t_ar, _ = timed(lambda c: model.logits(model.encode(one, c)[:, -1]), device, repeats * 2, warmup=2,
                    before=cache.clone)
    res = {"prefill_ms": statistics.median(t_pre) * 1e3, "denoise_step_ms": statistics.median(t_dn) * 1e3,
           "denoise_step_ms_min": min(t_dn) * 1e3, "ar_step_ms": statistics.median(t_ar) * 1e3,
           "ar_step_ms_min": min(t_ar) * 1e3}
    rep.say(f"prefill {prompt.shape[1]} tokens {res['prefill_ms']:.1f} ms; denoise step "
            f"({cfg.canvas_length} canvas) {res['denoise_step_ms']:.2f} ms; AR step {res['ar_step_ms']:.2f} ms")
    return res


def measure_generation(model: DiffusionGemma, prompt: torch.Tensor, new_tokens: int, steps_list: list[int],
                       repeats: int, opts: EngineOptions, time_left: float, rep: Report) -> dict:
    """Diffusion at each fixed step count and greedy AR, `new_tokens` each, warmed up, then `repeats` alternating
    rounds (fewer when a round would not fit in `time_left` seconds; at least one)."""
    device = model.device
    dkw, d_engine, d_compiled = engine_kwargs(DiffusionParams, opts)
    akw, a_engine, a_compiled = engine_kwargs(ARParams, opts)
    ar_params = ARParams(max_new_tokens=new_tokens, temperature=0.0, eos_token_ids=(), **akw)
    d_params = {s: DiffusionParams(max_new_tokens=new_tokens, max_denoising_steps=s, stability_threshold=None,
                                   confidence_threshold=None, eos_token_ids=(), seed=0, **dkw) for s in steps_list}
    runs = {"ar": lambda: generate_ar(model, prompt, ar_params)}
    runs.update({f"diffusion_{s}": (lambda p=p: generate_diffusion(model, prompt, p)) for s, p in d_params.items()})
    times: dict[str, list[float]] = {k: [] for k in runs}
    last: dict = {}
    t_warm = time.perf_counter()
    for name, fn in runs.items():  # warm-up at the timed shapes (compiled engines specialise on them)
        t0 = time.perf_counter()
        fn()
        sync(device)
        rep.say(f"  warm-up {name}: {time.perf_counter() - t0:.2f} s")
    round_s = time.perf_counter() - t_warm  # an upper bound on one timed round (warm-ups include compilation)
    repeats = max(1, min(repeats, int((time_left - round_s) // max(round_s, 1e-3))))
    for _ in range(repeats):  # alternate the modes so that drift hits all of them alike
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            last[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    res: dict = {"engine": d_engine, "ar_engine": a_engine, "compile": d_compiled, "ar_compile": a_compiled,
                 "sampler_chunk": dkw.get("sampler_chunk"), "new_tokens": new_tokens, "repeats": repeats, "modes": {}}
    for name in runs:
        out, sec = last[name], statistics.median(times[name])
        got = len(out.tokens[0])
        row = {"seconds": sec, "tokens": got, "tokens_per_s": got / sec,
               "decoder_passes": out.stats.decoder_passes[0], "encoder_passes": out.stats.encoder_passes,
               "first_token_s": out.stats.first_token_seconds, "extra": _scalars(out.extra)}
        if name == "ar":
            first = out.stats.first_token_seconds or 0.0  # decode only: the prefill and first token left out
            row["ms_per_token"] = (out.stats.seconds - first) / max(got - 1, 1) * 1e3
        else:
            spc = out.stats.steps_per_canvas[0]
            row["steps_per_canvas"] = sum(spc) / len(spc)
            row["ms_per_decoder_pass"] = sec / max(out.stats.decoder_passes[0], 1) * 1e3
        if got != new_tokens:
            rep.say(f"  warning: {name} returned {got} tokens, not {new_tokens}")
        res["modes"][name] = row
    ar_tps = res["modes"]["ar"]["tokens_per_s"]
    for s in steps_list:
        res["modes"][f"diffusion_{s}"]["over_ar"] = res["modes"][f"diffusion_{s}"]["tokens_per_s"] / ar_tps
    if len(steps_list) >= 2:  # the cost of one more step on this engine (sampler included): prefill and encode cancel
        a, b = (res["modes"][f"diffusion_{s}"] for s in steps_list[:2])
        if a["decoder_passes"] != b["decoder_passes"]:
            res["engine_step_ms"] = (a["seconds"] - b["seconds"]) / (a["decoder_passes"] - b["decoder_passes"]) * 1e3
    return res


def compare_transformers(cfg: ModelConfig, layers: int, device: torch.device, dtype: torch.dtype, prompt_len: int,
                         new_tokens: int, steps: int, repeats: int, opts: EngineOptions, seed: int,
                         time_left: float, rep: Report) -> dict:
    """transformers generate() vs dgemma on the same random weights, `layers` deep (saved by dgemma, loaded by
    transformers). Returns {"skipped": why} when it cannot run here."""
    try:
        import transformers
        from transformers import DiffusionGemmaForBlockDiffusion as HF
    except ImportError as e:
        return {"skipped": f"transformers with DiffusionGemma not importable ({e.__class__.__name__}: {e}); "
                           "carry transformers 5.23.0 (benchmarks/README.md, GPU)"}
    from dgemma.checkpoint import save_checkpoint

    small = with_layers(cfg, layers)
    per_byte = torch.finfo(dtype).bits // 8
    need = small.num_parameters()["total"] * per_byte
    est_s = 30 + need / 0.3e9  # save (fsync'd) + load; a guess from ~300 MB/s of disk
    if est_s > time_left:
        return {"skipped": f"about {est_s:.0f} s needed, {time_left:.0f} s of the budget left", "layers": layers}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if 2 * need + 4 * GiB > free:
            return {"skipped": f"two {layers}-layer models need {2 * need / GiB:.1f} GiB + 4 GiB, "
                               f"{free / GiB:.1f} GiB free", "layers": layers}
    tmp_root = Path(tempfile.gettempdir())
    if shutil.disk_usage(tmp_root).free < 1.5 * need:
        return {"skipped": f"{tmp_root} has {shutil.disk_usage(tmp_root).free / GiB:.1f} GiB free, "
                           f"{1.5 * need / GiB:.1f} GiB needed", "layers": layers}

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # a dgemma checkpoint has no vision tower; transformers' report of it is noise
    res: dict = {"transformers": transformers.__version__, "layers": layers}
    t0 = time.perf_counter()
    model = build_model(small, device, dtype, seed)
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        save_checkpoint(model, Path(tmp) / "m")
        res["build_and_save_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        try:
            hf = HF.from_pretrained(Path(tmp) / "m", dtype=dtype, device_map=str(device) if device.type == "cuda"
                                    else None)
        except (ImportError, ValueError, TypeError):  # no accelerate for device_map: load on the host, then move
            hf = HF.from_pretrained(Path(tmp) / "m", dtype=dtype).to(device)
        hf = hf.eval()
        res["load_s"] = time.perf_counter() - t1
    g = torch.Generator(device="cpu").manual_seed(3)
    ids = torch.randint(5, small.vocab_size, (1, prompt_len), generator=g).to(device)
    hf_kw = {"max_new_tokens": new_tokens, "max_denoising_steps": steps, "stability_threshold": None,
             "confidence_threshold": None, "eos_token_id": None}

    def run_hf():
        torch.manual_seed(0)
        with torch.inference_mode():
            return hf.generate(ids, **hf_kw)

    dkw, used_engine, _ = engine_kwargs(DiffusionParams, opts)
    compat = DiffusionParams(max_new_tokens=new_tokens, max_denoising_steps=steps, stability_threshold=None,
                             confidence_threshold=None, eos_token_ids=None, seed=0, compat=True, **dkw)
    fast = DiffusionParams(max_new_tokens=new_tokens, max_denoising_steps=steps, stability_threshold=None,
                           confidence_threshold=None, eos_token_ids=(), seed=0, **dkw)
    runs = {"transformers": run_hf, "dgemma_compat": lambda: generate_diffusion(model, ids, compat),
            "dgemma": lambda: generate_diffusion(model, ids, fast)}
    outs = {name: fn() for name, fn in runs.items()}  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    hf_seq = outs["transformers"].sequences
    res.update({f"{k}_s": v for k, v in med.items()})
    hf_new = int(hf_seq.shape[1] - ids.shape[1])  # whole canvases: transformers rounds max_new_tokens up
    res.update(engine=used_engine, new_tokens=new_tokens, transformers_returned_tokens=hf_new, steps=steps,
               transformers_tokens_per_s=hf_new / med["transformers"],
               dgemma_tokens_per_s=len(outs["dgemma"].tokens[0]) / med["dgemma"],
               speedup_vs_transformers=med["transformers"] / med["dgemma"],
               speedup_compat_vs_transformers=med["transformers"] / med["dgemma_compat"],
               # Informational: the same algorithm and RNG stream, but GPU kernels need not round alike.
               identical_tokens_compat=bool(torch.equal(hf_seq.cpu(), outs["dgemma_compat"].sequences.cpu())))
    return res


# ---------------------------------------------------------------------------------------------------------------
def resolve(cfg: GpuBenchConfig) -> GpuBenchConfig:
    d = SCALES[cfg.scale]
    return dataclasses.replace(
        cfg, prompt_tokens=cfg.prompt_tokens or d["prompt_tokens"], steps=cfg.steps or list(d["steps"]),
        step_repeats=cfg.step_repeats or d["step_repeats"], gen_repeats=cfg.gen_repeats or d["gen_repeats"],
        hf_layers=cfg.hf_layers or d["hf_layers"])


def run(cfg: GpuBenchConfig) -> dict:
    t_start = time.perf_counter()
    if cfg.scale not in SCALES:
        raise ValueError(f"unknown scale {cfg.scale!r}; choose one of {sorted(SCALES)}")
    cfg = resolve(cfg)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32, "float16": torch.float16}[cfg.dtype]
    rep = Report(cfg.out)
    r = rep.result
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        info = describe_device(device)
        r.update(benchmark="gpu_bench", scale=cfg.scale, device=info["device"], device_info=info, git=git_revision(),
                 dtype=str(dtype).replace("torch.", ""), settings=dataclasses.asdict(cfg), complete=False)
        rep.say(f"device: {r['device']}  git {r['git']}  scale {cfg.scale}  dtype {r['dtype']}")
        rep.save()
        _run_phases(cfg, device, dtype, rep, t_start)
        r["complete"] = True
    except Interrupted as e:
        r["interrupted"] = str(e)
        rep.say(f"interrupted ({e}): reporting what was measured")
    except Exception as e:  # noqa: BLE001 (print what was measured, then the error; the exit status says it failed)
        import traceback

        r["error"] = f"{e.__class__.__name__}: {str(e)[:1000]}"
        rep.say(traceback.format_exc())
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    r["elapsed_s"] = time.perf_counter() - t_start
    _print_table(r, rep)
    rep.save()
    line = json.dumps(r, default=str)
    if rep.log is not None:
        rep.log.write(line + "\n")
    rep.close()
    print(line, flush=True)
    return r


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run_phases(cfg: GpuBenchConfig, device: torch.device, dtype: torch.dtype, rep: Report, t_start: float) -> None:
    r = rep.result
    full_cfg = model_config(cfg.scale)
    per_byte = torch.finfo(dtype).bits // 8

    limits = machine_limits(device, dtype)
    r.update(limits)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the probe's buffers back before sizing the model to the free memory
    rep.say(f"machine: {limits['matmul_dtype']} matmul {limits['matmul_peak_tflops']:.3g} TFLOP/s "
            f"(n={limits['matmul_n']}), copy {limits['copy_gbytes_per_s']:.0f} GB/s")
    rep.mark("machine")

    layers, why = fit_layers(full_cfg, device, dtype, cfg.layers)
    mcfg = full_cfg if layers == full_cfg.num_hidden_layers else with_layers(full_cfg, layers)
    params = mcfg.num_parameters()
    r["model"] = {"preset": "26b-a4b" if cfg.scale == "full" else "26b-a4b scaled down (small)",
                  "layers": layers, "layers_full": full_cfg.num_hidden_layers, "depth_cut": layers < full_cfg.num_hidden_layers,
                  "layers_reason": why, "hidden": mcfg.hidden_size, "vocab": mcfg.vocab_size,
                  "experts": f"{mcfg.top_k_experts}/{mcfg.num_experts}", "canvas": mcfg.canvas_length,
                  "params_b": params["total"] / 1e9, "active_params_b": params["active_per_token"] / 1e9}
    if layers < full_cfg.num_hidden_layers:
        rep.say(f"DEPTH CUT to {layers} of {full_cfg.num_hidden_layers} layers ({why}): per-token figures are for "
                f"this depth; the ratios carry over")
    t0 = time.perf_counter()
    model = build_model(mcfg, device, dtype, cfg.seed)
    sync(device)
    r["model"]["build_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        r["model"]["weights_gib"] = torch.cuda.memory_allocated(device) / GiB
    rep.say(f"model: {layers} layers, {params['total'] / 1e9:.2f} B params ({params['active_per_token'] / 1e9:.2f} B "
            f"active), built on {device} in {r['model']['build_s']:.1f} s")
    rep.mark("build")

    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    prompt = torch.randint(5, mcfg.vocab_size, (1, cfg.prompt_tokens), generator=g).to(device)
    new_tokens = cfg.new_tokens or mcfg.canvas_length
    r["prompt_tokens"], r["new_tokens"], r["steps"] = cfg.prompt_tokens, new_tokens, cfg.steps

    steps = measure_steps(model, prompt, cfg.step_repeats, rep)
    r.update(steps)
    f_dn = pass_flops(mcfg, mcfg.canvas_length, cfg.prompt_tokens, denoise=True)
    f_ar = pass_flops(mcfg, 1, cfg.prompt_tokens, denoise=False)
    peak = limits["matmul_peak_tflops"]
    r["denoise_step_tflops"] = f_dn / (steps["denoise_step_ms"] / 1e3) / 1e12
    r["denoise_step_peak_fraction"] = r["denoise_step_tflops"] / peak
    r["ar_step_tflops"] = f_ar / (steps["ar_step_ms"] / 1e3) / 1e12
    r["ar_step_peak_fraction"] = r["ar_step_tflops"] / peak
    r["denoise_step_gflop"], r["ar_step_gflop"] = f_dn / 1e9, f_ar / 1e9
    r["roofline"] = roofline(mcfg, cfg.prompt_tokens, cfg.steps[0], peak, limits["copy_gbytes_per_s"], per_byte)
    r["denoise_step_bandwidth_fraction"] = (r["roofline"]["denoise_step_weight_gb"] / (steps["denoise_step_ms"] / 1e3)
                                            / limits["copy_gbytes_per_s"])
    r["ar_step_bandwidth_fraction"] = (r["roofline"]["ar_step_weight_gb"] / (steps["ar_step_ms"] / 1e3)
                                       / limits["copy_gbytes_per_s"])
    rep.mark("steps")

    rep.say(f"generation: {new_tokens} new tokens after a {cfg.prompt_tokens}-token prompt, steps {cfg.steps}, "
            f"{cfg.gen_repeats} timed run(s) each")
    # On a GPU the whole canvas goes through the fast engine's sampler at once: its CPU-sized default chunk (2 MiB of
    # logits, 2 positions at V = 262,144) would re-read the [V, H] embedding for the soft embedding 128 times a step.
    chunk = cfg.sampler_chunk if cfg.sampler_chunk is not None else (mcfg.canvas_length if device.type == "cuda" else 0)
    opts = EngineOptions(cfg.engine, cfg.compile, chunk or None)
    reserve = 0.0 if cfg.hf == "off" else 150.0  # seconds kept for the transformers comparison
    left = cfg.budget_s - (time.perf_counter() - t_start) - reserve
    try:
        gen = measure_generation(model, prompt, new_tokens, cfg.steps, cfg.gen_repeats, opts, left, rep)
    except Interrupted:
        raise
    except Exception as e:  # a failing fast engine must not cost the run: measure the reference path
        if cfg.engine == "reference" or "engine" not in {f.name for f in dataclasses.fields(DiffusionParams)}:
            raise
        err = f"{e.__class__.__name__}: {str(e)[:500]}"
        rep.say(f"engine {cfg.engine!r} failed ({err}); measuring engine 'reference' instead")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        left = cfg.budget_s - (time.perf_counter() - t_start) - reserve
        gen = measure_generation(model, prompt, new_tokens, cfg.steps, cfg.gen_repeats, EngineOptions("reference"),
                                 left, rep)
        gen["engine_error"] = {cfg.engine: err}
    r["generation"] = gen
    head = gen["modes"][f"diffusion_{cfg.steps[0]}"]
    r["engine"], r["compile"] = gen["engine"], gen["compile"]
    r["diffusion_tokens_per_s"] = head["tokens_per_s"]
    r["ar_tokens_per_s"] = gen["modes"]["ar"]["tokens_per_s"]
    r["diffusion_over_ar"] = head["over_ar"]
    r["ar_ms_per_token"] = gen["modes"]["ar"]["ms_per_token"]
    r["diffusion_ms_per_decoder_pass"] = head["ms_per_decoder_pass"]
    if gen.get("engine_step_ms", 0) > 0:
        r["engine_step_ms"] = gen["engine_step_ms"]
        r["engine_step_peak_fraction"] = f_dn / (gen["engine_step_ms"] / 1e3) / 1e12 / peak
    if device.type == "cuda":
        r["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    rep.mark("generation")

    if cfg.hf == "off":
        r["transformers"] = {"skipped": "--hf off"}
    else:
        del model  # the transformers comparison builds its own, smaller model
        gc.collect()  # the fast engine keeps a reference cycle (model -> engine -> model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        left = cfg.budget_s - (time.perf_counter() - t_start)
        try:
            r["transformers"] = compare_transformers(full_cfg, cfg.hf_layers, device, dtype, cfg.prompt_tokens,
                                                     new_tokens, cfg.steps[0], cfg.gen_repeats, opts, cfg.seed,
                                                     left, rep)
        except Interrupted:
            r["transformers"] = {"error": "interrupted by the timeout"}
            raise
        except Exception as e:  # noqa: BLE001 (optional part: record any failure, keep the main results)
            r["transformers"] = {"error": f"{e.__class__.__name__}: {str(e)[:500]}"}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    r["speedup_vs_transformers"] = r["transformers"].get("speedup_vs_transformers")
    rep.mark("transformers")


def _print_table(r: dict, rep: Report) -> None:
    say = rep.say
    say("")
    say(f"== dgemma GPU benchmark: {r.get('device')}  (git {r.get('git')}, {r.get('dtype')}) ==")
    m = r.get("model")
    if m:
        cut = f"  DEPTH CUT ({m['layers_reason']})" if m["depth_cut"] else ""
        say(f"model    {m['preset']}: {m['layers']}/{m['layers_full']} layers, {m['params_b']:.2f} B params, "
            f"{m['active_params_b']:.2f} B active{cut}")
    if "matmul_peak_tflops" in r:
        say(f"machine  {r['matmul_dtype']} matmul {r['matmul_peak_tflops']:.3g} TFLOP/s, copy "
            f"{r['copy_gbytes_per_s']:.0f} GB/s")
    if "denoise_step_ms" in r:
        rf = r["roofline"]
        say(f"{'step':<34}{'ms':>9}{'TFLOP/s':>9}{'of peak':>9}{'of bw':>8}{'floor ms':>10}")
        say(f"{'denoise (canvas ' + str(m['canvas']) + ', prompt ' + str(r['prompt_tokens']) + ')':<34}"
            f"{r['denoise_step_ms']:>9.2f}{r['denoise_step_tflops']:>9.3g}{r['denoise_step_peak_fraction']:>9.1%}"
            f"{r['denoise_step_bandwidth_fraction']:>8.1%}{rf['denoise_step_floor_ms']:>10.2f}")
        say(f"{'AR (1 token)':<34}{r['ar_step_ms']:>9.2f}{r['ar_step_tflops']:>9.3g}{r['ar_step_peak_fraction']:>9.1%}"
            f"{r['ar_step_bandwidth_fraction']:>8.1%}{rf['ar_step_floor_ms']:>10.2f}")
        say(f"roofline: denoise step {rf['denoise_step_bound']}-bound ({rf['denoise_step_weight_gb']:.1f} GB of "
            f"weights), AR step {rf['ar_step_bound']}-bound ({rf['ar_step_weight_gb']:.1f} GB); best possible "
            f"diffusion/AR at {r['steps'][0]} steps: {rf['diffusion_over_ar_floor']:.2f}x")
    gen = r.get("generation")
    if gen:
        say(f"generation ({gen['new_tokens']} new tokens; engine {gen['engine']}, compile {gen['compile']}, "
            f"sampler chunk {gen['sampler_chunk'] or 'default'})")
        if gen.get("engine_error"):
            say(f"ENGINE FAILED, reference measured instead: {gen['engine_error']}")
        if "engine_step_ms" in r:
            say(f"one more denoising step on this engine: {r['engine_step_ms']:.2f} ms "
                f"({r['engine_step_peak_fraction']:.1%} of the matmul peak)")
        say(f"{'mode':<16}{'tok/s':>10}{'s':>9}{'passes':>8}{'ms/pass':>9}{'vs AR':>8}")
        for name, row in gen["modes"].items():
            per = row.get("ms_per_decoder_pass", row.get("ms_per_token"))
            say(f"{name:<16}{row['tokens_per_s']:>10.1f}{row['seconds']:>9.3f}{row['decoder_passes']:>8}"
                f"{per:>9.2f}{row.get('over_ar', 1.0):>8.2f}")
    t = r.get("transformers")
    if t is not None:
        if "speedup_vs_transformers" in t:
            say(f"transformers {t['transformers']} generate() on {t['layers']} layers: {t['transformers_s']:.3f} s; "
                f"dgemma {t['dgemma_s']:.3f} s ({t['speedup_vs_transformers']:.2f}x), compat "
                f"{t['dgemma_compat_s']:.3f} s ({t['speedup_compat_vs_transformers']:.2f}x), identical tokens "
                f"(compat) {t['identical_tokens_compat']}")
        else:
            say(f"transformers: {t}")
    if "diffusion_over_ar" in r:
        say(f"HEADLINE diffusion/AR at {r['steps'][0]} steps per canvas: {r['diffusion_over_ar']:.2f}x "
            f"({r['diffusion_tokens_per_s']:.1f} vs {r['ar_tokens_per_s']:.1f} tok/s)")
    if not r.get("complete"):
        say(f"INCOMPLETE run: {r.get('interrupted') or r.get('error') or 'see the log'}")


def parse_args(argv: list[str] | None = None) -> GpuBenchConfig:
    d = GpuBenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default=d.scale)
    p.add_argument("--device", default=d.device, help="auto, cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default=d.dtype)
    p.add_argument("--layers", type=int, default=d.layers, help="cut the depth (default: all that fit)")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="default: one canvas")
    p.add_argument("--steps", type=int, nargs="+", default=d.steps, help="fixed steps per canvas; first = headline")
    p.add_argument("--step-repeats", type=int, default=d.step_repeats)
    p.add_argument("--gen-repeats", type=int, default=d.gen_repeats)
    p.add_argument("--engine", choices=["fast", "reference"], default=d.engine)
    p.add_argument("--compile", action="store_true", default=d.compile)
    p.add_argument("--sampler-chunk", type=int, default=d.sampler_chunk,
                   help="fast engine's sampler chunk (positions); default: the whole canvas on cuda, the engine's own "
                        "on cpu; 0: the engine's own")
    p.add_argument("--hf", choices=["auto", "off"], default=d.hf)
    p.add_argument("--hf-layers", type=int, default=d.hf_layers)
    p.add_argument("--budget-s", type=float, default=d.budget_s)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="folder for gpu_bench.json and gpu_bench.log")
    a = p.parse_args(argv)
    if a.compile and a.engine != "fast":
        p.error("--compile needs --engine fast")
    return GpuBenchConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(GpuBenchConfig)})


def main(argv: list[str] | None = None) -> int:
    r = run(parse_args(argv))
    return 0 if r.get("complete") else 1


if __name__ == "__main__":
    sys.exit(main())
