"""The stepped engine: many requests share one model, step by step (continuous batching).

    eng = Engine(model, EngineConfig(max_batch=16))
    eng.add(Request("a", prompt_ids, SamplingParams(max_new_tokens=64, seed=0)))
    while eng.has_work():
        for event in eng.step():
            ...                                     # event.new_ids, event.draft, event.finished

Token ids only: text, stop strings, HTTP and printing live above it. One `step()` is schedule -> forward -> update:

- schedule: admit waiting requests into free K/V slots (first come, first served), then pick this step's causal
  work (commits of finished canvases, AR tokens, prompt chunks within a token budget so a long prompt cannot stall
  the others) and its denoising work (every diffusion row with an open canvas, each at its own step).
- forward: one encoder pass over all the causal work and one decoder pass over all the canvases. Both are ragged:
  every row brings its own tokens at its own positions, flattened into one `[1, N]` sequence, so projections, MLPs,
  experts and the LM head run as one batch; attention runs per row on that row's own keys, in position order, with
  exactly the reference's masks (this is what keeps a request's tokens identical whoever it shares the step with).
- update: the sampler works over all rows at once with per-row temperature, step, entropy bound and stopping state
  as tensors; each request draws from its own generator in the reference's order. Finished canvases are reported
  at once (their tokens are final) and committed by the next encoder pass; finished rows free their slot at once.

Log-probabilities (SamplingParams.logprobs, Request.prompt_logprobs) are the model's raw distribution (log-softmax
of the logits, temperature 1, whatever chose the token): an AR or prompt token's under the encoder's next-token
logits; a committed diffusion token's under the denoiser's logits at its canvas position at the step that chose it
(`Engine._score_canvases` gives the cases). Only the rows that asked run the extra LM-head rows; the tokens are the
same with or without them.

`KVPool` holds the K/V: per slot, full layers keep every position and sliding layers the last W - 1 (moved to the
front after each encoder block), so a row's keys are always the reference `KVCache`'s keys in the same order.
Memory is sized from `EngineConfig` (slots x positions), never from the longest request.

The reference path (generate.py over model.py, cache.py and sampler.py) is the slow twin this engine is tested
against (tests/test_engine.py); compat mode stays batch-synchronous in static.py.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dgemma.engine.constrain import Grammars, Matcher, choose_ar, guide_run, walk
from dgemma.engine.outputs import GenerationOutput, GenerationStats
from dgemma.engine.static import PositionStats, chunk_rows, position_stats
from dgemma.model import DiffusionGemma, rope_cos_sin
from dgemma.params import (
    MAX_LOGPROBS,
    PREFILL_SPAN,
    Draft,
    EngineConfig,
    Event,
    QueueFull,
    Request,
    RequestError,
    SamplingParams,
    TokenLogprob,
)
from dgemma.sampler import (
    FREE,
    accept_entropy_bound,
    commit_confident,
    commit_quota,
    confident_and_stable,
    draw_uniforms,
    row_temperatures,
    sample_next_token,
    stable_run,
    token_logprobs,
)

STEP_API = 1  # the add / step / abort contract the server relies on
# Engine.timing's parts: the layer passes, the LM head (+ soft-cap), the sampler (everything else over [., V]
# logits, the self-conditioning product included), and the whole step.
TIMING_KEYS = ("encoder_layers", "decoder_layers", "head", "sampler", "step")
# Batch-invariant mode pads every matmul to at least this many rows. Measured on an AVX2 machine with MKL: fewer than
# 4 rows take another sgemm kernel whose rounding differs (a 64x128 fp32 linear, README); 16 leaves a margin.
BATCH_INVARIANT_ROWS = 16


# ---------------------------------------------------------------------------------------------------------------
# K/V memory
class KVPool:
    """Per-slot K/V buffers. Full layers: slot s holds positions [0, length) at [s, :, 0:length]. Sliding layers:
    the last min(length, W - 1) positions at [s, :, 0:kept], plus `room` slots for the block being computed;
    `trim` moves the last W - 1 back to the front after an encoder block. Buffers are allocated empty (untouched
    pages cost no memory) and only written positions are ever read."""

    def __init__(self, model: DiffusionGemma, slots: int, max_len: int, room: int):
        cfg = model.config
        self.slots, self.max_len, self.room = slots, max_len, room
        self.keep_w = cfg.sliding_window - 1
        self.sliding = [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)]
        self.keys, self.values = [], []
        for i, sl in enumerate(self.sliding):
            size = self.keep_w + room if sl else max_len
            shape = (slots, cfg.layer_kv_heads(i), size, cfg.layer_head_dim(i))
            self.keys.append(torch.empty(shape, dtype=model.dtype, device=model.device))
            self.values.append(torch.empty(shape, dtype=model.dtype, device=model.device))
        self.length = [0] * slots

    @staticmethod
    def nbytes(cfg, slots: int, max_len: int, room: int, dtype: torch.dtype) -> int:
        per = torch.empty((), dtype=dtype).element_size()
        total = 0
        for i in range(cfg.num_hidden_layers):
            size = cfg.sliding_window - 1 + room if cfg.is_sliding(i) else max_len
            total += 2 * slots * cfg.layer_kv_heads(i) * size * cfg.layer_head_dim(i) * per
        return total

    def at(self, slot: int, layer: int) -> int:
        """Buffer index of the slot's next position in layer `layer`."""
        n = self.length[slot]
        return min(n, self.keep_w) if self.sliding[layer] else n

    def trim(self, slot: int, count: int) -> None:
        """After `count` new positions were encoded into `slot`: advance, and keep sliding layers at W - 1."""
        before = self.length[slot]
        self.length[slot] = before + count
        end = min(before, self.keep_w) + count
        if end > self.keep_w:
            lo = end - self.keep_w
            for i, sl in enumerate(self.sliding):
                if sl:
                    self.keys[i][slot, :, :self.keep_w] = self.keys[i][slot, :, lo:end].clone()
                    self.values[i][slot, :, :self.keep_w] = self.values[i][slot, :, lo:end].clone()

    def free(self, slot: int) -> None:
        self.length[slot] = 0


