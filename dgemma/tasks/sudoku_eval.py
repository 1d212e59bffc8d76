"""`dgemma eval --task sudoku`: exact Sudoku solving by diffusion against AR decoding of the same weights (and an
AR-only control model), on held-out puzzles.

    dgemma eval --task sudoku --model models/dgemma-sudoku-6x6                         # its shipped test puzzles
    dgemma eval --task sudoku --model runs/s6/latest --data data/sudoku6 --control runs/s6-ar/latest \\
        --plot benchmarks/results/sudoku/solve_vs_passes.png --out benchmarks/results/sudoku/eval.json
    python -m dgemma.tasks.sudoku_eval demo [MODEL]          # one held-out puzzle, both ways (part of `make run`)

Puzzles come from --puzzles-file (lines `PUZZLE [SOLUTION]`), else the test split of --data, else the model
folder's test_puzzles.txt. Every puzzle is checked first (length, characters, conflicting givens, exactly one
solution); a bad one is a one-line error naming the line. For each decoding setting it reports:

- solve rate: the output is a valid grid that keeps every given (exact solve; the solution is unique);
- blank-cell accuracy: blank cells whose output digit equals the unique solution's;
- givens kept: outputs that reproduce every given;
- passes per puzzle: decoder + encoder forwards the puzzle took part in (AR: 1 prefill + one per digit);
- seconds per puzzle: at batch 1 on the first --latency-puzzles puzzles (the sequential cost), and the batched
  throughput over all puzzles.

Settings: diffusion at the model's generation_config defaults, a sweep of step budgets and of entropy bounds, greedy
AR decoding of the same weights, greedy AR of the --control model, and diffusion and AR with the givens clamped
into the solution canvas (a template: only the blank cells are decoded). A table, then one JSON line last.
`--compile` runs all of them through the engine's compiled graphs (not bit-identical to eager; "compile" in the JSON).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dgemma.fsio import git_revision, write_text_atomic
from dgemma.tasks.sudoku import (
    BLANK,
    BOS_ID,
    EOS_ID,
    SudokuError,
    check_solution,
    count_solutions,
    decode_ids,
    encode_grid,
    geometry_for_length,
    keeps_givens,
    parse_puzzle,
    read_split,
    solve,
)

TEST_FILE = "test_puzzles.txt"
STEP_SWEEP = (1, 2, 4, 8, 16)
BOUND_SWEEP = (0.1, 0.3, 1.0, 3.0)


@dataclass
class SudokuEvalConfig:
    model: str | None = None
    data: str | None = None
    puzzles_file: str | None = None
    control: str | None = None  # the AR-only control model
    puzzles: int = 1000
    batch_size: int = 100
    latency_puzzles: int = 10
    sweep: bool = True
    sweep_puzzles: int | None = None  # the sweep's rows use the first N puzzles (None: all)
    seed: int = 0
    plot: str | None = None
    out: str | None = None
    compile: bool = False  # every generation (diffusion and AR, the control too) with compile=True


# --- puzzles -------------------------------------------------------------------------------------------------------


def read_puzzles_file(path: str | Path) -> list[tuple[str, str | None, str]]:
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SudokuError(f"cannot read the puzzles file {p} ({e}); give a text file of 'PUZZLE [SOLUTION]' lines") \
            from None
    out = []
    for k, line in enumerate(lines):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise SudokuError(f"{p} line {k + 1}: expected 'PUZZLE [SOLUTION]', got {len(parts)} fields")
        out.append((parts[0], parts[1] if len(parts) == 2 else None, f"{p} line {k + 1}"))
    if not out:
        raise SudokuError(f"{p} holds no puzzles; give lines 'PUZZLE [SOLUTION]'")
    return out


def load_puzzles(cfg: SudokuEvalConfig) -> tuple[list[tuple[str, str]], str]:
    """Checked (puzzle, unique solution) pairs and where they came from."""
    if cfg.puzzles_file:
        raw, origin = read_puzzles_file(cfg.puzzles_file), f"file {cfg.puzzles_file}"
    elif cfg.data:
        raw = [(p, s, f"{cfg.data} test.txt line {k + 1}") for k, (p, s) in enumerate(read_split(cfg.data, "test"))]
        origin = f"test split of {cfg.data}"
    else:
        folder = Path(cfg.model or "")
        if not (folder / TEST_FILE).is_file():
            raise SudokuError(f"no puzzles: pass --data (a `dgemma data prepare --source sudoku` folder) or "
                              f"--puzzles-file, or a model folder that ships {TEST_FILE}")
        raw = [(p, s, f"{folder / TEST_FILE} line {k + 1}") for k, (p, s) in enumerate(read_split_file(folder))]
        origin = f"{folder / TEST_FILE}"
    pairs = []
    for puzzle, solution, where in raw[:cfg.puzzles]:
        try:
            puzzle = parse_puzzle(puzzle)
        except SudokuError as e:
            raise SudokuError(f"{where}: {e}") from None
        n = count_solutions(puzzle)
        if n != 1:
            raise SudokuError(f"{where}: puzzle {puzzle} has {'no' if n == 0 else 'more than one'} solution; "
                              "exact-solve scoring needs puzzles with exactly one")
        if solution is None:
            solution = solve(puzzle)
        elif check_solution(puzzle, solution) is not None:
            raise SudokuError(f"{where}: the given solution does not solve the puzzle "
                              f"({check_solution(puzzle, solution)})")
        pairs.append((puzzle, solution))
    sizes = {len(p) for p, _ in pairs}
    if len(sizes) > 1:
        raise SudokuError(f"puzzles of different sizes ({sorted(sizes)} cells); evaluate one size at a time")
    return pairs, origin


def read_split_file(folder: Path) -> list[tuple[str, str]]:
    lines = (folder / TEST_FILE).read_text(encoding="ascii").split("\n")
    return [tuple(line.split()) for line in lines if line.strip()]  # type: ignore[misc]


def check_model(lm, what: str) -> None:
    """A SudokuError unless the model's tokenizer is the Sudoku tokenizer (the same ids for digits and dots)."""
    ids = lm.tokenizer.encode("123456789.")
    if ids != encode_grid("123456789.").tolist():
        raise SudokuError(f"{what} {lm.name} was not trained on the Sudoku task (its tokenizer maps digits to other "
                          "ids); pass a model trained on `dgemma data prepare --source sudoku` data")


