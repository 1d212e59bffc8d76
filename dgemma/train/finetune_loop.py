"""The `dgemma finetune` loop: SFT losses (answers only), full or LoRA fine-tuning, validation, atomic checkpoints,
exact resume, DDP through torchrun. Flags and defaults: finetune.py (FinetuneConfig).

    torchrun --nproc-per-node 2 -m dgemma.train.finetune_loop --model M --data D --out R [--lora-rank 8]

It reuses dgemma train's pieces (process setup, per-example noise generators, schedule, progress display, stop
flag, run log, RNG state) and differs where SFT does:

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

import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dgemma.cache import KVCache
from dgemma.checkpoint import CheckpointError, load_checkpoint, load_generation_config, save_checkpoint
from dgemma.config import ConfigError
from dgemma.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter, trainable_parameters
from dgemma.model import DiffusionGemma
from dgemma.options import TrainError
from dgemma.train.finetune import RESUME_IDENTITY, FinetuneConfig
from dgemma.train.objective import Noise, _ce_sum, corrupt, denoise_all_canvases, sample_noise, training_masks
from dgemma.train.pretrain import (
    TRAINER_STATE,
    Display,
    RunLog,
    StopFlag,
    _jsonable,
    _point_latest,
    _rng_state,
    _set_rng_state,
    _write_text_atomic,
    bf16_supported,
    example_generators,
    setup_distributed,
)
from dgemma.train.sft import ANSWER, ANSWER_FILL, FILL, PROMPT, SFTBatches, SFTSplit, read_sft_meta

RUN_CONFIG = "finetune_config.json"
CHECKPOINTS, LATEST, LOG = "checkpoints", "latest", "log.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# Losses
def sft_masks(roles: torch.Tensor, ar_on_prompt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """roles int8 [B, T] -> (valid, diffusion targets, AR targets), bool [B, T] each. An AR target needs a valid
    token before it."""
    valid = roles != FILL
    diff = (roles == ANSWER) | (roles == ANSWER_FILL)
    ar = (roles == ANSWER) | ((roles == PROMPT) if ar_on_prompt else torch.zeros_like(valid))
    ar[:, 0] = False
    ar[:, 1:] &= valid[:, :-1]
    return valid, diff, ar


def _encode_and_masks(model: DiffusionGemma, x: torch.Tensor, valid: torch.Tensor):
    cache = KVCache.empty(model.config, keep_all=True)
    hidden = model.encode(x, cache, attention_mask=valid)
    keys = torch.cat([valid, torch.ones_like(valid)], dim=1)[:, None, None, :]  # [B, 1, 1, 2T]: filler keys hidden
    masks = {t: m & keys for t, m in training_masks(model.config, x.shape[1], x.device).items()}
    return hidden, cache, masks


def sft_losses(model: DiffusionGemma, x: torch.Tensor, roles: torch.Tensor, noise: Noise, *, ar_weight: float = 1.0,
               ar_on_prompt: bool = False, ce_chunk: int = 0, diffusion_norm: float | None = None,
               ar_norm: float | None = None, self_conditioning: bool = True):
    """(total, diffusion CE sum, AR CE sum) of one SFT batch; x [B, T] ids, roles [B, T] (sft.py)."""
    valid, diff, ar = sft_masks(roles, ar_on_prompt)
    hidden, cache, masks = _encode_and_masks(model, x, valid)
    ar_sup = ar[:, 1:]
    ar_sum = _ce_sum(model, hidden[:, :-1][ar_sup], x[:, 1:][ar_sup], ce_chunk)
    sc_logits = None
    if self_conditioning:
        with torch.no_grad():
            sc_logits = model.logits(denoise_all_canvases(model, noise.noisy, cache, masks))
    dec = denoise_all_canvases(model, noise.noisy, cache, masks, sc_logits=sc_logits, sc_mask=noise.sc_mask)
    diff_sum = _ce_sum(model, dec[diff], x[diff], ce_chunk)
    d_norm = diffusion_norm if diffusion_norm is not None else max(int(diff.sum()), 1)
    a_norm = ar_norm if ar_norm is not None else max(int(ar_sup.sum()), 1)
    return diff_sum / d_norm + ar_weight * ar_sum / a_norm, diff_sum.detach(), ar_sum.detach()


@torch.no_grad()
def sft_eval_losses(model: DiffusionGemma, x: torch.Tensor, roles: torch.Tensor, t_values, generators) -> list[float]:
    """[AR sum, AR count, diffusion count, diffusion sum at each t]: answer positions only, two-pass SC."""
    valid, diff, ar = sft_masks(roles, False)
    hidden, cache, masks = _encode_and_masks(model, x, valid)
    ar_sup = ar[:, 1:]
    out = [float(_ce_sum(model, hidden[:, :-1][ar_sup], x[:, 1:][ar_sup], 0)), float(ar_sup.sum()), float(diff.sum())]
    for t in t_values:
        noisy, _ = corrupt(x, torch.full((x.shape[0],), float(t)), model.config.vocab_size, generators)
        sc = model.logits(denoise_all_canvases(model, noisy, cache, masks))
        dec = denoise_all_canvases(model, noisy, cache, masks, sc_logits=sc)
        out.append(float(_ce_sum(model, dec[diff], x[diff], 0)))
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# Run folder
def _is_complete(folder: Path) -> bool:
    return (folder / TRAINER_STATE).is_file()


def latest_checkpoint(run: Path) -> Path | None:
    link = run / LATEST
    if (link.is_symlink() or link.is_dir()) and _is_complete(link.resolve()):
        return link.resolve()
    found = sorted((p for p in (run / CHECKPOINTS).glob("step-*") if _is_complete(p)), reverse=True)
    return found[0] if found else None


def write_checkpoint(run: Path, step: int, save_model, trainer_state: dict, keep: int) -> Path:
    """checkpoints/step-NNNNNN written under a temporary name (model or adapter by `save_model(folder)`, then
    trainer_state.pt), renamed into place; `latest` moved to it, old ones pruned."""
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    staging = root / f".{final.name}.partial"
    save_model(staging)
    tmp = staging / f".{TRAINER_STATE}.tmp"
    torch.save(trainer_state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, staging / TRAINER_STATE)
    if final.exists():
        old = root / f".{final.name}.old"
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)
    _point_latest(run, final)
    if keep:
        for old in sorted(p for p in root.glob("step-*") if _is_complete(p))[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _check_resume(cfg: FinetuneConfig, run: Path) -> Path | None:
    resume_from = latest_checkpoint(run) if run.exists() else None
    if resume_from is None:
        if cfg.resume:
            raise TrainError(f"--resume: nothing to resume, {run} has no complete checkpoint; drop --resume")
        return None
    if not cfg.resume:
        raise TrainError(f"{run} already holds checkpoints (newest: {resume_from.name}); pass --resume to continue "
                         "that run, or choose a new --out")
    try:
        saved = json.loads((run / RUN_CONFIG).read_text())["finetune"]
    except (OSError, ValueError, KeyError) as e:
        raise TrainError(f"cannot read {run / RUN_CONFIG} ({e}); the run folder is damaged") from None
    mine = _jsonable(asdict(cfg))
    diffs = [f"--{k.replace('_', '-')}: run has {saved.get(k)!r}, now {mine[k]!r}" for k in RESUME_IDENTITY
             if saved.get(k) != mine[k]]
    if diffs:
        raise TrainError(f"cannot resume {run} with different settings ({'; '.join(diffs)}); use the same flags")
    return resume_from


def validate_config(cfg: FinetuneConfig) -> None:
    problems = []
    if cfg.lora:
        try:
            LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       targets=cfg.targets).validate()
        except ValueError as e:
            problems.append(str(e))
        if cfg.train_router:
            problems.append("--train-router applies to full fine-tuning only (LoRA keeps the router frozen)")
    for name in ("lr", "lora_alpha", "ar_weight", "max_minutes"):
        v = getattr(cfg, name)
        if v is not None and not math.isfinite(v):
            problems.append(f"--{name.replace('_', '-')} must be finite")
    if problems:
        raise TrainError("; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# The loop
def finetune(cfg: FinetuneConfig, on_step=None) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns a summary (steps, checkpoint, trainable share, speed, memory)."""
    validate_config(cfg)
    env = setup_distributed(cfg.device)
    try:
        return _finetune(cfg, env, on_step)
    finally:
        env.close()


