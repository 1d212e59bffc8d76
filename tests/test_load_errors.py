"""First contact on any machine (issue 9): every wrong thing a user can hand `dgemma.api.load` / `dgemma info`
fails with one clear error naming the input and the fix, and nothing silently wrong comes out. Tiny, CPU only."""

import json
import os
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file

from dgemma.api import ModelLoadError, load
from dgemma.checkpoint import CheckpointError, describe, load_checkpoint, run_folder_checkpoint
from dgemma.cli.main import main
from dgemma.config import ConfigError
from dgemma.tokenizer import Tokenizer


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---- 2. NaN / inf in the weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_names_tensor_and_file(tiny_checkpoint, tmp_path, value):
    folder = _copy(tiny_checkpoint, tmp_path / "corrupt")
    sd = load_file(folder / "model.safetensors")
    key = "model.decoder.layers.1.mlp.down_proj.weight"
    sd[key] = sd[key].clone()
    sd[key].view(-1)[7] = value
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for call in (lambda: load_checkpoint(folder), lambda: load(folder)):
        with pytest.raises(CheckpointError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{folder / 'model.safetensors'}: tensor {key} (1 of ")
        assert "contains NaN/inf" in msg and "the checkpoint is corrupt; re-export or re-download it" in msg
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "2", "x"]) == 2


def test_nonfinite_check_reads_tensor_by_tensor(tiny_checkpoint, monkeypatch):
    """Every tensor is checked, one at a time, as read from the file (no second copy of the model)."""
    import dgemma.checkpoint as ckpt

    seen = []
    real = ckpt.count_nonfinite
    monkeypatch.setattr(ckpt, "count_nonfinite", lambda t: seen.append(t.numel()) or real(t))
    _, model = load_checkpoint(tiny_checkpoint)
    assert len(seen) == len(model.state_dict())  # every stored tensor, each on its own
    monkeypatch.setattr(ckpt, "NONFINITE_CHUNK", 100)  # many chunks: a NaN in the last one is still found
    t = torch.zeros(1000)
    t[-1] = float("nan")
    assert real(t) == 1 and real(torch.zeros(1000)) == 0 and real(torch.zeros(3, dtype=torch.long)) == 0


def test_float16_overflow_is_an_error(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "big")
    sd = load_file(folder / "model.safetensors")
    key = "model.decoder.norm.weight"
    sd[key] = sd[key].clone()
    sd[key][0] = 1e6  # finite in fp32, infinite in fp16
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="beyond float16's range.*load in bfloat16 or float32"):
        load_checkpoint(folder, dtype=torch.float16)
    load_checkpoint(folder, dtype=torch.bfloat16)  # fine in bf16


# ---- 3. config fields --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -8, "32"])
def test_bad_canvas_length_in_config_json(tiny_checkpoint, tmp_path, value):
    folder = _copy(tiny_checkpoint, tmp_path / "cfg")
    raw = json.loads((folder / "config.json").read_text())
    raw["canvas_length"] = value
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError) as e:
        load(folder)
    msg = str(e.value)
    assert str(folder / "config.json") in msg and f"canvas_length must be a positive integer (got {value!r})" in msg
    assert "correct these fields in config.json" in msg
    with pytest.raises(CheckpointError, match="canvas_length"):
        describe(folder)


# ---- 4. a tokenizer that does not fit the model ------------------------------------------------------------------
def _word_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    return Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")))


def test_tokenizer_special_ids_outside_the_vocabulary(tiny_checkpoint, tmp_path):
    """A tokenizer smaller than the model (so the size check passes) whose <eos> id is beyond the model's rows."""
    folder = _copy(tiny_checkpoint, tmp_path / "mismatch")
    V = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    tok = _word_tokenizer({"<pad>": 0, "<unk>": 3, "<bos>": 2, "a": 4, "b": 5, "<eos>": V + 10})
    assert tok.vocab_size < V
    tok.save(folder)
    with pytest.raises(ModelLoadError) as e:
        load(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder}: tokenizer's special ids lie outside the model's vocabulary (ids 0..{V - 1})")
    assert f"eos '<eos>' = {V + 10}" in msg and "use the tokenizer.json the model was trained with" in msg