# --- decoding --------------------------------------------------------------------------------------------------------


def prompt_ids(puzzles: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[BOS_ID, *encode_grid(p).tolist()] for p in puzzles])
    return ids, torch.ones_like(ids)


@dataclass
class RunResult:
    outputs: list[str]
    passes: list[int]  # per puzzle: decoder + encoder forwards it took part in
    decoder_passes: list[int]
    encoder_passes: list[int]
    seconds: float  # wall time of the batched run


def givens_template(puzzle: str) -> tuple[int, ...]:
    """The solution's template: every given's digit fixed at its cell, the blanks free (sampler.FREE = -1)."""
    ids = encode_grid(puzzle).tolist()
    return tuple(-1 if ch == BLANK else t for ch, t in zip(puzzle, ids))


def decode(lm, puzzles: list[str], mode: str, params, batch: int, clamp: bool = False) -> RunResult:
    """`clamp`: the givens are fixed in the solution canvas (a template), so only the blanks are decoded."""
    from dgemma.engine.generate import generate_ar, generate_diffusion

    res = RunResult([], [], [], [], 0.0)
    for i in range(0, len(puzzles), batch):
        chunk = puzzles[i:i + batch]
        ids, mask = prompt_ids(chunk)
        templates = [givens_template(p) for p in chunk] if clamp else None
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = (generate_ar if mode == "ar" else generate_diffusion)(lm.model, ids, params, mask,
                                                                         templates=templates)
        res.seconds += time.perf_counter() - t0
        st = out.stats
        for r, toks in enumerate(out.tokens):
            res.outputs.append(decode_ids(toks))
            # The sequential forwards this puzzle needs (the batch's own count would include the prefill chunks of
            # the other rows): AR, the prefill (which gives the first digit) and one pass per further digit;
            # diffusion, its denoising passes and one encoder pass per canvas (the prompt before the first).
            dec = st.decoder_passes[r] if mode == "diffusion" else 0
            enc = max(1, len(st.steps_per_canvas[r])) if mode == "diffusion" else max(1, len(toks))
            res.decoder_passes.append(dec)
            res.encoder_passes.append(enc)
            res.passes.append(dec + enc)
    return res


def score(pairs: list[tuple[str, str]], res: RunResult) -> dict:
    solved = kept = blanks = right = 0
    for (puzzle, solution), out in zip(pairs, res.outputs):
        solved += check_solution(puzzle, out) is None
        kept += keeps_givens(puzzle, out)
        for k, ch in enumerate(puzzle):
            if ch == BLANK:
                blanks += 1
                right += k < len(out) and out[k] == solution[k]
    n = len(pairs)
    return {"solve_rate": solved / n, "blank_accuracy": right / max(blanks, 1), "givens_kept": kept / n,
            "passes_per_puzzle": sum(res.passes) / n, "decoder_passes": sum(res.decoder_passes) / n,
            "encoder_passes": sum(res.encoder_passes) / n, "batched_seconds_per_puzzle": res.seconds / n}


