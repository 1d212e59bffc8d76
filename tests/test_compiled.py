"""Equivalence: dgemma.engine.compiled's inductor-compiled pieces against the model's own eager modules (random:tiny, fp32).

Tolerance: rtol = atol = 1e-4 on fp32 values of order 1 to 10 (observed differences are a few 1e-6: inductor fuses
and reorders the float sums, the dense expert mixing sums the experts in another order, the sampler normalises
after the soft-embedding product); token ids (argmax, draws) must be equal.
"""

import copy

import pytest
import torch

from dgemma import api
from dgemma.engine.compiled import CompiledLayers, CompiledSampler, compiler_available
from dgemma.engine.static import position_stats
from dgemma.model import rope_cos_sin

pytestmark = [pytest.mark.slow,  # inductor compiles
              pytest.mark.skipif(compiler_available() is not None, reason=str(compiler_available()))]

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def model():
    return api.load("random:tiny").model


def _rope(model, N, layer):
    cos, sin = rope_cos_sin(getattr(model, f"inv_freq_{layer.layer_type}"), torch.arange(5, 5 + N), model.dtype)
    return cos, sin


def _check_layers(model, cl, sizes, encoder=False):
    H = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for N in sizes:
            h = torch.randn(1, N, H, generator=gen)
            for i, layer in enumerate(model.layers):
                attn = layer.self_attn
                cos, sin = _rope(model, N, layer)
                want = attn.project(layer.input_layernorm(h), cos, sin)
                got = cl.pre_attention(i, h, cos, sin)
                for w, g in zip(want, got):
                    assert g.shape == w.shape
                    torch.testing.assert_close(g, w, **TOL)
                o = torch.randn(1, attn.num_heads, N, attn.head_dim, generator=gen)
                a = attn.o_proj(o.transpose(1, 2).reshape(1, N, -1))
                want = layer.after_attention(h, a, encoder)
                got = cl.post_attention(i, h, o, encoder)
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, **TOL)
                h = want
            torch.testing.assert_close(cl.final_norm(h), model.norm(h), **TOL)


def test_buckets(model):
    cl = CompiledLayers(model, smallest=4, step=16)
    assert [cl.bucket(n) for n in (1, 4, 5, 8, 9, 16, 17, 32, 33)] == [4, 4, 8, 8, 16, 16, 32, 32, 48]
    assert cl.compilations == 0  # nothing is compiled before first use


def test_dense_pieces_match_eager_and_never_recompile(model):
    # One bucket of 8 rows (compile time): N = 1, 3, 5 need padding, 8 does not.
    cl = CompiledLayers(model, smallest=8, step=8, dense_experts=True, dense_rows=16)
    cl.warm([8])
    warm = cl.compilations
    assert warm == 2 + 2 + 1  # pre and post for each of the two layer kinds, final norm
    _check_layers(model, cl, [1, 5, 8])
    _check_layers(model, cl, [3, 8], encoder=True)
    assert cl.compilations == warm  # N moved inside the warmed bucket: no new graph


def test_split_experts_match_eager(model):
    cl = CompiledLayers(model, smallest=8, step=8, dense_experts=False)
    _check_layers(model, cl, [6, 8])
    assert cl.compilations == 2 + 2 + 2 + 1  # one bucket: pre, ffn_in, ffn_out per layer kind, final norm


def test_quantised_model(model):
    from dgemma.quant import quantize_int8

    q = quantize_int8(copy.deepcopy(model))
    cl = CompiledLayers(q, smallest=8, step=8)
    assert not cl.dense  # int8 experts run eagerly between two compiled graphs
    _check_layers(q, cl, [5])
    _check_sampler(q, CompiledSampler(q, chunk=32), [5], confidence=False)  # the int8 head and soft products


def _check_sampler(model, cs, sizes, confidence):
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for n in sizes:
            hidden = torch.randn(n, model.config.hidden_size, generator=gen) * 3
            temp = 0.3 + torch.rand(n, 1, generator=gen)
            u = None if confidence else 1 - torch.rand(n, generator=gen)
            want = position_stats(model.logits(hidden[None]), temp, None, model, soft_from="raw",
                                  method=None if confidence else "inverse_cdf", confidence=confidence, uniforms=u)
            argmax, sampled, entropy, conf, soft = cs.sampler_chunk(hidden, temp, u, confidence)
            assert torch.equal(argmax, want.argmax)
            if confidence:
                assert sampled is None and entropy is None
                torch.testing.assert_close(conf, want.confidence, **TOL)
            else:
                assert conf is None
                # Exact draws: a uniform within float rounding of a token boundary could pick the neighbour
                # (see compiled._draw); with this seed none does.
                assert torch.equal(sampled, want.sampled)
                torch.testing.assert_close(entropy, want.entropy, **TOL)
            torch.testing.assert_close(soft, want.soft[0], **TOL)


@pytest.mark.parametrize("confidence", [False, True])
def test_sampler_chunk_matches_position_stats(model, confidence):
    cs = CompiledSampler(model, chunk=32)
    _check_sampler(model, cs, [5, 32, 70], confidence)  # 70 = two chunks of 32 and a padded one of 6 (to 8)
    assert cs.compilations == 2  # buckets 8 and 32
