"""Sudoku as a dgemma task: puzzle generator with a uniqueness check, validity checker, tokenizer, data recipe and
the training batches (the puzzle is the clean prefix, its solution the canvas).

    dgemma data prepare --source sudoku --size 6 --out data/sudoku6          # 6x6 (2x3 boxes), 12-20 givens
    dgemma data prepare --source sudoku --size 9 --out data/sudoku9          # 9x9 (3x3 boxes), 30-45 givens
    dgemma train --data data/sudoku6 --preset mini --vocab-size 17 --canvas-length 37 --seq-len 74 ...
    dgemma eval --task sudoku --model runs/sudoku6/latest --data data/sudoku6

Format (fixed, so any caller can use a model): the prompt is the puzzle row-major, n*n characters, digits for
givens and `.` for blanks (`0` is read as a blank too); the completion is the solved grid as n*n digits. A training
sequence is `[bos] puzzle [solution] eos`, two canvases of C = n*n + 1 tokens: canvas 0 is the prompt (clean
prefix), canvas 1 the solution and one eos; only canvas 1 is supervised (diffusion and AR loss alike).

Puzzles come from our own seeded generator: a random solved grid (randomised backtracking), then cells blanked in
random order while a solution counter (bitmask MRV search, stops at 2) still finds exactly one solution, down to a
number of givens drawn uniformly from the range. Every puzzle gets a signature that is invariant under the symmetries
training applies on the fly (band/stack and row/column permutations, digit relabelling, transposition when boxes
are square); the split (train/val/test) is a hash of that signature, so no puzzle, and no transform of one, is in
two splits; puzzles with an already-seen signature are dropped, so no two puzzles in the data are equivalent.

The output folder holds train.txt, val.txt, test.txt (one `PUZZLE SOLUTION` line each), tokenizer.json and
meta.json (format, generator version, seed, counts, givens range, layout, SHA-256 of every file). Running prepare
twice with the same flags gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dgemma.fsio import install_folder, new_sibling_dir, sha256_file

if TYPE_CHECKING:
    import torch

FORMAT = "dgemma-sudoku-v1"
GENERATOR_VERSION = "dgemma-sudoku-generator-1"
SPLITS = ("train", "val", "test")
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")  # Gemma ids 0-6
SYMBOLS = "123456789."  # ids 7..16
BLANK = "."
VOCAB_SIZE = len(SPECIALS) + len(SYMBOLS)  # 17
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


class SudokuError(ValueError):
    """A puzzle, grid or Sudoku data setting the user gave cannot be used; the message says what and how to fix."""


@dataclass(frozen=True)
class Geometry:
    size: int  # n: digits 1..n, n*n cells
    box_rows: int
    box_cols: int
    givens: tuple[int, int]  # default range of givens, inclusive

    @property
    def cells(self) -> int:
        return self.size * self.size

    @property
    def canvas_length(self) -> int:
        """The solution and one eos."""
        return self.cells + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.canvas_length

    def box(self, r: int, c: int) -> int:
        return (r // self.box_rows) * (self.size // self.box_cols) + c // self.box_cols


GEOMETRIES = {6: Geometry(6, 2, 3, (12, 20)), 9: Geometry(9, 3, 3, (30, 45))}


def geometry(size: int) -> Geometry:
    if size not in GEOMETRIES:
        raise SudokuError(f"Sudoku size {size} is not supported; use 6 (2x3 boxes) or 9 (3x3 boxes)")
    return GEOMETRIES[size]


def geometry_for_length(length: int) -> Geometry:
    for g in GEOMETRIES.values():
        if g.cells == length:
            return g
    raise SudokuError(f"a Sudoku puzzle has 36 (6x6) or 81 (9x9) cells; got {length} characters")


# --- puzzles and grids as text -----------------------------------------------------------------------------------


def parse_puzzle(text: str, size: int | None = None) -> str:
    """The canonical puzzle string (digits and `.`) of `text`: 36 or 81 characters, digits 1..n for givens, `.` or
    `0` for blanks, surrounding whitespace ignored. Raises SudokuError naming the problem: wrong length, a character
    that is not a digit or dot, a digit above n, or givens that already conflict (same digit twice in a row, column
    or box)."""
    s = text.strip()
    geo = geometry(size) if size is not None else geometry_for_length(len(s))
    if len(s) != geo.cells:
        raise SudokuError(f"a {geo.size}x{geo.size} puzzle has {geo.cells} characters; got {len(s)} ({s[:20]!r}...)")
    bad = sorted({ch for ch in s if ch not in "0123456789."})
    if bad:
        raise SudokuError(f"puzzle {s!r} holds {''.join(bad)!r}; use digits for givens and '.' or '0' for blanks")
    s = s.replace("0", BLANK)
    high = sorted({ch for ch in s if ch != BLANK and int(ch) > geo.size})
    if high:
        raise SudokuError(f"puzzle {s!r} holds digit(s) {''.join(high)} but a {geo.size}x{geo.size} Sudoku uses "
                          f"1..{geo.size}")
    conflict = first_conflict(s, geo)
    if conflict:
        raise SudokuError(f"puzzle {s!r} has no solution: its givens already conflict ({conflict})")
    return s


def first_conflict(grid: str, geo: Geometry) -> str | None:
    """A description of the first repeated digit in a row, column or box of `grid` (blanks ignored), or None."""
    n = geo.size
    for kind, groups in (("row", _rows(geo)), ("column", _cols(geo)), ("box", _boxes(geo))):
        for k, cells in enumerate(groups):
            seen: set[str] = set()
            for i in cells:
                ch = grid[i]
                if ch == BLANK:
                    continue
                if ch in seen:
                    return f"digit {ch} twice in {kind} {k + 1} of {n}"
                seen.add(ch)
    return None


def check_solution(puzzle: str, grid: str) -> str | None:
    """None if `grid` solves `puzzle` (a complete valid grid that keeps every given), else why not: wrong length,
    non-digit, bad row, bad column, bad box, changed given."""
    geo = geometry_for_length(len(puzzle))
    if len(grid) != geo.cells:
        return f"wrong length: {len(grid)} characters, expected {geo.cells}"
    digits = "123456789"[: geo.size]
    bad = sorted({ch for ch in grid if ch not in digits})
    if bad:
        return f"non-digit: {''.join(bad)!r} (expected digits 1..{geo.size})"
    full = set(digits)
    for kind, groups in (("row", _rows(geo)), ("column", _cols(geo)), ("box", _boxes(geo))):
        for k, cells in enumerate(groups):
            if {grid[i] for i in cells} != full:
                return f"bad {kind} {k + 1}"
    changed = [i for i, ch in enumerate(puzzle) if ch != BLANK and grid[i] != ch]
    if changed:
        return f"changed given at cell {changed[0]} ({len(changed)} in all)"
    return None


def keeps_givens(puzzle: str, grid: str) -> bool:
    return len(grid) == len(puzzle) and all(p == BLANK or p == g for p, g in zip(puzzle, grid))


def _rows(geo: Geometry) -> list[list[int]]:
    n = geo.size
    return [[r * n + c for c in range(n)] for r in range(n)]


def _cols(geo: Geometry) -> list[list[int]]:
    n = geo.size
    return [[r * n + c for r in range(n)] for c in range(n)]


def _boxes(geo: Geometry) -> list[list[int]]:
    n = geo.size
    out: list[list[int]] = [[] for _ in range(n)]
    for r in range(n):
        for c in range(n):
            out[geo.box(r, c)].append(r * n + c)
    return out


# --- solver (counts solutions) -----------------------------------------------------------------------------------


def _cells_of(grid: str) -> list[int]:
    return [0 if ch == BLANK else int(ch) for ch in grid]


def count_solutions(grid: str | list[int], geo: Geometry | None = None, limit: int = 2) -> int:
    """Number of solutions of a puzzle, counted up to `limit` (a bitmask search that fills the most constrained
    blank first). 0 for conflicting givens."""
    cells = _cells_of(grid) if isinstance(grid, str) else list(grid)
    geo = geo or geometry_for_length(len(cells))
    return _search(cells, geo, limit, None)


def solve(grid: str) -> str | None:
    """The first solution of a puzzle string, or None."""
    geo = geometry_for_length(len(grid))
    cells = _cells_of(grid)
    found: list[list[int]] = []
    _search(cells, geo, 1, found)
    return "".join(map(str, found[0])) if found else None


def _search(cells: list[int], geo: Geometry, limit: int, found: list[list[int]] | None,
            rng: random.Random | None = None) -> int:
    n = geo.size
    rows, cols, boxes = [0] * n, [0] * n, [0] * n
    box_of = [geo.box(i // n, i % n) for i in range(geo.cells)]
    for i, v in enumerate(cells):
        if v:
            bit, r, c, b = 1 << (v - 1), i // n, i % n, box_of[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return 0
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    empties = [i for i, v in enumerate(cells) if not v]
    full = (1 << n) - 1
    count = 0

    def rec(remaining: list[int]) -> bool:  # True: stop (limit reached)
        nonlocal count
        if not remaining:
            count += 1
            if found is not None:
                found.append(list(cells))
            return count >= limit
        best, best_free, best_k = -1, 0, n + 1
        for j, i in enumerate(remaining):  # most constrained blank first
            free = full & ~(rows[i // n] | cols[i % n] | boxes[box_of[i]])
            k = free.bit_count()
            if k < best_k:
                best, best_free, best_k = j, free, k
                if k <= 1:
                    break
        if best_k == 0:
            return False
        i = remaining[best]
        rest = remaining[:best] + remaining[best + 1:]
        r, c, b = i // n, i % n, box_of[i]
        digits = [d for d in range(1, n + 1) if best_free >> (d - 1) & 1]
        if rng is not None:
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << (d - 1)
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            cells[i] = d
            stop = rec(rest)
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[b] &= ~bit
            cells[i] = 0
            if stop:
                return True
        return False

    rec(empties)
    return count


# --- generator ---------------------------------------------------------------------------------------------------


def random_solution(rng: random.Random, geo: Geometry) -> str:
    """A uniformly shuffled search for a full grid: random digit order at every cell."""
    found: list[list[int]] = []
    _search([0] * geo.cells, geo, 1, found, rng=rng)
    return "".join(map(str, found[0]))


def make_puzzle(rng: random.Random, geo: Geometry, givens: int, attempts: int = 50) -> tuple[str, str]:
    """(puzzle, solution) with exactly `givens` givens and exactly one solution. Blanks cells of a random solved
    grid in random order, keeping each blank only if the puzzle stays unique; a pass that gets stuck above `givens`
    starts over from a new grid."""
    for _ in range(attempts):
        solution = random_solution(rng, geo)
        cells = _cells_of(solution)
        order = list(range(geo.cells))
        rng.shuffle(order)
        left = geo.cells
        for i in order:
            if left == givens:
                break
            v, cells[i] = cells[i], 0
            if _search(list(cells), geo, 2, None) == 1:
                left -= 1
            else:
                cells[i] = v
        if left == givens:
            return "".join(str(v) if v else BLANK for v in cells), solution
    raise SudokuError(f"could not make a unique {geo.size}x{geo.size} puzzle with {givens} givens in {attempts} "
                      "attempts; use more givens")


# --- symmetries ----------------------------------------------------------------------------------------------------


def signature(puzzle: str, geo: Geometry) -> str:
    """A key equal for any two puzzles related by the symmetries `augment` applies (so it decides the split), and
    different for almost all others: the sorted multiset over cells of (given?, givens in its row, column and box,
    how often its digit is given), taken with the transposed multiset when boxes are square."""
    n = geo.size
    rows, cols, boxes = _rows(geo), _cols(geo), _boxes(geo)
    row_of = {i: k for k, g in enumerate(rows) for i in g}
    col_of = {i: k for k, g in enumerate(cols) for i in g}
    box_of = {i: k for k, g in enumerate(boxes) for i in g}
    given = [ch != BLANK for ch in puzzle]
    row_n = [sum(given[i] for i in g) for g in rows]
    col_n = [sum(given[i] for i in g) for g in cols]
    box_n = [sum(given[i] for i in g) for g in boxes]
    digit_n = {d: puzzle.count(d) for d in set(puzzle) - {BLANK}}
    # digit-aware part: for each pair of givens sharing a digit, whether they share a band / stack
    band = [i // n // geo.box_rows for i in range(geo.cells)]
    stack = [i % n // geo.box_cols for i in range(geo.cells)]

    def feats(transpose: bool) -> list[tuple[int, ...]]:
        out = []
        for i in range(geo.cells):
            rn, cn = row_n[row_of[i]], col_n[col_of[i]]
            if transpose:
                rn, cn = cn, rn
            same_band = sum(1 for j in range(geo.cells) if j != i and given[i] and puzzle[j] == puzzle[i]
                            and band[j] == band[i])
            same_stack = sum(1 for j in range(geo.cells) if j != i and given[i] and puzzle[j] == puzzle[i]
                             and stack[j] == stack[i])
            if transpose:
                same_band, same_stack = same_stack, same_band
            out.append((int(given[i]), rn, cn, box_n[box_of[i]], digit_n.get(puzzle[i], 0), same_band, same_stack))
        return sorted(out)

    f = feats(False)
    if geo.box_rows == geo.box_cols:
        f = min(f, feats(True))
    return hashlib.sha256(f"{n}:{f}".encode()).hexdigest()


def random_transform(rng: np.random.Generator, geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """A random symmetry: (cell permutation int64 [n*n], digit map int64 [n + 1], map[0] = 0). The new grid's cell
    i holds map[old[perm[i]]]."""
    n, br, bc = geo.size, geo.box_rows, geo.box_cols
    bands = rng.permutation(n // br)
    row_order = np.concatenate([b * br + rng.permutation(br) for b in bands])
    stacks = rng.permutation(n // bc)
    col_order = np.concatenate([s * bc + rng.permutation(bc) for s in stacks])
    perm = (row_order[:, None] * n + col_order[None, :])
    if br == bc and rng.random() < 0.5:
        perm = perm.T
    digit_map = np.concatenate([[0], 1 + rng.permutation(n)])
    return perm.reshape(-1).astype(np.int64), digit_map.astype(np.int64)


def apply_transform(grid: str, transform: tuple[np.ndarray, np.ndarray]) -> str:
    perm, digit_map = transform
    cells = np.array(_cells_of(grid), dtype=np.int64)
    out = digit_map[cells[perm]]
    return "".join(str(v) if v else BLANK for v in out)


# --- tokenizer -----------------------------------------------------------------------------------------------------


def build_tokenizer():
    """The character-level tokenizer: Gemma's special ids 0-6, then `1`..`9` (ids 7-15) and `.` (16); `0` is
    normalised to `.`. Returns a dgemma Tokenizer."""
    import tokenizers

    from dgemma.tokenizer import Tokenizer

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in SYMBOLS:
        vocab[ch] = len(vocab)
    inner = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    inner.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in SPECIALS])
    inner.normalizer = tokenizers.normalizers.Replace("0", ".")
    inner.decoder = tokenizers.decoders.Fuse()
    return Tokenizer(inner)


_CHAR_ID = np.full(128, 3, dtype=np.int64)  # unk
for _i, _ch in enumerate(SYMBOLS):
    _CHAR_ID[ord(_ch)] = len(SPECIALS) + _i
_CHAR_ID[ord("0")] = _CHAR_ID[ord(BLANK)]


def encode_grid(text: str) -> np.ndarray:
    """int64 [len] token ids of a puzzle or solution string (the tokenizer's ids, without bos)."""
    return _CHAR_ID[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]


def decode_ids(ids: Sequence[int]) -> str:
    """Text of generated ids: symbols kept, special tokens dropped."""
    return "".join(SYMBOLS[i - len(SPECIALS)] if len(SPECIALS) <= i < VOCAB_SIZE else "" for i in ids)


def training_sequence(puzzle: str, solution: str, geo: Geometry) -> np.ndarray:
    """int64 [2C]: bos, puzzle | solution, eos (C = n*n + 1)."""
    out = np.empty(geo.seq_len, dtype=np.int64)
    out[0] = BOS_ID
    out[1:geo.canvas_length] = encode_grid(puzzle)
    out[geo.canvas_length:geo.seq_len - 1] = encode_grid(solution)
    out[-1] = EOS_ID
    return out


# --- recipe --------------------------------------------------------------------------------------------------------

DEFAULT_COUNTS = {"train": 50_000, "val": 500, "test": 1000}


def _split_score(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def generate_splits(size: int, counts: dict[str, int], seed: int, givens: tuple[int, int] | None = None,
                    log: Callable[[str], None] | None = None) -> tuple[dict[str, list[tuple[str, str]]], dict]:
    """Puzzles per split, from one seeded stream: each puzzle's split is fixed by a hash of its signature, so
    symmetric puzzles share a split; repeated signatures and puzzles for a split already full are skipped."""
    geo = geometry(size)
    lo, hi = givens or geo.givens
    if not 0 < lo <= hi < geo.cells:
        raise SudokuError(f"givens range [{lo}, {hi}] must lie within [1, {geo.cells - 1}]")
    total = sum(counts.values())
    if total < 1 or any(v < 0 for v in counts.values()):
        raise SudokuError(f"puzzle counts must be >= 0 and not all 0 (got {counts})")
    bounds, acc = [], 0.0
    for name in SPLITS:  # split by score: [0, f_train) train, then val, then test
        acc += counts[name] / total
        bounds.append((name, acc))
    rng = random.Random(f"{GENERATOR_VERSION}:{size}:{seed}")
    out: dict[str, list[tuple[str, str]]] = {name: [] for name in SPLITS}
    seen: set[str] = set()
    made = dropped_seen = dropped_full = 0
    t0 = time.perf_counter()
    while any(len(out[s]) < counts[s] for s in SPLITS):
        puzzle, solution = make_puzzle(rng, geo, rng.randint(lo, hi))
        made += 1
        key = signature(puzzle, geo)
        if key in seen:
            dropped_seen += 1
            continue
        seen.add(key)
        score = _split_score(seed, key)
        split = next(name for name, b in bounds if score < b) if score < bounds[-1][1] else SPLITS[-1]
        if len(out[split]) >= counts[split]:
            dropped_full += 1
            continue
        out[split].append((puzzle, solution))
        if log is not None and made % 5000 == 0:
            log(f"sudoku {size}x{size}: {made} puzzles made, "
                + ", ".join(f"{s} {len(out[s])}/{counts[s]}" for s in SPLITS) + f" ({time.perf_counter() - t0:.0f} s)")
    stats = {"made": made, "dropped_repeated_signature": dropped_seen, "dropped_split_full": dropped_full}
    return out, stats


def prepare(out: str | os.PathLike[str], size: int = 6, counts: dict[str, int] | None = None, seed: int = 0,
            givens: tuple[int, int] | None = None, force: bool = False,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write a Sudoku data folder (see the module docstring); returns its meta.json. The folder is built beside
    `out` and renamed into place; existing Sudoku data is replaced only with `force`."""
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    geo = geometry(size)
    target = Path(out).expanduser()
    if target.exists() and not force:
        if (target / "meta.json").exists():
            raise SudokuError(f"{target} already holds prepared data; pass --force to replace it or choose another "
                              "--out")
        if any(target.iterdir()) if target.is_dir() else True:
            raise SudokuError(f"{target} exists and is not an empty folder; choose another --out")
    t0 = time.perf_counter()
    splits, stats = generate_splits(size, counts, seed, givens, log)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = new_sibling_dir(target, "partial")
    try:
        for name in SPLITS:
            (staging / f"{name}.txt").write_text("".join(f"{p} {s}\n" for p, s in splits[name]), encoding="ascii")
        tok = build_tokenizer()
        tok.save(staging)
        from dgemma.train.data import tokenizer_sha256

        lo, hi = givens or geo.givens
        meta = {
            "format": FORMAT,
            "task": "sudoku",
            "generator": GENERATOR_VERSION,
            "size": size,
            "box": [geo.box_rows, geo.box_cols],
            "seed": seed,
            "givens": [lo, hi],
            "counts": {name: len(splits[name]) for name in SPLITS},
            "generation": stats,
            "split_rule": "sha256(seed:signature) against the count fractions; signature invariant under the "
                          "training augmentation (band/stack/row/column permutations, digit relabel, transpose "
                          "for square boxes)",
            "layout": {"canvas_length": geo.canvas_length, "seq_len": geo.seq_len,
                       "sequence": "[bos] puzzle | solution [eos]; only the second canvas is supervised"},
            "vocab_size": tok.vocab_size,
            "special_ids": {"pad": PAD_ID, "eos": EOS_ID, "bos": BOS_ID, "unk": 3, "mask": 4, "start_of_turn": 5,
                            "end_of_turn": 6},
            "tokenizer": {"file": "tokenizer.json", "sha256": tokenizer_sha256(tok)},
            "sha256": {p.name: sha256_file(p) for p in sorted(staging.iterdir())},
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        install_folder(staging, target)  # the old folder stays if this fails
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta["seconds"] = time.perf_counter() - t0
    return meta


def summary(meta: dict[str, Any], out: str | os.PathLike[str]) -> str:
    c = meta["counts"]
    return (f"prepared {out}: {meta['size']}x{meta['size']} Sudoku, givens {meta['givens'][0]}-{meta['givens'][1]}, "
            f"train {c['train']}, val {c['val']}, test {c['test']} puzzles (seed {meta['seed']}, "
            f"{meta['generation']['made']} made) in {meta.get('seconds', 0):.1f} s; canvas_length "
            f"{meta['layout']['canvas_length']}, seq_len {meta['layout']['seq_len']}, vocab {meta['vocab_size']}")


def is_sudoku_data(folder: str | os.PathLike[str]) -> bool:
    try:
        return json.loads((Path(folder).expanduser() / "meta.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder).expanduser() / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SudokuError(f"cannot read {path} ({e}); make the folder with `dgemma data prepare --source sudoku`") \
            from None
    if meta.get("format") != FORMAT:
        raise SudokuError(f"{path} is not Sudoku data ({FORMAT}); make it with `dgemma data prepare --source sudoku`")
    return meta


def read_split(folder: str | os.PathLike[str], split: str) -> list[tuple[str, str]]:
    """(puzzle, solution) pairs of a split of a Sudoku data folder."""
    path = Path(folder).expanduser() / f"{split}.txt"
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except OSError as e:
        raise SudokuError(f"cannot read {path} ({e}); run `dgemma data prepare --source sudoku` again") from None
    pairs = []
    for k, line in enumerate(lines):
        parts = line.split()
        if len(parts) != 2:
            raise SudokuError(f"{path} line {k + 1}: expected 'PUZZLE SOLUTION'; run prepare again")
        pairs.append((parts[0], parts[1]))
    return pairs


# --- training batches ------------------------------------------------------------------------------------------------


class SudokuBatches:
    """Endless deterministic batches of (ids int64 [rows, 2C], loss_mask bool [rows, 2C]). Global batch s draws its
    puzzles and (with `augment`) one random symmetry per example from default_rng([seed, s]); without `shuffle` the
    puzzles come in order (validation). Rank r of W gets rows [r * rows, (r + 1) * rows)."""

    def __init__(self, pairs: list[tuple[str, str]], geo: Geometry, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, augment: bool = True, shuffle: bool = True):
        if not pairs:
            raise SudokuError("no puzzles in this split; prepare more")
        self.pairs, self.geo = pairs, geo
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.augment, self.shuffle = augment, shuffle
        self.step = 0
        self.mask = np.zeros(geo.seq_len, dtype=bool)
        self.mask[geo.canvas_length:] = True

    def __iter__(self) -> SudokuBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        rows = self.batch_size // self.world_size
        rng = np.random.default_rng([self.seed, self.step])
        if self.shuffle:
            idx = rng.integers(0, len(self.pairs), self.batch_size)
        else:
            idx = (np.arange(self.batch_size) + self.step * self.batch_size) % len(self.pairs)
        seqs = []
        for k, i in enumerate(idx):
            puzzle, solution = self.pairs[int(i)]
            if self.augment:
                tr = random_transform(rng, self.geo)  # drawn for every row, so ranks stay in step
                if not self.rank * rows <= k < (self.rank + 1) * rows:
                    continue
                puzzle, solution = apply_transform(puzzle, tr), apply_transform(solution, tr)
            elif not self.rank * rows <= k < (self.rank + 1) * rows:
                continue
            seqs.append(training_sequence(puzzle, solution, self.geo))
        self.step += 1
        ids = torch.from_numpy(np.stack(seqs))
        return ids, torch.from_numpy(np.broadcast_to(self.mask, ids.shape).copy())

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def sudoku_data_source(folder: str | os.PathLike[str], batch_size: int, seq_len: int, canvas_length: int | None,
                       seed: int = 0):
    """A train.DataSource over a Sudoku data folder: augmented training batches, the val split in order."""
    from dgemma.train.pretrain import DataSource, TrainError

    meta = read_meta(folder)
    geo = geometry(int(meta["size"]))
    if canvas_length != geo.canvas_length or seq_len != geo.seq_len:
        raise TrainError(f"{folder} is {geo.size}x{geo.size} Sudoku data: train with --canvas-length "
                         f"{geo.canvas_length} --seq-len {geo.seq_len} (puzzle and solution are one canvas each); "
                         f"got canvas_length {canvas_length}, seq_len {seq_len}")
    train_pairs, val_pairs = read_split(folder, "train"), read_split(folder, "val")
    return DataSource(
        train=lambda rank, world: SudokuBatches(train_pairs, geo, batch_size, seed, rank, world),
        val=lambda rank, world: SudokuBatches(val_pairs, geo, batch_size, seed, rank, world, augment=False,
                                              shuffle=False),
        vocab_size=int(meta["vocab_size"]), tokenizer_path=Path(folder).expanduser() / "tokenizer.json",
        special_ids=dict(meta["special_ids"]), name=str(folder))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dgemma.tasks.sudoku OUT [SIZE]`: prepare with the default counts (`dgemma data prepare` is the CLI)."""
    args = list(sys.argv[1:] if argv is None else argv)
    meta = prepare(args[0], int(args[1]) if len(args) > 1 else 6, log=print)
    print(summary(meta, args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