@dataclass
class Piece:
    """One row's share of a pass: `count` tokens at positions [start, start + count) of slot `slot`."""
    slot: int
    start: int
    count: int


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled pieces (not in the model:
# compiled graphs cannot be deep-copied or pickled, and copying a model must not try)


def compiled_pieces(model: DiffusionGemma, min_rows: int):
    """The model's compiled layer pieces and sampler (compiled.py), kept on the model so that every engine over it
    (one per one-shot call) reuses the graphs compiled so far. They hold the weight tensors they were built with, so
    the key includes every tensor's identity and dtype: a model quantised or cast since gets new pieces."""
    from dgemma.engine.compiled import CompiledLayers, CompiledSampler
    from dgemma.lora import LoRALinear, MultiLoRALinear

    if any((isinstance(m, LoRALinear) and not m.merged) or isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise RequestError("compile=True does not run unmerged LoRA adapters (the compiled graphs read the base "
                           "weights only); merge the adapter first (`dgemma lora merge`) or run without --compile")
    weights = tuple((id(t), t.dtype) for t in model.state_dict(keep_vars=True).values())
    cache = _COMPILED.setdefault(model, {})
    key = (min_rows, weights)
    if key not in cache:
        for stale in [k for k in cache if k[1] != weights]:  # pieces for weights the model no longer holds
            del cache[stale]
        cache[key] = (CompiledLayers(model, smallest=max(1, min_rows), min_rows=min_rows), CompiledSampler(model))
    return cache[key]


class Runner:
    """The two ragged passes over the model's own modules and weights."""

    def __init__(self, model: DiffusionGemma, pool: KVPool, compile: bool = False, min_rows: int = 0):
        self.model, self.pool = model, pool
        self.min_rows = min_rows  # pad every matmul to at least this many rows (batch-invariant mode)
        cfg = model.config
        self.window = cfg.sliding_window
        # cos/sin depend on positions only: computed once for every position a slot can hold (the same values as
        # the reference's per-call rope_cos_sin, which is elementwise).
        positions = torch.arange(pool.max_len + pool.room, device=model.device)
        self.rope = {t: rope_cos_sin(getattr(model, f"inv_freq_{t}"), positions, model.dtype)
                     for t in ("sliding_attention", "full_attention")}
        # compile=True: the pieces between attention calls run as compiled graphs at bucketed row counts
        # (compiled.py; the eager modules below are their slow twin, tests/test_compiled.py).
        self.compiled, self.compiled_sampler = compiled_pieces(model, min_rows) if compile else (None, None)
        # Served LoRA adapters (lora.attach_adapters): each slot's adapter index (0: the base), and the rows of each
        # pass's tokens that every adapter's products apply to.
        self.adapter_rows = getattr(model, "adapter_rows", None)
        self.slot_adapter: dict[int, int] = {}

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, ...] with zero rows appended up to min_rows (for the LM head of a few AR rows)."""
        if x.shape[0] >= self.min_rows:
            return x
        return torch.cat([x, x.new_zeros(self.min_rows - x.shape[0], *x.shape[1:])])

    def run(self, pieces: list[Piece], h: torch.Tensor, encoder: bool) -> torch.Tensor:
        """All layers over h [1, N, H] (the pieces' tokens, flattened in order). Writes each piece's K/V at its
        positions (the encoder's are kept by `KVPool.trim`; the decoder's are scratch). Returns normed [1, N, H]."""
        pos = torch.cat([torch.arange(p.start, p.start + p.count) for p in pieces]).to(h.device)
        real = h.shape[1]
        comp = self.compiled
        rows = max(self.min_rows, comp.bucket(real) if comp is not None else 0)
        if real < rows:
            # Dummy rows through every matmul, into no cache: copies of the last real row (whose attention output
            # they copy too), so the router sends them to that row's experts and they cost no extra expert calls.
            h = torch.cat([h, h[:, -1:].expand(1, rows - real, h.shape[2])], dim=1)
            pos = torch.cat([pos, pos[-1:].expand(rows - real)])
        rope = {t: (cos[pos], sin[pos]) for t, (cos, sin) in self.rope.items()}
        if self.adapter_rows is not None:
            self._route_adapters(pieces)
        try:
            return self._layers(pieces, h, pos, rope, real, encoder)
        finally:
            if self.adapter_rows is not None:
                self.adapter_rows.groups = []

    def _route_adapters(self, pieces: list[Piece]) -> None:
        """Tell the adapters' linears which of this pass's rows are whose (contiguous per piece)."""
        by_adapter: dict[int, list[torch.Tensor]] = {}
        off = 0
        for p in pieces:
            index = self.slot_adapter.get(p.slot, 0)
            if index:
                by_adapter.setdefault(index, []).append(torch.arange(off, off + p.count))
            off += p.count
        dev = self.model.device
        self.adapter_rows.groups = [(i, torch.cat(parts).to(dev)) for i, parts in sorted(by_adapter.items())]
        self.adapter_rows.min_rows = self.min_rows

    def _layers(self, pieces: list[Piece], h: torch.Tensor, pos: torch.Tensor, rope: dict, real: int,
                encoder: bool) -> torch.Tensor:
        comp = self.compiled
        pool = self.pool
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            cos, sin = rope[layer.layer_type]
            if comp is not None:
                q, k, v = comp.pre_attention(i, h, cos, sin)
            else:
                q, k, v = attn.project(layer.input_layernorm(h), cos, sin)  # [1, nh|nkv, N, d]
            K, V = pool.keys[i], pool.values[i]
            sliding = pool.sliding[i]
            # Pieces with the same key length and block size attend as one batch (each row only to its own slot's
            # keys, no mask beyond the reference's own): one attention call per group instead of one per row.
            groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
            off = 0
            for j, p in enumerate(pieces):
                T = p.count
                at = pool.at(p.slot, i)
                K[p.slot, :, at:at + T] = k[0, :, off:off + T]
                V[p.slot, :, at:at + T] = v[0, :, off:off + T]
                groups.setdefault((at, T), []).append((j, off))
                off += T
            o = q.new_empty(1, q.shape[1], h.shape[1], q.shape[3])  # [1, nh, N, d]
            gqa = attn.num_kv_heads != attn.num_heads
            for (at, T), members in groups.items():
                mask = self._encoder_mask(pieces[members[0][0]], at, sliding) if encoder else None
                if len(members) == 1:
                    (j, s), = members
                    slot = pieces[j].slot
                    o[:, :, s:s + T] = F.scaled_dot_product_attention(
                        q[:, :, s:s + T], K[slot:slot + 1, :, :at + T], V[slot:slot + 1, :, :at + T],
                        attn_mask=mask, scale=1.0, enable_gqa=gqa)
                    continue
                slots = torch.tensor([pieces[j].slot for j, _ in members], device=h.device)
                qs = torch.cat([q[:, :, s:s + T] for _, s in members])  # [g, nh, T, d]
                out = F.scaled_dot_product_attention(qs, K[:, :, :at + T].index_select(0, slots),
                                                     V[:, :, :at + T].index_select(0, slots), attn_mask=mask,
                                                     scale=1.0, enable_gqa=gqa)
                for r, (_, s) in enumerate(members):
                    o[:, :, s:s + T] = out[r:r + 1]
            if h.shape[1] > off:
                o[:, :, off:] = o[:, :, off - 1:off]
            if comp is not None:
                h = comp.post_attention(i, h, o, encoder)
            else:
                a = attn.o_proj(o.transpose(1, 2).reshape(1, h.shape[1], -1))
                h = layer.after_attention(h, a, encoder, self.min_rows)
        if comp is not None:
            return comp.final_norm(h)[:, :real]
        return self.model.norm(h[:, :real])

    def _encoder_mask(self, p: Piece, at: int, sliding: bool) -> torch.Tensor | None:
        """The reference's causal (+ window) mask for this piece: queries at [start, start + T) over the keys at
        positions [start - at, start + T). None when nothing is masked (as the reference)."""
        if p.count == 1:  # one query sees all its keys (the kept W - 1 and itself)
            return None
        q = torch.arange(p.start, p.start + p.count)
        kpos = torch.arange(p.start - at, p.start + p.count)
        allowed = kpos[None, :] <= q[:, None]
        if sliding:
            allowed &= kpos[None, :] > q[:, None] - self.window
        if bool(allowed.all()):
            return None
        return allowed[None, None].to(self.model.device)


# ---------------------------------------------------------------------------------------------------------------
# Rows
@dataclass
class CanvasUpdate:
    """One decoder step's outcome for g rows of one sampler (`Engine._accept`)."""
    canvas: torch.Tensor  # [g, C] the next input canvas (accepted tokens kept, the rest renoised)
    draft: torch.Tensor  # [g, C] the canvas as it stands (the argmax, or committed tokens + proposals)
    accepted: torch.Tensor  # [g, C] bool
    committed: torch.Tensor | None  # [g, C] bool, confidence sampler only
    done: torch.Tensor  # [g] bool: the canvas is final
    finite: torch.Tensor  # [g] bool: the row's statistics are finite (else the request fails)
    steps_done: torch.Tensor  # [g] steps of this canvas so far, this one included
    mean_entropy: torch.Tensor | None  # [g], entropy-bound sampler only
    entropy: torch.Tensor | None  # [g, C], entropy-bound sampler only


@dataclass
class Row:
    req: Request
    slot: int
    gen: torch.Generator
    order: int  # admission order (prefill is first come, first served)
    prefilled: int = 0  # prompt tokens encoded
    out: list[int] = field(default_factory=list)  # committed tokens
    pending: list[int] | None = None  # tokens the next encoder pass commits (a finished canvas, or an AR token)
    canvas_open: bool = False
    canvas_index: int = -1
    canvas_len: int = 0
    passes: int = 0  # decoder passes (diffusion) or logit-producing encoder passes (AR) this row took part in
    steps: list[int] = field(default_factory=list)  # denoising steps per committed canvas
    matcher: Matcher | None = None  # params.grammar's state after `out` (constrain.py); None: unconstrained
    # params.logprobs, diffusion: the open canvas's scored positions (position -> its token's TokenLogprob, under
    # the step that committed that token; see `_score_canvases`)
    canvas_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)

    @property
    def p(self) -> SamplingParams:
        return self.req.params

    @property
    def diffusion(self) -> bool:
        return self.req.params.mode == "diffusion"

    @property
    def prompt_done(self) -> bool:
        return self.prefilled == len(self.req.prompt_ids)


class Engine:
    """Continuous batching over one model. Not thread-safe: one thread calls add / abort / step."""

    def __init__(self, model: DiffusionGemma, config: EngineConfig | None = None, grammars: Grammars | None = None):
        """`grammars`: the tokenizer's grammar compiler (constrain.Grammars), needed by requests with a grammar."""
        self.model = model
        self.grammars = grammars
        self._matchers: dict[str, Matcher] = {}  # request id -> its grammar matcher, until admitted
        self.config = cfg = (config or EngineConfig()).validate()
        mc = model.config
        self.C, self.V = mc.canvas_length, mc.vocab_size
        self.room = max(cfg.prefill_chunk, self.C)
        limit = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        per_position = KVPool.nbytes(mc, cfg.max_batch, 1, 0, model.dtype) - KVPool.nbytes(mc, cfg.max_batch, 0, 0,
                                                                                           model.dtype)
        fixed = KVPool.nbytes(mc, cfg.max_batch, 0, self.room, model.dtype)
        budget = cfg.kv_memory_mb * 2**20
        fits = int((budget - fixed) // per_position) if per_position else limit
        if cfg.max_model_len is not None and cfg.max_model_len > fits:
            need = (fixed + per_position * cfg.max_model_len) / 2**20
            raise RequestError(f"K/V for {cfg.max_batch} rows of {cfg.max_model_len} positions needs {need:.0f} MB, "
                               f"over kv_memory_mb={cfg.kv_memory_mb:g}; lower max_batch or max_model_len, or raise "
                               "the budget")
        self.max_model_len = min(limit, fits)
        if self.max_model_len < 2:
            raise RequestError(f"kv_memory_mb={cfg.kv_memory_mb:g} leaves room for {self.max_model_len} positions per "
                               f"row with max_batch={cfg.max_batch}; raise kv_memory_mb or lower max_batch")
        self.pool = KVPool(model, cfg.max_batch, self.max_model_len, self.room)
        self.runner = Runner(model, self.pool, cfg.compile, BATCH_INVARIANT_ROWS if cfg.batch_invariant else 0)
        S, C, H, dev = cfg.max_batch, self.C, mc.hidden_size, model.device
        # Per-slot canvas state (rows are slots; a step gathers the rows it works on)
        self.canvas = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.draft = torch.zeros(S, C, dtype=torch.long, device=dev)  # argmax / proposal canvas of the last step
        self.soft = torch.zeros(S, C, H, dtype=model.dtype, device=dev)  # next step's self-conditioning input
        self.committed = torch.zeros(S, C, dtype=torch.bool, device=dev)  # confidence sampler
        self.fixed = torch.full((S, C), FREE, dtype=torch.long, device=dev)  # the open canvas's template slice
        self.run_len = torch.zeros(S, dtype=torch.long, device=dev)  # steps the argmax has stayed the same
        self.step_i = torch.zeros(S, dtype=torch.long, device=dev)  # steps done in the open canvas
        # Per-slot request parameters
        self.n_steps = torch.ones(S, dtype=torch.long, device=dev)
        self.t_min = torch.zeros(S, dtype=torch.float32, device=dev)
        self.t_span = torch.zeros(S, dtype=torch.float32, device=dev)
        self.bound = torch.zeros(S, dtype=torch.float32, device=dev)
        self.conf_thr = torch.zeros(S, dtype=torch.float32, device=dev)
        self.stab = torch.zeros(S, dtype=torch.long, device=dev)
        self.early = torch.zeros(S, dtype=torch.bool, device=dev)  # adaptive stopping on
        self.commit_thr = torch.zeros(S, dtype=torch.float32, device=dev)
        self.sampler_chunk = cfg.sampler_chunk or chunk_rows(self.V)
        self.compiled_sampler = self.runner.compiled_sampler
        self.waiting: deque[Row | Request] = deque()
        self.rows: dict[int, Row] = {}  # slot -> running row
        self.free_slots = list(range(S - 1, -1, -1))
        self.by_id: dict[str, Row | Request] = {}
        self._admitted = 0
        self.counters = {"steps": 0, "decoder_passes": 0, "encoder_passes": 0, "tokens": 0, "requests": 0,
                         "decoder_rows": 0}
        # Cumulative host seconds per part of `step()` (on CUDA, kernels run asynchronously: only "step" is then
        # meaningful unless the caller synchronises). overhead = step - the others: scheduling, bookkeeping, Python.
        self.timing = dict.fromkeys(TIMING_KEYS, 0.0)

    # ---- the public contract ----------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request. RequestError: impossible (bad ids, too long, bad params); QueueFull: retry later."""
        p = request.params.validate()
        ids = request.prompt_ids
        if request.request_id in self.by_id:
            raise RequestError(f"request id {request.request_id!r} is already in the engine")
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        if not all(isinstance(t, int) and 0 <= t < self.V for t in ids):
            raise RequestError(f"prompt ids must be integers in [0, {self.V}); is the tokenizer the model's own?")
        if p.template is not None and not all(t < self.V for t in p.template):
            raise RequestError(f"template ids must be below the vocabulary size {self.V}; is the tokenizer the "
                               "model's own?")
        need = len(ids) + (math.ceil(p.max_new_tokens / self.C) * self.C if p.mode == "diffusion" else p.max_new_tokens)
        if need > self.max_model_len:
            raise RequestError(
                f"prompt of {len(ids)} tokens + max_new_tokens={p.max_new_tokens} needs {need} positions"
                f"{' (whole canvases of ' + str(self.C) + ')' if p.mode == 'diffusion' else ''}, over this engine's "
                f"{self.max_model_len} (model limit {self.model.config.max_position_embeddings}); shorten the prompt "
                "or lower max_new_tokens")
        top = request.prompt_logprobs
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS):
            raise RequestError(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}] (got {top!r})")
        if p.grammar is not None:
            if self.grammars is None:
                raise RequestError("this engine was built without a tokenizer's grammars, so it cannot constrain "
                                   "output; build it with Engine(model, config, grammars=Grammars.from_tokenizer(...))")
            matcher = self.grammars.matcher(p.grammar)  # RequestError naming the problem
        if p.adapter is not None:
            names = self.runner.adapter_rows.names if self.runner.adapter_rows is not None else {}
            if p.adapter not in names:
                raise RequestError(f"no adapter named {p.adapter!r} is loaded"
                                   + (f" (loaded: {', '.join(names)})" if names else " (this engine serves the base "
                                      "model only; load adapters with lora.attach_adapters or serve --lora)"))
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.config.max_queue})")
        self.waiting.append(request)
        self.by_id[request.request_id] = request
        if p.grammar is not None:
            self._matchers[request.request_id] = matcher
        self.counters["requests"] += 1

    def abort(self, request_id: str) -> bool:
        """Remove a waiting or running request now (its slot is free for the next step). False if unknown."""
        item = self.by_id.pop(request_id, None)
        if item is None:
            return False
        self._matchers.pop(request_id, None)
        if isinstance(item, Row):
            self._release(item)
        else:
            self.waiting.remove(item)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.rows)

    def metrics(self) -> dict:
        return {"waiting": len(self.waiting), "running": len(self.rows), "max_batch": self.config.max_batch,
                "max_model_len": self.max_model_len, **self.counters}

    def step(self) -> list[Event]:
        """One engine step: schedule -> encoder pass -> decoder pass -> update. Returns per-request events."""
        t0 = time.perf_counter()
        try:
            return self._step()
        finally:
            self.timing["step"] += time.perf_counter() - t0

    def _step(self) -> list[Event]:
        self._admit()
        if not self.rows:
            return []
        self.counters["steps"] += 1
        events: dict[str, Event] = {}
        enc = self._schedule_encoder()
        if enc:
            self._encoder_pass(enc, events)
        dec = [r for r in self.rows.values() if r.diffusion and r.prompt_done and r.pending is None]
        for r in dec:
            if not r.canvas_open:
                self._open_canvas(r)
        if dec:
            self._decoder_pass(dec, events)
        return list(events.values())

    # ---- schedule ---------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            slot = self.free_slots.pop()
            seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 2
            gen = torch.Generator(device=self.model.device).manual_seed(seed)
            self._admitted += 1
            row = Row(req, slot, gen, self._admitted, matcher=self._matchers.pop(req.request_id, None))
            self.rows[slot] = row
            self.by_id[req.request_id] = row
            self.pool.free(slot)
            p = req.params
            if p.adapter is not None:
                self.runner.slot_adapter[slot] = self.runner.adapter_rows.names[p.adapter]
            if p.mode == "diffusion":
                self.n_steps[slot] = p.max_denoising_steps
                self.t_min[slot] = p.t_min
                self.t_span[slot] = p.t_max - p.t_min  # rounded as the reference's (t_max - t_min) * frac
                self.bound[slot] = p.entropy_bound
                self.early[slot] = p.stability_threshold is not None and p.confidence_threshold is not None
                self.stab[slot] = p.stability_threshold or 0
                self.conf_thr[slot] = p.confidence_threshold or 0.0
                self.commit_thr[slot] = p.commit_threshold

    def _schedule_encoder(self) -> list[tuple[Row, list[int], bool]]:
        """(row, tokens, is_prompt) for this step's encoder pass: every pending commit and AR token, then prompt
        chunks in admission order within the prefill budget."""
        work = [(r, r.pending, False) for r in self.rows.values() if r.pending is not None]
        budget = self.config.prefill_chunk
        for r in sorted((r for r in self.rows.values() if not r.prompt_done), key=lambda r: r.order):
            if budget <= 0:
                break
            ids = r.req.prompt_ids[r.prefilled:r.prefilled + budget]
            work.append((r, ids, True))
            budget -= len(ids)
        return work

    # ---- forward + update: encoder ----------------------------------------------------------------------------
    def _encoder_pass(self, work: list[tuple[Row, list[int], bool]], events: dict[str, Event]) -> None:
        model, dev = self.model, self.model.device
        pieces = [Piece(r.slot, self.pool.length[r.slot], len(ids)) for r, ids, _ in work]
        flat = torch.tensor([t for _, ids, _ in work for t in ids], dtype=torch.long, device=dev)[None]
        t0 = time.perf_counter()
        with torch.inference_mode():
            hidden = self.runner.run(pieces, model.embed(flat), encoder=True)[0]
        self.timing["encoder_layers"] += time.perf_counter() - t0
        self.counters["encoder_passes"] += 1
        if any(is_prompt and r.req.prompt_logprobs is not None for r, _, is_prompt in work):
            self._prompt_logprobs(work, pieces, hidden, events)
        ends, ar_rows = [], []
        off = 0
        for (r, _, is_prompt), piece in zip(work, pieces):
            off += piece.count
            self.pool.trim(r.slot, piece.count)
            if is_prompt:
                r.prefilled += piece.count
            else:
                r.pending = None
            if not r.diffusion and r.prompt_done:  # an AR row's next token comes from this pass
                ar_rows.append(r)
                ends.append(off - 1)
        if ar_rows:
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = model.logits(self.runner.pad(hidden[torch.tensor(ends, device=dev)]))[:len(ends)]
            t1 = time.perf_counter()
            self.timing["head"] += t1 - t0
            self._update_ar(ar_rows, logits, events)
            self.timing["sampler"] += time.perf_counter() - t1

    def _prompt_logprobs(self, work: list[tuple[Row, list[int], bool]], pieces: list[Piece], hidden: torch.Tensor,
                         events: dict[str, Event]) -> None:
        """Event.prompt_logprobs for the prompt chunks of rows that asked: hidden [N, H] of this pass, where position
        i's next-token distribution scores prompt token i + 1. The head runs on at most `sampler_chunk` positions
        at a time, so a long prompt never holds [L, V] logits at once."""
        model, dev, step = self.model, self.model.device, self.sampler_chunk
        t0 = time.perf_counter()
        off = 0
        for (r, ids, is_prompt), piece in zip(work, pieces):
            top = r.req.prompt_logprobs
            if is_prompt and top is not None:
                targets = r.req.prompt_ids[piece.start + 1:piece.start + piece.count + 1]  # [<= count]
                out: list[TokenLogprob | None] = [None] if piece.start == 0 else []
                for a in range(0, len(targets), step):
                    part = targets[a:a + step]
                    with torch.inference_mode():
                        logits = model.logits(self.runner.pad(hidden[off + a:off + a + len(part)]))[:len(part)]
                        lp = token_logprobs(logits, torch.tensor(part, device=dev), top)
                    out.extend(_as_token_logprobs(part, *lp))
                self._event(r, events).prompt_logprobs.extend(out)
            off += piece.count
        self.timing["head"] += time.perf_counter() - t0

    def _update_ar(self, rows: list[Row], logits: torch.Tensor, events: dict[str, Event]) -> None:
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        greedy = [j for j, r in enumerate(rows) if r.p.temperature <= 0]
        tokens = [0] * len(rows)
        if greedy:
            for j, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                tokens[j] = t
        for j, r in enumerate(rows):
            if r.p.temperature > 0:
                tokens[j] = int(sample_next_token(logits[j:j + 1], r.p.temperature, r.p.top_k, r.p.top_p, r.gen))
            if r.p.template is not None and len(r.out) < len(r.p.template) and r.p.template[len(r.out)] != FREE:
                tokens[j] = r.p.template[len(r.out)]  # a fixed position: emitted as it stands (after the draw)
        ended = [False] * len(rows)
        for j, r in enumerate(rows):
            if r.matcher is not None and finite[j]:
                t, ended[j] = choose_ar(r.matcher, tokens[j], logits[j], r.p.temperature, r.p.top_k, r.p.top_p, r.gen)
                tokens[j] = next(iter(r.matcher.eos)) if t is None else t  # an EOS: nothing is emitted
                if t is None:
                    ended[j] = "eos"
        # log-probabilities of the tokens as emitted, under the model's raw distribution (not the sampler's)
        asked = [j for j, r in enumerate(rows) if r.p.logprobs is not None and finite[j]]
        chosen: dict[int, TokenLogprob] = {}
        if asked:
            with torch.inference_mode():
                lp = token_logprobs(logits[asked], torch.tensor([tokens[j] for j in asked], device=logits.device),
                                    max(rows[j].p.logprobs for j in asked))
            for j, t in zip(asked, _as_token_logprobs([tokens[j] for j in asked], *lp)):
                t.top = t.top[:rows[j].p.logprobs]
                chosen[j] = t
        for j, r in enumerate(rows):
            r.passes += 1
            if not finite[j]:
                self._fail(r, events)
                continue
            new = [] if ended[j] == "eos" else [tokens[j]]
            self._commit(r, new, events, keep_going=lambda r=r, t=tokens[j]: setattr(r, "pending", [t]),
                         ended=bool(ended[j]), logprobs=[chosen[j]] if j in chosen else None)

    # ---- forward + update: decoder ----------------------------------------------------------------------------
    def _open_canvas(self, r: Row) -> None:
        s = r.slot
        c = self.C
        r.canvas_index += 1
        r.canvas_open = True
        r.canvas_len = c
        self.canvas[s, :c] = torch.randint(0, self.V, (1, c), generator=r.gen, device=self.model.device)[0]
        self.fixed[s] = FREE
        if r.p.template is not None:  # the canvas's slice of the template, clamped into its first input
            part = r.p.template[len(r.out):len(r.out) + c]
            if part:
                self.fixed[s, :len(part)] = torch.tensor(part, device=self.model.device)
                self.canvas[s] = torch.where(self.fixed[s] >= 0, self.fixed[s], self.canvas[s])
        self.draft[s] = -1  # the argmax "before the first step" equals no real one (the reference's history: -1)
        self.soft[s].zero_()  # first step: no self-conditioning signal
        self.committed[s] = False
        r.canvas_logprobs = {}
        self.run_len[s] = 0
        self.step_i[s] = 0

    def _decoder_pass(self, rows: list[Row], events: dict[str, Event]) -> None:
        model, dev, c = self.model, self.model.device, self.C
        slots = torch.tensor([r.slot for r in rows], device=dev)
        pieces = [Piece(r.slot, self.pool.length[r.slot], c) for r in rows]
        t0 = time.perf_counter()
        with torch.inference_mode():
            canvas = self.canvas[slots]  # [D, C]
            e = model.embed(canvas.view(1, -1))
            h = model.self_conditioning(e, self.soft[slots].view(1, -1, e.shape[-1]))
            hidden = self.runner.run(pieces, h, encoder=False)[0]  # [D*C, H]
        self.timing["decoder_layers"] += time.perf_counter() - t0
        self.counters["decoder_passes"] += 1
        self.counters["decoder_rows"] += len(rows)
        by_conf = [j for j, r in enumerate(rows) if r.p.sampler == "confidence"]
        by_eb = [j for j, r in enumerate(rows) if r.p.sampler != "confidence"]
        for group, confidence in ((by_eb, False), (by_conf, True)):
            if group:
                self._update_canvases([rows[j] for j in group], hidden.view(len(rows), c, -1)[group], confidence,
                                      events)

    def _update_canvases(self, rows: list[Row], hidden: torch.Tensor, confidence: bool,
                         events: dict[str, Event]) -> None:
        """The update after a decoder pass, for rows of one sampler: hidden [g, C, H] -> this step's statistics,
        accepted positions, next canvas and soft embedding, stopping (`_accept`), then each finished canvas's
        committed tokens (`_finals`) and the events (`_report`). Every per-row setting is a tensor gathered by slot;
        the schedule, acceptance and stopping rules are sampler.py's."""
        s = torch.tensor([r.slot for r in rows], device=self.model.device)
        step_i, n = self.step_i[s], self.n_steps[s]
        temp = row_temperatures(n - step_i, n, self.t_min[s], self.t_span[s])  # [g] fp32, this step's
        st, noise = self._sample(rows, hidden, temp, confidence)
        if any(r.p.template is not None for r in rows):
            st = _clamp_stats(st, self.fixed[s].reshape(-1))
        up = self._accept(s, st, noise, confidence, step_i + 1, n)
        logit_rows = {}
        if any(r.matcher is not None for r in rows):
            logit_rows = self._guide(rows, hidden, temp, up.accepted, up.canvas, up.draft if confidence else None)
        self.canvas[s], self.draft[s], self.soft[s], self.step_i[s] = up.canvas, up.draft, st.soft, up.steps_done
        done_l, finite_l = up.done.tolist(), up.finite.tolist()
        draft_l = up.draft.tolist() if (any(r.p.drafts for r in rows) or any(done_l)) else None
        finals = self._finals(rows, done_l, finite_l, draft_l, logit_rows)
        if any(r.p.logprobs is not None for r in rows):
            self._score_canvases(rows, hidden, finals, finite_l, up.draft, up.committed)
        self._report(rows, up, temp, done_l, finite_l, draft_l, finals, events)

    def _sample(self, rows: list[Row], hidden: torch.Tensor, temp: torch.Tensor, confidence: bool,
                ) -> tuple[PositionStats, torch.Tensor]:
        """This step's per-position statistics (LM head, soft-cap, temperature, sampler: compiled or eager) and the
        renoising tokens [g, C]. Each row draws from its own generator in the reference's order: its uniforms, then
        its renoising tokens."""
        dev, C, V, g = self.model.device, self.C, self.V, len(rows)
        uniforms, noise = [], []
        for r in rows:
            if not confidence:
                uniforms.append(draw_uniforms(C, r.gen, dev))
            noise.append(torch.randint(0, V, (1, C), generator=r.gen, device=dev))
        u = None if confidence else torch.cat(uniforms)
        with torch.inference_mode():
            t0, head = time.perf_counter(), self.timing["head"]
            if self.compiled_sampler is not None:  # head, soft-cap and sampler in one graph (head time not split)
                am, drawn, ent, conf, soft = self.compiled_sampler.sampler_chunk(
                    hidden.reshape(g * C, -1), temp.repeat_interleave(C)[:, None], u, confidence)
                st = PositionStats(argmax=am, entropy=ent, sampled=drawn, confidence=conf, soft=soft.view(g, C, -1))
            else:
                st = position_stats(None, temp.repeat_interleave(C)[:, None], None, self.model, soft_from="raw",
                                    chunk=self.sampler_chunk, method=None if confidence else "inverse_cdf",
                                    confidence=confidence, uniforms=u, hidden=hidden, timing=self.timing)
        # the sampler's own time (the head's chunks are in timing["head"]; the update counts as overhead)
        self.timing["sampler"] += time.perf_counter() - t0 - (self.timing["head"] - head)
        return st, torch.cat(noise)

    def _accept(self, s: torch.Tensor, st: PositionStats, noise: torch.Tensor, confidence: bool,
                steps_done: torch.Tensor, n: torch.Tensor) -> CanvasUpdate:
        """The acceptance rule and stopping of the rows at slots `s`, as the reference loop applies them:
        commit-by-confidence (an even share of the canvas per step, `commit_quota`, plus every position above the
        commit threshold) or the entropy bound (the accepted samples kept, the rest renoised; done when the argmax
        canvas is stable and confident, `stable_run` + `confident_and_stable`, for rows that stop early). A row is
        also done at its last step (steps_done, n [g]: this canvas's steps with this one, and its step budget)."""
        g, C = s.shape[0], self.C
        canvas = self.canvas[s]
        committed = mean_h = h = None
        if confidence:
            conf = st.confidence.view(g, C)
            finite = torch.isfinite(conf).all(dim=-1)
            new_canvas, committed, draft = commit_confident(
                conf, st.argmax.view(g, C), canvas, self.committed[s], commit_quota(steps_done - 1, n, C)[:, None],
                self.commit_thr[s][:, None], self.V, None, noise=noise)
            accepted = committed
            self.committed[s] = committed
            done = committed.all(dim=-1)
        else:
            h = st.entropy.view(g, C)
            finite = torch.isfinite(h).all(dim=-1)
            accepted = accept_entropy_bound(h, self.bound[s][:, None])
            new_canvas = torch.where(accepted, st.sampled.view(g, C), noise)
            draft = st.argmax.view(g, C)
            mean_h = h.mean(dim=-1)
            run = stable_run(draft, self.draft[s], self.run_len[s])
            self.run_len[s] = run
            done = self.early[s] & confident_and_stable(mean_h, run, self.stab[s], self.conf_thr[s])
        return CanvasUpdate(canvas=new_canvas, draft=draft, accepted=accepted, committed=committed,
                            done=done | (steps_done >= n), finite=finite, steps_done=steps_done, mean_entropy=mean_h,
                            entropy=h)

    def _finals(self, rows: list[Row], done: list[bool], finite: list[bool], draft: list[list[int]] | None,
                logit_rows: dict) -> dict[int, tuple[list[int], list[int], bool]]:
        """The committed canvas of each finished row: its draft cut at max_new_tokens, walked through its grammar.
        -> {row index: (tokens to commit, the whole canvas, whether the grammar ended it)}."""
        finals = {}
        for j, r in enumerate(rows):
            if done[j] and finite[j]:
                tokens, ended = draft[j], False
                want = r.p.max_new_tokens - len(r.out)
                if r.matcher is not None:
                    tokens, ended = walk(r.matcher, tokens[:want], logit_rows[j])
                finals[j] = (tokens[:want], tokens, ended)
        return finals

    def _report(self, rows: list[Row], up: CanvasUpdate, temp: torch.Tensor, done: list[bool], finite: list[bool],
                draft: list[list[int]] | None, finals: dict, events: dict[str, Event]) -> None:
        """Each row's events of this step: a failure (non-finite logits), its draft when it asked for drafts, and
        the commit of a finished canvas (the canvas closes; the next encoder pass commits it)."""
        want_drafts = any(r.p.drafts for r in rows)
        steps = up.steps_done.tolist()
        acc = up.accepted.tolist() if want_drafts else None
        mean_h = up.mean_entropy.tolist() if up.mean_entropy is not None and want_drafts else None
        h = up.entropy.tolist() if up.entropy is not None and want_drafts else None  # per position, drafts only
        temps = temp.tolist()
        for j, r in enumerate(rows):
            r.passes += 1
            if not finite[j]:
                self._fail(r, events)
                continue
            if r.p.drafts:
                self._event(r, events).draft = Draft(
                    offset=len(r.out), canvas_index=r.canvas_index, step=steps[j], ids=draft[j], accepted=acc[j],
                    mean_entropy=None if mean_h is None else mean_h[j], entropy=None if h is None else h[j],
                    temperature=temps[j])
            if done[j]:
                r.canvas_open = False
                r.steps.append(steps[j])
                new, pending, ended = finals[j]
                lps = None if r.p.logprobs is None else [r.canvas_logprobs[i] for i in range(len(new))]
                self._commit(r, new, events, keep_going=lambda r=r, t=pending: setattr(r, "pending", t), ended=ended,
                             logprobs=lps)

    def _score_canvases(self, rows: list[Row], hidden: torch.Tensor, finals: dict, finite: list[bool],
                        draft: torch.Tensor, committed: torch.Tensor | None) -> None:
        """Log-probabilities of the committed diffusion tokens, for the rows that asked (params.logprobs).

        A committed token's log-probability is that of the model's raw distribution (log-softmax of the logits,
        temperature 1, as in AR mode) at its canvas position, at the denoising step that chose the token:
        - entropy-bound sampler: the canvas's last step (the committed canvas is that step's argmax);
        - confidence sampler: the step that committed the position (its proposal then), or a later one that
          changed the token (a grammar repair);
        - a grammar's repair at commit (the masked argmax of the last step): the last step. The distribution is
          the model's, before the grammar's mask, as in AR mode: a repaired token may be improbable, and the
          alternatives may include tokens the grammar refused;
        - a template's fixed position: its token under the model's distribution at the step that committed it
          (the point mass the sampler clamps it to is not reported).
        The top alternatives come from the same distribution, most probable first. This step's positions to score
        (finished canvases: every committed position whose token has no score yet; the confidence sampler's open
        canvases: the positions within max_new_tokens committed or changed this step) go through the LM head
        together, `sampler_chunk` at a time: only rows that asked pay, and no [rows, C, V] logits exist.
        hidden [g, C, H] this step's; finals: row -> (tokens committed, ...); draft, committed [g, C]."""
        C = self.C
        todo: list[tuple[int, int, int]] = []  # (row, position, token)
        open_rows = [j for j, r in enumerate(rows) if r.p.logprobs is not None and finite[j] and j not in finals]
        if committed is not None and open_rows:
            idx = torch.tensor(open_rows, device=draft.device)
            for j, toks, com in zip(open_rows, draft[idx].tolist(), committed[idx].tolist()):
                r = rows[j]
                seen, want = r.canvas_logprobs, r.p.max_new_tokens - len(r.out)  # past `want`: never committed
                todo += [(j, i, t) for i, (t, c) in enumerate(zip(toks[:want], com[:want]))
                         if c and (i not in seen or seen[i].token_id != t)]
        for j, (tokens, _, _) in finals.items():
            seen = rows[j].canvas_logprobs
            if rows[j].p.logprobs is not None:
                todo += [(j, i, t) for i, t in enumerate(tokens) if i not in seen or seen[i].token_id != t]
        if not todo:
            return
        model, dev, step = self.model, self.model.device, self.sampler_chunk
        top = max(rows[j].p.logprobs for j, _, _ in todo)
        flat = hidden.reshape(len(rows) * C, -1)
        where = torch.tensor([j * C + i for j, i, _ in todo], device=dev)
        t0 = time.perf_counter()
        scored: list[TokenLogprob] = []
        for a in range(0, len(todo), step):
            part = todo[a:a + step]
            ids = [t for _, _, t in part]
            with torch.inference_mode():
                logits = model.logits(self.runner.pad(flat[where[a:a + len(part)]]))[:len(part)]  # [n, V] fp32
                scored += _as_token_logprobs(ids, *token_logprobs(logits, torch.tensor(ids, device=dev), top))
        self.timing["head"] += time.perf_counter() - t0
        for (j, i, _), t in zip(todo, scored):
            t.top = t.top[:rows[j].p.logprobs]
            rows[j].canvas_logprobs[i] = t

    def _guide(self, rows: list[Row], hidden: torch.Tensor, temp: torch.Tensor, accepted: torch.Tensor,
               canvas: torch.Tensor, draft: torch.Tensor | None) -> dict:
        """Constrained rows (constrain.py, 1.): the leading accepted run of each row's next canvas (and of the
        confidence sampler's draft) made a valid prefix of its grammar, in place. Returns {row index: logits_at}
        for the commit walk: position i's processed logits [V] fp32, computed on first use (one canvas's head,
        the reference's own matmul, divided by the step's temperature as the sampler divides them)."""
        out = {}
        acc = accepted.tolist()
        for j, r in enumerate(rows):
            if r.matcher is None:
                continue
            cache = []

            def logits_at(i: int, j=j, cache=cache) -> torch.Tensor:
                if not cache:
                    with torch.inference_mode():
                        cache.append(self.model.logits(hidden[j]) / temp[j])
                return cache[0][i]

            out[j] = logits_at
            run = next((i for i, a in enumerate(acc[j]) if not a), len(acc[j]))
            tokens = canvas[j, :run].tolist()
            fixed = guide_run(r.matcher, tokens, logits_at)
            if fixed != tokens[:len(fixed)]:
                canvas[j, :len(fixed)] = torch.tensor(fixed, device=canvas.device)
                if draft is not None:
                    draft[j, :len(fixed)] = canvas[j, :len(fixed)]
        return out

    # ---- update: commits, finishes ----------------------------------------------------------------------------
    def _event(self, r: Row, events: dict[str, Event]) -> Event:
        ev = events.get(r.req.request_id)
        if ev is None:
            ev = events[r.req.request_id] = Event(r.req.request_id, prompt_tokens=len(r.req.prompt_ids))
        ev.completion_tokens, ev.decoder_passes = len(r.out), r.passes
        return ev

    def _commit(self, r: Row, new: list[int], events: dict[str, Event], keep_going, ended: bool = False,
                logprobs: list[TokenLogprob] | None = None) -> None:
        """Append committed tokens (cut at the first EOS) and their `logprobs` (one per token of `new`, cut with
        it: an EOS is never reported); finish the row on EOS, at the end of its grammar (`ended`) or at
        max_new_tokens, else call `keep_going` (which schedules the commit pass)."""
        eos = r.p.eos_token_ids or ()
        # inside a template's span EOS is filler, not the end (a hole may be shorter than its room)
        start = max(0, len(r.p.template) - len(r.out)) if r.p.template is not None else 0
        cut = next((i for i, t in enumerate(new) if i >= start and t in eos), None)
        r.out.extend(new if cut is None else new[:cut])
        self.counters["tokens"] += len(new) if cut is None else cut
        ev = self._event(r, events)
        ev.new_ids.extend(new if cut is None else new[:cut])
        if logprobs is not None:
            ev.new_logprobs.extend(logprobs if cut is None else logprobs[:cut])
        if cut is not None or ended:
            self._finish(r, ev, "stop")
        elif len(r.out) >= r.p.max_new_tokens:
            self._finish(r, ev, "length")
        else:
            keep_going()

    def _fail(self, r: Row, events: dict[str, Event]) -> None:
        ev = self._event(r, events)
        self._finish(r, ev, "error")
        ev.error = (f"the model produced non-finite logits (NaN or inf) for request {r.req.request_id!r} at "
                    f"{len(r.out)} generated tokens; its weights may be corrupt or the dtype overflowed "
                    "(try --dtype float32)")

    def _finish(self, r: Row, ev: Event, reason: str) -> None:
        ev.finished, ev.finish_reason = True, reason
        ev.completion_tokens, ev.decoder_passes = len(r.out), r.passes
        ev.steps_per_canvas = list(r.steps)
        self.by_id.pop(r.req.request_id, None)
        self._release(r)

    def _release(self, r: Row) -> None:
        if self.rows.get(r.slot) is r:
            del self.rows[r.slot]
            self.runner.slot_adapter.pop(r.slot, None)
            self.pool.free(r.slot)
            self.free_slots.append(r.slot)


