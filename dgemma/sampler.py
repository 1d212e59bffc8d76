"""Sampling as pure functions over tensors: logits and a `torch.Generator` in, tokens and masks out.

State that lives across denoising steps (the argmax history of the stability test) is returned and passed back.
The arithmetic mirrors transformers 5.23.0 operation for operation, so that the `compat` generation mode
reproduces its tokens bit for bit; see spec A5.2 for the algorithm and the RNG order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def linear_temperature(step_remaining: int, num_steps: int, t_min: float, t_max: float,
                       reach_t_min: bool = False) -> torch.Tensor:
    """Temperature of the step with `step_remaining` steps left (N, N-1, ..., 1), as an fp32 scalar tensor.

    The reference uses T(n) = t_min + (t_max - t_min) * n / N, which never reaches t_min (its last step is
    n = 1). `reach_t_min=True` shifts the schedule so the first step is t_max and the last exactly t_min."""
    if reach_t_min:
        frac = torch.tensor((step_remaining - 1) / max(num_steps - 1, 1), dtype=torch.float32)
    else:
        frac = torch.tensor(step_remaining, dtype=torch.int32) / num_steps
    return t_min + (t_max - t_min) * frac


def row_temperatures(steps_left: torch.Tensor, num_steps: torch.Tensor, t_min: torch.Tensor,
                     t_span: torch.Tensor) -> torch.Tensor:
    """`linear_temperature(..., reach_t_min=True)` for rows that each follow their own schedule (the stepped
    engine): steps_left, num_steps [g] int; t_min and t_span (= t_max - t_min) [g] fp32 -> [g] fp32. The fraction is
    divided in float64 and rounded to fp32 once, as the scalar version's Python division is, so every row's value is
    the scalar version's bit for bit (tests/test_sampler.py)."""
    frac = ((steps_left - 1).double() / (num_steps - 1).clamp(min=1).double()).float()
    return t_min + t_span * frac


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis; [..., V] -> [...]. Same operations as
    `torch.distributions.Categorical(logits=...).entropy()` so that thresholds decide identically."""
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = F.softmax(norm, dim=-1)
    return -(norm.clamp(min=torch.finfo(norm.dtype).min) * probs).sum(-1)


def accept_entropy_bound(token_entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """EB-sampler acceptance: sort positions by entropy ascending and accept the k lowest while
    (sum of their entropies) - (the largest of them) <= bound. [B, C] fp32 -> [B, C] bool; at least one per row."""
    sorted_h, order = torch.sort(token_entropy, dim=-1)
    keep = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.scatter(torch.zeros_like(keep), -1, order, keep)


def stable_and_confident(argmax: torch.Tensor, processed_logits: torch.Tensor | None,
                         history: torch.Tensor | None, stability_threshold: int, confidence_threshold: float,
                         token_entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Adaptive stopping: a row is done when its argmax canvas equals each of the previous `stability_threshold`
    argmax canvases and the mean entropy of its processed logits is below `confidence_threshold`.

    argmax [B, C]; processed_logits [B, C, V]; history [s, B, C] or None (first step: filled with -1, so never
    stable). `token_entropy` [B, C]: that entropy per position when the caller already has it (a sampler that never
    holds all the logits at once); processed_logits is then not read and may be None.
    Returns (done [B] bool, new history)."""
    if stability_threshold == 0:
        stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        new_history = history
    else:
        if history is None:
            history = torch.full((stability_threshold, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
        stable = (history == argmax[None]).all(dim=-1).all(dim=0)
        new_history = torch.roll(history, shifts=-1, dims=0)
        new_history[-1] = argmax
    if token_entropy is None:
        token_entropy = entropy(processed_logits)
    confident = token_entropy.mean(dim=-1) < confidence_threshold
    return stable & confident, new_history


def stable_run(argmax: torch.Tensor, previous: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """The stability half of `stable_and_confident` as a counter instead of a history: for each row, how many
    consecutive steps its argmax canvas [B, C] has equalled the one before (`previous`, all -1 before a canvas's first
    step), given last step's counts `run` [B]. `run >= stability_threshold` is exactly the history test, for every
    threshold at once, in O(C) state per row (what the stepped engine keeps per slot)."""
    return torch.where((argmax == previous).all(dim=-1), run + 1, torch.zeros_like(run))


def confident_and_stable(mean_entropy: torch.Tensor, run: torch.Tensor, stability_threshold: torch.Tensor | int,
                         confidence_threshold: torch.Tensor | float) -> torch.Tensor:
    """`stable_and_confident`'s decision from its two measurements: the mean entropy [B] of the processed logits
    and the stability count [B] (`stable_run`); thresholds may be per row. -> done [B] bool."""
    return (mean_entropy < confidence_threshold) & (run >= stability_threshold)


@dataclass
class StepResult:
    canvas: torch.Tensor  # [B, C] next canvas: accepted samples, the rest renoised
    argmax: torch.Tensor  # [B, C]
    accepted: torch.Tensor  # [B, C] bool
    token_entropy: torch.Tensor  # [B, C] fp32


def draw_uniforms(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """n uniforms in (0, 1] for `sample_inverse_cdf` (never 0, so a zero-probability token is never drawn)."""
    return 1.0 - torch.rand(n, generator=generator, device=device)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs [N, V] (rows need not sum exactly to 1) from uniforms u [N] in (0, 1]:
    the first token whose cumulative probability reaches u times the row total. Exact categorical sampling,
    several times faster on CPU than torch.multinomial, and it works on any slice of rows given their uniforms."""
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1))
    return idx.squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def sample_step(processed: torch.Tensor, canvas: torch.Tensor, entropy_bound: float, vocab_size: int,
                generator: torch.Generator | None, method: str = "multinomial") -> StepResult:
    """One sampler update from temperature-processed logits [B, C, V] fp32.

    RNG order: the token draws (one torch.multinomial over [B*C, V] as the reference, or B*C uniforms for
    method="inverse_cdf", dgemma's default mode), then one randint(B, C) for renoising."""
    B, C, V = processed.shape
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    if method == "multinomial":
        sampled = torch.multinomial(probs.view(-1, V), 1, generator=generator).view(B, C)
    else:
        u = draw_uniforms(B * C, generator, processed.device)
        sampled = sample_inverse_cdf(probs.view(-1, V), u).view(B, C)
    argmax = processed.argmax(dim=-1)
    h = entropy(processed)
    accepted = accept_entropy_bound(h, entropy_bound)
    kept = torch.where(accepted, sampled, canvas)
    noise = torch.randint(0, vocab_size, (B, C), generator=generator, device=canvas.device)
    return StepResult(torch.where(~accepted, noise, kept), argmax, accepted, h)


# ---------------------------------------------------------------------------------------------------------------
# Fixed positions (canvas templates and infilling)
FREE = -1  # a template position the sampler fills; any other value is a token id clamped at that position


def clamp_fixed(processed: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Processed logits [B, C, V] with every fixed position ([B, C] token ids, FREE elsewhere) replaced by a point
    mass on its token: 0 for the token, the lowest float elsewhere. Every sampler then treats a fixed position as
    certain: entropy exactly 0 (accepted first, at no cost to the entropy bound), the token sampled whatever the
    uniform draw, argmax and top probability 1, so it is committed as it stands and never resampled. The draws of
    the step are unchanged, so the free positions see the same random stream as without a template."""
    mask = fixed >= 0
    if not bool(mask.any()):
        return processed
    point = torch.full_like(processed, torch.finfo(processed.dtype).min)
    point.scatter_(-1, fixed.clamp(min=0).unsqueeze(-1), 0.0)
    return torch.where(mask.unsqueeze(-1), point, processed)


# ---------------------------------------------------------------------------------------------------------------
# Commit-by-confidence (dgemma's `sampler="confidence"`; the Diffusers pipeline's block-refinement idea, uniform mode)
def commit_quota(step: int | torch.Tensor, num_steps: int | torch.Tensor, length: int) -> int | torch.Tensor:
    """Positions of a `length` canvas that must be committed once step `step` (0-based) of `num_steps` is done:
    the canvas spread evenly over the steps, rounded up, so that the last step commits everything. `step` and
    `num_steps` may be per-row integer tensors (the same floor division)."""
    return -(-(step + 1) * length // num_steps)


def top_confidence(processed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability of the most likely token, that token) per position of processed logits [..., V]."""
    norm = processed - processed.logsumexp(dim=-1, keepdim=True)
    best, token = norm.max(dim=-1)
    return best.exp(), token


def commit_confident(confidence: torch.Tensor, proposal: torch.Tensor, canvas: torch.Tensor,
                     committed: torch.Tensor, quota: int | torch.Tensor, threshold: float | torch.Tensor,
                     vocab_size: int, generator: torch.Generator | None,
                     noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One commit-by-confidence update. confidence, proposal, canvas: [B, C]; committed: [B, C] bool.

    Among the positions not yet committed, the most confident are committed with their proposal until `quota` are
    committed in the row, and so is any position whose confidence exceeds `threshold`. Committed positions keep
    their token for the rest of the canvas; every other position is renoised with a uniform random token (one
    randint(B, C), the only RNG draw of the step). Returns (next canvas, committed, draft), the draft being the
    canvas as it stands: committed tokens where committed, this step's proposals elsewhere.
    `quota` and `threshold` may be per-row tensors [B, 1]; `noise` [B, C], when given, replaces the draw (rows
    with generators of their own)."""
    open_conf = confidence.masked_fill(committed, -1.0)
    rank = torch.argsort(torch.argsort(open_conf, dim=-1, descending=True, stable=True), dim=-1, stable=True)
    owed = (quota - committed.sum(dim=-1, keepdim=True)).clamp(min=0)
    new = ~committed & ((rank < owed) | (confidence > threshold))
    committed = committed | new
    kept = torch.where(new, proposal, canvas)
    if noise is None:
        noise = torch.randint(0, vocab_size, canvas.shape, generator=generator, device=canvas.device)
    return torch.where(committed, kept, noise), committed, torch.where(committed, kept, proposal)


# ---------------------------------------------------------------------------------------------------------------
# Autoregressive sampling (the baseline decoder)
def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B]. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities (AR tokens, prompt scoring)
def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """The model's raw log-probabilities: logits [N, V] (any float dtype), ids [N] -> (logprob of ids [N] fp32,
    the `top` largest logprobs [N, top] fp32 and their ids [N, top], most probable first). Temperature 1 and no
    truncation: the distribution the model defines, not the one a sampler drew from."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [N, V] fp32
    chosen = logp.gather(-1, ids[:, None].long())[:, 0]
    if top <= 0:
        empty = logp.new_empty(logp.shape[0], 0)
        return chosen, empty, empty.long()
    values, top_ids = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
    return chosen, values, top_ids
