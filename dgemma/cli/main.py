"""The `dgemma` command line (also `python -m dgemma`).

    dgemma generate [--model PATH|random:PRESET] "prompt"   continuation on stdout, statistics on stderr
    dgemma generate --format jsonl "p1" "p2"                 several prompts: one JSON object per prompt and line
    dgemma info PATH                                         config summary and parameter counts
    dgemma data prepare --source python-stdlib --out DIR     corpus -> tokenizer + token shards
    dgemma train ...                                         block-diffusion training
    dgemma eval [--model PATH] [--data DIR]                  generation quality, diffusion vs AR (+ losses with --data)
    dgemma bench [--quick]                                   speed: vs transformers, diffusion vs AR, roofline
    dgemma bench train [--quick]                             one training step: ms split, FLOP/s, vs plain PyTorch
    dgemma bench structured [--quick]                        constrained JSON/regex: validity, tokens per forward
    dgemma generate --record run.jsonl "prompt"              record every denoising step (dgemma/engine/trajectory.py)
    dgemma replay run.jsonl [--speed X] / dgemma plot run.jsonl --out run.png

User errors print one line to stderr and exit with status 2; nothing else prints a traceback. `main` is the one
place that turns them into that line: argparse's own errors (through `_Parser`), impossible numbers (the `type=`
helpers of options.py refuse NaN, infinity and out-of-range values while parsing), and the ValueErrors (DataError,
TrainError, ModelLoadError, ...) and OSErrors the runners raise, and allocation failures. `--help` of every
subcommand answers without importing torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Nothing here imports torch at module level: `dgemma --help` and `dgemma SUB --help` build every parser from
# torch-free code (this file, options.py, data.py); each runner imports its heavy module when the command runs.
from dgemma.options import (
    int_in,
    new_tokens_int,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
    seed_int,
    steps_int,
)
from dgemma.params import MAX_LOGPROBS, MAX_STEPS

_stability_int = int_in(0, MAX_STEPS)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): the flag, what was wrong, where to read more."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt with diffusion (default) or autoregressive decoding",
        description="Continue prompts with block diffusion (default) or autoregressive decoding of the same "
                    "weights. The continuation goes to stdout, statistics to stderr. Diffusion-only options: "
                    "--steps, --sampler, --commit-threshold, --entropy-bound, --t-min, --t-max, "
                    "--stability-threshold, --confidence-threshold, --compat, --live; AR-only options: "
                    "--temperature, --top-k, --top-p. Giving an option of the other mode is an error.")
    p.add_argument("prompt", nargs="+",
                   help="prompt text (several prompts run as one left-padded batch; they need --format jsonl)")
    p.add_argument("--model", default=None, help="checkpoint folder, or random:PRESET (default: bundled model)")
    p.add_argument("--mode", choices=["diffusion", "ar"], default="diffusion")
    p.add_argument("--max-new-tokens", type=new_tokens_int, default=None,
                   help="tokens to generate per prompt (default: the model's generation_config, else 256)")
    p.add_argument("--format", choices=["text", "jsonl"], default="text",
                   help="stdout: text (the continuation only; one prompt) or jsonl (one JSON object per prompt and "
                        "line: prompt, text, finish_reason, prompt_tokens, completion_tokens, and logprobs with "
                        "--logprobs). Several prompts need jsonl: in text their continuations could not be told apart")
    p.add_argument("--steps", type=steps_int, default=None,
                   help=f"diffusion: max denoising steps per canvas, 1 to {MAX_STEPS}")
    p.add_argument("--sampler", choices=["entropy_bound", "confidence"], default=None,
                   help="diffusion: entropy_bound: the reference's sampler; confidence: commit the most confident "
                        "tokens (default: the model's generation_config, else entropy_bound)")
    p.add_argument("--commit-threshold", type=probability, default=None,
                   help="diffusion, confidence sampler: also commit any token more probable than this, in (0, 1]")
    p.add_argument("--entropy-bound", type=positive_float, default=None,
                   help="diffusion: summed entropy (nats) accepted per step, > 0")
    p.add_argument("--t-min", type=positive_float, default=None,
                   help="diffusion: temperature of a canvas's last step, >= 0")
    p.add_argument("--t-max", type=non_negative_float, default=None,
                   help="diffusion: temperature of a canvas's first step, > --t-min")
    p.add_argument("--stability-threshold", type=_stability_int, default=None,
                   help="diffusion: adaptive stopping after this many steps with an unchanged argmax")
    p.add_argument("--confidence-threshold", type=positive_float, default=None,
                   help="diffusion: adaptive stopping below this mean entropy, > 0")
    p.add_argument("--compat", action="store_true",
                   help="diffusion: reproduce transformers generate() token for token")
    p.add_argument("--engine", choices=["fast", "reference"], default="fast",
                   help="fast: static cache and chunked sampler (default); reference: the plain model.py path")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast engine (slow first call)")
    p.add_argument("--temperature", type=non_negative_float, default=None,
                   help="ar: sampling temperature (default 0 = greedy)")
    p.add_argument("--top-k", type=positive_int, default=None, help="ar: sample among the k most probable tokens")
    p.add_argument("--top-p", type=probability, default=None, help="ar: nucleus sampling mass, in (0, 1]")
    p.add_argument("--logprobs", type=int_in(0, MAX_LOGPROBS), default=None, metavar="N",
                   help=f"each token's log-probability (the model's raw distribution; diffusion: at the denoising "
                        f"step that chose the token) and its N most probable alternatives, 0 to {MAX_LOGPROBS}, as "
                        "a `logprobs` field of --format jsonl (needs jsonl)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--template", default=None, metavar="FILE_OR_TEXT",
                   help="the output as fixed text with holes: {{N}} is a hole of at most N tokens, \\{{ a literal "
                        "{{ (a file's path reads the file); diffusion fills every hole seeing the text on both sides")
    p.add_argument("--suffix", default=None, metavar="TEXT",
                   help="fill in the middle: a hole of --max-new-tokens tokens between the prompt and TEXT")
    p.add_argument("--json-schema", default=None, metavar="FILE_OR_TEXT",
                   help="constrain the output to JSON valid under this JSON Schema (a file's path reads the file); "
                        "a cut at --max-new-tokens reports finish_reason length")
    p.add_argument("--regex", default=None, metavar="PATTERN",
                   help="constrain the output to text matching this regular expression (whole output)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights dtype (default: the checkpoint's where this CPU computes it fast, else float32)")
    p.add_argument("--live", action="store_true", help="diffusion: show the canvas being denoised (on stderr)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply a LoRA adapter (PEFT format, e.g. a `dgemma finetune --lora-rank` checkpoint) unmerged")
    p.add_argument("--record", default=None, metavar="FILE.jsonl",
                   help="write every denoising step to FILE (one prompt; see `dgemma replay` and `dgemma plot`)")
    p.add_argument("--stats", choices=["text", "json", "none"], default="text",
                   help="statistics on stderr (text also prints a line on where to look next)")


# Options of one mode, with what to use instead in the other. None values and False flags count as not given.
_AR_ONLY = {"temperature": "for diffusion use --t-min/--t-max", "top_k": "diffusion has no top-k; see --sampler",
            "top_p": "diffusion has no top-p; see --sampler and --entropy-bound"}
_DIFFUSION_ONLY = ("steps", "sampler", "commit_threshold", "entropy_bound", "t_min", "t_max", "stability_threshold",
                   "confidence_threshold", "compat", "live")


def _check_generate_args(args) -> None:
    """Refuse, before the model loads, what cannot work: options of the other mode, prompts that are not text,
    several prompts in --format text."""
    given = [name for name in (_DIFFUSION_ONLY if args.mode == "ar" else _AR_ONLY)
             if getattr(args, name) not in (None, False)]
    if given:
        flag = "--" + given[0].replace("_", "-")
        if args.mode == "ar":
            raise ValueError(f"{flag} applies to --mode diffusion only; drop it, or leave out --mode ar")
        raise ValueError(f"{flag} applies to --mode ar only; {_AR_ONLY[given[0]]}, or pass --mode ar")
    if args.t_min is not None and args.t_max is not None and not args.t_min < args.t_max:
        raise ValueError(f"--t-min {args.t_min} must be below --t-max {args.t_max}")
    for what, texts in (("prompt", args.prompt), ("--stop string", args.stop)):
        for i, text in enumerate(texts, 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates
                bad = text[e.start:e.end].encode("utf-8", "surrogateescape").hex(" ")
                raise ValueError(f"{what} {i} is not valid UTF-8 text (byte(s) {bad} at character {e.start}); "
                                 "pass UTF-8, e.g. convert it with `iconv -t UTF-8`") from None
    if args.template is not None and args.suffix is not None:
        raise ValueError("give either --template or --suffix, not both (a suffix is the template '{{N}}SUFFIX')")
    if (args.template is not None or args.suffix is not None) and (args.record or args.compat):
        raise ValueError("--template/--suffix cannot be combined with --record or --compat; drop one")
    constrained = [f for f, v in (("--json-schema", args.json_schema), ("--regex", args.regex)) if v is not None]
    if len(constrained) > 1:
        raise ValueError("give either --json-schema or --regex, not both")
    if constrained:
        clash = [f for f, v in (("--template", args.template), ("--suffix", args.suffix), ("--record", args.record),
                                ("--compat", args.compat)) if v]
        if clash:
            raise ValueError(f"{constrained[0]} cannot be combined with {clash[0]}; drop one")
    if args.logprobs is not None and args.format == "text":
        raise ValueError("--logprobs prints a `logprobs` field per prompt: pass --format jsonl")
    if len(args.prompt) > 1 and args.format == "text":
        raise ValueError(f"{len(args.prompt)} prompts given: in --format text their continuations cannot be told "
                         "apart; pass --format jsonl (one JSON object per prompt), or one prompt")


def _pick(cli_value, gen_cfg: dict, key: str, default):
    if cli_value is not None:
        return cli_value
    return gen_cfg.get(key, default)


def _run_generate(args) -> int:
    _check_generate_args(args)
    import torch

    from dgemma.api import encode_prompts, generate_text, load
    from dgemma.engine.generate import ARParams, DiffusionParams

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    lm = load(args.model, dtype=dtype)
    if args.adapter:
        from dgemma.lora import load_adapter

        load_adapter(lm.model, args.adapter)
    g = lm.generation_config
    eos = lm.eos_ids()
    max_new = _pick(args.max_new_tokens, g, "max_new_tokens", 256)
    if args.mode == "ar":
        params = ARParams(max_new_tokens=max_new, temperature=args.temperature or 0.0, top_k=args.top_k,
                          top_p=args.top_p, logprobs=args.logprobs,
                          eos_token_ids=eos, seed=args.seed, engine=args.engine, compile=args.compile)
    else:
        params = DiffusionParams.from_generation_config(
            g, max_new_tokens=max_new, max_denoising_steps=args.steps, entropy_bound=args.entropy_bound,
            t_min=args.t_min, t_max=args.t_max, stability_threshold=args.stability_threshold,
            confidence_threshold=args.confidence_threshold, eos_token_ids=eos,
            sampler=args.sampler or ("entropy_bound" if args.compat else None), commit_threshold=args.commit_threshold,
            pad_token_id=g.get("pad_token_id", lm.model.config.pad_token_id), logprobs=args.logprobs,
            seed=args.seed, compat=args.compat, engine=args.engine, compile=args.compile)
    on_step, live = None, None
    if args.live and args.mode == "diffusion":
        on_step, live = _live_view(lm.tokenizer, len(args.prompt))
    try:
        results = generate_text(lm, args.prompt, args.mode, params, stop=args.stop, chat=args.chat, on_step=on_step,
                                record=args.record, template=_template_text(args.template), suffix=args.suffix,
                                json_schema=_template_text(args.json_schema, "--json-schema"), regex=args.regex)
    finally:
        if live is not None:
            live.stop()
    if args.format == "jsonl":
        prompt_tokens = encode_prompts(lm, args.prompt, args.chat)[1].sum(dim=1).tolist()
        for prompt, r, n in zip(args.prompt, results, prompt_tokens, strict=True):
            row = {"prompt": prompt, "text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": n,
                   "completion_tokens": len(r.token_ids)}
            if r.logprobs is not None:
                row["logprobs"] = _logprobs_json(lm.tokenizer, r.logprobs)
            if r.holes is not None:
                row["holes"] = r.holes
            sys.stdout.write(json.dumps(row) + "\n")
    else:
        sys.stdout.write(results[0].text)  # one prompt (checked above)
    sys.stdout.flush()
    if args.stats != "none":
        stats = results[0].stats.as_dict()
        stats["mode"], stats["model"] = args.mode, lm.name
        stats["finish_reasons"] = [r.finish_reason for r in results]
        if args.stats == "json":
            print(json.dumps(stats), file=sys.stderr)
        else:
            print("\n" + _stats_line(stats, args.mode), file=sys.stderr)
            print(_next_hint(lm.name, args), file=sys.stderr)
    return 0


def _template_text(value: str | None, flag: str = "--template") -> str | None:
    """--template (or --json-schema): a file's text when the value names a file, else the value itself."""
    if value is None:
        return None
    path = Path(value)
    try:
        if len(value) < 4096 and path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {value}: cannot read it as UTF-8 text ({e})") from None
    return value


