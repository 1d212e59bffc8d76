"""Generation: compat mode against transformers generate(), the default mode's guarantees, the AR baseline."""

import pytest
import torch
from helpers import random_model
from oracle import CONFIGS, dgemma_from_hf, hf_model

from dgemma.cache import KVCache
from dgemma.engine.generate import ARParams, DiffusionParams, GenerationError, generate_ar, generate_diffusion

pytest.importorskip("transformers")


def _prompt(cfg, B, T, pad, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    if B > 1 and pad:
        am[1, :pad] = 0
        ids[1, :pad] = 0
    return ids, am


def _both(hf, ours, ids, am, seed, **kw):
    torch.manual_seed(seed)
    ref = hf.generate(ids, attention_mask=am, **kw)
    params = DiffusionParams(max_new_tokens=kw["max_new_tokens"], max_denoising_steps=kw["max_denoising_steps"],
                             eos_token_ids=tuple(kw.get("eos_token_id") or ()) or None,
                             pad_token_id=kw.get("pad_token_id"), seed=seed, compat=True,
                             confidence_threshold=kw.get("confidence_threshold", 0.005),
                             stability_threshold=kw.get("stability_threshold", 1))
    return ref, generate_diffusion(ours, ids, params, am)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compat_is_token_identical_to_transformers(name, seed):
    cfg = CONFIGS[name]
    hf = hf_model(cfg, seed=seed + 10, scale=0.5)
    ours = dgemma_from_hf(hf, cfg)
    ids, am = _prompt(cfg, 2, cfg.sliding_window + 9, pad=4, seed=seed)  # prompt longer than the window
    kw = {"max_new_tokens": 2 * cfg.canvas_length + 3, "max_denoising_steps": 5}
    ref, out = _both(hf, ours, ids, am, seed, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    assert ref.sequences.shape[1] == ids.shape[1] + 3 * cfg.canvas_length  # the reference rounds up to canvases
    assert torch.allclose(ref.tokens_per_forward.double(), torch.tensor(out.stats.tokens_per_forward).double())


@pytest.mark.parametrize("name", ["tiny", "gqa4"])
def test_compat_with_eos_inside_a_canvas(name):
    cfg = CONFIGS[name]
    hf = hf_model(cfg, seed=21, scale=0.5)
    ours = dgemma_from_hf(hf, cfg)
    ids, am = _prompt(cfg, 2, 12, pad=3, seed=5)
    kw = {"max_new_tokens": 3 * cfg.canvas_length, "max_denoising_steps": 4}
    _, free = _both(hf, ours, ids, am, 7, **kw)
    eos = int(free.sequences[0, ids.shape[1] + 3])  # a token row 0 produces mid-canvas
    ref, out = _both(hf, ours, ids, am, 7, eos_token_id=[eos], pad_token_id=0, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    new = out.sequences[0, ids.shape[1]:]
    first = (new == eos).nonzero()[0, 0].item()
    assert first <= 3 and (new[first + 1:] == 0).all()  # padded after the first EOS
    assert out.finish_reasons[0] == "stop"
    assert torch.allclose(ref.tokens_per_forward.double(), torch.tensor(out.stats.tokens_per_forward).double())


THRESHOLD = 1.6  # chosen so rows stop at different steps (12-14 of 20)


def test_compat_adaptive_stopping_fires_with_confident_weights():
    cfg = CONFIGS["tiny"]
    hf = hf_model(cfg, seed=2, scale=3.0)  # large weights: peaky logits, argmax canvases settle early
    ours = dgemma_from_hf(hf, cfg)
    ids, am = _prompt(cfg, 2, 10, pad=2, seed=1)
    # random weights are never confident at 0.005 nats nor stable; with stability off (0) and a looser
    # threshold the mean entropy, which falls as the temperature does, stops rows at different steps
    ref, out = _both(hf, ours, ids, am, 3, max_new_tokens=cfg.canvas_length * 2, max_denoising_steps=20,
                     confidence_threshold=THRESHOLD, stability_threshold=0)
    assert torch.equal(ref.sequences, out.sequences)
    steps = [s for row in out.stats.steps_per_canvas for s in row]
    assert 1 < min(steps) < 20


def _model(name="tiny", seed=0, scale=0.5):
    return random_model(CONFIGS[name], seed, scale), CONFIGS[name]


def test_default_mode_returns_exactly_max_new_tokens():
    model, cfg = _model()
    ids, am = _prompt(cfg, 2, 9, pad=3, seed=0)
    for n in (1, 5, cfg.canvas_length, cfg.canvas_length + 3):
        out = generate_diffusion(model, ids, DiffusionParams(max_new_tokens=n, max_denoising_steps=3, seed=0), am)
        assert [len(t) for t in out.tokens] == [n, n]
        assert out.finish_reasons == ["length", "length"]


def test_default_mode_cuts_at_eos_and_drops_finished_rows():
    model, cfg = _model()
    ids, am = _prompt(cfg, 2, 9, pad=3, seed=0)
    base = DiffusionParams(max_new_tokens=3 * cfg.canvas_length, max_denoising_steps=3, seed=4)
    free = generate_diffusion(model, ids, base, am)
    eos = free.tokens[0][5]
    p = DiffusionParams(**{**base.__dict__, "eos_token_ids": (eos,)})
    out = generate_diffusion(model, ids, p, am)
    first = free.tokens[0].index(eos)
    assert out.tokens[0] == free.tokens[0][:first]
    assert out.finish_reasons[0] == "stop"
    # the row that stopped in its first canvas took no passes in later canvases
    assert len(out.stats.steps_per_canvas[0]) == 1
    if out.finish_reasons[1] == "length":
        assert len(out.stats.steps_per_canvas[1]) == 3
        assert out.stats.decoder_passes[0] < out.stats.decoder_passes[1]


def test_default_mode_stop_callback_and_seed():
    model, cfg = _model()
    ids, _ = _prompt(cfg, 1, 9, pad=0, seed=0)
    p = DiffusionParams(max_new_tokens=40, max_denoising_steps=3, seed=11)
    a = generate_diffusion(model, ids, p)
    b = generate_diffusion(model, ids, p)
    assert a.tokens == b.tokens  # seeded
    cut = generate_diffusion(model, ids, p, stop_fn=lambda row, toks: 7 if len(toks) >= 7 else None)
    assert cut.tokens[0] == a.tokens[0][:7] and cut.finish_reasons == ["stop"]


def test_bad_parameters_are_clear_errors():
    model, cfg = _model()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate_diffusion(model, ids, DiffusionParams(max_new_tokens=0))
    with pytest.raises(GenerationError, match="t_min"):
        generate_diffusion(model, ids, DiffusionParams(t_min=0.9, t_max=0.5))
    with pytest.raises(GenerationError, match="outside"):
        generate_diffusion(model, torch.tensor([[cfg.vocab_size + 5]]), DiffusionParams())
    with pytest.raises(GenerationError, match="left padding"):
        generate_diffusion(model, ids, DiffusionParams(), torch.tensor([[1, 1, 0]]))
    with pytest.raises(GenerationError, match="top_p"):
        generate_ar(model, ids, ARParams(top_p=1.5))
    with pytest.raises(GenerationError, match="sampler must be one of .* 'greedy'"):
        generate_diffusion(model, ids, DiffusionParams(sampler="greedy"))
    with pytest.raises(GenerationError, match="default mode"):
        generate_diffusion(model, ids, DiffusionParams(sampler="confidence", compat=True))
    with pytest.raises(GenerationError, match="commit_threshold"):
        generate_diffusion(model, ids, DiffusionParams(sampler="confidence", commit_threshold=0))


def test_params_from_generation_config():
    g = {"max_denoising_steps": 6, "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.3},
         "t_min": 0.2, "t_max": 0.5, "eos_token_id": [1, 6], "pad_token_id": 0,
         "dgemma": {"sampler": "confidence", "commit_threshold": 0.8}}
    p = DiffusionParams.from_generation_config(g, max_new_tokens=40, t_min=None, seed=3)
    assert (p.max_denoising_steps, p.entropy_bound, p.t_min, p.t_max) == (6, 0.3, 0.2, 0.5)
    assert (p.eos_token_ids, p.pad_token_id, p.sampler, p.commit_threshold) == ((1, 6), 0, "confidence", 0.8)
    assert (p.max_new_tokens, p.seed) == (40, 3)  # overrides win; an override of None keeps the file's value
    assert DiffusionParams.from_generation_config(None) == DiffusionParams()
    assert DiffusionParams.from_generation_config({"eos_token_id": 1}).eos_token_ids == (1,)
    with pytest.raises(GenerationError, match="must be JSON objects"):
        DiffusionParams.from_generation_config({"dgemma": "confidence"})


def test_ar_cached_logits_equal_uncached():
    model, cfg = _model("gqa4", seed=2)
    ids, _ = _prompt(cfg, 1, 6, pad=0, seed=3)
    out = generate_ar(model, ids, ARParams(max_new_tokens=3 * cfg.sliding_window))  # past the window
    full = torch.cat([ids, torch.tensor([out.tokens[0]])], dim=1)
    with torch.no_grad():
        ref_logits = model.logits(model.encode(full))  # one uncached causal pass
        cache = KVCache.empty(cfg)
        steps = [model.logits(model.encode(full[:, :6], cache))[:, -1]]
        for t in range(6, full.shape[1] - 1):
            steps.append(model.logits(model.encode(full[:, t:t + 1], cache))[:, -1])
    got = torch.stack(steps, dim=1)
    assert torch.allclose(got, ref_logits[:, 5:-1], atol=1e-4)
    assert torch.equal(got.argmax(-1)[0], torch.tensor(out.tokens[0]))  # greedy follows the argmax


def test_ar_batch_equals_singles_and_eos():
    model, _ = _model(seed=3)
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11]])
    batch = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]])
    am = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    p = ARParams(max_new_tokens=12)
    both = generate_ar(model, batch, p, am)
    assert both.tokens == [generate_ar(model, a, p).tokens[0], generate_ar(model, b, p).tokens[0]]
    eos = both.tokens[0][4]
    stopped = generate_ar(model, a, ARParams(max_new_tokens=12, eos_token_ids=(eos,)))
    assert stopped.tokens[0] == both.tokens[0][:both.tokens[0].index(eos)]
    assert stopped.finish_reasons == ["stop"]
    s1 = generate_ar(model, a, ARParams(max_new_tokens=8, temperature=1.0, top_k=20, seed=3))
    s2 = generate_ar(model, a, ARParams(max_new_tokens=8, temperature=1.0, top_k=20, seed=3))
    assert s1.tokens == s2.tokens
