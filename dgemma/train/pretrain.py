"""`dgemma train`: block-diffusion training of a DiffusionGemma model (objective in objective.py, spec B1).

    dgemma train --data data/py --out runs/small --preset small --steps 2000          # from scratch
    dgemma train --data data/py --out runs/small --resume                              # continue exactly
    dgemma train --data data/sft --out runs/ft --init-from runs/small/latest --lr 1e-4  # fine-tune
    dgemma train --synthetic-data --preset small --batch-size 8 --steps 20 --out /tmp/speed   # speed check
    torchrun --nproc-per-node 2 -m dgemma.train --data data/py --out runs/ddp          # data parallel (DDP)
    python -m dgemma.train ...                                                         # same as `dgemma train`

The run folder (--out) holds:

    train_config.json                the flags of the run and the model config (a resume must agree with them)
    log.jsonl                        one JSON object per optimizer step (kind "train": step, lr, losses, tokens,
                                     time), per validation (kind "val") and per checkpoint (kind "checkpoint")
    checkpoints/step-000500/         a Hugging Face checkpoint folder (config.json, model.safetensors,
                                     generation_config.json, tokenizer.json) plus trainer_state.pt (optimizer,
                                     scheduler, step, RNG states, data-loader state), each written to a temporary
                                     name and renamed into place
    latest -> checkpoints/step-...   the newest complete checkpoint; `dgemma generate --model runs/x/latest`

Ctrl-C (SIGINT) or SIGTERM stops after the current step, writes a checkpoint and exits 0; a second Ctrl-C aborts
(the previous checkpoint stays intact). `--batch-size` is the global number of sequences per micro-step, summed over
processes; an optimizer step sees `batch_size * grad_accum` sequences. Every example's noise (t, corrupted
positions, self-conditioning switch) comes from a generator seeded by (seed, the example's global index), so a run
on N processes computes the same gradients as one process on the same global batch.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgemma.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dgemma.config import ConfigError, ModelConfig, preset
from dgemma.model import DiffusionGemma, init_weights
from dgemma.options import TrainConfig, TrainError
from dgemma.train import runs
from dgemma.train.dist import Distributed, set_threads, setup_distributed
from dgemma.train.loop import Job, LoopResult, run_loop
from dgemma.train.objective import (
    EvalLosses,
    evaluate_losses,
    example_generators,
    mix_seed,
    training_losses,
)

RUN_CONFIG = "train_config.json"


# ---------------------------------------------------------------------------------------------------------------
# Configuration: TrainConfig (the CLI flags mirror its fields) and TrainError live in the torch-free options module,
# so that `dgemma train --help` answers without importing torch.

# Settings a resumed run must share with the run it continues. The rest may change, the schedule's length, shape and
# floor included (--steps, --schedule, --decay-steps, --min-lr-ratio): a staged run resumes a constant-rate stage
# with a final decay added.
RESUME_IDENTITY = ("data", "synthetic_data", "preset", "init_from", "vocab_size", "canvas_length", "batch_size",
                   "grad_accum", "seq_len", "lr", "warmup_steps", "beta1", "beta2", "weight_decay", "ar_weight",
                   "ar_only", "sc_prob", "t_eps", "seed", "init_std", "fsdp")


# ---------------------------------------------------------------------------------------------------------------
# Data
Loader = Iterator  # yields [rows, T] long tensors, (ids, loss_mask) pairs or {"input_ids", "loss_mask"} dicts;
# has state_dict()/load_state_dict(). Rank r of W must get rows [r * rows, (r + 1) * rows) of each global batch.


@dataclass
class DataSource:
    """Where batches come from. The factories take (rank, world_size) and return a fresh loader; `val` is called
    anew for every validation, so each one sees the same batches."""

    train: Callable[[int, int], Loader]
    val: Callable[[int, int], Loader] | None = None
    vocab_size: int | None = None  # the tokenizer's, checked against the model (None: not checked)
    tokenizer_path: Path | None = None  # copied into every checkpoint
    special_ids: dict[str, int | None] = field(default_factory=dict)  # bos/eos/pad/end_of_turn of the tokenizer
    name: str = "custom"


class SyntheticBatches:
    """Endless uniform-random token batches. Global batch s is drawn from seed (seed, s mod num_batches); rank r
    of W gets rows [r * b, (r + 1) * b), b = batch_size // W. `num_batches=1` repeats one batch (overfitting)."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_batches: int | None = None):
        if batch_size % world_size:
            raise TrainError(f"batch_size={batch_size} must be a multiple of world_size={world_size}")
        self.vocab_size, self.batch_size, self.seq_len, self.seed = vocab_size, batch_size, seq_len, seed
        self.rank, self.world_size, self.num_batches = rank, world_size, num_batches
        self.step = 0

    def __iter__(self) -> SyntheticBatches:
        return self

    def __next__(self) -> torch.Tensor:
        s = self.step if self.num_batches is None else self.step % self.num_batches
        g = torch.Generator().manual_seed(mix_seed(self.seed, "synthetic", s))
        full = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len), generator=g)
        rows = self.batch_size // self.world_size
        self.step += 1
        return full[self.rank * rows:(self.rank + 1) * rows]

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def synthetic_data(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0,
                   num_batches: int | None = None) -> DataSource:
    def make(rank: int, world: int) -> SyntheticBatches:
        return SyntheticBatches(vocab_size, batch_size, seq_len, seed, rank, world, num_batches)

    def make_val(rank: int, world: int) -> SyntheticBatches:
        return SyntheticBatches(vocab_size, batch_size, seq_len, seed + 1, rank, world)

    return DataSource(train=make, val=make_val, vocab_size=vocab_size, name="synthetic")