def latency(lm, puzzles: list[str], mode: str, params) -> float:
    """Seconds per puzzle at batch 1 (after one warm-up puzzle)."""
    if not puzzles:
        return float("nan")
    decode(lm, puzzles[:1], mode, params, 1)
    return decode(lm, puzzles, mode, params, 1).seconds / len(puzzles)


def diffusion_params(lm, cells: int, **overrides):
    return lm.defaults("diffusion", max_new_tokens=cells, eos_token_ids=(EOS_ID,), **overrides)


def ar_params(lm, cells: int, compile: bool = False):
    return lm.defaults("ar", max_new_tokens=cells, eos_token_ids=(EOS_ID,), temperature=0.0, compile=compile)


def evaluate(cfg: SudokuEvalConfig) -> dict:
    from dgemma.api import load

    pairs, origin = load_puzzles(cfg)  # first: a malformed puzzle is reported before any model is loaded
    lm = load(cfg.model)
    check_model(lm, "model")
    control = None
    if cfg.control:
        control = load(cfg.control)
        check_model(control, "--control model")
    puzzles = [p for p, _ in pairs]
    cells = len(puzzles[0])
    geo = geometry_for_length(cells)
    lat = puzzles[:cfg.latency_puzzles]
    torch.manual_seed(cfg.seed)
    rows: list[dict] = []

    def run(name: str, model, mode: str, params, timed: bool = False, limit: int | None = None,
            clamp: bool = False) -> dict:
        res = decode(model, puzzles[:limit], mode, params, cfg.batch_size, clamp)
        row = {"setting": name, "mode": mode, "puzzles": len(res.outputs), **score(pairs[:limit], res)}
        if mode == "diffusion":
            row.update(steps=params.max_denoising_steps, entropy_bound=params.entropy_bound, sampler=params.sampler,
                       t_min=params.t_min, t_max=params.t_max)
        row["seconds_per_puzzle"] = latency(model, lat, mode, params) if timed else None
        rows.append(row)
        print(f"  {name}: solve {row['solve_rate']:.3f}", file=sys.stderr, flush=True)
        return row

    def diff(**overrides):  # every diffusion row: the model's defaults, the seed, --compile, then the row's own
        return diffusion_params(lm, cells, seed=cfg.seed, compile=cfg.compile, **overrides)

    default = diff()
    d = run("diffusion (model defaults)", lm, "diffusion", default, timed=True)
    a = run("AR, same weights (greedy)", lm, "ar", ar_params(lm, cells, cfg.compile), timed=True)
    c = (run("AR-only control (greedy)", control, "ar", ar_params(control, cells, cfg.compile), timed=True)
         if control else None)
    dc = run("diffusion, givens clamped", lm, "diffusion", default, clamp=True)
    ac = run("AR, givens clamped (greedy)", lm, "ar", ar_params(lm, cells, cfg.compile), clamp=True)
    if cfg.sweep:
        k = cfg.sweep_puzzles
        for steps in STEP_SWEEP:
            if steps != default.max_denoising_steps:
                run(f"diffusion steps={steps}", lm, "diffusion", diff(max_denoising_steps=steps), limit=k)
        for bound in BOUND_SWEEP:
            if bound != default.entropy_bound:
                run(f"diffusion entropy_bound={bound:g}", lm, "diffusion", diff(entropy_bound=bound), limit=k)
        if default.t_max > 0.1:
            run("diffusion near-greedy (t 0.05-0.1)", lm, "diffusion", diff(t_min=0.05, t_max=0.1), limit=k)
        if default.sampler != "confidence":
            run("diffusion confidence sampler", lm, "diffusion", diff(sampler="confidence"), limit=k)
    result = {
        "task": "sudoku", "size": geo.size, "model": lm.name, "control": control.name if control else None,
        "puzzles": len(pairs), "puzzles_from": origin, "rows": rows,
        "solve_rate_diffusion": d["solve_rate"], "solve_rate_ar": a["solve_rate"],
        "solve_rate_ar_control": c["solve_rate"] if c else None,
        "solve_rate_diffusion_clamped": dc["solve_rate"], "solve_rate_ar_clamped": ac["solve_rate"],
        "blank_accuracy_diffusion": d["blank_accuracy"], "blank_accuracy_ar": a["blank_accuracy"],
        "blank_accuracy_ar_control": c["blank_accuracy"] if c else None,
        "passes_per_puzzle_diffusion": d["passes_per_puzzle"], "passes_per_puzzle_ar": a["passes_per_puzzle"],
        "seconds_per_puzzle_diffusion": d["seconds_per_puzzle"], "seconds_per_puzzle_ar": a["seconds_per_puzzle"],
        "seconds_per_puzzle_ar_control": c["seconds_per_puzzle"] if c else None,
        "defaults": {"steps": default.max_denoising_steps, "entropy_bound": default.entropy_bound,
                     "t_min": default.t_min, "t_max": default.t_max, "sampler": default.sampler},
        "batch_size": cfg.batch_size, "latency_puzzles": len(lat), "seed": cfg.seed, "compile": cfg.compile,
        "git": git_revision(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    _print(result)
    if cfg.plot:
        plot(result, cfg.plot)
    line = json.dumps(result)
    if cfg.out:
        write_text_atomic(cfg.out, line + "\n")
    print(line)
    return result


def _print(r: dict) -> None:
    print(f"Sudoku {r['size']}x{r['size']}: {r['puzzles']} held-out puzzles ({r['puzzles_from']}), model {r['model']}"
          + (f", control {r['control']}" if r["control"] else "") + (", compiled (--compile)" if r["compile"] else ""))
    print(f"{'setting':<34} {'n':>5} {'solved':>7} {'blank acc':>9} {'givens':>7} {'passes':>7} {'s/puzzle b=1':>12} "
          f"{'s/puzzle batched':>16}")
    for row in r["rows"]:
        lat = f"{row['seconds_per_puzzle']:.4f}" if row["seconds_per_puzzle"] is not None else "-"
        print(f"{row['setting']:<34} {row['puzzles']:>5} {row['solve_rate']:>7.3f} {row['blank_accuracy']:>9.3f} "
              f"{row['givens_kept']:>7.3f} {row['passes_per_puzzle']:>7.2f} {lat:>12} "
              f"{row['batched_seconds_per_puzzle']:>16.5f}")


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    d = r["defaults"]
    steps = sorted((row for row in r["rows"] if row["mode"] == "diffusion" and row["entropy_bound"] == d["entropy_bound"]
                    and row["sampler"] == d["sampler"] and "greedy" not in row["setting"]),
                   key=lambda row: row["passes_per_puzzle"])
    ax.plot([s["passes_per_puzzle"] for s in steps], [s["solve_rate"] for s in steps], "o-",
            label="diffusion (step budgets)")
    bounds = [row for row in r["rows"] if row["mode"] == "diffusion" and row not in steps]
    if bounds:
        ax.plot([s["passes_per_puzzle"] for s in bounds], [s["solve_rate"] for s in bounds], "s",
                label="diffusion (other settings)")
    for row, marker in zip([row for row in r["rows"] if row["mode"] == "ar"], ("^", "v")):
        ax.plot([row["passes_per_puzzle"]], [row["solve_rate"]], marker, markersize=9, label=row["setting"])
    ax.set_xscale("log")
    ax.set_xlabel("forward passes per puzzle (log)")
    ax.set_ylabel("exact solve rate")
    ax.set_ylim(0, 1)
    ax.set_title(f"{r['size']}x{r['size']} Sudoku, {r['puzzles']} held-out puzzles")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- demo (make run) -------------------------------------------------------------------------------------------------


def _grid_text(grid: str, size: int) -> str:
    return "\n".join("  " + " ".join(grid[r * size:(r + 1) * size].ljust(size, "?")) for r in range(size))


def demo(model: str, index: int = 0) -> int:
    """Solve held-out puzzle `index` of the model folder's test_puzzles.txt by diffusion and by AR of the same
    weights; print both grids, whether each is solved, and the passes and time of each."""
    from dgemma.api import load

    lm = load(model)
    check_model(lm, "model")
    puzzle, _ = read_split_file(Path(model))[index]
    geo = geometry_for_length(len(puzzle))
    print(f"held-out {geo.size}x{geo.size} puzzle #{index} ({puzzle}):\n{_grid_text(puzzle, geo.size)}")
    for mode, params in (("diffusion", diffusion_params(lm, geo.cells, seed=0)), ("ar", ar_params(lm, geo.cells))):
        decode(lm, [puzzle], mode, params, 1)  # warm-up
        res = decode(lm, [puzzle], mode, params, 1)
        why = check_solution(puzzle, res.outputs[0])
        print(f"{mode}: {'solved' if why is None else 'NOT solved (' + why + ')'}, {res.passes[0]} forward passes, "
              f"{res.seconds * 1000:.1f} ms\n{_grid_text(res.outputs[0], geo.size)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["demo"]:
        from dgemma.api import REPO_ROOT

        try:
            return demo(args[1] if len(args) > 1 else str(REPO_ROOT / "models" / "dgemma-sudoku-6x6"))
        except (ValueError, OSError) as e:
            print(f"sudoku demo: {e}", file=sys.stderr)
            return 2
    print("usage: python -m dgemma.tasks.sudoku_eval demo [MODEL]   (the evaluation is `dgemma eval --task sudoku`)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
