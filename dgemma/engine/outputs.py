"""What a generation call returns, and the small helpers the reference loops and the fast paths share.

    GenerationOutput / GenerationStats      tokens, finish reasons, passes and timings of one call
    commit_tokens                           append a row's committed canvas, cut at EOS or a stop callback
    compat_append / compat_output           transformers-compatible canvas commit and output (compat mode)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dgemma.params import TokenLogprob


@dataclass
class GenerationStats:
    decoder_passes: list[int]  # per row: denoiser forwards that row took part in
    encoder_passes: int  # encoder forwards (prompt prefill included)
    steps_per_canvas: list[list[int]]  # per row, per committed canvas
    new_tokens: list[int]  # per row (pad excluded)
    seconds: float = 0.0
    first_token_seconds: float | None = None  # time until the first canvas (or token) was committed

    @property
    def tokens_per_forward(self) -> list[float]:
        return [t / p if p else 0.0 for t, p in zip(self.new_tokens, self.decoder_passes)]

    def as_dict(self) -> dict:
        return {"decoder_passes": self.decoder_passes, "encoder_passes": self.encoder_passes,
                "steps_per_canvas": self.steps_per_canvas, "new_tokens": self.new_tokens,
                "tokens_per_forward": [round(x, 4) for x in self.tokens_per_forward],
                "seconds": round(self.seconds, 4), "first_token_seconds": self.first_token_seconds}


@dataclass
class GenerationOutput:
    sequences: torch.Tensor | None  # compat: [B, L + k*C] like transformers; default: None
    tokens: list[list[int]]  # per row: the new tokens (default mode: cut at EOS/stop, at most max_new_tokens)
    finish_reasons: list[str]  # "stop" (EOS or stop sequence) or "length"
    stats: GenerationStats
    extra: dict = field(default_factory=dict)
    logprobs: list[list[TokenLogprob]] | None = None  # per row, one per token (with logprobs; fast engine)


# A callback seeing (row, tokens so far) after each committed canvas; returns a cut length to stop that row there.
StopFn = Callable[[int, list[int]], int | None]
# A callback seeing each denoising step: (canvas index, step index, row ids, argmax canvas [b, C], accepted [b, C]).
StepFn = Callable[[int, int, list[int], torch.Tensor, torch.Tensor], None]


def generator_for(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def compat_append(seq: torch.Tensor, canvas: torch.Tensor, finished: torch.Tensor, max_length: int,
                   eos: torch.Tensor | None, pad: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compat mode's commit of a canvas [B, C], as the reference: append it whole; rows finish at max_length or on
    EOS; with a pad id, rows finished earlier get a pad canvas and a row finishing now is padded after its EOS."""
    B, C = canvas.shape
    seq = torch.cat([seq, canvas], dim=-1)
    finished_now = torch.full((B,), seq.shape[1] >= max_length, dtype=torch.bool, device=seq.device)
    if eos is not None:
        finished_now |= torch.isin(seq[:, -C:], eos).any(dim=-1)
    previously = finished
    finished = previously | finished_now
    if pad is not None and bool(finished.any()):
        seq[previously, -C:] = pad
        if eos is not None and bool(finished_now.any()):
            new = seq[:, -C:]
            is_eos = torch.isin(new, eos)
            cum = is_eos.cumsum(dim=-1)
            new[(cum > 0) & ~((cum == 1) & is_eos)] = pad
    return seq, finished


def compat_output(seq: torch.Tensor, prompt_len: int, eos: torch.Tensor | None, pad: int | None,
                   passes: torch.Tensor, encoder_passes: int, steps: list[list[int]], t0: float,
                   first: float | None) -> GenerationOutput:
    new_tokens = seq[:, prompt_len:]
    B = seq.shape[0]
    counts = (new_tokens != pad).sum(-1) if pad is not None else torch.full((B,), new_tokens.shape[1])
    stats = GenerationStats(decoder_passes=passes.tolist(), encoder_passes=encoder_passes, steps_per_canvas=steps,
                            new_tokens=counts.tolist(), seconds=time.perf_counter() - t0, first_token_seconds=first)
    reasons = ["stop" if eos is not None and bool(torch.isin(new_tokens[r], eos).any()) else "length"
               for r in range(B)]
    return GenerationOutput(sequences=seq, tokens=[row.tolist() for row in new_tokens], finish_reasons=reasons,
                            stats=stats)


def commit_tokens(row: int, new: list[int], out: list[list[int]], reasons: list[str], eos: set[int],
            stop_fn: StopFn | None, limit: int, template_len: int = 0, ended: bool = False) -> bool:
    """Append a row's newly committed tokens, cutting at the first EOS or where `stop_fn` says. EOS within the
    first `template_len` generated tokens (a template's span) is filler, not the end; `ended`: the row's grammar
    has ended (constrain.walk), so it stops after these tokens. Returns whether the row goes on."""
    start = max(0, template_len - len(out[row]))
    cut = next((i for i, t in enumerate(new) if i >= start and t in eos), None)
    if cut is not None:
        out[row].extend(new[:cut])
        reasons[row] = "stop"
        return False
    out[row].extend(new)
    if ended:
        reasons[row] = "stop"
        return False
    if stop_fn is not None and (cut := stop_fn(row, out[row])) is not None:
        del out[row][cut:]
        reasons[row] = "stop"
        return False
    return len(out[row]) < limit
