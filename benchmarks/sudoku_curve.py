"""The Sudoku learning curve: solve rate against training tokens and CPU-hours, for a run's checkpoints.

    python benchmarks/sudoku_curve.py --run runs/sudoku6-s1 --data data/sudoku6 --puzzles 200 \\
        --base-tokens 712768 --base-hours 0.858 --out benchmarks/results/sudoku/curve-6x6.json \\
        --plot models/dgemma-sudoku-6x6/learning_curve.png [--extra NAME=EVAL_JSON ...]

For every checkpoint of the run (or those given with --steps) it runs `dgemma eval --task sudoku --no-sweep` on the
held-out test split and reads its JSON line: diffusion at the model's defaults, AR of the same weights, both with
the givens clamped. Tokens and training time come from the run's log.jsonl (the training process's own clock,
one thread: CPU-hours = hours), plus --base-tokens/--base-hours for the checkpoint the run started from.
`--extra` adds points evaluated elsewhere (e.g. the AR-only control), each an eval JSON with "tokens" and "hours"
added by --extra-tokens/--extra-hours. A table, the PNG, and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run_log(run: Path) -> tuple[dict[int, dict], list[dict]]:
    train, starts = {}, []
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            train[rec["step"]] = rec
        elif rec["kind"] == "start":
            starts.append(rec)
    return train, starts


def evaluate(checkpoint: Path, data: str, puzzles: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "dgemma", "eval", "--task", "sudoku", "--model", str(checkpoint), "--data", data,
           "--puzzles", str(puzzles), "--batch-size", "100", "--no-sweep"]
    env = {"OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**__import__("os").environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--puzzles", type=int, default=200)
    ap.add_argument("--steps", type=int, nargs="*", help="checkpoint steps (default: all)")
    ap.add_argument("--base-tokens", type=float, default=0.0)
    ap.add_argument("--base-hours", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    run = Path(args.run)
    train, _ = run_log(run)
    steps = args.steps or sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    points = []
    for s in steps:
        r = evaluate(run / "checkpoints" / f"step-{s:06d}", args.data, args.puzzles, args.threads)
        rec = train[s]
        p = {"step": s, "tokens": args.base_tokens + rec["tokens"], "hours": args.base_hours + rec["time"] / 3600,
             "solve_rate_diffusion": r["solve_rate_diffusion"], "solve_rate_ar": r["solve_rate_ar"],
             "solve_rate_diffusion_clamped": r.get("solve_rate_diffusion_clamped"),
             "solve_rate_ar_clamped": r.get("solve_rate_ar_clamped"),
             "passes_diffusion": r["passes_per_puzzle_diffusion"], "passes_ar": r["passes_per_puzzle_ar"],
             "puzzles": r["puzzles"], "git": r["git"]}
        points.append(p)
        print(f"step {s:6d}  tokens {p['tokens'] / 1e6:6.2f}M  hours {p['hours']:5.2f}  diffusion "
              f"{p['solve_rate_diffusion']:.3f}  AR {p['solve_rate_ar']:.3f}  clamped {p['solve_rate_diffusion_clamped']}"
              f" / {p['solve_rate_ar_clamped']}", file=sys.stderr, flush=True)
    result = {"run": str(run), "puzzles": args.puzzles, "points": points}
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        x = [p["tokens"] / 1e6 for p in points]
        ax.plot(x, [p["solve_rate_diffusion"] for p in points], "o-", label="diffusion (model defaults)")
        ax.plot(x, [p["solve_rate_ar"] for p in points], "s-", label="AR, same weights (greedy)")
        ax.plot(x, [p["solve_rate_diffusion_clamped"] for p in points], "o--", label="diffusion, givens clamped")
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel(f"solved, {args.puzzles} held-out puzzles")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda t: t, lambda t: t))
        top.set_xticks(x[:: max(1, len(x) // 4)], [f"{p['hours']:.1f}h" for p in points[:: max(1, len(x) // 4)]])
        ax.legend(loc="lower right")
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    line = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
