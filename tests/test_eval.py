"""Evaluation metrics on hand-made inputs, and `dgemma eval` end to end on a tiny random model."""

import json

from dgemma.evals.eval import EvalConfig, distinct_n, evaluate, function_prompts, parses

SRC = '''
import os

def add(a, b):
    """Return a + b."""
    return a + b

class K:
    def method(self, x):
        """Twice x."""
        y = x * 2
        return y

def nodoc(x):
    return x
'''


def test_function_prompts_take_signature_and_docstring():
    got = function_prompts(SRC, 10)
    assert got == ['def add(a, b):\n    """Return a + b."""\n', 'def method(self, x):\n    """Twice x."""\n']
    assert function_prompts("def broken(:\n", 5) == []


def test_parse_rate_cuts_at_the_last_parsing_line():
    prompt = 'def add(a, b):\n    """Return a + b."""\n'
    assert parses(prompt, "    return a + b\n")
    assert parses(prompt, "    return a + b\n\nx = (((\n")  # cut before the unfinished statement
    assert not parses(prompt, "return ))) garbage\n")
    assert not parses(prompt, "")  # the completion must add something
    assert not parses(prompt, "\n\n")


def test_distinct_n():
    assert distinct_n([[1, 2, 3, 4]], 1) == 1.0
    assert distinct_n([[1, 1, 1, 1]], 1) == 0.25
    assert distinct_n([[1, 2, 1, 2]], 2) == 2 / 3
    assert distinct_n([[]], 2) == 0.0


def _tiny_model_and_data(tmp_path, generation_config=None):
    from dgemma.api import BUNDLED_TOKENIZER, load
    from dgemma.checkpoint import save_checkpoint
    from dgemma.train.data import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # enough files that the validation split holds some
        (corpus / f"m{i}.py").write_text(SRC.replace("add", f"add{i}"))
    prepare([str(corpus)], tmp_path / "data", tokenizer_path=BUNDLED_TOKENIZER, val_fraction=0.2)
    lm = load("random:tiny")
    return save_checkpoint(lm.model, tmp_path / "m", tokenizer_path=BUNDLED_TOKENIZER,
                           generation_config=generation_config)


def test_eval_end_to_end_on_a_tiny_model(tmp_path, capsys):
    path = _tiny_model_and_data(tmp_path, {"max_denoising_steps": 3, "eos_token_id": [1],
                                           "dgemma": {"sampler": "confidence", "commit_threshold": 0.9}})
    out = evaluate(EvalConfig(model=str(path), data=str(tmp_path / "data"), prompts=3, max_new_tokens=8, steps=2,
                              val_sequences=2, judge="none", batch_size=2, out=str(tmp_path / "r.json")))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads((tmp_path / "r.json").read_text())
    for key in ("parse_rate_diffusion", "parse_rate_ar", "judge_ppl_diffusion", "judge_ppl_ar",
                "passes_per_token_diffusion", "passes_per_token_ar", "tokens_per_s_diffusion", "tokens_per_s_ar"):
        assert key in out
    assert out["passes_per_token_ar"] > 0.9  # one forward per generated token (plus prefill)
    assert 0 <= out["parse_rate_diffusion"] <= 1 and out["val_ar_nll"] > 0
    # the model's generation_config decides the sampler; --steps overrides its step budget
    assert out["diffusion_settings"]["sampler"] == "confidence"
    assert out["diffusion_settings"]["commit_threshold"] == 0.9
    assert out["diffusion_settings"]["max_denoising_steps"] == 2


