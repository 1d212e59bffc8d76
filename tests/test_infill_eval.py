"""`dgemma eval --task infill`: cutting cases from functions, the cases file, scoring on hand-made outputs, the shipped
case file of the bundled model, and the task end to end on random:tiny with cases whose middle each mode reproduces
by construction (so exact match must count them, and only them)."""

import json
from pathlib import Path

import pytest

from dgemma.cli.main import main
from dgemma.evals.infill import (
    CASES_FILE,
    Case,
    Filled,
    ModeScore,
    _boundaries_hold,
    cut,
    fill,
    function_cases,
    parses,
    read_cases,
    write_cases,
)

ROOT = Path(__file__).resolve().parent.parent
SRC = '''
import os

def area(r, pi=3.14):
    """Circle area."""
    r2 = r * r
    a = pi * r2
    if a < 0:
        raise ValueError(a)
    return a

class K:
    def two(self):
        return 2
'''


def test_cases_are_cut_inside_the_body():
    found = function_cases(SRC, "m.py")
    assert {kind for *_, kind, _, _ in found} == {"line", "span"}
    for text, line, kind, first, last in found:
        assert line == 4 and text.startswith("def area(")  # `two` has no body line to remove
        lines = text.rstrip("\n").split("\n")
        assert 2 <= first <= last < len(lines) - 1  # never the signature, the docstring or the last line
        assert (last - first + 1 == 1) == (kind == "line")
        prefix, middle, suffix = cut(text, first, last)
        assert prefix + middle + suffix == text
        assert middle.startswith("\n") and suffix.startswith("\n") and not prefix.endswith("\n")
    assert function_cases("def broken(:\n", "x.py") == []


