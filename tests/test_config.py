"""Config tests: both HF config.json forms (released `global_head_dim` form and transformers 5.23's saved
`per_layer_config` form), defaults for fields HF omits, rejected inputs, presets and parameter counts."""

import json

import pytest
import torch
from oracle import CONFIGS

from dgemma.config import FULL, PRESETS, SLIDING, ConfigError, ModelConfig, preset
from dgemma.model import DiffusionGemma

transformers = pytest.importorskip("transformers")


def hf_saved_config(cfg: ModelConfig, tmp_path) -> dict:
    """config.json as transformers 5.23 itself writes it for `cfg` (the per_layer_config form)."""
    raw = cfg.to_hf_config()
    raw.pop("architectures")
    transformers.DiffusionGemmaConfig(**raw).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def released_config() -> dict:
    """The shape of google/diffusiongemma-26B-A4B-it's config.json (spec A1): global_head_dim form, no softcap."""
    layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(30)]
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma", "canvas_length": 256,
        "boi_token_id": 255999, "eoi_token_id": 258882, "image_token_id": 258880, "vision_soft_tokens_per_image": 280,
        "eos_token_id": [1, 106, 50], "pad_token_id": 0, "bos_token_id": 2, "tie_word_embeddings": True,
        "dtype": "bfloat16",
        "text_config": {
            "model_type": "diffusion_gemma_text", "vocab_size": 262144, "hidden_size": 2816, "intermediate_size": 2112,
            "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
            "global_head_dim": 512, "num_global_key_value_heads": 2, "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "sliding_window": 1024,
            "layer_types": layer_types, "use_bidirectional_attention": "vision", "num_experts": 128,
            "top_k_experts": 8, "moe_intermediate_size": 704, "attention_bias": False,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
            },
        },
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 1152, "num_hidden_layers": 27},
    }


def test_released_config_is_the_26b_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(released_config()))
    cfg = ModelConfig.from_hf_config(tmp_path)
    assert cfg == preset("26b-a4b")
    assert cfg.final_logit_softcapping == 30.0  # absent from the file -> class default
    assert cfg.hf_passthrough["vision_config"]["hidden_size"] == 1152  # carried through for re-saving
    assert cfg.to_hf_config()["vision_config"]["hidden_size"] == 1152


@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_layer_config_form_from_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    saved = hf_saved_config(cfg, tmp_path)
    text = saved["text_config"]
    assert "per_layer_config" in text and "global_head_dim" not in text
    assert ModelConfig.from_hf_config(tmp_path) == cfg
    assert ModelConfig.from_hf_config(saved) == cfg


def test_per_layer_config_lists_only_changed_values(tmp_path):
    # 12 layers: zero-padded keys ("05", "11"); the full layers keep the sliding KV-head count, so HF writes only
    # head_dim. A config whose full layers equal the sliding ones gets an empty per_layer_config (the "wide" case).
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=12, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
                      num_experts=2, top_k_experts=1, moe_intermediate_size=8)
    text = hf_saved_config(cfg, tmp_path)["text_config"]
    assert text["per_layer_config"] == {"05": {"head_dim": 16}, "11": {"head_dim": 16}}
    assert ModelConfig.from_hf_config(tmp_path) == cfg
    assert hf_saved_config(CONFIGS["wide"], tmp_path)["text_config"]["per_layer_config"] == {}
    assert ModelConfig.from_hf_config(tmp_path).global_head_dim == CONFIGS["wide"].head_dim


def test_per_layer_config_errors():
    base = CONFIGS["gqa4"].to_hf_config()
    text = base["text_config"]
    del text["global_head_dim"], text["num_global_key_value_heads"]
    text["per_layer_config"] = {"1": {"head_dim": 24}, "2": {"head_dim": 48}}
    with pytest.raises(ConfigError, match="different"):
        ModelConfig.from_hf_config(base)
    text["per_layer_config"] = {"0": {"head_dim": 24}}
    with pytest.raises(ConfigError, match=r"sliding layers \[0\]"):
        ModelConfig.from_hf_config(base)
    text["per_layer_config"] = {"7": {"head_dim": 24}}
    with pytest.raises(ConfigError, match="layer 7"):
        ModelConfig.from_hf_config(base)


