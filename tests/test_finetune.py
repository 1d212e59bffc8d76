"""`dgemma finetune`: resume equals uninterrupted (full and LoRA), 2 processes equal 1, the command line end to end
(finetune -> generate --adapter -> lora merge), gradient checkpointing changes nothing, clear errors."""

import json
import os
import signal
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dgemma.checkpoint import load_checkpoint, save_checkpoint
from dgemma.config import preset
from dgemma.model import DiffusionGemma, init_weights
from dgemma.train.finetune import FinetuneConfig
from dgemma.train.finetune_loop import finetune
from dgemma.train.sft import prepare_sft

TOKENIZER = Path(__file__).resolve().parents[1] / "dgemma" / "assets" / "tokenizer.json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    cfg = preset("tiny").replace(vocab_size=8192, canvas_length=8, eos_token_ids=(1, 6), bos_token_id=2,
                                 pad_token_id=0)
    save_checkpoint(init_weights(DiffusionGemma(cfg), std=0.05, seed=0), root / "base", tokenizer_path=TOKENIZER)
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Say {i} twice"},
                                      {"role": "assistant", "content": f"{i} {i}" + " and more" * (i % 4)}]})
             for i in range(48)]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    prepare_sft([str(root / "chat.jsonl")], root / "data", "chat", TOKENIZER, val_fraction=0.2)
    return root


def _cfg(setup, out, **kw) -> FinetuneConfig:
    base = {"model": str(setup / "base"), "data": str(setup / "data"), "out": str(out), "steps": 4, "batch_size": 4,
            "seq_len": 32, "warmup_steps": 1, "val_every": 2, "val_batches": 1, "ckpt_every": 2, "progress": "none",
            "threads": 1, "bf16": False}  # fp32 everywhere: the equalities below hold to fp32 roundoff
    return FinetuneConfig(**{**base, **kw})


def _trained(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "adapter_model.safetensors"))
    return load_checkpoint(folder, dtype=torch.float32)[1].state_dict()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_equals_uninterrupted(setup, tmp_path, lora_rank):
    full = finetune(_cfg(setup, tmp_path / "a", lora_rank=lora_rank, lora_dropout=0.1 if lora_rank else 0.0))

    def interrupt(rec):
        if rec["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: handled after the step, then a checkpoint

    cut = _cfg(setup, tmp_path / "b", lora_rank=lora_rank, lora_dropout=0.1 if lora_rank else 0.0)
    first = finetune(cut, on_step=interrupt)
    assert first["stopped"] == "SIGINT" and first["step"] == 2
    resumed = finetune(replace(cut, resume=True))
    assert full["step"] == resumed["step"] == 4
    a, b = _trained(tmp_path / "a" / "latest"), _trained(tmp_path / "b" / "latest")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in full["history"][2:]] == [r["loss"] for r in resumed["history"]]
    if lora_rank:
        assert full["trainable_share"] < 0.05
    else:  # the router stays frozen in full fine-tuning
        base = load_checkpoint(setup / "base", dtype=torch.float32)[1].state_dict()
        assert torch.equal(a["layers.0.router.proj.weight"], base["layers.0.router.proj.weight"])
        assert not torch.equal(a["layers.0.self_attn.q_proj.weight"], base["layers.0.self_attn.q_proj.weight"])
    with pytest.raises(ValueError, match="different settings"):
        finetune(replace(cut, resume=True, lr=0.5))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        finetune(_cfg(setup, tmp_path / "b", lora_rank=lora_rank))


def test_gradient_checkpointing_gives_the_same_training(setup, tmp_path):
    a = finetune(_cfg(setup, tmp_path / "a", lora_rank=2, steps=2, val_every=0))
    b = finetune(_cfg(setup, tmp_path / "b", lora_rank=2, steps=2, val_every=0, gradient_checkpointing=True))
    assert [r["loss"] for r in a["history"]] == pytest.approx([r["loss"] for r in b["history"]], abs=1e-5)
    ta, tb = _trained(tmp_path / "a" / "latest"), _trained(tmp_path / "b" / "latest")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-5) for k in ta)


def test_command_line_finetune_generate_with_adapter_and_merge(setup, tmp_path, capsys):
    from dgemma.cli.main import main

    run = tmp_path / "run"
    assert main(["finetune", "--model", str(setup / "base"), "--data", str(setup / "data"), "--out", str(run),
                 "--lora-rank", "4", "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--progress", "none",
                 "--threads", "1"]) == 0
    adapter = run / "latest"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    # --resume alone continues the run with its own flags (model, data, rank, batch)
    assert main(["finetune", "--out", str(run), "--resume", "--steps", "3"]) == 0
    assert (run / "checkpoints" / "step-000003" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["finetune", "--out", str(tmp_path / "other"), "--steps", "3"]) == 2
    assert "--model and --data are required" in capsys.readouterr().err
    adapter = run / "latest"
    args = ["generate", "--model", str(setup / "base"), "--max-new-tokens", "8", "--stats", "none", "hello"]
    assert main(args + ["--adapter", str(adapter)]) == 0
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["lora", "merge", "--model", str(setup / "base"), "--adapter", str(adapter), "--out",
                 str(merged)]) == 0
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    # The merged model decodes as the base with the adapter (greedy AR: deterministic).
    assert main(["generate", "--model", str(merged), "--mode", "ar", "--max-new-tokens", "8", "--stats", "none",
                 "hello"]) == 0
    merged_text = capsys.readouterr().out
    assert main(["generate", "--model", str(setup / "base"), "--adapter", str(adapter), "--mode", "ar",
                 "--max-new-tokens", "8", "--stats", "none", "hello"]) == 0
    assert capsys.readouterr().out == merged_text
    assert main(["lora", "merge", "--model", str(setup / "base"), "--adapter", str(tmp_path / "none"), "--out",
                 str(tmp_path / "m2")]) == 2
    assert "adapter_config.json not found" in capsys.readouterr().err
    assert main(["finetune", "--model", str(setup / "base"), "--data", str(setup / "base"), "--out",
                 str(tmp_path / "r2")]) == 2
    assert "prepare SFT data" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: FinetuneConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    finetune(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_two_processes_match_one(setup, tmp_path, lora_rank, fsdp):
    import torch.multiprocessing as mp

    one = _cfg(setup, tmp_path / "one", lora_rank=lora_rank, steps=2, val_every=0, grad_accum=2)
    finetune(one)
    two = replace(one, out=str(tmp_path / "two"), fsdp=fsdp)
    mp.spawn(_worker, args=(2, _free_port(), two), nprocs=2, join=True)
    a, b = _trained(tmp_path / "one" / "latest"), _trained(tmp_path / "two" / "latest")
    assert all(torch.allclose(a[k], b[k], atol=2e-6, rtol=1e-5) for k in a)
