"""The training objective: corruption, block-diagonal masks equal to the inference geometry, self-conditioning,
losses and evaluation. Tiny random models on the CPU, fp32."""

import pytest
import torch
import torch.nn.functional as F

from dgemma.cache import KVCache
from dgemma.config import FULL, SLIDING, preset
from dgemma.model import DiffusionGemma, init_weights
from dgemma.train.objective import (
    ObjectiveError,
    corrupt,
    denoise_all_canvases,
    encode_clean,
    evaluate_losses,
    inference_visibility,
    sample_noise,
    training_losses,
    training_masks,
)


def tiny_model(seed: int = 0, **changes) -> DiffusionGemma:
    cfg = preset("tiny").replace(**changes) if changes else preset("tiny")
    # std 0.2: large enough that attention is far from uniform, so a wrong mask changes the logits visibly
    return init_weights(DiffusionGemma(cfg), std=0.2, seed=seed).eval()


def batch(B: int, T: int, V: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Noise
def test_corrupt_rate_and_extremes():
    x = batch(4, 4096, 256)
    t = torch.tensor([0.0, 0.25, 0.75, 1.0])
    noisy, mask = corrupt(x, t, 256, torch.Generator().manual_seed(1))
    assert not mask[0].any() and torch.equal(noisy[0], x[0])
    assert mask[3].all()
    rate = mask.float().mean(1)
    assert abs(rate[1] - 0.25) < 0.03 and abs(rate[2] - 0.75) < 0.03
    assert torch.equal(noisy[~mask], x[~mask])
    # replacements are uniform over the vocabulary: about 1/256 of them equal the clean token
    assert (noisy[3] == x[3]).float().mean() < 0.02
    assert noisy.min() >= 0 and noisy.max() < 256


def test_per_row_generators_make_noise_independent_of_the_batch():
    x = batch(6, 64, 256)
    full = sample_noise(x, 256, gens(6, base=100))
    part = sample_noise(x[2:4], 256, gens(2, base=102))
    for field in ("t", "noisy", "corrupted", "sc_mask"):
        assert torch.equal(getattr(full, field)[2:4], getattr(part, field))
    with pytest.raises(ObjectiveError, match="one per row"):
        sample_noise(x, 256, gens(5))


def test_sample_noise_ranges():
    x = batch(4000, 1, 256)
    noise = sample_noise(x, 256, torch.Generator().manual_seed(0), eps=1e-3)
    assert noise.t.min() >= 1e-3 and noise.t.max() < 1
    assert abs(noise.t.mean() - 0.5) < 0.02
    assert abs(noise.sc_mask.float().mean() - 0.5) < 0.03
    assert not sample_noise(x, 256, torch.Generator().manual_seed(0), sc_prob=0.0).sc_mask.any()


# ---------------------------------------------------------------------------------------------------------------
# Masks
@pytest.mark.parametrize("window", [16, 40, 1000])
def test_training_masks_equal_inference_visibility(window):
    cfg = preset("tiny").replace(sliding_window=window)
    C, k = cfg.canvas_length, 4
    T = k * C
    masks = training_masks(cfg, T)
    for layer, layer_type in enumerate(cfg.layer_types):
        m = masks[layer_type][0, 0]  # [T, 2T]
        assert m.shape == (T, 2 * T)
        assert m.any(dim=1).all()  # no query row is fully masked
        for j in range(k):
            rows = m[j * C:(j + 1) * C]
            assert (rows == rows[0]).all()  # every query of a canvas sees the same keys (bidirectional)
            clean, canvas = rows[0, :T], rows[0, T:]
            want_clean = torch.zeros(T, dtype=torch.bool)
            want_clean[:j * C] = inference_visibility(cfg, layer, j * C)
            assert torch.equal(clean, want_clean), (layer_type, j)
            want_canvas = torch.zeros(T, dtype=torch.bool)
            want_canvas[j * C:(j + 1) * C] = True
            assert torch.equal(canvas, want_canvas)
    sliding = masks[SLIDING][0, 0, 3 * C, :T]
    assert int(sliding.sum()) == min(window - 1, 3 * C)  # the inference cache keeps the last W - 1 positions
    assert int(masks[FULL][0, 0, 3 * C, :T].sum()) == 3 * C


def test_training_masks_reject_partial_canvases():
    with pytest.raises(ObjectiveError, match="multiple of canvas_length"):
        training_masks(preset("tiny"), 40)


@pytest.mark.parametrize("with_sc", [False, True])
def test_training_pass_equals_inference_for_every_canvas(with_sc):
    """All canvases denoised in one block-diagonal pass == each canvas denoised the inference way
    (sliding cache of W - 1 positions after encoding its clean prefix), fp32, within 1e-5."""
    model = tiny_model()
    cfg = model.config
    C, k, V = cfg.canvas_length, 4, cfg.vocab_size
    assert k * C > 2 * cfg.sliding_window  # the window really cuts the prefix
    x = batch(2, k * C, V, seed=1)
    noisy = batch(2, k * C, V, seed=2)
    sc = torch.randn(2, k * C, V, generator=torch.Generator().manual_seed(3)) * 3 if with_sc else None
    sc_mask = torch.tensor([1.0, 0.0]) if with_sc else None
    with torch.no_grad():
        hidden, cache = encode_clean(model, x)
        train_logits = model.logits(denoise_all_canvases(model, noisy, cache, training_masks(cfg, k * C),
                                                         sc_logits=sc, sc_mask=sc_mask))
        for j in range(k):
            inf_cache = KVCache.empty(cfg)
            if j:
                model.encode(x[:, :j * C], inf_cache)
            part = slice(j * C, (j + 1) * C)
            ref = model.denoise(noisy[:, part], inf_cache, None if sc is None else sc[:, part], sc_mask=sc_mask)
            torch.testing.assert_close(train_logits[:, part], ref, atol=1e-5, rtol=0)
        # and the encoder's AR logits over the whole sequence match encoding it in pieces at inference
        inf_cache = KVCache.empty(cfg)
        pieces = [model.encode(x[:, j * C:(j + 1) * C], inf_cache) for j in range(k)]
        torch.testing.assert_close(hidden, torch.cat(pieces, dim=1), atol=1e-5, rtol=0)


def test_training_masks_differ_from_plain_bidirectional():
    """Guards the equivalence test above: without the block structure the canvases would see each other."""
    model = tiny_model()
    cfg = model.config
    x, noisy = batch(1, 2 * cfg.canvas_length, cfg.vocab_size, 1), batch(1, 2 * cfg.canvas_length, cfg.vocab_size, 2)
    with torch.no_grad():
        _, cache = encode_clean(model, x)
        blocked = denoise_all_canvases(model, noisy, cache, training_masks(cfg, x.shape[1]))
        full = {t: torch.ones_like(m) for t, m in training_masks(cfg, x.shape[1]).items()}
        leaky = denoise_all_canvases(model, noisy, cache, full)
    assert (blocked - leaky).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Self-conditioning and losses
def test_self_conditioning_off_equals_no_logits():
    model = tiny_model()
    cfg = model.config
    x = batch(3, 2 * cfg.canvas_length, cfg.vocab_size)
    noisy = batch(3, 2 * cfg.canvas_length, cfg.vocab_size, seed=5)
    sc = torch.randn(3, x.shape[1], cfg.vocab_size) * 5
    masks = training_masks(cfg, x.shape[1])
    with torch.no_grad():
        _, cache = encode_clean(model, x)
        none = denoise_all_canvases(model, noisy, cache, masks)
        off = denoise_all_canvases(model, noisy, cache, masks, sc_logits=sc, sc_mask=torch.zeros(3))
        on = denoise_all_canvases(model, noisy, cache, masks, sc_logits=sc, sc_mask=torch.ones(3))
    assert torch.equal(none, off)
    assert (none - on).abs().max() > 1e-3
    # the same at the loss level: switches all off == pass 1 skipped
    noise = sample_noise(x, cfg.vocab_size, gens(3))
    noise.sc_mask = torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        a = training_losses(model, x, noise)
        b = training_losses(model, x, noise, self_conditioning=False)
    assert torch.equal(a.total, b.total)


def reference_losses(model, x, noise, loss_mask):
    """The objective written out plainly: encoder CE, pass 1 under no_grad, pass 2 with per-example SC."""
    cfg = model.config
    hidden, cache = encode_clean(model, x)
    ar = F.cross_entropy(model.logits(hidden[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
    ar = (ar * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
    masks = training_masks(cfg, x.shape[1])
    with torch.no_grad():
        sc = model.logits(denoise_all_canvases(model, noise.noisy, cache, masks))
    dec = denoise_all_canvases(model, noise.noisy, cache, masks, sc_logits=sc, sc_mask=noise.sc_mask.float())
    diff = F.cross_entropy(model.logits(dec).transpose(1, 2), x, reduction="none")
    return (diff * loss_mask).sum() / loss_mask.sum(), ar


def test_training_losses_match_reference_and_chunking():
    model = tiny_model()
    cfg = model.config
    x = batch(3, 2 * cfg.canvas_length, cfg.vocab_size)
    noise = sample_noise(x, cfg.vocab_size, gens(3))
    noise.sc_mask = torch.tensor([True, False, True])
    loss_mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) < 0.7
    want_diff, want_ar = reference_losses(model, x, noise, loss_mask)

    def run(chunk):
        model.zero_grad()
        losses = training_losses(model, x, noise, ar_weight=0.5, loss_mask=loss_mask, ce_chunk=chunk)
        losses.total.backward()
        return losses, {n: p.grad.clone() for n, p in model.named_parameters()}

    one, grads_one = run(0)
    chunked, grads_chunked = run(17)
    torch.testing.assert_close(one.diffusion, want_diff, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.ar, want_ar, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.total, one.diffusion + 0.5 * one.ar)
    assert one.diffusion_count == int(loss_mask.sum()) and one.ar_count == int(loss_mask[:, 1:].sum())
    torch.testing.assert_close(one.diffusion_sum, one.diffusion.detach() * one.diffusion_count)
    torch.testing.assert_close(chunked.total, one.total, atol=1e-5, rtol=1e-5)
    for name in grads_one:
        torch.testing.assert_close(grads_chunked[name], grads_one[name], atol=1e-5, rtol=1e-4)
    # self-conditioning parameters get gradients only through pass 2 (they are unused when SC is off everywhere)
    assert grads_one["self_conditioning.gate_proj.weight"].abs().sum() > 0


def test_pass_one_with_autograd_recorded_changes_nothing():
    """sc_graph (train --compile) runs pass 1 with autograd recording, then detaches its logits: the losses and every
    gradient are bit-identical to pass 1 under no_grad, and nothing flows back through pass 1."""
    model = tiny_model()
    cfg = model.config
    x = batch(3, 2 * cfg.canvas_length, cfg.vocab_size)
    noise = sample_noise(x, cfg.vocab_size, gens(3))
    noise.sc_mask = torch.tensor([True, False, True])

    def run(sc_graph):
        model.zero_grad()
        losses = training_losses(model, x, noise, sc_graph=sc_graph)
        losses.total.backward()
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (plain, g_plain), (graph, g_graph) = run(False), run(True)
    assert torch.equal(plain.total, graph.total) and torch.equal(plain.diffusion, graph.diffusion)
    assert g_plain.keys() == g_graph.keys() and len(g_plain) > 0
    for name in g_plain:
        assert torch.equal(g_plain[name], g_graph[name]), name


def test_unsupervised_positions_do_not_matter():
    model = tiny_model()
    cfg = model.config
    x = batch(2, 2 * cfg.canvas_length, cfg.vocab_size)
    loss_mask = torch.ones_like(x, dtype=torch.bool)
    loss_mask[:, -5:] = False
    noise = sample_noise(x, cfg.vocab_size, gens(2))
    a = training_losses(model, x, noise, loss_mask=loss_mask)
    # changing the target of the last (unsupervised, never attended-to-from-earlier) position changes nothing
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % cfg.vocab_size
    b = training_losses(model, x2, noise, loss_mask=loss_mask)
    torch.testing.assert_close(a.ar, b.ar)
    torch.testing.assert_close(a.diffusion, b.diffusion)
    c = training_losses(model, x2, noise)
    assert not torch.allclose(a.diffusion, c.diffusion)


def test_batch_errors():
    model = tiny_model()
    cfg = model.config
    x = batch(1, 40, cfg.vocab_size)
    with pytest.raises(ObjectiveError, match="multiple of the model's canvas_length"):
        training_losses(model, x, sample_noise(x, cfg.vocab_size, gens(1)))
    x = batch(1, cfg.canvas_length, cfg.vocab_size)
    x[0, 3] = cfg.vocab_size + 7
    with pytest.raises(ObjectiveError, match="outside the model's vocabulary"):
        training_losses(model, x, sample_noise(x, cfg.vocab_size, gens(1)))


def test_gradients_reach_the_encoder_through_the_cache():
    """Diffusion loss alone (ar_weight 0) still trains the clean-prefix K/V: the cache is part of the graph."""
    model = tiny_model()
    cfg = model.config
    x = batch(2, 2 * cfg.canvas_length, cfg.vocab_size)
    noise = sample_noise(x, cfg.vocab_size, gens(2))
    x_other = x.clone()
    x_other[:, :cfg.canvas_length] = batch(2, cfg.canvas_length, cfg.vocab_size, seed=7)
    a = training_losses(model, x, noise, ar_weight=0.0)
    b = training_losses(model, x_other, noise, ar_weight=0.0)
    assert not torch.allclose(a.diffusion, b.diffusion)  # canvas 1's loss depends on the clean canvas 0
    a.total.backward()
    assert model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
def test_evaluate_losses():
    model = tiny_model()
    cfg = model.config
    x = batch(2, 2 * cfg.canvas_length, cfg.vocab_size)
    a = evaluate_losses(model, x, [0.0, 0.5, 1.0], torch.Generator().manual_seed(0))
    b = evaluate_losses(model, x, [0.0, 0.5, 1.0], torch.Generator().manual_seed(0))
    assert a == b  # deterministic for a given generator
    noise = sample_noise(x, cfg.vocab_size, gens(2))
    with torch.no_grad():
        train = training_losses(model, x, noise)
    assert a.ar_nll == pytest.approx(float(train.ar), rel=1e-5)
    assert a.ar_count == x.numel() - 2 and a.diffusion_count == x.numel()
    # without self-conditioning, t = 0 is an uncorrupted training pass
    c = evaluate_losses(model, x, [0.0], torch.Generator(), self_condition=False)
    noise.noisy, noise.sc_mask = x.clone(), torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        clean = training_losses(model, x, noise)
    assert c.diffusion(0.0) == pytest.approx(float(clean.diffusion), rel=1e-5)
    total = a + b
    assert total.diffusion(0.5) == pytest.approx(a.diffusion(0.5)) and total.ar_count == 2 * a.ar_count
