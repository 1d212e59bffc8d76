"""The Sudoku task: generator (unique puzzles), splits (disjoint, also under augmentation), byte-identical recipe,
tokenizer, validity checker, and a tiny model that trains a few steps and is evaluated end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from dgemma.cli.main import main as cli_main
from dgemma.tasks import sudoku

SOLVED6 = "123456456123231564564231312645645312"


@pytest.mark.parametrize("size", [6, 9])
def test_generated_puzzles_have_exactly_one_solution(size):
    geo = sudoku.geometry(size)
    rng = random.Random(1)
    for _ in range(4 if size == 9 else 20):
        givens = rng.randint(*geo.givens)
        puzzle, solution = sudoku.make_puzzle(rng, geo, givens)
        assert sum(ch != "." for ch in puzzle) == givens
        assert sudoku.count_solutions(puzzle) == 1
        assert sudoku.solve(puzzle) == solution
        assert sudoku.check_solution(puzzle, solution) is None


def test_solution_counter_sees_several_solutions():
    assert sudoku.count_solutions("." * 36, limit=5) == 5
    assert sudoku.count_solutions("11" + "." * 34) == 0  # conflicting givens


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("sudoku")
    counts = {"train": 300, "val": 40, "test": 40}
    sudoku.prepare(root / "a", 6, counts, seed=3)
    sudoku.prepare(root / "b", 6, counts, seed=3)
    return root


def test_recipe_is_byte_identical_on_a_rerun(prepared):
    a, b = prepared / "a", prepared / "b"
    for name in ("train.txt", "val.txt", "test.txt", "tokenizer.json", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta = json.loads((a / "meta.json").read_text())
    assert meta["generator"] == sudoku.GENERATOR_VERSION and meta["seed"] == 3
    assert meta["counts"] == {"train": 300, "val": 40, "test": 40}


def test_splits_are_disjoint_also_under_augmentation(prepared):
    geo = sudoku.geometry(6)
    splits = {s: sudoku.read_split(prepared / "a", s) for s in sudoku.SPLITS}
    keys = {s: {sudoku.signature(p, geo) for p, _ in pairs} for s, pairs in splits.items()}
    assert all(len(keys[s]) == len(splits[s]) for s in splits)  # no two equivalent puzzles in a split
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    train_puzzles = {p for p, _ in splits["train"]}
    rng = np.random.default_rng(0)
    for puzzle, solution in splits["test"][:20]:
        for _ in range(20):  # any transform the training batches may apply keeps the signature, hence the split
            t = sudoku.random_transform(rng, geo)
            p2, s2 = sudoku.apply_transform(puzzle, t), sudoku.apply_transform(solution, t)
            assert sudoku.check_solution(p2, s2) is None
            assert sudoku.signature(p2, geo) == sudoku.signature(puzzle, geo)
            assert p2 not in train_puzzles


def test_nine_by_nine_transforms_keep_validity_and_signature():
    geo = sudoku.geometry(9)
    puzzle, solution = sudoku.make_puzzle(random.Random(0), geo, 40)
    rng = np.random.default_rng(1)
    for _ in range(10):
        t = sudoku.random_transform(rng, geo)
        p2, s2 = sudoku.apply_transform(puzzle, t), sudoku.apply_transform(solution, t)
        assert sudoku.check_solution(p2, s2) is None
        assert sudoku.signature(p2, geo) == sudoku.signature(puzzle, geo)


def test_tokenizer_round_trips_and_matches_the_fast_table():
    tok = sudoku.build_tokenizer()
    assert tok.vocab_size == sudoku.VOCAB_SIZE
    assert [tok.id_to_token(i) for i in range(7)] == list(sudoku.SPECIALS)
    for text in ("1.3.5.", SOLVED6, "..2..1"):
        ids = tok.encode(text)
        assert ids == sudoku.encode_grid(text).tolist()
        assert tok.decode(ids) == text == sudoku.decode_ids(ids)
    assert tok.encode("0") == tok.encode(".")  # 0 is read as a blank


LATIN6 = "".join("123456"[r:] + "123456"[:r] for r in range(6))  # rows and columns fine, boxes not


@pytest.mark.parametrize("puzzle, grid, reason", [
    ("." * 36, "2" + SOLVED6[1:], "bad row 1"),
    ("." * 36, SOLVED6[3] + SOLVED6[1:3] + SOLVED6[0] + SOLVED6[4:], "bad column 1"),
    ("." * 36, LATIN6, "bad box 1"),
    ("2" + "." * 35, SOLVED6, "changed given at cell 0"),
    ("." * 36, SOLVED6[:-1], "wrong length"),
    ("." * 36, SOLVED6 + "1", "wrong length"),
    ("." * 36, SOLVED6[:-1] + "x", "non-digit"),
    ("." * 36, SOLVED6[:-1] + "0", "non-digit"),
    ("." * 36, SOLVED6[:-1] + "7", "non-digit"),
])
def test_checker_rejects_each_kind_of_wrong_grid(puzzle, grid, reason):
    assert sudoku.check_solution(puzzle.replace("2", "1", 1) if puzzle[0] == "2" else puzzle, SOLVED6) is None
    assert reason in sudoku.check_solution(puzzle, grid)


@pytest.mark.parametrize("text, message", [
    ("123", r"36 \(6x6\) or 81 \(9x9\)"),
    ("12345x" + "." * 30, "holds 'x'"),
    ("11" + "." * 34, "conflict"),
    ("1" + "." * 5 + "1" + "." * 29, "conflict"),
    ("7" + "." * 35, r"1\.\.6"),
])
def test_parse_puzzle_rejects_malformed_puzzles(text, message):
    with pytest.raises(sudoku.SudokuError, match=message):
        sudoku.parse_puzzle(text)
    assert sudoku.parse_puzzle("0" * 36) == "." * 36


def test_training_batches_supervise_the_solution_canvas_only(prepared):
    geo = sudoku.geometry(6)
    pairs = sudoku.read_split(prepared / "a", "train")
    batches = sudoku.SudokuBatches(pairs, geo, batch_size=4, seed=0)
    ids, mask = next(batches)
    assert ids.shape == mask.shape == (4, 74)
    assert (ids[:, 0] == sudoku.BOS_ID).all() and (ids[:, -1] == sudoku.EOS_ID).all()
    assert not mask[:, :37].any() and mask[:, 37:].all()
    for row in ids.tolist():
        puzzle, solution = sudoku.decode_ids(row[1:37]), sudoku.decode_ids(row[37:73])
        assert sudoku.check_solution(puzzle, solution) is None
    again = sudoku.SudokuBatches(pairs, geo, batch_size=4, seed=0)
    assert (next(again)[0] == ids).all()  # deterministic


def test_tiny_model_trains_and_eval_runs(prepared, tmp_path, capsys):
    from dgemma.options import TrainConfig
    from dgemma.train.pretrain import train

    run = tmp_path / "run"
    cfg = TrainConfig(out=str(run), data=str(prepared / "a"), preset="tiny", vocab_size=17, canvas_length=37,
                      seq_len=74, batch_size=4, steps=3, warmup_steps=1, val_every=0, val_batches=1,
                      progress="none", threads=1)
    data = sudoku.sudoku_data_source(cfg.data, cfg.batch_size, cfg.seq_len, cfg.canvas_length)  # as `dgemma train`
    result = train(cfg, data)
    assert result.step == 3 and result.checkpoint is not None
    control = train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "ar"), "ar_only": True}), data)
    assert control.history[-1]["diffusion"] == 0.0
    capsys.readouterr()
    code = cli_main(["eval", "--task", "sudoku", "--model", str(result.checkpoint), "--data", str(prepared / "a"),
                     "--control", str(control.checkpoint), "--puzzles", "3", "--no-sweep",
                     "--plot", str(tmp_path / "p.png")])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("solve_rate_diffusion", "solve_rate_ar", "solve_rate_ar_control", "passes_per_puzzle_diffusion",
                "passes_per_puzzle_ar", "seconds_per_puzzle_diffusion", "seconds_per_puzzle_ar"):
        assert key in last
    assert 1 <= last["passes_per_puzzle_ar"] <= 36  # the prefill gives the first digit, then one pass per digit
    assert {"diffusion, givens clamped", "AR, givens clamped (greedy)"} <= {r["setting"] for r in last["rows"]}
    assert last["solve_rate_diffusion_clamped"] is not None and last["solve_rate_ar_clamped"] is not None
    # the givens clamped into the solution canvas: every output token at a given is that given, whatever the
    # (barely trained) weights
    from dgemma.api import load
    from dgemma.engine.generate import generate_ar, generate_diffusion
    from dgemma.tasks.sudoku_eval import ar_params, diffusion_params, givens_template, prompt_ids

    lm = load(str(result.checkpoint))
    puzzles = [line.split()[0] for line in (prepared / "a" / "test.txt").read_text().splitlines()[:3]]
    ids, mask = prompt_ids(puzzles)
    templates = [givens_template(p) for p in puzzles]
    for fn, params in ((generate_diffusion, diffusion_params(lm, 36, seed=0)), (generate_ar, ar_params(lm, 36))):
        out = fn(lm.model, ids, params, mask, templates=templates)
        for toks, t in zip(out.tokens, templates):
            assert all(toks[i] == x for i, x in enumerate(t) if x >= 0)
    assert (tmp_path / "p.png").stat().st_size > 0
    from dgemma.tasks.sudoku_eval import main as sudoku_eval_main

    (result.checkpoint / "test_puzzles.txt").write_text((prepared / "a" / "test.txt").read_text())
    assert sudoku_eval_main(["demo", str(result.checkpoint)]) == 0  # what `make run` prints
    shown = capsys.readouterr().out
    assert "diffusion:" in shown and "ar:" in shown and "forward passes" in shown


def test_eval_refuses_malformed_puzzles_with_one_line(prepared, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("11" + "." * 34 + "\n")
    code = cli_main(["eval", "--task", "sudoku", "--model", "random:tiny", "--puzzles-file", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_training_losses_skip_unsupervised_canvases_exactly():
    """The objective decodes only the canvases with targets (the prompt canvas costs no decoder work); the losses
    equal those of decoding every canvas."""
    import torch

    from dgemma.config import preset
    from dgemma.model import DiffusionGemma, init_weights
    from dgemma.train.objective import (
        denoise_all_canvases,
        encode_clean,
        sample_noise,
        supervised_canvases,
        training_losses,
        training_masks,
    )

    mc = preset("tiny").replace(vocab_size=17, canvas_length=37)
    model = init_weights(DiffusionGemma(mc), seed=0)
    geo = sudoku.geometry(6)
    rng = random.Random(0)
    x = torch.stack([torch.from_numpy(sudoku.training_sequence(*sudoku.make_puzzle(rng, geo, 16), geo))
                     for _ in range(3)])
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 37:] = True
    noise = sample_noise(x, 17, torch.Generator().manual_seed(0))
    noise.sc_mask[:] = True
    fast = training_losses(model, x, noise, loss_mask=mask)
    masks = training_masks(mc, 74)
    assert supervised_canvases(mc, mask, masks)[0].tolist() == list(range(37, 74))
    assert supervised_canvases(mc, torch.ones_like(mask), masks) is None
    with torch.no_grad():
        _, cache = encode_clean(model, x)
        sc = model.logits(denoise_all_canvases(model, noise.noisy, cache, masks))
        dec = denoise_all_canvases(model, noise.noisy, cache, masks, sc_logits=sc, sc_mask=noise.sc_mask)
        full = torch.nn.functional.cross_entropy(model.logits(dec[mask]), x[mask])
    torch.testing.assert_close(fast.diffusion.detach(), full, rtol=1e-5, atol=1e-5)
