"""Oracle and equivalence tests for the model: dgemma vs transformers 5.23.0 at tiny random sizes."""

import pytest
import torch
from oracle import CONFIGS, dgemma_from_hf, hf_model

from dgemma.cache import KVCache
from dgemma.model import DiffusionGemma, init_weights

pytest.importorskip("transformers")


def _hf_encode_decode(hf, ids, am, canvas, sc):
    from transformers import DynamicCache

    pkv = DynamicCache(config=hf.config.text_config)
    enc = hf.model.encoder(input_ids=ids, attention_mask=am, past_key_values=pkv, use_cache=True).last_hidden_state
    dam = torch.cat([am, torch.ones(am.shape[0], canvas.shape[1], dtype=am.dtype)], dim=1)
    logits = hf(decoder_input_ids=canvas, past_key_values=pkv, self_conditioning_logits=sc,
                decoder_attention_mask=dam).logits
    return enc, logits


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("with_sc", [False, True])
def test_encoder_and_decoder_match_transformers(name, with_sc):
    cfg = CONFIGS[name]
    hf = hf_model(cfg, seed=3)
    ours = dgemma_from_hf(hf, cfg)
    g = torch.Generator().manual_seed(0)
    B, T = 2, 2 * cfg.sliding_window + 5  # prompt longer than the sliding window
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, :7] = 0  # left padding
    canvas = torch.randint(0, cfg.vocab_size, (B, cfg.canvas_length), generator=g)
    sc = torch.randn(B, cfg.canvas_length, cfg.vocab_size, generator=g) * 3 if with_sc else None
    with torch.no_grad():
        ref_h, ref_logits = _hf_encode_decode(hf, ids, am, canvas, sc)
        cache = KVCache.empty(cfg)
        h = ours.encode(ids, cache, am)
        logits = ours.denoise(canvas, cache, sc)
    valid = am.bool()
    assert (h - ref_h)[valid].abs().max() < 1e-4
    assert (logits - ref_logits).abs().max() < 1e-4
    assert logits.dtype == torch.float32 and logits.abs().max() <= 30.0  # soft-capped


def test_bf16_matches_transformers_bf16():
    cfg = CONFIGS["tiny"]
    hf = hf_model(cfg, seed=5).to(torch.bfloat16)
    ours = dgemma_from_hf(hf, cfg).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=torch.Generator().manual_seed(2))
    am = torch.ones(1, 20, dtype=torch.long)
    sc = torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, ref = _hf_encode_decode(hf, ids, am, canvas, sc.to(torch.bfloat16))
        cache = KVCache.empty(cfg)
        ours.encode(ids, cache)
        got = ours.denoise(canvas, cache, sc.to(torch.bfloat16))
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 1e-2  # same bf16 operations; allow kernel-level rounding differences


def _random_model(name="tiny", seed=0):
    cfg = CONFIGS[name]
    return init_weights(DiffusionGemma(cfg), std=0.3, seed=seed).eval(), cfg


@pytest.mark.parametrize("chunks", [[1] * 45, [7, 30, 8], [16, 16, 13], [45]])
def test_chunked_encode_equals_one_shot(chunks):
    """The cache stays right when the context outgrows the sliding window, however it is fed."""
    model, cfg = _random_model()
    ids = torch.randint(0, cfg.vocab_size, (1, sum(chunks)), generator=torch.Generator().manual_seed(4))
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = KVCache.empty(cfg)
        h_full = model.encode(ids, full)
        ref = model.denoise(canvas, full)
        cache, hs, pos = KVCache.empty(cfg), [], 0
        for n in chunks:
            hs.append(model.encode(ids[:, pos:pos + n], cache))
            pos += n
        got = model.denoise(canvas, cache)
    assert torch.allclose(torch.cat(hs, 1), h_full, atol=1e-5)
    assert torch.allclose(got, ref, atol=1e-5)
    for i in range(cfg.num_hidden_layers):  # sliding layers keep W-1 positions, full layers all of them
        expect = cfg.sliding_window - 1 if cfg.is_sliding(i) else ids.shape[1]
        assert cache.keys[i].shape[2] == expect


def test_batch_with_left_padding_equals_singles():
    model, cfg = _random_model("gqa4", seed=1)
    g = torch.Generator().manual_seed(6)
    a = torch.randint(0, cfg.vocab_size, (1, 25), generator=g)
    b = torch.randint(0, cfg.vocab_size, (1, 17), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    am = torch.ones_like(batch)
    am[1, :8] = 0
    with torch.no_grad():
        cache = KVCache.empty(cfg)
        model.encode(batch, cache, am)
        got = model.denoise(canvas, cache)
        singles = []
        for row, ids in enumerate((a, b)):
            c = KVCache.empty(cfg)
            model.encode(ids, c)
            singles.append(model.denoise(canvas[row:row + 1], c))
    assert torch.allclose(got, torch.cat(singles), atol=1e-5)


def test_denoise_never_writes_the_cache():
    model, cfg = _random_model()
    cache = KVCache.empty(cfg)
    with torch.no_grad():
        model.encode(torch.randint(0, cfg.vocab_size, (1, 10)), cache)
        before = cache.clone()
        model.denoise(torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length)), cache)
    assert cache.length == before.length
    assert all(torch.equal(k, kb) for k, kb in zip(cache.keys, before.keys))


def test_encoder_and_decoder_layer_scalars_are_separate():
    model, cfg = _random_model()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length))
    with torch.no_grad():
        c1 = KVCache.empty(cfg)
        h1 = model.encode(ids, c1)
        l1 = model.denoise(canvas, c1)
        model.layers[0].layer_scalar.mul_(1.5)  # decoder copy only
        c2 = KVCache.empty(cfg)
        h2 = model.encode(ids, c2)
        l2 = model.denoise(canvas, c2)
    assert torch.equal(h1, h2)
    assert not torch.allclose(l1, l2)


