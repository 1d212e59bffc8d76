"""transformers 5.23.0 as the numerical oracle: tiny random DiffusionGemma models built from our configs.

Imported by tests only (transformers is a test dependency, never a runtime one)."""

from __future__ import annotations

import torch

from dgemma.config import FULL, SLIDING, ModelConfig, preset

# Three tiny shapes that vary head dims, KV heads, experts/top-k and the window.
CONFIGS: dict[str, ModelConfig] = {
    "tiny": preset("tiny"),
    "gqa4": ModelConfig(
        vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=12, global_head_dim=24, num_global_key_value_heads=2, sliding_window=8,
        layer_types=(SLIDING, FULL, FULL), num_experts=6, top_k_experts=3, moe_intermediate_size=16,
        canvas_length=16, max_position_embeddings=4096, full_partial_rotary_factor=0.5,
    ),
    "wide": ModelConfig(
        vocab_size=200, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, global_head_dim=16, num_global_key_value_heads=2, sliding_window=12,
        layer_types=(SLIDING, SLIDING, SLIDING, FULL), num_experts=3, top_k_experts=1, moe_intermediate_size=8,
        canvas_length=8, max_position_embeddings=4096,
    ),
}


def hf_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.3):
    """A transformers DiffusionGemmaForBlockDiffusion with random weights (larger than init so logits are peaky)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    raw = cfg.to_hf_config()
    raw.pop("architectures", None)
    hf_cfg = DiffusionGemmaConfig(**raw)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            else:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for n, b in model.named_buffers():
            if n.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model


def to_dgemma_state_dict(hf) -> dict[str, torch.Tensor]:
    """Minimal independent map (decoder copy + encoder layer scalars) used to cross-check checkpoint.py."""
    sd = hf.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("model.decoder."):
            out[k[len("model.decoder."):]] = v
        elif k.startswith("model.encoder.language_model.layers.") and k.endswith(".layer_scalar"):
            out[k[len("model.encoder.language_model."):].replace("layer_scalar", "encoder_layer_scalar")] = v
    return out


def dgemma_from_hf(hf, cfg: ModelConfig):
    from dgemma.model import DiffusionGemma

    model = DiffusionGemma(cfg).eval()
    model.load_state_dict(to_dgemma_state_dict(hf))
    return model
