"""The DiffusionGemma training objective (spec B1), as pure functions over tensors.

For a packed clean batch `x [B, T]` (T = k * C, C = config.canvas_length, documents starting on canvas boundaries):

    noise  = sample_noise(x, vocab_size, generators)          t ~ U(eps, 1) per example, uniform-token corruption,
                                                               self-conditioning switch (p = 0.5) per example
    losses = training_losses(model, x, noise)                 diffusion CE + ar_weight * next-token CE
    result = evaluate_losses(model, x, [0.5], generator)      fixed-t diffusion CE and AR NLL, no gradients

Fine-tuning (SFT, one example per row with its roles from sft.py) has its own pair, over the same passes:
`sft_losses` (answers only, filler masked out of both passes) and `sft_eval_losses`.

One encoder pass (causal, every position kept in the cache) gives the clean K/V and the AR logits. One decoder pass
then denoises all k canvases at once: canvas j's queries see the clean prefix [0, jC) through the cache and their
own noisy canvas (bidirectionally), nothing else; sliding layers see only clean keys [jC - W + 1, jC), the window
anchored at the block boundary, which is exactly what the inference cache holds (`training_masks`). Canvas tokens
sit at their absolute positions, the same as their clean twins.

Self-conditioning is two-pass: pass 1 (no gradients, no self-conditioning) gives soft-capped logits; pass 2 reads
them for the examples whose switch is on (zero signal for the others) and is the only pass that gets gradients.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dgemma.cache import KVCache
from dgemma.config import FULL, SLIDING, ModelConfig
from dgemma.model import DiffusionGemma, Masks
from dgemma.train.sft import ANSWER, ANSWER_FILL, FILL, PROMPT

T_EPS = 1e-3  # t ~ U(T_EPS, 1)
Generators = torch.Generator | Sequence[torch.Generator]  # one for the batch, or one per row


class ObjectiveError(ValueError):
    """A batch the objective cannot use (shape, vocabulary); the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Noise
@dataclass
class Noise:
    t: torch.Tensor  # [B] fp32 corruption probability per example
    noisy: torch.Tensor  # [B, T] long: x with the corrupted positions replaced by uniform random tokens
    corrupted: torch.Tensor  # [B, T] bool: positions that drew a random token (it may equal the clean one)
    sc_mask: torch.Tensor  # [B] bool: self-conditioning on for this example in pass 2


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across runs, processes and Python versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def example_generators(seed: int, domain: str, first_index: int, n: int) -> list[torch.Generator]:
    """One CPU generator per example, seeded by (seed, domain, global example index): an example's noise does not
    depend on how its batch is split over processes or micro-steps."""
    return [torch.Generator().manual_seed(mix_seed(seed, domain, first_index + i)) for i in range(n)]


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


