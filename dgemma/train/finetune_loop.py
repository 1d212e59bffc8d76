"""`dgemma finetune`: full or LoRA fine-tuning on the SFT losses (answers only; objective.sft_losses), on the one
training loop (loop.py: schedule, validation, atomic checkpoints, exact resume, DDP/FSDP2 through torchrun). Flags and
defaults: finetune.py.

    torchrun --nproc-per-node 2 -m dgemma.train finetune --model M --data D --out R [--lora-rank 8]

It differs from pretraining where SFT does:

- one example per row (sft.py): the encoder runs with the filler masked out (`attention_mask`), the decoder's
  block-diagonal training masks (objective.training_masks) lose the filler keys too, so a row's prompt and answer see
  exactly what inference shows them; the diffusion loss covers the answer canvases (answer + eos fill), the AR loss
  the answer tokens (and the prompt with --ar-on-prompt);
- rows are as long as the longest row of their batch (length-grouped), not a fixed seq_len;
- with --lora-rank the checkpoint holds the adapter only (PEFT format), and resuming re-applies it to --model.

The loss is normalised by the global batch's supervised counts, and every example's noise comes from a generator
seeded by (seed, the example's global index), so N processes compute one process's gradient.
"""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dgemma.checkpoint import CheckpointError, load_checkpoint, load_generation_config, save_checkpoint
from dgemma.config import ConfigError
from dgemma.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter, trainable_parameters
from dgemma.model import DiffusionGemma
from dgemma.options import TrainError
from dgemma.train import runs
from dgemma.train.dist import Distributed, set_threads, setup_distributed
from dgemma.train.finetune import RESUME_IDENTITY, FinetuneConfig
from dgemma.train.loop import Job, run_loop
from dgemma.train.objective import example_generators, sft_eval_losses, sft_losses, sft_masks
from dgemma.train.sft import SFTBatches, SFTSplit, read_sft_meta

RUN_CONFIG = "finetune_config.json"


class FinetuneStep(nn.Module):
    """What DDP wraps: its forward runs the whole SFT objective."""

    def __init__(self, model: DiffusionGemma):
        super().__init__()
        self.model = model

    def forward(self, x, roles, noise=None, eval_t=None, eval_generators=None, **kw):
        if eval_t is not None:  # validation, through the wrapper so that FSDP2 gathers the weights
            return sft_eval_losses(self.model, x, roles, eval_t, eval_generators)
        return sft_losses(self.model, x, roles, noise, **kw)


def enable_gradient_checkpointing(model: DiffusionGemma) -> DiffusionGemma:
    """Recompute each layer's activations in backward instead of keeping them (decided once, at setup). The
    layer's K/V outputs stay outputs, so the encoder's cache is written once."""
    for layer in model.layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kw):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kw)
            return _inner(*args, **kw)

        layer.forward = forward
    return model


# ---------------------------------------------------------------------------------------------------------------
# Model set-up
def load_base(path: str) -> DiffusionGemma:
    try:
        _, model = load_checkpoint(path, dtype=torch.float32)
    except (CheckpointError, ConfigError) as e:
        raise TrainError(f"cannot load --model {path}: {e}") from None
    return model


def prepare_model(cfg: FinetuneConfig, resume_from: Path | None) -> DiffusionGemma:
    """The model to train: --model (or the full checkpoint to resume), with LoRA applied (and the adapter to resume
    loaded), router frozen unless asked."""
    if cfg.lora:
        model = load_base(cfg.model)
        if resume_from is not None:
            load_adapter(model, resume_from)
            for n, p in model.named_parameters():
                p.requires_grad_("lora_" in n)
        else:
            torch.manual_seed(cfg.seed)  # lora_A's Kaiming init
            apply_lora(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                         targets=cfg.targets))
    else:
        model = load_base(str(resume_from) if resume_from is not None else cfg.model)
        for n, p in model.named_parameters():
            p.requires_grad_(cfg.train_router or ".router." not in n)
    return model


