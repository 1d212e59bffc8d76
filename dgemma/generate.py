"""Reference generation: block-wise diffusion (spec A5) and autoregressive decoding of the same weights.

    generate_diffusion(model, ids, params, mask)       canvas after canvas: encode -> denoise N steps -> commit
    generate_ar(model, ids, params, mask)              one token per encoder pass, with a KV cache

Two diffusion modes:
- `compat=True` reproduces transformers 5.23.0 `generate()` token for token for the same seed on CPU, quirks
  included: whole canvases returned (up to C-1 tokens beyond max_new_tokens), finished rows still computed,
  temperature-scaled logits fed back for self-conditioning, the t_min-never-reached schedule.
- the default fixes those: exactly `max_new_tokens` returned, output cut at EOS (and at stop sequences given
  by a callback), finished rows leave the batch, the temperature schedule ends at t_min, and self-conditioning
  reads the raw logits as in training (spec A6.3/A6.4/A6.6/A6.9).
Every call returns statistics: decoder passes, encoder passes, steps per canvas, tokens per forward.
This module sees token ids only; text, stop strings and printing live above it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .model import DiffusionGemma
from .sampler import (
    commit_confident,
    commit_quota,
    linear_temperature,
    sample_next_token,
    sample_step,
    stable_and_confident,
    top_confidence,
)


class GenerationError(ValueError):
    """Impossible generation parameters; the message names the parameter and the allowed range."""


def _check_engine(engine: str, compile: bool) -> None:
    if engine not in ("fast", "reference"):
        raise GenerationError(f"engine must be 'fast' or 'reference' (got {engine!r})")
    if compile and engine != "fast":
        raise GenerationError("compile=True needs engine='fast'")


SAMPLERS = ("entropy_bound", "confidence")


@dataclass
class DiffusionParams:
    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int | None = 1
    confidence_threshold: float | None = 0.005
    eos_token_ids: tuple[int, ...] | None = None  # None: never stop on EOS (as a fresh reference model)
    pad_token_id: int | None = None
    seed: int | None = None
    compat: bool = False
    engine: str = "fast"  # "fast" (engine.py: static cache, chunked sampler) or "reference" (model.py + sampler.py)
    compile: bool = False  # torch.compile the fast engine's layer passes
    sampler_chunk: int | None = None  # fast engine: canvas positions per sampler chunk (None: ~2 MiB of logits)
    right_size: bool = False  # default mode, fast engine: a last canvas only as long as the tokens still wanted
    # Default mode only. "entropy_bound": the reference's EB sampler (spec A5.2). "confidence": commit-by-confidence;
    # each step commits the most confident greedy proposals (an even share of the canvas per step, plus any above
    # commit_threshold), committed tokens stay, the rest are renoised; a canvas ends when all are committed (the
    # stability/confidence thresholds of adaptive stopping apply to entropy_bound only).
    sampler: str = "entropy_bound"
    commit_threshold: float = 0.95

    @classmethod
    def from_generation_config(cls, g: dict | None, **overrides) -> DiffusionParams:
        """The settings of a generation_config.json (field names as in transformers), then `overrides` on top.

        A key the file lacks keeps the reference default; an override of None also keeps the file's value.
        """
        g = g or {}
        own, sc = g.get("dgemma") or {}, g.get("sampler_config") or {}
        if not isinstance(own, dict) or not isinstance(sc, dict):
            raise GenerationError("generation_config.json: 'dgemma' and 'sampler_config' must be JSON objects, e.g. "
                                  '"dgemma": {"sampler": "confidence"}; fix or remove them')
        eos = g.get("eos_token_id")
        fields = {
            "max_new_tokens": g.get("max_new_tokens"), "max_denoising_steps": g.get("max_denoising_steps"),
            "entropy_bound": sc.get("entropy_bound"),
            "t_min": g.get("t_min"), "t_max": g.get("t_max"),
            "stability_threshold": g.get("stability_threshold"),
            "confidence_threshold": g.get("confidence_threshold"),
            "eos_token_ids": tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else None,
            "pad_token_id": g.get("pad_token_id"),
            # dgemma's own keys (transformers keeps unknown keys as plain attributes)
            "sampler": own.get("sampler"), "commit_threshold": own.get("commit_threshold"),
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: v for k, v in fields.items() if v is not None})

    def validate(self) -> None:
        _check_engine(self.engine, self.compile)
        if self.sampler_chunk is not None and self.sampler_chunk < 1:
            raise GenerationError(f"sampler_chunk must be >= 1 (got {self.sampler_chunk})")
        if self.right_size and (self.compat or self.engine != "fast"):
            raise GenerationError("right_size needs the default mode on the fast engine (compat=False, engine='fast')")
        if self.sampler not in SAMPLERS:
            raise GenerationError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.sampler != "entropy_bound" and self.compat:
            raise GenerationError(f"sampler={self.sampler!r} needs the default mode; compat mode is the reference's "
                                  "entropy-bound sampler (drop compat, or use sampler='entropy_bound')")
        checks = [
            (0 < self.commit_threshold <= 1, f"commit_threshold must be in (0, 1] (got {self.commit_threshold})"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1 (got {self.max_new_tokens})"),
            (self.max_denoising_steps >= 1, f"max_denoising_steps must be >= 1 (got {self.max_denoising_steps})"),
            (self.entropy_bound > 0, f"entropy_bound must be > 0 (got {self.entropy_bound})"),
            (0 <= self.t_min < self.t_max, f"need 0 <= t_min < t_max (got t_min={self.t_min}, t_max={self.t_max})"),
            (self.stability_threshold is None or self.stability_threshold >= 0,
             f"stability_threshold must be >= 0 (got {self.stability_threshold})"),
            (self.confidence_threshold is None or self.confidence_threshold > 0,
             f"confidence_threshold must be > 0 (got {self.confidence_threshold})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GenerationError(msg)


@dataclass
class ARParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    eos_token_ids: tuple[int, ...] | None = None
    seed: int | None = None
    engine: str = "fast"  # "fast" (engine.py: static cache) or "reference" (model.py's KVCache)
    compile: bool = False  # torch.compile the fast engine's layer passes

    def validate(self) -> None:
        _check_engine(self.engine, self.compile)
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (got {self.top_p})")


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


# A callback seeing (row, tokens so far) after each committed canvas; returns a cut length to stop that row there.
StopFn = Callable[[int, list[int]], int | None]
# A callback seeing each denoising step: (canvas index, step index, row ids, argmax canvas [b, C], accepted [b, C]).
StepFn = Callable[[int, int, list[int], torch.Tensor, torch.Tensor], None]


def _generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _prepare(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, model: DiffusionGemma):
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise GenerationError(f"input_ids must be a non-empty [batch, length] tensor (got shape {tuple(input_ids.shape)})")
    V = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= V:
        raise GenerationError(f"input_ids contain ids outside [0, {V}); is the tokenizer the model's own?")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.to(torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise GenerationError("attention_mask must have the shape of input_ids")
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise GenerationError("only left padding is supported: attention_mask rows must be 0...0 1...1")
    if not bool(attention_mask[:, -1].all()):
        raise GenerationError("every row needs at least one real prompt token (the last position must be unmasked)")
    return input_ids.to(model.device), attention_mask.to(model.device)


@torch.inference_mode()
def generate_diffusion(model: DiffusionGemma, input_ids: torch.Tensor, params: DiffusionParams,
                       attention_mask: torch.Tensor | None = None, stop_fn: StopFn | None = None,
                       on_step: StepFn | None = None) -> GenerationOutput:
    params.validate()
    input_ids, attention_mask = _prepare(input_ids, attention_mask, model)
    if params.engine == "fast":
        from . import engine
        if params.compat:
            return engine.diffusion_compat(model, input_ids, attention_mask, params, on_step)
        return engine.diffusion_default(model, input_ids, attention_mask, params, stop_fn, on_step)
    if params.compat:
        return _diffusion_compat(model, input_ids, attention_mask, params, on_step)
    return _diffusion_default(model, input_ids, attention_mask, params, stop_fn, on_step)


def _diffusion_compat(model, input_ids, attention_mask, p: DiffusionParams, on_step) -> GenerationOutput:
    """Transformers 5.23.0 `generate()`, eager path with the dynamic cache, same RNG order."""
    t0 = time.perf_counter()
    cfg = model.config
    B, L0 = input_ids.shape
    C, V, N = cfg.canvas_length, cfg.vocab_size, p.max_denoising_steps
    max_length = L0 + p.max_new_tokens
    gen = _generator(p.seed, input_ids.device)
    cache = KVCache.empty(cfg)
    eos = torch.tensor(list(p.eos_token_ids), device=input_ids.device) if p.eos_token_ids else None
    use_stopper = p.stability_threshold is not None and p.confidence_threshold is not None
    finished_seq = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    passes = torch.zeros(B, dtype=torch.long)
    steps: list[list[int]] = [[] for _ in range(B)]
    seq, pending, pending_mask = input_ids, input_ids, attention_mask
    encoder_passes, first = 0, None
    for ci in range(math.ceil(p.max_new_tokens / C)):
        model.encode(pending, cache, pending_mask)
        encoder_passes += 1
        canvas = torch.randint(0, V, (B, C), generator=gen, device=input_ids.device)
        sc, history = None, None
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        argmax = canvas
        row_steps = torch.zeros(B, dtype=torch.long)
        for n in range(N, 0, -1):
            active = ~(done | finished_seq)
            passes += active.cpu().long()
            row_steps += (~done).cpu().long()
            raw = model.denoise(canvas, cache, sc)
            proc = raw / linear_temperature(n, N, p.t_min, p.t_max)
            step = sample_step(proc, canvas, p.entropy_bound, V, gen)
            new_argmax, new_canvas = step.argmax, step.canvas
            if use_stopper:
                if bool(done.any()):
                    new_argmax = torch.where(done[:, None], argmax, new_argmax)
                    new_canvas = torch.where(done[:, None], canvas, new_canvas)
                    proc = torch.where(done[:, None, None], sc, proc)
                stop, history = stable_and_confident(new_argmax, proc, history, p.stability_threshold,
                                                     p.confidence_threshold)
                done |= stop
            sc = proc.to(model.dtype)
            argmax, canvas = new_argmax, new_canvas
            if on_step is not None:
                on_step(ci, N - n, list(range(B)), argmax, step.accepted)
            if bool(done.all()):
                break
        for r in range(B):
            steps[r].append(int(row_steps[r]))
        seq, finished_seq = _compat_append(seq, argmax, finished_seq, max_length, eos, p.pad_token_id)
        if first is None:
            first = time.perf_counter() - t0
        if bool(finished_seq.all()):
            break
        pending, pending_mask = seq[:, -C:], None
    return _compat_output(seq, L0, eos, p.pad_token_id, passes, encoder_passes, steps, t0, first)


def _compat_append(seq: torch.Tensor, canvas: torch.Tensor, finished: torch.Tensor, max_length: int,
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


def _compat_output(seq: torch.Tensor, prompt_len: int, eos: torch.Tensor | None, pad: int | None,
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


def _commit(row: int, new: list[int], out: list[list[int]], reasons: list[str], eos: set[int],
            stop_fn: StopFn | None, limit: int) -> bool:
    """Append a row's newly committed tokens, cutting at the first EOS or where `stop_fn` says.
    Returns whether the row goes on."""
    cut = next((i for i, t in enumerate(new) if t in eos), None)
    if cut is not None:
        out[row].extend(new[:cut])
        reasons[row] = "stop"
        return False
    out[row].extend(new)
    if stop_fn is not None and (cut := stop_fn(row, out[row])) is not None:
        del out[row][cut:]
        reasons[row] = "stop"
        return False
    return len(out[row]) < limit


def _keep_rows(keep: list[int], rows: list[int], cache: KVCache, last: torch.Tensor):
    """Drop finished rows from the cache and the last committed tokens (batch index order is kept)."""
    if len(keep) < len(rows):
        idx = torch.tensor(keep, device=last.device)
        cache, last = cache.select_rows(idx), last.index_select(0, idx)
    return [rows[j] for j in keep], cache, last


def _diffusion_default(model, input_ids, attention_mask, p: DiffusionParams, stop_fn, on_step) -> GenerationOutput:
    """Same algorithm, quirks fixed: exact length, EOS/stop honoured, finished rows dropped from the batch."""
    t0 = time.perf_counter()
    cfg = model.config
    B = input_ids.shape[0]
    C, V, N = cfg.canvas_length, cfg.vocab_size, p.max_denoising_steps
    gen = _generator(p.seed, input_ids.device)
    eos = set(p.eos_token_ids or ())
    cache = KVCache.empty(cfg)
    rows = list(range(B))  # original row index of each active batch row
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    passes = [0] * B
    steps: list[list[int]] = [[] for _ in range(B)]
    pending, pending_mask = input_ids, attention_mask
    encoder_passes, first = 0, None
    ci = 0
    while rows:
        model.encode(pending, cache, pending_mask)
        encoder_passes += 1
        b = len(rows)
        canvas = torch.randint(0, V, (b, C), generator=gen, device=input_ids.device)
        argmax = canvas.clone()
        sc = torch.zeros(b, C, V, dtype=model.dtype, device=input_ids.device)
        has_sc = False
        history = None
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        committed = torch.zeros(b, C, dtype=torch.bool, device=input_ids.device)
        row_steps = [0] * b
        for n in range(N, 0, -1):
            live = (~done).nonzero().squeeze(-1)
            all_live = live.numel() == b
            sub_cache = cache if all_live else cache.select_rows(live)
            sub = (lambda t: t) if all_live else (lambda t, rows_=live: t.index_select(0, rows_))
            raw = model.denoise(sub(canvas), sub_cache, sub(sc) if has_sc else None)
            for j in live.tolist():
                passes[rows[j]] += 1
                row_steps[j] += 1
            proc = raw / linear_temperature(n, N, p.t_min, p.t_max, reach_t_min=True)
            sc[live] = raw.to(model.dtype)  # raw logits, as the training objective feeds them
            has_sc = True
            if p.sampler == "confidence":
                conf, proposal = top_confidence(proc)
                new_canvas, accepted, new_argmax = commit_confident(
                    conf, proposal, sub(canvas), sub(committed), commit_quota(N - n, N, C), p.commit_threshold, V,
                    gen)
                committed[live] = accepted
                done[live] |= accepted.all(dim=-1)  # every position committed: the canvas is done
            else:
                step = sample_step(proc, sub(canvas), p.entropy_bound, V, gen, method="inverse_cdf")
                new_canvas, accepted, new_argmax = step.canvas, step.accepted, step.argmax
                if p.stability_threshold is not None and p.confidence_threshold is not None:
                    h_live = None if history is None else history[:, live]
                    stop, h_new = stable_and_confident(new_argmax, proc, h_live, p.stability_threshold,
                                                       p.confidence_threshold)
                    if h_new is not None:
                        if history is None:
                            history = torch.full((h_new.shape[0], b, C), -1, dtype=h_new.dtype, device=h_new.device)
                        history[:, live] = h_new
                    done[live] |= stop
            canvas[live], argmax[live] = new_canvas, new_argmax
            if on_step is not None:
                on_step(ci, N - n, [rows[j] for j in live.tolist()], new_argmax, accepted)
            if bool(done.all()):
                break
        keep = []
        for j, r in enumerate(rows):
            steps[r].append(row_steps[j])
            new = argmax[j, :p.max_new_tokens - len(out[r])].tolist()
            if _commit(r, new, out, reasons, eos, stop_fn, p.max_new_tokens):
                keep.append(j)
        if first is None:
            first = time.perf_counter() - t0
        if not keep:
            break
        rows, cache, argmax = _keep_rows(keep, rows, cache, argmax)
        pending, pending_mask = argmax, None
        ci += 1
    stats = GenerationStats(decoder_passes=passes, encoder_passes=encoder_passes, steps_per_canvas=steps,
                            new_tokens=[len(t) for t in out], seconds=time.perf_counter() - t0,
                            first_token_seconds=first)
    return GenerationOutput(sequences=None, tokens=out, finish_reasons=reasons, stats=stats)


@torch.inference_mode()
def generate_ar(model: DiffusionGemma, input_ids: torch.Tensor, params: ARParams,
                attention_mask: torch.Tensor | None = None, stop_fn: StopFn | None = None) -> GenerationOutput:
    """Next-token decoding through the encoder (spec part C): prefill, then one token per pass with the cache."""
    params.validate()
    if params.engine == "fast":
        from . import engine
        input_ids, attention_mask = _prepare(input_ids, attention_mask, model)
        return engine.autoregressive(model, input_ids, attention_mask, params, stop_fn)
    t0 = time.perf_counter()
    input_ids, attention_mask = _prepare(input_ids, attention_mask, model)
    B = input_ids.shape[0]
    gen = _generator(params.seed, input_ids.device)
    eos = set(params.eos_token_ids or ())
    cache = KVCache.empty(model.config)
    h = model.encode(input_ids, cache, attention_mask)
    encoder_passes = 1
    rows = list(range(B))
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    passes = [1] * B  # per row: forwards whose next-token logits it used (prefill included)
    first = None
    while True:
        nxt = sample_next_token(model.logits(h[:, -1]), params.temperature, params.top_k, params.top_p, gen)
        if first is None:
            first = time.perf_counter() - t0
        keep = [j for j, r in enumerate(rows)
                if _commit(r, [int(nxt[j])], out, reasons, eos, stop_fn, params.max_new_tokens)]
        if not keep:
            break
        rows, cache, nxt = _keep_rows(keep, rows, cache, nxt)
        h = model.encode(nxt[:, None], cache)
        encoder_passes += 1
        for r in rows:
            passes[r] += 1
    n = [len(t) for t in out]
    # In AR decoding every generated token costs one encoder pass: those are its forward passes.
    stats = GenerationStats(decoder_passes=passes, encoder_passes=encoder_passes,
                            steps_per_canvas=[], new_tokens=n, seconds=time.perf_counter() - t0,
                            first_token_seconds=first)
    return GenerationOutput(sequences=None, tokens=out, finish_reasons=reasons, stats=stats)