def test_cases_file_round_trip_and_errors(tmp_path, capsys):
    from dgemma.evals.infill import InfillEvalConfig

    cases = [Case("a", "line", "def f(x):", "\n    y = x", "\n    return y\n")]
    path = tmp_path / "c.jsonl"
    write_cases(path, cases, {"from": "a test"}, InfillEvalConfig())
    got, header = read_cases(path)
    assert got == cases and header["format"] == "dgemma-infill-cases-v1" and header["cases"] == 1
    bad = {"missing.jsonl": None, "notjson.jsonl": "{nope\n", "empty.jsonl": "\n",
           "fields.jsonl": '{"prefix": "def f():", "middle": ""}\n',
           "kind.jsonl": '{"prefix": "a", "middle": "b", "suffix": "c", "kind": "word"}\n',
           "format.jsonl": '{"format": "other-v9"}\n{"prefix": "a", "middle": "b", "suffix": "c"}\n'}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=str(tmp_path / name)):
            read_cases(tmp_path / name)
        assert main(["eval", "--task", "infill", "--model", "random:tiny", "--cases-file", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and name in err
    assert main(["eval", "--task", "infill", "--model", "random:tiny"]) == 2  # no model folder, no --cases-file
    assert "--cases-file" in capsys.readouterr().err


def test_a_model_without_a_text_tokenizer_is_refused(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    write_cases(path, [Case("a", "line", "def f(x):", "\n    y = x", "\n    return y\n")], {}, _cfg())
    assert main(["eval", "--task", "infill", "--model", str(ROOT / "models" / "dgemma-sudoku-6x6"), "--cases-file",
                 str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "text" in err and "dgemma-py-small" in err


def _cfg():
    from dgemma.evals.infill import InfillEvalConfig

    return InfillEvalConfig()


def test_scores_on_hand_made_outputs():
    case = Case("a", "line", "def f(x):", "\n    y = x", "\n    return y\n")
    s = ModeScore()
    s.add(case, Filled("\n    y = x", [10, 11, 12], 3, 0.1), [10, 11, 12])
    s.add(case, Filled("\n    y = x ", [10, 11, 99], 5, 0.3), [10, 11, 12])  # one character more: not exact
    s.add(case, Filled("\n    y = (", [10, 11], 7, 0.2), [10, 11, 12])  # does not parse; ended early
    got = s.summary()
    assert got["exact_match"] == pytest.approx(1 / 3) and got["parse_rate"] == pytest.approx(2 / 3)
    assert got["token_accuracy"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert got["passes_per_case"] == 5 and got["seconds_per_case"] == pytest.approx(0.2)
    assert s.summary([True, False, False])["exact_match"] == 1.0


def test_shipped_cases_of_the_bundled_model():
    from dgemma.tokenizer import Tokenizer

    path = ROOT / "models" / "dgemma-py-small" / CASES_FILE
    cases, header = read_cases(path)
    assert header["made_with"] == [f"dgemma eval --task infill --write-cases models/dgemma-py-small/{CASES_FILE}"]
    assert header["split"]["seed"] == 0 and header["split"]["val_fraction"] == 0.02 and len(cases) >= 100
    assert {c.kind for c in cases} == {"line", "span"}
    tok = Tokenizer.from_path(ROOT / "models" / "dgemma-py-small")
    for c in cases:
        compile(c.prefix + c.middle + c.suffix, c.id, "exec")  # the function parses whole
        assert _boundaries_hold(tok, c.prefix, c.middle, c.suffix), c.id


def test_end_to_end_exact_match_counts_reproduced_middles(tmp_path, capsys):
    """Case 0's middle is AR's own greedy text for its prefix and case 1's is diffusion's hole for its prefix, suffix
    and seed (both of the same token count as the middle they replace): each mode must count its case as exact."""
    from dgemma.api import load

    lm = load("random:tiny")
    tok = lm.tokenizer
    ar, diff = lm.defaults("ar", temperature=0.0), lm.defaults("diffusion", seed=0)
    suffix = "\n    return y\n"

    def reproducible(mode, params, skip=()):
        for i in range(40):
            prefix = f"def f{i}(x):"
            if prefix in skip:
                continue
            out = fill(lm, Case("probe", "line", prefix, "\n    y", suffix), mode, params)
            if tok.encode(out.text, add_bos=False) == out.ids:  # the text gives back the same tokens
                return Case(f"{mode}-made", "line", prefix, out.text, suffix)
        raise AssertionError(f"no prompt whose {mode} output round-trips through the tokenizer")

    a = reproducible("ar", ar)
    d = reproducible("diffusion", diff, skip=(a.prefix,))
    cases = [a, d, Case("plain", "span", "def g(x):", "\n    y = x + 1\n    z = y", "\n    return z\n")]
    path = tmp_path / "cases.jsonl"
    write_cases(path, cases, {"from": "a test"}, _cfg())
    out = tmp_path / "infill.json"
    assert main(["eval", "--task", "infill", "--model", "random:tiny", "--cases-file", str(path), "--out",
                 str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    r = json.loads(line)
    assert json.loads(out.read_text()) == r
    want = {m: [fill(lm, c, m, p).text == c.middle for c in cases] for m, p in (("ar", ar), ("diffusion", diff))}
    assert want["ar"][0] and want["diffusion"][1]
    assert r["exact_match_ar"] == pytest.approx(sum(want["ar"]) / 3)
    assert r["exact_match_diffusion"] == pytest.approx(sum(want["diffusion"]) / 3)
    assert r["task"] == "infill" and r["cases"] == 3 and r["kinds"] == {"line": 2, "span": 1}
    assert r["original_parse_rate"] == pytest.approx(sum(parses(c.prefix + c.middle + c.suffix) for c in cases) / 3)
    for mode in ("diffusion", "ar"):
        for key in ("token_accuracy", "parse_rate", "passes_per_case", "seconds_per_case"):
            assert isinstance(r[f"{key}_{mode}"], float), key
    assert r["passes_per_case_ar"] == pytest.approx(sum(len(tok.encode(c.middle)) for c in cases) / 3)
    assert {row["setting"] for row in r["rows"]} >= {"diffusion", "ar", "diffusion, lines", "ar, spans",
                                                      "diffusion, prefix only"}
    control = [fill(lm, c, "diffusion", diff, with_suffix=False).text == c.middle for c in cases]
    assert r["exact_match_diffusion_prefix_only"] == pytest.approx(sum(control) / 3)
