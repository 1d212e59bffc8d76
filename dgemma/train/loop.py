"""The training loop, once: `dgemma train` (pretrain.py) and `dgemma finetune` (finetune_loop.py) both run it.

    result = run_loop(cfg, env, run, resume_from, model, step_module, job)

A kind of training brings a `Job`: its loader, how a batch's supervised positions are counted, its loss, its
validation and how its model (or adapter) is saved. The loop owns the rest: DDP/FSDP2 wrapping (dist.py), AdamW
with decay on matrices only, the learning-rate schedule, micro-steps with one gradient reduction per optimizer step,
clipping, the finite-loss check, the log and progress display, validation and checkpoints on their schedule, exact
resume (optimizer, scheduler, data order and RNG state, runs.py), the time budget and Ctrl-C/SIGTERM.

Loss normalisation: a micro-step's loss is a sum over its rows divided by the supervised counts of the whole
global batch (all micro-steps, all processes), times world_size because DDP/FSDP average gradients over processes;
every example's noise comes from a generator seeded by (seed, the example's global index). So N processes compute
the gradient one process computes on the same global batch, and a resumed run continues the same stream.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgemma.model import DiffusionGemma
from dgemma.options import LoopConfig, TrainError
from dgemma.train import runs
from dgemma.train.dist import Distributed, bf16_supported, wrap
from dgemma.train.objective import example_generators, sample_noise


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """Multiplier of the learning rate at optimizer step `step` (0-based): linear warmup, then either cosine to
    min_lr_ratio at `steps` ("cosine") or constant 1 until the last `decay_steps`, which fall linearly to
    min_lr_ratio ("wsd")."""
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


@dataclass
class Job:
    """What one kind of training gives the loop. Batches are what `loader` yields; `unpack(batch)` gives the token
    ids [rows, L] and whatever else the loss reads (a loss mask, SFT roles: a tensor or None, moved to the device)."""

    name: str  # "train" | "finetune": the command, in messages
    loader: Any  # an endless iterator of batches with state_dict() / load_state_dict()
    unpack: Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]]
    counts: Callable[[torch.Tensor, torch.Tensor | None], tuple[float, float]]  # supervised (diffusion, AR) positions
    # (wrapped, x, extra, noise, diffusion_norm, ar_norm) -> (loss to backpropagate, diffusion CE sum, AR CE sum)
    loss: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    validate: Callable[[nn.Module, int], tuple[dict[str, Any], str] | None]  # (wrapped, step) -> (record, text)
    save_model: Callable[[nn.Module, Path], None]  # write the model (or adapter) to a checkpoint folder
    full_model: Callable[[], nn.Module]  # FSDP2: an unsharded model to gather the shards into (main process)
    intro: str = ""  # the first progress line, "resuming from ..." / "starting at step 0" follows
    notes: list[str] = field(default_factory=list)  # more lines after it
    start_record: dict[str, Any] = field(default_factory=dict)  # fields of the log's "start" record
    state: dict[str, Any] = field(default_factory=dict)  # more entries of trainer_state.pt (the settings)
    validate_at_start: bool = False  # also validate before the first step of a new run
    strict_optimizer: bool = True  # False: weights without optimizer state (never updated) are allowed on resume
    compile_layers: bool = False  # torch.compile each layer (after wrapping)


@dataclass
class LoopResult:
    step: int  # optimizer steps done (in total, across resumes)
    checkpoint: Path | None  # the newest checkpoint written (or resumed from)
    history: list[dict[str, Any]]  # the "train" records of this call
    validations: list[dict[str, Any]]
    stopped: str | None  # why the run stopped before --steps ("SIGINT", "time budget"), None if it finished
    tokens: int  # tokens trained on, in total
    train_seconds: float  # time in optimizer steps, in total


# ---------------------------------------------------------------------------------------------------------------
# Progress display and stop requests
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


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM: stop after the current step; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

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
# The loop
class _Run:
    """One call of run_loop: the optimizer and the counters that a checkpoint holds."""

    def __init__(self, cfg: LoopConfig, env: Distributed, run: Path, model: DiffusionGemma, step_module: nn.Module,
                 job: Job):
        self.cfg, self.env, self.run, self.model, self.step_module, self.job = cfg, env, run, model, step_module, job
        self.sharded = env.enabled and cfg.fsdp
        self.wrapped = wrap(step_module, model.layers, env, cfg.fsdp)
        if job.compile_layers:
            # One compiled graph per layer kind and use (the encoder, the decoder passes; pass 1 records autograd so
            # that it shares pass 2's graph, see the job's loss): a raised limit leaves room for other shapes.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for layer in model.layers:
                layer.compile()
        self.params = [p for p in step_module.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                                           betas=(cfg.beta1, cfg.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step, self.tokens, self.train_seconds = 0, 0, 0.0
        self.rows = cfg.batch_size // env.world_size
        bf16 = bf16_supported(env.device) if cfg.bf16 is None else cfg.bf16
        self.bf16 = bf16
        self.autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def restore(self, folder: Path) -> None:
        """Optimizer, scheduler, counters, data order and RNG state of a checkpoint (keyed by parameter name, so it
        loads into one process, DDP or FSDP2 alike)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(folder / runs.TRAINER_STATE, map_location="cpu", weights_only=False)
        set_optimizer_state_dict(self.step_module, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=self.sharded,
                                                          strict=self.job.strict_optimizer))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        self.job.loader.load_state_dict(_mine(state["data"], self.env))
        runs.set_rng_state(_mine(state["rng"], self.env))

    def save(self, at_step: int) -> Path | None:
        """A checkpoint of this step (a collective: every process calls it); its folder on the main process."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        env = self.env
        state = {"step": at_step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                 "scheduler": self.scheduler.state_dict(), "data": env.gather(self.job.loader.state_dict()),
                 "rng": env.gather(runs.rng_state()), **self.job.state}
        to_save = self.model
        if self.sharded:  # gather the shards (collective), full copies on the main process
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.step_module, options=opts)
            state["optimizer"] = get_optimizer_state_dict(self.step_module, self.optimizer, options=opts)
            if env.is_main:
                with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
                    to_save = self.job.full_model()
                to_save.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
        else:
            state["optimizer"] = get_optimizer_state_dict(self.step_module, self.optimizer)
        folder = None
        if env.is_main:
            folder = runs.write_checkpoint(self.run, at_step, lambda f: self.job.save_model(to_save, f), state,
                                           self.cfg.keep_checkpoints)
        env.barrier()
        return folder

    def validate(self, at_step: int) -> tuple[dict[str, Any], str] | None:
        # Compiled layers validate eagerly: a few batches every val_every steps do not repay compiling the no-gradient
        # graphs they would need (measured about 20 s at the 9x9 Sudoku shape for a validation that takes 11 s).
        eager = torch.compiler.set_stance("force_eager") if self.job.compile_layers else nullcontext()
        with torch.no_grad(), self.autocast, eager:
            return self.job.validate(self.wrapped, at_step)

    def optimizer_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; its "train" record."""
        cfg, env, job = self.cfg, self.env, self.job
        t0 = time.perf_counter()
        micro = [job.unpack(next(job.loader)) for _ in range(cfg.grad_accum)]
        counts = [0.0, 0.0]
        for x, extra in micro:
            c = job.counts(x, extra)
            counts[0] += c[0]
            counts[1] += c[1]
        n_diff, n_ar = env.all_sum(counts)
        sums, step_tokens = [0.0, 0.0], 0
        for i, (x, extra) in enumerate(micro):
            x = x.to(env.device)
            extra = None if extra is None else extra.to(env.device)
            step_tokens += x.numel() * env.world_size
            first = (self.step * cfg.grad_accum + i) * cfg.batch_size + env.rank * self.rows
            noise = sample_noise(x, self.model.config.vocab_size,
                                 example_generators(cfg.seed, "train", first, x.shape[0]),
                                 eps=cfg.t_eps, sc_prob=cfg.sc_prob)
            last = i == len(micro) - 1
            sync = nullcontext()
            if isinstance(self.wrapped, nn.parallel.DistributedDataParallel) and not last:
                sync = self.wrapped.no_sync()
            elif self.sharded:  # FSDP2: reduce-scatter once per optimizer step
                self.wrapped.set_requires_gradient_sync(last)
            with sync:
                with self.autocast:
                    total, d_sum, a_sum = job.loss(self.wrapped, x, extra, noise,
                                                   max(n_diff, 1) / env.world_size, max(n_ar, 1) / env.world_size)
                total.backward()
            sums[0] += float(d_sum)
            sums[1] += float(a_sum)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        d_total, a_total = env.all_sum(sums)
        diffusion, ar = d_total / max(n_diff, 1), a_total / max(n_ar, 1)
        if not math.isfinite(diffusion + ar):
            raise TrainError(f"the loss became {diffusion + ar} at step {self.step + 1}; lower --lr, keep "
                             "--grad-clip on, or resume from an earlier checkpoint")
        self.step += 1
        self.tokens += step_tokens
        dt = time.perf_counter() - t0
        self.train_seconds += dt
        return {"kind": "train", "step": self.step, "lr": lr, "loss": diffusion + cfg.ar_weight * ar,
                "diffusion": diffusion, "ar": ar, "grad_norm": float(grad_norm), "tokens": self.tokens,
                "time": self.train_seconds, "step_time": dt, "tokens_per_s": step_tokens / dt}


