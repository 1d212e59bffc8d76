"""The `dgemma` command line.

    dgemma generate [--model PATH|random:PRESET] "prompt"   continuation on stdout, statistics on stderr
    dgemma info PATH                                         config summary and parameter counts
    dgemma data prepare --source python-stdlib --out DIR     corpus -> tokenizer + token shards
    dgemma train ...                                         block-diffusion training
    dgemma eval --model PATH --data DIR                      losses and generation quality, diffusion vs AR
    dgemma bench [--quick]                                   speed: vs transformers, diffusion vs AR, roofline

User errors print one line to stderr and exit with status 2; nothing else prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .generate import ARParams, DiffusionParams


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with diffusion (default) or autoregressive decoding")
    p.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one left-padded batch)")
    p.add_argument("--model", default=None, help="checkpoint folder, or random:PRESET (default: bundled model)")
    p.add_argument("--mode", choices=["diffusion", "ar"], default="diffusion")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas")
    p.add_argument("--sampler", choices=["entropy_bound", "confidence"], default=None,
                   help="entropy_bound: the reference's sampler; confidence: commit the most confident tokens "
                        "(default: the model's generation_config, else entropy_bound)")
    p.add_argument("--commit-threshold", type=float, default=None,
                   help="confidence sampler: also commit any token more probable than this")
    p.add_argument("--entropy-bound", type=float, default=None)
    p.add_argument("--t-min", type=float, default=None)
    p.add_argument("--t-max", type=float, default=None)
    p.add_argument("--stability-threshold", type=int, default=None)
    p.add_argument("--confidence-threshold", type=float, default=None)
    p.add_argument("--compat", action="store_true", help="reproduce transformers generate() token for token")
    p.add_argument("--engine", choices=["fast", "reference"], default="fast",
                   help="fast: static cache and chunked sampler (default); reference: the plain model.py path")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast engine (slow first call)")
    p.add_argument("--temperature", type=float, default=0.0, help="AR sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--live", action="store_true", help="show the canvas being denoised (on stderr)")
    p.add_argument("--stats", choices=["text", "json", "none"], default="text", help="statistics format on stderr")


def _pick(cli_value, gen_cfg: dict, key: str, default):
    if cli_value is not None:
        return cli_value
    return gen_cfg.get(key, default)


def _run_generate(args) -> int:
    import torch

    from .api import generate_text, load

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    lm = load(args.model, dtype=dtype)
    g = lm.generation_config
    eos = g.get("eos_token_id", lm.model.config.eos_token_ids or lm.tokenizer.stop_ids())
    eos = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else None
    max_new = _pick(args.max_new_tokens, g, "max_new_tokens", 256)
    if args.mode == "ar":
        params = ARParams(max_new_tokens=max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          eos_token_ids=eos, seed=args.seed, engine=args.engine, compile=args.compile)
    else:
        params = DiffusionParams.from_generation_config(
            g, max_new_tokens=max_new, max_denoising_steps=args.steps, entropy_bound=args.entropy_bound,
            t_min=args.t_min, t_max=args.t_max, stability_threshold=args.stability_threshold,
            confidence_threshold=args.confidence_threshold, eos_token_ids=eos,
            sampler=args.sampler or ("entropy_bound" if args.compat else None), commit_threshold=args.commit_threshold,
            pad_token_id=g.get("pad_token_id", lm.model.config.pad_token_id),
            seed=args.seed, compat=args.compat, engine=args.engine, compile=args.compile)
    on_step, live = None, None
    if args.live and args.mode == "diffusion":
        on_step, live = _live_view(lm.tokenizer, len(args.prompt))
    try:
        results = generate_text(lm, args.prompt, args.mode, params, stop=args.stop, chat=args.chat, on_step=on_step)
    finally:
        if live is not None:
            live.stop()
    for r in results:
        sys.stdout.write(r.text + ("\n" if len(results) > 1 else ""))
    sys.stdout.flush()
    if args.stats != "none":
        stats = results[0].stats.as_dict()
        stats["mode"], stats["model"] = args.mode, lm.name
        stats["finish_reasons"] = [r.finish_reason for r in results]
        if args.stats == "json":
            print(json.dumps(stats), file=sys.stderr)
        else:
            tpf = ", ".join(f"{x:.2f}" for x in stats["tokens_per_forward"])
            print(f"\n[{args.mode}] {sum(stats['new_tokens'])} tokens in {stats['seconds']:.2f}s; "
                  f"passes {stats['decoder_passes']}; encoder passes {stats['encoder_passes']}; "
                  f"tokens/forward {tpf}; steps/canvas {stats['steps_per_canvas']}", file=sys.stderr)
    return 0


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
    from .checkpoint import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:>28}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma-style block-diffusion LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_info(sub)
    from . import data

    data.add_cli(sub)
    from . import eval as eval_

    eval_.add_cli(sub)
    from . import bench

    bench.add_cli(sub)
    try:
        from . import train
    except ImportError:  # training module not present in this build
        train = None
    if train is not None and hasattr(train, "add_cli"):
        train.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runners = {"generate": _run_generate, "info": _run_info}
    try:
        if args.command in runners:
            return runners[args.command](args)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # user errors: bad path, malformed checkpoint, impossible parameter
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dgemma {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