@pytest.mark.parametrize("with_scale", [True, False])
def test_rmsnorm_inference_path_is_bit_identical_to_the_general_one(with_scale):
    """RMSNorm's fp32 inference path (fewer operator calls) against its general path, bit for bit, on rows of
    several sizes and magnitudes (the general path runs when gradients are on)."""
    from dgemma.model import RMSNorm

    torch.manual_seed(0)
    for dim in (8, 48, 96, 192, 2816):
        norm = RMSNorm(dim, 1e-6, with_scale)
        if with_scale:
            torch.nn.init.normal_(norm.weight)
        for rows in (1, 3, 33, 512):
            x = torch.randn(2, rows, dim) * torch.logspace(-4, 4, rows)[None, :, None]
            with torch.no_grad():
                fast = norm(x)
            general = norm(x).detach()  # gradients enabled: the general path
            assert torch.equal(fast, general), (dim, rows)
    with torch.device("meta"):  # how checkpoint loading builds the model: the fast path's scalars stay real
        built = RMSNorm(96, 1e-6, with_scale)
    assert built._eps.device.type == "cpu" and built._eps.item() == torch.tensor(1e-6).item()
    assert built._count.item() == 96.0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dense_expert_mix_matches_the_sorted_one_with_gradients(name):
    """`dense_mix_experts` (every token through every expert, fixed shapes: what compiled code runs) against
    `mix_experts` (tokens grouped by expert, the reference's order): outputs and every gradient agree to float
    rounding."""
    from dgemma.model import dense_mix_experts, mix_experts

    cfg = CONFIGS[name]
    layer = init_weights(DiffusionGemma(cfg), std=0.5, seed=0).layers[0]
    ex = layer.experts
    x = torch.randn(45, cfg.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w, idx = layer.router(x)
    outs, grads = [], []
    for dense in (False, True):
        y = (dense_mix_experts(x, w, idx, cfg.num_experts, ex.gate_up_proj.flatten(0, 1),
                               ex.down_proj.permute(1, 0, 2).flatten(1)) if dense
             else mix_experts(x, w, idx, cfg.num_experts, ex.expert))
        g = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                [x, ex.gate_up_proj, ex.down_proj, layer.router.proj.weight], retain_graph=True)
        outs.append(y)
        grads.append(g)
    scale = outs[0].abs().max()
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 * scale
    floor = grads[0][0].abs().max()  # with top-1 the router's gradient is zero but for rounding: judge it by x's
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 1e-5 * max(a.abs().max(), 1e-3 * floor)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_expert_mix_matches_the_sorted_one_with_gradients(name):
    """`grouped_mix_experts` (two grouped matmuls over the sorted rows, fixed shapes: what compiled CPU code runs)
    against `mix_experts` (one product pair per expert): outputs and every gradient agree to float rounding, also
    when an expert gets no token."""
    from dgemma.model import grouped_mix_experts, mix_experts

    cfg = CONFIGS[name]
    layer = init_weights(DiffusionGemma(cfg), std=0.5, seed=0).layers[0]
    ex = layer.experts
    for rows in (45, 1):  # one row: most experts get nothing
        x = torch.randn(rows, cfg.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
        w, idx = layer.router(x)
        outs, grads = [], []
        for grouped in (False, True):
            y = (grouped_mix_experts(x, w, idx, ex.gate_up_proj, ex.down_proj) if grouped
                 else mix_experts(x, w, idx, cfg.num_experts, ex.expert))
            g = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                    [x, ex.gate_up_proj, ex.down_proj, layer.router.proj.weight], retain_graph=True)
            outs.append(y)
            grads.append(g)
        assert outs[1].dtype == outs[0].dtype
        assert (outs[0] - outs[1]).abs().max() <= 1e-6 * outs[0].abs().max()
        floor = grads[0][0].abs().max()
        for a, b in zip(*grads, strict=True):
            assert (a - b).abs().max() <= 1e-5 * max(a.abs().max(), 1e-3 * floor)


def test_a_compiled_layer_never_recompiles_for_new_routing():
    """A compiled layer (as `dgemma train --compile` compiles them) mixes the experts with grouped matmuls on the
    CPU: one graph, no graph break and no recompile however the tokens are routed, step after step, forward and
    backward; and the compiled layer's output and gradients equal the eager layer's to float rounding."""
    from dgemma.engine.compiled import compiler_available

    if compiler_available() is not None:
        pytest.skip(compiler_available())
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = CONFIGS["tiny"]
    model = init_weights(DiffusionGemma(cfg), std=0.5, seed=0)
    layer = model.layers[0]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer.after_attention, fullgraph=True)  # fullgraph: a graph break would raise
    for step in range(4):  # new tokens each step, so a new routing
        g = torch.Generator().manual_seed(step)
        h = torch.randn(2, 24, cfg.hidden_size, generator=g, requires_grad=True)
        r = torch.randn(2, 24, cfg.hidden_size, generator=g)
        y = compiled(h, r, False)
        y.square().sum().backward()
        assert h.grad is not None and torch.isfinite(h.grad).all()
        h_eager = h.detach().clone().requires_grad_()
        y_eager = layer.after_attention(h_eager, r, False)
        y_eager.square().sum().backward()
        assert (y - y_eager).abs().max() <= 1e-5 * y_eager.abs().max()
        assert (h.grad - h_eager.grad).abs().max() <= 1e-4 * h_eager.grad.abs().max()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
