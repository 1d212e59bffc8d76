"""The DiffusionGemma text model: one set of weights, used as a causal encoder and as a bidirectional denoiser.

Reads top to bottom: norms, rotary embeddings, attention, dense MLP, router and experts, the layer,
self-conditioning, the model. The math follows the spec (`shared/spec/diffusiongemma.md`, part A2/A3):

    encode(ids, cache)              causal over cache + ids, writes K/V into `cache`  -> hidden [B, T, H]
    denoise(canvas, cache, sc)      bidirectional over cache + canvas, reads `cache`  -> logits [B, C, V] fp32
    logits(hidden)                  tied LM head + fp32 soft-cap

The model holds no inference state; the cache is an explicit argument. Module names follow the Hugging Face
checkpoint (`model.decoder.*`), so the checkpoint map is close to the identity (see checkpoint.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.cache import KVCache
from dgemma.config import FULL, SLIDING, ModelConfig

Masks = dict[str, torch.Tensor | None]  # per layer type: bool [B|1, 1, Tq, Tk] (True = may attend) or None


# ---------------------------------------------------------------------------------------------------------------
# Norms
class RMSNorm(nn.Module):
    """RMS norm computed in fp32; the weight multiplies directly (no `1 + w`). `with_scale=False` has no weight."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        # fp32 CPU scalars for the fast path (not buffers: a dtype cast of the module must not round them; on the
        # CPU even when the model is built on the meta device, as checkpoint loading does)
        self._eps = torch.tensor(eps, dtype=torch.float32, device="cpu")
        self._count = torch.tensor(float(dim), dtype=torch.float32, device="cpu")
        self._dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] == self._dim
                and not torch.is_grad_enabled()):
            # Inference: the same arithmetic in fewer operator calls (no no-op casts; CPU `mean` is `sum` then `div_`
            # by the count, here with tensor scalars, since a Python scalar costs a conversion per call; in place).
            # tests/test_model.py checks it bit for bit against the general path below.
            v = x.pow(2).sum(-1, keepdim=True).div_(self._count).add_(self._eps)
            y = x * v.pow_(-0.5)
            return y if self.weight is None else y * self.weight
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`RMSNorm`'s arithmetic as a pure function (fp32 inside, the input's dtype out; no weight when None): the
    module's general path, and what the engine's compiled pieces trace."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