def _lr_factor(step: int, cfg: FinetuneConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _finetune(cfg: FinetuneConfig, env, on_step) -> dict[str, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % env.world_size:
        raise TrainError(f"--batch-size {cfg.batch_size} must be a multiple of the {env.world_size} processes")
    run = Path(cfg.out).expanduser()
    resume_from = _check_resume(cfg, run)

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
        run.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(run / RUN_CONFIG, json.dumps({"finetune": _jsonable(asdict(cfg)),
                                                         "model": mc.to_dict()}, indent=2, default=str))
    env.barrier()

    step_module = FinetuneStep(model)
    wrapped = step_module
    sharded = env.enabled and cfg.fsdp
    if sharded:
        from torch.distributed.fsdp import fully_shard

        # Layers return their keys/values as transposed views for the cache; nothing modifies them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(step_module)
    elif env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(step_module, forward_sync_buffers=False)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    params = [p for p in step_module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    loader = SFTBatches(train_split, cfg.batch_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size)
    step, tokens_done, train_seconds = 0, 0, 0.0
    if resume_from is not None:
        state = torch.load(resume_from / TRAINER_STATE, map_location="cpu", weights_only=False)
        # Keyed by parameter name: loads into one process, DDP or FSDP2 alike.
        set_optimizer_state_dict(step_module, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True) if sharded else None)
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_done, train_seconds = state["step"], state["tokens"], state["train_seconds"]
        loader.load_state_dict(state["data"])
        _set_rng_state(state["rng"][env.rank if len(state["rng"]) == env.world_size else 0])

    log = RunLog(run / LOG, env.is_main, keep_until_step=step if resume_from is not None else None)
    rows = cfg.batch_size // env.world_size
    bf16 = bf16_supported(env.device) if cfg.bf16 is None else cfg.bf16
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    display = Display(cfg.progress, cfg.steps, step, cfg.log_every, env.is_main)
    trainable, total = trainable_parameters(model)
    what = f"LoRA rank {cfg.lora_rank} on {','.join(cfg.targets)}" if cfg.lora else "full fine-tuning"
    display.note(f"dgemma finetune: {what}: {trainable:,} of {total:,} parameters trainable "
                 f"({100 * trainable / total:.2f}%), {env.world_size} process(es) on {env.device}"
                 f"{' with bf16 autocast' if bf16 else ' in fp32'}, {len(train_split)} train examples, "
                 + (f"resuming from {resume_from.name}" if resume_from else "starting at step 0"))
    for split, name in ((train_split, "train"), (val_split, "val")):
        note = split.overflow_note(name)
        if note:
            display.note(f"dgemma finetune: {note}")
    log.write({"kind": "start", "step": step, "trainable_parameters": trainable, "total_parameters": total,
               "overflow": {"train": asdict(train_split.overflow), "val": asdict(val_split.overflow)}})

    tokenizer_path = Path(cfg.data) / "tokenizer.json"
    generation = load_generation_config(cfg.model) if (Path(cfg.model) / "generation_config.json").is_file() else None

    def save_model(to_save: DiffusionGemma, folder: Path) -> None:
        if cfg.lora:
            save_adapter(to_save, folder, base_model=str(Path(cfg.model).resolve()))
            shutil.copyfile(tokenizer_path, folder / "tokenizer.json")
        else:
            save_checkpoint(to_save, folder, generation_config=generation, tokenizer_path=tokenizer_path)

    last_ckpt = resume_from

    def save(at_step: int) -> None:
        nonlocal last_ckpt
        state = {"step": at_step, "tokens": tokens_done, "train_seconds": train_seconds,
                 "scheduler": scheduler.state_dict(),
                 "data": loader.state_dict(), "rng": _gather(env, _rng_state()), "finetune_config": asdict(cfg)}
        to_save = model
        if sharded:  # gather the shards (collective); full copies on the main process
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(step_module, options=opts)
            state["optimizer"] = get_optimizer_state_dict(step_module, optimizer, options=opts)
            if env.is_main:
                with torch.random.fork_rng(devices=[]):  # apply_lora's init must not move the training RNG
                    to_save = load_base(cfg.model)
                    if cfg.lora:
                        apply_lora(to_save, model.lora_config)
                to_save.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
        else:
            state["optimizer"] = get_optimizer_state_dict(step_module, optimizer)
        if env.is_main:
            last_ckpt = write_checkpoint(run, at_step, lambda folder: save_model(to_save, folder), state,
                                         cfg.keep_checkpoints)
            log.write({"kind": "checkpoint", "step": at_step, "path": str(last_ckpt)})
        env.barrier()

    validations = []

    def validate(at_step: int) -> None:
        if len(val_split) < cfg.batch_size or not cfg.val_t:
            return
        vb = SFTBatches(val_split, cfg.batch_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                        shuffle=False)
        sums = None
        model.eval()
        with autocast:
            for b in range(min(cfg.val_batches, vb.batches_per_epoch)):
                batch = next(vb)
                x, roles = batch["input_ids"].to(env.device), batch["roles"].to(env.device)
                gens = example_generators(cfg.seed, "val", b * cfg.batch_size + env.rank * rows, x.shape[0])
                with torch.no_grad():
                    part = wrapped(x, roles, eval_t=tuple(cfg.val_t), eval_generators=gens)
                sums = part if sums is None else [a + c for a, c in zip(sums, part)]
        model.train()
        if sums is None:
            return
        sums = env.all_sum(sums)
        rec = {"kind": "val", "step": at_step, "val_ar": sums[0] / max(sums[1], 1),
               "val_diffusion": {f"{t:g}": sums[3 + i] / max(sums[2], 1) for i, t in enumerate(cfg.val_t)}}
        validations.append(rec)
        log.write(rec)
        display.note(f"val @ {at_step}: answer AR {rec['val_ar']:.4f}  diffusion " +
                     "  ".join(f"t={k} {v:.4f}" for k, v in rec["val_diffusion"].items()))

    stop, history, recent, stopped = StopFlag(), [], [], None
    start_seconds = train_seconds
    try:
        with stop.installed():
            if step == 0 and cfg.val_every:
                validate(0)
            while step < cfg.steps:
                t0 = time.perf_counter()
                micro = [next(loader) for _ in range(cfg.grad_accum)]
                counts = [0.0, 0.0]
                for b in micro:
                    _, diff, ar = sft_masks(b["roles"], cfg.ar_on_prompt)
                    counts[0] += float(diff.sum())
                    counts[1] += float(ar[:, 1:].sum())
                n_diff, n_ar = env.all_sum(counts)
                sums, step_tokens = [0.0, 0.0], 0
                for i, b in enumerate(micro):
                    x, roles = b["input_ids"].to(env.device), b["roles"].to(env.device)
                    step_tokens += x.numel() * env.world_size
                    first = (step * cfg.grad_accum + i) * cfg.batch_size + env.rank * rows
                    noise = sample_noise(x, mc.vocab_size, example_generators(cfg.seed, "train", first, rows),
                                         eps=cfg.t_eps, sc_prob=cfg.sc_prob)
                    last = i == len(micro) - 1
                    sync = wrapped.no_sync() if env.enabled and not sharded and not last else nullcontext()
                    if sharded:  # FSDP2: reduce-scatter once per optimizer step
                        wrapped.set_requires_gradient_sync(last)
                    with sync:
                        with autocast:
                            loss, d_sum, a_sum = wrapped(
                                x, roles, noise, ar_weight=cfg.ar_weight, ar_on_prompt=cfg.ar_on_prompt,
                                ce_chunk=cfg.ce_chunk, diffusion_norm=max(n_diff, 1) / env.world_size,
                                ar_norm=max(n_ar, 1) / env.world_size, self_conditioning=cfg.sc_prob > 0)
                        loss.backward()
                    sums[0] += float(d_sum)
                    sums[1] += float(a_sum)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                d_total, a_total = env.all_sum(sums)
                diffusion, ar = d_total / max(n_diff, 1), a_total / max(n_ar, 1)
                if not math.isfinite(diffusion + ar):
                    raise TrainError(f"the loss became {diffusion + ar} at step {step + 1}; lower --lr")
                step += 1
                tokens_done += step_tokens
                dt = time.perf_counter() - t0
                train_seconds += dt
                recent = (recent + [dt])[-20:]
                rec = {"kind": "train", "step": step, "lr": lr, "loss": diffusion + cfg.ar_weight * ar,
                       "diffusion": diffusion, "ar": ar, "grad_norm": float(grad_norm), "tokens": tokens_done,
                       "time": train_seconds, "step_time": dt, "tokens_per_s": step_tokens / dt}
                history.append(rec)
                log.write(rec)
                display.step(rec, eta=(cfg.steps - step) * sum(recent) / len(recent))
                if on_step is not None and env.is_main:
                    on_step(rec)
                over_time = cfg.max_minutes is not None and train_seconds - start_seconds > cfg.max_minutes * 60
                want_stop = env.all_sum([float(stop.requested or over_time)])[0] > 0
                if (cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps:
                    validate(step)
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps or want_stop:
                    save(step)
                if want_stop and step < cfg.steps:
                    stopped = stop.signal_name or "time budget"
                    display.note(f"dgemma finetune: stopped at step {step} ({stopped}); continue with --resume")
                    break
    finally:
        display.close()
        log.close()
    summary = {"step": step, "checkpoint": str(last_ckpt) if last_ckpt else None, "stopped": stopped,
               "trainable_parameters": trainable, "total_parameters": total, "trainable_share": trainable / total,
               "tokens": tokens_done, "train_seconds": train_seconds,
               "tokens_per_s": tokens_done / train_seconds if train_seconds else None,
               "history": history, "validations": validations}
    if env.is_main and stopped is None:
        print(f"dgemma finetune: done, {step} steps; {'adapter' if cfg.lora else 'model'} in {last_ckpt}",
              file=sys.stderr)
    return summary


def _gather(env, obj):
    from dgemma.train.pretrain import _gather as gather

    return gather(env, obj)


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


def main(argv: list[str] | None = None) -> int:
    """`python -m dgemma.train.finetune_loop ...` (and torchrun -m dgemma.train.finetune_loop): the same as `dgemma finetune`."""
    from dgemma.cli.main import main as cli_main

    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
