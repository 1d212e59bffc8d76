"""Fine-tuning memory and speed: LoRA against full fine-tuning, measured on the bundled model and computed for the
26B-A4B shape from its config. Prints two tables, then one JSON line (last) with every figure and what produced it.

    .venv/bin/python benchmarks/finetune_memory.py                       # bundled model, data/pyfn, 2 threads
    .venv/bin/python benchmarks/finetune_memory.py --steps 4 --threads 1 --seq-tokens 1024

Measured (bundled model, fp32 weights as `dgemma finetune` trains them, the same fixed SFT batches for every row):
trainable parameters, peak training memory and tokens/s, with and without gradient checkpointing. Peak memory is
the model's tensors (weights and buffers, there before the first step) plus the peak of the tensor bytes allocated
during two optimizer steps (gradients, AdamW state, activations), measured with dgemma.bench.memtrack on the CPU
(torch.cuda.max_memory_allocated on a GPU). Tokens/s is timed over further steps without the tracker: row tokens
(prompt, answer and filler positions) per second, the figure `dgemma finetune` logs.

Computed (26B-A4B, `preset("26b-a4b")`; parameter counts from the model built on the meta device):
frozen weights, adapter, gradients, AdamW state (two fp32 moments per trainable parameter), and activations for
`--seq-tokens` tokens per optimizer step, with and without checkpointing. The activation model counts the tensors
each layer keeps for backward per token and per pass with gradients (the encoder pass and the second decoder pass);
it is checked against the measured bundled model (`activation_model_check` in the JSON: measured / modelled, with
the LM head's logits and the CPU attention path's [T, 2T] scores added to the model for that check). For 26B-A4B it
assumes a fused attention kernel (no [T, 2T] score matrix is kept) and a chunked LM-head loss (--ce-chunk 1024): the
"head" column is one chunk's fp32 logits, soft-capped logits and gradient plus the self-conditioning pass's fp32
logits and softmax over every position. Which single GPU fits is read off the total with 10% headroom.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgemma.bench.memtrack import track_memory
from dgemma.config import FULL, ModelConfig, preset
from dgemma.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, trainable_parameters
from dgemma.model import DiffusionGemma
from dgemma.train.finetune import FinetuneConfig
from dgemma.train.finetune_loop import enable_gradient_checkpointing, prepare_model
from dgemma.train.objective import example_generators, sample_noise, sft_losses, sft_masks
from dgemma.train.sft import SFTBatches, SFTSplit

GiB = 1024**3
GPUS = [("RTX 4090 24 GB", 24), ("L40S 48 GB", 48), ("A100 or H100 80 GB", 80), ("H200 141 GB", 141),
        ("B200 192 GB", 192)]


def _bytes_of(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


def measure(model_path: str, data: str, lora: bool, ckpt: bool, batches: list, timed_steps: int) -> dict:
    cfg = FinetuneConfig(model=model_path, data=data, out="", lora_rank=8 if lora else 0)
    model = prepare_model(cfg, None)
    if ckpt:
        enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    vocab = model.config.vocab_size

    def step(i: int, b: dict) -> int:
        x, roles = b["input_ids"], b["roles"]
        _, diff, ar = sft_masks(roles, False)
        noise = sample_noise(x, vocab, example_generators(0, "train", i * x.shape[0], x.shape[0]))
        loss, _, _ = sft_losses(model, x, roles, noise, diffusion_norm=max(int(diff.sum()), 1),
                                ar_norm=max(int(ar[:, 1:].sum()), 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return x.numel()

    weights = _bytes_of(model)
    with track_memory() as mem:
        for i in range(2):
            step(i, batches[i])
    tokens, t0 = 0, time.perf_counter()
    for i in range(timed_steps):
        tokens += step(2 + i, batches[2 + i])
    seconds = time.perf_counter() - t0
    trainable, total = trainable_parameters(model)
    grads_optim = trainable * 4 * 3  # fp32 gradients + two AdamW moments
    return {"mode": "lora-r8" if lora else "full", "gradient_checkpointing": ckpt, "trainable_parameters": trainable,
            "total_parameters": total, "trainable_share": trainable / total, "weights_bytes": weights,
            "peak_bytes": weights + mem.peak_bytes, "step_peak_bytes": mem.peak_bytes,
            "activation_bytes_est": max(mem.peak_bytes - grads_optim, 0), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "config": model.config}


# ---------------------------------------------------------------------------------------------------------------
# The computed table
def parameter_counts(cfg: ModelConfig, targets=DEFAULT_TARGETS, rank: int = 8) -> dict:
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
        total = sum(p.numel() for p in model.parameters())
        router = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
        apply_lora(model, LoRAConfig(rank=rank, targets=targets))
        adapter, _ = trainable_parameters(model)
    return {"total": total, "router": router, "adapter": adapter, "full_trainable": total - router}


def activation_elements_per_token(cfg: ModelConfig, ckpt: bool) -> float:
    """Elements kept for backward per token, summed over the layers and the two passes with gradients."""
    H, I, Ie, k = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size, cfg.top_k_experts
    per_layer = 0.0
    for t in cfg.layer_types:
        d = cfg.global_head_dim if t == FULL else cfg.head_dim
        nkv = cfg.num_global_key_value_heads if t == FULL else cfg.num_key_value_heads
        q, kv = cfg.num_attention_heads * d, nkv * d
        attn = H + 3 * q + 4 * kv  # normed input; q before/after norm and rope, attention output; k, v
        dense = 4 * I + 2 * H  # gate, up, activation, product; normed in, out
        experts = k * (4 * Ie + 2 * H) + 2 * H  # per routed copy: gate/up/act/product, gathered in and out
        norms = 7 * H  # inputs of the seven weighted norms (fp32 statistics are small)
        per_layer += attn + dense + experts + norms
    layers_in = len(cfg.layer_types) * H  # checkpointing: each layer's input only, ...
    one_layer = per_layer / len(cfg.layer_types)  # ... plus one layer recomputed at a time
    per_pass = (layers_in + one_layer) if ckpt else per_layer
    return 2 * per_pass + 2 * H  # encoder + decoder pass 2; the K/V cache rows are inside the encoder's count


def head_bytes(cfg: ModelConfig, positions: int, ce_positions: int) -> int:
    """LM-head tensors: fp32 logits, soft-capped logits and their gradient for `ce_positions` positions at once, plus
    the self-conditioning pass 1's fp32 logits and their bf16/fp32 softmax over all `positions`."""
    return ce_positions * cfg.vocab_size * 4 * 3 + positions * cfg.vocab_size * (4 + 4)


