"""`dgemma bench train`: one training step of dgemma's objective, timed part by part, against the machine's matmul
peak and against a minimal plain-PyTorch training step of the same shape, in one run. A table, then one JSON line last.

    dgemma bench train --quick                                     # tiny shape, 1 thread, eager: seconds (CI)
    dgemma bench train --model models/dgemma-sudoku-6x6 --data data/sudoku6 --threads 1 2 --compile --plot t.png
    dgemma bench train --preset mini --vocab-size 17 --canvas-length 37 --seq-len 74 --batch-size 32 --profile

What one step is: exactly `dgemma train`'s single-process step. A batch from the loader (uniform random tokens, or
`--data`: the trainer's own loaders, Sudoku included) and its noise (`sample_noise` with one generator per example,
as train.py), `objective.training_losses` (encoder, AR head, decoder pass 1 without gradients, decoder pass 2, the
diffusion head), `backward`, gradient clipping at 1.0 and AdamW (train.py's defaults and parameter groups). With
`--compile` the layers are compiled the way train.py's `--compile` does it.

The ms split (means over the timed steps; they add up to step_ms):
    data            next(loader) + sample_noise
    encoder         model.encode (the clean causal pass, all layers)
    decoder_pass1   model.denoise_hidden without gradients (self-conditioning's first pass)
    decoder_pass2   model.denoise_hidden with gradients
    head            model.logits (the tied LM head + soft-cap: AR head, pass-1 logits, diffusion head)
    forward_other   the rest of training_losses: cross-entropy, masks, indexing
    backward        loss.backward()
    optimizer       clip_grad_norm_ + AdamW step + zero_grad
The parts are timed by wrapping those three model methods on the instance for the run (`timed_model`): the same
calls with the same arguments, so the losses are bit-identical (tests/test_bench_train.py checks it).

tokens/s, the headline, counts every token of the batch, batch * seq_len per step: the same definition as train.py's
tokens/step. `supervised_tokens_per_s` counts only the loss positions (with Sudoku data half of them).

FLOPs (`objective_flops`, `plain_flops`): every matmul of every pass, counted from the shapes, 2 FLOPs per
multiply-add. For a layer over N query positions scoring S keys each (H hidden, nh heads of d, nkv K/V heads, I dense
intermediate, E experts, k of them per token of width Im):
    N * 2 * [H*nh*d (q) + H*nkv*d (k) + H*nkv*d (v, sliding layers only) + nh*d*H (o)
             + 2*nh*d*S (scores, values) + 3*H*I (gated dense MLP) + H*E (router) + k*3*H*Im (top-k experts only)]
Attention is counted as computed: SDPA with a boolean mask scores every key, masked or not, so S = T in the encoder
and S = T + T' in the decoder (T' = positions of the canvases that hold a target). The step:
    encoder       layers(B*T, S=T)                      x3 (forward + backward ~ 2x forward)
    AR head       2*H*V per supervised next-token target x3
    pass 1        layers(B*T', S=T+T') + self-conditioning MLP 2*3*H*I per position + head 2*H*V per position, x1
    pass 2        the same layers and MLP x3, the diffusion head per supervised position x3, and the soft embedding
                  2*V*H per position x2 (its input, pass 1's probabilities, carries no gradient: only dE)
The plain step: L pre-norm blocks (q, k, v, o of width nh*d, d = H / nh; scores and values over all T keys; a dense
GELU MLP H -> I -> H) and a tied head over every position, all x3. Norms, softmax, RoPE, GELU and the optimizer's
elementwise work are not matmuls and are not counted. FLOP/s are set against the fp32 matmul peak measured in the
same run at the same thread count (`dgemma.bench.speed.machine_limits`), and against the bf16 peak where the CPU has
native bf16 (`hw.fast_half`; elsewhere bf16 runs far below fp32 and that fraction is left out as None).

The plain step (`PlainModel`): token embedding, pre-norm blocks with bidirectional `F.scaled_dot_product_attention`
and a dense GELU MLP of the model's intermediate size, a tied head, one denoising cross-entropy (uniform-token
corruption of the clean batch with t ~ U(eps, 1) per row, predict every clean token), AdamW with the same settings:
the floor of what this machine gives at that width, depth, heads, sequence, vocabulary and batch. Its steps
alternate with dgemma's (one each, order swapped every step), so machine noise hits both alike.

`--compile`: `compile_s` is the first step minus a steady (median timed) step, `warmup_extra_s` the same over all
warm-up steps (dynamo may recompile on the second shape it sees); `graphs_compiled` counts torch._dynamo's graphs
compiled during warm-up, `recompiles` those compiled during the timed steps (0 expected), `graph_breaks` the
breaks dynamo reported (with reasons). Dynamo is reset before each compiled run; inductor's on-disk cache may make
later compilations faster than the first.

JSON: `by_threads: {"1": {...}, "2": {...}}`, each with the machine peaks and the figures of the last mode run
(compile when given, else eager) flat, every mode under `modes`; top-level machine info (cpu, flags, torch, git,
load average at start and end).
"""

