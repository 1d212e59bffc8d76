"""How often compile=True changes the tokens: the prompts of `dgemma eval` (and of `dgemma eval --task sudoku`)
generated eagerly and compiled, with the same settings and seeds, compared output by output.

    python benchmarks/compile_quality.py                                  # both models below, 1 thread
    python benchmarks/compile_quality.py --text models/dgemma-py-small --sudoku none
    python benchmarks/compile_quality.py --text none --sudoku models/dgemma-sudoku-6x6 --puzzles 200

The compiled graphs (dgemma/engine/compiled.py) round differently from the eager modules (~1e-5), so a draw or an argmax
near a tie can flip, and everything after it then differs. Each generation goes through eval's own code
(`eval.generate_all`, `sudoku_eval.decode`) with the parameters eval builds (the model's generation_config,
--seed, eval's default token budgets and batch sizes), once with compile=False and once with compile=True. For each
task and mode it reports the outputs that are identical token for token, the first differing position of the others
(tokens from the start of the completion; for Sudoku the cell), and the task's score both ways (parse rate; exact
solve rate). Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_difference(a: list, b: list) -> int | None:
    """The first index where two sequences differ (a length difference counts at the shorter's end); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(eager: list[list], compiled: list[list]) -> dict:
    firsts = [first_difference(a, b) for a, b in zip(eager, compiled)]
    differ = [f for f in firsts if f is not None]
    return {"outputs": len(firsts), "identical": len(firsts) - len(differ),
            "identical_fraction": (len(firsts) - len(differ)) / max(len(firsts), 1),
            "first_difference_min": min(differ) if differ else None,
            "first_difference_median": statistics.median(differ) if differ else None,
            "first_difference": firsts}


def text_rows(model: str, prompts: int, max_new_tokens: int, batch_size: int, seed: int) -> list[dict]:
    """`dgemma eval --model MODEL` both ways: the model folder's eval prompts, diffusion defaults and AR."""
    from dgemma.api import load
    from dgemma.engine.generate import ARParams
    from dgemma.evals.eval import EvalConfig, default_diffusion_params, eval_prompts, generate_all, parses, stop_ids

    cfg = EvalConfig(model=model, prompts=prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    texts, origin = eval_prompts(cfg)
    lm = load(model)
    scored = [""] * len(texts) if origin.get("parse") == "completion" else texts
    rows = []
    for mode in ("diffusion", "ar"):
        got = {}
        for compile in (False, True):
            if mode == "diffusion":
                params = default_diffusion_params(lm, max_new_tokens=max_new_tokens, seed=seed, compile=compile)
            else:
                params = ARParams(max_new_tokens=max_new_tokens, eos_token_ids=stop_ids(lm), compile=compile)
            got[compile] = generate_all(lm, texts, mode, params, batch_size)
        rows.append({"task": "text", "model": lm.name, "mode": mode,
                     **compare(got[False].token_ids, got[True].token_ids),
                     "score": "parse_rate",
                     "score_eager": sum(map(parses, scored, got[False].completions)) / len(texts),
                     "score_compiled": sum(map(parses, scored, got[True].completions)) / len(texts),
                     "seconds_eager": got[False].seconds, "seconds_compiled": got[True].seconds})
    return rows


def sudoku_rows(model: str, puzzles: int, batch_size: int, seed: int) -> list[dict]:
    """`dgemma eval --task sudoku --model MODEL --no-sweep` both ways: diffusion defaults and greedy AR (of the
    same weights) on the model folder's test puzzles."""
    import torch

    from dgemma.api import load
    from dgemma.tasks.sudoku_eval import SudokuEvalConfig, ar_params, decode, diffusion_params, load_puzzles, score

    pairs, _ = load_puzzles(SudokuEvalConfig(model=model, puzzles=puzzles))
    grids = [p for p, _ in pairs]
    cells = len(grids[0])
    lm = load(model)
    torch.manual_seed(seed)  # as sudoku_eval.evaluate does
    rows = []
    for mode in ("diffusion", "ar"):
        got = {}
        for compile in (False, True):
            params = (diffusion_params(lm, cells, seed=seed, compile=compile) if mode == "diffusion"
                      else ar_params(lm, cells, compile))
            got[compile] = decode(lm, grids, mode, params, batch_size)
        rows.append({"task": "sudoku", "model": lm.name, "mode": mode,
                     **compare([list(o) for o in got[False].outputs], [list(o) for o in got[True].outputs]),
                     "score": "solve_rate",
                     "score_eager": score(pairs, got[False])["solve_rate"],
                     "score_compiled": score(pairs, got[True])["solve_rate"],
                     "seconds_eager": got[False].seconds, "seconds_compiled": got[True].seconds})
    return rows


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=False, capture_output=True, text=True, cwd=ROOT).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", default=str(ROOT / "models" / "dgemma-py-small"), help="free-text model, or none")
    ap.add_argument("--sudoku", default=str(ROOT / "models" / "dgemma-sudoku-6x6"), help="Sudoku model, or none")
    ap.add_argument("--prompts", type=int, default=24, help="text: at most this many eval prompts (eval's default)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="text: eval's default")
    ap.add_argument("--batch-size", type=int, default=8, help="text: eval's default")
    ap.add_argument("--puzzles", type=int, default=200)
    ap.add_argument("--sudoku-batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (this machine is shared)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    if args.text != "none":
        rows += text_rows(args.text, args.prompts, args.max_new_tokens, args.batch_size, args.seed)
    if args.sudoku != "none":
        rows += sudoku_rows(args.sudoku, args.puzzles, args.sudoku_batch_size, args.seed)

    print(f"{'task':<8}{'mode':<11}{'outputs':>8}{'identical':>11}{'first diff min':>16}{'median':>8}"
          f"{'score':>12}{'eager':>8}{'compiled':>10}")
    for r in rows:
        low = "-" if r["first_difference_min"] is None else r["first_difference_min"]
        mid = "-" if r["first_difference_median"] is None else f"{r['first_difference_median']:g}"
        print(f"{r['task']:<8}{r['mode']:<11}{r['outputs']:>8}{r['identical']:>6} ({r['identical_fraction']:.0%})"
              f"{low!s:>13}{mid:>8}{r['score']:>12}{r['score_eager']:>8.3f}{r['score_compiled']:>10.3f}")
    print(json.dumps({"benchmark": "compile_quality", "rows": rows, "settings": vars(args),
                      "git": _git("rev-parse", "--short", "HEAD").strip(),
                      "dgemma_dirty": _git("status", "--short", "dgemma").splitlines(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                      "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
