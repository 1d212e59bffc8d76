"""Hand-made logits of known entropy for the pure sampling functions."""

import itertools
import math

import pytest
import torch

from dgemma.sampler import (
    accept_entropy_bound,
    commit_confident,
    commit_quota,
    confident_and_stable,
    entropy,
    linear_temperature,
    row_temperatures,
    sample_next_token,
    sample_step,
    stable_and_confident,
    stable_run,
    top_confidence,
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


def test_row_temperatures_equal_the_scalar_schedule_bit_for_bit():
    # Rows at their own step of their own schedule (the stepped engine) get exactly the reference's temperature.
    cases = [(k, n, t_min, t_max) for n in (1, 2, 3, 7, 48, 256) for k in sorted({1, 2, n // 2 or 1, n})
             for t_min, t_max in ((0.4, 0.8), (0.0, 1.0), (0.7, 0.7), (0.1, 1.3), (1 / 3, 2 / 3))]
    k, n = torch.tensor([c[0] for c in cases]), torch.tensor([c[1] for c in cases])
    t_min = torch.tensor([c[2] for c in cases], dtype=torch.float32)
    t_span = torch.tensor([c[3] - c[2] for c in cases], dtype=torch.float32)
    rows = row_temperatures(k, n, t_min, t_span)
    want = torch.stack([linear_temperature(*c, reach_t_min=True) for c in cases])
    assert rows.dtype == torch.float32
    assert torch.equal(rows, want)


def test_stable_run_decides_as_the_history_test():
    # The engine's per-slot counter against stable_and_confident's history, over argmax sequences with repeats.
    g = torch.Generator().manual_seed(0)
    B, C, steps = 6, 5, 12
    confident = torch.full((B, C, 4), -1e4)
    confident[..., 0] = 0  # entropy ~0: the confidence half always holds, so `done` is the stability test
    for threshold in (0, 1, 2, 3):
        history, previous, run = None, torch.full((B, C), -1), torch.zeros(B, dtype=torch.long)
        argmax = torch.randint(0, 3, (B, C), generator=g)
        for _ in range(steps):
            change = torch.rand(B, generator=g) < 0.4  # some rows keep their canvas, others move
            argmax = torch.where(change[:, None], torch.randint(0, 3, (B, C), generator=g), argmax)
            want, history = stable_and_confident(argmax, confident, history, threshold, 0.005)
            run = stable_run(argmax, previous, run)
            previous = argmax
            mean_h = entropy(confident).mean(dim=-1)
            assert torch.equal(confident_and_stable(mean_h, run, threshold, 0.005), want)


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


# ---------------------------------------------------------------------------------------------------------------
# Commit-by-confidence
def test_commit_quota_spreads_the_canvas_and_ends_complete():
    for length, steps in [(32, 6), (32, 4), (8, 3), (5, 8), (256, 48)]:
        q = [commit_quota(i, steps, length) for i in range(steps)]
        assert q[-1] == length
        assert all(b >= a for a, b in itertools.pairwise(q))
        assert q[0] == -(-length // steps)  # the first step takes its share, rounded up
    assert [commit_quota(i, 4, 10) for i in range(4)] == [3, 5, 8, 10]


def test_commit_quota_per_row_tensors_equal_the_scalar_quota():
    steps, n = torch.tensor([0, 1, 2, 6, 0, 47, 3]), torch.tensor([1, 3, 3, 7, 48, 48, 5])
    want = [commit_quota(int(s), int(m), 37) for s, m in zip(steps, n)]
    assert commit_quota(steps, n, 37).tolist() == want


def test_top_confidence_is_the_softmax_maximum():
    x = torch.randn(3, 5, 17)
    conf, tok = top_confidence(x)
    probs = torch.softmax(x, dim=-1)
    torch.testing.assert_close(conf, probs.max(dim=-1).values)
    assert torch.equal(tok, x.argmax(dim=-1))


def test_commit_confident_commits_the_most_confident_keeps_committed_and_renoises_the_rest():
    V = 50
    conf = torch.tensor([[0.3, 0.9, 0.5, 0.97, 0.1, 0.6]])
    proposal = torch.tensor([[10, 11, 12, 13, 14, 15]])
    canvas = torch.tensor([[40, 41, 42, 43, 44, 45]])
    committed = torch.tensor([[False, False, False, True, False, False]])  # position 3 holds 43 already
    g = torch.Generator().manual_seed(0)
    new, now, draft = commit_confident(conf, proposal, canvas, committed, quota=3, threshold=0.95, vocab_size=V,
                                       generator=g)
    # one committed already, two owed: the two most confident open positions (1: 0.9, 5: 0.6); 3's 0.97 does not
    # count, since it is committed and keeps its own token
    assert now.tolist() == [[False, True, False, True, False, True]]
    assert new[0, 1] == 11 and new[0, 5] == 15 and new[0, 3] == 43
    noise = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(new[~now], noise[~now])  # the open positions are renoised with the step's one draw
    assert draft.tolist() == [[10, 11, 12, 43, 14, 15]]  # committed tokens, this step's proposals elsewhere

    # above the threshold commits beyond the quota; with the quota met, only the threshold commits
    conf2 = torch.tensor([[0.99, 0.2, 0.96, 0.5, 0.1, 0.3]])
    new2, now2, _ = commit_confident(conf2, proposal, new, now, quota=3, threshold=0.95, vocab_size=V, generator=g)
    assert now2.tolist() == [[True, True, True, True, False, True]]
    assert new2[0, 0] == 10 and new2[0, 2] == 12 and new2[0, 1] == 11  # kept, though its confidence fell


def test_commit_confident_rows_are_independent():
    conf = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.2, 0.9]])
    proposal = torch.arange(6).view(2, 3)
    committed = torch.zeros(2, 3, dtype=torch.bool)
    _, now, _ = commit_confident(conf, proposal, proposal.clone(), committed, 1, 1.0, 10, torch.Generator())
    assert now.tolist() == [[True, False, False], [False, False, True]]


def test_cpu_multinomial_is_argmax_over_exponential_noise():
    """Why compat mode cannot draw faster: transformers' `torch.multinomial(probs, 1)` on the CPU is
    argmax(probs / E) with E one Exp(1) draw per vocabulary entry, so reproducing its random stream means drawing
    V exponentials per position (the draw is most of the sampler's cost at batch 1). If torch changes this, the
    test says so."""
    probs = torch.softmax(torch.randn(6, 1000) * 3, dim=-1)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    drawn = torch.multinomial(probs, 1, generator=g1).squeeze(-1)
    noise = torch.empty_like(probs).exponential_(generator=g2)
    assert torch.equal(drawn, (probs / noise).argmax(dim=-1))
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))  # the same amount was consumed
