"""Compiled (inductor), fixed-shape pieces of the engine's layer pass (used when `EngineConfig(compile=True)`).

Why: on a CPU a small model's layer pass is per-operation overhead (thousands of aten calls per step, each a few
microseconds), not arithmetic. Inductor fuses the norms, rotary embeddings, projections' epilogues and the
feed-forward into a few kernels. Attention stays eager in the engine (every row has its own key length).

    layers = CompiledLayers(model)                  # compiles lazily, one graph per (piece, layer shape, bucket)
    layers.warm([32, 64])                           # optional: compile those buckets now
    n = layers.bucket(N)                            # pad h to n rows (copies of the last row) to skip the copies
    q, k, v = layers.pre_attention(i, h, cos, sin)  # h [1, N, H], cos/sin [N, d] -> [1, nh|nkv, N, d]
    h = layers.post_attention(i, h, o, encoder)     # o [1, nh, N, d] (attention output before o_proj)
    h = layers.final_norm(h)

Shapes: N moves from step to step, so every piece pads N up to a bucket (`bucket`: powers of two up to
`BUCKET_STEP`, then its multiples) with copies of the last real row and slices the result back; a caller that
already holds `bucket(N)` rows pays no copy. Each graph is specialised on its bucket and shared by every layer of
the same shapes: weights are arguments, not constants, so four layers of two types compile two graphs per piece
and bucket. `compilations` counts the graphs compiled so far; once the buckets in use are warm it stops moving.

The experts: `mix_experts` groups tokens by expert with a data-dependent count (`.tolist()`), which would break a
graph. Two formulations:
- dense: every token through every expert (two plain matmuls over the experts' weights side by side), weighted by
  a [N, E] matrix that is zero outside its top-k: E / k times the expert arithmetic, one graph for the whole
  feed-forward. Only for few float experts (`use_dense_experts`: at the released 128 experts top-8 it would do 16
  times the work) and small buckets (`dense_rows`), where it beats the eager loop's per-expert overhead.
- split: a compiled graph up to the router and the expert input norm, the model's own eager `experts(...)` (float
  or int8), and a compiled graph after. Everywhere else.

Graphs are traced with make_fx and compiled by inductor directly (`torch._inductor.compile`), not through
torch.compile's dynamo frontend: the dispatch is one dict lookup by shape, instead of dynamo's guard checks over a
few dozen weight arguments and a chain of cached graphs (which cost more than the fusion saved at small N).

Each piece is tested against the model's eager modules (tests/test_compiled.py); benchmarks/compiled_pieces.py
measures them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from dgemma.model import (
    DiffusionGemma,
    Experts,
    Layer,
    apply_rope,
    dense_mix_experts,
    rms_norm,
    route,
    uses_dense_experts,
)
from dgemma.quant import Int8Linear, int8_linear

BUCKET_STEP = 32  # bucket granularity in rows (a canvas is 32 positions in the shipped presets)
DENSE_MAX_ROWS = 32  # dense expert mixing (model.uses_dense_experts) only for buckets up to this many rows (above,
# the extra expert arithmetic costs more than the eager per-expert loop's overhead: bundled model, 1 thread,
# dense = split at 64 rows, dense 1.17x slower at 512)


def compiler_available() -> str | None:
    """None when torch.compile's CPU backend can run here, else the reason it cannot (no C++ compiler)."""
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return "torch.compile's inductor CPU backend needs a C++ compiler (g++, c++ or clang++) on PATH; none found"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Pure functions over weight tensors, compiled once per shape and shared across layers. They compose the model's own
# pure functions (model.rms_norm, apply_rope, route, dense_mix_experts); only the wiring of a layer is written here,
# over weight tuples instead of modules, so that int8 weights and fp32 weights trace the same code.
Lin = tuple  # a linear's weights: (weight [out, in],) or (int8 [out, in], scale [out])


def _lin(x: torch.Tensor, w: Lin) -> torch.Tensor:
    return F.linear(x, w[0]) if len(w) == 1 else int8_linear(x, w[0], w[1])


