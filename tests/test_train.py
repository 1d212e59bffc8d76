"""`dgemma train`: schedule, overfitting, exact resume, Ctrl-C, interrupted checkpoint writes, clear errors, and
data-parallel runs (DDP and FSDP2 over gloo, 2 processes) equal to one process. Tiny models, synthetic data, CPU."""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dgemma.checkpoint import load_checkpoint, save_checkpoint
from dgemma.config import preset
from dgemma.model import DiffusionGemma, init_weights
from dgemma.options import add_train
from dgemma.train.loop import lr_factor
from dgemma.train.objective import ObjectiveError
from dgemma.train.pretrain import (
    DataSource,
    TrainConfig,
    TrainError,
    config_from_args,
    synthetic_data,
    train,
)
from dgemma.train.runs import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(out, **changes) -> TrainConfig:
    base = TrainConfig(out=str(out), preset="tiny", synthetic_data=True, seq_len=64, batch_size=4, steps=6, lr=3e-3,
                       warmup_steps=2, bf16=False, val_every=0, ckpt_every=0, progress="none", threads=1)
    return replace(base, **changes)


def data_for(cfg: TrainConfig, **kw) -> DataSource:
    return synthetic_data(256, cfg.batch_size, cfg.seq_len, seed=cfg.seed, **kw)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def test_lr_schedule():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg) == pytest.approx(0.1)


