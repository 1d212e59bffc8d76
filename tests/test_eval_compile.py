"""`dgemma eval --compile`: the flag reaches every generation the eval runs (seen at the engine's door,
engine.generate_batch), the compiled graphs really run, and the report says so with the same keys as without it.
Whether the compiled graphs agree with eager is tested in tests/test_compiled.py and tests/test_engine.py; the
quality cost is measured by benchmarks/compile_quality.py (benchmarks/results/compile-quality/).

Compile time sets the sizes: inductor compiles one graph per piece, layer kind and row bucket (a few seconds each on
a CPU), so the free-text model has one layer kind and the run touches one bucket (a prompt of 17-32 tokens and one
new token: the prefill and the diffusion canvas are both 32 rows; AR needs no decode pass). About 40 s on 2 cores."""

from __future__ import annotations

import inspect
import json
import random

import pytest

from dgemma.engine import engine
from dgemma.engine.compiled import compiler_available
from dgemma.evals.eval import EvalConfig, evaluate

pytestmark = [pytest.mark.slow,  # inductor compiles
              pytest.mark.skipif(compiler_available() is not None, reason=str(compiler_available()))]


def _spy(monkeypatch, run_eager: bool = False) -> dict[str, list]:
    """Record every engine.generate_batch call's `compile` argument and the compiled pieces the engines build.
    run_eager: run the generation itself eagerly (the flag is still recorded), to check plumbing without compiling."""
    seen: dict[str, list] = {"compile": [], "pieces": []}
    batch, pieces = engine.generate_batch, engine.compiled_pieces
    signature = inspect.signature(batch)

    def spy_batch(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        seen["compile"].append(bound.arguments["compile"])
        if run_eager:
            bound.arguments["compile"] = False
        return batch(*bound.args, **bound.kwargs)

    def spy_pieces(*args, **kwargs):
        got = pieces(*args, **kwargs)
        seen["pieces"].append(got)
        return got

    monkeypatch.setattr(engine, "generate_batch", spy_batch)
    monkeypatch.setattr(engine, "compiled_pieces", spy_pieces)
    return seen


def test_eval_compile_runs_every_generation_compiled(tmp_path, capsys, monkeypatch):
    from dgemma.api import BUNDLED_TOKENIZER
    from dgemma.checkpoint import random_config, save_checkpoint
    from dgemma.config import FULL
    from dgemma.model import DiffusionGemma, init_weights

    cfg, _ = random_config("random:tiny")
    cfg = cfg.replace(num_hidden_layers=1, layer_types=(FULL,))  # one layer kind: half the graphs of random:tiny
    model = save_checkpoint(init_weights(DiffusionGemma(cfg), seed=0), tmp_path / "m", tokenizer_path=BUNDLED_TOKENIZER)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"prompts": ['def add(a, b):\n    """Return the sum of a and b, two numbers."""\n']}))
    seen = _spy(monkeypatch)
    base = {"model": str(model), "prompts_file": str(prompts), "max_new_tokens": 1, "steps": 2, "judge": "none",
            "batch_size": 1}
    eager = evaluate(EvalConfig(**base))
    assert seen["compile"] == [False, False] and seen["pieces"] == []  # diffusion, then AR
    compiled = evaluate(EvalConfig(**base, compile=True, out=str(tmp_path / "r.json")))
    assert seen["compile"][2:] == [True, True]
    layers, sampler = seen["pieces"][0]
    assert layers.compilations > 0 and sampler.compilations > 0  # the graphs ran (not only a flag passed along)
    assert eager["compile"] is False and compiled["compile"] is True
    assert eager.keys() == compiled.keys()
    assert compiled["tokens_diffusion"] == compiled["tokens_ar"] == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads((tmp_path / "r.json").read_text())


def test_sudoku_eval_compile_reaches_every_row(tmp_path, capsys, monkeypatch):
    """--task sudoku --compile: the diffusion row, the AR row, the control and the batch-1 latency runs all get
    compile=True. The generations themselves run eagerly (the compiled path is the test above; compiling this
    model's buckets as well would triple the time). A tiny random model with the Sudoku tokenizer; one puzzle."""
    from dgemma.checkpoint import save_checkpoint
    from dgemma.cli.main import main as cli_main
    from dgemma.config import preset
    from dgemma.model import DiffusionGemma, init_weights
    from dgemma.tasks import sudoku

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    sudoku.build_tokenizer().save(tok_dir)
    cfg = preset("tiny").replace(vocab_size=17, canvas_length=37, eos_token_ids=(sudoku.EOS_ID,))
    model = save_checkpoint(init_weights(DiffusionGemma(cfg), seed=0), tmp_path / "m", tokenizer_path=tok_dir,
                            generation_config={"max_denoising_steps": 2})
    rng, geo = random.Random(0), sudoku.geometry(6)
    puzzles = tmp_path / "puzzles.txt"
    puzzles.write_text(" ".join(sudoku.make_puzzle(rng, geo, 16)) + "\n")
    seen = _spy(monkeypatch, run_eager=True)
    code = cli_main(["eval", "--task", "sudoku", "--model", str(model), "--control", str(model), "--puzzles-file",
                     str(puzzles), "--no-sweep", "--compile"])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["compile"] is True and last["puzzles"] == 1
    # the diffusion, AR and control rows, each batched and then at batch 1 for latency (a warm-up, then the puzzle),
    # and the two givens-clamped rows (diffusion and AR), batched only
    assert len(seen["compile"]) == 3 * (1 + 1 + 1) + 2 and all(seen["compile"])