from __future__ import annotations

import copy
import math
import os
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import ModelConfig
from dgemma.fsio import replacing
from dgemma.model import DiffusionGemma
from dgemma.options import BenchTrainConfig, bench_train_config

T_EPS = 1e-3  # t ~ U(eps, 1), as train.py's default --t-eps
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, (0.9, 0.95), 0.1, 1.0  # train.py's defaults
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


class BenchTrainError(ValueError):
    """A shape, model or data folder `bench train` cannot use; the message names it and the fix."""


def run_cli(args) -> int:
    run(bench_train_config(args))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# FLOPs from the shapes
def layer_flops(c: ModelConfig, tokens: float, keys: float) -> float:
    """Forward matmul FLOPs of all layers over `tokens` query positions, each scoring `keys` keys (module docstring)."""
    H, nh, f = c.hidden_size, c.num_attention_heads, 0.0
    for i in range(c.num_hidden_layers):
        d, kv = c.layer_head_dim(i), c.layer_kv_heads(i)
        proj = H * nh * d + H * kv * d * (2 if c.is_sliding(i) else 1) + nh * d * H
        attn = 2 * nh * d * keys
        ffn = 3 * H * c.intermediate_size + H * c.num_experts + c.top_k_experts * 3 * H * c.moe_intermediate_size
        f += 2 * tokens * (proj + attn + ffn)
    return f


def objective_flops(c: ModelConfig, batch: int, seq_len: int, live_len: int, n_diff: float, n_ar: float,
                    self_conditioning: bool = True) -> dict[str, float]:
    """Matmul FLOPs of one training step (forward and backward) by part: `live_len` = T', the positions of the
    canvases the decoder runs on; `n_diff`/`n_ar` the supervised diffusion / next-token targets of the batch."""
    H, V, I = c.hidden_size, c.vocab_size, c.intermediate_size
    B, T = batch, seq_len
    dec_tokens, dec_keys = B * live_len, T + live_len
    sc_mlp = 2 * 3 * H * I * dec_tokens  # the self-conditioning gated MLP (runs on zeros in pass 1)
    parts = {"encoder": 3 * layer_flops(c, B * T, T), "ar_head": 3 * 2 * H * V * n_ar}
    parts["decoder_pass1"] = (layer_flops(c, dec_tokens, dec_keys) + sc_mlp + 2 * H * V * dec_tokens
                              if self_conditioning else 0.0)
    parts["decoder_pass2"] = (3 * (layer_flops(c, dec_tokens, dec_keys) + sc_mlp + 2 * H * V * n_diff)
                              + (2 * 2 * V * H * dec_tokens if self_conditioning else 0.0))
    parts["total"] = sum(parts.values())
    return parts


def _plain_head_dim(c: ModelConfig) -> int:
    return c.hidden_size // c.num_attention_heads if c.hidden_size % c.num_attention_heads == 0 else c.head_dim