def test_wsd_schedule_is_constant_then_decays_linearly_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_steps=20)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert [lr_factor(s, cfg) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_factor(80, cfg) == pytest.approx(1 - 1 / 20)
    assert lr_factor(89, cfg) == pytest.approx(0.5)
    assert lr_factor(99, cfg) == pytest.approx(0.0)
    assert lr_factor(150, cfg) == pytest.approx(0.0)
    constant = replace(cfg, decay_steps=0)
    assert lr_factor(99, constant) == lr_factor(10_000, constant) == 1.0
    for bad, match in (({"schedule": "linear"}, "--schedule"), ({"decay_steps": 5}, "wsd only"),
                       ({"schedule": "wsd", "decay_steps": 200}, "must not exceed")):
        with pytest.raises(TrainError, match=match):
            replace(TrainConfig(synthetic_data=True, steps=100), **bad).validate()


def test_a_stage_resumed_with_its_final_decay_keeps_the_data_order_and_schedule(tmp_path):
    """Staged training: a constant-rate stage stops; the next run resumes it with a decay added at the end. The
    steps before the decay are the ones an uninterrupted constant run takes (same batches, same noise, same lr),
    and the decay follows the documented schedule."""
    stage = tiny_cfg(tmp_path / "a", steps=100, schedule="wsd", warmup_steps=2, min_lr_ratio=0.0)
    whole = train(replace(stage, steps=7, out=str(tmp_path / "whole")), data=data_for(stage))
    first = train(replace(stage, steps=4), data=data_for(stage))
    assert first.step == 4 and [r["lr"] for r in first.history][2:] == [stage.lr, stage.lr]
    decayed = replace(stage, steps=7, decay_steps=2, min_lr_ratio=0.0, resume=True)
    second = train(decayed, data=data_for(decayed))
    assert [r["step"] for r in second.history] == [5, 6, 7]
    assert [r["lr"] for r in second.history] == pytest.approx([stage.lr, stage.lr / 2, 0.0])
    for want, got in zip(whole.history[4:], second.history, strict=True):  # same batches and noise: same tokens
        assert got["tokens"] == want["tokens"]
    for key in ("loss", "diffusion", "ar"):  # step 5 ran at the same weights and rate in both runs
        assert second.history[0][key] == pytest.approx(whole.history[4][key], rel=1e-6, abs=1e-6)


def test_cli_flags_mirror_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    add_train(parser.add_subparsers(dest="command"))
    assert config_from_args(parser.parse_args(["train"])) == TrainConfig()
    args = parser.parse_args(["train", "--no-bf16", "--val-t", "0.1", "0.9", "--preset", "tiny", "--grad-accum", "3"])
    cfg = config_from_args(args)
    assert (cfg.bf16, cfg.val_t, cfg.preset, cfg.grad_accum) == (False, (0.1, 0.9), "tiny", 3)


@pytest.mark.slow
def test_overfits_a_small_batch(tmp_path):
    cfg = tiny_cfg(tmp_path, batch_size=2, steps=300, lr=5e-3, warmup_steps=10, weight_decay=0.0, seed=2)
    result = train(cfg, data=data_for(cfg, num_batches=1))
    first = result.history[0]["loss"]
    last = statistics.mean(r["loss"] for r in result.history[-20:])
    assert first > 10  # two losses of about log(256) each
    assert last <= 0.1 * first, (first, last)


def test_resume_equals_uninterrupted_and_ctrl_c_stops_cleanly(tmp_path):
    cfg = tiny_cfg(tmp_path / "a", steps=8, grad_accum=2, val_every=3, val_batches=1)
    full = train(cfg, data=data_for(cfg))
    assert full.stopped is None and full.step == 8

    cut = replace(cfg, out=str(tmp_path / "b"))
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in the background (nohup, CI)

    def interrupt(rec):
        if rec["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: handled after the step, then a checkpoint

    first = train(cut, data=data_for(cut), on_step=interrupt)
    assert first.stopped == "SIGINT" and first.step == 4
    assert first.checkpoint.name == "step-000004" and latest_checkpoint(cut.out) == first.checkpoint
    assert signal.getsignal(signal.SIGINT) == handler_before  # handler restored
    with pytest.raises(TrainError, match="pass --resume"):
        train(cut, data=data_for(cut))
    second = train(replace(cut, resume=True), data=data_for(cut))
    assert second.step == 8 and [r["step"] for r in second.history] == [5, 6, 7, 8]

    for want, got in zip(full.history[4:], second.history, strict=True):
        for key in ("loss", "diffusion", "ar", "grad_norm", "lr", "tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
    assert full.validations[-1]["val_diffusion"] == pytest.approx(second.validations[-1]["val_diffusion"], rel=1e-6)
    wa, wb = weights(full.checkpoint), weights(second.checkpoint)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
    # the log holds every step once, in order, across the interruption
    steps = [json.loads(line)["step"] for line in (Path(cut.out) / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 9))
    # checkpoints are Hugging Face folders with the trainer state beside the weights
    config, _ = load_checkpoint(second.checkpoint)
    assert config == DiffusionGemma(config).config and config.vocab_size == 256
    assert (second.checkpoint / "generation_config.json").is_file()


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_exits_0_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dgemma.train", "--synthetic-data", "--preset", "tiny", "--seq-len", "32",
           "--batch-size", "2", "--steps", "100000", "--out", str(out), "--no-bf16", "--threads", "1",
           "--progress", "lines", "--log-every", "1", "--val-every", "0", "--ckpt-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and log.read_text().count('"train"') >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped at step" in err and "--resume" in err
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and (ckpt / "trainer_state.pt").is_file()
    load_checkpoint(ckpt)


KILL_SCRIPT = """
import os, signal, sys, torch
import dgemma.train.pretrain as T
real_save = torch.save
def dying_save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("step") == 4:  # the second checkpoint: write half, then die
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
T.torch.save = dying_save
cfg = T.TrainConfig(out=sys.argv[1], preset="tiny", synthetic_data=True, seq_len=32, batch_size=2, steps=6,
                    bf16=False, val_every=0, ckpt_every=2, progress="none", threads=1)
T.train(cfg)
"""


def test_checkpoint_write_killed_midway_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out)], env=env, capture_output=True,
                          timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    leftovers = [p.name for p in (out / "checkpoints").iterdir()]
    assert ".step-000004.partial" in leftovers and "step-000004" not in leftovers
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step-000002" and (out / "latest").resolve() == ckpt
    load_checkpoint(ckpt)
    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["step"] == 2
    cfg = TrainConfig(out=str(out), preset="tiny", synthetic_data=True, seq_len=32, batch_size=2, steps=6,
                      bf16=False, val_every=0, ckpt_every=2, progress="none", threads=1, resume=True)
    result = train(cfg)
    assert [r["step"] for r in result.history] == [3, 4, 5, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]


# ---------------------------------------------------------------------------------------------------------------
# Clear errors
def test_vocabulary_mismatch_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path / "a")
    with pytest.raises(TrainError, match="vocabulary mismatch.*300 tokens.*vocab_size=256.*--vocab-size 300"):
        train(cfg, data=synthetic_data(300, 4, 64))
    # with --vocab-size the preset is built at the tokenizer's size
    ok = train(replace(cfg, vocab_size=300, steps=1), data=synthetic_data(300, 4, 64))
    assert load_checkpoint(ok.checkpoint)[0].vocab_size == 300
    # fine-tuning a checkpoint on data from another tokenizer
    with pytest.raises(TrainError, match="vocabulary mismatch.*checkpoint"):
        train(replace(cfg, out=str(tmp_path / "b"), preset=None, init_from=str(ok.checkpoint)),
              data=synthetic_data(256, 4, 64))
    # a loader that yields ids the model does not have (no vocabulary declared up front)
    bad = synthetic_data(1000, 4, 64)
    bad.vocab_size = None
    with pytest.raises(ObjectiveError, match="outside the model's vocabulary"):
        train(replace(cfg, out=str(tmp_path / "c")), data=bad)