def _pre_attention(h, cos, sin, pw: PreW, eps: float):
    """input_layernorm + Attention.project: h [1, N, H] -> q [1, nh, N, d], k, v [1, nkv, N, d]."""
    B, T, _ = h.shape
    x = rms_norm(h, pw.ln, eps)
    q = _lin(x, pw.q_w).view(B, T, pw.num_heads, -1)
    d = q.shape[-1]
    q = apply_rope(rms_norm(q, pw.q_norm, eps), cos, sin)
    k_raw = _lin(x, pw.k_w).view(B, T, pw.num_kv_heads, d)
    v_raw = _lin(x, pw.v_w).view(B, T, pw.num_kv_heads, d) if pw.v_w is not None else k_raw
    k = apply_rope(rms_norm(k_raw, pw.k_norm, eps), cos, sin).transpose(1, 2)
    return q.transpose(1, 2), k, rms_norm(v_raw, None, eps).transpose(1, 2)


def _router(r, rw: RouterW, eps: float):
    """model.Router.forward: r [N, H] -> weights [N, k] fp32, expert ids [N, k]."""
    return route(rms_norm(r, None, eps), rw.scale, rw.proj, rw.per_expert_scale, rw.top_k)


def _ffn_in(h, o, lw: LayerW, eps: float):
    """Everything of o_proj + Layer.after_attention before the experts, given the attention output o [1, nh, N, d]:
    returns (r [1, N, H], m1 [1, N, H], expert input [N, H], weights [N, k] fp32, ids [N, k])."""
    a = _lin(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1), lw.o_w)
    r = h + rms_norm(a, lw.post_attention_ln, eps)
    x1 = rms_norm(r, lw.pre_ff_ln, eps)
    m1 = rms_norm(_lin(F.gelu(_lin(x1, lw.gate_w), approximate="tanh") * _lin(x1, lw.up_w), lw.down_w),
              lw.post_ff_ln_1, eps)
    flat = r.reshape(-1, r.shape[-1])
    w, idx = _router(flat, lw.router, eps)
    return r, m1, rms_norm(flat, lw.pre_ff_ln_2, eps), w, idx


def _ffn_out(r, m1, m2, scalar, lw: LayerW, eps: float):
    """The rest of Layer.after_attention, given the experts' output m2 [N, H]."""
    m2 = rms_norm(m2.reshape(r.shape), lw.post_ff_ln_2, eps)
    return (r + rms_norm(m1 + m2, lw.post_ff_ln, eps)) * scalar


def _post_attention_dense(h, o, scalar, weights: tuple[LayerW, DenseW], eps: float):
    lw, dw = weights
    r, m1, x2, w, idx = _ffn_in(h, o, lw, eps)
    return _ffn_out(r, m1, dense_mix_experts(x2, w, idx, dw.num_experts, dw.gate_up, dw.down), scalar, lw, eps)


def _final_norm(h, w, eps: float):
    return rms_norm(h, w, eps)


# ---------------------------------------------------------------------------------------------------------------
# Weights gathered once per layer (references to the model's own tensors; the dense experts' down matrix is a copy)
class RouterW(NamedTuple):
    proj: torch.Tensor  # [E, H]
    scale: torch.Tensor  # [H]
    per_expert_scale: torch.Tensor  # [E]
    top_k: int


class LayerW(NamedTuple):
    o_w: Lin
    post_attention_ln: torch.Tensor
    pre_ff_ln: torch.Tensor
    gate_w: Lin
    up_w: Lin
    down_w: Lin
    post_ff_ln_1: torch.Tensor
    router: RouterW
    pre_ff_ln_2: torch.Tensor
    post_ff_ln_2: torch.Tensor
    post_ff_ln: torch.Tensor


class DenseW(NamedTuple):
    gate_up: torch.Tensor  # [E * 2I, H]: expert e's gate rows then up rows (a view of Experts.gate_up_proj)
    down: torch.Tensor  # [H, E * I]: expert e's down_proj in columns e*I .. (e+1)*I (a copy)
    num_experts: int


class PreW(NamedTuple):
    ln: torch.Tensor
    q_w: Lin
    k_w: Lin
    v_w: Lin | None
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    num_heads: int
    num_kv_heads: int


