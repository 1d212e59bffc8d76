"""Checkpoint tests: dgemma <-> transformers 5.23.0 folders both ways, the name map, sharding, tied copies, dtypes,
every malformed-folder error, and atomic saves. Tiny random models on the CPU."""

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from oracle import CONFIGS, hf_model, to_dgemma_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dgemma.checkpoint as ckpt
from dgemma import fsio
from dgemma.cache import KVCache
from dgemma.checkpoint import (
    CheckpointError,
    describe,
    dgemma_shapes,
    dgemma_to_hf,
    hf_shapes,
    hf_to_dgemma,
    load_checkpoint,
    load_generation_config,
    save_checkpoint,
)
from dgemma.model import DiffusionGemma, rope_inv_freq

transformers = pytest.importorskip("transformers")

VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


# ---------------------------------------------------------------------------------------------------------------
# helpers
def random_dgemma(cfg, seed=0, scale=0.3):
    torch.manual_seed(seed)
    model = DiffusionGemma(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale if p.dim() > 1 else torch.rand(p.shape, generator=g) + 0.5)
        for layer in model.layers:
            layer.layer_scalar.copy_(torch.rand(1, generator=g) + 0.5)
            layer.encoder_layer_scalar.copy_(torch.rand(1, generator=g) + 0.5)
    return model


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 2, cfg.sliding_window + 6  # prompt longer than the window, one row left-padded
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, :3] = 0
    canvas = torch.randint(0, cfg.vocab_size, (B, cfg.canvas_length), generator=g)
    sc = torch.randn(B, cfg.canvas_length, cfg.vocab_size, generator=g) * 3
    return ids, am, canvas, sc


@torch.no_grad()
def run_hf(hf, ids, am, canvas, sc):
    pkv = transformers.DynamicCache(config=hf.config.text_config)
    h = hf.model.encoder(input_ids=ids, attention_mask=am, past_key_values=pkv, use_cache=True).last_hidden_state
    dam = torch.cat([am, torch.ones(am.shape[0], canvas.shape[1], dtype=am.dtype)], dim=1)
    logits = hf(decoder_input_ids=canvas, past_key_values=pkv, self_conditioning_logits=sc,
                decoder_attention_mask=dam).logits
    return h, logits


@torch.no_grad()
def run_dgemma(model, ids, am, canvas, sc):
    cache = KVCache.empty(model.config)
    h = model.encode(ids, cache, am)
    return h, model.denoise(canvas, cache, sc)


def assert_same_outputs(a, b, am, tol):
    (ha, la), (hb, lb) = a, b
    valid = am.bool()
    assert (ha - hb)[valid].abs().max().item() <= tol
    assert (la - lb).abs().max().item() <= tol


def header_keys(file):
    with safe_open(str(file), "pt") as f:
        return set(f.keys())