def test_other_architecture_is_a_clear_error(tmp_path):
    # a checkpoint folder of a different model family
    alien = tmp_path / "llama"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 256, "hidden_size": 64}))
    cfg = tiny_cfg(tmp_path / "a", preset=None, init_from=str(alien))
    with pytest.raises(TrainError, match="cannot fine-tune from .*llama.*not a DiffusionGemma"):
        train(cfg, data=data_for(cfg))

    # resuming a run whose checkpoint holds another DiffusionGemma shape
    cfg = tiny_cfg(tmp_path / "b", steps=2)
    done = train(cfg, data=data_for(cfg))
    other = init_weights(DiffusionGemma(preset("tiny").replace(hidden_size=32)), seed=0)
    save_checkpoint(other, tmp_path / "other")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "other" / name, done.checkpoint / name)
    with pytest.raises(TrainError, match="different architecture.*hidden_size"):
        train(replace(cfg, resume=True, steps=4), data=data_for(cfg))

    # resuming with a different preset than the run was started with
    with pytest.raises(TrainError, match="cannot resume .*--preset: run has 'tiny', now 'small'"):
        train(replace(cfg, resume=True, preset="small"), data=data_for(cfg))


def test_seq_len_must_hold_whole_canvases(tmp_path):
    with pytest.raises(TrainError, match="not a multiple of the model's canvas_length=32"):
        train(tiny_cfg(tmp_path, seq_len=48), data=synthetic_data(256, 4, 48))
    with pytest.raises(TrainError, match="--batch-size must be >= 1"):
        train(tiny_cfg(tmp_path, batch_size=0))


def test_resume_with_nothing_to_resume_is_an_error(tmp_path, capsys):
    from dgemma.cli.main import main

    with pytest.raises(TrainError, match=r"--resume: nothing to resume, .*new does not exist; drop --resume"):
        train(tiny_cfg(tmp_path / "new", resume=True))
    (tmp_path / "half" / "checkpoints" / ".step-000002.partial").mkdir(parents=True)  # an interrupted first write
    with pytest.raises(TrainError, match="half has no complete checkpoint"):
        train(tiny_cfg(tmp_path / "half", resume=True))
    argv = ["train", "--synthetic-data", "--preset", "tiny", "--out", str(tmp_path / "new"), "--progress", "none"]
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dgemma train: error: --resume: nothing to resume")
    assert not (tmp_path / "new").exists()
    assert main([*argv, "--threads", "0"]) == 2
    assert "argument --threads: must be an integer >= 1 (got 0)" in capsys.readouterr().err
    with pytest.raises(TrainError, match="--threads must be >= 1"):  # the API checks it too
        train(tiny_cfg(tmp_path / "new", threads=0))
    with pytest.raises(TrainError, match="--lr must be a finite number"):
        train(tiny_cfg(tmp_path / "new", lr=float("inf")))