def _logprobs_json(tokenizer, logprobs) -> list[dict]:
    """--format jsonl's `logprobs`: per generated token its id, text, natural-log probability and alternatives."""
    def one(token_id: int, logprob: float) -> dict:
        return {"token_id": token_id, "token": tokenizer.decode([token_id]), "logprob": logprob}

    return [{**one(t.token_id, t.logprob), "top": [one(i, v) for i, v in t.top]} for t in logprobs]


def _stats_line(stats: dict, mode: str) -> str:
    """The statistics in words: mode, tokens, time, forward passes (per prompt when there are several)."""
    def per_row(values, fmt="{}"):
        return "/".join(fmt.format(v) for v in values)

    def plural(n: int, word: str) -> str:
        return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")

    n, secs = sum(stats["new_tokens"]), stats["seconds"]
    head = f"[{mode} mode] {n} new tokens in {secs:.2f} s" + (f" ({n / secs:.1f} tokens/s)" if secs > 0 else "")
    rows = "per prompt: " if len(stats["new_tokens"]) > 1 else ""
    passes = per_row(stats["decoder_passes"])
    if mode == "ar":
        return f"{head}; {rows}{passes} forward passes (one per new token, the first also reads the prompt)"
    steps = " | ".join(", ".join(map(str, row)) for row in stats["steps_per_canvas"])
    return (f"{head}; {rows}{passes} denoising passes ({per_row(stats['tokens_per_forward'], '{:.2f}')} tokens per "
            f"pass) + {plural(stats['encoder_passes'], 'encoder pass')}; denoising steps per canvas: {steps}")