def error_of(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **kw)
    return str(e.value)


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    """A good dgemma checkpoint of the tiny config and the model it holds."""
    model = random_dgemma(CONFIGS["tiny"], seed=1)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_checkpoint(model, path)
    return path, model


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_weights(folder: Path, edit) -> None:
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------
# round trips with transformers
@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_save_loads_in_dgemma(name, tmp_path):
    cfg = CONFIGS[name]
    hf = hf_model(cfg, seed=2)
    hf.save_pretrained(tmp_path)
    loaded_cfg, model = load_checkpoint(tmp_path)
    assert loaded_cfg == cfg
    # the same tensors the independent oracle map gives
    ref_sd = to_dgemma_state_dict(hf)
    sd = model.state_dict()
    assert set(sd) == set(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    x = inputs(cfg)
    assert_same_outputs(run_dgemma(model, *x), run_hf(hf, *x), x[1], tol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dgemma_save_loads_in_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    model = random_dgemma(cfg, seed=3)
    save_checkpoint(model, tmp_path / "ckpt")
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "ckpt").eval()
    assert hf.config.canvas_length == cfg.canvas_length
    hf_sd = hf.state_dict()
    for dk, t in model.state_dict().items():  # every weight landed, including the tied encoder copies
        for hk in ckpt.hf_names(dk):
            if hk in hf_sd:
                assert torch.equal(hf_sd[hk], t), hk
    assert torch.equal(hf_sd["lm_head.weight"], model.embed_tokens.weight)
    x = inputs(cfg, seed=1)
    assert_same_outputs(run_dgemma(model, *x), run_hf(hf, *x), x[1], tol=1e-5)


def test_saved_key_set_equals_transformers(tmp_path):
    for name, cfg in CONFIGS.items():
        hf = hf_model(cfg)
        hf.save_pretrained(tmp_path / f"hf-{name}")
        save_checkpoint(random_dgemma(cfg), tmp_path / f"dg-{name}")
        hf_keys = header_keys(tmp_path / f"hf-{name}" / "model.safetensors")
        text_keys = {k for k in hf_keys if not k.startswith(VISION_PREFIXES)}
        assert header_keys(tmp_path / f"dg-{name}" / "model.safetensors") == text_keys
        assert set(hf_shapes(cfg)) == text_keys
        full_sd = hf.state_dict()
        assert {k: tuple(full_sd[k].shape) for k in text_keys} == hf_shapes(cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_name_map_round_trips(name):
    cfg = CONFIGS[name]
    shapes = dgemma_shapes(cfg)
    assert hf_to_dgemma(dgemma_to_hf(shapes, cfg), cfg) == shapes
    assert set(hf_to_dgemma(list(dgemma_to_hf(list(shapes), cfg)), cfg)) == set(shapes)
    hf = hf_model(cfg)
    # the whole in-memory HF state dict (tied copies, lm_head, vision) maps to the oracle's minimal map
    ours, ref = hf_to_dgemma(hf.state_dict(), cfg), to_dgemma_state_dict(hf)
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    # every encoder scalar is its own tensor; every other key reads from the decoder copy
    sources = hf_to_dgemma(list(hf.state_dict()), cfg)
    assert all(v.startswith("model.decoder.") or k.endswith("encoder_layer_scalar") for k, v in sources.items())


def test_key_rules_are_a_table():
    names = ckpt.hf_names("layers.3.self_attn.q_proj.weight")
    assert names == ["model.decoder.layers.3.self_attn.q_proj.weight",
                     "model.encoder.language_model.layers.3.self_attn.q_proj.weight"]
    assert ckpt.hf_names("embed_tokens.weight") == ["model.decoder.embed_tokens.weight",
                                                    "model.encoder.language_model.embed_tokens.weight",
                                                    "lm_head.weight"]
    assert ckpt.hf_names("layers.0.encoder_layer_scalar") == ["model.encoder.language_model.layers.0.layer_scalar"]
    assert ckpt.hf_names("layers.0.layer_scalar") == ["model.decoder.layers.0.layer_scalar"]


def test_name_map_reports_missing_unexpected_and_shapes():
    cfg = CONFIGS["tiny"]
    hf = dgemma_to_hf(dgemma_shapes(cfg), cfg)
    hf.pop("model.decoder.norm.weight")
    hf["model.decoder.bogus.weight"] = (3,)
    hf["model.decoder.layers.0.encoder_layer_scalar"] = (1,)  # maps to a dgemma name but is no HF name
    hf["model.decoder.layers.0.mlp.up_proj.weight"] = (5, 5)
    hf["model.encoder.vision_tower.x.weight"] = (2,)  # skipped, not unexpected
    with pytest.raises(CheckpointError) as e:
        hf_to_dgemma(hf, cfg)
    msg = str(e.value)
    assert "model.decoder.norm.weight or model.encoder.language_model.norm.weight" in msg
    assert "model.decoder.bogus.weight" in msg and "model.decoder.layers.0.encoder_layer_scalar" in msg
    assert "model.decoder.layers.0.mlp.up_proj.weight expected [96, 64] got [5, 5]" in msg
    assert "vision_tower" not in msg
    hf.update({f"model.decoder.junk{i}": (1,) for i in range(40)})
    with pytest.raises(CheckpointError, match=r"\(and 12 more\)"):  # long lists are cut after 30 names
        hf_to_dgemma(hf, cfg)
    with pytest.raises(CheckpointError, match="unexpected 1 dgemma tensor"):
        dgemma_to_hf({**dgemma_shapes(cfg), "lm_head.weight": (256, 64)}, cfg)


def test_differing_tied_copy_warns(caplog):
    cfg = CONFIGS["tiny"]
    sd = dict(hf_model(cfg).state_dict())
    sd["model.encoder.language_model.norm.weight"] = sd["model.decoder.norm.weight"] + 1
    with caplog.at_level(logging.WARNING, logger="dgemma.checkpoint"):
        out = hf_to_dgemma(sd, cfg)
    assert torch.equal(out["norm.weight"], sd["model.decoder.norm.weight"])  # decoder copy wins
    assert "model.encoder.language_model.norm.weight" in caplog.text


def test_vision_keys_skipped_with_one_line_notice(tmp_path, caplog):
    cfg = CONFIGS["tiny"]
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    n_vision = sum(k.startswith(VISION_PREFIXES) for k in header_keys(tmp_path / "model.safetensors"))
    assert n_vision > 0
    with caplog.at_level(logging.INFO, logger="dgemma.checkpoint"):
        load_checkpoint(tmp_path)
    notes = [r.getMessage() for r in caplog.records if "vision" in r.getMessage()]
    assert len(notes) == 1 and f"skipped {n_vision} vision" in notes[0] and "\n" not in notes[0]


# ---------------------------------------------------------------------------------------------------------------
# layouts and dtypes
def test_sharded_checkpoint_loads(tiny_saved, tmp_path):
    path, model = tiny_saved
    sd = load_file(str(path / "model.safetensors"))
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    for shard, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(out / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, ks in halves.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    _, loaded = load_checkpoint(out)
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    assert describe(out)["weight_files"] == list(halves)


def test_nonfinite_in_shards_names_each_file(tiny_saved, tmp_path):
    """NaN/inf in two shards: one error listing each shard and its tensors; nothing is loaded."""
    path, _ = tiny_saved
    sd = load_file(str(path / "model.safetensors"))
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    out = tmp_path / "sharded-nan"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    bad = [halves["model-00001-of-00002.safetensors"][0], *halves["model-00002-of-00002.safetensors"][:2]]
    for k in bad:
        sd[k] = sd[k].clone()
        sd[k].view(-1)[0] = float("nan") if k == bad[1] else float("inf")
    for shard, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(out / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, ks in halves.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(out)
    msg = str(e.value)
    assert msg.startswith(f"{out}: 2 problems: model-00001-of-00002.safetensors: tensor {bad[0]} (1 of ")
    second = msg.split("model-00002-of-00002.safetensors: 2 tensors contain NaN/inf: ")[1]
    assert f"{bad[1]} (1 of " in second and f"{bad[2]} (1 of " in second
    assert msg.endswith("To fix: the checkpoint is corrupt; re-export or re-download it")
    describe(out)  # headers only: `dgemma info` still describes the folder


def test_encoder_copy_only_checkpoint_loads(tmp_path):
    cfg = CONFIGS["gqa4"]
    hf = hf_model(cfg, seed=4)
    full = hf.state_dict()
    # tied weights only as encoder copies; decoder-only tensors (scalars, self-conditioning) stay
    keep = {k: v for k, v in full.items()
            if not k.startswith("model.decoder.") or k.endswith("layer_scalar") or ".self_conditioning." in k}
    keep.pop("lm_head.weight")
    assert "model.decoder.embed_tokens.weight" not in keep
    save_checkpoint(random_dgemma(cfg), tmp_path)  # for config.json
    save_file({k: v.contiguous().clone() for k, v in keep.items()}, str(tmp_path / "model.safetensors"))
    _, model = load_checkpoint(tmp_path)
    ref = to_dgemma_state_dict(hf)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    # the LM head alone also provides the embedding
    keep.pop("model.encoder.language_model.embed_tokens.weight")
    keep["lm_head.weight"] = full["lm_head.weight"]
    save_file({k: v.contiguous().clone() for k, v in keep.items()}, str(tmp_path / "model.safetensors"))
    _, model = load_checkpoint(tmp_path)
    assert torch.equal(model.embed_tokens.weight, ref["embed_tokens.weight"])


def test_bf16_save_and_load(tmp_path):
    model = random_dgemma(CONFIGS["tiny"], seed=5)
    save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in sorted(f.keys())} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _, loaded = load_checkpoint(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))
    assert describe(tmp_path / "bf16")["dtype"] == "bfloat16"
    # bf16 model saved without dtype stays bf16; loading with an explicit dtype converts
    save_checkpoint(loaded, tmp_path / "bf16-again")
    _, up = load_checkpoint(tmp_path / "bf16-again", dtype="float32")
    assert up.dtype == torch.float32 and torch.equal(up.embed_tokens.weight, loaded.embed_tokens.weight.float())
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        load_checkpoint(tmp_path / "bf16", dtype=torch.int8)


def test_loaded_model_has_no_meta_tensors_and_fresh_buffers(tiny_saved):
    path, model = tiny_saved
    cfg, loaded = load_checkpoint(path)
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert loaded.embed_scale.item() == pytest.approx(math.sqrt(cfg.hidden_size))
    assert torch.equal(loaded.inv_freq_sliding_attention, rope_inv_freq(cfg, "sliding_attention"))
    assert torch.equal(loaded.inv_freq_full_attention, rope_inv_freq(cfg, "full_attention"))
    assert not loaded.training
    x = inputs(cfg)
    assert_same_outputs(run_dgemma(loaded, *x), run_dgemma(model, *x), x[1], tol=0.0)


def test_overwrite_in_place_and_extras(tiny_saved, tmp_path):
    path, _ = tiny_saved
    work = copy_folder(path, tmp_path / "work")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0"}')
    gen = {"max_denoising_steps": 48, "eos_token_id": [1, 106, 50]}
    save_checkpoint(random_dgemma(CONFIGS["tiny"], seed=9), work, generation_config=gen,
                    tokenizer_path=tmp_path / "tok")
    _, model = load_checkpoint(work)  # the folder it was loaded from can be overwritten while the model lives
    save_checkpoint(model, work, generation_config=load_generation_config(work),
                    tokenizer_path=work / "tokenizer.json")
    _, again = load_checkpoint(work)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    assert load_generation_config(work) == gen
    assert (work / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok", "work"]  # no temporary folders left
    info = describe(work)
    assert info["has_generation_config"] and info["has_tokenizer"]


def test_save_through_symlink_replaces_the_real_folder(tiny_saved, tmp_path):
    real = copy_folder(tiny_saved[0], tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    new = random_dgemma(CONFIGS["tiny"], seed=11)
    save_checkpoint(new, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    _, loaded = load_checkpoint(real)
    assert torch.equal(loaded.embed_tokens.weight, new.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


# ---------------------------------------------------------------------------------------------------------------
# malformed folders: one error naming every problem
def test_missing_folder(tmp_path):
    msg = error_of(tmp_path / "nope")
    assert "nope" in msg and "does not exist" in msg and "check the path, or pass random:PRESET" in msg


def test_missing_config_and_weights(tmp_path):
    msg = error_of(tmp_path)
    assert "missing config.json" in msg and "model.safetensors" in msg and "2 problems" in msg


def test_missing_weights_file(tiny_saved, tmp_path):
    work = copy_folder(tiny_saved[0], tmp_path / "w")
    (work / "model.safetensors").unlink()
    assert "missing weights" in error_of(work)


def test_missing_shard_and_bad_index(tiny_saved, tmp_path):
    work = copy_folder(tiny_saved[0], tmp_path / "w")
    keys = sorted(header_keys(work / "model.safetensors"))
    (work / "model.safetensors").rename(work / "model-00001-of-00002.safetensors")
    wm = {k: "model-00001-of-00002.safetensors" for k in keys[:-3]}
    wm.update({k: "model-00002-of-00002.safetensors" for k in keys[-3:]})
    wm["model.decoder.ghost.weight"] = "model-00001-of-00002.safetensors"
    (work / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    msg = error_of(work)
    assert "missing shard model-00002-of-00002.safetensors" in msg
    assert "model.decoder.ghost.weight" in msg  # named in the index but absent from its shard
    assert keys[-1] in msg  # the tensors of the missing shard are reported missing too
    (work / "model.safetensors.index.json").write_text('{"weight_map": {\n  "a": }')
    msg = error_of(work)
    assert "model.safetensors.index.json is not valid JSON" in msg and "line 2" in msg


def test_bad_config_json(tiny_saved, tmp_path):
    work = copy_folder(tiny_saved[0], tmp_path / "w")
    text = (work / "config.json").read_text().splitlines()
    text[3] = text[3] + ",,"
    (work / "config.json").write_text("\n".join(text))
    msg = error_of(work)
    assert "config.json" in msg and "not valid JSON" in msg and "line 4" in msg
    raw = json.loads((tiny_saved[0] / "config.json").read_text())
    del raw["text_config"]["num_experts"]
    (work / "config.json").write_text(json.dumps(raw))
    assert "num_experts" in error_of(work)


def test_missing_unexpected_shape_and_dtype_reported_together(tiny_saved, tmp_path):
    work = copy_folder(tiny_saved[0], tmp_path / "w")

    def edit(sd):
        del sd["model.decoder.layers.1.self_attn.k_norm.weight"]
        del sd["model.encoder.language_model.layers.0.layer_scalar"]
        sd["model.decoder.layers.0.extra.weight"] = torch.zeros(2)
        sd["model.encoder.vision_tower.patch.weight"] = torch.zeros(2)  # skipped, not unexpected
        sd["model.decoder.norm.weight"] = torch.zeros(65)
        sd["model.decoder.layers.0.router.scale"] = torch.zeros(64, dtype=torch.int32)
        sd["model.decoder.layers.0.mlp.up_proj.weight"] = sd["model.decoder.layers.0.mlp.up_proj.weight"].double()

    rewrite_weights(work, edit)
    msg = error_of(work)
    assert "missing 2 tensor(s)" in msg
    assert "model.decoder.layers.1.self_attn.k_norm.weight" in msg
    assert "model.encoder.language_model.layers.0.layer_scalar" in msg
    assert "unexpected 1 tensor(s)" in msg and "model.decoder.layers.0.extra.weight" in msg
    assert "vision_tower" not in msg
    assert "model.decoder.norm.weight expected [64] got [65]" in msg
    assert "model.decoder.layers.0.router.scale has dtype I32" in msg
    assert "model.decoder.layers.0.mlp.up_proj.weight has dtype F64" in msg
    assert "re-save the checkpoint" in msg


def test_truncated_or_empty_weights_file(tiny_saved, tmp_path):
    work = copy_folder(tiny_saved[0], tmp_path / "w")
    data = (work / "model.safetensors").read_bytes()
    (work / "model.safetensors").write_bytes(data[:-100])
    msg = error_of(work)
    assert "truncated" in msg and "missing" not in msg
    (work / "model.safetensors").write_bytes(b"abc")
    assert "not a safetensors file" in error_of(work)
    save_file({}, str(work / "model.safetensors"))
    msg = error_of(work)
    assert f"missing {len(hf_shapes(CONFIGS['tiny']))} tensor(s)" in msg


def test_generation_config(tmp_path):
    assert load_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text('{\n"max_new_tokens": 5,\n}')
    with pytest.raises(CheckpointError) as e:
        load_generation_config(tmp_path)
    assert "generation_config.json" in str(e.value) and "line 3" in str(e.value)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_generation_config(tmp_path / "generation_config.json")


# ---------------------------------------------------------------------------------------------------------------
# atomic saves
def _boom(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("exchange", [True, False])
def test_failed_save_keeps_old_checkpoint(tiny_saved, tmp_path, monkeypatch, exchange):
    path, model = tiny_saved
    work = copy_folder(path, tmp_path / "w")
    if not exchange:  # the two-rename fallback used where the OS cannot swap folders
        monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)
    monkeypatch.setattr(ckpt, "save_file", _boom)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(random_dgemma(CONFIGS["tiny"], seed=7), work)
    monkeypatch.undo()
    _, loaded = load_checkpoint(work)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["w"]
    # and a successful overwrite through the same path
    if not exchange:
        monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)
    new = random_dgemma(CONFIGS["tiny"], seed=8)
    save_checkpoint(new, work)
    _, loaded = load_checkpoint(work)
    assert torch.equal(loaded.embed_tokens.weight, new.embed_tokens.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["w"]


def test_failed_swap_restores_old_checkpoint(tiny_saved, tmp_path, monkeypatch):
    path, model = tiny_saved
    work = copy_folder(path, tmp_path / "w")
    monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder moving into place
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(fsio.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(random_dgemma(CONFIGS["tiny"], seed=7), work)
    monkeypatch.undo()
    _, loaded = load_checkpoint(work)
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["w"]


def test_save_refuses_to_replace_non_checkpoints(tmp_path):
    model = random_dgemma(CONFIGS["tiny"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        save_checkpoint(model, tmp_path / "notes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        save_checkpoint(model, tmp_path / "file")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        save_checkpoint(model, tmp_path / "new", tokenizer_path=tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes"]


# ---------------------------------------------------------------------------------------------------------------
# describe
def test_describe_reads_headers_only(tiny_saved, monkeypatch):
    path, model = tiny_saved
    monkeypatch.setattr(ckpt, "safe_open", _boom)  # no tensor is read
    info = describe(path)
    cfg = model.config
    assert info["config"]["layers"] == cfg.num_hidden_layers and info["config"]["experts"] == cfg.num_experts
    assert info["config"]["global_head_dim"] == cfg.global_head_dim and info["config"]["canvas_length"] == 32
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert info["parameters"]["total"] == total
    assert info["parameters"]["active_per_token"] == total - experts + experts * cfg.top_k_experts // cfg.num_experts
    assert info["dtype"] == "float32"
    assert info["file_size_bytes"] == (path / "model.safetensors").stat().st_size
    assert info["tensors"] == len(hf_shapes(cfg))
