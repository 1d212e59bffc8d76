"""Grammar-constrained decoding (dgemma/engine/constrain.py): JSON Schema and regex outputs on random weights.

Every output of a constrained request is judged by an independent checker (the `jsonschema` library, Python's `re`),
for hypothesis-drawn schemas and regexes, in both modes, at several seeds and step budgets; the stepped engine
equals its slow twin (generate.py's reference loops) token for token; an always-true grammar leaves the tokens
exactly as without one; bad grammars are clear RequestErrors naming the problem."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgemma.api import generate_text, grammar_of, load
from dgemma.engine.constrain import ANY_GRAMMAR, Grammars
from dgemma.engine.engine import Engine
from dgemma.engine.generate import generate_ar, generate_diffusion
from dgemma.params import EngineConfig, Request, RequestError, SamplingParams

FUZZ = settings(max_examples=int(os.environ.get("DGEMMA_FUZZ_EXAMPLES", "40")), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
PROMPTS = ["hello", "def f(x):", "{", "The answer is"]


@pytest.fixture(scope="module")
def lm():
    return load("random:tiny")


# ---- strategies: bounded schemas and regexes (random weights must be able to finish them) -------------------------
# A random model picks among allowed tokens blindly, so an unbounded string or fraction runs on until max_new_tokens
# (a valid prefix, finish_reason "length"); the fuzz bounds every field so that each output is a whole document.
def _scalar():
    return st.one_of(
        st.builds(lambda lo, n: {"type": "string", "minLength": lo, "maxLength": lo + n}, st.integers(0, 2),
                  st.integers(0, 6)),
        st.builds(lambda lo, n: {"type": "integer", "minimum": lo, "maximum": lo + n}, st.integers(-1000, 1000),
                  st.integers(0, 5000)),
        st.builds(lambda lo, n, q: {"type": "number", "minimum": lo, "maximum": lo + n, "multipleOf": q},
                  st.integers(-50, 50), st.integers(1, 100), st.sampled_from([0.5, 0.25, 1])),
        st.just({"type": "boolean"}),
        st.builds(lambda vs: {"enum": vs}, st.lists(st.one_of(st.text("abcxyz _-", min_size=1, max_size=6),
                                                               st.integers(-9, 99)), min_size=1, max_size=4,
                                                     unique=True)),
    )


def _field(depth: int):
    if depth == 0:
        return _scalar()
    return st.one_of(
        _scalar(), _scalar(),
        st.builds(lambda items, lo, n: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + n},
                  _scalar(), st.integers(0, 1), st.integers(0, 2)),
        _object(depth - 1),
    )


def _object(depth: int):
    def build(props, data):
        names = list(props)
        required = data.draw(st.lists(st.sampled_from(names), unique=True)) if names else []
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}

    keys = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)
    return st.builds(build, st.dictionaries(keys, _field(depth), min_size=1, max_size=4), st.data())


SCHEMAS = _object(2)


def _regex():
    atom = st.one_of(st.sampled_from(["[a-z]", "[0-9]", "[A-F0-9]", "[xyz]", "a", "Q", "-", "_", r"\.", " "]),
                     st.builds(lambda a, b: f"({a}|{b})", st.sampled_from(["ab", "cd", "x", "42"]),
                               st.sampled_from(["ef", "y", "7", "zz"])))
    piece = st.builds(lambda a, lo, n, opt: f"{a}{{{lo},{lo + n}}}" + ("?" if opt else ""),
                      atom, st.integers(0, 3), st.integers(0, 4), st.booleans())
    return st.builds("".join, st.lists(st.one_of(atom, piece), min_size=1, max_size=6))


def _run(lm, mode, grammar, seed, steps=4, n=1, max_new=256, engine="fast", sampler=None, temperature=0.0):
    kw = {"max_new_tokens": max_new, "seed": seed, "engine": engine}
    if mode == "diffusion":
        kw.update(max_denoising_steps=steps, **({"sampler": sampler} if sampler else {}))
    else:
        kw.update(temperature=temperature)
    return generate_text(lm, PROMPTS[:n], mode=mode, grammar=grammar, **kw)


# ---- the fuzz: every output in the language ----------------------------------------------------------------------
@FUZZ
@given(schema=SCHEMAS, seed=st.integers(0, 2**20), steps=st.sampled_from([1, 2, 4, 8]),
       sampler=st.sampled_from(["entropy_bound", "confidence"]))
def test_every_json_output_parses_and_validates(lm, schema, seed, steps, sampler):
    """4 prompts per mode per schema: diffusion (both samplers, several step budgets) and AR (greedy and sampled)."""
    jsonschema.Draft202012Validator.check_schema(schema)
    for mode in ("diffusion", "ar"):
        results = _run(lm, mode, {"json_schema": schema}, seed, steps, n=4, sampler=sampler,
                       temperature=0.0 if seed % 2 else 0.9)
        for r in results:
            assert r.finish_reason == "stop", (mode, r.text)
            jsonschema.validate(json.loads(r.text), schema)


@FUZZ
@given(pattern=_regex(), seed=st.integers(0, 2**20), steps=st.sampled_from([1, 3, 4]))
def test_every_regex_output_matches(lm, pattern, seed, steps):
    for mode in ("diffusion", "ar"):
        for r in _run(lm, mode, {"regex": pattern}, seed, steps, n=4, max_new=96):
            assert r.finish_reason == "stop", (mode, pattern, r.text)
            assert re.fullmatch(pattern, r.text, re.DOTALL), (mode, pattern, r.text)


def test_unbounded_fields_are_cut_as_length_and_stay_a_valid_prefix(lm):
    """A random model never closes an unbounded fraction: the cut output is a prefix of a valid document."""
    schema = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    for mode in ("diffusion", "ar"):
        r = _run(lm, mode, {"json_schema": schema}, 0, max_new=24)[0]
        assert len(r.token_ids) <= 24
        if r.finish_reason == "length":
            m = lm.grammars.matcher({"json_schema": schema})
            assert m.ll.validate_tokens(r.token_ids) == len(r.token_ids)
        else:
            jsonschema.validate(json.loads(r.text), schema)


def test_a_long_word_spans_canvases_with_the_state_carried(lm):
    C = lm.model.config.canvas_length
    pattern = f"(ab){{{2 * C}}}"  # at least 2C tokens: three canvases or more
    for mode in ("diffusion", "ar"):
        r = _run(lm, mode, {"regex": pattern}, 1, max_new=4 * C)[0]
        assert r.text == "ab" * (2 * C) and r.finish_reason == "stop"
        cut = _run(lm, mode, {"regex": pattern}, 1, max_new=C + 3)[0]
        assert cut.finish_reason == "length" and ("ab" * (2 * C)).startswith(cut.text) and len(cut.token_ids) == C + 3


def test_json_object_and_api_arguments(lm):
    r = generate_text(lm, ["x"], mode="ar", json_schema=json.dumps({"enum": ["yes", "no"]}), max_new_tokens=8)[0]
    assert json.loads(r.text) in ("yes", "no")
    r = generate_text(lm, ["x"], regex="[0-9]{4}", max_new_tokens=8, seed=3)[0]
    assert re.fullmatch("[0-9]{4}", r.text)
    for mode in ("diffusion", "ar"):
        out = _run(lm, mode, {"json_object": True}, 2, max_new=48)[0]
        assert out.text.startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


# ---- the engine equals its slow twin; an always-true grammar changes nothing -----------------------------------------
def _ids(lm, text):
    return torch.tensor([lm.tokenizer.encode(text, add_bos=True)])


CASES = [({"json_schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                            "b": {"enum": ["x", "y"]}}, "required": ["a", "b"],
                           "additionalProperties": False}}),
         ({"regex": "[a-z]{3,6}(-[0-9]{2})?"}), ({"json_object": True})]


@pytest.mark.parametrize("sampler", ["entropy_bound", "confidence"])
@pytest.mark.parametrize("grammar", CASES, ids=["schema", "regex", "object"])
def test_engine_equals_reference_diffusion(lm, grammar, sampler):
    for seed, steps in ((0, 4), (5, 2), (9, 16)):
        params = lm.defaults("diffusion", max_new_tokens=40, seed=seed, max_denoising_steps=steps, sampler=sampler,
                             stability_threshold=None if seed == 9 else 1, grammar=grammar)
        outs = [generate_diffusion(lm.model, _ids(lm, "p q"), replace(params, engine=e),
                                   grammars=lm.grammars) for e in ("reference", "fast")]
        assert outs[0].tokens == outs[1].tokens and outs[0].finish_reasons == outs[1].finish_reasons
        assert outs[0].stats.steps_per_canvas == outs[1].stats.steps_per_canvas


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("grammar", CASES, ids=["schema", "regex", "object"])
def test_engine_equals_reference_ar(lm, grammar, temperature):
    for seed in (0, 7):
        params = lm.defaults("ar", max_new_tokens=40, seed=seed, temperature=temperature, grammar=grammar)
        outs = [generate_ar(lm.model, _ids(lm, "p q"), replace(params, engine=e),
                            grammars=lm.grammars) for e in ("reference", "fast")]
        assert outs[0].tokens == outs[1].tokens and outs[0].finish_reasons == outs[1].finish_reasons


@pytest.mark.parametrize("mode,kw", [("diffusion", {"sampler": "entropy_bound"}), ("diffusion", {"sampler": "confidence"}),
                                     ("ar", {"temperature": 0.0}), ("ar", {"temperature": 0.8})])
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_an_always_true_grammar_gives_exactly_the_unconstrained_tokens(lm, mode, kw, engine):
    if mode == "diffusion":
        kw = {**kw, "max_denoising_steps": 4}
    for seed in (0, 1):
        free = generate_text(lm, PROMPTS, mode=mode, max_new_tokens=48, seed=seed, engine=engine, **kw)
        anyg = generate_text(lm, PROMPTS, mode=mode, max_new_tokens=48, seed=seed, engine=engine, grammar=ANY_GRAMMAR,
                             **kw)
        assert [r.token_ids for r in anyg] == [r.token_ids for r in free]
        assert [r.finish_reason for r in anyg] == [r.finish_reason for r in free]


def test_rows_without_a_grammar_are_untouched_beside_constrained_ones(lm):
    """A batch mixing constrained and free rows: the free rows' tokens equal the same rows run alone."""
    prompt = lm.tokenizer.encode("x y z", add_bos=True)
    base = SamplingParams(max_new_tokens=40, seed=4, max_denoising_steps=4, eos_token_ids=lm.eos_ids())
    for mode in ("diffusion", "ar"):
        p = base.with_(mode=mode)

        def run(reqs):
            eng = Engine(lm.model, EngineConfig(max_batch=4), grammars=lm.grammars)
            for r in reqs:
                eng.add(r)
            out = {r.request_id: [] for r in reqs}
            while eng.has_work():
                for ev in eng.step():
                    out[ev.request_id].extend(ev.new_ids)
            return out

        alone = run([Request("free", prompt, p)])
        mixed = run([Request("free", prompt, p), Request("g", prompt, p.with_(grammar={"regex": "[0-9]{5}"}))])
        assert mixed["free"] == alone["free"]
        assert re.fullmatch("[0-9]{5}", lm.tokenizer.decode(mixed["g"]))


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grammar,message", [
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "unsupported keyword(s) uniqueItems"),
    ({"json_schema": {"not": {"type": "string"}}}, "unsupported keyword(s) not"),
    ({"json_schema": {"type": "objekt"}}, "objekt"),
    ({"regex": "a(b"}, "unclosed group"),
    ({"regex": r"(a)\1"}, "backreferences"),
    ({"regex": ""}, "non-empty string"),
    ({"json_schema": "{}"}, "must be a JSON object"),
    ({"json_object": False}, "json_object must be true"),
    ({"yaml": "x"}, "unknown grammar kind 'yaml'"),
    ({"regex": "a", "json_object": True}, "grammar must be one of"),
    ({"json_schema": {"enum": [float("nan")]}}, "plain JSON data"),
    ({"json_schema": {"enum": [{1, 2}]}}, "plain JSON data"),
])
def test_bad_grammars_are_clear_request_errors(lm, grammar, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        eng = Engine(lm.model, EngineConfig(max_batch=1), grammars=lm.grammars)
        eng.add(Request("r", [2, 5], SamplingParams(grammar=grammar)))


def test_other_refusals(lm):
    with pytest.raises(RequestError, match="without a tokenizer's grammars"):
        Engine(lm.model, EngineConfig(max_batch=1)).add(Request("r", [2], SamplingParams(grammar={"regex": "a"})))
    with pytest.raises(RequestError, match="cannot be combined"):
        SamplingParams(grammar={"regex": "a"}, template=(5,)).validate()
    with pytest.raises(RequestError, match="not valid JSON"):
        grammar_of(json_schema="{nope")
    with pytest.raises(RequestError, match="not both"):
        grammar_of(json_schema="{}", regex="a")
    with pytest.raises(ValueError, match="compat"):
        generate_text(lm, ["x"], regex="a", compat=True, max_new_tokens=4)
    with pytest.raises(RequestError, match="end-of-sequence"):
        Grammars("{}", 10, [])


def test_cli_generate_json_schema_and_regex(tmp_path, capsys):
    from dgemma.cli.main import main

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
              "additionalProperties": False}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    base = ["generate", "--model", "random:tiny", "--stats", "none", "--max-new-tokens", "32"]
    for extra in (["--json-schema", str(f)], ["--json-schema", json.dumps(schema), "--mode", "ar"]):
        assert main(base + extra + ["hi"]) == 0
        jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    assert main(base + ["--regex", "[a-c]{2}x", "hi"]) == 0
    assert re.fullmatch("[a-c]{2}x", capsys.readouterr().out)
    for bad, msg in ((["--json-schema", '{"not": {}}'], "unsupported keyword(s) not"), (["--regex", "a(b"], "unclosed"),
                     (["--json-schema", "{x"], "not valid JSON"), (["--regex", "a", "--json-schema", "{}"], "not both"),
                     (["--regex", "a", "--suffix", "x"], "cannot be combined")):
        assert main(base + bad + ["hi"]) == 2
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1 and msg in out.err, out.err


