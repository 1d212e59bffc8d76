"""Int8 weight-only quantisation for inference: a function that takes a DiffusionGemma and returns it quantised.

Why: decoding large models is bound by reading the weights from memory. Storing the big matrices as int8 with one
fp32 scale per output row (symmetric, per channel) reads a quarter of the bytes of fp32, and PyTorch has a CPU kernel
for this product, `aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) -> [M, N]`. Activations stay in
the model's float dtype; only weights are quantised. Whether int8 is faster than the float model, or only smaller,
depends on the CPU (its vector units, memory bandwidth, thread count): `dgemma bench` measures it on the machine
that runs it, so read the figure there rather than assuming one.

    from dgemma.quant import quantize_int8, quantized_bytes
    model = quantize_int8(model)          # in place; returns the model
    quantized_bytes(model)                # {"float_bytes": ..., "quantized_bytes": ...}

What is quantised:
- every nn.Linear in the layers (q/k/v/o projections, dense MLP gate/up/down) and in self-conditioning
  -> `Int8Linear`;
- the packed experts -> `Int8Experts` (per expert, per output row);
- with head=True, the two products with the tied embedding, through the model's `head_matmul`/`soft_matmul` hooks:
  the LM head uses E [V, H] quantised per vocabulary row, the self-conditioning soft embedding uses E^T [H, V]
  quantised per hidden row. The token lookup (`embed_tokens`) stays in full precision, so head=True adds int8
  copies (2 bytes per embedding entry) rather than saving memory: it can buy speed (where the kernel is fast), not
  space.

What stays in full precision: norms, scalars, `embed_tokens`, and the router projection `router.proj` [E, H]. The
router's logits pick the top-k experts, a discrete choice: rounding noise there can swap an expert and change a
token's output by far more than the int8 error anywhere else, and the matrix is tiny (E x H), so it saves nothing.

Which path computes a product is decided per call by `use_fused_kernel` (the rule and why are in its docstring):
the fused CPU kernel only for fp32 activations with an inner size K that is a multiple of 64; everywhere else (bf16
and fp16 activations, other K, CUDA) the weights are dequantised and multiplied with F.linear, which is correct on
every CPU and lets cuBLAS do the work on a GPU. Quantised models are for inference: they have no gradients and are
not saved by checkpoint.py (their state-dict keys differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.model import DiffusionGemma, Experts, Router, mix_experts

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class QuantError(ValueError):
    """A model that cannot be quantised as asked (already quantised, not a floating-point model)."""


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dim: w [..., N, K] -> (int8 [..., N, K], fp32 scales [..., N]).

    w ~= q * scale[..., None], with q in [-127, 127] (-128 unused so the range is symmetric)."""
    wf = w.detach().float()
    scale = wf.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: q = 0, any scale works
    q = torch.round(wf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., N, K] and scales [..., N] -> float weights [..., N, K] in `dtype`."""
    return q.to(dtype) * scale.to(dtype)[..., None]


FUSED_K_MULTIPLE = 64  # the fused kernel is used only when the inner size K is a multiple of this


def use_fused_kernel(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether `int8_linear(x, q, scale)` uses PyTorch's fused CPU kernel (True) or dequantise + F.linear (False).

    The rule, chosen to be safe on every CPU rather than fast on one: the kernel is used only when x is on the CPU,
    x is float32, and the inner size K = q.shape[1] is a multiple of 64. Why: `aten._weight_int8pack_mm` is a
    private op whose CPU code differs per instruction set, and on AVX-512 CPUs with avx512_bf16 it has been seen to
    crash (segfault) with bf16 activations and scales, at least 5 rows and K = 24 or 40, while fp32, and K = 64,
    worked. Nothing in the process can catch a segfault, so the only safe course is never to call the kernel on
    shapes and dtypes that are not known to work. fp32 with K a multiple of 64 avoids both ingredients of the
    crash; bf16/fp16 activations always take the fallback. All the large matrices of the shipped presets and of
    26B-A4B have K a multiple of 64, so fp32 models keep the kernel where it matters. The fallback computes the
    same product (to rounding), at a cost that depends on the CPU (`dgemma bench` measures both)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and q.device.type == "cpu"
            and q.dim() == 2 and q.shape[1] % FUSED_K_MULTIPLE == 0)


def _fused_int8_mm(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] fp32 @ (q int8 [N, K] * scale [N])^T through the private kernel; callers check use_fused_kernel."""
    return torch.ops.aten._weight_int8pack_mm(x2, q, scale)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] float @ (q int8 [N, K] * scale fp32 [N])^T -> [..., N] in x.dtype.

    The fused CPU kernel where `use_fused_kernel` allows it (fp32 activations, K a multiple of 64); elsewhere
    (bf16/fp16 activations, other K, CUDA) dequantise to x.dtype, then F.linear."""
    if use_fused_kernel(x, q):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # the kernel takes 2-D activations only
        y = _fused_int8_mm(x2, q, scale.to(x.dtype))  # scales must match x's dtype
        return y.view(*x.shape[:-1], q.shape[0])
    return F.linear(x, dequantize(q, scale, x.dtype))


class Int8Linear(nn.Module):
    """Bias-free linear layer with int8 weights [out, in] and one fp32 scale per output row."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("weight_int8", q)  # [out, in] int8
        self.register_buffer("scale", scale)  # [out] fp32
        self.float_nbytes = weight.numel() * weight.element_size()  # what the float weight took

    @property
    def in_features(self) -> int:
        return self.weight_int8.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_int8.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Experts(nn.Module):
    """`Experts` with int8 weights: gate_up [E, 2I, H] and down [E, H, I], one scale per expert per output row."""

    def __init__(self, experts: Experts):
        super().__init__()
        gu, down = experts.gate_up_proj, experts.down_proj
        q, s = quantize_rows(gu)
        self.register_buffer("gate_up_int8", q)  # [E, 2I, H] int8
        self.register_buffer("gate_up_scale", s)  # [E, 2I] fp32
        q, s = quantize_rows(down)
        self.register_buffer("down_int8", q)  # [E, H, I] int8
        self.register_buffer("down_scale", s)  # [E, H] fp32
        self.float_nbytes = (gu.numel() + down.numel()) * gu.element_size()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, min_rows: int = 0) -> torch.Tensor:
        """x: [N, H]; weights [N, k] fp32, idx [N, k]. The routing of `Experts.forward` (model.mix_experts)."""
        return mix_experts(x, weights, idx, self.gate_up_int8.shape[0], self.expert, min_rows)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = int8_linear(x, self.gate_up_int8[e], self.gate_up_scale[e]).chunk(2, -1)
        return int8_linear(F.gelu(gate, approximate="tanh") * up, self.down_int8[e], self.down_scale[e])


