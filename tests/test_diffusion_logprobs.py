"""Log-probabilities of committed diffusion tokens (SamplingParams.logprobs in diffusion mode).

The definition (engine.Engine._score_canvases): a committed token's log-probability is the log-softmax of the
denoiser's raw logits (temperature 1, no grammar mask, no template clamp) at its canvas position, at the denoising
step that chose it: the canvas's last step for the entropy-bound sampler, the step that committed the position for
the confidence sampler, the last step for a grammar's repair at commit. The oracle here is the slow twin: the
reference loop (generate.py, engine="reference") run on the same request, its model.denoise outputs recorded step
by step; its tokens equal the engine's, so the step that chose each token can be read off its drafts.

Tolerance: 1e-4 nats (the engine's ragged decoder pass and its LM head over a few positions round a little
differently from the reference's batched denoise over whole canvases; fp32)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from oracle import CONFIGS

from dgemma.engine.engine import Engine
from dgemma.engine.generate import DiffusionParams, GenerationError, generate_diffusion
from dgemma.model import DiffusionGemma, init_weights
from dgemma.params import MAX_LOGPROBS, EngineConfig, Request, RequestError, SamplingParams
from dgemma.sampler import FREE

TOL = 1e-4
STEPS = 4


def _model(name="tiny", seed=0):
    return init_weights(DiffusionGemma(CONFIGS[name]), std=0.5, seed=seed).eval()


def _ids(n, seed, vocab=256):
    return torch.randint(5, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(model, prompt, params: DiffusionParams, template=None, grammars=None):
    """The reference loop on one prompt, recording every step: returns (tokens, canvases), canvases[ci] a list of
    (raw logits [C, V] fp32, draft [C], accepted [C]) per step, in order."""
    canvases: list[list] = []
    raws: list[torch.Tensor] = []
    denoise = model.denoise

    def recording(*a, **kw):
        out = denoise(*a, **kw)
        raws.append(out[0].clone())
        return out

    def on_step(ci, step, rows, draft, accepted):
        while len(canvases) <= ci:
            canvases.append([])
        canvases[ci].append((raws[-1], draft[0].tolist(), accepted[0].tolist()))

    model.denoise = recording
    try:
        out = generate_diffusion(model, torch.tensor([prompt]), params, on_step=on_step,
                                 templates=None if template is None else [template], grammars=grammars)
    finally:
        del model.denoise
    return out.tokens[0], canvases


def _expected(tokens, canvases, sampler, C):
    """Per output token: the log-softmax [V] of the raw logits of the step that chose it (the definition above)."""
    rows = []
    for ci, steps in enumerate(canvases):
        final = tokens[ci * C:(ci + 1) * C]
        chosen: dict[int, tuple[int, int]] = {}  # position -> (token, step index)
        if sampler == "confidence":  # committed positions keep their token; a change is a new choice
            for k, (_, draft, accepted) in enumerate(steps):
                for i, (t, a) in enumerate(zip(draft[:len(final)], accepted)):
                    if a and chosen.get(i, (None,))[0] != t:
                        chosen[i] = (t, k)
        for i, t in enumerate(final):
            k = chosen[i][1] if chosen.get(i, (None,))[0] == t else len(steps) - 1
            rows.append(F.log_softmax(steps[k][0][i].float(), dim=-1))
    return rows


def _check(lps, tokens, expected, top):
    assert [lp.token_id for lp in lps] == tokens and len(expected) == len(tokens)
    for lp, t, ref in zip(lps, tokens, expected):
        assert abs(lp.logprob - ref[t].item()) < TOL
        assert len(lp.top) == top
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        best = torch.topk(ref, top).values.tolist()
        assert all(abs(v - b) < TOL for v, b in zip(values, best))  # the most probable, robust to near-ties
        assert all(abs(v - ref[i].item()) < TOL for i, v in lp.top)
        if top and lp.top[0][0] == t:  # the chosen token is the argmax: the very same number
            assert lp.top[0][1] == lp.logprob
        if top and ref[t].item() >= ref.max().item() - 1e-6:
            assert t in [i for i, _ in lp.top]


@pytest.mark.parametrize("sampler, early", [("entropy_bound", True), ("entropy_bound", False),
                                            ("confidence", False)])
def test_logprobs_are_the_denoisers_distribution_at_the_choosing_step(sampler, early):
    model = _model()
    C = model.config.canvas_length
    prompt = _ids(2 * model.config.sliding_window + 3, 1)  # past the sliding window
    params = DiffusionParams(max_new_tokens=C + 9, max_denoising_steps=STEPS, seed=3, sampler=sampler,
                             stability_threshold=1 if early else None, logprobs=3)
    ref_tokens, canvases = _reference(model, prompt, DiffusionParams(**{**params.__dict__, "engine": "reference",
                                                                        "logprobs": None}))
    out = generate_diffusion(model, torch.tensor([prompt]), params)
    tokens, lps = out.tokens[0], out.logprobs[0]
    assert tokens == ref_tokens and len(tokens) == C + 9 and len(canvases) == 2
    _check(lps, tokens, _expected(tokens, canvases, sampler, C), 3)
    if sampler == "entropy_bound":  # the committed canvas is the last step's argmax
        assert all(lp.top[0][0] == lp.token_id for lp in lps)


def _engine_run(model, requests, **cfg):
    eng = Engine(model, EngineConfig(max_batch=len(requests), max_model_len=256, **cfg))
    for r in requests:
        eng.add(r)
    out = {r.request_id: ([], []) for r in requests}
    while eng.has_work():
        for ev in eng.step():
            out[ev.request_id][0].extend(ev.new_ids)
            out[ev.request_id][1].extend(ev.new_logprobs)
    return out


@pytest.mark.parametrize("sampler", ["entropy_bound", "confidence"])
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_only_the_rows_that_ask_pay_and_no_token_changes(sampler, batch_invariant):
    model = _model()
    C = model.config.canvas_length
    chunk = 8
    p = SamplingParams(max_new_tokens=C + 5, max_denoising_steps=STEPS, sampler=sampler)
    asks = {"a": 0, "b": None, "c": 5}
    prompts = {"a": _ids(7, 1), "b": _ids(12, 2), "c": _ids(5, 3)}

    def run(with_logprobs: bool):
        sizes: list[int] = []
        logits = model.logits

        def counting(h):
            sizes.append(h.shape[0])
            return logits(h)

        model.logits = counting
        try:
            reqs = [Request(k, prompts[k], p.with_(seed=i, logprobs=asks[k] if with_logprobs else None))
                    for i, k in enumerate(asks)]
            return _engine_run(model, reqs, sampler_chunk=chunk, batch_invariant=batch_invariant), sizes
        finally:
            del model.logits

    plain, plain_sizes = run(False)
    asked, asked_sizes = run(True)
    for k, top in asks.items():
        assert asked[k][0] == plain[k][0]  # the very same tokens, bit for bit
        assert plain[k][1] == [] and (asked[k][1] == [] if top is None else len(asked[k][1]) == C + 5)
    assert all(len(lp.top) == asks[k] for k in ("a", "c") for lp in asked[k][1])
    extra = list(asked_sizes)
    for n in plain_sizes:  # the sampler's own head calls are the same; what is left is the scoring
        extra.remove(n)
    rows = 16 if batch_invariant else chunk  # batch-invariant mode pads every head call to 16 rows
    assert all(n <= rows for n in extra)
    if not batch_invariant:  # one head row per reported token, none for the row that did not ask
        assert sum(extra) == 2 * (C + 5)
    else:  # and a request's numbers do not depend on who shares its steps
        for k in ("a", "c"):
            alone = _engine_run(model, [Request(k, prompts[k], p.with_(seed=list(asks).index(k), logprobs=asks[k]))],
                                batch_invariant=True)[k]
            assert alone[0] == asked[k][0]
            assert max(abs(x.logprob - y.logprob) for x, y in zip(alone[1], asked[k][1])) < TOL


@pytest.mark.parametrize("sampler", ["entropy_bound", "confidence"])
def test_template_positions_report_the_models_own_value(sampler):
    model = _model()
    C = model.config.canvas_length
    g = torch.Generator().manual_seed(4)
    template = tuple(FREE if f else int(t) for t, f in zip(torch.randint(5, 256, (C + 4,), generator=g).tolist(),
                                                           (torch.rand(C + 4, generator=g) > 0.5).tolist()))
    prompt = _ids(9, 5)
    params = DiffusionParams(max_new_tokens=C + 6, max_denoising_steps=STEPS, seed=1, sampler=sampler, logprobs=2,
                             stability_threshold=None)
    ref_tokens, canvases = _reference(model, prompt, DiffusionParams(**{**params.__dict__, "engine": "reference",
                                                                        "logprobs": None}), template)
    out = generate_diffusion(model, torch.tensor([prompt]), params, templates=[template])
    tokens, lps = out.tokens[0], out.logprobs[0]
    assert tokens == ref_tokens
    fixed = [i for i, t in enumerate(template) if t != FREE]
    assert [tokens[i] for i in fixed] == [template[i] for i in fixed]
    _check(lps, tokens, _expected(tokens, canvases, sampler, C), 2)
    assert all(lps[i].logprob < 0 for i in fixed)  # the model's value, not the clamp's point mass (0)


@pytest.fixture(scope="module")
def lm():
    from dgemma.api import load

    return load("random:tiny")


@pytest.mark.parametrize("sampler", ["entropy_bound", "confidence"])
def test_constrained_logprobs_are_the_raw_distribution_before_the_mask(lm, sampler):
    pytest.importorskip("llguidance")
    C = lm.model.config.canvas_length
    prompt = lm.tokenizer.encode("p q", add_bos=True)
    params = lm.defaults("diffusion", max_new_tokens=3 * C, seed=2, max_denoising_steps=STEPS, sampler=sampler,
                         grammar={"regex": "[a-z]{5,9}(-[0-9]{2})?"}, logprobs=2)
    ref_tokens, canvases = _reference(lm.model, prompt, DiffusionParams(**{**params.__dict__, "engine": "reference",
                                                                           "logprobs": None}), grammars=lm.grammars)
    out = generate_diffusion(lm.model, torch.tensor([prompt]), params, grammars=lm.grammars)
    tokens, lps = out.tokens[0], out.logprobs[0]
    assert tokens == ref_tokens and out.finish_reasons == ["stop"]  # the grammar's end: nothing more is reported
    _check(lps, tokens, _expected(tokens, canvases, sampler, C), 2)
    # a random model's argmax is rarely a letter: the grammar repaired tokens, reported under the model's
    # distribution (the more probable alternatives are tokens the grammar refused)
    assert any(lp.top[0][0] != lp.token_id for lp in lps)


def test_eos_is_cut_with_its_logprob():
    model = _model()
    prompt = _ids(10, 6)
    p = SamplingParams(max_new_tokens=20, max_denoising_steps=STEPS, seed=2, logprobs=1)
    first = _engine_run(model, [Request("a", prompt, p)])["a"]
    k = 6
    eos = first[0][k]
    cut = first[0].index(eos)
    got = _engine_run(model, [Request("a", prompt, p.with_(eos_token_ids=(eos,)))])["a"]
    assert got[0] == first[0][:cut] and len(got[1]) == cut
    assert all(abs(x.logprob - y.logprob) < TOL for x, y in zip(got[1], first[1]))


def test_api_and_cli_report_the_engines_numbers(lm, capsys):
    from dgemma.api import generate_text
    from dgemma.cli.main import main

    text = "def add(a, b):"
    kw = {"max_new_tokens": 12, "max_denoising_steps": STEPS, "seed": 0}
    r = generate_text(lm, [text], mode="diffusion", logprobs=2, **kw)[0]
    assert len(r.logprobs) == len(r.token_ids) > 0 and all(len(lp.top) == 2 for lp in r.logprobs)
    params = lm.defaults("diffusion", logprobs=2, **kw).sampling(0)
    prompt = lm.tokenizer.encode(text, add_bos=lm.tokenizer.add_bos_default)
    eng = _engine_run(lm.model, [Request("a", prompt, params)])["a"]
    assert eng[0] == r.token_ids and eng[1] == r.logprobs
    assert generate_text(lm, [text], mode="diffusion", **kw)[0].token_ids == r.token_ids  # same tokens without

    assert main(["generate", "--model", "random:tiny", "--logprobs", "2", "--format", "jsonl", "--max-new-tokens",
                 "12", "--steps", str(STEPS), "--seed", "0", "--stats", "none", text]) == 0
    row = json.loads(capsys.readouterr().out)
    assert [t["token_id"] for t in row["logprobs"]] == r.token_ids
    assert [t["logprob"] for t in row["logprobs"]] == [lp.logprob for lp in r.logprobs]
    assert [[(a["token_id"], a["logprob"]) for a in t["top"]] for t in row["logprobs"]] == [lp.top for lp in r.logprobs]
    assert all(t["token"] == lm.tokenizer.decode([t["token_id"]]) for t in row["logprobs"])


def test_bad_requests_are_refused(lm, capsys):
    from dgemma.api import generate_text
    from dgemma.cli.main import main

    too_many = SamplingParams(logprobs=MAX_LOGPROBS + 1)
    with pytest.raises(RequestError, match=f"logprobs must be in \\[0, {MAX_LOGPROBS}\\]"):
        too_many.validate()
    eng = Engine(_model(), EngineConfig(max_batch=1, max_model_len=128))
    with pytest.raises(RequestError, match="logprobs"):
        eng.add(Request("a", [1, 2], too_many))
    with pytest.raises(RequestError, match=str(MAX_LOGPROBS)):
        generate_text(lm, ["x"], logprobs=MAX_LOGPROBS + 1, max_new_tokens=4)
    with pytest.raises(GenerationError, match="compat"):
        generate_text(lm, ["x"], params=lm.defaults("diffusion", compat=True, logprobs=1))
    with pytest.raises(GenerationError, match="engine='fast'"):
        generate_text(lm, ["x"], params=lm.defaults("diffusion", engine="reference", logprobs=1))
    base = ["generate", "--model", "random:tiny", "--format", "jsonl", "--max-new-tokens", "4", "--steps", "2"]
    assert main([*base, "--logprobs", str(MAX_LOGPROBS + 1), "x"]) == 2
    assert f"[0, {MAX_LOGPROBS}]" in capsys.readouterr().err
    assert main([*base, "--logprobs", "1", "--compat", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compat" in err