def _clamp_stats(st: PositionStats, fixed: torch.Tensor) -> PositionStats:
    """The sampler's results with every fixed position ([n] ids, FREE elsewhere) a point mass on its token: what
    `sampler.clamp_fixed` does to the logits, applied to the results (the engine never holds the logits). Entropy
    0, top probability 1, sampled and argmax the token; the self-conditioning embedding stays the model's."""
    mask = fixed >= 0
    tok = fixed.clamp(min=0)

    def pick(x: torch.Tensor | None, value) -> torch.Tensor | None:
        return None if x is None else torch.where(mask, value, x)

    return PositionStats(argmax=pick(st.argmax, tok), entropy=pick(st.entropy, 0.0), sampled=pick(st.sampled, tok),
                         confidence=pick(st.confidence, 1.0), soft=st.soft)


def _as_token_logprobs(ids: list[int], chosen: torch.Tensor, values: torch.Tensor,
                       top_ids: torch.Tensor) -> list[TokenLogprob]:
    """sampler.token_logprobs' tensors ([n], [n, k], [n, k]) as one TokenLogprob per id."""
    return [TokenLogprob(t, c, list(zip(i, v))) for t, c, v, i in
            zip(ids, chosen.tolist(), values.tolist(), top_ids.tolist())]


# ---------------------------------------------------------------------------------------------------------------
# One-shot generation on the engine (generate.generate_diffusion / generate_ar with engine="fast")


