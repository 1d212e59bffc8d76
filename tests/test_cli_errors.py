"""First contact: every user error of the command line is one line on stderr naming the input and the fix, with
exit status 2 and no traceback; and what used to come out silently wrong (several prompts run together, options of
the other mode ignored) no longer does."""

import argparse
import json
import subprocess
import sys

import pytest

from dgemma.cli.main import main

TINY = ["--model", "random:tiny"]


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert out == ""
    return err


@pytest.mark.parametrize("flag,value", [
    ("--temperature", "nan"), ("--temperature", "-1"), ("--top-p", "nan"), ("--top-p", "0"), ("--top-k", "0"),
    ("--t-min", "nan"), ("--t-max", "inf"), ("--t-max", "-inf"), ("--entropy-bound", "nan"), ("--entropy-bound", "0"),
    ("--commit-threshold", "1.5"), ("--commit-threshold", "nan"), ("--confidence-threshold", "inf"),
    ("--stability-threshold", "-1"), ("--steps", "0"), ("--steps", "1025"), ("--steps", "many"),
    ("--max-new-tokens", "0"), ("--max-new-tokens", "1000000000"), ("--seed", "-1"),
])
def test_impossible_numbers_are_refused_while_parsing(capsys, flag, value):
    err = one_line_error(capsys, ["generate", *TINY, f"{flag}={value}", "x"])  # "=": -inf is not an option
    assert err.startswith("dgemma generate: error: argument " + flag) and "must be" in err and "--help" in err


def _all_parsers(parser, prog="dgemma"):
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{prog} {name}")


def test_every_float_option_refuses_nan_and_infinity():
    """Each float option of every subcommand (its type helper is named "a finite number ...") refuses NaN and
    infinity, and no option is left with a plain `float` (or `int`) type."""
    from dgemma.cli.main import build_parser

    checked = []
    for prog, p in _all_parsers(build_parser()):
        for action in p._actions:
            assert action.type not in (float, int), f"{prog} {action.option_strings}: plain {action.type.__name__}"
            if getattr(action.type, "__name__", "").startswith("a finite number"):
                for bad in ("nan", "inf", "-inf"):
                    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
                        action.type(bad)
                checked.append(f"{prog} {action.option_strings[0]}")
    assert {"dgemma generate --temperature", "dgemma generate --t-max", "dgemma train --lr", "dgemma train --val-t",
            "dgemma data prepare --val-fraction"} <= set(checked)
    assert len(checked) >= 21  # every subcommand added since brings more


def test_max_new_tokens_in_both_modes_is_one_line(capsys):
    for mode in ("diffusion", "ar"):
        err = one_line_error(capsys, ["generate", *TINY, "--mode", mode, "--max-new-tokens", "1000000000", "x"])
        assert "--max-new-tokens" in err and "1048576" in err


@pytest.mark.parametrize("flag", ["--temperature 0.7", "--top-k 5", "--top-p 0.9"])
def test_ar_options_with_diffusion_are_an_error(capsys, flag):
    err = one_line_error(capsys, ["generate", *TINY, *flag.split(), "x"])
    name = flag.split()[0]
    assert f"{name} applies to --mode ar only" in err and "--mode ar" in err
    if name == "--temperature":
        assert "for diffusion use --t-min/--t-max" in err


@pytest.mark.parametrize("flag", ["--steps 4", "--entropy-bound 0.2", "--t-min 0.1", "--t-max 0.9",
                                  "--sampler confidence", "--commit-threshold 0.9", "--stability-threshold 2",
                                  "--confidence-threshold 0.01", "--compat", "--live"])
def test_diffusion_options_with_ar_are_an_error(capsys, flag):
    err = one_line_error(capsys, ["generate", *TINY, "--mode", "ar", *flag.split(), "x"])
    assert f"{flag.split()[0]} applies to --mode diffusion only" in err


def test_temperature_zero_is_still_allowed_in_ar(capsys):
    assert main(["generate", *TINY, "--mode", "ar", "--temperature", "0", "--max-new-tokens", "2", "--stats", "none",
                 "x"]) == 0


def test_t_min_must_be_below_t_max(capsys):
    err = one_line_error(capsys, ["generate", *TINY, "--t-min", "0.9", "--t-max", "0.5", "x"])
    assert "--t-min 0.9 must be below --t-max 0.5" in err


def test_invalid_utf8_prompt_is_one_line():
    # On Linux argv carries raw bytes; Python hands them over as lone surrogates.
    proc = subprocess.run([sys.executable, "-m", "dgemma", "generate", *TINY, b"\xff\xfe"], check=False,
                          capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert "prompt 1 is not valid UTF-8" in err and "ff fe" in err and proc.stdout == b""


def test_several_prompts_need_jsonl(capsys):
    err = one_line_error(capsys, ["generate", *TINY, "a", "b"])
    assert "2 prompts" in err and "--format jsonl" in err


def test_jsonl_tells_several_prompts_apart(capsys):
    assert main(["generate", *TINY, "--format", "jsonl", "--max-new-tokens", "3", "--steps", "1", "--stats", "none",
                 "def f(x):", "hello\nworld"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in rows] == ["def f(x):", "hello\nworld"]
    for r in rows:
        assert set(r) == {"prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens"}
        assert r["prompt_tokens"] > 0 and 0 < r["completion_tokens"] <= 3 and r["finish_reason"] in ("stop", "length")


def test_text_stats_say_what_they_show_and_where_to_look_next(capsys):
    assert main(["generate", *TINY, "--max-new-tokens", "4", "--steps", "2", "def f(x):"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    stats, hint = err[-2], err[-1]
    assert stats.startswith("[diffusion mode]") and "new tokens in" in stats and "denoising passes" in stats
    assert hint.startswith("next: ") and "dgemma generate --mode ar --model random:tiny 'def f(x):'" in hint
    assert "random weights" in hint
    assert main(["generate", *TINY, "--mode", "ar", "--max-new-tokens", "3", "x"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("[ar mode] ") and "forward passes" in err[-2] and "block diffusion" in err[-1]


def test_out_of_memory_is_one_line(capsys, monkeypatch):
    import dgemma.api

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 128000000256 bytes.\nmore detail")

    monkeypatch.setattr(dgemma.api, "generate_text", oom)
    err = one_line_error(capsys, ["generate", *TINY, "--max-new-tokens", "5", "x"])
    assert "out of memory" in err and "--max-new-tokens" in err


def test_other_runtime_errors_are_not_hidden(monkeypatch):
    import dgemma.api

    def bug(*a, **k):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(dgemma.api, "generate_text", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", *TINY, "--max-new-tokens", "5", "x"])


def test_train_and_bench_numbers(capsys):
    for argv in (["train", "--threads", "0"], ["train", "--threads", "-2"], ["train", "--lr", "nan"],
                 ["train", "--max-minutes", "inf"], ["train", "--val-t", "0.5", "nan"], ["bench", "--repeats", "0"]):
        err = one_line_error(capsys, argv)
        assert argv[1] in err and "must be" in err


def test_argparse_errors_are_one_line(capsys):
    for argv, words in ((["generate"], "prompt"), (["nope"], "invalid choice"), ([], "command"),
                        (["generate", "--mode", "fast", "x"], "--mode")):
        err = one_line_error(capsys, argv)
        assert words in err and "--help" in err