def _next_hint(model_name: str, args) -> str:
    """One line on where to look next: the same prompt in the other decoding mode, the model card, the options."""
    import shlex
    from pathlib import Path

    if model_name.startswith("random:"):
        about = f"{model_name} has random weights, so the text is noise; pass --model PATH for a trained model"
    elif (Path(model_name) / "MODEL_CARD.md").is_file():
        about = f"model card: {Path(model_name) / 'MODEL_CARD.md'}"
    else:
        about = f"model folder: {model_name}"
    prompt = shlex.quote(args.prompt[0]) if len(args.prompt) == 1 and len(args.prompt[0]) <= 60 else "PROMPT"
    model = f" --model {shlex.quote(args.model)}" if args.model else ""
    if args.mode == "diffusion":
        other = f"the same weights decoding autoregressively: dgemma generate --mode ar{model} {prompt}"
    else:
        other = f"the same weights decoding by block diffusion: dgemma generate{model} {prompt}"
    return f"next: {other}; {about}; all options: dgemma generate --help"


def _live_view(tokenizer, batch: int):
    """A rich Live panel on stderr showing row 0's argmax canvas at each step; accepted tokens in bold."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console(stderr=True)
    live = Live(Text(""), console=console, refresh_per_second=20, transient=True)
    live.start()
    committed: list[str] = []

    def on_step(canvas_idx, step, rows, argmax, accepted):
        if 0 not in rows:
            return
        j = rows.index(0)
        while len(committed) <= canvas_idx:
            committed.append("")
        text = Text("".join(committed[:canvas_idx]), style="green")
        for tid, acc in zip(argmax[j].tolist(), accepted[j].tolist()):
            text.append(tokenizer.decode([tid]), style="bold" if acc else "dim")
        text.append(f"\n[canvas {canvas_idx} step {step + 1}]", style="cyan")
        committed[canvas_idx] = tokenizer.decode(argmax[j].tolist())
        live.update(text)

    return on_step, live


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="config summary, parameter counts, active parameters per token")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")


def _run_info(args) -> int:
    from dgemma.checkpoint import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:>28}: {v}")
    return 0


def _run_eval(args) -> int:
    from dgemma.evals.eval import run_cli

    return run_cli(args)


def _run_bench(args) -> int:
    from dgemma.bench.speed import run_cli

    return run_cli(args)


def _run_bench_train(args) -> int:
    from dgemma.bench.train import run_cli

    return run_cli(args)


def _run_bench_structured(args) -> int:
    from dgemma.bench.structured import run_cli

    return run_cli(args)


def _run_data(args) -> int:
    """`dgemma data`: corpora and SFT sets (train/data.py, train/sft.py), or a generated task (tasks/sudoku.py)."""
    from dgemma.train import data

    if args.data_command != "prepare" or "sudoku" not in args.source:
        return data.run_cli(args)
    from dgemma.tasks import sudoku

    if len(args.source) > 1:
        raise data.DataError("--source sudoku cannot be combined with other sources; prepare it into its own --out")
    counts = {k: v for k, v in (("train", args.count), ("val", args.val_count), ("test", args.test_count))
              if v is not None}
    meta = sudoku.prepare(args.out, size=args.size, counts=counts, seed=args.seed,
                          givens=tuple(args.givens) if args.givens else None, force=args.force,
                          log=lambda message: print(message, file=sys.stderr, flush=True))
    print(sudoku.summary(meta, args.out))
    return 0


def _run_train(args) -> int:
    """`dgemma train`: the run, with a task's own batches when --data holds a generated task (Sudoku)."""
    from dgemma.tasks.sudoku import is_sudoku_data, sudoku_data_source
    from dgemma.train.pretrain import config_from_args, model_canvas_length, train

    cfg = config_from_args(args)
    cfg.validate()
    data = None
    if cfg.data is not None and is_sudoku_data(cfg.data):
        data = sudoku_data_source(cfg.data, cfg.batch_size, cfg.seq_len, model_canvas_length(cfg), seed=cfg.seed)
    result = train(cfg, data)
    if result.stopped is None and int(os.environ.get("RANK", "0")) == 0:
        print(f"dgemma train: done, {result.step} steps; model in {result.checkpoint}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's parser, built without importing torch (the runners import what they need)."""
    from dgemma import options
    from dgemma.train import data

    parser = _Parser(prog="dgemma", description="DiffusionGemma-style block-diffusion LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    sub.choices["generate"].set_defaults(func=_run_generate)
    _add_info(sub)
    sub.choices["info"].set_defaults(func=_run_info)
    data.add_cli(sub).set_defaults(func=_run_data)
    options.add_eval(sub).set_defaults(func=_run_eval)
    bench = options.add_bench(sub)
    bench.set_defaults(func=_run_bench)
    from dgemma.bench import serve as bench_serve  # argparse only; the load generator imports httpx when it runs

    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{serve,train,structured}")
    serve_bench = bench_sub.add_parser(
        "serve", help="load-test an OpenAI-compatible dgemma server: diffusion vs AR at several concurrencies",
        description=bench_serve.__doc__.split("\n", 1)[0])
    bench_serve.add_arguments(serve_bench)
    serve_bench.set_defaults(func=bench_serve.run_cli)
    options.add_bench_train(bench_sub).set_defaults(func=_run_bench_train)  # torch-free flags (options.py)
    options.add_bench_structured(bench_sub).set_defaults(func=_run_bench_structured)
    options.add_train(sub).set_defaults(func=_run_train)
    from dgemma.serve import main as server  # argparse only: fastapi, uvicorn and torch load when the server starts

    server.add_cli(sub)
    from dgemma.train import finetune  # torch-free flags; the loop (finetune_loop) loads when the command runs

    finetune.add_cli(sub)
    from dgemma.cli import replay  # torch-free; replay and plot import rich and matplotlib when they run

    replay.add_cli(sub)
    return parser


def _out_of_memory(e: BaseException) -> bool:
    """torch's allocation failures (torch.OutOfMemoryError on GPUs, a RuntimeError from the CPU allocator)."""
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


_OOM_FIX = {"generate": "ask for fewer tokens (--max-new-tokens) or fewer prompts, or use --dtype bfloat16",
            "eval": "lower --batch-size or --max-new-tokens", "train": "lower --batch-size or --seq-len"}


# Where `train` and `finetune` keep the settings a run was started with: (file in --out, its section).
_RUN_CONFIGS = {"train": ("train_config.json", "train"), "finetune": ("finetune_config.json", "finetune")}


def _given_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags `argv` sets itself, as opposed to those left at their defaults."""
    quiet = build_parser()
    for action in quiet._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for a in sub._actions:
                    a.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def _take_flags_from_the_run(args: argparse.Namespace, argv: list[str]) -> None:
    """`--resume` continues a run as it was started: every flag not given takes the value saved in the run folder,
    so `dgemma train --out RUN --resume` needs no other flag. Flags given still apply (and the run's resume check
    refuses those that must agree with it). A missing or damaged run folder is left to that check to report."""
    name, section = _RUN_CONFIGS[args.command]
    try:
        saved = json.loads((Path(args.out) / name).read_text())[section]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not isinstance(saved, dict):
        return
    given = _given_flags(argv)
    for key, value in saved.items():
        if key not in ("out", "resume") and key not in given and hasattr(args, key):
            setattr(args, key, value)


def main(argv: list[str] | None = None) -> int:
    """Run `dgemma ARGV`; the exit status: 0, 2 for any user error (one line on stderr), 130 on Ctrl-C."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag argparse refused (2; _Parser.error printed one line)
        return e.code if isinstance(e.code, int) else 2
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None),
                                     getattr(args, "bench_command", None))))
    if args.command in _RUN_CONFIGS and args.resume:
        _take_flags_from_the_run(args, sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, MemoryError, RuntimeError) as e:
        # ValueError and its subclasses (DataError, TrainError, ModelLoadError, ...): a bad path, a malformed
        # checkpoint, an impossible parameter. RuntimeError only when it is an allocation failure; others are bugs.
        if isinstance(e, RuntimeError) and not _out_of_memory(e):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _out_of_memory(e):
            msg = f"out of memory ({msg[:200]}); {_OOM_FIX.get(args.command, 'use a smaller model or batch')}"
        print(f"dgemma {command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