def folder_data(path: str | os.PathLike[str], batch_size: int, seq_len: int, canvas_length: int,
                seed: int = 0) -> DataSource:
    """Batches from a folder made by `dgemma data prepare` (train split shuffled, val split in order)."""
    from dgemma.train.data import Batches, PackedSplit, read_meta

    meta = read_meta(path)
    train_split = PackedSplit.load(path, "train", seq_len=seq_len, canvas_length=canvas_length)
    val_split = PackedSplit.load(path, "val", seq_len=seq_len, canvas_length=canvas_length)
    val = None
    if len(val_split) >= batch_size:
        def val(rank: int, world: int) -> Batches:
            return Batches(val_split, batch_size, seed=seed, rank=rank, world_size=world, shuffle=False)
    tokenizer = Path(path) / meta.get("tokenizer", {}).get("file", "tokenizer.json")
    return DataSource(
        train=lambda rank, world: Batches(train_split, batch_size, seed=seed, rank=rank, world_size=world),
        val=val, vocab_size=int(meta["vocab_size"]), tokenizer_path=tokenizer if tokenizer.is_file() else None,
        special_ids=dict(meta.get("special_ids", {})), name=str(path))


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        return batch["input_ids"], batch.get("loss_mask")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TrainError(f"the loader yielded a {type(batch).__name__}; expected a [batch, seq_len] tensor, an "
                     "(ids, loss_mask) pair or a dict with input_ids/loss_mask")


# ---------------------------------------------------------------------------------------------------------------
# The module DDP/FSDP wrap: its forward runs the whole objective, so the wrappers' hooks see every use of the weights
class TrainStep(nn.Module):
    def __init__(self, model: DiffusionGemma):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, loss_mask: torch.Tensor | None, noise=None, diffusion_norm: float = 1.0,
                ar_norm: float = 1.0, ar_weight: float = 1.0, ce_chunk: int = 0, self_conditioning: bool = True,
                eval_t: tuple[float, ...] | None = None, eval_generators=None, diffusion: bool = True,
                sc_graph: bool = False):
        if eval_t is not None:  # validation (no gradients)
            return evaluate_losses(self.model, x, eval_t, eval_generators, loss_mask=loss_mask)
        losses = training_losses(self.model, x, noise, ar_weight=ar_weight, loss_mask=loss_mask, ce_chunk=ce_chunk,
                                 diffusion_norm=diffusion_norm, ar_norm=ar_norm, self_conditioning=self_conditioning,
                                 diffusion=diffusion, sc_graph=sc_graph)
        return losses.total, losses.diffusion_sum, losses.ar_sum