def corrupt(x: torch.Tensor, t: torch.Tensor, vocab_size: int,
            generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each position of `x [B, T]` independently, with probability `t [B]`, by a uniform token in
    [0, vocab_size). Returns (noisy ids [B, T], corrupted mask [B, T] bool).

    With one generator per row, row i's draws come from generators[i] only (independent of the batch)."""
    B, T = x.shape
    if isinstance(generator, torch.Generator):
        u = _rand((B, T), generator)
        tokens = torch.randint(0, vocab_size, (B, T), generator=generator, device=generator.device)
    else:
        if len(generator) != B:
            raise ObjectiveError(f"corrupt: {len(generator)} generators for a batch of {B} rows; give one per row")
        draws = [(_rand((1, T), g), torch.randint(0, vocab_size, (1, T), generator=g, device=g.device))
                 for g in generator]
        u = torch.cat([d[0] for d in draws])
        tokens = torch.cat([d[1] for d in draws])
    mask = u.to(x.device) < t.to(x.device, torch.float32)[:, None]
    return torch.where(mask, tokens.to(x.device), x), mask


def sample_noise(x: torch.Tensor, vocab_size: int, generator: Generators, eps: float = T_EPS,
                 sc_prob: float = 0.5) -> Noise:
    """Everything random about one training example: t ~ U(eps, 1), the corruption, the self-conditioning switch.

    Draw order per generator: t, uniforms [T], tokens [T], switch. Per-row generators make an example's noise a
    function of its own seed only, so data-parallel ranks reproduce a single-process run exactly."""
    B = x.shape[0]
    if isinstance(generator, torch.Generator):
        t = eps + (1 - eps) * _rand((B,), generator)
        noisy, corrupted = corrupt(x, t, vocab_size, generator)
        sc = _rand((B,), generator) < sc_prob
    else:
        if len(generator) != B:
            raise ObjectiveError(f"sample_noise: {len(generator)} generators for a batch of {B}; give one per row")
        rows = []
        for i, g in enumerate(generator):
            ti = eps + (1 - eps) * _rand((1,), g)
            rows.append((ti, *corrupt(x[i:i + 1], ti, vocab_size, g), _rand((1,), g) < sc_prob))
        t, noisy, corrupted, sc = (torch.cat([r[k] for r in rows]) for k in range(4))
    return Noise(t=t.to(x.device), noisy=noisy, corrupted=corrupted, sc_mask=sc.to(x.device))


# ---------------------------------------------------------------------------------------------------------------
# Masks: the block-diagonal training geometry and the inference geometry it must reproduce
def training_masks(config: ModelConfig, seq_len: int, device: torch.device | str = "cpu") -> Masks:
    """Decoder masks for denoising all canvases of a `seq_len` sequence in one pass: bool [1, 1, T, 2T] per layer
    type (True = may attend), keys ordered [clean positions 0..T-1 from the cache ; canvas positions 0..T-1].

    Canvas j (queries [jC, (j+1)C)) sees clean keys [0, jC) in full layers and [jC - W + 1, jC) in sliding layers,
    plus all of its own canvas. Canvas 0 sees only itself, so no query row is empty."""
    C, W = config.canvas_length, config.sliding_window
    if seq_len % C:
        raise ObjectiveError(f"sequence length {seq_len} is not a multiple of canvas_length={C}; "
                             "pack sequences to whole canvases (seq_len = k * canvas_length)")
    pos = torch.arange(seq_len, device=device)
    start = (pos // C) * C  # [T] first position of each query's canvas
    clean_full = pos[None, :] < start[:, None]  # [T, T]
    clean_sliding = clean_full & (pos[None, :] > start[:, None] - W)
    own = (pos[None, :] // C) == (pos[:, None] // C)  # [T, T]
    out: Masks = {}
    for layer_type, clean in ((SLIDING, clean_sliding), (FULL, clean_full)):
        if layer_type in config.layer_types:
            out[layer_type] = torch.cat([clean, own], dim=1)[None, None]
    return out


def inference_visibility(config: ModelConfig, layer: int, prefix_len: int) -> torch.Tensor:
    """bool [prefix_len]: which clean positions layer `layer` reads when the decoder denoises the canvas that follows
    `prefix_len` encoded tokens at inference (the positions an inference `KVCache` keeps; the canvas itself is
    always fully visible). The training masks must agree with this for every canvas."""
    cache = KVCache.empty(config)
    cache.length = prefix_len
    visible = torch.zeros(prefix_len, dtype=torch.bool)
    visible[cache.start(layer):] = True
    return visible


# ---------------------------------------------------------------------------------------------------------------
# Cross-entropy through the tied LM head
def _ce_sum(model: DiffusionGemma, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed CE (fp32 scalar) of `targets [N]` under the soft-capped logits of `hidden [N, H]`.

    With `chunk > 0` the logits are made `chunk` rows at a time and recomputed in backward (activation
    checkpointing), so at most [chunk, V] logits are alive instead of [N, V]."""
    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.logits(h), y, reduction="sum")

    if hidden.shape[0] == 0:
        return hidden.sum().float() * 0.0  # keeps the graph connected (DDP) when nothing is supervised
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return piece(hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        h, y = hidden[s:s + chunk], targets[s:s + chunk]
        total = total + (checkpoint(piece, h, y, use_reentrant=False) if torch.is_grad_enabled() else piece(h, y))
    return total


def _check_batch(model: DiffusionGemma, x: torch.Tensor) -> None:
    cfg = model.config
    if x.dim() != 2:
        raise ObjectiveError(f"batch has shape {tuple(x.shape)}; expected [batch, seq_len] token ids")
    if x.shape[1] % cfg.canvas_length:
        raise ObjectiveError(f"seq_len={x.shape[1]} is not a multiple of the model's canvas_length="
                             f"{cfg.canvas_length}; use seq_len = k * {cfg.canvas_length}")
    lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
    if lo < 0 or hi >= cfg.vocab_size:
        raise ObjectiveError(f"batch holds token id {hi if hi >= cfg.vocab_size else lo} outside the model's "
                             f"vocabulary [0, {cfg.vocab_size}); the data and the model were made with different "
                             "tokenizers")


# ---------------------------------------------------------------------------------------------------------------
# Training losses
@dataclass
class Losses:
    diffusion: torch.Tensor  # scalar: summed canvas CE / diffusion normaliser (with gradients)
    ar: torch.Tensor  # scalar: summed next-token CE / AR normaliser (with gradients)
    total: torch.Tensor  # diffusion + ar_weight * ar
    diffusion_sum: torch.Tensor  # detached summed CE (nats), for logging across ranks/micro-batches
    ar_sum: torch.Tensor
    diffusion_count: int  # supervised canvas positions in this batch
    ar_count: int  # supervised next-token targets in this batch


def encode_clean(model: DiffusionGemma, x: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
    """Causal encoder pass over the clean batch; the cache keeps every position of every layer. `attention_mask`
    [B, T] bool hides positions (SFT filler) from every query; None = all visible."""
    cache = KVCache.empty(model.config, keep_all=True)
    return model.encode(x, cache, attention_mask=attention_mask), cache


def denoise_all_canvases(model: DiffusionGemma, noisy: torch.Tensor, cache: KVCache, masks: Masks,
                         sc_logits: torch.Tensor | None = None, sc_mask: torch.Tensor | None = None,
                         positions: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder hidden states [B, T, H] for every canvas of `noisy [B, T]`, one pass, block-diagonal masks.
    `positions` [T]: the absolute positions of `noisy`'s columns (default 0..T-1, every canvas)."""
    if positions is None:
        positions = torch.arange(noisy.shape[1], device=noisy.device)
    return model.denoise_hidden(noisy, cache, sc_logits=sc_logits, sc_mask=sc_mask, positions=positions, masks=masks)


def supervised_canvases(config: ModelConfig, sup: torch.Tensor, masks: Masks) -> tuple[torch.Tensor, Masks] | None:
    """(positions [T'], masks [1, 1, T', T + T']) of the canvases holding a supervised position of `sup [B, T]`, or
    None when every canvas does (or none does). A canvas that no target lies in (a task's prompt canvas) then costs
    no decoder work: its queries are dropped, and its noisy keys too, which no other canvas sees anyway."""
    B, T = sup.shape
    C = config.canvas_length
    live = sup.reshape(B, T // C, C).any(dim=2).any(dim=0)  # [T / C]
    if bool(live.all()) or not bool(live.any()):
        return None
    positions = (torch.nonzero(live).flatten()[:, None] * C + torch.arange(C, device=sup.device)).flatten()
    sliced = {t: torch.cat([m[:, :, positions, :T], m[:, :, positions][..., T + positions]], dim=-1)
              for t, m in masks.items()}
    return positions, sliced


def training_losses(model: DiffusionGemma, x: torch.Tensor, noise: Noise, ar_weight: float = 1.0,
                    loss_mask: torch.Tensor | None = None, ce_chunk: int = 0,
                    diffusion_norm: float | None = None, ar_norm: float | None = None,
                    self_conditioning: bool = True, diffusion: bool = True, sc_graph: bool = False) -> Losses:
    """Diffusion + AR losses of one batch.

    x: [B, T] clean ids; noise: from `sample_noise(x, ...)`.
    loss_mask: [B, T] bool, positions supervised as targets (None = all). The diffusion loss covers every supervised
        canvas position (corrupted or not, no 1/t weight); the AR loss predicts x[:, p] from x[:, :p] for supervised
        p >= 1.
    diffusion_norm / ar_norm: divide the summed CE by these (default: this batch's supervised counts, i.e. the mean).
        Data-parallel training passes global counts so that the gradient equals a single process's.
    self_conditioning: False skips pass 1 (zero signal for every example, whatever noise.sc_mask says). Pass 1
        otherwise always runs, even when no example's switch is on: sharded data-parallel processes must run the
        same sequence of layer calls.
    diffusion: False skips both decoder passes (the AR-only control: the diffusion loss is 0, without gradients).
    sc_graph: run pass 1 with autograd recording and detach its logits (the same values, no gradient through them)
        instead of under no_grad. Compiled layers (train --compile) then run pass 1 through the graphs compiled for
        pass 2 instead of compiling no-gradient graphs of their own: fewer graphs to compile, the same losses."""
    _check_batch(model, x)
    T = x.shape[1]
    sup = torch.ones_like(x, dtype=torch.bool) if loss_mask is None else loss_mask.to(x.device, torch.bool)

    hidden, cache = encode_clean(model, x)
    ar_sup = sup[:, 1:]
    ar_sum = _ce_sum(model, hidden[:, :-1][ar_sup], x[:, 1:][ar_sup], ce_chunk)

    n_diff, n_ar = int(sup.sum()), int(ar_sup.sum())
    ar = ar_sum / (ar_norm if ar_norm is not None else max(n_ar, 1))
    if not diffusion:
        zero = ar_sum.new_zeros(())
        return Losses(diffusion=zero, ar=ar, total=ar_weight * ar, diffusion_sum=zero, ar_sum=ar_sum.detach(),
                      diffusion_count=n_diff, ar_count=n_ar)
    masks = training_masks(model.config, T, x.device)
    noisy, target, dsup, positions = noise.noisy, x, sup, None
    subset = supervised_canvases(model.config, sup, masks)
    if subset is not None:  # denoise only the canvases that hold targets (same losses, less work)
        positions, masks = subset
        noisy, target, dsup = noisy[:, positions], x[:, positions], sup[:, positions]
    sc_logits = None
    if self_conditioning:  # pass 1
        with nullcontext() if sc_graph else torch.no_grad():
            sc_logits = model.logits(denoise_all_canvases(model, noisy, cache, masks, positions=positions))  # fp32
        sc_logits = sc_logits.detach()
    dec = denoise_all_canvases(model, noisy, cache, masks, sc_logits=sc_logits, sc_mask=noise.sc_mask,
                               positions=positions)
    diff_sum = _ce_sum(model, dec[dsup], target[dsup], ce_chunk)

    diffusion_loss = diff_sum / (diffusion_norm if diffusion_norm is not None else max(n_diff, 1))
    return Losses(diffusion=diffusion_loss, ar=ar, total=diffusion_loss + ar_weight * ar, diffusion_sum=diff_sum.detach(),
                  ar_sum=ar_sum.detach(), diffusion_count=n_diff, ar_count=n_ar)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
@dataclass
class EvalLosses:
    ar_sum: float  # summed next-token NLL (nats)
    ar_count: int
    diffusion_sum: dict[float, float]  # t -> summed canvas CE (nats)
    diffusion_count: int

    @property
    def ar_nll(self) -> float:
        return self.ar_sum / max(self.ar_count, 1)

    def diffusion(self, t: float) -> float:
        return self.diffusion_sum[t] / max(self.diffusion_count, 1)

    def __add__(self, other: EvalLosses) -> EvalLosses:
        return EvalLosses(self.ar_sum + other.ar_sum, self.ar_count + other.ar_count,
                          {t: v + other.diffusion_sum[t] for t, v in self.diffusion_sum.items()},
                          self.diffusion_count + other.diffusion_count)


@torch.no_grad()
def evaluate_losses(model: DiffusionGemma, x: torch.Tensor, t_values: Sequence[float], generator: Generators,
                    loss_mask: torch.Tensor | None = None, self_condition: bool = True) -> EvalLosses:
    """AR NLL per token and, for each fixed noise level t, the diffusion CE per supervised canvas position.

    The encoder runs once for all t. With `self_condition` each t gets two decoder passes, the second reading the
    first's logits for every example (as inference does after its first step); without, one pass."""
    _check_batch(model, x)
    B, T = x.shape
    sup = torch.ones_like(x, dtype=torch.bool) if loss_mask is None else loss_mask.to(x.device, torch.bool)
    hidden, cache = encode_clean(model, x)
    ar_sup = sup[:, 1:]
    ar_sum = float(_ce_sum(model, hidden[:, :-1][ar_sup], x[:, 1:][ar_sup], 0))
    masks = training_masks(model.config, T, x.device)
    sums = {}
    for t in t_values:
        noisy, _ = corrupt(x, torch.full((B,), float(t)), model.config.vocab_size, generator)
        sc = model.logits(denoise_all_canvases(model, noisy, cache, masks)) if self_condition else None
        dec = denoise_all_canvases(model, noisy, cache, masks, sc_logits=sc)
        sums[float(t)] = float(_ce_sum(model, dec[sup], x[sup], 0))
    return EvalLosses(ar_sum=ar_sum, ar_count=int(ar_sup.sum()), diffusion_sum=sums, diffusion_count=int(sup.sum()))


# ---------------------------------------------------------------------------------------------------------------
# SFT: one example per row, roles [B, T] int8 from sft.py, answers supervised
def sft_masks(roles: torch.Tensor, ar_on_prompt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """roles int8 [B, T] -> (valid, diffusion targets, AR targets), bool [B, T] each. An AR target needs a valid
    token before it."""
    valid = roles != FILL
    diff = (roles == ANSWER) | (roles == ANSWER_FILL)
    ar = (roles == ANSWER) | ((roles == PROMPT) if ar_on_prompt else torch.zeros_like(valid))
    ar[:, 0] = False
    ar[:, 1:] &= valid[:, :-1]
    return valid, diff, ar


def _encode_and_masks(model: DiffusionGemma, x: torch.Tensor,
                      valid: torch.Tensor) -> tuple[torch.Tensor, KVCache, Masks]:
    """The encoder pass with the filler (`~valid`) masked out, and the decoder's training masks with the filler's
    clean keys hidden too."""
    hidden, cache = encode_clean(model, x, attention_mask=valid)
    keys = torch.cat([valid, torch.ones_like(valid)], dim=1)[:, None, None, :]  # [B, 1, 1, 2T]: filler keys hidden
    masks = {t: m & keys for t, m in training_masks(model.config, x.shape[1], x.device).items()}
    return hidden, cache, masks


def sft_losses(model: DiffusionGemma, x: torch.Tensor, roles: torch.Tensor, noise: Noise, *, ar_weight: float = 1.0,
               ar_on_prompt: bool = False, ce_chunk: int = 0, diffusion_norm: float | None = None,
               ar_norm: float | None = None,
               self_conditioning: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, diffusion CE sum, AR CE sum) of one SFT batch; x [B, T] ids, roles [B, T] (sft.py). The norms
    default to this batch's supervised counts; data-parallel training passes the global ones."""
    valid, diff, ar = sft_masks(roles, ar_on_prompt)
    hidden, cache, masks = _encode_and_masks(model, x, valid)
    ar_sup = ar[:, 1:]
    ar_sum = _ce_sum(model, hidden[:, :-1][ar_sup], x[:, 1:][ar_sup], ce_chunk)
    sc_logits = None
    if self_conditioning:
        with torch.no_grad():
            sc_logits = model.logits(denoise_all_canvases(model, noise.noisy, cache, masks))
    dec = denoise_all_canvases(model, noise.noisy, cache, masks, sc_logits=sc_logits, sc_mask=noise.sc_mask)
    diff_sum = _ce_sum(model, dec[diff], x[diff], ce_chunk)
    d_norm = diffusion_norm if diffusion_norm is not None else max(int(diff.sum()), 1)
    a_norm = ar_norm if ar_norm is not None else max(int(ar_sup.sum()), 1)
    return diff_sum / d_norm + ar_weight * ar_sum / a_norm, diff_sum.detach(), ar_sum.detach()


@torch.no_grad()
def sft_eval_losses(model: DiffusionGemma, x: torch.Tensor, roles: torch.Tensor, t_values: Sequence[float],
                    generators: Generators) -> list[float]:
    """[AR sum, AR count, diffusion count, diffusion sum at each t]: answer positions only, two-pass SC. A flat list
    so that data-parallel validation can add it up element by element."""
    valid, diff, ar = sft_masks(roles, False)
    hidden, cache, masks = _encode_and_masks(model, x, valid)
    ar_sup = ar[:, 1:]
    out = [float(_ce_sum(model, hidden[:, :-1][ar_sup], x[:, 1:][ar_sup], 0)), float(ar_sup.sum()), float(diff.sum())]
    for t in t_values:
        noisy, _ = corrupt(x, torch.full((x.shape[0],), float(t)), model.config.vocab_size, generators)
        sc = model.logits(denoise_all_canvases(model, noisy, cache, masks))
        dec = denoise_all_canvases(model, noisy, cache, masks, sc_logits=sc)
        out.append(float(_ce_sum(model, dec[diff], x[diff], 0)))
    return out