def _mine(per_process: Any, env: Distributed) -> Any:
    """This process's entry of a gathered list saved by a run of the same size, else the first one's."""
    if not isinstance(per_process, list):
        return per_process  # saved by one process as a plain state
    return per_process[env.rank if len(per_process) == env.world_size else 0]


def run_loop(cfg: LoopConfig, env: Distributed, run: Path, resume_from: Path | None, model: DiffusionGemma,
             step_module: nn.Module, job: Job,
             on_step: Callable[[dict[str, Any]], None] | None = None) -> LoopResult:
    """Train `model` (through `step_module`, whose forward runs the job's objective) until cfg.steps, the time budget
    or a stop request; resume from `resume_from` when given. `on_step(record)` runs after every optimizer step on
    the main process."""
    r = _Run(cfg, env, run, model, step_module, job)
    if resume_from is not None:
        r.restore(resume_from)
    log = runs.RunLog(run / runs.LOG, env.is_main, keep_until_step=r.step if resume_from is not None else None)
    display = Display(cfg.progress, cfg.steps, r.step, cfg.log_every, env.is_main)
    display.note(f"dgemma {job.name}: {job.intro}{env.world_size} process(es) on {env.device}"
                 f"{' with bf16 autocast' if r.bf16 else ' in fp32'}, "
                 + (f"resuming from {resume_from.name}" if resume_from else "starting at step 0"))
    for note in job.notes:
        display.note(f"dgemma {job.name}: {note}")
    log.write({"kind": "start", "step": r.step, "world_size": env.world_size,
               "resumed_from": str(resume_from) if resume_from else None, **job.start_record})
    stop = StopFlag()
    history: list[dict[str, Any]] = []
    validations: list[dict[str, Any]] = []
    last_ckpt, stopped = resume_from, None
    start_seconds, recent = r.train_seconds, []

    def validate(at_step: int) -> None:
        out = r.validate(at_step)
        if out is not None:
            rec = {"kind": "val", "step": at_step, **out[0]}
            validations.append(rec)
            log.write(rec)
            display.note(f"val @ {at_step}: {out[1]}")

    def save(at_step: int) -> None:
        nonlocal last_ckpt
        folder = r.save(at_step)
        if folder is not None:
            last_ckpt = folder
            log.write({"kind": "checkpoint", "step": at_step, "path": str(folder)})

    try:
        with stop.installed():
            if r.step == 0 and job.validate_at_start and cfg.val_every:
                validate(0)
            while r.step < cfg.steps:
                rec = r.optimizer_step()
                history.append(rec)
                log.write(rec)
                recent = (recent + [rec["step_time"]])[-20:]
                display.step(rec, eta=(cfg.steps - r.step) * sum(recent) / len(recent))
                if on_step is not None and env.is_main:
                    on_step(rec)
                over_time = cfg.max_minutes is not None and r.train_seconds - start_seconds > cfg.max_minutes * 60
                # a signal may reach the processes at different steps: all stop if any must
                want_stop = env.all_sum([float(stop.requested or over_time)])[0] > 0
                if (cfg.val_every and r.step % cfg.val_every == 0) or r.step == cfg.steps:
                    validate(r.step)
                if (cfg.ckpt_every and r.step % cfg.ckpt_every == 0) or r.step == cfg.steps or want_stop:
                    save(r.step)
                if want_stop and r.step < cfg.steps:
                    stopped = stop.signal_name or ("time budget" if over_time else "stop requested by another process")
                    display.note(f"dgemma {job.name}: stopped at step {r.step} ({stopped}); checkpoint {last_ckpt}; "
                                 "continue with --resume")
                    log.write({"kind": "stop", "step": r.step, "reason": stopped})
                    break
    finally:
        display.close()
        log.close()
    return LoopResult(step=r.step, checkpoint=last_ckpt, history=history, validations=validations, stopped=stopped,
                      tokens=r.tokens, train_seconds=r.train_seconds)