# ---------------------------------------------------------------------------------------------------------------
# Model
def _data_tokens(ids: dict[str, int | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ids.get("bos") is not None:
        out["bos_token_id"] = int(ids["bos"])
    if ids.get("pad") is not None:
        out["pad_token_id"] = int(ids["pad"])
    eos = [int(ids[k]) for k in ("eos", "end_of_turn") if ids.get(k) is not None]
    if eos:
        out["eos_token_ids"] = tuple(dict.fromkeys(eos))
    return out


def expected_model_config(cfg: TrainConfig, data_vocab: int | None,
                          special_ids: dict[str, int | None] | None = None) -> ModelConfig:
    """The architecture this run trains: the preset (with --vocab-size and the tokenizer's special ids), or the
    config of the --init-from checkpoint."""
    if cfg.init_from is not None:
        try:
            mc = ModelConfig.from_hf_config(cfg.init_from)
        except ConfigError as e:
            raise TrainError(f"cannot fine-tune from {cfg.init_from}: {e}") from None
        vocab_hint = "prepare the data with this checkpoint's tokenizer (dgemma data prepare --tokenizer ...)"
    else:
        try:
            mc = preset(cfg.model_preset)
        except ConfigError as e:
            raise TrainError(str(e)) from None
        mc = mc.replace(vocab_size=cfg.vocab_size or mc.vocab_size, **_data_tokens(special_ids or {}))
        vocab_hint = (f"pass --vocab-size {data_vocab} to build the model at the tokenizer's size, or "
                      f"prepare the data with --vocab-size {mc.vocab_size}")
    if data_vocab is not None and data_vocab != mc.vocab_size:
        what = f"checkpoint {cfg.init_from}" if cfg.init_from else f"preset {cfg.model_preset!r}"
        raise TrainError(f"vocabulary mismatch: the data's tokenizer has {data_vocab} tokens but the model "
                         f"({what}) has vocab_size={mc.vocab_size}; {vocab_hint}")
    if cfg.canvas_length is not None:
        mc = mc.replace(canvas_length=cfg.canvas_length)
    if cfg.seq_len % mc.canvas_length:
        raise TrainError(f"--seq-len {cfg.seq_len} is not a multiple of the model's canvas_length={mc.canvas_length}; "
                         f"use a multiple such as {max(1, cfg.seq_len // mc.canvas_length) * mc.canvas_length}")
    return mc


def _config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db.get(k)]


def load_model(folder: Path, expected: ModelConfig, what: str, any_canvas: bool = False) -> DiffusionGemma:
    """Load a checkpoint's weights in fp32 and make sure it is the architecture this run trains. With
    `any_canvas`, the checkpoint may have another canvas length (no weight depends on it): the model takes
    the expected one."""
    try:
        config, model = load_checkpoint(folder, dtype=torch.float32)
    except (CheckpointError, ConfigError) as e:
        raise TrainError(f"cannot load {what} {folder}: {e}") from None
    if any_canvas and config.canvas_length != expected.canvas_length:
        config = config.replace(canvas_length=expected.canvas_length)
        model.config = config
    diff = _config_differences(config, expected)
    if diff:
        raise TrainError(f"{what} {folder} is a different architecture from the one this run trains "
                         f"({'; '.join(diff[:6])}); start a new run folder or train that architecture")
    return model


def default_steps(canvas_length: int) -> int:
    """Denoising steps per canvas at the released model's pace: 48 steps for a 256-token canvas (5.3 tokens per
    step at least). A canvas of 32 gets 6; more steps than tokens would only cost passes."""
    return max(2, round(48 * canvas_length / 256))


def generation_config_for(mc: ModelConfig) -> dict[str, Any]:
    """The released sampler settings (spec A1.3), the step budget scaled to this model's canvas, its stop and
    pad ids."""
    return {"max_new_tokens": 256, "max_denoising_steps": default_steps(mc.canvas_length),
            "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
            "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
            "eos_token_id": list(mc.eos_token_ids), "pad_token_id": mc.pad_token_id}


# ---------------------------------------------------------------------------------------------------------------
# Training
TrainResult = LoopResult  # step, checkpoint, history, validations, stopped, tokens, train_seconds


def train(cfg: TrainConfig, data: DataSource | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train according to `cfg`. `data` overrides --data/--synthetic-data (a task's own batches: the command line
    passes Sudoku's); `on_step(record)` is called after every optimizer step on the main process."""
    cfg.validate()
    env = setup_distributed(cfg.device)
    try:
        return _train(cfg, data, on_step, env)
    finally:
        env.close()


def model_canvas_length(cfg: TrainConfig) -> int:
    """The canvas length the run's model will have: --canvas-length, else --init-from's, else the preset's."""
    if cfg.canvas_length:
        return cfg.canvas_length
    try:
        return (ModelConfig.from_hf_config(cfg.init_from) if cfg.init_from else preset(cfg.model_preset)).canvas_length
    except ConfigError as e:
        raise TrainError(str(e)) from None


def _data_and_config(cfg: TrainConfig, data: DataSource | None, resume_from: Path | None) -> tuple[DataSource,
                                                                                                   ModelConfig]:
    if data is None and cfg.synthetic_data:
        vocab = cfg.vocab_size or (ModelConfig.from_hf_config(cfg.init_from).vocab_size if cfg.init_from
                                   else preset(cfg.model_preset).vocab_size)
        data = synthetic_data(vocab, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    if data is not None:
        return data, expected_model_config(cfg, data.vocab_size, data.special_ids)
    from dgemma.train.data import check_tokenizer, read_meta

    meta = read_meta(cfg.data)
    # The model's tokenizer (a fine-tuned or resumed checkpoint's) must be the one the data was tokenized with.
    for folder, what in ((resume_from, "the checkpoint to resume"), (cfg.init_from, "the --init-from checkpoint")):
        if folder is not None and (Path(folder) / "tokenizer.json").is_file():
            check_tokenizer(cfg.data, meta, Path(folder) / "tokenizer.json", f"{what} {folder}")
            break
    mc = expected_model_config(cfg, int(meta["vocab_size"]), meta.get("special_ids", {}))
    return folder_data(cfg.data, cfg.batch_size, cfg.seq_len, mc.canvas_length, seed=cfg.seed), mc


def _train(cfg: TrainConfig, data: DataSource | None, on_step, env: Distributed) -> TrainResult:
    set_threads(cfg.threads, env)
    if cfg.batch_size % env.world_size:
        raise TrainError(f"--batch-size {cfg.batch_size} (global) must be a multiple of the {env.world_size} processes")
    run = Path(cfg.out).expanduser()
    resume_from, saved = runs.check_resume(run, cfg.resume, RUN_CONFIG, "train", asdict(cfg), RESUME_IDENTITY)
    data, mc = _data_and_config(cfg, data, resume_from)
    if resume_from is not None:
        recorded = saved.get("model")
        if recorded is not None and recorded != runs.jsonable(mc.to_dict()):
            diff = [k for k in recorded if recorded[k] != runs.jsonable(mc.to_dict()).get(k)]
            raise TrainError(f"the run in {run} trains a different architecture (fields {diff}); "
                             "resume with the flags it was started with")
        model = load_model(resume_from, mc, "checkpoint")
    elif cfg.init_from is not None:
        model = load_model(Path(cfg.init_from), mc, "--init-from checkpoint", any_canvas=True)
    else:
        model = init_weights(DiffusionGemma(mc), std=cfg.init_std, seed=cfg.seed)
    model = model.to(env.device).train()
    if env.is_main and resume_from is None:
        runs.write_run_config(run, RUN_CONFIG, "train", asdict(cfg), mc.to_dict())
    env.barrier()
    job = _job(cfg, data, mc, model, env)
    return run_loop(cfg, env, run, resume_from, model, TrainStep(model), job, on_step=on_step)


def _job(cfg: TrainConfig, data: DataSource, mc: ModelConfig, model: DiffusionGemma, env: Distributed) -> Job:
    """Pretraining's part of the loop: packed (or task) batches with an optional loss mask, the block-diffusion
    objective, validation at cfg.val_t, full checkpoints."""
    rows = cfg.batch_size // env.world_size

    def unpack(batch):
        x, mask = unpack_batch(batch)
        if x.dim() != 2 or x.shape != (rows, cfg.seq_len):
            raise TrainError(f"the loader yielded a batch of shape {tuple(x.shape)}; expected "
                             f"({rows}, {cfg.seq_len}) = (batch_size / processes, seq_len)")
        return x, mask

    def counts(x, mask):
        m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
        return float(m.sum()), float(m[:, 1:].sum())

    def loss(wrapped, x, mask, noise, diffusion_norm, ar_norm):
        return wrapped(x, mask, noise, diffusion_norm=diffusion_norm, ar_norm=ar_norm, ar_weight=cfg.ar_weight,
                       ce_chunk=cfg.ce_chunk, self_conditioning=cfg.sc_prob > 0, diffusion=not cfg.ar_only,
                       sc_graph=cfg.compile)  # compiled layers: pass 1 reuses pass 2's graphs

    def validate(wrapped, at_step):
        if data.val is None or not cfg.val_t:
            return None
        t0 = time.perf_counter()
        val_loader = data.val(env.rank, env.world_size)
        total: EvalLosses | None = None
        for b in range(cfg.val_batches):
            try:
                x, mask = unpack_batch(next(val_loader))
            except StopIteration:
                break
            x = x.to(env.device)
            mask = None if mask is None else mask.to(env.device)
            gens = example_generators(cfg.seed, "val", b * cfg.batch_size + env.rank * rows, x.shape[0])
            res = wrapped(x, mask, eval_t=tuple(cfg.val_t), eval_generators=gens)
            total = res if total is None else total + res
        if total is None:
            return None
        ts = sorted(total.diffusion_sum)
        sums = env.all_sum([total.ar_sum, total.ar_count, total.diffusion_count]
                           + [total.diffusion_sum[t] for t in ts])
        ar = sums[0] / max(sums[1], 1)
        diff = {f"{t:g}": sums[3 + i] / max(sums[2], 1) for i, t in enumerate(ts)}
        rec = {"val_ar": ar, "val_diffusion": diff, "val_diffusion_mean": sum(diff.values()) / len(diff),
               "seconds": time.perf_counter() - t0}
        return rec, f"ar {ar:.4f}  diffusion " + "  ".join(f"t={k} {v:.4f}" for k, v in diff.items())

    def save_model(to_save, folder):
        save_checkpoint(to_save, folder, generation_config=generation_config_for(mc),
                        tokenizer_path=data.tokenizer_path)

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    return Job(name="train", loader=data.train(env.rank, env.world_size), unpack=unpack, counts=counts, loss=loss,
               validate=validate, save_model=save_model, full_model=lambda: DiffusionGemma(mc),
               intro=f"{n_params / 1e6:.2f}M parameters, {tokens_per_step} tokens/step, data {data.name}, ",
               start_record={"parameters": n_params}, state={"train_config": asdict(cfg)},
               # --ar-only never updates the decoder-only weights: they have no optimizer state
               strict_optimizer=not cfg.ar_only, compile_layers=cfg.compile)


# ---------------------------------------------------------------------------------------------------------------
# Command line
def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `train` flags (options.add_train registers them)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values["val_t"] = tuple(values["val_t"])
    return TrainConfig(**values)