def attention_score_bytes(cfg: ModelConfig, batch: int, row_tokens: int, ckpt: bool) -> int:
    """The CPU's math SDPA path keeps fp32 scores and probabilities [B, nh, T, 2T] per layer and pass with gradients
    (a fused GPU kernel keeps none); with checkpointing only the recomputed layer's."""
    per_layer = 2 * batch * cfg.num_attention_heads * row_tokens * 2 * row_tokens * 4
    return per_layer * (1 if ckpt else 2 * len(cfg.layer_types))


def computed_table(cfg: ModelConfig, seq_tokens: int, rank: int = 8, ce_chunk: int = 1024) -> list[dict]:
    counts = parameter_counts(cfg, rank=rank)
    rows = []
    head = head_bytes(cfg, seq_tokens, ce_chunk)  # the loss chunked (--ce-chunk 1024)
    for mode in ("lora", "full"):
        for ckpt in (False, True):
            act = activation_elements_per_token(cfg, ckpt) * 2 * seq_tokens  # bf16 activations
            if mode == "lora":
                frozen, trainable = counts["total"] * 2, counts["adapter"]  # bf16 frozen base
                weights = frozen + trainable * 4
            else:
                trainable = counts["full_trainable"]
                weights = counts["total"] * 4  # fp32 master weights (bf16 autocast)
            grads, optim = trainable * 4, trainable * 8
            total = weights + grads + optim + act + head
            fits = next((name for name, gb in GPUS if total * 1.1 <= gb * 1e9), "none single (shard: FSDP2)")
            rows.append({"mode": mode, "gradient_checkpointing": ckpt, "trainable_parameters": trainable,
                         "weights_bytes": weights, "gradient_bytes": grads, "optimizer_bytes": optim,
                         "activation_bytes": act, "lm_head_bytes": head,
                         "activation_bytes_per_token": act / seq_tokens, "total_bytes": total, "fits": fits})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "dgemma-py-small"))
    ap.add_argument("--data", default=str(ROOT / "data" / "pyfn"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per row (after two tracked steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-tokens", type=int, default=4096, help="26B-A4B table: tokens per optimizer step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    measured = []
    if Path(args.data, "meta.json").is_file():
        C = ModelConfig.from_hf_config(args.model).canvas_length
        loader = SFTBatches(SFTSplit.load(args.data, "train", args.seq_len, C), args.batch_size, seed=0)
        batches = [next(loader) for _ in range(2 + args.steps)]
        for lora in (True, False):
            for ckpt in (False, True):
                measured.append(measure(args.model, args.data, lora, ckpt, batches, args.steps))
    else:
        print(f"(no {args.data}: the measured table is skipped; dgemma data prepare --source python-functions "
              f"--tokenizer {args.model} --out {args.data})")

    print(f"measured: {args.model} on {args.data}, batch {args.batch_size}, rows up to {args.seq_len} tokens, "
          f"{args.threads} thread(s), fp32")
    print(f"{'mode':<9}{'ckpt':>6}{'trainable':>12}{'share':>8}{'peak MiB':>10}{'step MiB':>10}{'tokens/s':>10}")
    for r in measured:
        print(f"{r['mode']:<9}{'yes' if r['gradient_checkpointing'] else 'no':>6}{r['trainable_parameters']:>12,}"
              f"{100 * r['trainable_share']:>7.2f}%{r['peak_bytes'] / 2**20:>10.1f}{r['step_peak_bytes'] / 2**20:>10.1f}"
              f"{r['tokens_per_s']:>10.1f}")
    check = None
    if measured:  # the activation model against the bundled model's measured activations (fp32 there)
        cfg = measured[0]["config"]
        b = max(batches[:2], key=lambda b: b["input_ids"].numel())  # the larger of the two tracked steps
        tokens, T = b["input_ids"].numel(), b["input_ids"].shape[1]
        supervised = int((b["roles"] >= 2).sum()) * 2  # diffusion + AR positions (about)
        predicted = {ck: activation_elements_per_token(cfg, ck) * 4 * tokens + head_bytes(cfg, tokens, supervised)
                     + attention_score_bytes(cfg, args.batch_size, T, ck) for ck in (False, True)}
        check = {("ckpt" if r["gradient_checkpointing"] else "no_ckpt") + "_" + r["mode"]:
                 r["activation_bytes_est"] / predicted[r["gradient_checkpointing"]] for r in measured}

    big = preset("26b-a4b")
    rows = computed_table(big, args.seq_tokens)
    print(f"\ncomputed: 26B-A4B, {args.seq_tokens} tokens per step, LoRA rank 8 on {','.join(DEFAULT_TARGETS)} "
          "(frozen base bf16) vs full fine-tuning (fp32 master weights, bf16 activations), AdamW")
    print(f"{'mode':<6}{'ckpt':>5}{'trainable':>15}{'weights':>9}{'grads':>8}{'AdamW':>8}{'activ.':>8}{'head':>7}"
          f"{'total GiB':>11}  fits on")
    for r in rows:
        g = {k: r[k] / GiB for k in r if k.endswith("_bytes")}
        print(f"{r['mode']:<6}{'yes' if r['gradient_checkpointing'] else 'no':>5}{r['trainable_parameters']:>15,}"
              f"{g['weights_bytes']:>9.1f}{g['gradient_bytes']:>8.1f}{g['optimizer_bytes']:>8.1f}"
              f"{g['activation_bytes']:>8.1f}{g['lm_head_bytes']:>7.1f}{g['total_bytes']:>11.1f}  {r['fits']}")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout
    for r in measured:
        r["config"] = "dgemma-py-small"
    print(json.dumps({"benchmark": "finetune_memory", "git": rev.strip(), "device": "cpu",
                      "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                      "model": args.model, "data": args.data, "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "measured": measured, "activation_model_check": check, "computed_26b_a4b": rows,
                      "computed_seq_tokens": args.seq_tokens, "parameters_26b_a4b": parameter_counts(big)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