def _lin_weights(m) -> Lin:
    if isinstance(m, Int8Linear):
        return (m.weight_int8, m.scale)
    return (m.weight,)


def _pre_weights(layer: Layer) -> PreW:
    attn = layer.self_attn
    return PreW(layer.input_layernorm.weight, _lin_weights(attn.q_proj), _lin_weights(attn.k_proj),
                _lin_weights(attn.v_proj) if attn.v_proj is not None else None, attn.q_norm.weight,
                attn.k_norm.weight, attn.num_heads, attn.num_kv_heads)


def _post_weights(layer: Layer) -> LayerW:
    attn, rt = layer.self_attn, layer.router
    return LayerW(
        o_w=_lin_weights(attn.o_proj), post_attention_ln=layer.post_attention_layernorm.weight,
        pre_ff_ln=layer.pre_feedforward_layernorm.weight, gate_w=_lin_weights(layer.mlp.gate_proj),
        up_w=_lin_weights(layer.mlp.up_proj), down_w=_lin_weights(layer.mlp.down_proj),
        post_ff_ln_1=layer.post_feedforward_layernorm_1.weight,
        router=RouterW(rt.proj.weight, rt.scale, rt.per_expert_scale, rt.top_k),
        pre_ff_ln_2=layer.pre_feedforward_layernorm_2.weight, post_ff_ln_2=layer.post_feedforward_layernorm_2.weight,
        post_ff_ln=layer.post_feedforward_layernorm.weight)


@torch.no_grad()
def _dense_weights(experts: Experts) -> DenseW:
    gu, down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
    E, H, I = down.shape
    return DenseW(gu.detach().reshape(E * 2 * I, H), down.detach().permute(1, 0, 2).reshape(H, E * I).contiguous(), E)


def use_dense_experts(model: DiffusionGemma) -> bool:
    """Dense expert mixing: float experts, few of them (`model.uses_dense_experts`)."""
    cfg = model.config
    return (all(type(layer.experts) is Experts for layer in model.layers)
            and uses_dense_experts(cfg.num_experts, cfg.top_k_experts))


class _Weights:
    """One piece's weights for one layer, flattened once: the tensors (graph inputs) and how to rebuild the
    structure around them. `kind` is equal for layers whose graphs are interchangeable."""

    def __init__(self, piece: str, struct):
        leaves, self.spec = tree_flatten(struct)
        self.leaves = leaves
        self.slots = [j for j, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.tensors = [leaves[j] for j in self.slots]
        consts = tuple(x for x in leaves if not isinstance(x, torch.Tensor))
        self.kind = (piece, str(self.spec), consts,
                     tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in self.tensors))

    def rebuild(self, tensors):
        leaves = list(self.leaves)
        for j, t in zip(self.slots, tensors):
            leaves[j] = t
        return tree_unflatten(leaves, self.spec)


def _pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """x with copies of its last entry along `dim` appended up to n (contiguous)."""
    real = x.shape[dim]
    if real == n:
        return x.contiguous()
    shape = list(x.shape)
    shape[dim] = n - real
    return torch.cat([x, x.narrow(dim, real - 1, 1).expand(shape)], dim=dim)


class _Graphs:
    """Compiled graphs by (weights kind, constants, activation shapes): traced with make_fx, compiled by inductor on
    first use, then one dict lookup per call."""

    def __init__(self):
        self._graphs: dict[tuple, Callable] = {}
        self.compile_seconds: dict[tuple, float] = {}  # same keys: time spent tracing and compiling each

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, fn, acts: list[torch.Tensor], w: _Weights, *consts):
        """fn(*acts, weights structure, *consts) through the compiled graph for these shapes (compiled on first use)."""
        key = (w.kind, consts, tuple((tuple(a.shape), a.dtype) for a in acts))
        graph = self._graphs.get(key)
        with torch.inference_mode():
            if graph is None:
                t0 = time.perf_counter()
                n_acts = len(acts)

                def flat(*ts):
                    out = fn(*ts[:n_acts], w.rebuild(ts[n_acts:]), *consts)
                    return tuple(out) if isinstance(out, tuple) else (out,)

                # The graph is specialised to the aliasing of its example inputs (aliased inputs are traced as one):
                # trace with activations that alias nothing, as at run time.
                seen = {t.untyped_storage().data_ptr() for t in w.tensors}
                examples = []
                for a in acts:
                    ptr = a.untyped_storage().data_ptr()
                    examples.append(a.clone() if ptr in seen else a)
                    seen.add(ptr)
                inputs = [*examples, *w.tensors]
                graph = self._graphs[key] = torch._inductor.compile(make_fx(flat)(*inputs), inputs)
                self.compile_seconds[key] = time.perf_counter() - t0
            return graph(*acts, *w.tensors)


