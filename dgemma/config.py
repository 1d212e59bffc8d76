"""Model configuration: one frozen dataclass, named presets, and the Hugging Face `config.json` reader/writer.

The fields follow the spec (A1). Per-layer attention shapes are derived, not stored: sliding layers use
`head_dim`/`num_key_value_heads`, full layers use `global_head_dim`/`num_global_key_value_heads`.
This module imports nothing from the package.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A configuration the user supplied cannot be honoured; the message says which field and why."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112  # dense MLP width, also the self-conditioning MLP width
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8  # sliding layers
    head_dim: int = 256  # sliding layers
    global_head_dim: int = 512  # full layers
    num_global_key_value_heads: int = 2  # full layers
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 262_144
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    layer_types: tuple[str, ...] = ()  # empty -> default pattern (every 6th layer full, last forced full)
    final_logit_softcapping: float | None = 30.0
    sliding_rope_theta: float = 10_000.0
    full_rope_theta: float = 1_000_000.0
    full_partial_rotary_factor: float = 0.25
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    canvas_length: int = 256
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_ids: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = True
    # Fields of the HF top-level config that dgemma does not use but writes back unchanged (vision tower etc.).
    hf_passthrough: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            types = [SLIDING if (i + 1) % 6 else FULL for i in range(self.num_hidden_layers)]
            object.__setattr__(self, "layer_types", tuple(types))
        types = list(self.layer_types)
        if types and types[-1] != FULL:  # the reference forces the last layer to full attention
            types[-1] = FULL
        object.__setattr__(self, "layer_types", tuple(types))
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        self.validate()

    def validate(self) -> None:
        problems = []
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
                    "sliding_window", "num_experts", "top_k_experts", "moe_intermediate_size", "canvas_length"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                problems.append(f"{name} must be a positive integer (got {v!r})")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        if bad:
            problems.append(f"layer_types contains unknown types {bad}; expected '{SLIDING}' or '{FULL}'")
        if not problems:
            for name, kv in (("num_key_value_heads", self.num_key_value_heads),
                             ("num_global_key_value_heads", self.num_global_key_value_heads)):
                if self.num_attention_heads % kv:
                    problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of {name}={kv}")
            if self.top_k_experts > self.num_experts:
                problems.append(f"top_k_experts={self.top_k_experts} exceeds num_experts={self.num_experts}")
            for name in ("head_dim", "global_head_dim"):
                if getattr(self, name) % 2:
                    problems.append(f"{name} must be even for rotary embeddings (got {getattr(self, name)})")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            problems.append(f"hidden_activation={self.hidden_activation!r} is not supported (only gelu_pytorch_tanh)")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    # ---- derived per-layer shapes ----
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.num_global_key_value_heads

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts (nn.Parameters of DiffusionGemma): total text parameters and the active ones per token
        (embedding/LM head, attention, dense MLP, router, self-conditioning, and top-k of the experts)."""
        H, V = self.hidden_size, self.vocab_size
        attn = 0
        for i in range(self.num_hidden_layers):
            d, kv = self.layer_head_dim(i), self.layer_kv_heads(i)
            attn += H * self.num_attention_heads * d * 2 + H * kv * d * (2 if self.is_sliding(i) else 1) + 2 * d
        per_layer_dense = 3 * H * self.intermediate_size + 7 * H  # layer scalars are buffers, not counted
        router = self.num_experts * H + H + self.num_experts
        expert = 3 * H * self.moe_intermediate_size
        layers = attn + self.num_hidden_layers * (per_layer_dense + router)
        experts_total = self.num_hidden_layers * self.num_experts * expert
        experts_active = self.num_hidden_layers * self.top_k_experts * expert
        sc = 3 * H * self.intermediate_size + H
        embed = V * H
        total = embed + layers + experts_total + sc + H
        active = embed + layers + experts_active + sc + H
        return {"total": total, "active_per_token": active, "embedding": embed, "experts": experts_total}

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_config(cls, source: str | Path | dict) -> ModelConfig:
        """Read a DiffusionGemma `config.json` (a path, a folder holding one, or the parsed dict)."""
        if isinstance(source, dict):
            raw, where = source, "config dict"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            if not path.is_file():
                raise ConfigError(f"{where}: no config.json found; point to a checkpoint folder that contains one")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}); fix or re-save the file")
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: expected a JSON object at the top level")
        return _config_from_dict(raw, where)

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` dict that transformers' DiffusionGemmaForBlockDiffusion loads."""
        text = {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads,
            "hidden_activation": self.hidden_activation,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.sliding_rope_theta},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": self.full_partial_rotary_factor,
                       "rope_theta": self.full_rope_theta},
            },
            "attention_bias": False,
            "attention_dropout": 0.0,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "final_logit_softcapping": self.final_logit_softcapping,
            "use_bidirectional_attention": "vision",
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
        }
        out = {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length,
            "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "vision_config": MINIMAL_VISION_CONFIG,
            "dtype": "float32",
        }
        out.update(self.hf_passthrough)
        out["text_config"] = text
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("hf_passthrough")
        d["layer_types"] = list(self.layer_types)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d


# transformers requires a vision config; a checkpoint made by dgemma carries the smallest one that builds, and
# no vision weights (transformers initialises the unused tower randomly; it never touches text generation).
MINIMAL_VISION_CONFIG: dict[str, Any] = {
    "model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "position_embedding_size": 64,
    "patch_size": 4, "pooling_kernel_size": 1,
}

_PASSTHROUGH_KEYS = ("vision_config", "boi_token_id", "eoi_token_id", "image_token_id", "vision_soft_tokens_per_image",
                     "initializer_range", "dtype", "torch_dtype", "transformers_version")


def _config_from_dict(raw: dict, where: str) -> ModelConfig:
    top = raw
    model_type = top.get("model_type")
    if "text_config" in top:
        text = top["text_config"]
        if not isinstance(text, dict):
            raise ConfigError(f"{where}: text_config must be an object")
    else:
        text = top
    if model_type not in (None, "diffusion_gemma", "diffusion_gemma_text"):
        raise ConfigError(f"{where}: model_type {model_type!r} is not a DiffusionGemma config "
                          "(expected 'diffusion_gemma'); dgemma loads DiffusionGemma checkpoints only")
    if text.get("model_type") not in (None, "diffusion_gemma_text"):
        raise ConfigError(f"{where}: text_config.model_type {text.get('model_type')!r} is not 'diffusion_gemma_text'")

    problems: list[str] = []
    if text.get("use_bidirectional_attention") == "all":
        problems.append("use_bidirectional_attention='all' (a fully bidirectional encoder) is not supported; "
                        "dgemma implements the released 'vision'/None behaviour (causal text encoder)")
    if text.get("attention_bias"):
        problems.append("attention_bias=true is not supported (DiffusionGemma has no biases)")
    for key in ("hidden_size_per_layer_input", "num_kv_shared_layers"):
        if text.get(key):
            problems.append(f"{key}={text[key]!r} is a Gemma 4 feature DiffusionGemma does not use")
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts", "top_k_experts", "moe_intermediate_size"]
    missing = [k for k in required if text.get(k) is None]
    if missing:
        problems.append(f"missing required fields {missing}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))

    n_layers = int(text["num_hidden_layers"])
    layer_types = text.get("layer_types") or []
    kw: dict[str, Any] = {k: text[k] for k in required}
    kw["layer_types"] = tuple(layer_types)
    for k in ("hidden_activation", "max_position_embeddings", "rms_norm_eps", "sliding_window"):
        if text.get(k) is not None:
            kw[k] = text[k]
    kw["sliding_window"] = int(text.get("sliding_window", 512))
    # final_logit_softcapping is a class attribute in HF 5.23 and is omitted from saved configs: default 30.
    kw["final_logit_softcapping"] = text.get("final_logit_softcapping", 30.0)

    # Full-layer shapes: either global_head_dim/num_global_key_value_heads, or HF's per_layer_config form.
    global_head_dim = text.get("global_head_dim", 512)
    global_kv = text.get("num_global_key_value_heads")
    plc = text.get("per_layer_config")
    if plc is not None:
        # HF 5.23 writes only the values that differ from the base ones, so a full layer missing from the dict
        # (or `{}` when the full layers equal the sliding ones) means head_dim/num_key_value_heads unchanged.
        if not isinstance(plc, dict):
            raise ConfigError(f"{where}: per_layer_config must be an object of layer index -> overrides")
        base = {"global_head_dim": kw["head_dim"], "num_global_key_value_heads": kw["num_key_value_heads"]}
        tmp = ModelConfig(**{**_shape_stub(kw), **base, "layer_types": kw["layer_types"]})
        overrides: dict[int, dict] = {}
        for key, ov in plc.items():
            try:
                idx = int(key)
            except ValueError:
                raise ConfigError(f"{where}: per_layer_config key {key!r} is not a layer index")
            if not 0 <= idx < n_layers:
                raise ConfigError(f"{where}: per_layer_config names layer {idx}, but there are {n_layers} layers")
            if not isinstance(ov, dict):
                raise ConfigError(f"{where}: per_layer_config[{key!r}] must be an object")
            overrides[idx] = ov
        sliding_overrides = sorted(i for i in overrides if tmp.is_sliding(i))
        if sliding_overrides:
            raise ConfigError(f"{where}: per_layer_config overrides sliding layers "
                              f"{sliding_overrides}; dgemma supports overrides of full layers only")
        full = [i for i in range(n_layers) if not tmp.is_sliding(i)]
        shapes = {(overrides.get(i, {}).get("head_dim", kw["head_dim"]),
                   overrides.get(i, {}).get("num_key_value_heads", kw["num_key_value_heads"])) for i in full}
        if len(shapes) > 1:
            raise ConfigError(f"{where}: per_layer_config gives full layers different (head_dim, kv heads) "
                              f"{sorted(shapes)}; dgemma needs one shape for all full-attention layers")
        global_head_dim, global_kv = shapes.pop()
    kw["global_head_dim"] = int(global_head_dim)
    kw["num_global_key_value_heads"] = int(global_kv if global_kv is not None else kw["num_key_value_heads"])

    rope = text.get("rope_parameters") or {}
    if rope:
        sl, fu = rope.get(SLIDING, {}), rope.get(FULL, {})
        if sl.get("rope_type", "default") != "default":
            raise ConfigError(f"{where}: sliding rope_type {sl.get('rope_type')!r} unsupported (expected 'default')")
        if fu.get("rope_type", "proportional") not in ("proportional", "default"):
            raise ConfigError(f"{where}: full rope_type {fu.get('rope_type')!r} unsupported (expected 'proportional')")
        kw["sliding_rope_theta"] = float(sl.get("rope_theta", 10_000.0))
        kw["full_rope_theta"] = float(fu.get("rope_theta", 1_000_000.0))
        kw["full_partial_rotary_factor"] = float(
            fu.get("partial_rotary_factor", 1.0 if fu.get("rope_type") == "default" else 0.25))

    kw["canvas_length"] = int(top.get("canvas_length") or 256)
    eos = top.get("eos_token_id", text.get("eos_token_id", 1))
    if eos is None:
        eos = []
    kw["eos_token_ids"] = tuple(eos if isinstance(eos, list) else [eos])
    kw["pad_token_id"] = top.get("pad_token_id", text.get("pad_token_id", 0))
    kw["bos_token_id"] = top.get("bos_token_id", text.get("bos_token_id", 2))
    if top.get("tie_word_embeddings", True) is False or text.get("tie_word_embeddings", True) is False:
        raise ConfigError(f"{where}: tie_word_embeddings=false is not supported (DiffusionGemma ties encoder, "
                          "decoder and LM head)")
    if top is not text:
        kw["hf_passthrough"] = {k: top[k] for k in _PASSTHROUGH_KEYS if k in top}
    try:
        return ModelConfig(**kw)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _shape_stub(kw: dict) -> dict:
    names = {f.name for f in fields(ModelConfig)}
    return {k: v for k, v in kw.items() if k in names and k != "layer_types"}


# ---- presets, chosen by explicit name ----
PRESETS: dict[str, ModelConfig] = {
    # Tests: a few hundred thousand parameters, sliding window smaller than typical prompts.
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        sliding_window=16, layer_types=(SLIDING, FULL), num_experts=4, top_k_experts=2, moe_intermediate_size=24,
        canvas_length=32, max_position_embeddings=4096,
    ),
    # The released google/diffusiongemma-26B-A4B-it text shape.
    "26b-a4b": ModelConfig(eos_token_ids=(1, 106, 50)),
    # The shipped default model (trained by `dgemma train`): small enough to train on 2 CPU cores.
    "small": ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
        sliding_window=128, layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL), num_experts=4,
        top_k_experts=2, moe_intermediate_size=256, canvas_length=32, max_position_embeddings=8192,
    ),
    # A smaller sibling sized for about an hour of fp32 training on this 2-core AVX2 CPU.
    "mini": ModelConfig(
        vocab_size=8192, hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=48, global_head_dim=96, num_global_key_value_heads=1,
        sliding_window=128, layer_types=(SLIDING, FULL, SLIDING, FULL), num_experts=4,
        top_k_experts=2, moe_intermediate_size=192, canvas_length=32, max_position_embeddings=8192,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
