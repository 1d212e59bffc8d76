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
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dgemma.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dgemma.config import ConfigError, ModelConfig, preset
from dgemma.model import DiffusionGemma, init_weights
from dgemma.options import TrainConfig, TrainError, add_train
from dgemma.train.objective import EvalLosses, evaluate_losses, sample_noise, training_losses

TRAINER_STATE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
LOG = "log.jsonl"
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
        g = torch.Generator().manual_seed(_mix(self.seed, "synthetic", s))
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
# Randomness keyed to the example, not the process
def _mix(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across runs, processes and Python versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def example_generators(seed: int, domain: str, first_index: int, n: int) -> list[torch.Generator]:
    """One CPU generator per example, seeded by (seed, domain, global example index)."""
    return [torch.Generator().manual_seed(_mix(seed, domain, first_index + i)) for i in range(n)]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of --lr at optimizer step `step` (0-based): linear warmup, then either cosine to min_lr_ratio at
    `steps` ("cosine") or constant 1 until the last `decay_steps`, which fall linearly to min_lr_ratio ("wsd")."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        start = cfg.steps - cfg.decay_steps
        if cfg.decay_steps == 0 or step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / cfg.decay_steps)
        return 1.0 + (cfg.min_lr_ratio - 1.0) * progress
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------------
# Processes and devices
@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we called init_process_group (and so destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up on `device`. On CPUs, oneDNN needs native bf16 instructions
    (AVX512-BF16 or AMX); on an AVX2-only CPU bf16 matmuls were measured 10-100x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def setup_distributed(device: str = "auto") -> Distributed:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); start the process group
    (nccl on GPUs, gloo on the CPU) when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainError("--device cuda but no CUDA GPU is visible; use --device cpu")
    dev = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        owns = True
    return Distributed(rank, world, local_rank, local_world, dev, owns)


# ---------------------------------------------------------------------------------------------------------------
# The module DDP/FSDP wrap: its forward runs the whole objective, so the wrappers' hooks see every use of the weights
class TrainStep(nn.Module):
    def __init__(self, model: DiffusionGemma):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, loss_mask: torch.Tensor | None, noise=None, diffusion_norm: float = 1.0,
                ar_norm: float = 1.0, ar_weight: float = 1.0, ce_chunk: int = 0, self_conditioning: bool = True,
                eval_t: tuple[float, ...] | None = None, eval_generators=None, diffusion: bool = True):
        if eval_t is not None:  # validation (no gradients)
            return evaluate_losses(self.model, x, eval_t, eval_generators, loss_mask=loss_mask)
        losses = training_losses(self.model, x, noise, ar_weight=ar_weight, loss_mask=loss_mask, ce_chunk=ce_chunk,
                                 diffusion_norm=diffusion_norm, ar_norm=ar_norm, self_conditioning=self_conditioning,
                                 diffusion=diffusion)
        return losses.total, losses.diffusion_sum, losses.ar_sum


# ---------------------------------------------------------------------------------------------------------------
# Run folder: checkpoints, log
def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_complete(folder: Path) -> bool:
    return (folder / TRAINER_STATE).is_file() and (folder / "config.json").is_file()


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run (where `latest` points, else the highest complete step folder)."""
    run = Path(run_dir)
    link = run / LATEST
    if link.is_symlink() or link.is_dir():
        target = link.resolve()
        if _is_complete(target):
            return target
    found = sorted((p for p in (run / CHECKPOINTS).glob("step-*") if _is_complete(p)), reverse=True)
    return found[0] if found else None


def _point_latest(run: Path, folder: Path) -> None:
    tmp = run / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(folder, run), tmp)
    os.replace(tmp, run / LATEST)


def write_checkpoint(run: Path, step: int, model: DiffusionGemma, trainer_state: dict[str, Any],
                     tokenizer_path: Path | None, generation_config: dict | None, keep: int) -> Path:
    """Write checkpoints/step-NNNNNN (HF folder + trainer_state.pt) under a temporary name, rename it into place,
    then move `latest` to it and prune old ones. An interruption at any point leaves `latest` on a complete one."""
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # leftovers of an interrupted write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    staging = root / f".{final.name}.partial"
    save_checkpoint(model, staging, generation_config=generation_config, tokenizer_path=tokenizer_path)
    tmp_state = staging / f".{TRAINER_STATE}.tmp"
    torch.save(trainer_state, tmp_state)
    with open(tmp_state, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp_state, staging / TRAINER_STATE)
    if final.exists():  # a step re-reached after resuming from an earlier checkpoint
        old = root / f".{final.name}.old"
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)
    _point_latest(run, final)
    if keep:
        done = sorted(p for p in root.glob("step-*") if _is_complete(p))
        for old in done[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


class RunLog:
    """log.jsonl: one JSON object per line, appended and flushed (main process only)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None):
        """keep_until_step: None starts a new log; a step keeps the records up to it (resuming)."""
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is None:
            path.unlink(missing_ok=True)  # a fresh run in a folder that held an unfinished start
        if enabled and keep_until_step is not None and path.exists():
            # Resuming: drop records of steps after the checkpoint (they will be redone).
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut by a crash
            _write_text_atomic(path, "".join(k + "\n" for k in kept))
        self.file = open(path, "a") if enabled else None  # noqa: SIM115 (open for the whole run)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------------------------------------------
