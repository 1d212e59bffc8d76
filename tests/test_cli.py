"""The command line: stdout carries only the continuation, errors are one line on stderr with a non-zero exit."""

import json

from dgemma.api import BUNDLED_TOKENIZER, load
from dgemma.checkpoint import save_checkpoint
from dgemma.cli.main import main


def test_generate_prints_only_the_continuation(capsys):
    assert main(["generate", "--model", "random:tiny", "--max-new-tokens", "12", "--steps", "2",
                 "--stats", "json", "def f(x):"]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["new_tokens"] == [12] or stats["finish_reasons"] == ["stop"]
    assert stats["mode"] == "diffusion" and len(out) > 0 and "\n[diffusion]" not in out


def test_ar_mode_and_compat_flag(capsys):
    assert main(["generate", "--model", "random:tiny", "--mode", "ar", "--max-new-tokens", "5", "--stats", "json",
                 "hello"]) == 0
    assert json.loads(capsys.readouterr().err.strip())["mode"] == "ar"
    assert main(["generate", "--model", "random:tiny", "--compat", "--max-new-tokens", "5", "--steps", "2",
                 "--stats", "none", "hello"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "random:tiny", "--sampler", "confidence", "--commit-threshold", "0.9",
                 "--max-new-tokens", "8", "--steps", "4", "--stats", "json", "hello"]) == 0
    assert json.loads(capsys.readouterr().err.strip())["decoder_passes"] == [4]  # 4 steps: tiny's canvas is 8
    assert main(["generate", "--model", "random:tiny", "--sampler", "confidence", "--compat", "x"]) == 2
    assert "default mode" in capsys.readouterr().err


def test_user_errors_are_one_line(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "missing"), "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["generate", "--model", "random:nope", "x"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["generate", "--model", "random:tiny", "--steps", "0", "x"]) == 2
    assert "argument --steps: must be an integer in [1, 1024] (got 0)" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert main(["info", str(tmp_path / "bad")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_info_and_loading_a_saved_model(capsys, tmp_path):
    lm = load("random:tiny")
    path = save_checkpoint(lm.model, tmp_path / "m", tokenizer_path=BUNDLED_TOKENIZER)
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "total" in json.dumps(info)
    assert main(["generate", "--model", str(path), "--max-new-tokens", "4", "--steps", "1", "--stats", "none",
                 "--stop", "zzz", "abc"]) == 0


def test_stop_strings_trim_the_text():
    from dgemma.api import generate_text
    from dgemma.engine.generate import DiffusionParams

    lm = load("random:tiny")
    params = DiffusionParams(max_new_tokens=40, max_denoising_steps=2, seed=0)
    free = generate_text(lm, ["def g():"], params=params)[0]
    assert len(free.text) > 3
    marker = free.text[2:4]
    cut = generate_text(lm, ["def g():"], params=params, stop=[marker])[0]
    assert marker not in cut.text and free.text.startswith(cut.text) and cut.finish_reason == "stop"