def _is_quantised(model: DiffusionGemma) -> bool:
    return (model.head_matmul is not None or model.soft_matmul is not None
            or any(isinstance(m, (Int8Linear, Int8Experts)) for m in model.modules()))


def _replace_linears(parent: nn.Module, skip: tuple[type, ...] = ()) -> None:
    """Swap every nn.Linear under `parent` (recursively) for an Int8Linear, except inside modules of type `skip`."""
    for name, child in parent.named_children():
        if isinstance(child, skip):
            continue
        if isinstance(child, nn.Linear):
            setattr(parent, name, Int8Linear(child.weight))
        elif isinstance(child, Experts):
            setattr(parent, name, Int8Experts(child))
        else:
            _replace_linears(child, skip)


@torch.no_grad()
def quantize_int8(model: DiffusionGemma, head: bool = True) -> DiffusionGemma:
    """Quantise `model`'s weights to int8 in place (see the module docstring for what and why); returns it."""
    if _is_quantised(model):
        raise QuantError("the model is already int8-quantised; quantise the original float model once")
    if model.dtype not in _FLOATS:
        raise QuantError(f"can only quantise a float32/bfloat16/float16 model (this one is {model.dtype})")
    biased = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
    if biased:
        raise QuantError(f"Int8Linear has no bias, but these layers have one: {biased}")
    for layer in model.layers:
        _replace_linears(layer, skip=(Router,))
    _replace_linears(model.self_conditioning)
    if head:
        E = model.embed_tokens.weight  # [V, H]
        model.head_matmul = Int8Linear(E)  # hidden [..., H] -> [..., V]
        model.soft_matmul = Int8Linear(E.t())  # probs [..., V] -> [..., H]
    return model


def quantized_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of all parameters and buffers now ("quantized_bytes") and as the float model held them ("float_bytes").

    The head copies count as pure additions (the float model reads the tied embedding for free)."""
    seen, now = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            now += t.untyped_storage().nbytes()
    before = now
    head = {id(m) for m in (getattr(model, "head_matmul", None), getattr(model, "soft_matmul", None)) if m is not None}
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int8Experts)):
            before -= sum(b.untyped_storage().nbytes() for b in m.buffers())
            before += 0 if id(m) in head else m.float_nbytes
    return {"float_bytes": before, "quantized_bytes": now}
