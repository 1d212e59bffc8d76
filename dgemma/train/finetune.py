"""`dgemma finetune` and `dgemma lora merge`: the flags and the dataclass they mirror (torch-free, so `--help`
answers without importing torch; the loop is in finetune_loop.py, the adapters in lora.py, the data in sft.py).

    dgemma data prepare --source python-functions --tokenizer models/dgemma-py-small --out data/pyfn
    dgemma finetune --model models/dgemma-py-small --data data/pyfn --out runs/pyfn-lora --lora-rank 8
    dgemma finetune --model models/dgemma-py-small --data data/pyfn --out runs/pyfn-full        # full fine-tuning
    dgemma finetune ... --resume                                   # continue the run in --out exactly
    torchrun --nproc-per-node 2 -m dgemma.train finetune ...            # data parallel (DDP)
    dgemma generate --model models/dgemma-py-small --adapter runs/pyfn-lora/latest --chat "..."
    dgemma lora merge --model models/dgemma-py-small --adapter runs/pyfn-lora/latest --out models/pyfn-merged

The run folder holds train-style checkpoints (checkpoints/step-NNNNNN, `latest`, log.jsonl, finetune_config.json).
A LoRA checkpoint is a PEFT adapter folder (adapter_config.json, adapter_model.safetensors, tokenizer.json) plus
trainer_state.pt; a full fine-tuning checkpoint is a model folder (as `dgemma train` writes) plus trainer_state.pt.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from dgemma.options import (
    LoopConfig,
    TrainError,
    below_one,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
    unit_interval,
)

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # lora.DEFAULT_TARGETS


@dataclass
class FinetuneConfig(LoopConfig):
    """`dgemma finetune`: the loop's settings (options.LoopConfig, some defaults changed) plus the base model, the SFT
    data and LoRA."""

    model: str = ""  # base checkpoint folder
    data: str = ""  # SFT folder made by `dgemma data prepare --format ...` (or --source python-functions)
    out: str = ""  # run folder
    steps: int = 200
    batch_size: int = 8  # examples per micro-step, all processes together
    seq_len: int = 384  # longest row (tokens, a multiple of the canvas); batches are as long as their longest row
    overflow: str = "truncate"  # examples longer than seq_len: truncate | drop
    lr: float | None = None  # default: 1e-4 full fine-tuning, 1e-3 LoRA
    warmup_steps: int = 10
    weight_decay: float = 0.0
    ar_on_prompt: bool = False  # also supervise the prompt with the AR loss (the diffusion loss never covers it)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = DEFAULT_TARGETS
    train_router: bool = False  # full fine-tuning: also train the router (frozen by default, as NeMo does)
    gradient_checkpointing: bool = False
    val_every: int = 50
    val_t: tuple[float, ...] = (0.5,)
    ckpt_every: int = 100
    keep_checkpoints: int = 2

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.lora else 1e-4)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


# Settings a resumed run must share with the run it continues.
RESUME_IDENTITY = ("model", "data", "batch_size", "grad_accum", "seq_len", "overflow", "lr", "min_lr_ratio",
                   "warmup_steps", "beta1", "beta2", "weight_decay", "ar_weight", "ar_on_prompt", "sc_prob", "t_eps",
                   "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "train_router", "seed", "fsdp")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `finetune` and `lora merge`."""
    p = subparsers.add_parser("finetune", help="supervised fine-tuning (full or LoRA) on SFT data",
                              description="Supervised fine-tuning of a checkpoint on data made by `dgemma data "
                                          "prepare --format chat|prompt-completion` (or --source python-functions): "
                                          "the diffusion loss supervises the answers only. Full fine-tuning, or "
                                          "LoRA with --lora-rank.")
    d = FinetuneConfig()
    g = p.add_argument_group("run and data")
    g.add_argument("--model", default="", help="base checkpoint folder (required, except with --resume)")
    g.add_argument("--data", default="", help="SFT data folder (dgemma data prepare --format ...; required, "
                                              "except with --resume)")
    g.add_argument("--out", required=True, help="run folder")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out, with its own settings for every flag not given (an error if it "
                        "has none)")
    g.add_argument("--steps", type=positive_int, default=d.steps)
    g.add_argument("--max-minutes", type=positive_float, default=None)
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="examples per micro-step, all processes")
    g.add_argument("--grad-accum", type=positive_int, default=d.grad_accum)
    g.add_argument("--seq-len", type=positive_int, default=d.seq_len,
                   help="longest row in tokens (a multiple of the canvas length)")
    g.add_argument("--overflow", choices=["truncate", "drop"], default=d.overflow,
                   help="examples longer than --seq-len: cut the answer's end, or leave them out (counted either way)")
    g = p.add_argument_group("LoRA (default: full fine-tuning)")
    g.add_argument("--lora-rank", type=non_negative_int, default=0, help="LoRA rank (0 = full fine-tuning)")
    g.add_argument("--lora-alpha", type=positive_float, default=d.lora_alpha, help="scaling = alpha / rank")
    g.add_argument("--lora-dropout", type=below_one, default=d.lora_dropout)
    g.add_argument("--lora-targets", default=d.lora_targets,
                   help=f"comma-separated module names inside each layer (default {DEFAULT_TARGETS}); experts, "
                        "router and self-conditioning stay frozen")
    g.add_argument("--train-router", action="store_true", help="full fine-tuning: train the router too")
    g = p.add_argument_group("objective and optimizer")
    g.add_argument("--lr", type=positive_float, default=None, help="default 1e-4 (full) or 1e-3 (LoRA)")
    g.add_argument("--min-lr-ratio", type=unit_interval, default=d.min_lr_ratio)
    g.add_argument("--warmup-steps", type=non_negative_int, default=d.warmup_steps)
    g.add_argument("--schedule", choices=["cosine", "wsd"], default=d.schedule,
                   help="cosine: warmup then cosine decay to the floor at --steps; wsd: warmup, constant, then linear "
                        "decay over the last --decay-steps")
    g.add_argument("--decay-steps", type=non_negative_int, default=d.decay_steps,
                   help="wsd: steps of final linear decay, ending at --steps (default 0: constant)")
    g.add_argument("--beta1", type=below_one, default=d.beta1)
    g.add_argument("--beta2", type=below_one, default=d.beta2)
    g.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=non_negative_float, default=d.grad_clip)
    g.add_argument("--ar-weight", type=non_negative_float, default=d.ar_weight,
                   help="weight of the encoder's next-token loss on the answer")
    g.add_argument("--ar-on-prompt", action="store_true", help="the AR loss also covers the prompt")
    g.add_argument("--sc-prob", type=unit_interval, default=d.sc_prob)
    g.add_argument("--t-eps", type=below_one, default=d.t_eps)
    g.add_argument("--ce-chunk", type=non_negative_int, default=d.ce_chunk)
    g = p.add_argument_group("execution")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    g.add_argument("--fsdp", action="store_true", help="FSDP2 sharding instead of DDP (several processes, torchrun)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    g.add_argument("--threads", type=positive_int, default=None)
    g.add_argument("--seed", type=seed_int, default=d.seed)
    g = p.add_argument_group("validation, logging, checkpoints")
    g.add_argument("--val-every", type=non_negative_int, default=d.val_every)
    g.add_argument("--val-batches", type=positive_int, default=d.val_batches)
    g.add_argument("--val-t", type=unit_interval, nargs="+", default=list(d.val_t))
    g.add_argument("--log-every", type=positive_int, default=d.log_every)
    g.add_argument("--ckpt-every", type=non_negative_int, default=d.ckpt_every)
    g.add_argument("--keep-checkpoints", type=non_negative_int, default=d.keep_checkpoints)
    g.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default=d.progress)
    p.set_defaults(func=run_cli)

    lora = subparsers.add_parser("lora", help="LoRA adapters (PEFT format): merge into a checkpoint")
    sub = lora.add_subparsers(dest="data_command", required=True, metavar="{merge}")
    m = sub.add_parser("merge", help="write base + adapter as one full checkpoint")
    m.add_argument("--model", required=True, help="base checkpoint folder")
    m.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json, adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="output checkpoint folder")
    m.add_argument("--force", action="store_true", help="replace --out if it is a checkpoint")
    lora.set_defaults(func=run_lora_cli)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    values = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig)}
    values["val_t"] = tuple(values["val_t"])
    return FinetuneConfig(**values)


def run_cli(args: argparse.Namespace) -> int:
    from dgemma.train.finetune_loop import finetune

    missing = [f"--{k}" for k in ("model", "data") if not getattr(args, k)]
    if missing:  # with --resume the run's own flags fill them in (cli.main)
        verb = "are" if len(missing) > 1 else "is"
        raise TrainError(f"{' and '.join(missing)} {verb} required: the base checkpoint and the SFT data to fine-tune "
                         "on (or --resume with the --out of an existing run)")
    finetune(config_from_args(args))
    return 0


def run_lora_cli(args: argparse.Namespace) -> int:
    from dgemma.train.finetune_loop import merge_command

    merge_command(args.model, args.adapter, args.out, force=args.force)
    return 0