@pytest.mark.parametrize("name", sorted(PRESETS) + list(CONFIGS))
def test_to_hf_config_round_trips(name):
    cfg = PRESETS.get(name) or CONFIGS[name]
    raw = cfg.to_hf_config()
    assert ModelConfig.from_hf_config(json.loads(json.dumps(raw))) == cfg
    raw.pop("architectures")
    hf_text = transformers.DiffusionGemmaConfig(**raw).text_config  # transformers accepts what we write
    assert hf_text.num_hidden_layers == cfg.num_hidden_layers and list(hf_text.layer_types) == list(cfg.layer_types)


def test_defaults_for_fields_transformers_omits():
    raw = released_config()
    text = raw["text_config"]
    del text["global_head_dim"], text["num_global_key_value_heads"]
    cfg = ModelConfig.from_hf_config(raw)
    assert cfg.global_head_dim == 512  # HF's post-init default even when absent
    assert cfg.num_global_key_value_heads == cfg.num_key_value_heads
    assert cfg.final_logit_softcapping == 30.0
    # transformers agrees on the full-layer head dim it derives
    hf_text = transformers.DiffusionGemmaTextConfig(**{k: v for k, v in text.items() if k != "model_type"})
    assert hf_text.to_dict()["per_layer_config"]["05"] == {"head_dim": 512}
    text["final_logit_softcapping"] = 50.0
    assert ModelConfig.from_hf_config(raw).final_logit_softcapping == 50.0


def test_bidirectional_all_rejected():
    raw = released_config()
    raw["text_config"]["use_bidirectional_attention"] = "all"
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_config(raw)
    assert "use_bidirectional_attention='all'" in str(e.value) and "not supported" in str(e.value)


def test_bad_json_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "diffusion_gemma",\n  "text_config": {,\n}')
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "line 3" in str(e.value)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf_config(tmp_path / "elsewhere")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_hf_config(tmp_path / "config.json")


def test_missing_and_invalid_fields():
    raw = released_config()
    del raw["text_config"]["hidden_size"], raw["text_config"]["num_experts"]
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_config(raw)
    assert "hidden_size" in str(e.value) and "num_experts" in str(e.value)
    raw = released_config()
    raw["model_type"] = "gemma4"
    with pytest.raises(ConfigError, match="not a DiffusionGemma config"):
        ModelConfig.from_hf_config(raw)
    raw = released_config()
    raw["text_config"]["num_attention_heads"] = 12
    with pytest.raises(ConfigError, match="not a multiple"):
        ModelConfig.from_hf_config(raw)
    raw = released_config()
    raw["tie_word_embeddings"] = False
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        ModelConfig.from_hf_config(raw)


def test_presets_construct():
    for name in ("tiny", "26b-a4b", "small"):
        cfg = preset(name)
        assert cfg.layer_types[-1] == FULL and len(cfg.layer_types) == cfg.num_hidden_layers
    big = preset("26b-a4b")
    assert (big.hidden_size, big.num_hidden_layers, big.num_experts, big.top_k_experts) == (2816, 30, 128, 8)
    assert big.layer_types.count(FULL) == 5 and big.eos_token_ids == (1, 106, 50)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


