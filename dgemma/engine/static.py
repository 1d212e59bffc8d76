"""The batch-synchronous fast path: a preallocated cache shared by a left-padded batch, and the chunked sampler.

Compat mode (transformers' `generate()` token for token) is batch-synchronous by definition: every row is computed
every step, one generator for the batch. It runs here; every other mode runs on the stepped engine (engine.py).

- `StaticCache` allocates every K/V buffer once per generate call. Full-attention layers get one slot per position;
  sliding layers get a bounded buffer of `W - 1 + span` slots (the last W - 1 positions plus room for a canvas or
  a prefill chunk) that moves its last W - 1 positions to the front when it fills, once every `span / C` canvases.
  The decoder writes the canvas's K/V into the slots the canvas will occupy once committed (scratch until then), so
  a denoising step concatenates nothing, and every pass reads one contiguous, position-ordered slice of keys.
- `position_stats` / `sample_chunked` do the sampler's work (temperature, softmax, the draw, argmax, entropy, and the
  next step's self-conditioning soft embedding) a few canvas positions at a time, so at most one `[B, C, V]` fp32
  tensor (the logits) exists per step. They perform the reference's operations row by row in the reference's RNG
  order, so they draw the same tokens. The stepped engine uses them too.

Since the keys and masks are exactly the reference's, this path is bit-identical to it (tests/test_static.py),
except for prompts longer than the span, which are encoded in chunks (equal to float rounding).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dgemma.cache import KVCache
from dgemma.config import SLIDING
from dgemma.engine.outputs import compat_append, compat_output, generator_for
from dgemma.model import DiffusionGemma, decoder_mask, encoder_mask, fill_masks
from dgemma.params import PREFILL_SPAN
from dgemma.sampler import (
    accept_entropy_bound,
    draw_uniforms,
    linear_temperature,
    sample_inverse_cdf,
    stable_and_confident,
    top_confidence,
)


class StaticCache:
    """Preallocated K/V for `batch` rows. Full layers: one slot per position, [0, capacity). Sliding layers: a
    bounded buffer of `W - 1 + span` slots holding positions from `base` on; when a new block does not fit, the
    last W - 1 positions move to the front (one copy of W - 1 slots every `span / block` blocks), so the keys a
    pass reads are always one contiguous, position-ordered slice: the reference's keys, in its order."""

    def __init__(self, model: DiffusionGemma, batch: int, capacity: int, span: int):
        cfg = model.config
        dev, dt = model.device, model.dtype
        self.batch, self.capacity, self.span = batch, capacity, span
        self.length = 0
        self.n = batch  # live rows: [0, n)
        self.keep_w = cfg.sliding_window - 1  # positions a sliding layer keeps
        self.ring = min(self.keep_w + span, capacity)
        self.base = 0  # position held by slot 0 of the sliding buffers
        self.sliding = [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)]
        self.keys, self.values = [], []
        for i in range(cfg.num_hidden_layers):
            shape = (batch, cfg.layer_kv_heads(i), self.ring if self.sliding[i] else capacity, cfg.layer_head_dim(i))
            self.keys.append(torch.zeros(shape, dtype=dt, device=dev))
            self.values.append(torch.zeros(shape, dtype=dt, device=dev))
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=dev)  # real token (not left padding)
        self._window = [self.keep_w if sl else None for sl in self.sliding]

    def start(self, layer: int) -> int:
        """First position layer `layer` attends to (as KVCache.start)."""
        return max(0, self.length - self.keep_w) if self.sliding[layer] else 0

    def make_room(self, count: int) -> None:
        """Make sure positions [length, length + count) fit in the sliding buffers."""
        if self.length + count > self.capacity:
            raise RuntimeError(f"StaticCache capacity {self.capacity} exceeded (position {self.length + count})")
        if self.length + count - self.base <= self.ring:
            return
        if count > self.span:
            raise RuntimeError(f"a block of {count} positions exceeds the sliding span {self.span}")
        new_base = max(0, self.length - self.keep_w)
        lo, hi = new_base - self.base, self.length - self.base
        n = self.n
        for i, sl in enumerate(self.sliding):
            if sl and hi > lo:
                self.keys[i][:n, :, :hi - lo] = self.keys[i][:n, :, lo:hi].clone()
                self.values[i][:n, :, :hi - lo] = self.values[i][:n, :, lo:hi].clone()
        self.base = new_base

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the block's K/V [n, nkv, T, d] at positions [length, length + T) and return the keys/values the
        block attends to (kept prefix + block), as views of the buffers."""
        n, T = k.shape[0], k.shape[2]
        off = self.base if self.sliding[layer] else 0
        lo, hi = self.start(layer) - off, self.length + T - off
        K, V = self.keys[layer], self.values[layer]
        K[:n, :, hi - T:hi] = k
        V[:n, :, hi - T:hi] = v
        return K[:n, :, lo:hi], V[:n, :, lo:hi]

    def view(self, new: int = 0) -> KVCache:
        """A KVCache-shaped view (valid mask, length, windows; no tensors) for the reference mask builders."""
        return KVCache(window=self._window, keys=[], values=[], valid=self.valid[:self.n, :self.length + new],
                       length=self.length)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep rows `idx` (indices into the live rows, in order), moved to the front."""
        k = idx.numel()
        if k == self.n and bool((idx == torch.arange(k, device=idx.device)).all()):
            return
        self._take(idx)
        self.n = k

    def permute(self, order: torch.Tensor) -> None:
        """Reorder the live rows (a permutation of range(n))."""
        self._take(order)

    def _take(self, idx: torch.Tensor) -> None:
        k, n = idx.numel(), self.n
        for bufs in (self.keys, self.values):
            for b in bufs:
                b[:k] = b[:n].index_select(0, idx)
        self.valid[:k] = self.valid[:n].index_select(0, idx)