def test_help_imports_neither_llguidance_nor_torch():
    code = ("import sys; from dgemma.cli.main import build_parser; build_parser(); "
            "print('llguidance' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_bench_structured_smoke(capsys):
    from dgemma.cli.main import main

    assert main(["bench", "structured", "--model", "random:tiny", "--schemas", "2", "--regexes", "1", "--prompts", "2",
                 "--max-new-tokens", "40", "--steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "structured" and result["constrained_outputs"] == 12
    for side in ("diffusion_constrained", "ar_constrained"):
        assert result["sides"][side]["validity"] == 1.0
    assert set(result["sides"]) == {"diffusion_constrained", "diffusion_free", "ar_constrained", "ar_free"}


def test_walk_repairs_refused_tokens_and_allows_eos_only_where_the_grammar_accepts(lm):
    """Hand-made logits: the walk keeps allowed tokens, turns a refused one (EOS too early included) into the best
    allowed token, and ends at an EOS the grammar accepts."""
    from dgemma.engine.constrain import guide_run, walk

    tok, V = lm.tokenizer, lm.model.config.vocab_size
    eos = tok.eos_id
    a, b, x = (tok.encode(c)[0] for c in "abx")

    def logits(best: int) -> torch.Tensor:
        v = torch.zeros(V)
        v[best], v[eos] = 5.0, 4.0  # EOS second best everywhere
        return v

    m = lm.grammars.matcher({"regex": "(ab)+"})
    # a (kept); EOS (refused: "a" is no word yet) -> b; x (refused) -> a, preferred to the now allowed EOS; a -> b
    tokens = [a, eos, x, a]
    per_position = [logits(a), logits(b), logits(a), logits(b)]
    assert guide_run(m, tokens, lambda i: per_position[i]) == [a, b, a, b]
    assert m.ll.validate_tokens([b]) == 0 and m.ll.validate_tokens([a]) == 1  # rolled back to the start
    out, ended = walk(m, tokens, lambda i: per_position[i])
    assert out == [a, b, a, b] and not ended
    out, ended = walk(m, [eos, a], lambda i: logits(a))  # "abab" accepts: EOS ends the word
    assert out == [] and ended