def test_sampler_sweep_runs_the_grid_on_training_prompts(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    import pytest

    path = _tiny_model_and_data(tmp_path)
    spec = importlib.util.spec_from_file_location(
        "sampler_sweep", Path(__file__).resolve().parents[1] / "benchmarks" / "sampler_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep.jsonl"
    assert sweep.main(["--model", str(path), "--data", str(tmp_path / "data"), "--prompts", "2",
                       "--max-new-tokens", "8", "--judge", "none", "--out", str(out), "--ar-temperature", "0,0.8",
                       "--set", "max_denoising_steps=1,2", "--set", "t=0.4:0.8,0.9:0.5",
                       "--set", "sampler=entropy_bound,confidence"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["mode"], r["ar_temperature"]) for r in rows[:2]] == [("ar", 0.0), ("ar", 0.8)]
    assert rows[0]["split"] == "train"
    diff = rows[2:]
    assert len(diff) == 4  # 2 x 2 samplers; the t_min >= t_max pair is skipped
    assert {(r["max_denoising_steps"], r["sampler"]) for r in diff} == {
        (1, "entropy_bound"), (2, "entropy_bound"), (1, "confidence"), (2, "confidence")}
    assert all(r["t_min"] == 0.4 and 0 <= r["parse_rate"] <= 1 and r["tokens"] > 0 for r in diff)
    with pytest.raises(SystemExit, match="KEY one of"):
        sweep.main(["--model", str(path), "--data", str(tmp_path / "data"), "--set", "bogus=1"])


# ---------------------------------------------------------------------------------------------------------------
# Out of the box: prompts shipped with the model, losses only with --data, no downloads, one-line errors
def test_the_bundled_model_ships_its_held_out_prompts():
    from pathlib import Path

    from dgemma.evals.eval import eval_prompts, read_prompts

    shipped = Path(__file__).resolve().parents[1] / "models" / "dgemma-py-small" / "eval_prompts.json"
    prompts = read_prompts(shipped)
    assert len(prompts) == 24 and all(p.startswith(("def ", "async def ")) for p in prompts)
    doc = json.loads(shipped.read_text())
    assert doc["split"]["seed"] == 0 and doc["split"]["val_fraction"] == 0.02 and doc["made_with"]
    # without --data, eval takes them from the model folder (the bundled model by default)
    got, origin = eval_prompts(EvalConfig(prompts=3))
    assert got == prompts[::8] and "eval_prompts.json" in origin["from"]


def test_eval_without_data_uses_the_model_folders_prompts(tmp_path, capsys, monkeypatch):
    from dgemma.cli.main import main

    path = _tiny_model_and_data(tmp_path)
    # the prompts file is written from the data's held-out split, into the model folder
    assert main(["eval", "--data", str(tmp_path / "data"), "--prompts", "2",
                 "--write-prompts", str(path / "eval_prompts.json")]) == 0
    capsys.readouterr()
    monkeypatch.setenv("DGEMMA_CACHE", str(tmp_path / "cache"))  # no judge cached: auto must skip, not download

    def no_downloads(*a, **k):
        raise AssertionError(f"eval ran a subprocess: {a}")

    monkeypatch.setattr("subprocess.run", no_downloads)
    assert main(["eval", "--model", str(path), "--max-new-tokens", "4", "--steps", "1", "--batch-size", "2",
                 "--out", str(tmp_path / "r.json")]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["prompts"] == 2 and "eval_prompts.json" in result["prompts_from"]
    assert "val_ar_nll" not in result and "validation losses: not measured" in out
    assert result["judge_ppl_diffusion"] is None and "--judge download" in err
    assert json.loads((tmp_path / "r.json").read_text()) == result


def test_eval_user_errors_are_one_line(tmp_path, capsys):
    from dgemma.api import BUNDLED_TOKENIZER
    from dgemma.cli.main import main
    from dgemma.train.data import prepare

    def run(*argv):
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "--prompts" in run("--model", "random:tiny", "--prompts", "0")
    assert "--val-sequences" in run("--model", "random:tiny", "--val-sequences", "-1")
    assert "--max-new-tokens" in run("--model", "random:tiny", "--max-new-tokens", "nan")
    err = run("--model", "random:tiny")  # no data, no prompts file: say what to pass
    assert "no prompts" in err and "--data" in err and "--prompts-file" in err
    assert "does not exist" in run("--model", "random:tiny", "--prompts-file", str(tmp_path / "nope.json"))
    # a data folder whose validation split is empty
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"m{i}.py").write_text(SRC.replace("add", f"add{i}"))
    prepare([str(corpus)], tmp_path / "noval", tokenizer_path=BUNDLED_TOKENIZER, val_fraction=0.0)
    err = run("--model", "random:tiny", "--data", str(tmp_path / "noval"))
    assert "validation split" in err and "empty" in err and "--val-fraction" in err
    # data tokenized with another tokenizer than the model's
    prepare([str(corpus)], tmp_path / "other", vocab_size=300, val_fraction=0.5)
    err = run("--model", "random:tiny", "--data", str(tmp_path / "other"), "--judge", "none")
    assert "tokenizer mismatch" in err and "other" in err and "random:tiny" in err
    # an explicit judge folder without the judge
    err = run("--model", "random:tiny", "--prompts-file", str(tmp_path / "p.json"), "--judge", str(tmp_path))
    assert "does not exist" in err  # the prompts are checked first; now give some
    (tmp_path / "p.json").write_text(json.dumps({"prompts": ["def f(x):\n"]}))
    err = run("--model", "random:tiny", "--prompts-file", str(tmp_path / "p.json"), "--max-new-tokens", "2",
              "--steps", "1", "--judge", str(tmp_path))
    assert "--judge" in err and "SmolLM2" in err