# ---------------------------------------------------------------------------------------------------------------
class CompiledLayers:
    """Compiled pre-attention, post-attention and final-norm pieces of `model`'s layers, padded to row buckets.

    Inference only (graphs are traced and run under inference mode). smallest: the smallest bucket (use the
    engine's batch-invariant `min_rows`, so padded matmuls keep that mode's row count); min_rows: passed to the
    eager experts in split mode. dense_experts: None decides by `use_dense_experts`; dense mixing is used for
    buckets of at most `dense_rows` rows, split mixing above.

    The weights are the model's own tensors, gathered at construction (the dense experts' down matrices are
    copies): a model whose weights are replaced or changed afterwards (quantised, cast, trained) needs a new
    instance."""

    def __init__(self, model: DiffusionGemma, smallest: int = 1, step: int = BUCKET_STEP,
                 dense_experts: bool | None = None, dense_rows: int = DENSE_MAX_ROWS, min_rows: int = 0):
        why = compiler_available()
        if why is not None:
            raise RuntimeError(why)
        self.model = model
        self.eps = model.config.rms_norm_eps
        self.smallest, self.step = max(1, smallest), step
        self.min_rows = min_rows
        self.dense = use_dense_experts(model) if dense_experts is None else dense_experts
        if self.dense and not all(type(layer.experts) is Experts for layer in model.layers):
            raise ValueError("dense_experts=True needs float `Experts` in every layer (this model's are quantised)")
        self.dense_rows = dense_rows
        self._pre_w = [_Weights("pre", _pre_weights(layer)) for layer in model.layers]
        self._ffn_w = [_Weights("ffn", _post_weights(layer)) for layer in model.layers]
        self._dense_w = ([_Weights("post", (_post_weights(layer), _dense_weights(layer.experts)))
                          for layer in model.layers] if self.dense else None)
        self._norm_w = _Weights("norm", model.norm.weight)
        self.graphs = _Graphs()

    # ---- shapes ----
    def bucket(self, n: int) -> int:
        """Rows a pass of n rows is padded to: at least `smallest`; powers of two up to `step`, then the next
        multiple of `step`."""
        n = max(n, self.smallest)
        if n <= self.step:
            return 1 << (n - 1).bit_length()
        return -(-n // self.step) * self.step

    @property
    def compilations(self) -> int:
        """Graphs compiled so far (one per piece, layer kind and bucket); constant once every bucket in use is warm."""
        return len(self.graphs)

    # ---- pieces ----
    def pre_attention(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_layernorm + self_attn.project of layer i: h [1, N, H], cos/sin [N, d] -> q [1, nh, N, d],
        k, v [1, nkv, N, d]."""
        N = h.shape[1]
        n = self.bucket(N)
        acts = [_pad(h, n, 1), _pad(cos, n, 0), _pad(sin, n, 0)]
        q, k, v = self.graphs.run(_pre_attention, acts, self._pre_w[i], self.eps)
        if n == N:
            return q, k, v
        return q[:, :, :N], k[:, :, :N], v[:, :, :N]

    def post_attention(self, i: int, h: torch.Tensor, o: torch.Tensor, encoder: bool) -> torch.Tensor:
        """o_proj + Layer.after_attention of layer i: h [1, N, H], o [1, nh, N, d] (attention output before o_proj)
        -> h [1, N, H]."""
        layer = self.model.layers[i]
        scalar = layer.encoder_layer_scalar if encoder else layer.layer_scalar
        N = h.shape[1]
        n = self.bucket(N)
        hp, op = _pad(h, n, 1), _pad(o, n, 2)
        if self.dense and n <= self.dense_rows:
            out, = self.graphs.run(_post_attention_dense, [hp, op, scalar], self._dense_w[i], self.eps)
        else:
            r, m1, x2, w, idx = self.graphs.run(_ffn_in, [hp, op], self._ffn_w[i], self.eps)
            with torch.inference_mode():
                m2 = layer.experts(x2, w, idx, self.min_rows)
            out, = self.graphs.run(_ffn_out, [r, m1, m2, scalar], self._ffn_w[i], self.eps)
        return out if n == N else out[:, :N]

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """model.norm: h [1, N, H] -> [1, N, H]."""
        N = h.shape[1]
        n = self.bucket(N)
        out, = self.graphs.run(_final_norm, [_pad(h, n, 1)], self._norm_w, self.eps)
        return out if n == N else out[:, :N]

    def warm(self, buckets) -> None:
        """Compile every piece of every layer for these row counts now (each is rounded up to its bucket)."""
        m = self.model
        H = m.config.hidden_size
        with torch.inference_mode():
            for n in sorted({self.bucket(b) for b in buckets}):
                h = torch.zeros(1, n, H, device=m.device, dtype=m.dtype)
                for i, layer in enumerate(m.layers):
                    attn = layer.self_attn
                    cos = torch.ones(n, attn.head_dim, device=m.device, dtype=m.dtype)
                    o = torch.zeros(1, attn.num_heads, n, attn.head_dim, device=m.device, dtype=m.dtype)
                    self.pre_attention(i, h, cos, torch.zeros_like(cos))
                    self.post_attention(i, h, o, encoder=False)
                self.final_norm(h)


# ---------------------------------------------------------------------------------------------------------------
# The sampler's work on a chunk of canvas positions: LM head, soft-cap, and position_stats' per-position results
class HeadW(NamedTuple):
    head: Lin  # hidden [., H] -> raw logits [., V]: the tied embedding (or model.head_matmul's int8 copy)
    soft: Lin  # probs [., V] -> [., H]: the embedding transposed (or model.soft_matmul's int8 copy)
    embed_scale: torch.Tensor  # [] fp32
    cap: float | None


SAMPLE_BLOCK = 64  # tokens per block of the two-level inverse-CDF search (the vocabulary size must be a multiple)


def _draw(e: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """sampler.sample_inverse_cdf on unnormalised probabilities e [n, V] (fp32): the first token whose cumulative
    sum reaches u times the row total, found in two levels (block sums, then one block's cumulative sum) instead of
    a cumulative sum over all of V, which inductor leaves to a sequential aten kernel. The cumulative sums round
    differently from the reference's single pass, so a draw within rounding (~1e-7 relative) of a boundary between
    two tokens may pick its neighbour."""
    n, V = e.shape
    if V % SAMPLE_BLOCK:
        cdf = e.cumsum(dim=-1)
        return torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=V - 1)
    blocks = e.view(n, V // SAMPLE_BLOCK, SAMPLE_BLOCK)
    ends = blocks.sum(-1).cumsum(-1)  # [n, V / B] cumulative sum at each block's end
    target = uniforms * ends[:, -1]  # [n]
    b = (ends < target[:, None]).sum(-1).clamp(max=ends.shape[1] - 1)  # the block holding the target
    before = torch.where(b > 0, ends.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    inner = blocks.gather(1, b[:, None, None].expand(n, 1, SAMPLE_BLOCK))[:, 0].cumsum(-1) + before[:, None]
    return b * SAMPLE_BLOCK + (inner < target[:, None]).sum(-1).clamp(max=SAMPLE_BLOCK - 1)


def _sampler_chunk(hidden, temperature, uniforms, hw: HeadW, confidence: bool):
    """model.logits + static.position_stats(soft_from="raw", method="inverse_cdf" or, with confidence, None) on
    hidden [n, H], temperature [n, 1] fp32, uniforms [n] (unused with confidence).

    The same quantities with fewer passes over the [n, V] logits: one exponential per logit for the processed
    softmax (whose sums give the log-sum-exp, the entropy and the draw) and one for the raw softmax of the soft
    embedding, normalised after the product ([n, V] x [V, H], then / [n, 1])."""
    dtype = hidden.dtype
    raw = _lin(hidden, hw.head).float()
    if hw.cap is not None:
        raw = torch.tanh(raw / hw.cap) * hw.cap
    proc = raw / temperature
    top, argmax = proc.max(dim=-1, keepdim=True)  # [n, 1]
    shifted = proc - top  # <= 0
    e = shifted.exp()  # [n, V] unnormalised softmax(proc)
    total = e.sum(-1)  # [n]
    log_total = total.log()
    sampled = entropy = conf = None
    if confidence:
        conf = (-log_total).exp()  # max of softmax(proc) = exp(top - logsumexp)
    else:
        entropy = log_total - (e * shifted).sum(-1) / total  # -sum p log p, p = e / total
        sampled = _draw(e, uniforms)
    if dtype == torch.float32:
        er = (raw - raw.amax(dim=-1, keepdim=True)).exp()
        soft = _lin(er, hw.soft) / er.sum(-1, keepdim=True)
    else:  # the reference rounds the probabilities to the model dtype before the product
        soft = _lin(F.softmax(raw.to(dtype), dim=-1, dtype=torch.float32).to(dtype), hw.soft)
    return argmax[:, 0], sampled, entropy, conf, soft * hw.embed_scale.to(dtype)


class CompiledSampler:
    """The diffusion sampler's per-position work on hidden states, compiled: LM head + soft-cap + argmax, the
    inverse-CDF draw and entropy (or the confidence), and the next step's soft embedding, `chunk` rows at a time
    (the last chunk padded to a power of two), so no [rows, V] logits tensor outlives a chunk."""

    def __init__(self, model: DiffusionGemma, chunk: int = 64):
        why = compiler_available()
        if why is not None:
            raise RuntimeError(why)
        self.model, self.chunk = model, chunk
        E = model.embed_tokens.weight
        head = _lin_weights(model.head_matmul) if model.head_matmul is not None else (E,)
        # soft = probs @ E, as F.linear(probs, E^T): a [H, V] weight; the transposed view is not copied
        soft = _lin_weights(model.soft_matmul) if model.soft_matmul is not None else (E.t(),)
        self._w = _Weights("sampler", HeadW(head, soft, model.embed_scale, model.config.final_logit_softcapping))
        self.graphs = _Graphs()

    @property
    def compilations(self) -> int:
        """Graphs compiled so far (one per bucket and sampler kind)."""
        return len(self.graphs)

    def bucket(self, n: int) -> int:
        return min(self.chunk, 1 << (n - 1).bit_length())

    def sampler_chunk(self, hidden: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor | None,
                      confidence: bool):
        """hidden [n, H], temperature [n, 1] fp32, uniforms [n] in (0, 1] (None with confidence) ->
        (argmax [n], sampled [n] | None, entropy [n] fp32 | None, confidence [n] fp32 | None, soft [n, H]), soft
        with the embedding scale applied: position_stats(model.logits(hidden[None]), temperature, None, model,
        soft_from="raw", method=None if confidence else "inverse_cdf", confidence=confidence, uniforms=uniforms)."""
        n = hidden.shape[0]
        if uniforms is None:
            uniforms = torch.ones(n, dtype=torch.float32, device=hidden.device)
        temperature = temperature.reshape(n, 1).to(torch.float32)
        outs = []
        for s in range(0, n, self.chunk):
            part = [x[s:s + self.chunk] for x in (hidden, temperature, uniforms)]
            m = part[0].shape[0]
            b = self.bucket(m)
            part = [_pad(x, b, 0) for x in part]
            res = self.graphs.run(_sampler_chunk, part, self._w, confidence)
            outs.append([None if r is None else r[:m] for r in res])
        return tuple(None if outs[0][j] is None else torch.cat([o[j] for o in outs]) for j in range(5))
