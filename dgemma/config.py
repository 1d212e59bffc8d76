"""Model configuration: one frozen dataclass, named presets, and the Hugging Face `config.json` reader/writer.

The fields follow the spec (A1). Per-layer attention shapes are derived, not stored: sliding layers use
`head_dim`/`num_key_value_heads`, full layers use `global_head_dim`/`num_global_key_value_heads`.
This module imports nothing from the package.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
# ModelConfig fields that must be integers > 0 (checked by ModelConfig.validate).
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
                  "sliding_window", "num_experts", "top_k_experts", "moe_intermediate_size", "canvas_length",
                  "max_position_embeddings")


class ConfigError(ValueError):
    """A configuration the user supplied cannot be honoured; the message says which field and why."""


def _is_int(v: Any) -> bool:
    """An integer (Python or numpy), not a bool (True would otherwise pass as 1)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    """A finite real number, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


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
        n, types = self.num_hidden_layers, self.layer_types
        if isinstance(types, list):
            types = tuple(types)
        if not types and _is_int(n) and n > 0:
            types = tuple(SLIDING if (i + 1) % 6 else FULL for i in range(n))
        if isinstance(types, tuple) and types and types[-1] != FULL:  # the reference forces the last layer full
            types = (*types[:-1], FULL)
        object.__setattr__(self, "layer_types", types)
        eos = self.eos_token_ids
        eos = (eos,) if _is_int(eos) else tuple(eos) if isinstance(eos, (list, tuple)) else eos
        object.__setattr__(self, "eos_token_ids", eos)
        self.validate()
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        for name in (*_POSITIVE_INTS, "pad_token_id", "bos_token_id"):  # numpy ints -> int, for JSON
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))

    def validate(self) -> None:
        """Check every field once (called by the constructor, so presets, `replace` and config.json all pass here);
        raise one ConfigError that lists each bad field, the value found and what is allowed."""
        problems = []
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                problems.append(f"{name} must be a positive integer (got {v!r})")
        for name in ("rms_norm_eps", "sliding_rope_theta", "full_rope_theta"):
            v = getattr(self, name)
            if not _is_real(v) or v <= 0:
                problems.append(f"{name} must be a positive finite number (got {v!r})")
        v = self.full_partial_rotary_factor
        if not _is_real(v) or not 0 < v <= 1:
            problems.append(f"full_partial_rotary_factor must be in (0, 1] (got {v!r})")
        v = self.final_logit_softcapping
        if v is not None and (not _is_real(v) or v <= 0):
            problems.append(f"final_logit_softcapping must be a positive number or null (got {v!r})")
        if not problems and self.canvas_length > self.max_position_embeddings:
            problems.append(f"canvas_length={self.canvas_length} exceeds max_position_embeddings="
                            f"{self.max_position_embeddings}")
        vocab = self.vocab_size if _is_int(self.vocab_size) and self.vocab_size > 0 else None
        ids = [("pad_token_id", self.pad_token_id), ("bos_token_id", self.bos_token_id)]
        if isinstance(self.eos_token_ids, tuple):
            ids += [(f"eos_token_id[{i}]", e) for i, e in enumerate(self.eos_token_ids)]
        else:
            problems.append(f"eos_token_id must be an integer or a list of integers (got {self.eos_token_ids!r})")
        for name, v in ids:
            if v is None and not name.startswith("eos"):
                continue
            if not _is_int(v) or v < 0:
                problems.append(f"{name} must be a non-negative integer token id (got {v!r})")
            elif vocab is not None and v >= vocab:
                problems.append(f"{name}={v} is outside the vocabulary (vocab_size={vocab})")
        if not isinstance(self.layer_types, tuple) or not all(isinstance(t, str) for t in self.layer_types):
            problems.append(f"layer_types must be a list of strings (got {self.layer_types!r})")
        else:
            if _is_int(self.num_hidden_layers) and len(self.layer_types) != self.num_hidden_layers:
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
    n_layers = text.get("num_hidden_layers")
    if n_layers is not None and (not _is_int(n_layers) or n_layers <= 0):
        problems.append(f"num_hidden_layers must be a positive integer (got {n_layers!r})")
    layer_types = text.get("layer_types") or []
    if not isinstance(layer_types, list):
        problems.append(f"layer_types must be a list of '{SLIDING}'/'{FULL}' strings (got {layer_types!r})")
    rope = text.get("rope_parameters") or {}
    if not isinstance(rope, dict) or not all(isinstance(rope.get(k, {}), dict) for k in (SLIDING, FULL)):
        problems.append(f"rope_parameters must be an object of layer type -> rope settings (got {rope!r})")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))

    kw: dict[str, Any] = {k: text[k] for k in required}  # types and ranges are checked by ModelConfig.validate
    kw["layer_types"] = tuple(layer_types)
    for k in ("hidden_activation", "max_position_embeddings", "rms_norm_eps"):
        if text.get(k) is not None:
            kw[k] = text[k]
    kw["sliding_window"] = text.get("sliding_window", 512)  # absent -> HF's default; null or <= 0 -> an error
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
        try:
            tmp = ModelConfig(**{**_shape_stub(kw), **base, "layer_types": kw["layer_types"]})
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{where}: {e}; {_CONFIG_FIX}") from None
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
    kw["global_head_dim"] = global_head_dim
    kw["num_global_key_value_heads"] = global_kv if global_kv is not None else kw["num_key_value_heads"]

    if rope:
        sl, fu = rope.get(SLIDING, {}), rope.get(FULL, {})
        if sl.get("rope_type", "default") != "default":
            raise ConfigError(f"{where}: sliding rope_type {sl.get('rope_type')!r} unsupported (expected 'default')")
        if fu.get("rope_type", "proportional") not in ("proportional", "default"):
            raise ConfigError(f"{where}: full rope_type {fu.get('rope_type')!r} unsupported (expected 'proportional')")
        kw["sliding_rope_theta"] = _as_float(sl.get("rope_theta", 10_000.0))
        kw["full_rope_theta"] = _as_float(fu.get("rope_theta", 1_000_000.0))
        kw["full_partial_rotary_factor"] = _as_float(
            fu.get("partial_rotary_factor", 1.0 if fu.get("rope_type") == "default" else 0.25))

    canvas = top.get("canvas_length")
    kw["canvas_length"] = 256 if canvas is None else canvas  # absent -> the released 256; 0, -1, "32" -> an error
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
        raise ConfigError(f"{where}: {e}; {_CONFIG_FIX}") from None


_CONFIG_FIX = "correct these fields in config.json (or re-export the checkpoint with the tool that trained it)"


def _as_float(v: Any) -> Any:
    """A JSON number as a float; anything else unchanged, for ModelConfig.validate to name."""
    return float(v) if _is_real(v) else v


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
    # The shipped default model (trained by `dgemma train`): sized to be trainable on a few CPU cores.
    "small": ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
        sliding_window=128, layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL), num_experts=4,
        top_k_experts=2, moe_intermediate_size=256, canvas_length=32, max_position_embeddings=8192,
    ),
    # A smaller sibling of `small` for quicker CPU training runs; how long a run takes depends on the CPU
    # (`dgemma train --synthetic-data ...` measures the speed on the machine at hand).
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
