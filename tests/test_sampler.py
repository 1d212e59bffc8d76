"""Hand-made logits of known entropy for the pure sampling functions."""

import math

import pytest
import torch

from dgemma.sampler import (
    accept_entropy_bound,
    entropy,
    linear_temperature,
    sample_next_token,
    sample_step,
    stable_and_confident,
)


def test_entropy_of_known_distributions():
    V = 8
    uniform = torch.zeros(1, 1, V)
    onehot = torch.full((1, 1, V), -1e4)
    onehot[..., 3] = 0
    two = torch.full((1, 1, V), -1e4)
    two[..., :2] = 0
    h = entropy(torch.cat([uniform, onehot, two], dim=1))
    assert h[0, 0].item() == pytest.approx(math.log(V), abs=1e-6)
    assert h[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert h[0, 2].item() == pytest.approx(math.log(2), abs=1e-6)
    ref = torch.distributions.Categorical(logits=torch.randn(4, 5, 11)).entropy()
    torch.manual_seed(0)
    x = torch.randn(4, 5, 11)
    assert torch.equal(entropy(x), torch.distributions.Categorical(logits=x).entropy())
    assert ref.shape == (4, 5)


def test_entropy_bound_acceptance_rule():
    # sorted entropies 0.0, 0.02, 0.05, 0.3, 1.0; prefix sum minus the newest (largest): 0, 0, 0.02, 0.07, 0.37
    h = torch.tensor([[0.3, 0.0, 1.0, 0.05, 0.02]])
    assert accept_entropy_bound(h, 0.1).tolist() == [[True, True, False, True, True]]
    assert accept_entropy_bound(h, 0.05).tolist() == [[False, True, False, True, True]]
    # the lowest-entropy position is always accepted, even with a tiny bound
    h2 = torch.tensor([[5.0, 4.0, 6.0]])
    assert accept_entropy_bound(h2, 1e-9).tolist() == [[False, True, False]]
    assert accept_entropy_bound(h2, 100.0).all()


def test_temperature_schedule():
    N = 48
    assert linear_temperature(N, N, 0.4, 0.8).item() == pytest.approx(0.8)
    assert linear_temperature(1, N, 0.4, 0.8).item() == pytest.approx(0.4 + 0.4 / 48)  # reference: t_min never reached
    assert linear_temperature(1, N, 0.4, 0.8, reach_t_min=True).item() == pytest.approx(0.4)
    assert linear_temperature(N, N, 0.4, 0.8, reach_t_min=True).item() == pytest.approx(0.8)


def test_stable_and_confident():
    confident = torch.full((2, 3, 5), -1e4)
    confident[..., 0] = 0  # entropy 0 everywhere
    a = torch.zeros(2, 3, dtype=torch.long)
    done, hist = stable_and_confident(a, confident, None, 1, 0.005)
    assert not done.any()  # history starts at -1: the first step is never stable
    b = a.clone()
    b[1, 2] = 4
    done, hist = stable_and_confident(b, confident, hist, 1, 0.005)
    assert done.tolist() == [True, False]
    done, _ = stable_and_confident(b, torch.zeros(2, 3, 5), hist, 1, 0.005)  # unconfident (uniform)
    assert not done.any()
    done, _ = stable_and_confident(a, confident, None, 0, 0.005)  # s = 0: always stable
    assert done.all()


def test_sample_step_accepts_confident_positions_and_renoises_the_rest():
    V = 50
    logits = torch.zeros(1, 4, V)
    logits[0, 1, 7] = 100.0  # a certain position
    canvas = torch.full((1, 4), 3)
    g = torch.Generator().manual_seed(0)
    res = sample_step(logits, canvas, 0.1, V, g)
    # the certain position (entropy 0) and, since 0 <= bound, the next-lowest one; the rest are renoised
    assert res.accepted[0, 1] and res.accepted.sum() == 2
    assert res.canvas[0, 1].item() == 7 and res.argmax[0, 1].item() == 7
    again = sample_step(logits, canvas, 0.1, V, torch.Generator().manual_seed(0))
    assert torch.equal(res.canvas, again.canvas)  # seeded


def test_ar_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next_token(logits, 0.0, None, None, None).item() == 3
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, 1.0, 2, None, g).item() for _ in range(50)}
    assert draws == {2, 3}
    draws = {sample_next_token(logits, 1.0, None, 0.5, g).item() for _ in range(50)}
    assert draws == {3}  # p(3) = 0.64 >= 0.5 already


def test_inverse_cdf_sampling_matches_the_distribution_and_never_draws_zero_mass():
    from dgemma.sampler import draw_uniforms, sample_inverse_cdf

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_inverse_cdf(probs, draw_uniforms(probs.shape[0], g, "cpu"))
    counts = torch.bincount(draws, minlength=6).float() / probs.shape[0]
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs[0], atol=0.015)
    # rows are independent of how they are sliced: chunks with their own uniforms give the same draws
    u = draw_uniforms(10, torch.Generator().manual_seed(1), "cpu")
    p = torch.softmax(torch.randn(10, 50, generator=g), -1)
    whole = sample_inverse_cdf(p, u)
    parts = torch.cat([sample_inverse_cdf(p[i:i + 3], u[i:i + 3]) for i in range(0, 10, 3)])
    assert torch.equal(whole, parts)
