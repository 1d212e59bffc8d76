"""Canvas templates and infilling: fixed output positions clamped at every denoising step.

The engine (engine.py) against its slow twin (generate.py's reference loop, which clamps the logits with
sampler.clamp_fixed), bit for bit; clamped positions never change in any draft; a template without holes returns
itself; EOS inside a template's span is filler, not the end."""

import pytest
import torch
from oracle import CONFIGS

from dgemma.engine.engine import Engine
from dgemma.engine.generate import ARParams, DiffusionParams, generate_ar, generate_diffusion
from dgemma.model import DiffusionGemma, init_weights
from dgemma.params import EngineConfig, Request, RequestError, SamplingParams
from dgemma.sampler import FREE, clamp_fixed, entropy


def _model(name="tiny", seed=0, scale=0.5):
    cfg = CONFIGS[name]
    return init_weights(DiffusionGemma(cfg), std=scale, seed=seed).eval(), cfg


def _ids(cfg, n, seed):
    return torch.randint(5, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _template(cfg, n, seed, fill=0.5):
    """n positions, about `fill` of them fixed to random tokens, the rest FREE."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(5, cfg.vocab_size, (n,), generator=g)
    free = torch.rand(n, generator=g) > fill
    return tuple(FREE if f else int(t) for t, f in zip(toks.tolist(), free.tolist()))


DIFFUSION = {"max_denoising_steps": 4}


def _one_shot(model, prompts, templates, engine, mode="diffusion", **kw):
    x = torch.tensor(prompts)
    if mode == "ar":
        return generate_ar(model, x, ARParams(engine=engine, **kw), templates=templates)
    return generate_diffusion(model, x, DiffusionParams(engine=engine, **DIFFUSION, **kw), templates=templates)


@pytest.mark.parametrize("sampler", ["entropy_bound", "confidence"])
def test_engine_equals_reference_with_templates(sampler):
    model, cfg = _model()
    C = cfg.canvas_length
    prompts = [_ids(cfg, 6, s) for s in range(3)]
    templates = [_template(cfg, 2 * C + 3, 10), None, _template(cfg, C // 2, 11, fill=0.8)]
    kw = {"max_new_tokens": 2 * C + 5, "seed": 3, "sampler": sampler, "stability_threshold": None}
    for prompt, t in zip(prompts, templates):  # alone: the reference draws one stream for its whole batch
        ref = _one_shot(model, [prompt], [t], "reference", **kw)
        fast = _one_shot(model, [prompt], [t], "fast", **kw)
        assert fast.tokens == ref.tokens
        assert fast.stats.steps_per_canvas == ref.stats.steps_per_canvas
        assert all(ref.tokens[0][i] == x for i, x in enumerate(t or ()) if x != FREE)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_ar_emits_fixed_positions_and_equals_reference(temperature):
    model, cfg = _model()
    prompts = [_ids(cfg, 5, 1), _ids(cfg, 5, 2)]
    templates = [_template(cfg, 9, 20), (FREE, FREE, 7)]
    kw = {"max_new_tokens": 12, "temperature": temperature, "seed": 5}
    got = []
    for prompt, t in zip(prompts, templates):
        ref = _one_shot(model, [prompt], [t], "reference", mode="ar", **kw)
        assert _one_shot(model, [prompt], [t], "fast", mode="ar", **kw).tokens == ref.tokens
        got.append(ref.tokens[0])
    assert got[1][2] == 7 and all(got[0][i] == x for i, x in enumerate(templates[0]) if x != FREE)


def test_clamped_positions_never_change_in_any_draft():
    model, cfg = _model()
    C = cfg.canvas_length
    template = _template(cfg, C, 30, fill=0.4)
    eng = Engine(model, EngineConfig(max_batch=2))
    eng.add(Request("t", _ids(cfg, 4, 3), SamplingParams(max_new_tokens=C, seed=1, drafts=True, template=template,
                                                           max_denoising_steps=6, stability_threshold=None)))
    eng.add(Request("u", _ids(cfg, 4, 4), SamplingParams(max_new_tokens=C, seed=2, drafts=True,
                                                           max_denoising_steps=6, stability_threshold=None)))
    drafts, out = [], []
    while eng.has_work():
        for ev in eng.step():
            if ev.request_id == "t":
                if ev.draft is not None:
                    drafts.append(ev.draft)
                out += ev.new_ids
    fixed = [i for i, x in enumerate(template) if x != FREE]
    assert len(drafts) == 6 and fixed
    for d in drafts:
        assert [d.ids[i] for i in fixed] == [template[i] for i in fixed]
        assert all(d.accepted[i] for i in fixed)  # certain: accepted at every step
        assert all(d.entropy[i] == 0.0 for i in fixed)
    assert [out[i] for i in fixed] == [template[i] for i in fixed]


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_a_template_without_holes_returns_itself_even_with_eos_inside(mode):
    model, cfg = _model()
    C = cfg.canvas_length
    eos = 1
    template = tuple(_ids(cfg, C + 3, 40)[:C] + [eos] + [9, 10])  # EOS inside the span: filler, not the end
    for engine in ("fast", "reference"):
        out = _one_shot(model, [_ids(cfg, 4, 0)], [template], engine, mode=mode, max_new_tokens=len(template),
                        eos_token_ids=(eos,), seed=0)
        assert tuple(out.tokens[0]) == template
        assert out.finish_reasons == ["length"]


def test_without_templates_the_tokens_are_unchanged():
    model, cfg = _model()
    prompts = [_ids(cfg, 6, 8)]
    kw = {"max_new_tokens": cfg.canvas_length + 2, "seed": 4}
    assert (_one_shot(model, prompts, None, "fast", **kw).tokens
            == _one_shot(model, prompts, [None], "fast", **kw).tokens
            == _one_shot(model, prompts, [(FREE,) * 3], "fast", **kw).tokens)


def test_clamp_fixed_is_a_point_mass_with_zero_entropy():
    logits = torch.randn(2, 5, 11) * 3
    fixed = torch.tensor([[FREE, 3, FREE, 0, FREE], [FREE] * 5])
    out = clamp_fixed(logits, fixed)
    h = entropy(out)
    assert h[0, 1] == 0.0 and h[0, 3] == 0.0
    assert torch.equal(out[1], logits[1]) and torch.equal(out[0, 0], logits[0, 0])
    assert out[0, 1].argmax() == 3 and torch.softmax(out[0, 1], -1)[3] == 1.0


def test_bad_templates_are_clear_errors():
    model, cfg = _model()
    with pytest.raises(RequestError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=2, template=(1, 2, 3)).validate()
    with pytest.raises(RequestError, match="-1"):
        SamplingParams(max_new_tokens=4, template=(1, -2)).validate()
    with pytest.raises(RequestError, match="vocabulary"):
        Engine(model, EngineConfig(max_batch=1)).add(
            Request("x", [5], SamplingParams(max_new_tokens=4, template=(cfg.vocab_size,))))
    with pytest.raises(RequestError, match="one per prompt"):
        _one_shot(model, [_ids(cfg, 3, 0)], [None, None], "fast", max_new_tokens=4)
    with pytest.raises(RequestError, match="compat"):
        generate_diffusion(model, torch.tensor([_ids(cfg, 3, 0)]), DiffusionParams(compat=True, max_new_tokens=4),
                           templates=[(1,)])


# ---------------------------------------------------------------------------------------------------------------
# The template syntax (dgemma/template.py)
class _CharTokenizer:
    """One token per character (ids = code points), enough to check positions."""

    def encode(self, text, add_bos=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_template_syntax_places_fixed_text_and_holes():
    from dgemma.template import encode, fill_ids, hole_texts, parse, with_suffix

    assert parse("ab{{3}}c") == ["ab", 3, "c"]
    assert parse("{{ 2 }}") == [2]
    assert parse("x \\{{y}} z") == ["x {{y}} z"]  # an escaped opening is literal text
    assert parse("no holes") == ["no holes"]
    tok = _CharTokenizer()
    t = encode(tok, "ab{{3}}c")
    assert t.ids == (97, 98, FREE, FREE, FREE, 99) and t.holes == ((2, 5),)
    # filler (here id 0) inside a hole is dropped; the same id outside a hole stays
    assert fill_ids([97, 98, 120, 0, 0, 99, 0], t, {0}) == [97, 98, 120, 99, 0]
    assert hole_texts(tok, [97, 98, 120, 0, 121, 99], t, {0}) == ["xy"]
    s = with_suffix(tok, "END", 4)
    assert s.ids == (FREE,) * 4 + (69, 78, 68) and s.holes == ((0, 4),)


@pytest.mark.parametrize("text, message", [
    ("a{{3", "not closed"), ("a{{}}b", "{{N}}"), ("{{x}}", "{{N}}"), ("{{0}}", "must be in"),
    ("{{99999}}", "must be in"), ("", "empty")])
def test_template_syntax_errors_say_where_and_how(text, message):
    from dgemma.template import TemplateError, encode

    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("}", r"\}")):
        encode(_CharTokenizer(), text)


def test_generate_cli_template_and_suffix(capsys):
    """The CLI and the API: the fixed text comes back as it stands, the holes filled; bad syntax is exit 2."""
    import json

    from dgemma.cli.main import main

    assert main(["generate", "--model", "random:tiny", "--template", "x = {{5}} # done", "--format", "jsonl",
                 "--stats", "none", "--seed", "0", "a"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["text"].startswith("x =") and row["text"].endswith(" # done") and len(row["holes"]) == 1
    assert row["holes"][0] in row["text"]
    for mode in ("diffusion", "ar"):
        assert main(["generate", "--model", "random:tiny", "--suffix", " THE END", "--max-new-tokens", "6",
                     "--mode", mode, "--stats", "none", "--seed", "1", "b"]) == 0
        assert capsys.readouterr().out.endswith(" THE END")
    for bad in (["--template", "{{x}}"], ["--template", "a{{3"], ["--template", "{{2}}", "--suffix", "z"]):
        assert main(["generate", "--model", "random:tiny", *bad, "c"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