class StaticPasses:
    """Encoder and decoder passes over a `StaticCache`, with the model's own modules and weights."""

    def __init__(self, model: DiffusionGemma, compile: bool = False):
        self.model = model
        self.cfg = model.config
        self._pass = self._pass_eager
        if compile:
            self._pass = torch.compile(self._pass_eager, dynamic=True)

    def _pass_eager(self, cache: StaticCache, h: torch.Tensor, masks: dict, encoder: bool) -> torch.Tensor:
        """Run all layers on h [n, T, H] at positions [length, length + T); writes the block's K/V to `cache`."""
        T = h.shape[1]
        positions = torch.arange(cache.length, cache.length + T, device=h.device)
        rope = self.model._rope(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            t = layer.layer_type
            attn = layer.self_attn
            cos, sin = rope[t]
            q, k, v = attn.project(layer.input_layernorm(h), cos, sin)
            k, v = cache.kv(i, k, v)
            h = layer.after_attention(h, attn.attend(q, k, v, masks[t]), encoder)
        return self.model.norm(h)

    def encode(self, cache: StaticCache, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Causal pass over ids [n, T] after the cache (prompts longer than the span go in chunks).
        Returns the hidden state of the last position [n, H]."""
        n, T = ids.shape
        h = None
        for s in range(0, T, cache.span):
            chunk = ids[:, s:s + cache.span]
            c, L = chunk.shape[1], cache.length
            cache.make_room(c)
            cache.valid[:n, L:L + c] = True if valid is None else valid[:, s:s + c]
            positions = torch.arange(L, L + c, device=ids.device)
            view = cache.view(c)
            masks = {t: encoder_mask(view, positions, self.cfg.sliding_window if t == SLIDING else None, i)
                     for t, i in self.model.type_layer.items()}
            h = self._pass(cache, self.model.embed(chunk), fill_masks(masks), True)
            cache.length += c
        return h[:, -1]

    def decoder_masks(self, cache: StaticCache, C: int) -> dict:
        """The decoder's masks for a canvas of C at the cache's end (the same for every step of the canvas)."""
        cache.make_room(C)
        view = cache.view()
        return fill_masks({t: decoder_mask(view, C, i) for t, i in self.model.type_layer.items()})

    def denoise_hidden(self, cache: StaticCache, canvas: torch.Tensor, soft: torch.Tensor | None,
                       masks: dict) -> torch.Tensor:
        """Bidirectional pass over canvas [n, C] with soft [n, C, H] (scaled soft embedding, None = zero signal),
        its K/V written as scratch where the canvas will be committed. Returns the final-normed hidden [n, C, H]."""
        e = self.model.embed(canvas)
        h = self.model.self_conditioning(e, torch.zeros_like(e) if soft is None else soft)
        return self._pass(cache, h, masks, False)

    def denoise(self, cache: StaticCache, canvas: torch.Tensor, soft: torch.Tensor | None,
                masks: dict) -> torch.Tensor:
        """`denoise_hidden`, then the LM head: logits [n, C, V] fp32."""
        return self.model.logits(self.denoise_hidden(cache, canvas, soft, masks))


def chunk_rows(vocab_size: int, budget_bytes: int = 1 << 21, at_least: int = 64) -> int:
    """Canvas positions per sampler chunk: about `budget_bytes` of fp32 logits (2 MiB, a core's L2), but at least
    `at_least`, since each chunk's soft-embedding product reads the whole [V, H] embedding once."""
    return max(at_least, budget_bytes // (4 * vocab_size))


@dataclass
class PositionStats:
    argmax: torch.Tensor  # [N] most likely token of the processed logits
    entropy: torch.Tensor | None  # [N] fp32 nats (entropy-bound sampler)
    sampled: torch.Tensor | None  # [N] a draw from softmax(processed) (entropy-bound sampler)
    confidence: torch.Tensor | None  # [N] probability of argmax (confidence sampler)
    soft: torch.Tensor | None  # [n, C, H] next step's self-conditioning embedding, embedding scale applied


def position_stats(raw: torch.Tensor, temperature: torch.Tensor, generator: torch.Generator | None,
                   model: DiffusionGemma | None, soft_from: str | None, chunk: int | None = None,
                   method: str | None = "multinomial", confidence: bool = False,
                   uniforms: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                   timing: dict | None = None) -> PositionStats:
    """Per-position results of one denoising step's logits raw [n, C, V], computed `chunk` positions at a time so
    that no [n, C, V] temporary is made: the argmax of raw / temperature, and as asked a sampled token (`method`
    "multinomial" or "inverse_cdf"; None draws nothing) with the entropy, the top probability (`confidence`), and
    the self-conditioning soft embedding of the next step (softmax of the "raw" or "proc" logits times the
    embedding, times the embedding scale). Row-wise the same arithmetic as the reference sampler functions.

    `temperature` is a scalar tensor, or one per position [n * C, 1] (rows at different steps); `uniforms` [n * C]
    are the inverse-CDF draws when the caller drew them (one generator per row); otherwise they are drawn here.

    `raw=None, hidden=[n, C, H]`: the logits are computed here, a chunk of whole canvases at a time (`model.logits`;
    one canvas alone is the reference's own matmul), so they never exist as one [n, C, V] tensor and each chunk is
    still in cache for the passes over it; `timing["head"]` then accumulates the seconds spent in the head."""
    if raw is None:
        n, C, _ = hidden.shape
        V = model.config.vocab_size
        flat, hflat = None, hidden.reshape(n * C, -1)
        dev = hidden.device
    else:
        n, C, V = raw.shape
        flat, hflat = raw.view(n * C, V), None
        dev = raw.device
    N = n * C
    chunk = chunk or chunk_rows(V)
    argmax = torch.empty(N, dtype=torch.long, device=dev)
    sampled = torch.empty(N, dtype=torch.long, device=dev) if method else None
    h = torch.empty(N, dtype=torch.float32, device=dev) if method else None
    conf = torch.empty(N, dtype=torch.float32, device=dev) if confidence else None
    soft = None
    if soft_from is not None:
        E = model.embed_tokens.weight
        soft = torch.empty(N, E.shape[1], dtype=model.dtype, device=dev)
    lowest = torch.finfo(torch.float32).min
    u = None
    if method == "inverse_cdf":
        u = uniforms if uniforms is not None else draw_uniforms(N, generator, dev)
    per_position = temperature.dim() > 0
    in_place = soft is not None and not (torch.is_grad_enabled() and E.requires_grad)  # out= has no autograd
    if flat is None:  # whole canvases per chunk (so each matmul holds the reference's rows)
        chunk = max(C, chunk // C * C)
    for s in range(0, N, chunk):
        if flat is None:
            t0 = time.perf_counter()
            r = model.logits(hflat[s:s + chunk])
            if timing is not None:
                timing["head"] += time.perf_counter() - t0
        else:
            r = flat[s:s + chunk]
        proc = r / (temperature[s:s + chunk] if per_position else temperature)
        probs = None
        if method:
            probs = torch.softmax(proc, dim=-1, dtype=torch.float32)
            if u is None:
                sampled[s:s + chunk] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                sampled[s:s + chunk] = sample_inverse_cdf(probs, u[s:s + chunk])
            norm = proc - proc.logsumexp(dim=-1, keepdim=True)
            # -(clamp(norm) * softmax(norm)).sum(-1), the product in place (the same values, one temporary fewer)
            h[s:s + chunk] = norm.clamp(min=lowest).mul_(F.softmax(norm, dim=-1)).sum(-1).neg_()
        if confidence:
            conf[s:s + chunk], argmax[s:s + chunk] = top_confidence(proc)
        else:
            argmax[s:s + chunk] = proc.argmax(dim=-1)
        if soft_from is not None:
            src = r if soft_from == "raw" else proc
            if src.dtype == model.dtype == torch.float32 and soft_from == "proc" and probs is not None:
                p = probs  # softmax(proc) in fp32 is exactly what the reference recomputes next step
            else:
                p = F.softmax(src.to(model.dtype), dim=-1, dtype=torch.float32).to(model.dtype)
            if model.soft_matmul is not None:
                soft[s:s + chunk] = model.soft_matmul(p)
            elif in_place:
                torch.mm(p, E, out=soft[s:s + chunk])  # p @ E, written in place
            else:
                soft[s:s + chunk] = p @ E
    if soft is not None:
        soft = (soft * model.embed_scale.to(model.dtype)).view(n, C, -1)
    return PositionStats(argmax, h, sampled, conf, soft)


def sample_chunked(raw: torch.Tensor | None, temperature: torch.Tensor, canvas: torch.Tensor, entropy_bound: float,
                   generator: torch.Generator | None, model: DiffusionGemma | None, soft_from: str | None,
                   chunk: int | None = None, method: str = "multinomial", hidden: torch.Tensor | None = None):
    """The reference `sample_step(raw / temperature, ...)` computed `chunk` positions at a time (`position_stats`;
    `raw=None, hidden=[n, C, H]` computes the logits there, chunk by chunk).

    Also returns the entropy per position (adaptive stopping) and, when `soft_from` is "raw" or "proc", the
    self-conditioning soft embedding [n, C, H] of the next step, so the logits need not be kept.
    Returns (canvas, argmax, accepted, entropy, soft)."""
    n, C = canvas.shape
    V = model.config.vocab_size if raw is None else raw.shape[-1]
    st = position_stats(raw, temperature, generator, model, soft_from, chunk, method, hidden=hidden)
    h = st.entropy.view(n, C)
    accepted = accept_entropy_bound(h, entropy_bound)
    kept = torch.where(accepted, st.sampled.view(n, C), canvas)
    noise = torch.randint(0, V, (n, C), generator=generator, device=canvas.device)
    new_canvas = torch.where(~accepted, noise, kept)
    return new_canvas, st.argmax.view(n, C), accepted, h, st.soft


# ---------------------------------------------------------------------------------------------------------------
# Compat mode on the static cache (dispatched from generate.py; same tokens as generate._diffusion_compat)


def get_passes(model: DiffusionGemma, compile: bool = False) -> StaticPasses:
    """One engine per model and compile setting, kept on the model so compiled code is reused across calls."""
    engines = model.__dict__.setdefault("_dgemma_engines", {})
    if compile not in engines:
        engines[compile] = StaticPasses(model, compile=compile)
    return engines[compile]


def _new_cache(model: DiffusionGemma, batch: int, prompt_len: int, new_tokens: int) -> StaticCache:
    span = max(model.config.canvas_length, PREFILL_SPAN)
    return StaticCache(model, batch, prompt_len + new_tokens, span)


@torch.inference_mode()
def diffusion_compat(model, input_ids, attention_mask, p, on_step):
    """transformers-compatible generation (see generate._diffusion_compat) on the static cache: every row is
    computed every step, as the reference does, so the random stream and the tokens are the same."""

    t0 = time.perf_counter()
    cfg = model.config
    B, L0 = input_ids.shape
    C, V, N = cfg.canvas_length, cfg.vocab_size, p.max_denoising_steps
    dev = input_ids.device
    max_length = L0 + p.max_new_tokens
    gen = generator_for(p.seed, dev)
    eng = get_passes(model, p.compile)
    canvases = math.ceil(p.max_new_tokens / C)
    cache = _new_cache(model, B, L0, canvases * C)
    eos = torch.tensor(list(p.eos_token_ids), device=dev) if p.eos_token_ids else None
    use_stopper = p.stability_threshold is not None and p.confidence_threshold is not None
    finished_seq = torch.zeros(B, dtype=torch.bool, device=dev)
    passes = torch.zeros(B, dtype=torch.long)
    steps: list[list[int]] = [[] for _ in range(B)]
    seq, pending, pending_mask = input_ids, input_ids, attention_mask
    encoder_passes, first = 0, None
    for ci in range(canvases):
        eng.encode(cache, pending, pending_mask)
        encoder_passes += 1
        masks = eng.decoder_masks(cache, C)
        canvas = torch.randint(0, V, (B, C), generator=gen, device=dev)
        soft, history = None, None
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        argmax = canvas
        row_steps = torch.zeros(B, dtype=torch.long)
        for k in range(N, 0, -1):
            passes += (~(done | finished_seq)).cpu().long()
            row_steps += (~done).cpu().long()
            hidden = eng.denoise_hidden(cache, canvas, soft, masks)  # the head runs chunk by chunk in the sampler
            temp = linear_temperature(k, N, p.t_min, p.t_max)
            new_canvas, new_argmax, accepted, h, new_soft = sample_chunked(
                None, temp, canvas, p.entropy_bound, gen, model, soft_from="proc", chunk=p.sampler_chunk,
                hidden=hidden)
            del hidden
            if use_stopper:
                if bool(done.any()):
                    new_argmax = torch.where(done[:, None], argmax, new_argmax)
                    new_canvas = torch.where(done[:, None], canvas, new_canvas)
                    new_soft = torch.where(done[:, None, None], soft, new_soft)
                # the reference's test, on the entropy of the processed logits that the chunked sampler computed
                stop, history = stable_and_confident(new_argmax, None, history, p.stability_threshold,
                                                     p.confidence_threshold, token_entropy=h)
                done |= stop
            soft = new_soft
            argmax, canvas = new_argmax, new_canvas
            if on_step is not None:
                on_step(ci, N - k, list(range(B)), argmax, accepted)
            if bool(done.all()):
                break
        for r in range(B):
            steps[r].append(int(row_steps[r]))
        seq, finished_seq = compat_append(seq, argmax, finished_seq, max_length, eos, p.pad_token_id)
        if first is None:
            first = time.perf_counter() - t0
        if bool(finished_seq.all()):
            break
        pending, pending_mask = seq[:, -C:], None
    return compat_output(seq, L0, eos, p.pad_token_id, passes, encoder_passes, steps, t0, first)
