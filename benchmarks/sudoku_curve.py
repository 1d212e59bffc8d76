"""The Sudoku learning curve: solve rate against training tokens and CPU-hours, for a run's checkpoints.

    python benchmarks/sudoku_curve.py --run runs/sudoku6-s1 --data data/sudoku6 --puzzles 200 \\
        --base-tokens 712768 --base-hours 0.858 --out benchmarks/results/sudoku/curve-6x6.json \\
        --plot models/dgemma-sudoku-6x6/learning_curve.png [--points EARLIER.json ...] [--control CONTROL.json]

For every checkpoint of the run (or those given with --steps) it runs `dgemma eval --task sudoku --no-sweep` on the
held-out test split and reads its JSON line: diffusion at the model's defaults, AR of the same weights, both with
the givens clamped. Tokens and training time come from the run's log.jsonl (the training process's own clock,
one thread: CPU-hours = hours), plus --base-tokens/--base-hours for the checkpoint the run started from.
`--points` adds the points of earlier curves (this script's JSON, e.g. an earlier stage) without evaluating them
again; without --run only those are tabled and plotted. `--control` plots the AR solve rate of an AR-only control's
curve (this script's JSON over a `dgemma train --ar-only` run) beside them. A table, the PNG, and one JSON line last.
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


def _print_point(p: dict, kind: str) -> None:
    print(f"{kind:>9} step {p['step']:6d}  tokens {p['tokens'] / 1e6:6.2f}M  hours {p['hours']:5.2f}  diffusion "
          f"{p['solve_rate_diffusion']:.3f}  AR {p['solve_rate_ar']:.3f}  clamped {p['solve_rate_diffusion_clamped']}"
          f" / {p['solve_rate_ar_clamped']}  ({p['puzzles']} puzzles)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run folder whose checkpoints to evaluate")
    ap.add_argument("--data", help="prepared Sudoku data (its test split); needed with --run")
    ap.add_argument("--points", nargs="*", default=[], help="earlier curve JSONs to include as they are")
    ap.add_argument("--control", help="an AR-only control's curve JSON, plotted beside")
    ap.add_argument("--puzzles", type=int, default=200)
    ap.add_argument("--steps", type=int, nargs="*", help="checkpoint steps (default: all)")
    ap.add_argument("--base-tokens", type=float, default=0.0)
    ap.add_argument("--base-hours", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    if args.run and not args.data:
        ap.error("--run needs --data (the prepared Sudoku folder whose test split is evaluated)")
    if not args.run and not args.points:
        ap.error("give --run (checkpoints to evaluate) or --points (earlier curves), or both")
    points = [p for f in args.points for p in json.loads(Path(f).read_text())["points"]]
    control = json.loads(Path(args.control).read_text())["points"] if args.control else []
    run = Path(args.run) if args.run else None
    train = run_log(run)[0] if run else {}
    steps = (args.steps or sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))) if run else []
    for p in points:
        _print_point(p, "earlier")
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
        _print_point(p, "evaluated")
    for p in control:
        _print_point(p, "control")
    points.sort(key=lambda p: p["tokens"])
    result = {"run": str(run) if run else None, "puzzles": sorted({p["puzzles"] for p in points}), "points": points}
    if control:
        result["control"] = control
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        x = [p["tokens"] / 1e6 for p in points]
        ax.plot(x, [p["solve_rate_diffusion"] for p in points], "o-", label="diffusion (model defaults)")
        ax.plot(x, [p["solve_rate_ar"] for p in points], "s-", label="AR, same weights (greedy)")
        ax.plot(x, [p["solve_rate_diffusion_clamped"] for p in points], "o--", label="diffusion, givens clamped")
        if control:
            ax.plot([p["tokens"] / 1e6 for p in control], [p["solve_rate_ar"] for p in control], "^-",
                    label="AR-only control (greedy)")
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel(f"solved, {'/'.join(str(n) for n in result['puzzles'])} held-out puzzles")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda t: t, lambda t: t))
        top.set_xticks(x[:: max(1, len(x) // 4)], [f"{p['hours']:.1f}h" for p in points[:: max(1, len(x) // 4)]])
        ax.legend(loc="upper left")
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