# ---------------------------------------------------------------------------------------------------------------
# Rotary embeddings (no weights; computed from positions)
def rope_inv_freq(config: ModelConfig, layer_type: str) -> torch.Tensor:
    """Inverse frequencies `[d/2]` fp32. Full layers use proportional RoPE: only the first
    `floor(p*D/2)` pairs rotate, with exponents over the full head dim D; the rest have frequency 0."""
    if layer_type == SLIDING:
        d, theta, rotated = config.head_dim, config.sliding_rope_theta, config.head_dim // 2
    else:
        d, theta = config.global_head_dim, config.full_rope_theta
        rotated = int(config.full_partial_rotary_factor * d // 2)
    inv = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / d))
    return torch.cat([inv, torch.zeros(d // 2 - rotated)])


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos/sin `[T, d]` for integer positions `[T]` (shared by every row of the batch)."""
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, n, d]; rotate-half pairing (element j with j + d/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---------------------------------------------------------------------------------------------------------------
# Attention
class Attention(nn.Module):
    """Sliding layers: q/k/v projections. Full layers: no v_proj, values are the raw key projection."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        H, nh = config.hidden_size, config.num_attention_heads
        self.head_dim, self.num_kv_heads = config.layer_head_dim(layer), config.layer_kv_heads(layer)
        self.num_heads = nh
        self.q_proj = nn.Linear(H, nh * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=False) if config.is_sliding(layer) else None
        self.o_proj = nn.Linear(nh * self.head_dim, H, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, config.rms_norm_eps, with_scale=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] (already input-normed) -> q [B, nh, T, d], k and v [B, nkv, T, d] (normed, k and q rotated)."""
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)), cos, sin)
        k_raw = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v_raw = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        return q.transpose(1, 2), k, self.v_norm(v_raw).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q [B, nh, T, d] over k/v [B, nkv, S, d] -> output [B, T, H]."""
        # Scaling is exactly 1: the q/k norms replace 1/sqrt(d).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H], already input-normed
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix: tuple[torch.Tensor | None, torch.Tensor | None],  # cached K/V [B, nkv, S, d] or (None, None)
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the attention output `[B, T, H]` and the keys/values attended to (prefix + new)."""
        q, k, v = self.project(x, cos, sin)
        pk, pv = prefix
        if pk is not None:
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        return self.attend(q, k, v, mask), k, v


# ---------------------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP, router, packed experts
class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Router(nn.Module):
    """Softmax over all experts (fp32), top-k, renormalised to 1, times a per-expert scale."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H = config.hidden_size
        self.top_k = config.top_k_experts
        self.norm = RMSNorm(H, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(H, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r: [N, H] -> weights [N, k] fp32, expert ids [N, k]."""
        return route(self.norm(r), self.scale, self.proj.weight, self.per_expert_scale, self.top_k)


def route(normed: torch.Tensor, scale: torch.Tensor, proj: torch.Tensor, per_expert_scale: torch.Tensor,
          top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`Router`'s arithmetic after its weightless norm, as a pure function: normed [N, H] -> weights [N, k] fp32,
    expert ids [N, k]. proj is the router's [E, H] weight (always full precision: quant.py and LoRA leave it)."""
    z = normed * scale * normed.shape[-1] ** -0.5
    probs = F.softmax(F.linear(z, proj), dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w * per_expert_scale[idx], idx


class Experts(nn.Module):
    """Packed expert weights: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, min_rows: int = 0) -> torch.Tensor:
        E, k = self.gate_up_proj.shape[0], idx.shape[1]
        if torch.compiler.is_compiling() and not min_rows:  # one graph, whatever the routing
            if x.device.type == "cpu":
                return grouped_mix_experts(x, weights, idx, self.gate_up_proj, self.down_proj)
            if uses_dense_experts(E, k):
                return dense_mix_experts(x, weights, idx, E, self.gate_up_proj.flatten(0, 1),
                                         self.down_proj.permute(1, 0, 2).flatten(1))
        return mix_experts(x, weights, idx, E, self.expert, min_rows)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's gated MLP on x [n, H]."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e])


def mix_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, num_experts: int, expert,
                min_rows: int = 0) -> torch.Tensor:
    """x: [N, H]; each token goes through its k experts (`expert(e, rows) -> [n, H]`), outputs summed with the
    router weights [N, k].

    The N*k (token, slot) pairs are grouped by expert, run one matmul per expert, weighted (fp32), put back
    in (token, slot) order and summed over the slots: the reference's order of operations, so results match.

    `min_rows` pads each expert's block with zero rows to at least that many (the stepped engine's batch-invariant
    mode): BLAS libraries pick another kernel, with other rounding, for matmuls of very few rows, so without it a
    token's result can depend on how many other tokens share its expert."""
    N, k = idx.shape
    expert_of, order = torch.sort(idx.reshape(-1))  # [N*k]
    xs = x[order // k]
    counts = torch.bincount(expert_of, minlength=num_experts).tolist()
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            block = xs[start:start + n]
            if n < min_rows:
                block = torch.cat([block, block.new_zeros(min_rows - n, block.shape[1])])
            outs.append(expert(e, block)[:n])
            start += n
    y = torch.cat(outs) * weights.reshape(-1)[order, None]  # [N*k, H] fp32
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted.view(N, k, -1).sum(dim=1).to(x.dtype)


# Grouped matmul for compiled CPU code: `torch._grouped_mm` multiplies each expert's block of sorted rows by that
# expert's matrix in one call, with the blocks' ends given as a tensor (so the shapes stay fixed whatever the routing).
# Its eager CPU kernel takes fp32, but its shape function for the compiler accepts only CUDA's bf16, so it is wrapped
# as an opaque operator with its own shape function and backward. The kernel wants every stride a multiple of 16
# bytes; other shapes take a loop over the groups (the same products).
def _aligned(*tensors: torch.Tensor) -> bool:
    return all(st * t.element_size() % 16 == 0 for t in tensors for st in t.stride() if st != 1)


@torch.library.custom_op("dgemma::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """a [M, K] rows sorted by group; b [G, K, N]; ends [G] int32, cumulative row counts -> [M, N], group g's rows
    times b[g]."""
    a, b = a.contiguous(), b.transpose(1, 2).contiguous().transpose(1, 2)
    if _aligned(a, b):
        return torch._grouped_mm(a, b, offs=ends)
    out, start = a.new_empty(a.shape[0], b.shape[2]), 0
    for g, end in enumerate(ends.tolist()):
        torch.mm(a[start:end], b[g], out=out[start:end])
        start = end
    return out


@grouped_mm.register_fake
def _grouped_mm_shape(a, b, ends):
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op("dgemma::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(a: torch.Tensor, grad: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The gradient of `grouped_mm` for b: [G, K, N], group g's rows of a transposed times its rows of grad."""
    at, grad = a.t().contiguous(), grad.contiguous()
    if _aligned(at, grad):
        return torch._grouped_mm(at, grad, offs=ends)
    out, start = a.new_empty(ends.shape[0], a.shape[1], grad.shape[1]), 0
    for g, end in enumerate(ends.tolist()):
        torch.mm(at[:, start:end], grad[start:end], out=out[g])
        start = end
    return out


@grouped_mm_weight_grad.register_fake
def _grouped_mm_weight_grad_shape(a, grad, ends):
    return a.new_empty(ends.shape[0], a.shape[1], grad.shape[1])


def _grouped_mm_save(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    a, b, ends = ctx.saved_tensors
    return grouped_mm(grad, b.transpose(1, 2), ends), grouped_mm_weight_grad(a, grad, ends), None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_save)


def grouped_mix_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor,
                        down: torch.Tensor) -> torch.Tensor:
    """`mix_experts` (no `min_rows`) with the per-expert loop replaced by two grouped matmuls, so every shape is
    fixed and compiled code needs one graph whatever the routing, doing only the top-k experts' arithmetic.
    gate_up [E, 2I, H] and down [E, H, I]: `Experts`' packed weights. Same grouping, same order of sums."""
    N, k = idx.shape
    E = gate_up.shape[0]
    expert_of, order = torch.sort(idx.reshape(-1))  # [N*k]
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype  # as F.linear
    xs = x[order // k].to(dtype)
    ends = (expert_of[:, None] == torch.arange(E, device=x.device)).sum(0).cumsum(0).to(torch.int32)
    gate, up = grouped_mm(xs, gate_up.to(dtype).transpose(1, 2), ends).chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") * up
    y = grouped_mm(act, down.to(act.dtype).transpose(1, 2), ends)
    y = y * weights.reshape(-1)[order, None]  # [N*k, H] fp32
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted.view(N, k, -1).sum(dim=1).to(x.dtype)


DENSE_MAX_EXPERTS = 8  # dense mixing only for few experts (and E <= 4 k): it does E / k times the expert arithmetic


def uses_dense_experts(num_experts: int, top_k: int) -> bool:
    """Whether compiled code mixes experts densely (`dense_mix_experts`): few experts, a large share of them per
    token. At the released 128 experts top-8 it would do 16 times the work, so the sorted loop stays there."""
    return num_experts <= DENSE_MAX_EXPERTS and num_experts <= 4 * top_k


def dense_mix_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, num_experts: int,
                      gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`mix_experts` with every token through every expert, so every shape is fixed (no per-expert count): what
    compiled code uses, as one graph. x [N, H], weights [N, k] fp32, idx [N, k]; gate_up [E * 2I, H] (each expert's
    gate rows, then its up rows: `Experts.gate_up_proj` flattened), down [H, E * I] (the experts' down matrices
    side by side). Each expert's activation is weighted by the token's router weight (zero outside its top-k,
    fp32 as in `mix_experts`) and one product sums the experts: the same sums in another order (float rounding)."""
    N = x.shape[0]
    gate, up = F.linear(x, gate_up).view(N, num_experts, -1).chunk(2, dim=-1)  # [N, E, I] each
    dense_w = torch.zeros(N, num_experts, dtype=torch.float32, device=x.device).scatter(1, idx, weights)
    act = (F.gelu(gate, approximate="tanh") * up) * dense_w[:, :, None]
    return F.linear(act.to(x.dtype).reshape(N, -1), down)


# ---------------------------------------------------------------------------------------------------------------
# The layer
class Layer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = config.layer_types[layer]
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(H, config.intermediate_size)
        self.router = Router(config)
        self.experts = Experts(config)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)  # dense MLP in
        self.post_feedforward_layernorm_1 = RMSNorm(H, eps)  # dense MLP out
        self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)  # experts in
        self.post_feedforward_layernorm_2 = RMSNorm(H, eps)  # experts out
        self.post_feedforward_layernorm = RMSNorm(H, eps)  # sum
        # The checkpoint has one scalar per copy (decoder and encoder); they are equal in the release.
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(self, h, cos, sin, prefix, mask, encoder: bool):
        a, k, v = self.self_attn(self.input_layernorm(h), cos, sin, prefix, mask)
        return self.after_attention(h, a, encoder), k, v

    def after_attention(self, h: torch.Tensor, a: torch.Tensor, encoder: bool, min_rows: int = 0) -> torch.Tensor:
        """Residual + feed-forward (dense MLP and experts in parallel) + layer scalar, given the attention output.
        `min_rows`: see `mix_experts`."""
        h = h + self.post_attention_layernorm(a)
        r = h
        m1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))
        flat = r.reshape(-1, r.shape[-1])
        w, idx = self.router(flat)
        m2 = self.experts(self.pre_feedforward_layernorm_2(flat), w, idx, min_rows).reshape(r.shape)
        m2 = self.post_feedforward_layernorm_2(m2)
        h = r + self.post_feedforward_layernorm(m1 + m2)
        return h * (self.encoder_layer_scalar if encoder else self.layer_scalar)


class SelfConditioning(nn.Module):
    """Soft embedding of the previous step's logits -> gated MLP -> added to the canvas embedding, no-scale norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H = config.hidden_size
        self.pre_norm = RMSNorm(H, config.rms_norm_eps)
        self.gate_proj = nn.Linear(H, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, H, bias=False)
        self.post_norm = RMSNorm(H, config.rms_norm_eps, with_scale=False)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(soft)
        return self.post_norm(embeds + self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)))


# ---------------------------------------------------------------------------------------------------------------
# The model
class DiffusionGemma(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.register_buffer("embed_scale", torch.tensor(math.sqrt(H)), persistent=False)
        for t in (SLIDING, FULL):
            self.register_buffer(f"inv_freq_{t}", rope_inv_freq(config, t), persistent=False)
        # The first layer of each type present (masks are built once per type, from that layer's cache window).
        self.type_layer = {t: config.layer_types.index(t) for t in (SLIDING, FULL) if t in config.layer_types}
        # Optional replacements of the two [., V] x [V, H] products with the tied embedding (set by quant.py):
        # head_matmul(hidden [..., H]) -> raw logits [..., V]; soft_matmul(probs [..., V]) -> [..., H].
        self.head_matmul = None
        self.soft_matmul = None

    # ---- pieces ----
    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # The fp32 scale is cast to the weight dtype before the multiply (bf16: sqrt(2816) -> 53.0).
        return self.embed_tokens(ids) * self.embed_scale.to(self.dtype)

    def soft_embed(self, sc_logits: torch.Tensor) -> torch.Tensor:
        """Self-conditioning soft embedding: softmax (fp32) cast to the weight dtype, times E, times the scale."""
        probs = F.softmax(sc_logits, dim=-1, dtype=torch.float32).to(self.dtype)
        soft = probs @ self.embed_tokens.weight if self.soft_matmul is None else self.soft_matmul(probs)
        return soft * self.embed_scale.to(self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head; fp32 soft-cap."""
        out = (F.linear(hidden, self.embed_tokens.weight) if self.head_matmul is None
               else self.head_matmul(hidden)).float()
        cap = self.config.final_logit_softcapping
        if cap is None:
            return out
        if out.requires_grad:
            return torch.tanh(out / cap) * cap
        # Inference: the same three operations in place (no [., V] temporaries; bit-identical).
        return out.div_(cap).tanh_().mul_(cap)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {t: rope_cos_sin(getattr(self, f"inv_freq_{t}"), positions, dtype) for t in (SLIDING, FULL)}

    def _run_layers(self, h, positions, masks: Masks, prefix_of, store, encoder: bool) -> torch.Tensor:
        rope = self._rope(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.layer_type]
            h, k, v = layer(h, cos, sin, prefix_of(i), masks[layer.layer_type], encoder)
            if store is not None:
                store(i, k, v)
        return self.norm(h)

    # ---- encoder ----
    def encode(self, ids: torch.Tensor, cache: KVCache | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal pass over `ids` [B, T] after whatever `cache` holds; appends their K/V to `cache`.

        attention_mask: [B, T] (1 = token, 0 = left padding) for these positions; all ones if None.
        Returns the final-normed hidden states [B, T, H] (next-token logits via `logits`)."""
        B, T = ids.shape
        valid = (torch.ones(B, T, dtype=torch.bool, device=ids.device) if attention_mask is None
                 else attention_mask.to(device=ids.device, dtype=torch.bool))
        if cache is None:
            cache = KVCache(window=[None] * len(self.layers), keys=[None] * len(self.layers),
                            values=[None] * len(self.layers))
        L = cache.length
        cache.extend_valid(valid)
        positions = torch.arange(L, L + T, device=ids.device)
        masks = {t: encoder_mask(cache, positions, self.config.sliding_window if t == SLIDING else None, i)
                 for t, i in self.type_layer.items()}
        h = self._run_layers(self.embed(ids), positions, fill_masks(masks), cache.layer, cache.store, encoder=True)
        cache.advance(T)
        return h

    # ---- decoder ----
    def denoise_hidden(self, canvas: torch.Tensor, cache: KVCache, sc_logits: torch.Tensor | None = None,
                       sc_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                       masks: Masks | None = None) -> torch.Tensor:
        """Bidirectional pass over `canvas` [B, C] reading (never writing) `cache`. Returns hidden [B, C, H].

        sc_logits: [B, C, V] logits of the previous step (None = first step, zero signal).
        sc_mask: [B] 0/1 per-example self-conditioning switch (training).
        positions/masks: override the inference geometry (training denoises several canvases in one pass)."""
        e = self.embed(canvas)
        if sc_logits is None:
            soft = torch.zeros_like(e)
        else:
            soft = self.soft_embed(sc_logits)
            if sc_mask is not None:
                soft = soft * sc_mask.to(soft.dtype)[:, None, None]
        h = self.self_conditioning(e, soft)
        if positions is None:
            positions = torch.arange(cache.length, cache.length + canvas.shape[1], device=canvas.device)
        if masks is None:
            masks = {t: decoder_mask(cache, canvas.shape[1], i) for t, i in self.type_layer.items()}
        return self._run_layers(h, positions, fill_masks(masks), cache.layer, None, encoder=False)

    def denoise(self, canvas: torch.Tensor, cache: KVCache, sc_logits: torch.Tensor | None = None,
                **kw) -> torch.Tensor:
        """Canvas logits [B, C, V] fp32 (soft-capped)."""
        return self.logits(self.denoise_hidden(canvas, cache, sc_logits, **kw))


def fill_masks(masks: Masks) -> Masks:
    """Every layer kind's mask, None where `masks` has none."""
    return {SLIDING: masks.get(SLIDING), FULL: masks.get(FULL)}


# ---------------------------------------------------------------------------------------------------------------
# Inference masks (boolean, True = may attend)
def encoder_mask(cache: KVCache, positions: torch.Tensor, window: int | None, layer: int) -> torch.Tensor | None:
    """Causal (+ sliding window) mask over the keys layer `layer` will see: the kept prefix plus the new tokens.
    `cache.valid` must already include the new positions. None when nothing is masked."""
    q = positions  # [T]
    start = cache.start(layer)
    kpos = torch.arange(start, int(q[-1]) + 1, device=q.device)  # [S]
    allowed = kpos[None, :] <= q[:, None]
    if window is not None:
        allowed &= kpos[None, :] > q[:, None] - window
    allowed = allowed[None] & cache.valid[:, start:][:, None, :]  # [B, T, S]
    # A left-padding query may see no key at all; SDPA returns zeros for such rows (as in the reference, whose
    # pad-position activations then route through the experts exactly like ours: keeps results bit-identical).
    if bool(allowed.all()):
        return None
    return allowed[:, None]


def decoder_mask(cache: KVCache, canvas_len: int, layer: int) -> torch.Tensor | None:
    """Bidirectional: every canvas query sees every kept, non-padded cached key and the whole canvas."""
    if cache.valid is None:
        return None
    kept = cache.valid[:, cache.start(layer):]
    if bool(kept.all()):
        return None
    B = kept.shape[0]
    allowed = torch.cat([kept, torch.ones(B, canvas_len, dtype=torch.bool, device=kept.device)], dim=1)
    return allowed[:, None, None, :].expand(B, 1, canvas_len, allowed.shape[1])


# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def init_weights(model: DiffusionGemma, std: float = 0.02, seed: int | None = None) -> DiffusionGemma:
    """Random initialisation for training from scratch (normal(0, std) matrices, unit norms and scales)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        else:
            p.fill_(1.0)
    for layer in model.layers:
        layer.layer_scalar.fill_(1.0)
        layer.encoder_layer_scalar.fill_(1.0)
    return model