def _memory_limit() -> int:
    """Half the machine's physical memory: a one-shot call whose K/V would need more is refused up front."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def generate_batch(model: DiffusionGemma, prompts: list[list[int]], params: list[SamplingParams],
                   stop_fn=None, on_step=None, compile: bool = False, sampler_chunk: int | None = None,
                   grammars: Grammars | None = None, sink=None):
    """Run every prompt as its own request on a fresh engine sized for exactly these requests; returns a
    GenerationOutput (rows in prompt order). `stop_fn(row, tokens) -> cut | None` runs after each commit;
    `on_step(canvas, step, [row], argmax [1, C], accepted [1, C])` after each denoising step. `grammars`: the
    tokenizer's grammar compiler, for params with a grammar. `sink`: an object told what happens as it happens
    (a trajectory recorder): `sink.draft(row, draft)` after every denoising step, `sink.commit(row, offset, ids)`
    for every commit, after a stop string's cut."""
    t0 = time.perf_counter()
    mc = model.config
    C = mc.canvas_length
    need = max(len(ids) + (math.ceil(p.max_new_tokens / C) * C if p.mode == "diffusion" else p.max_new_tokens)
               for ids, p in zip(prompts, params))
    if need > mc.max_position_embeddings:
        raise RequestError(f"the longest prompt plus max_new_tokens needs {need} positions, over the model's "
                           f"max_position_embeddings={mc.max_position_embeddings}; shorten the prompt or lower "
                           "max_new_tokens")
    B = len(prompts)
    room = max(PREFILL_SPAN, C)
    nbytes = KVPool.nbytes(mc, B, need, room, model.dtype)
    if nbytes > _memory_limit():
        raise RequestError(f"{B} rows of {need} positions need {nbytes / 2**30:.1f} GiB of K/V, more than half this "
                           "machine's memory; lower max_new_tokens or the batch size")
    eng = Engine(model, EngineConfig(max_batch=B, max_model_len=need, kv_memory_mb=nbytes / 2**20 + 1,
                                     prefill_chunk=PREFILL_SPAN, max_queue=B, compile=compile,
                                     sampler_chunk=sampler_chunk), grammars=grammars)
    if on_step is not None or sink is not None:
        params = [p.with_(drafts=True) for p in params]
    for i, (ids, p) in enumerate(zip(prompts, params)):
        eng.add(Request(str(i), list(ids), p))
    out: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(B)]  # params.logprobs: one per token of `out`
    reasons, passes = ["length"] * B, [0] * B
    steps: list[list[int]] = [[] for _ in range(B)]
    first = None
    while eng.has_work():
        for ev in eng.step():
            r = int(ev.request_id)
            passes[r] = ev.decoder_passes
            if ev.draft is not None:
                d = ev.draft
                if sink is not None:
                    sink.draft(r, d)
                if on_step is not None:
                    on_step(d.canvas_index, d.step - 1, [r], torch.tensor([d.ids]), torch.tensor([d.accepted]))
            cut = None
            if ev.new_ids:
                first = first if first is not None else time.perf_counter() - t0
                before = len(out[r])
                out[r].extend(ev.new_ids)
                logprobs[r].extend(ev.new_logprobs)
                # a stop string cuts unless EOS already ended the row (its text is trimmed by the caller)
                if stop_fn is not None and (not ev.finished or ev.finish_reason == "length"):
                    cut = stop_fn(r, out[r])
                if cut is not None:
                    del out[r][cut:], logprobs[r][cut:]
                if sink is not None:
                    sink.commit(r, before, out[r][before:])
                if cut is not None and not ev.finished:
                    reasons[r] = "stop"
                    steps[r] = list(eng.by_id[str(r)].steps)
                    eng.abort(str(r))
                    continue
            if ev.finished:
                if ev.finish_reason == "error":
                    raise RequestError(ev.error)
                reasons[r] = "stop" if cut is not None else ev.finish_reason
                steps[r] = ev.steps_per_canvas
    stats = GenerationStats(decoder_passes=passes, encoder_passes=eng.counters["encoder_passes"],
                            steps_per_canvas=steps if any(p.mode == "diffusion" for p in params) else [],
                            new_tokens=[len(t) for t in out], seconds=time.perf_counter() - t0,
                            first_token_seconds=first)
    return GenerationOutput(sequences=None, tokens=out, finish_reasons=reasons, stats=stats,
                            logprobs=logprobs if any(p.logprobs is not None for p in params) else None)