# Progress display
def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Display:
    """A rich progress bar on a terminal, else one compact line every `log_every` steps (stderr, main process)."""

    def __init__(self, mode: str, total: int, start: int, log_every: int, enabled: bool):
        self.log_every, self.total = log_every, total
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.bar = None
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=Console(stderr=True))
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def note(self, text: str) -> None:
        if self.mode == "bar":
            self.bar.console.print(text)
        elif self.mode == "lines":
            print(text, file=sys.stderr, flush=True)

    def step(self, rec: dict[str, Any], eta: float) -> None:
        info = (f"loss {rec['loss']:.4f} (diff {rec['diffusion']:.3f} ar {rec['ar']:.3f})  lr {rec['lr']:.2e}  "
                f"{rec['tokens_per_s'] / 1000:.2f}k tok/s")
        if self.mode == "bar":
            self.bar.update(self.task, completed=rec["step"], info=info)
        elif self.mode == "lines" and (rec["step"] % self.log_every == 0 or rec["step"] == self.total):
            print(f"step {rec['step']}/{self.total}  {info}  eta {_fmt_time(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------------------------------
# Stop requests (Ctrl-C / SIGTERM)
class StopFlag:
    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts at once

    @contextmanager
    def installed(self):
        try:
            old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: no signal handling
            old = {}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


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
@dataclass
class TrainResult:
    step: int  # optimizer steps done (in total, across resumes)
    run_dir: Path
    checkpoint: Path | None  # the newest checkpoint written
    history: list[dict[str, Any]]  # the "train" records of this call
    validations: list[dict[str, Any]]
    stopped: str | None  # why the run stopped before --steps ("SIGINT", "time budget"), None if it finished


def train(cfg: TrainConfig, data: DataSource | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train according to `cfg`. `data` overrides --data/--synthetic-data; `on_step(record)` is called after every
    optimizer step on the main process."""
    cfg.validate()
    env = setup_distributed(cfg.device)
    try:
        return _train(cfg, data, on_step, env)
    finally:
        env.close()


def _set_threads(cfg: TrainConfig, env: Distributed) -> None:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif env.device.type == "cpu" and env.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))


def _prepare_run(cfg: TrainConfig, env: Distributed) -> tuple[Path, Path | None, dict | None]:
    run = Path(cfg.out).expanduser()
    resume_from = latest_checkpoint(run) if run.exists() else None
    saved = None
    if resume_from is not None:
        if not cfg.resume:
            raise TrainError(f"{run} already holds checkpoints (newest: {resume_from.name}); pass --resume to "
                             "continue that run, or choose a new --out")
        try:
            saved = json.loads((run / RUN_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainError(f"cannot read {run / RUN_CONFIG} ({e}); the run folder is damaged") from None
        mine = asdict(cfg)
        diffs = [f"--{k.replace('_', '-')}: run has {saved['train'].get(k)!r}, now {mine[k]!r}"
                 for k in RESUME_IDENTITY if _jsonable(saved["train"].get(k)) != _jsonable(mine[k])]
        if diffs:
            raise TrainError(f"cannot resume {run} with different settings ({'; '.join(diffs)}); use the same flags "
                             "or start a new --out")
    elif cfg.resume:
        where = f"{run} has no complete checkpoint" if run.exists() else f"{run} does not exist"
        raise TrainError(f"--resume: nothing to resume, {where}; drop --resume to start a new run there, or give "
                         "the --out of the run to continue")
    return run, resume_from, saved


def _is_task_data(folder: str) -> bool:
    from dgemma.tasks.sudoku import is_sudoku_data

    return is_sudoku_data(folder)


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(env: Distributed, obj: Any) -> list[Any]:
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _train(cfg: TrainConfig, data: DataSource | None, on_step, env: Distributed) -> TrainResult:
    _set_threads(cfg, env)
    if cfg.batch_size % env.world_size:
        raise TrainError(f"--batch-size {cfg.batch_size} (global) must be a multiple of the {env.world_size} processes")
    run, resume_from, saved = _prepare_run(cfg, env)

    # --- data and model ---
    if data is None and cfg.synthetic_data:
        vocab = cfg.vocab_size or (ModelConfig.from_hf_config(cfg.init_from).vocab_size if cfg.init_from
                                   else preset(cfg.model_preset).vocab_size)
        data = synthetic_data(vocab, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    if data is None and cfg.data is not None and _is_task_data(cfg.data):  # a generated task (sudoku.py)
        from dgemma.tasks.sudoku import sudoku_data_source

        canvas = cfg.canvas_length or (ModelConfig.from_hf_config(cfg.init_from).canvas_length if cfg.init_from
                                       else preset(cfg.model_preset).canvas_length)
        data = sudoku_data_source(cfg.data, cfg.batch_size, cfg.seq_len, canvas, seed=cfg.seed)
    if data is None:
        from dgemma.train.data import check_tokenizer, read_meta

        meta = read_meta(cfg.data)
        # The model's tokenizer (a fine-tuned or resumed checkpoint's) must be the one the data was tokenized with.
        for folder, what in ((resume_from, "the checkpoint to resume"), (cfg.init_from, "the --init-from checkpoint")):
            if folder is not None and (Path(folder) / "tokenizer.json").is_file():
                check_tokenizer(cfg.data, meta, Path(folder) / "tokenizer.json", f"{what} {folder}")
                break
        mc = expected_model_config(cfg, int(meta["vocab_size"]), meta.get("special_ids", {}))
        data = folder_data(cfg.data, cfg.batch_size, cfg.seq_len, mc.canvas_length, seed=cfg.seed)
    else:
        mc = expected_model_config(cfg, data.vocab_size, data.special_ids)

    if resume_from is not None:
        recorded = saved.get("model") if saved else None
        if recorded is not None and recorded != _jsonable(mc.to_dict()):
            diff = [k for k in recorded if recorded[k] != _jsonable(mc.to_dict()).get(k)]
            raise TrainError(f"the run in {run} trains a different architecture (fields {diff}); "
                             "resume with the flags it was started with")
        model = load_model(resume_from, mc, "checkpoint")
    elif cfg.init_from is not None:
        model = load_model(Path(cfg.init_from), mc, "--init-from checkpoint", any_canvas=True)
    else:
        model = init_weights(DiffusionGemma(mc), std=cfg.init_std, seed=cfg.seed)
    model = model.to(env.device).train()

    if env.is_main and resume_from is None:
        run.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(run / RUN_CONFIG, json.dumps({"train": asdict(cfg), "model": mc.to_dict()}, indent=2))
    env.barrier()

    # --- wrapping, optimizer, schedule ---
    step_module = TrainStep(model)
    if env.enabled and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        # Layers return their keys/values as transposed views for the cache; nothing modifies them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(step_module)
        wrapped = step_module
    elif env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(step_module, forward_sync_buffers=False)  # buffers are constants
    else:
        wrapped = step_module
    if cfg.compile:
        # One compiled forward per layer kind (sliding/full) and use (encoder, pass 1 without gradients, pass 2,
        # validation): more variants than dynamo's default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for layer in model.layers:
            layer.compile()

    params = [p for p in step_module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    loader = data.train(env.rank, env.world_size)

    step, tokens_done, train_seconds = 0, 0, 0.0
    if resume_from is not None:
        state = torch.load(resume_from / TRAINER_STATE, map_location="cpu", weights_only=False)
        # The optimizer state is keyed by parameter name, so it loads into DDP, FSDP2 or a single process alike.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        sharded = cfg.fsdp and env.enabled
        set_optimizer_state_dict(step_module, optimizer, state["optimizer"],
                                 # --ar-only never updates the decoder-only weights: they have no optimizer state
                                 options=StateDictOptions(full_state_dict=sharded, strict=not cfg.ar_only))
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_done, train_seconds = state["step"], state["tokens"], state["train_seconds"]
        same_world = len(state["data"]) == env.world_size
        loader.load_state_dict(state["data"][env.rank if same_world else 0])
        _set_rng_state(state["rng"][env.rank if len(state["rng"]) == env.world_size else 0])

    # --- bookkeeping ---
    log = RunLog(run / LOG, env.is_main, keep_until_step=step if resume_from is not None else None)
    rows = cfg.batch_size // env.world_size
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    bf16 = bf16_supported(env.device) if cfg.bf16 is None else cfg.bf16
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext())
    display = Display(cfg.progress, cfg.steps, step, cfg.log_every, env.is_main)
    n_params = sum(p.numel() for p in model.parameters())
    display.note(f"dgemma train: {n_params / 1e6:.2f}M parameters, {env.world_size} process(es) on {env.device}"
                 f"{' with bf16 autocast' if bf16 else ' in fp32'}, "
                 f"{tokens_per_step} tokens/step, data {data.name}, "
                 + (f"resuming from {resume_from.name}" if resume_from else "starting at step 0"))
    log.write({"kind": "start", "step": step, "world_size": env.world_size, "resumed_from":
               str(resume_from) if resume_from else None, "parameters": n_params})
    stop = StopFlag()
    history: list[dict[str, Any]] = []
    validations: list[dict[str, Any]] = []
    last_ckpt: Path | None = resume_from
    stopped: str | None = None
    start_seconds = train_seconds
    recent: list[float] = []

    def save(at_step: int) -> Path | None:
        nonlocal last_ckpt
        state = {
            "step": at_step, "tokens": tokens_done, "train_seconds": train_seconds,
            "scheduler": scheduler.state_dict(),
            "data": _gather(env, loader.state_dict()), "rng": _gather(env, _rng_state()),
            "train_config": asdict(cfg),
        }
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if cfg.fsdp and env.enabled:  # gather the shards (collective), full copies on the main process
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(step_module, options=opts)
            state["optimizer"] = get_optimizer_state_dict(step_module, optimizer, options=opts)
            to_save = None
            if env.is_main:
                to_save = DiffusionGemma(mc)
                to_save.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
        else:
            state["optimizer"] = get_optimizer_state_dict(step_module, optimizer)
            to_save = model
        if env.is_main:
            last_ckpt = write_checkpoint(run, at_step, to_save, state, data.tokenizer_path,
                                         generation_config_for(mc), cfg.keep_checkpoints)
            log.write({"kind": "checkpoint", "step": at_step, "path": str(last_ckpt)})
        env.barrier()
        return last_ckpt

    def validate(at_step: int) -> None:
        if data.val is None or not cfg.val_t:
            return
        t0 = time.perf_counter()
        val_loader = data.val(env.rank, env.world_size)
        total: EvalLosses | None = None
        with torch.no_grad(), autocast:
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
            return
        ts = sorted(total.diffusion_sum)
        sums = env.all_sum([total.ar_sum, total.ar_count, total.diffusion_count]
                           + [total.diffusion_sum[t] for t in ts])
        ar = sums[0] / max(sums[1], 1)
        diff = {f"{t:g}": sums[3 + i] / max(sums[2], 1) for i, t in enumerate(ts)}
        rec = {"kind": "val", "step": at_step, "val_ar": ar, "val_diffusion": diff,
               "val_diffusion_mean": sum(diff.values()) / len(diff), "seconds": time.perf_counter() - t0}
        validations.append(rec)
        log.write(rec)
        display.note(f"val @ {at_step}: ar {ar:.4f}  diffusion " + "  ".join(f"t={k} {v:.4f}" for k, v in diff.items()))

    try:
        with stop.installed():
            while step < cfg.steps:
                t0 = time.perf_counter()
                micro = [unpack_batch(next(loader)) for _ in range(cfg.grad_accum)]
                for x, mask in micro:
                    if x.dim() != 2 or x.shape != (rows, cfg.seq_len):
                        raise TrainError(f"the loader yielded a batch of shape {tuple(x.shape)}; expected "
                                         f"({rows}, {cfg.seq_len}) = (batch_size / processes, seq_len)")
                counts = [0.0, 0.0]
                for x, mask in micro:
                    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
                    counts[0] += float(m.sum())
                    counts[1] += float(m[:, 1:].sum())
                n_diff, n_ar = env.all_sum(counts)
                sums = [0.0, 0.0]
                for i, (x, mask) in enumerate(micro):
                    x = x.to(env.device)
                    mask = None if mask is None else mask.to(env.device)
                    first = ((step * cfg.grad_accum + i) * cfg.batch_size) + env.rank * rows
                    noise = sample_noise(x, mc.vocab_size, example_generators(cfg.seed, "train", first, rows),
                                         eps=cfg.t_eps, sc_prob=cfg.sc_prob)
                    last = i == len(micro) - 1
                    sync = nullcontext()
                    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not last:
                        sync = wrapped.no_sync()
                    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once per step
                        wrapped.set_requires_gradient_sync(last)
                    with sync:
                        with autocast:
                            # Sums over the global batch divided by global counts; DDP/FSDP average gradients over
                            # processes, hence the factor world_size.
                            total, d_sum, a_sum = wrapped(x, mask, noise, diffusion_norm=max(n_diff, 1) / env.world_size,
                                                          ar_norm=max(n_ar, 1) / env.world_size,
                                                          ar_weight=cfg.ar_weight, ce_chunk=cfg.ce_chunk,
                                                          self_conditioning=cfg.sc_prob > 0,
                                                          diffusion=not cfg.ar_only)
                        total.backward()
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
                    raise TrainError(f"the loss became {diffusion + ar} at step {step + 1}; lower --lr, keep "
                                     "--grad-clip on, or resume from an earlier checkpoint")
                step += 1
                tokens_done += tokens_per_step
                dt = time.perf_counter() - t0
                train_seconds += dt
                recent = (recent + [dt])[-20:]
                rec = {"kind": "train", "step": step, "lr": lr, "loss": diffusion + cfg.ar_weight * ar,
                       "diffusion": diffusion, "ar": ar, "grad_norm": float(grad_norm), "tokens": tokens_done,
                       "time": train_seconds, "step_time": dt, "tokens_per_s": tokens_per_step / dt}
                history.append(rec)
                log.write(rec)
                display.step(rec, eta=(cfg.steps - step) * sum(recent) / len(recent))
                if on_step is not None and env.is_main:
                    on_step(rec)

                over_time = cfg.max_minutes is not None and train_seconds - start_seconds > cfg.max_minutes * 60
                # a signal may reach the processes at different steps: all stop if any must
                want_stop = env.all_sum([float(stop.requested or over_time)])[0] > 0
                if (cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps:
                    validate(step)
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps or want_stop:
                    save(step)
                if want_stop and step < cfg.steps:
                    stopped = stop.signal_name or ("time budget" if over_time else "stop requested by another process")
                    display.note(f"dgemma train: stopped at step {step} ({stopped}); checkpoint {last_ckpt}; "
                                 f"continue with --resume")
                    log.write({"kind": "stop", "step": step, "reason": stopped})
                    break
    finally:
        display.close()
        log.close()
    return TrainResult(step=step, run_dir=run, checkpoint=last_ckpt, history=history, validations=validations,
                       stopped=stopped)


# ---------------------------------------------------------------------------------------------------------------
# Command line
def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `train` on a parent parser's subparsers (flags in options.add_train); dispatch with `run_cli(args)`."""
    p = add_train(subparsers)
    p.set_defaults(func=run_cli)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values["val_t"] = tuple(values["val_t"])
    return TrainConfig(**values)


def run_cli(args: argparse.Namespace) -> int:
    """Run a parsed `train` command. User errors (TrainError, DataError, ... all ValueErrors) propagate to
    `cli.main`, which prints them as one line and exits with status 2."""
    result = train(config_from_args(args))
    if result.stopped is None and dist_rank() == 0:
        print(f"dgemma train: done, {result.step} steps; model in {result.checkpoint}", file=sys.stderr)
    return 0


def dist_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    """`python -m dgemma.train ...` (and torchrun -m dgemma.train): the same as `dgemma train ...`."""
    from dgemma.cli.main import main as cli_main  # the command line's one error handler

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