def test_resume_on_the_command_line_takes_the_runs_own_flags(tmp_path, capsys):
    """`dgemma train --out RUN --resume` continues the run as it was started (every flag not given comes from
    RUN/train_config.json); flags given override, and those that must agree with the run are still checked."""
    from dgemma.cli.main import main

    out = tmp_path / "run"
    start = ["train", "--synthetic-data", "--preset", "tiny", "--seq-len", "32", "--batch-size", "3", "--steps", "2",
             "--lr", "2e-3", "--val-t", "0.3", "--no-bf16", "--threads", "1", "--val-every", "0", "--ckpt-every", "2",
             "--progress", "none", "--out", str(out)]
    assert main(start) == 0
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[-1]["tokens"] == 3 * 3 * 32  # the run's batch size and sequence length, not the defaults
    assert [r["step"] for r in records if r["kind"] == "start"] == [0, 2]
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--batch-size", "2"]) == 2
    assert "--batch-size: run has 3, now 2" in capsys.readouterr().err


def test_data_of_another_tokenizer_than_the_checkpoint_is_an_error(tmp_path, capsys):
    """Fine-tuning (or resuming) on data tokenized with another tokenizer than the checkpoint's: the ids would
    mean other tokens, even at the same vocabulary size."""
    from dgemma.cli.main import main
    from dgemma.train.data import prepare

    for name, words in (("a", ["alpha", "beta", "gamma", "delta"]), ("b", ["one", "two", "three", "four"])):
        (tmp_path / f"src-{name}").mkdir()
        for i in range(12):
            (tmp_path / f"src-{name}" / f"d{i}.txt").write_text(" ".join(words[(i + j) % 4] for j in range(40)))
        prepare([str(tmp_path / f"src-{name}")], tmp_path / f"data-{name}", vocab_size=270, val_fraction=0.2)
    cfg = tiny_cfg(tmp_path / "run-a", synthetic_data=False, data=str(tmp_path / "data-a"), vocab_size=270,
                   steps=1, seq_len=32, batch_size=2)
    first = train(cfg)
    ft = replace(cfg, out=str(tmp_path / "ft"), preset=None, vocab_size=None, init_from=str(first.checkpoint),
                 data=str(tmp_path / "data-b"))
    with pytest.raises(Exception, match=r"tokenizer mismatch: the data in .*data-b.*--init-from checkpoint"):
        train(ft)
    argv = ["train", "--data", str(tmp_path / "data-b"), "--init-from", str(first.checkpoint), "--out",
            str(tmp_path / "ft"), "--progress", "none"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer mismatch" in err and "data-b" in err and str(first.checkpoint) in err
    train(replace(ft, data=str(tmp_path / "data-a")))  # the checkpoint's own data is fine


def test_fine_tune_starts_from_the_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path / "a", steps=3)
    base = train(cfg, data=data_for(cfg))
    ft = tiny_cfg(tmp_path / "b", preset=None, init_from=str(base.checkpoint), steps=1, lr=1e-9, warmup_steps=0,
                  progress="bar")  # the rich progress bar (on stderr) must not fail when stderr is not a terminal
    result = train(ft, data=data_for(ft))
    wa, wb = weights(base.checkpoint), weights(result.checkpoint)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)


def test_fine_tune_at_another_canvas_length(tmp_path):
    cfg = tiny_cfg(tmp_path / "a", steps=2)
    base = train(cfg, data=data_for(cfg))
    ft = tiny_cfg(tmp_path / "b", preset=None, init_from=str(base.checkpoint), canvas_length=16, steps=1, lr=1e-9,
                  warmup_steps=0)
    result = train(ft, data=data_for(ft))
    config, _ = load_checkpoint(result.checkpoint)
    assert config.canvas_length == 16 and preset("tiny").canvas_length != 16
    gen = json.loads((Path(result.checkpoint) / "generation_config.json").read_text())
    assert gen["max_denoising_steps"] == 3  # the released pace, 48 steps per 256 tokens
    with pytest.raises(TrainError, match="canvas-length"):
        train(tiny_cfg(tmp_path / "c", canvas_length=0), data=data_for(cfg))


