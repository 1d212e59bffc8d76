"""Package a training run as the bundled model: bf16 weights, generation config, tokenizer, loss plot, model card.

    python tools/package_model.py --run runs/py-mini --data data/py --out models/dgemma-py-small \
        [--eval models/dgemma-py-small/eval.json] [--command "dgemma train ..."] \
        [--generation '{"max_denoising_steps": 4}'] [--notes tools/dgemma-py-small-notes.md]

A model trained in stages (each stage's run started `--init-from` the previous one's checkpoint) is packaged by
giving every stage in order: `--run A --command "..." --run B --command "..."`. The weights come from the last
stage; the card lists every stage, and the loss plot puts them end to end.

Reads each run's newest checkpoint, `log.jsonl` and `train_config.json`, and the data folder's `meta.json`
(corpus and shard hashes). The model card records everything needed to reproduce the model. `--generation` puts
measured sampler defaults over the release's (see benchmarks/sampler_sweep.py); `--notes` appends prose to the card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dgemma.checkpoint import load_checkpoint, save_checkpoint
from dgemma.train import generation_config_for



def plot(log: list[dict], path: Path, boundaries: list[int] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in log if r.get("kind") == "train"]
    val = [r for r in log if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["diffusion"] for r in train], label="diffusion CE (train)", alpha=0.7)
    ax.plot(steps, [r["ar"] for r in train], label="encoder AR NLL (train)", alpha=0.7)
    if val:
        ax.plot([r["step"] for r in val], [r["val_ar"] for r in val], "o-", label="AR NLL (val)")
        ax.plot([r["step"] for r in val], [r["val_diffusion_mean"] for r in val], "s-",
                label="diffusion CE (val, mean over t)")
    for b in boundaries:
        ax.axvline(b, color="grey", ls=":", lw=1)
    ax.set_xlabel("optimizer step (stages end to end; dotted: a new stage)")
    ax.set_ylabel("nats / token")
    ax.set_title("dgemma-py-small training losses")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _stages(runs: list[Path]) -> tuple[list[dict], list[dict], list[int]]:
    """Each stage's log and config, and the merged log with steps and tokens made cumulative across stages."""
    stages, merged, boundaries = [], [], []
    step0 = tokens0 = time0 = 0
    for run in runs:
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
        tc = json.loads((run / "train_config.json").read_text())
        train = [r for r in log if r.get("kind") == "train"]
        last = train[-1]
        stages.append({"run": str(run), "config": tc, "steps": last["step"], "tokens": last["tokens"],
                       "minutes": last["time"] / 60})
        for r in log:
            if "step" in r:
                r = {**r, "step": r["step"] + step0}
                if "tokens" in r:
                    r["tokens"] += tokens0
                if "time" in r:
                    r["time"] += time0
                merged.append(r)
        if step0:
            boundaries.append(step0)
        step0, tokens0, time0 = step0 + last["step"], tokens0 + last["tokens"], time0 + last["time"]
    return stages, merged, boundaries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, action="append", help="a run folder; repeat for later stages, in order")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval", default=None, help="JSON written by `dgemma eval --out`")
    ap.add_argument("--command", action="append", default=[],
                    help="the exact training command of each stage, in order, for the card")
    ap.add_argument("--generation", default=None, metavar="JSON",
                    help="keys merged over the default generation_config.json, e.g. the sampler settings chosen by "
                         "benchmarks/sampler_sweep.py")
    ap.add_argument("--notes", default=None, metavar="FILE",
                    help="markdown appended to the card (what the measurements show, in words)")
    args = ap.parse_args()
    try:
        overrides = json.loads(args.generation) if args.generation else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"--generation is not valid JSON ({e})") from None
    if not isinstance(overrides, dict):
        raise SystemExit("--generation must be a JSON object of generation_config.json keys")
    runs, out = [Path(r) for r in args.run], Path(args.out)
    ckpt = max((runs[-1] / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ev = json.loads(Path(args.eval).read_text()) if args.eval else None  # read first: the save replaces `out`
    notes = Path(args.notes).read_text().rstrip() if args.notes else None
    _, model = load_checkpoint(ckpt)
    generation = {**generation_config_for(model.config), **overrides}
    save_checkpoint(model, out, generation_config=generation,
                    tokenizer_path=Path(args.data) / "tokenizer.json", dtype=torch.bfloat16)
    stages, log, boundaries = _stages(runs)
    plot(log, out / "loss_curves.png", boundaries)
    tc = stages[-1]["config"]
    meta = json.loads((Path(args.data) / "meta.json").read_text())
    train = [r for r in log if r.get("kind") == "train"]
    val = [r for r in log if r.get("kind") == "val"]
    last = train[-1]
    size = (out / "model.safetensors").stat().st_size
    commands = args.command + ["(see the stage's train_config above)"] * (len(stages) - len(args.command))
    stage_lines = [f"{i + 1}. `{s['run']}`: {s['steps']} steps, {s['tokens']:,} tokens, {s['minutes']:.1f} min, lr "
                   f"{s['config']['train']['lr']}, canvas {s['config'].get('model', {}).get('canvas_length', '?')}, "
                   f"from {s['config']['train'].get('init_from') or 'random initialisation (preset ' + str(s['config']['train'].get('preset')) + ')'}"
                   for i, s in enumerate(stages)]
    lines = [
        "# dgemma-py-small",
        "",
        "A small DiffusionGemma-architecture model trained from scratch by dgemma's own code (`dgemma train`) on the",
        "Python 3.11 standard library and its documentation. It ships inside the repository so that `dgemma generate`",
        "works out of the box. **It is a tiny, briefly trained model**: expect Python-flavoured text, not correct code.",
        "",
        "## Architecture",
        f"{model.config.num_hidden_layers} layers ({', '.join(model.config.layer_types)}), hidden {model.config.hidden_size},"
        f" dense MLP {model.config.intermediate_size} + {model.config.num_experts} experts (top-{model.config.top_k_experts},"
        f" width {model.config.moe_intermediate_size}), sliding window {model.config.sliding_window},"
        f" canvas {model.config.canvas_length}, vocabulary {model.config.vocab_size} (byte-level BPE).",
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; bf16 safetensors, {size / 1e6:.1f} MB.",
        "",
        "## Data",
        "| source | licence | documents | SHA-256 |",
        "|---|---|---|---|",
        *[f"| {s['source']} | {s['licence']} | {s['documents']} | `{s['sha256']}` |" for s in meta["sources"]],
        "",
        f"Split by document (rule: `{meta['split']['rule']}`, seed {meta['split']['seed']}, val fraction"
        f" {meta['split']['val_fraction']}): train {meta['splits']['train']['tokens']:,} tokens,"
        f" validation {meta['splits']['val']['tokens']:,} tokens. Shard hashes:",
        *[f"- `{k}`: `{v}`" for k, v in meta["sha256"].items()],
        "",
        "## Training",
        f"{last['step']} optimizer steps, {last['tokens']:,} tokens seen ({last['time'] / 60:.1f} min on 2 CPU cores, fp32),"
        f" in {len(stages)} stage(s):",
        "",
        *stage_lines,
        "",
        "Objective: uniform-token corruption with t ~ U(1e-3, 1) per example, cross-entropy over all canvas positions,"
        " two-pass self-conditioning with p = 0.5, plus the encoder's next-token loss with weight"
        f" {tc['train']['ar_weight']}. Hyper-parameters of the last stage:",
        "",
        "```json",
        json.dumps(tc["train"], indent=1),
        "```",
        "",
        "Reproduce:",
        "```bash",
        "dgemma data prepare --source python-stdlib --source python-docs --out data/py --vocab-size 8192",
        *commands,
        "python tools/package_model.py " + " ".join(f"--run {s['run']}" for s in stages)
        + f" --data {args.data} --out {args.out} --eval EVAL.json"
        + (f" --generation '{json.dumps(overrides)}'" if overrides else "")
        + (f" --notes {args.notes}" if args.notes else ""),
        "```",
        "",
        "![losses](loss_curves.png)",
        "",
    ]
    if val:
        v = val[-1]
        lines += [f"Final validation (step {v['step']}): AR NLL {v['val_ar']:.3f} nats/token, diffusion CE"
                  f" {v['val_diffusion_mean']:.3f} (mean over t = 0.25, 0.5, 0.75).", ""]
    if ev:
        keys = ["parse_rate", "judge_ppl", "distinct_2", "passes_per_token", "tokens_per_s"]
        lines += ["## Evaluation (`dgemma eval`)", "",
                  f"{ev['prompts']} held-out prompts (function signature + docstring from validation files),"
                  f" {ev['max_new_tokens']} new tokens, diffusion at default settings vs greedy AR, same weights.", "",
                  "| metric | diffusion | AR |", "|---|---|---|"]
        for k in keys:
            d, a = ev.get(f"{k}_diffusion"), ev.get(f"{k}_ar")
            fmt = (lambda x: f"{x:.3f}" if isinstance(x, float) else str(x))
            lines.append(f"| {k} | {fmt(d)} | {fmt(a)} |")
        lines += ["", f"Validation: AR NLL {ev['val_ar_nll']:.3f}; diffusion CE at t=0.5 "
                      f"{ev['val_diffusion_ce_t0.5']:.3f}.", ""]
        (out / "eval.json").write_text(json.dumps(ev, indent=2) + "\n")
    if notes:
        lines += [notes, ""]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    print(f"packaged {ckpt} -> {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