def test_tokenizer_larger_than_the_model(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "big-tok")
    V = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    vocab = {f"t{i}": i for i in range(V + 5)}
    vocab.update({"<unk>": V + 5})
    _word_tokenizer(vocab).save(folder)
    with pytest.raises(ModelLoadError, match=f"tokenizer has {V + 6} tokens but the model only {V}"):
        load(folder)


def test_tokenizer_check_applies_to_random_presets(monkeypatch):
    from dgemma import api

    calls = []
    real = api._check_tokenizer_fits
    monkeypatch.setattr(api, "_check_tokenizer_fits", lambda tok, v, where: calls.append((v, where)) or real(tok, v, where))
    lm = load("random:tiny")
    assert calls and calls[0][0] == lm.model.config.vocab_size and calls[0][1].startswith("random:tiny")
    with pytest.raises(ModelLoadError, match="outside the model's vocabulary"):
        real(_word_tokenizer({"<unk>": 0, "<eos>": 99}), 10, "random:tiny")


# ---- 5. a training run folder, a folder without config.json, a wrong path ---------------------------------------
def test_run_folder_suggests_latest(tiny_checkpoint, tmp_path):
    run = tmp_path / "runs" / "x"
    step = _copy(tiny_checkpoint, run / "checkpoints" / "step-000010")
    (run / "train_config.json").write_text("{}")
    os.symlink(os.path.relpath(step, run), run / "latest")
    assert run_folder_checkpoint(run) == run / "latest"
    with pytest.raises(ModelLoadError) as e:
        load(run)
    assert str(e.value) == (f"{run} is a training run folder, not a checkpoint (no config.json at its top level); "
                            f"pass --model {run / 'latest'} (its newest checkpoint)")
    with pytest.raises(CheckpointError, match=f"training run folder.*pass {run / 'latest'}"):
        describe(run)
    assert load(run / "latest").model.config.vocab_size > 0  # and the suggestion works
    (run / "latest").unlink()  # no link: the newest step folder
    _copy(tiny_checkpoint, run / "checkpoints" / "step-000020")
    assert run_folder_checkpoint(run) == run / "checkpoints" / "step-000020"
    with pytest.raises(ModelLoadError, match="step-000020"):
        load(run)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError) as e:
        load(tmp_path / "empty")
    assert str(e.value).startswith(f"{tmp_path / 'empty'} has no config.json, so it is not a model checkpoint; "
                                   "pass a checkpoint folder (config.json, model.safetensors, tokenizer.json)")


def test_wrong_paths(tiny_checkpoint, tmp_path):
    with pytest.raises(ModelLoadError, match=f"model path {tmp_path / 'nope'} does not exist; pass a checkpoint"):
        load(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=f"is a file, not a checkpoint folder; pass the folder holding it, "
                                             f"{tiny_checkpoint}"):
        load(tiny_checkpoint / "config.json")
    with pytest.raises(ModelLoadError, match=r"random:huge: unknown preset 'huge'; use random:NAME"):
        load("random:huge")


# ---- 7. dgemma info on random:PRESET ----------------------------------------------------------------------------
def test_describe_random_preset_matches_a_saved_folder(tiny_checkpoint):
    rnd, folder = describe("random:tiny"), describe(tiny_checkpoint)
    assert set(rnd) == set(folder)
    assert rnd["config"] == folder["config"] and rnd["parameters"] == folder["parameters"]
    assert rnd["tensors"] == folder["tensors"] and rnd["path"] == "random:tiny"
    assert rnd["config"]["vocab_size"] == load("random:tiny").model.config.vocab_size


def test_dgemma_info_random_and_errors(capsys, tmp_path):
    assert main(["info", "random:tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["layers"] == 2
    assert main(["info", "random:nope"]) == 2
    assert "random:nope: unknown preset 'nope'" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint folder does not exist" in err and "random:PRESET" in err
    with pytest.raises(ConfigError):
        describe("random:")


# ---- 8. the api.py docstring example --------------------------------------------------------------------------
def test_api_docstring_example_loads():
    """The example's first two lines (load) run; see the report for generate_text's max_new_tokens."""
    from dgemma import api

    assert 'load("models/dgemma-py-small")' in api.__doc__
    lm = load("random:tiny")
    assert lm.tokenizer.add_bos_default is True  # the property encode_prompts is to use
