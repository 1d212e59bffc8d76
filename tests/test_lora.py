"""LoRA: zero-B equals the base exactly, merge/unmerge round trip, the PEFT format against PEFT + transformers 5.23.0
(the oracle), adapters refused when dgemma cannot apply them."""

import json

import pytest
import torch
from helpers import random_model
from oracle import CONFIGS, dgemma_from_hf, hf_model

from dgemma.cache import KVCache
from dgemma.checkpoint import load_checkpoint, save_checkpoint
from dgemma.lora import (
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from dgemma.model import DiffusionGemma


def _model(name="tiny", seed=0) -> DiffusionGemma:
    return random_model(CONFIGS[name], seed, scale=0.3)


def _logits(model, ids, canvas, sc=None):
    with torch.no_grad():
        cache = KVCache.empty(model.config)
        h = model.encode(ids, cache)
        return model.logits(h), model.denoise(canvas, cache, sc)


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 2 * cfg.sliding_window + 3), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)
    sc = torch.randn(2, cfg.canvas_length, cfg.vocab_size, generator=g) * 3
    return ids, canvas, sc


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_zero_b_equals_the_base_exactly(rank):
    model = _model()
    ids, canvas, sc = _inputs(model.config)
    ref = _logits(model, ids, canvas, sc)
    apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank))
    assert len(lora_modules(model)) > 0
    got = _logits(model, ids, canvas, sc)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_only_adapter_parameters_train_and_targets_skip_experts_router_and_self_conditioning():
    model = apply_lora(_model(), LoRAConfig(rank=4))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A" in n or ".lora_B" in n for n in names)
    wrapped = set(lora_modules(model))
    assert not any("experts" in n or "router" in n or "self_conditioning" in n for n in wrapped)
    assert "layers.1.self_attn.v_proj" not in wrapped  # full layers have no v_proj
    assert {"layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"} <= wrapped
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < 0.2 * total
    with pytest.raises(LoRAError, match="already carries"):
        apply_lora(model, LoRAConfig(rank=4))
    with pytest.raises(LoRAError, match="lora-targets"):
        LoRAConfig(targets=("experts",)).validate()


def _randomise_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def test_merge_then_unmerge_returns_the_base_weights_and_merge_keeps_outputs():
    model = _model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    _randomise_adapter(model)
    ids, canvas, sc = _inputs(model.config)
    unmerged = _logits(model, ids, canvas, sc)
    for m in lora_modules(model).values():
        m.merge()
    merged = _logits(model, ids, canvas, sc)
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(unmerged, merged))
    for m in lora_modules(model).values():
        m.unmerge()
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == base.keys()
    assert all(torch.allclose(after[k], base[k], atol=1e-6, rtol=0) for k in base)
    merge_lora(model)
    assert not lora_modules(model) and all(type(m) is not LoRALinear for m in model.modules())
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(unmerged, _logits(model, ids, canvas, sc)))


def _train_adapter(model, steps=3):
    """A few optimizer steps of the SFT objective so that both A and B move away from their initialisation."""
    from dgemma.train.objective import sample_noise, sft_losses
    from dgemma.train.sft import ANSWER, ANSWER_FILL, FILL, PROMPT

    cfg = model.config
    C = cfg.canvas_length
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    roles = torch.tensor([[FILL] * 3 + [PROMPT] * (C - 3) + [ANSWER] * (C + 2) + [ANSWER_FILL] * (C - 2)] * 2,
                         dtype=torch.int8)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, roles.shape, generator=g)
        noise = sample_noise(x, cfg.vocab_size, g)
        loss, _, _ = sft_losses(model, x, roles, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _hf_logits(hf, ids, canvas, sc):
    from transformers import DynamicCache

    base = hf.get_base_model() if hasattr(hf, "get_base_model") else hf  # PEFT injects its layers in place
    with torch.no_grad():
        pkv = DynamicCache(config=base.config.text_config)
        am = torch.ones_like(ids)
        enc = base.model.encoder(input_ids=ids, attention_mask=am, past_key_values=pkv, use_cache=True)
        dam = torch.cat([am, torch.ones_like(canvas)], dim=1)
        logits = hf(decoder_input_ids=canvas, past_key_values=pkv, self_conditioning_logits=sc,
                    decoder_attention_mask=dam).logits
    return enc.last_hidden_state, logits


@pytest.mark.parametrize("name", ["tiny", "gqa4"])
def test_oracle_peft_on_transformers_matches_dgemma_with_the_adapter_and_merged(name, tmp_path):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = CONFIGS[name]
    hf = hf_model(cfg, seed=3)
    ours = dgemma_from_hf(hf, cfg)
    torch.manual_seed(0)
    apply_lora(ours, LoRAConfig(rank=4, alpha=8))
    _train_adapter(ours)
    assert all(m.lora_B.abs().max() > 0 for m in lora_modules(ours).values())
    save_adapter(ours, tmp_path / "adapter")
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 4 and raw["lora_alpha"] == 8

    ids, canvas, sc = _inputs(cfg, seed=5)
    with torch.no_grad():
        cache = KVCache.empty(cfg)
        h_ours = ours.encode(ids, cache)
        l_ours = ours.denoise(canvas, cache, sc)

    _, l_base = _hf_logits(hf, ids, canvas, sc)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    n_wrapped = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert n_wrapped == 2 * len(lora_modules(ours))  # encoder and decoder copies
    h_peft, l_peft = _hf_logits(peft_model, ids, canvas, sc)
    assert (h_ours - h_peft).abs().max() < 1e-4
    assert (l_ours - l_peft).abs().max() < 1e-4
    assert (l_base - l_peft).abs().max() > 1e-2  # the adapter changes the outputs: the test can fail

    # The merged checkpoint, loaded in either library.
    merged = merge_lora(ours)
    save_checkpoint(merged, tmp_path / "merged")
    _, ours_merged = load_checkpoint(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        cache = KVCache.empty(cfg)
        ours_merged.encode(ids, cache)
        l_merged = ours_merged.denoise(canvas, cache, sc)
    assert (l_merged - l_peft).abs().max() < 1e-4
    from transformers import DiffusionGemmaForBlockDiffusion

    hf_merged = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    _, l_hf_merged = _hf_logits(hf_merged, ids, canvas, sc)
    assert (l_hf_merged - l_peft).abs().max() < 1e-4


def test_save_then_load_adapter_reproduces_the_model(tmp_path):
    model = apply_lora(_model(), LoRAConfig(rank=3, alpha=5, targets=("q_proj", "o_proj", "up_proj")))
    _randomise_adapter(model)
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(_model(), tmp_path / "a")
    ids, canvas, sc = _inputs(model.config)
    assert all(torch.equal(a, b) for a, b in zip(_logits(model, ids, canvas, sc), _logits(fresh, ids, canvas, sc)))
    assert set(lora_modules(fresh)) == set(lora_modules(model))


def test_adapters_dgemma_cannot_apply_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = apply_lora(_model(), LoRAConfig(rank=2))
    _randomise_adapter(model)
    save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / ADAPTER_WEIGHTS
    tensors = load_file(str(file))
    key = next(k for k in tensors if "encoder.language_model" in k and k.endswith("lora_B.weight"))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(file))
    with pytest.raises(LoRAError, match="encoder and decoder copies"):
        load_adapter(_model(), tmp_path / "a")
    config = tmp_path / "a" / "adapter_config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "use_dora": True}))
    with pytest.raises(LoRAError, match="use_dora"):
        load_adapter(_model(), tmp_path / "a")
    with pytest.raises(LoRAError, match="not found"):
        load_adapter(_model(), tmp_path / "missing")