def _count(cfg: ModelConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, total - experts + experts // cfg.num_experts * cfg.top_k_experts


@pytest.mark.parametrize("name", sorted(PRESETS) + list(CONFIGS))
def test_num_parameters_matches_the_model(name):
    cfg = PRESETS.get(name) or CONFIGS[name]
    counts = cfg.num_parameters()
    assert (counts["total"], counts["active_per_token"]) == _count(cfg)
    assert counts["embedding"] == cfg.vocab_size * cfg.hidden_size


def test_26b_parameter_counts_match_the_spec():
    counts = preset("26b-a4b").num_parameters()
    assert counts["total"] == pytest.approx(25.25e9, abs=0.01e9)  # spec A4.3: text 25.25B unique
    assert counts["active_per_token"] == pytest.approx(3.84e9, abs=0.01e9)  # 8 of 128 experts, embedding included
    assert counts["experts"] == pytest.approx(22.84e9, abs=0.01e9)
    assert counts["embedding"] == 262144 * 2816


@pytest.mark.parametrize("value", [0, -1, "32", 32.5, True, None])
def test_canvas_length_must_be_a_positive_int(value):
    """canvas_length 0 (or any non-positive / non-int value) used to become 256 silently."""
    raw = preset("tiny").to_hf_config()
    raw["canvas_length"] = value
    if value is None:  # absent/null -> the released default, as transformers does
        assert ModelConfig.from_hf_config(raw).canvas_length == 256
        return
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_config(raw)
    msg = str(e.value)
    assert f"canvas_length must be a positive integer (got {value!r})" in msg
    assert "config.json" in msg  # the fix
    del raw["canvas_length"]
    assert ModelConfig.from_hf_config(raw).canvas_length == 256


def test_bad_field_names_the_file_and_the_field(tmp_path):
    raw = preset("tiny").to_hf_config()
    raw["canvas_length"] = 0
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "canvas_length" in str(e.value)


@pytest.mark.parametrize("key,value,expect", [
    ("vocab_size", 0, "vocab_size must be a positive integer (got 0)"),
    ("hidden_size", -64, "hidden_size must be a positive integer (got -64)"),
    ("hidden_size", "64", "hidden_size must be a positive integer (got '64')"),
    ("num_hidden_layers", 0, "num_hidden_layers must be a positive integer (got 0)"),
    ("num_hidden_layers", "2", "num_hidden_layers must be a positive integer (got '2')"),
    ("sliding_window", 0, "sliding_window must be a positive integer (got 0)"),
    ("sliding_window", None, "sliding_window must be a positive integer (got None)"),
    ("max_position_embeddings", -1, "max_position_embeddings must be a positive integer (got -1)"),
    ("moe_intermediate_size", 0, "moe_intermediate_size must be a positive integer (got 0)"),
    ("num_experts", 2.0, "num_experts must be a positive integer (got 2.0)"),
    ("rms_norm_eps", 0, "rms_norm_eps must be a positive finite number (got 0)"),
    ("final_logit_softcapping", -30.0, "final_logit_softcapping must be a positive number or null"),
    ("layer_types", "full_attention", "layer_types must be a list"),
    ("rope_parameters", [1], "rope_parameters must be an object"),
])
def test_text_config_fields_are_validated(key, value, expect):
    raw = preset("tiny").to_hf_config()
    raw["text_config"][key] = value
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_config(raw)
    assert expect in str(e.value)


def test_token_ids_must_fit_the_vocabulary():
    raw = preset("tiny").to_hf_config()  # vocab_size 256
    raw["eos_token_id"] = [1, 300]
    with pytest.raises(ConfigError, match=r"eos_token_id\[1\]=300 is outside the vocabulary \(vocab_size=256\)"):
        ModelConfig.from_hf_config(raw)
    raw = preset("tiny").to_hf_config()
    raw["pad_token_id"] = -1
    with pytest.raises(ConfigError, match="pad_token_id must be a non-negative integer"):
        ModelConfig.from_hf_config(raw)
    raw["pad_token_id"] = None  # no pad token is allowed
    assert ModelConfig.from_hf_config(raw).pad_token_id is None


def test_validation_applies_to_every_construction():
    with pytest.raises(ConfigError, match="canvas_length must be a positive integer"):
        preset("tiny").replace(canvas_length=0)
    with pytest.raises(ConfigError, match="canvas_length=8192 exceeds max_position_embeddings=4096"):
        preset("tiny").replace(canvas_length=8192)
    with pytest.raises(ConfigError, match="full_partial_rotary_factor must be in"):
        preset("tiny").replace(full_partial_rotary_factor=1.5)
    cfg = preset("tiny").replace(eos_token_ids=[1, 2])  # a list is accepted and stored as a tuple
    assert cfg.eos_token_ids == (1, 2)