def plain_flops(c: ModelConfig, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of one plain step (forward and backward, x3): q/k/v/o, scores and values over all T keys, the
    dense GELU MLP, the tied head over every position."""
    H, V, I, L = c.hidden_size, c.vocab_size, c.intermediate_size, c.num_hidden_layers
    inner = c.num_attention_heads * _plain_head_dim(c)
    per_token = L * 2 * (4 * H * inner + 2 * inner * seq_len + 2 * H * I) + 2 * H * V
    return 3 * batch * seq_len * per_token


# ---------------------------------------------------------------------------------------------------------------
# The plain-PyTorch step
class PlainBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, intermediate: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.attn_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.fc1 = nn.Linear(hidden, intermediate, bias=False)
        self.fc2 = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        B, T, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # bidirectional, [B, nh, T, d]
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x)), approximate="tanh"))


class PlainModel(nn.Module):
    """Embedding, pre-norm blocks, final norm, tied head: the model's width, depth, heads, MLP width, vocabulary."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.blocks = nn.ModuleList(PlainBlock(c.hidden_size, c.num_attention_heads, _plain_head_dim(c),
                                               c.intermediate_size) for _ in range(c.num_hidden_layers))
        self.norm = nn.RMSNorm(c.hidden_size, eps=1e-6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> logits [B, T, V]
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return F.linear(self.norm(h), self.embed.weight)


def plain_model(c: ModelConfig, seed: int = 0, std: float = 0.02) -> PlainModel:
    torch.manual_seed(seed)
    model = PlainModel(c)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.train()


def plain_loss(model: PlainModel, x: torch.Tensor, generator: torch.Generator, eps: float = T_EPS) -> torch.Tensor:
    """The denoising CE: corrupt x [B, T] with uniform tokens at rate t ~ U(eps, 1) per row, predict every clean token."""
    from dgemma.train.objective import corrupt

    V = model.embed.num_embeddings
    t = eps + (1 - eps) * torch.rand(x.shape[0], generator=generator)
    noisy, _ = corrupt(x, t, V, generator)
    logits = model(noisy)  # [B, T, V]
    return F.cross_entropy(logits.reshape(-1, V).float(), x.reshape(-1))


def adamw(model: nn.Module) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """train.py's optimizer: AdamW, weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS), params


def compile_layers(layers: nn.ModuleList) -> None:
    """train.py's --compile, verbatim (keep the two in step): a raised dynamo recompile limit, each layer compiled."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in layers:
        layer.compile()


# ---------------------------------------------------------------------------------------------------------------
# Timing
class Clock:
    """Seconds per named part, accumulated: `with clock("backward"): ...`."""

    def __init__(self):
        self.s: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.s[key] += time.perf_counter() - t0


@contextmanager
def timed_model(model: DiffusionGemma, clock: Clock):
    """Time `model.encode`, `model.denoise_hidden` (pass 1 = called without self-conditioning logits, pass 2 = with
    them) and `model.logits` into `clock`, by shadowing the bound methods on the instance for the duration; removed
    on exit. The wrapped calls get the same arguments and return the same tensors, so nothing the objective computes
    changes."""
    def wrap(name: str, key_of):
        method = getattr(model, name)

        def timed(*args, **kwargs):
            with clock(key_of(kwargs)):
                return method(*args, **kwargs)

        setattr(model, name, timed)

    wrap("encode", lambda kw: "encoder")
    wrap("denoise_hidden", lambda kw: "decoder_pass1" if kw.get("sc_logits") is None else "decoder_pass2")
    wrap("logits", lambda kw: "head")
    try:
        yield model
    finally:
        for name in ("encode", "denoise_hidden", "logits"):
            model.__dict__.pop(name, None)


def _dynamo_counts() -> tuple[int | None, dict[str, int]]:
    """(graphs compiled so far by torch._dynamo, graph breaks by reason); (0, {}) before dynamo ever ran. Private
    counters, read defensively (as dgemma.bench.speed does): a benchmark must not fail on a torch upgrade."""
    if "torch._dynamo" not in sys.modules:
        return 0, {}
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"]), {str(k): int(v) for k, v in counters["graph_break"].items()}
    except Exception:  # noqa: BLE001
        return None, {}


# ---------------------------------------------------------------------------------------------------------------
# Model, data
def build_model(cfg: BenchTrainConfig) -> DiffusionGemma:
    """The model to train: a checkpoint folder's config and weights (fp32), or a preset with random weights."""
    from dgemma.checkpoint import load_checkpoint
    from dgemma.config import preset
    from dgemma.model import init_weights

    if cfg.model is not None:
        if cfg.preset is not None:
            raise BenchTrainError("give either --model (a checkpoint folder) or --preset, not both")
        if cfg.vocab_size is not None:
            raise BenchTrainError("--vocab-size applies to --preset only: a checkpoint's vocabulary is its weights'")
        folder = Path(cfg.model).expanduser()
        if not (folder / "config.json").is_file():
            raise BenchTrainError(f"--model {cfg.model} is not a model folder (no config.json there); pass a "
                                  "checkpoint folder such as models/dgemma-sudoku-6x6, or --preset NAME")
        config, model = load_checkpoint(folder, dtype=torch.float32)
        if cfg.canvas_length is not None:  # no weight depends on it (as train.py's --init-from --canvas-length)
            model.config = config.replace(canvas_length=cfg.canvas_length)
        return model.train()
    mc = preset(cfg.preset)
    mc = mc.replace(vocab_size=cfg.vocab_size or mc.vocab_size, canvas_length=cfg.canvas_length or mc.canvas_length)
    return init_weights(DiffusionGemma(mc), seed=cfg.seed).train()


def seq_len_for(cfg: BenchTrainConfig, c: ModelConfig) -> int:
    """--seq-len, else the Sudoku data's (puzzle + solution canvas), else two canvases; checked against the canvas."""
    T = cfg.seq_len
    if T is None and cfg.data is not None:
        from dgemma.tasks.sudoku import geometry, is_sudoku_data, read_meta

        if is_sudoku_data(cfg.data):
            T = geometry(int(read_meta(cfg.data)["size"])).seq_len
    T = T or 2 * c.canvas_length
    if T % c.canvas_length:
        k = max(1, T // c.canvas_length)
        raise BenchTrainError(f"--seq-len {T} is not a multiple of the model's canvas_length={c.canvas_length}; use "
                              f"a multiple such as {k * c.canvas_length} ({k} canvases)")
    return T


def loader_for(cfg: BenchTrainConfig, c: ModelConfig, seq_len: int) -> Iterator:
    """A fresh training loader: the trainer's own (train.py's synthetic batches, prepared folders, Sudoku)."""
    from dgemma.train.pretrain import SyntheticBatches, folder_data

    if cfg.data is None:
        return SyntheticBatches(c.vocab_size, cfg.batch_size, seq_len, seed=cfg.seed)
    from dgemma.tasks.sudoku import is_sudoku_data, sudoku_data_source

    if not Path(cfg.data).expanduser().is_dir():
        raise BenchTrainError(f"--data {cfg.data} is not a folder; make one with `dgemma data prepare`")
    if is_sudoku_data(cfg.data):
        source = sudoku_data_source(cfg.data, cfg.batch_size, seq_len, c.canvas_length, seed=cfg.seed)
    else:
        source = folder_data(cfg.data, cfg.batch_size, seq_len, c.canvas_length, seed=cfg.seed)
    if source.vocab_size is not None and source.vocab_size != c.vocab_size:
        raise BenchTrainError(f"--data {cfg.data} has a vocabulary of {source.vocab_size} tokens but the model has "
                              f"{c.vocab_size}; pass --vocab-size {source.vocab_size} (with --preset) or the model "
                              "trained on that data")
    return source.train(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# One step of each
def dgemma_step(model: DiffusionGemma, optimizer, params, loader, index: int, clock: Clock, autocast,
                seed: int = 0, compiled: bool = False) -> dict:
    """One `dgemma train` step (single process, grad_accum 1), its parts timed into `clock`; `compiled` as train's
    --compile (pass 1 then records autograd to share pass 2's graphs). Returns the loss and the shape figures the
    FLOP count needs."""
    from dgemma.train.objective import example_generators, sample_noise, training_losses
    from dgemma.train.pretrain import unpack_batch

    c = model.config
    with clock("data"):
        x, mask = unpack_batch(next(loader))
        B, T = x.shape
        noise = sample_noise(x, c.vocab_size, example_generators(seed, "train", index * B, B), eps=T_EPS, sc_prob=0.5)
    with clock("forward"), autocast, timed_model(model, clock):
        losses = training_losses(model, x, noise, loss_mask=mask, self_conditioning=True, sc_graph=compiled)
    with clock("backward"):
        losses.total.backward()
    with clock("optimizer"):
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sup = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    C = c.canvas_length
    live = sup.reshape(B, T // C, C).any(dim=2).any(dim=0)  # [T / C]: canvases the decoder runs on
    live_len = int(live.sum()) * C if bool(live.any()) else T
    return {"loss": float(losses.total.detach()), "tokens": B * T, "n_diff": losses.diffusion_count,
            "n_ar": losses.ar_count, "live_len": live_len, "batch": B, "seq_len": T}


def plain_step(model: PlainModel, optimizer, params, batch: torch.Tensor, index: int, clock: Clock, autocast,
               seed: int = 0) -> float:
    """One plain step on `batch` [B, T] with noise from (seed, index); returns the loss."""
    with clock("data"):
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    with clock("forward"), autocast:
        loss = plain_loss(model, batch, g)
    with clock("backward"):
        loss.backward()
    with clock("optimizer"):
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------------------------
# One thread count, one mode
DGEMMA_PARTS = ("data", "encoder", "decoder_pass1", "decoder_pass2", "head", "forward_other", "backward", "optimizer")
PLAIN_PARTS = ("data", "forward", "backward", "optimizer")


def _split(clock: Clock) -> dict[str, float]:
    s = dict(clock.s)
    inner = sum(s.get(k, 0.0) for k in ("encoder", "decoder_pass1", "decoder_pass2", "head"))
    s["forward_other"] = s.get("forward", 0.0) - inner
    return s


def measure(base: DiffusionGemma, cfg: BenchTrainConfig, seq_len: int, mode: str, peak_fp32: float,
            peak_bf16: float | None, bf16: bool) -> dict:
    """Warm-up, then `cfg.steps` timed steps of dgemma and of the plain model, alternating, at the current thread
    count; figures per step (ms are means over the timed steps)."""
    model = copy.deepcopy(base).train()
    c = model.config
    plain = plain_model(c, cfg.seed)
    if mode == "compile":
        torch._dynamo.reset()
        compile_layers(model.layers)
        compile_layers(plain.blocks)
    opt, params = adamw(model)
    popt, pparams = adamw(plain)
    loader = loader_for(cfg, c, seq_len)
    plain_batch = torch.randint(0, c.vocab_size, (cfg.batch_size, seq_len), generator=torch.Generator().manual_seed(7))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    d_steps, p_steps = [], []  # (seconds, seconds per part, info, dynamo graphs compiled during it) per step
    breaks0 = _dynamo_counts()[1]
    for i in range(cfg.warmup + cfg.steps):
        for who in ((0, 1) if i % 2 == 0 else (1, 0)):
            clock = Clock()
            g0 = _dynamo_counts()[0]
            t0 = time.perf_counter()
            if who == 0:
                info = dgemma_step(model, opt, params, loader, i, clock, autocast, cfg.seed, mode == "compile")
            else:
                info = {"loss": plain_step(plain, popt, pparams, plain_batch, i, clock, autocast, cfg.seed)}
            dt = time.perf_counter() - t0
            g1 = _dynamo_counts()[0]
            graphs = None if g0 is None or g1 is None else g1 - g0
            (d_steps if who == 0 else p_steps).append((dt, _split(clock) if who == 0 else dict(clock.s), info, graphs))
    breaks1 = _dynamo_counts()[1]
    res = _figures(d_steps, cfg.warmup, DGEMMA_PARTS, "")
    res.update(_figures(p_steps, cfg.warmup, PLAIN_PARTS, "plain_"))
    res["graph_breaks"] = {k: v - breaks0.get(k, 0) for k, v in breaks1.items() if v - breaks0.get(k, 0)}

    infos = [s[2] for s in d_steps[cfg.warmup:]]
    mean = statistics.fmean
    B, T = cfg.batch_size, seq_len
    live_len, n_diff, n_ar = mean(i["live_len"] for i in infos), mean(i["n_diff"] for i in infos), \
        mean(i["n_ar"] for i in infos)
    flops = objective_flops(c, B, T, live_len, n_diff, n_ar)
    pflops = plain_flops(c, B, T)
    step_s, pstep_s = res["step_ms"] / 1e3, res["plain_step_ms"] / 1e3
    res.update({
        "mode": mode, "threads": torch.get_num_threads(), "bf16_autocast": bf16, "batch": B, "seq_len": T,
        "decoder_positions": live_len, "supervised_per_step": n_diff,
        "tokens_per_step": B * T, "tokens_per_s": B * T / step_s, "supervised_tokens_per_s": n_diff / step_s,
        # from the median step: what a run reaches between recompiles (the mean above pays for them)
        "steady_tokens_per_s": B * T / (res["step_ms_median"] / 1e3),
        "plain_steady_tokens_per_s": B * T / (res["plain_step_ms_median"] / 1e3),
        "plain_tokens_per_s": B * T / pstep_s, "plain_over_dgemma": step_s / pstep_s,
        "flops_per_step": flops["total"], "flops_by_part": flops, "flops_per_token": flops["total"] / (B * T),
        "gflops": flops["total"] / step_s / 1e9, "flops_fraction": flops["total"] / step_s / 1e9 / peak_fp32,
        "bf16_flops_fraction": None if peak_bf16 is None else flops["total"] / step_s / 1e9 / peak_bf16,
        "plain_flops_per_token": pflops / (B * T), "plain_gflops": pflops / pstep_s / 1e9,
        "plain_flops_fraction": pflops / pstep_s / 1e9 / peak_fp32,
        "plain_bf16_flops_fraction": None if peak_bf16 is None else pflops / pstep_s / 1e9 / peak_bf16,
        "peak_fp32_gflops": peak_fp32,
        "loss_first": d_steps[0][2]["loss"], "loss_last": d_steps[-1][2]["loss"],
        "plain_loss_first": p_steps[0][2]["loss"], "plain_loss_last": p_steps[-1][2]["loss"],
    })
    if mode != "compile":
        res["compile_s"] = res["plain_compile_s"] = None
    return res


def _figures(steps: list, warmup: int, parts: tuple[str, ...], prefix: str) -> dict:
    timed = steps[warmup:]
    totals = [s[0] for s in timed]
    steady = statistics.median(totals)
    def graphs(rows: list) -> int | None:
        counts = [s[3] for s in rows]
        return None if None in counts else sum(counts)

    out = {f"{prefix}step_ms": statistics.fmean(totals) * 1e3, f"{prefix}step_ms_median": steady * 1e3,
           f"{prefix}first_step_s": steps[0][0], f"{prefix}compile_s": steps[0][0] - steady,
           f"{prefix}warmup_extra_s": sum(s[0] - steady for s in steps[:warmup]),
           f"{prefix}graphs_compiled": graphs(steps[:warmup]), f"{prefix}recompiles": graphs(timed)}
    for k in parts:
        out[f"{prefix}{k}_ms"] = statistics.fmean(s[1].get(k, 0.0) for s in timed) * 1e3
    if prefix == "":
        out["decoder_ms"] = out["decoder_pass1_ms"] + out["decoder_pass2_ms"]
        out["forward_ms"] = statistics.fmean(s[1].get("forward", 0.0) for s in timed) * 1e3
    return out


# ---------------------------------------------------------------------------------------------------------------
# The profile of one eager step
MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile_step(base: DiffusionGemma, cfg: BenchTrainConfig, seq_len: int, bf16: bool, top: int = 15) -> dict:
    """torch.profiler over one eager dgemma step (after one untimed step) and one plain step: the operators with the
    most self CPU time, the matmul share, and the operator calls per step (the per-call overhead a small model pays)."""
    from torch.profiler import ProfilerActivity, profile

    model = copy.deepcopy(base).train()
    opt, params = adamw(model)
    loader = loader_for(cfg, model.config, seq_len)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    dgemma_step(model, opt, params, loader, 0, Clock(), autocast, cfg.seed)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dgemma_step(model, opt, params, loader, 1, Clock(), autocast, cfg.seed)
    plain = plain_model(model.config, cfg.seed)
    popt, pparams = adamw(plain)
    batch = torch.randint(0, model.config.vocab_size, (cfg.batch_size, seq_len), generator=torch.Generator().manual_seed(7))
    plain_step(plain, popt, pparams, batch, 0, Clock(), autocast)
    with profile(activities=[ProfilerActivity.CPU]) as pprof:
        plain_step(plain, popt, pparams, batch, 1, Clock(), autocast)

    def summary(p) -> tuple[list[dict], float, float, int]:
        events = [e for e in p.key_averages() if e.key.startswith("aten::")]
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
        mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        return ([{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                  "calls": e.count} for e in rows[:top]], mm / total, total / 1e3, sum(e.count for e in events))

    rows, mm_share, total_ms, calls = summary(prof)
    _, p_mm_share, p_total_ms, p_calls = summary(pprof)
    return {"threads": torch.get_num_threads(), "top_ops": rows, "matmul_share": mm_share, "aten_self_ms": total_ms,
            "aten_calls": calls, "plain_matmul_share": p_mm_share, "plain_aten_self_ms": p_total_ms,
            "plain_aten_calls": p_calls}


# ---------------------------------------------------------------------------------------------------------------
# The run
def machine_info() -> dict:
    """CPU model and the flags that decide fp32/bf16 speed (/proc/cpuinfo), cores, torch, git revision."""
    from dgemma.bench.speed import _git
    from dgemma.hw import cores_allowed, cpu_info

    cpu, flags = cpu_info() or ("", frozenset())
    cpu = cpu or "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_allowed": cores_allowed(),
            "cpu_flags": {f: f in flags for f in CPU_FLAGS}, "torch": torch.__version__, "git": _git()}


def machine_peaks(quick: bool, native_bf16: bool) -> dict:
    """`dgemma.bench.speed.machine_limits` at the current thread count. Where the CPU has no native bf16, its bf16 product
    runs at ~0.2-1 GFLOP/s (minutes for the full 2048^3 size), so the quick sizes are taken there and the fp32 peak
    is measured again at the full 2048^3 (the same best-of-3 timing)."""
    from dgemma.bench.speed import _best, machine_limits

    if quick or native_bf16:
        return {**machine_limits(quick), "peak_matmul_n": 1024 if quick else 2048}
    res = machine_limits(True)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    res["matmul_gflops_fp32"] = 2 * n**3 / _best(lambda: a @ b, 3) / 1e9
    return {**res, "peak_matmul_n": n}


def _check(cfg: BenchTrainConfig) -> None:
    bad = [f"--{k.replace('_', '-')} must be >= 1 (got {getattr(cfg, k)})"
           for k in ("batch_size", "steps", "warmup", "vocab_size", "canvas_length", "seq_len")
           if getattr(cfg, k) is not None and getattr(cfg, k) < 1]
    bad += [f"--threads must be >= 1 (got {n})" for n in cfg.threads if n < 1]
    if bad:
        raise BenchTrainError("; ".join(bad))


def run(cfg: BenchTrainConfig) -> dict:
    from dgemma.api import fast_half

    start = time.perf_counter()
    load_start = os.getloadavg()
    cfg = cfg.resolved()
    _check(cfg)
    base = build_model(cfg)
    c = base.config
    seq_len = seq_len_for(cfg, c)
    next(loader_for(cfg, c, seq_len))  # a data folder that cannot give a batch fails here, before any timing
    native_bf16 = fast_half(torch.device("cpu"))
    bf16 = native_bf16 if cfg.bf16 is None else cfg.bf16
    modes = ["eager", "compile"] if cfg.compile else ["eager"]
    result: dict = {
        "model": cfg.model, "preset": cfg.preset, "data": cfg.data or "synthetic (uniform random tokens)",
        "shape": {"batch": cfg.batch_size, "seq_len": seq_len, "canvas_length": c.canvas_length,
                  "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "layers": c.num_hidden_layers,
                  "heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
                  "experts": c.num_experts, "top_k_experts": c.top_k_experts,
                  "parameters": sum(p.numel() for p in base.parameters())},
        "machine": machine_info(), "native_bf16": native_bf16, "bf16_autocast": bf16, "quick": cfg.quick,
        "threads": list(cfg.threads), "modes": modes, "steps": cfg.steps, "warmup": cfg.warmup,
        "headline": "tokens_per_s counts every token of the batch (batch * seq_len per step, train.py's tokens/step); "
                    "supervised_tokens_per_s counts the loss positions only",
        "load_average_start": list(load_start)}
    sections: dict[str, float] = {}
    before = torch.get_num_threads()
    by: dict[str, dict] = {}
    try:
        for n in cfg.threads:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            peaks = machine_peaks(cfg.quick, native_bf16)
            sections[f"machine@{n}"] = time.perf_counter() - t0
            peak_bf16 = peaks["matmul_gflops_bf16"] if native_bf16 else None
            at = {"peak_fp32_gflops": peaks["matmul_gflops_fp32"], "peak_bf16_gflops": peaks["matmul_gflops_bf16"],
                  "copy_gbytes_per_s": peaks["copy_gbytes_per_s"], "peak_matmul_n": peaks["peak_matmul_n"], "modes": {}}
            for mode in modes:
                t0 = time.perf_counter()
                at["modes"][mode] = measure(base, cfg, seq_len, mode, peaks["matmul_gflops_fp32"], peak_bf16, bf16)
                sections[f"{mode}@{n}"] = time.perf_counter() - t0
            by[str(n)] = {**at["modes"][modes[-1]], **at}
        if cfg.profile:
            torch.set_num_threads(cfg.threads[0])
            t0 = time.perf_counter()
            result["profile"] = profile_step(base, cfg, seq_len, bf16)
            sections["profile"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    result["by_threads"] = by
    first = by[str(cfg.threads[0])]
    for k in ("tokens_per_s", "plain_tokens_per_s", "flops_fraction", "plain_flops_fraction", "flops_per_token",
              "plain_flops_per_token"):
        result[k] = first[k]  # the first thread count's, last mode's (also under by_threads)
    result["load_average_end"] = list(os.getloadavg())
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["section_s"] = {**sections, "total": time.perf_counter() - start}
    if cfg.plot:
        result["plot"] = _plot(result, cfg.plot)
    _print(result)
    from dgemma.bench.speed import finish

    finish(result, cfg.out)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Output
def _fmt(v, spec: str = ".1f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _print(r: dict) -> None:
    m, s = r["machine"], r["shape"]
    flags = " ".join(f for f, on in m["cpu_flags"].items() if on) or "none of " + ", ".join(CPU_FLAGS)
    print(f"device: {m['cpu']}, {m['cores']} cores ({m['cores_allowed']} allowed), torch {m['torch']}, git {m['git']}; "
          f"flags: {flags}; native bf16: {r['native_bf16']}; load average {r['load_average_start'][0]:.2f} -> "
          f"{r['load_average_end'][0]:.2f}")
    what = r["model"] or f"preset {r['preset']}"
    print(f"model {what}: {s['parameters'] / 1e6:.2f}M parameters, hidden {s['hidden_size']}, {s['layers']} layers, "
          f"{s['heads']} heads, MLP {s['intermediate_size']}, {s['experts']} experts top-{s['top_k_experts']}, "
          f"vocab {s['vocab_size']}; batch {s['batch']} x seq_len {s['seq_len']} (canvas {s['canvas_length']}); "
          f"data: {r['data']}; {'bf16 autocast' if r['bf16_autocast'] else 'fp32'}; {r['warmup']} warm-up + "
          f"{r['steps']} timed steps, dgemma and plain alternating")
    print(r["headline"])
    rows = [(n, mode, v) for n in r["threads"] for mode, v in r["by_threads"][str(n)]["modes"].items()]
    print(f"{'thr':>3} {'mode':<8}{'tok/s':>9}{'steady':>8}{'sup/s':>8}{'plain':>9}{'x':>6}{'%fp32':>7}{'plain%':>7}"
          f"{'%bf16':>7}{'GFLOP/s':>8}{'MFLOP/tok':>10}{'plain':>7}{'compile s':>10}{'graphs':>7}{'recomp':>7}")
    for n, mode, v in rows:
        print(f"{n:>3} {mode:<8}{v['tokens_per_s']:>9.0f}{v['steady_tokens_per_s']:>8.0f}{v['supervised_tokens_per_s']:>8.0f}"
              f"{v['plain_tokens_per_s']:>9.0f}{v['plain_over_dgemma']:>6.2f}{100 * v['flops_fraction']:>7.1f}"
              f"{100 * v['plain_flops_fraction']:>7.1f}{_fmt(v['bf16_flops_fraction'] and 100 * v['bf16_flops_fraction']):>7}"
              f"{v['gflops']:>8.1f}{v['flops_per_token'] / 1e6:>10.2f}{v['plain_flops_per_token'] / 1e6:>7.2f}"
              f"{_fmt(v['compile_s'], '.1f'):>10}{_fmt(v['graphs_compiled'], 'd'):>7}{_fmt(v['recompiles'], 'd'):>7}")
    print("(tok/s from the mean step, recompiles included; steady from the median step; x = plain tokens/s over dgemma's; %fp32 / plain% = achieved matmul FLOP/s over the fp32 matmul peak "
          "measured at that thread count; %bf16 only where the CPU has native bf16)")
    print("ms per step (means over the timed steps; the parts add up to step):")
    print(f"{'thr':>3} {'mode':<8}{'step':>8}{'data':>7}{'encoder':>8}{'dec p1':>8}{'dec p2':>8}{'head':>7}"
          f"{'fwd oth':>8}{'backward':>9}{'optim':>7} | {'plain':>7}{'fwd':>7}{'bwd':>7}{'optim':>7}")
    for n, mode, v in rows:
        print(f"{n:>3} {mode:<8}{v['step_ms']:>8.1f}{v['data_ms']:>7.1f}{v['encoder_ms']:>8.1f}"
              f"{v['decoder_pass1_ms']:>8.1f}{v['decoder_pass2_ms']:>8.1f}{v['head_ms']:>7.1f}"
              f"{v['forward_other_ms']:>8.1f}{v['backward_ms']:>9.1f}{v['optimizer_ms']:>7.1f} | "
              f"{v['plain_step_ms']:>7.1f}{v['plain_forward_ms']:>7.1f}{v['plain_backward_ms']:>7.1f}"
              f"{v['plain_optimizer_ms']:>7.1f}")
    for n in r["threads"]:
        b = r["by_threads"][str(n)]
        print(f"machine @{n} threads: matmul fp32 {b['peak_fp32_gflops']:.1f} GFLOP/s, bf16 {b['peak_bf16_gflops']:.1f} "
              f"GFLOP/s, copy {b['copy_gbytes_per_s']:.1f} GB/s")
    for n, mode, v in rows:
        if v["graph_breaks"]:
            top3 = sorted(v["graph_breaks"].items(), key=lambda kv: -kv[1])[:3]
            reasons = "; ".join(f"{' / '.join(x.strip() for x in k.splitlines()[:2])[:120]} x{c}" for k, c in top3)
            print(f"graph breaks @{n} {mode}: {reasons}")
    f = r["by_threads"][str(r["threads"][0])]["flops_by_part"]
    print("matmul FLOPs per step by part (GFLOP): " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in f.items()))
    if "profile" in r:
        p = r["profile"]
        print(f"profile of one eager step @{p['threads']} threads: {p['aten_calls']} aten calls, "
              f"{p['aten_self_ms']:.0f} ms self CPU, matmul share {100 * p['matmul_share']:.0f}% (plain step: "
              f"{p['plain_aten_calls']} calls, {p['plain_aten_self_ms']:.0f} ms, matmul {100 * p['plain_matmul_share']:.0f}%)")
        for row in p["top_ops"]:
            print(f"  {row['op']:<58}{row['self_ms']:>9.1f} ms{100 * row['share']:>6.1f}%{row['calls']:>7} calls")
    if r.get("plot"):
        print(f"plot: {r['plot']}")
    print("seconds per section: " + ", ".join(f"{k} {v:.1f}" for k, v in r["section_s"].items()))


def _plot(r: dict, path: str) -> str:
    """Stacked ms split (dgemma) beside the plain step's, per thread count and mode; a note instead without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return f"skipped: matplotlib is not installed (pip install matplotlib), so no {path}"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{n}t {mode}", v) for n in r["threads"] for mode, v in r["by_threads"][str(n)]["modes"].items()]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for part in DGEMMA_PARTS:
        vals = [v[f"{part}_ms"] for _, v in rows]
        ax.bar([i - 0.2 for i in x], vals, 0.4, bottom=bottom, label=part)
        bottom = [b + max(v, 0.0) for b, v in zip(bottom, vals, strict=True)]
    ax.bar([i + 0.2 for i in x], [v["plain_step_ms"] for _, v in rows], 0.4, color="grey", label="plain step")
    ax.set_xticks(list(x), [k for k, _ in rows])
    ax.set_ylabel("ms per step")
    ax.set_title("dgemma step split (left) vs plain PyTorch (right)", fontsize=9)
    ax.legend(fontsize=7)
    bx.bar([i - 0.2 for i in x], [v["tokens_per_s"] for _, v in rows], 0.4, label="dgemma")
    bx.bar([i + 0.2 for i in x], [v["plain_tokens_per_s"] for _, v in rows], 0.4, color="grey", label="plain")
    for i, (_, v) in enumerate(rows):
        bx.text(i - 0.2, v["tokens_per_s"], f"{100 * v['flops_fraction']:.0f}%", ha="center", va="bottom", fontsize=7)
        bx.text(i + 0.2, v["plain_tokens_per_s"], f"{100 * v['plain_flops_fraction']:.0f}%", ha="center",
                va="bottom", fontsize=7)
    bx.set_xticks(list(x), [k for k, _ in rows])
    bx.set_ylabel("tokens/s (batch * seq_len per step)")
    bx.set_title("tokens/s; labels: % of the fp32 matmul peak", fontsize=9)
    bx.legend(fontsize=7)
    s = r["shape"]
    fig.suptitle(f"dgemma bench train: {r['model'] or r['preset']}, batch {s['batch']} x {s['seq_len']}, "
                 f"git {r['machine']['git']}", fontsize=9)
    fig.tight_layout()
    try:
        with replacing(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