def validate_config(cfg: FinetuneConfig) -> None:
    """Raise TrainError naming every impossible setting (the loop's, then LoRA's)."""
    problems = cfg.loop_problems()
    if cfg.lora:
        try:
            LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       targets=cfg.targets).validate()
        except ValueError as e:
            problems.append(str(e))
        if cfg.train_router:
            problems.append("--train-router applies to full fine-tuning only (LoRA keeps the router frozen)")
    if not math.isfinite(cfg.lora_alpha):
        problems.append(f"--lora-alpha must be a finite number (got {cfg.lora_alpha})")
    if problems:
        raise TrainError("; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# The run
def finetune(cfg: FinetuneConfig, on_step=None) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns a summary (steps, checkpoint, trainable share, speed, memory)."""
    validate_config(cfg)
    env = setup_distributed(cfg.device)
    try:
        return _finetune(cfg, env, on_step)
    finally:
        env.close()


def _finetune(cfg: FinetuneConfig, env: Distributed, on_step) -> dict[str, Any]:
    set_threads(cfg.threads, env)
    if cfg.batch_size % env.world_size:
        raise TrainError(f"--batch-size {cfg.batch_size} must be a multiple of the {env.world_size} processes")
    run = Path(cfg.out).expanduser()
    resume_from, _ = runs.check_resume(run, cfg.resume, RUN_CONFIG, "finetune", asdict(cfg), RESUME_IDENTITY)

    meta = read_sft_meta(cfg.data)
    from dgemma.train.data import check_tokenizer

    base_tok = Path(cfg.model) / "tokenizer.json"
    if base_tok.is_file():
        check_tokenizer(cfg.data, meta, base_tok, f"--model {cfg.model}")
    model = prepare_model(cfg, resume_from)
    mc = model.config
    if cfg.seq_len % mc.canvas_length:
        raise TrainError(f"--seq-len {cfg.seq_len} is not a multiple of the model's canvas_length={mc.canvas_length}")
    if int(meta["vocab_size"]) != mc.vocab_size:
        raise TrainError(f"the data's tokenizer has {meta['vocab_size']} tokens but --model has vocab_size="
                         f"{mc.vocab_size}; prepare the data with --tokenizer {cfg.model}")
    train_split = SFTSplit.load(cfg.data, "train", cfg.seq_len, mc.canvas_length, cfg.overflow)
    val_split = SFTSplit.load(cfg.data, "val", cfg.seq_len, mc.canvas_length, cfg.overflow)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = model.to(env.device).train()
    if env.is_main and resume_from is None:
        runs.write_run_config(run, RUN_CONFIG, "finetune", asdict(cfg), mc.to_dict())
    env.barrier()

    job = _job(cfg, env, model, train_split, val_split)
    result = run_loop(cfg, env, run, resume_from, model, FinetuneStep(model), job, on_step=on_step)
    trainable, total = trainable_parameters(model)
    if env.is_main and result.stopped is None:
        print(f"dgemma finetune: done, {result.step} steps; {'adapter' if cfg.lora else 'model'} in "
              f"{result.checkpoint}", file=sys.stderr)
    return {"step": result.step, "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "stopped": result.stopped, "trainable_parameters": trainable, "total_parameters": total,
            "trainable_share": trainable / total, "tokens": result.tokens, "train_seconds": result.train_seconds,
            "tokens_per_s": result.tokens / result.train_seconds if result.train_seconds else None,
            "history": result.history, "validations": result.validations}


def _job(cfg: FinetuneConfig, env: Distributed, model: DiffusionGemma, train_split: SFTSplit,
         val_split: SFTSplit) -> Job:
    """Fine-tuning's part of the loop: one example per row with its roles, the SFT losses (answers only), answer
    validation, and an adapter (LoRA) or a full model per checkpoint."""
    rows = cfg.batch_size // env.world_size
    tokenizer_path = Path(cfg.data) / "tokenizer.json"
    generation = load_generation_config(cfg.model) if (Path(cfg.model) / "generation_config.json").is_file() else None

    def counts(x, roles):
        _, diff, ar = sft_masks(roles, cfg.ar_on_prompt)
        return float(diff.sum()), float(ar[:, 1:].sum())

    def loss(wrapped, x, roles, noise, diffusion_norm, ar_norm):
        return wrapped(x, roles, noise, ar_weight=cfg.ar_weight, ar_on_prompt=cfg.ar_on_prompt, ce_chunk=cfg.ce_chunk,
                       diffusion_norm=diffusion_norm, ar_norm=ar_norm, self_conditioning=cfg.sc_prob > 0)

    def validate(wrapped, at_step):
        if len(val_split) < cfg.batch_size or not cfg.val_t:
            return None
        vb = SFTBatches(val_split, cfg.batch_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                        shuffle=False)
        sums = None
        model.eval()
        for b in range(min(cfg.val_batches, vb.batches_per_epoch)):
            batch = next(vb)
            x, roles = batch["input_ids"].to(env.device), batch["roles"].to(env.device)
            gens = example_generators(cfg.seed, "val", b * cfg.batch_size + env.rank * rows, x.shape[0])
            part = wrapped(x, roles, eval_t=tuple(cfg.val_t), eval_generators=gens)
            sums = part if sums is None else [a + c for a, c in zip(sums, part)]
        model.train()
        if sums is None:
            return None
        sums = env.all_sum(sums)
        rec = {"val_ar": sums[0] / max(sums[1], 1),
               "val_diffusion": {f"{t:g}": sums[3 + i] / max(sums[2], 1) for i, t in enumerate(cfg.val_t)}}
        return rec, (f"answer AR {rec['val_ar']:.4f}  diffusion "
                     + "  ".join(f"t={k} {v:.4f}" for k, v in rec["val_diffusion"].items()))

    def save_model(to_save: DiffusionGemma, folder: Path) -> None:
        if cfg.lora:
            save_adapter(to_save, folder, base_model=str(Path(cfg.model).resolve()))
            shutil.copyfile(tokenizer_path, folder / "tokenizer.json")
        else:
            save_checkpoint(to_save, folder, generation_config=generation, tokenizer_path=tokenizer_path)

    def full_model() -> DiffusionGemma:
        copy = load_base(cfg.model)
        if cfg.lora:
            apply_lora(copy, model.lora_config)
        return copy

    trainable, total = trainable_parameters(model)
    what = f"LoRA rank {cfg.lora_rank} on {','.join(cfg.targets)}" if cfg.lora else "full fine-tuning"
    notes = [n for n in (train_split.overflow_note("train"), val_split.overflow_note("val")) if n]
    return Job(name="finetune",
               loader=SFTBatches(train_split, cfg.batch_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size),
               unpack=lambda b: (b["input_ids"], b["roles"]), counts=counts, loss=loss, validate=validate,
               save_model=save_model, full_model=full_model,
               intro=(f"{what}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%), "
                      f"{len(train_split)} train examples, "),
               notes=notes, validate_at_start=True,
               start_record={"trainable_parameters": trainable, "total_parameters": total,
                             "overflow": {"train": asdict(train_split.overflow), "val": asdict(val_split.overflow)}},
               state={"finetune_config": asdict(cfg)})


# ---------------------------------------------------------------------------------------------------------------
# dgemma lora merge
def merge_command(model_path: str, adapter: str, out: str, force: bool = False) -> Path:
    """Base + adapter -> one full checkpoint (in the base's dtype), tokenizer and generation config copied."""
    target = Path(out).expanduser()
    if target.exists() and any(target.iterdir()) and not force:
        raise TrainError(f"--out {target} exists and is not empty; pass --force to replace a checkpoint there")
    try:
        _, model = load_checkpoint(model_path)
    except (CheckpointError, ConfigError) as e:
        raise TrainError(f"cannot load --model {model_path}: {e}") from None
    dtype = model.dtype
    model = model.float()
    merge_lora(load_adapter(model, adapter))
    tok = Path(adapter) / "tokenizer.json"
    tok = tok if tok.is_file() else Path(model_path) / "tokenizer.json"
    generation = load_generation_config(model_path) if (Path(model_path) / "generation_config.json").is_file() else None
    save_checkpoint(model.to(dtype), target, generation_config=generation,
                    tokenizer_path=tok if tok.is_file() else None)
    print(f"dgemma lora merge: wrote {target} ({model_path} + {adapter})", file=sys.stderr)
    return target
