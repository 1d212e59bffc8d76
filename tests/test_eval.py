"""Evaluation metrics on hand-made inputs, and `dgemma eval` end to end on a tiny random model."""

import json

from dgemma.eval import EvalConfig, distinct_n, evaluate, function_prompts, parses

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
    from dgemma.data import prepare

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
