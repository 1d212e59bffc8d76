"""The batch-synchronous static-cache path (static.py: compat mode, the chunked sampler) against the reference."""

import itertools

import pytest
import torch
from helpers import random_model
from oracle import CONFIGS

from dgemma.bench.memtrack import track_memory
from dgemma.engine import static
from dgemma.engine.generate import ARParams, DiffusionParams, generate_ar, generate_diffusion
from dgemma.model import DiffusionGemma, init_weights
from dgemma.sampler import sample_step


def _model(name="tiny", seed=0, scale=0.5, dtype=torch.float32):
    return random_model(CONFIGS[name], seed, scale, dtype), CONFIGS[name]


def _prompt(cfg, B, T, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.bool)
    if B > 1 and pad:
        am[1, :pad] = False
        ids[1, :pad] = 0
    return ids, am


def _both(model, ids, am, make, gen=generate_diffusion, **kw):
    ref = gen(model, ids, make(engine="reference"), am, **kw)
    fast = gen(model, ids, make(engine="fast"), am, **kw)
    return ref, fast


@pytest.fixture
def small_span(monkeypatch):
    """Sliding buffers of W - 1 + 24 slots: they compact every few canvases (the prompts here are <= 24 tokens,
    so prefill stays one pass, as in the reference)."""
    monkeypatch.setattr(static, "PREFILL_SPAN", 24)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_compat_tokens_equal_reference(name, seed, small_span):
    model, cfg = _model(name, seed)
    ids, am = _prompt(cfg, 2, cfg.sliding_window + 5, pad=3, seed=seed)  # prompt longer than the window
    make = lambda **e: DiffusionParams(max_new_tokens=4 * cfg.canvas_length, max_denoising_steps=4, seed=seed,
                                       compat=True, **e)
    ref, fast = _both(model, ids, am, make)
    assert torch.equal(ref.sequences, fast.sequences)
    assert ref.stats.decoder_passes == fast.stats.decoder_passes


def test_confidence_sampler_commits_every_position_and_keeps_them():
    """Each canvas ends with all positions committed; a committed token never changes within its canvas, and the
    committed canvas is what the output holds."""
    model, cfg = _model("tiny", 1)
    ids, am = _prompt(cfg, 1, 6, seed=0)
    seen: dict[int, list] = {}
    params = DiffusionParams(max_new_tokens=2 * cfg.canvas_length, max_denoising_steps=4, seed=0, sampler="confidence",
                             commit_threshold=1.0)  # the quota alone: C/4 more per step

    def on_step(canvas_index, step, rows, shown, committed):
        seen.setdefault(canvas_index, []).append((shown[0].clone(), committed[0].clone()))

    out = generate_diffusion(model, ids, params, am, on_step=on_step)
    C = cfg.canvas_length
    for ci, states in seen.items():
        counts = [int(c.sum()) for _, c in states]
        assert counts == [-(-(i + 1) * C // 4) for i in range(4)]
        for (prev, pc), (cur, cc) in itertools.pairwise(states):
            assert bool((cc >= pc).all()) and torch.equal(cur[pc], prev[pc])
        assert states[-1][0].tolist() == out.tokens[0][ci * C:(ci + 1) * C]


def test_batch_one_and_stop_callback():
    model, cfg = _model("gqa4", 1)
    ids, am = _prompt(cfg, 1, 7, seed=4)
    make = lambda **e: DiffusionParams(max_new_tokens=2 * cfg.canvas_length + 5, max_denoising_steps=3, seed=1, **e)
    stop = lambda row, toks: 9 if len(toks) >= 9 else None
    ref, fast = _both(model, ids, am, make, stop_fn=stop)
    assert ref.tokens == fast.tokens and len(fast.tokens[0]) == 9


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("soft_from", ["raw", "proc"])
@pytest.mark.parametrize("method", ["multinomial", "inverse_cdf"])
def test_chunked_sampler_equals_sample_step(chunk, soft_from, method):
    model, cfg = _model("tiny", 0)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(3, cfg.canvas_length, cfg.vocab_size, generator=g) * 4
    canvas = torch.randint(0, cfg.vocab_size, (3, cfg.canvas_length), generator=g)
    temp = torch.tensor(0.6)
    ref = sample_step(raw / temp, canvas, 0.3, cfg.vocab_size, torch.Generator().manual_seed(1), method=method)
    new, argmax, accepted, h, soft = static.sample_chunked(raw, temp, canvas, 0.3, torch.Generator().manual_seed(1),
                                                           model, soft_from, chunk=chunk, method=method)
    assert torch.equal(new, ref.canvas) and torch.equal(argmax, ref.argmax) and torch.equal(accepted, ref.accepted)
    assert torch.equal(h, ref.token_entropy)
    expected = model.soft_embed(raw if soft_from == "raw" else raw / temp)
    assert torch.allclose(soft, expected, atol=1e-5, rtol=1e-5)


def test_chunked_sampler_holds_less_memory():
    """The reference step holds several [B, C, V] fp32 tensors at once; the chunked one only chunk-sized ones."""
    V = 8192
    cfg = CONFIGS["tiny"].replace(vocab_size=V)
    model = init_weights(DiffusionGemma(cfg), seed=0).eval()
    raw = torch.randn(8, cfg.canvas_length, V)
    canvas = torch.randint(0, V, (8, cfg.canvas_length))
    temp = torch.tensor(0.5)
    with torch.inference_mode():
        with track_memory() as ref:
            step = sample_step(raw / temp, canvas, 0.1, V, torch.Generator().manual_seed(0))
            model.soft_embed(raw)
        with track_memory() as fast:
            static.sample_chunked(raw, temp, canvas, 0.1, torch.Generator().manual_seed(0), model, "raw", chunk=16)
    logits_bytes = raw.numel() * 4
    assert ref.peak_bytes >= 2 * logits_bytes
    assert fast.peak_bytes < logits_bytes / 2
    assert step.canvas.shape == canvas.shape


def _compile_works() -> bool:
    try:
        torch.compile(lambda x: x + 1)(torch.ones(2))
        return True
    except Exception:  # noqa: BLE001 - any failure (no C++ toolchain for inductor, ...) means unavailable
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _compile_works(), reason="torch.compile is not available on this machine")
def test_compiled_engine_matches_eager():
    """Compiled passes fuse and reorder float math: compare their outputs with tolerances, then run both modes."""
    model, cfg = _model("wide", 1)
    ids, am = _prompt(cfg, 2, cfg.sliding_window + 3, pad=2, seed=0)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.inference_mode():
        for compiled in (False, True):
            eng = static.StaticPasses(model, compile=compiled)
            cache = static.StaticCache(model, 2, 64, cfg.canvas_length)
            h = eng.encode(cache, ids, am)
            logits = eng.denoise(cache, canvas, None, eng.decoder_masks(cache, cfg.canvas_length))
            outs.append((h, logits))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-3, rtol=1e-4)
    out = generate_diffusion(model, ids, DiffusionParams(max_new_tokens=2 * cfg.canvas_length, max_denoising_steps=3,
                                                         seed=0, compile=True), am)
    assert [len(t) for t in out.tokens] == [2 * cfg.canvas_length] * 2
    ar = generate_ar(model, ids, ARParams(max_new_tokens=12, compile=True), am)
    assert [len(t) for t in ar.tokens] == [12, 12]