# ---------------------------------------------------------------------------------------------------------------
# Data parallel: 2 processes over gloo == 1 process on the same global batch
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    result = train(cfg, data=data_for(cfg))
    if rank == 0:
        Path(cfg.out, "history.json").write_text(json.dumps([result.history, result.validations]))


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, fsdp):
    # lr 3e-4: Adam turns roundoff-sized gradient differences into update differences of up to ~lr
    one = tiny_cfg(tmp_path / "one", steps=3, grad_accum=2, ckpt_every=2, fsdp=fsdp, lr=3e-4)
    two = replace(one, out=str(tmp_path / "two"))
    mp.spawn(_worker, args=(2, _free_port(), two), nprocs=2, join=True)
    single = train(one, data=data_for(one))
    multi, multi_val = json.loads(Path(two.out, "history.json").read_text())
    for a, b in zip(single.history, multi, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    (va,), (vb,) = single.validations, multi_val  # validation at the last step, split over the processes
    assert vb["val_ar"] == pytest.approx(va["val_ar"], abs=1e-5)
    assert vb["val_diffusion"] == pytest.approx(va["val_diffusion"], abs=1e-5)
    wa, wb = weights(latest_checkpoint(one.out)), weights(latest_checkpoint(two.out))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)
    # the 2-process run resumes on 1 process (its optimizer and data state are global)
    more = train(replace(two, resume=True, steps=4, fsdp=fsdp), data=data_for(two))
    assert [r["step"] for r in more.history] == [4]


def test_prepared_data_folder_end_to_end(tmp_path):
    """`dgemma data prepare` output -> training with the tokenizer's special ids -> a checkpoint that carries the
    tokenizer and stop ids; a time budget stops cleanly."""
    from dgemma.train.data import prepare

    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away", "and", "then", "slept"]
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i}.txt").write_text(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(150)))
    report = prepare([str(src)], tmp_path / "data", vocab_size=300, val_fraction=0.25)
    vocab = report.vocab_size
    cfg = tiny_cfg(tmp_path / "run", synthetic_data=False, data=str(tmp_path / "data"), vocab_size=vocab,
                   steps=50, val_every=2, val_batches=2, max_minutes=1e-9)
    result = train(cfg)
    assert result.stopped == "time budget" and result.step == 1 and len(result.validations) == 0
    assert (result.checkpoint / "tokenizer.json").is_file()
    config, _ = load_checkpoint(result.checkpoint)
    assert config.vocab_size == vocab and 1 in config.eos_token_ids
    more = train(replace(cfg, resume=True, max_minutes=None, steps=2))
    assert more.step == 2 and more.validations and more.validations[0]["val_ar"] < 10


def test_bf16_autocast_runs_and_stays_close_to_fp32(tmp_path):
    cfg = tiny_cfg(tmp_path / "fp32", steps=2, seq_len=32, batch_size=2)
    fp32 = train(cfg, data=data_for(cfg))
    bf16 = train(replace(cfg, out=str(tmp_path / "bf16"), bf16=True), data=data_for(cfg))
    for a, b in zip(fp32.history, bf16.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=0.1)
    assert load_checkpoint(bf16.checkpoint)[1].dtype == torch.float32  # master weights stay fp32


@pytest.mark.slow
def test_compiled_training_compiles_two_graphs_per_layer_kind_and_validates_eagerly(tmp_path):
    """--compile: one graph per layer kind for the encoder and one that both decoder passes share, none for
    validation (it runs eagerly), none more over later steps; the losses stay those of eager training to float
    rounding (compiled kernels fuse and reorder the sums)."""
    from dgemma.bench.train import _dynamo_counts
    from dgemma.engine.compiled import compiler_available

    if compiler_available() is not None:
        pytest.skip(compiler_available())
    cfg = tiny_cfg(tmp_path / "eager", steps=4, seq_len=64, batch_size=2, val_every=2, val_batches=1)
    eager = train(cfg, data=data_for(cfg))
    torch._dynamo.reset()
    before = _dynamo_counts()[0]
    compiled = train(replace(cfg, out=str(tmp_path / "compiled"), compile=True), data=data_for(cfg))
    kinds = len(set(preset("tiny").layer_types))
    assert _dynamo_counts()[0] - before == 2 * kinds
    assert len(compiled.validations) == len(eager.validations) == 2
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4)
    for a, b in zip(eager.validations, compiled.validations, strict=True):
        assert b["val_diffusion_mean"] == pytest.approx(a["val_diffusion_mean"], rel=1e-4, abs=1e-4)
