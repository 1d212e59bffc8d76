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
from dataclasses import dataclass, fields

import torch

from dgemma.cache import KVCache
from dgemma.engine import engine, static
from dgemma.engine.constrain import Grammars, Matcher, choose_ar, guide_run, walk
from dgemma.engine.outputs import (
    GenerationOutput,
    GenerationStats,
    StepFn,
    StopFn,
    commit_tokens,
    compat_append,
    compat_output,
    generator_for,
)
from dgemma.model import DiffusionGemma
from dgemma.params import RequestError, SamplingParams
from dgemma.sampler import (
    FREE,
    clamp_fixed,
    commit_confident,
    commit_quota,
    linear_temperature,
    sample_next_token,
    sample_step,
    stable_and_confident,
    top_confidence,
)

# Impossible generation parameters; the message names the parameter and the allowed range (one error type for the
# one-shot API and the engine).
GenerationError = RequestError


def _check_engine(engine: str, compile: bool) -> None:
    if engine not in ("fast", "reference"):
        raise GenerationError(f"engine must be 'fast' or 'reference' (got {engine!r})")
    if compile and engine != "fast":
        raise GenerationError("compile=True needs engine='fast'")


_SP = SamplingParams()  # the one home of the per-request defaults


@dataclass
class DiffusionParams:
    """One-shot diffusion settings: the per-request ones (defaults from `params.SamplingParams`) and how to run
    them (compat, engine, compile, sampler_chunk)."""
    max_new_tokens: int = _SP.max_new_tokens
    max_denoising_steps: int = _SP.max_denoising_steps
    entropy_bound: float = _SP.entropy_bound
    t_min: float = _SP.t_min
    t_max: float = _SP.t_max
    stability_threshold: int | None = _SP.stability_threshold
    confidence_threshold: float | None = _SP.confidence_threshold
    eos_token_ids: tuple[int, ...] | None = None  # None: never stop on EOS (as a fresh reference model)
    pad_token_id: int | None = None  # compat mode: pad finished rows as the reference does
    seed: int | None = None  # row r of a batch draws from its own generator seeded `seed + r` (fast engine)
    compat: bool = False
    engine: str = "fast"  # "fast" (engine.py, the stepped engine; compat: static.py) or "reference" (model.py)
    compile: bool = False  # torch.compile the fast engine's layer passes
    sampler_chunk: int | None = None  # fast engine: canvas positions per sampler chunk (None: ~2 MiB of logits)
    # Default mode only. "entropy_bound": the reference's EB sampler (spec A5.2). "confidence": commit-by-confidence;
    # each step commits the most confident greedy proposals (an even share of the canvas per step, plus any above
    # commit_threshold), committed tokens stay, the rest are renoised; a canvas ends when all are committed (the
    # stability/confidence thresholds of adaptive stopping apply to entropy_bound only).
    sampler: str = _SP.sampler
    commit_threshold: float = _SP.commit_threshold
    grammar: dict | None = None  # SamplingParams.grammar for every row (constrain.py; needs `grammars=`)
    # each committed token's raw log-probability at the step that chose it, and its N most probable alternatives
    # (GenerationOutput.logprobs; fast engine, default mode; definition in engine.Engine._score_canvases)
    logprobs: int | None = None

    _RUN = ("pad_token_id", "compat", "engine", "compile", "sampler_chunk")

    @classmethod
    def from_generation_config(cls, g: dict | None, **overrides) -> DiffusionParams:
        """The settings of a generation_config.json (read by `SamplingParams.from_generation_config`), then
        `overrides` on top; an override of None keeps the file's value."""
        run = {k: overrides.pop(k) for k in cls._RUN if k in overrides}
        sp = SamplingParams.from_generation_config(g, mode="diffusion", **overrides)
        if run.get("pad_token_id") is None:
            run["pad_token_id"] = (g or {}).get("pad_token_id")
        return cls(**{f.name: getattr(sp, f.name) for f in fields(cls) if f.name not in cls._RUN},
                   **{k: v for k, v in run.items() if v is not None})

    def sampling(self, row: int = 0) -> SamplingParams:
        """Row `row`'s SamplingParams (its seed is `seed + row`)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._RUN}
        if self.seed is not None:
            own["seed"] = self.seed + row
        return SamplingParams(mode="diffusion", **own)

    def sampling_rows(self, batch: int) -> list[SamplingParams]:
        return [self.sampling(r) for r in range(batch)]

    def validate(self) -> None:
        _check_engine(self.engine, self.compile)
        if self.sampler_chunk is not None and self.sampler_chunk < 1:
            raise GenerationError(f"sampler_chunk must be >= 1 (got {self.sampler_chunk})")
        if self.sampler != "entropy_bound" and self.compat:
            raise GenerationError(f"sampler={self.sampler!r} needs the default mode; compat mode is the reference's "
                                  "entropy-bound sampler (drop compat, or use sampler='entropy_bound')")
        if self.grammar is not None and self.compat:
            raise GenerationError("a grammar needs the default mode (compat mode reproduces transformers, which has "
                                  "none); drop compat")
        if self.logprobs is not None and (self.compat or self.engine != "fast"):
            raise GenerationError("logprobs need engine='fast' and the default mode (the stepped engine reports "
                                  "them); drop " + ("compat" if self.compat else "engine='reference'"))
        self.sampling().validate()


@dataclass
class ARParams:
    """One-shot AR settings: the per-request ones (defaults from `params.SamplingParams`) and the engine."""
    max_new_tokens: int = _SP.max_new_tokens
    temperature: float = _SP.temperature  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    eos_token_ids: tuple[int, ...] | None = None
    seed: int | None = None  # row r of a batch draws from its own generator seeded `seed + r` (fast engine)
    # each token's raw log-probability and its N most probable alternatives (GenerationOutput.logprobs; fast engine)
    logprobs: int | None = None
    grammar: dict | None = None  # SamplingParams.grammar for every row (constrain.py; needs `grammars=`)
    engine: str = "fast"  # "fast" (engine.py) or "reference" (model.py's KVCache)
    compile: bool = False  # torch.compile the fast engine's layer passes

    _RUN = ("engine", "compile")

    @classmethod
    def from_generation_config(cls, g: dict | None, **overrides) -> ARParams:
        run = {k: overrides.pop(k) for k in cls._RUN if k in overrides}
        sp = SamplingParams.from_generation_config(g, mode="ar", **overrides)
        return cls(**{f.name: getattr(sp, f.name) for f in fields(cls) if f.name not in cls._RUN},
                   **{k: v for k, v in run.items() if v is not None})

    def sampling(self, row: int = 0) -> SamplingParams:
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._RUN}
        if self.seed is not None:
            own["seed"] = self.seed + row
        return SamplingParams(mode="ar", **own)

    def sampling_rows(self, batch: int) -> list[SamplingParams]:
        return [self.sampling(r) for r in range(batch)]

    def validate(self) -> None:
        _check_engine(self.engine, self.compile)
        if self.logprobs is not None and self.engine != "fast":
            raise GenerationError("logprobs need engine='fast' (the stepped engine reports them)")
        self.sampling().validate()


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The prompts of a left-padded batch, padding removed (the engine gives every row its own length)."""
    return [ids[m].tolist() for ids, m in zip(input_ids, attention_mask)]


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
                       on_step: StepFn | None = None, templates: Templates = None,
                       grammars: Grammars | None = None) -> GenerationOutput:
    """`templates`: per row, None or the fixed output positions (`SamplingParams.template`: ids, -1 to fill).
    `grammars`: the tokenizer's grammar compiler (constrain.Grammars), needed when params.grammar is set."""
    params.validate()
    input_ids, attention_mask = _prepare(input_ids, attention_mask, model)
    templates = _check_templates(templates, len(input_ids), params)
    if params.compat and any(t is not None for t in templates):
        raise GenerationError("templates need the default mode (compat mode reproduces transformers, which has none)")
    if params.engine == "fast":
        if params.compat:
            return static.diffusion_compat(model, input_ids, attention_mask, params, on_step)
        return engine.generate_batch(model, _rows(input_ids, attention_mask), _with_templates(params, templates),
                                     stop_fn, on_step, params.compile, params.sampler_chunk, grammars)
    if params.compat:
        return _diffusion_compat(model, input_ids, attention_mask, params, on_step)
    return _diffusion_default(model, input_ids, attention_mask, params, stop_fn, on_step, templates,
                              _matchers(params, len(input_ids), grammars))


def _matchers(params, batch: int, grammars: Grammars | None) -> list[Matcher | None]:
    """One grammar matcher per row (reference loops), or Nones without a grammar."""
    if params.grammar is None:
        return [None] * batch
    if grammars is None:
        raise GenerationError("a grammar needs the tokenizer's grammar compiler: pass grammars=Grammars.from_tokenizer"
                              "(tokenizer, vocab_size)")
    return [grammars.matcher(params.grammar) for _ in range(batch)]


Templates = list[tuple[int, ...] | None] | None


def _check_templates(templates: Templates, batch: int, params) -> list[tuple[int, ...] | None]:
    if templates is None:
        return [None] * batch
    if len(templates) != batch:
        raise GenerationError(f"{len(templates)} templates for {batch} prompts: give one per prompt (None for none)")
    out = [None if t is None else tuple(int(x) for x in t) for t in templates]
    for row, t in enumerate(out):
        params.sampling(row).with_(template=t).validate()
    return out


def _with_templates(params, templates: list[tuple[int, ...] | None]) -> list[SamplingParams]:
    return [p.with_(template=t) for p, t in zip(params.sampling_rows(len(templates)), templates)]


def _fixed_slice(templates: list[tuple[int, ...] | None], rows: list[int], out: list[list[int]], C: int,
                 device) -> torch.Tensor | None:
    """[b, C] the open canvas's fixed ids per active row (FREE where the sampler fills), or None without templates."""
    if all(templates[r] is None for r in rows):
        return None
    fixed = torch.full((len(rows), C), FREE, dtype=torch.long, device=device)
    for j, r in enumerate(rows):
        part = (templates[r] or ())[len(out[r]):len(out[r]) + C]
        if part:
            fixed[j, :len(part)] = torch.tensor(part, device=device)
    return fixed


def _diffusion_compat(model, input_ids, attention_mask, p: DiffusionParams, on_step) -> GenerationOutput:
    """Transformers 5.23.0 `generate()`, eager path with the dynamic cache, same RNG order."""
    t0 = time.perf_counter()
    cfg = model.config
    B, L0 = input_ids.shape
    C, V, N = cfg.canvas_length, cfg.vocab_size, p.max_denoising_steps
    max_length = L0 + p.max_new_tokens
    gen = generator_for(p.seed, input_ids.device)
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
        seq, finished_seq = compat_append(seq, argmax, finished_seq, max_length, eos, p.pad_token_id)
        if first is None:
            first = time.perf_counter() - t0
        if bool(finished_seq.all()):
            break
        pending, pending_mask = seq[:, -C:], None
    return compat_output(seq, L0, eos, p.pad_token_id, passes, encoder_passes, steps, t0, first)


def _keep_rows(keep: list[int], rows: list[int], cache: KVCache, last: torch.Tensor):
    """Drop finished rows from the cache and the last committed tokens (batch index order is kept)."""
    if len(keep) < len(rows):
        idx = torch.tensor(keep, device=last.device)
        cache, last = cache.select_rows(idx), last.index_select(0, idx)
    return [rows[j] for j in keep], cache, last


def _diffusion_default(model, input_ids, attention_mask, p: DiffusionParams, stop_fn, on_step,
                       templates: list[tuple[int, ...] | None], matchers: list[Matcher | None]) -> GenerationOutput:
    """Same algorithm, quirks fixed: exact length, EOS/stop honoured, finished rows dropped from the batch. Fixed
    template positions are point masses of the processed logits (`sampler.clamp_fixed`) at every step. Rows with
    a grammar: the leading accepted run of every step's canvas is walked through it, and the committed canvas is
    the last step's argmax walked through it (constrain.py)."""
    t0 = time.perf_counter()
    cfg = model.config
    B = input_ids.shape[0]
    C, V, N = cfg.canvas_length, cfg.vocab_size, p.max_denoising_steps
    gen = generator_for(p.seed, input_ids.device)
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
        fixed = _fixed_slice(templates, rows, out, C, input_ids.device)
        if fixed is not None:
            canvas = torch.where(fixed >= 0, fixed, canvas)
        argmax = canvas.clone()
        sc = torch.zeros(b, C, V, dtype=model.dtype, device=input_ids.device)
        has_sc = False
        history = None
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        committed = torch.zeros(b, C, dtype=torch.bool, device=input_ids.device)
        row_steps = [0] * b
        last: dict[int, torch.Tensor] = {}  # constrained rows: processed logits [C, V] of their latest step
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
            if fixed is not None:
                proc = clamp_fixed(proc, sub(fixed))
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
            for k, j in enumerate(live.tolist()):
                m = matchers[rows[j]]
                if m is None:
                    continue
                last[j] = proc[k]
                run = next((i for i, a in enumerate(accepted[k].tolist()) if not a), C)
                tokens = new_canvas[k, :run].tolist()
                good = guide_run(m, tokens, lambda i, k=k, proc=proc: proc[k, i])
                if good != tokens[:len(good)]:
                    new_canvas[k, :len(good)] = torch.tensor(good, device=new_canvas.device)
                    if p.sampler == "confidence":
                        new_argmax[k, :len(good)] = new_canvas[k, :len(good)]
            canvas[live], argmax[live] = new_canvas, new_argmax
            if on_step is not None:
                on_step(ci, N - n, [rows[j] for j in live.tolist()], new_argmax, accepted)
            if bool(done.all()):
                break
        keep = []
        for j, r in enumerate(rows):
            steps[r].append(row_steps[j])
            new = argmax[j, :p.max_new_tokens - len(out[r])].tolist()
            ended = False
            if matchers[r] is not None:
                new, ended = walk(matchers[r], new, lambda i, row=last[j]: row[i])
                argmax[j, :len(new)] = torch.tensor(new, dtype=argmax.dtype, device=argmax.device)
            if commit_tokens(r, new, out, reasons, eos, stop_fn, p.max_new_tokens, len(templates[r] or ()), ended):
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
                attention_mask: torch.Tensor | None = None, stop_fn: StopFn | None = None,
                templates: Templates = None, grammars: Grammars | None = None) -> GenerationOutput:
    """Next-token decoding through the encoder (spec part C): prefill, then one token per pass with the cache.
    A template's fixed positions are emitted as they come (after the draw); AR cannot look ahead to them."""
    params.validate()
    templates = _check_templates(templates, len(input_ids), params)
    if params.engine == "fast":
        input_ids, attention_mask = _prepare(input_ids, attention_mask, model)
        return engine.generate_batch(model, _rows(input_ids, attention_mask), _with_templates(params, templates),
                                     stop_fn, compile=params.compile, grammars=grammars)
    t0 = time.perf_counter()
    input_ids, attention_mask = _prepare(input_ids, attention_mask, model)
    B = input_ids.shape[0]
    matchers = _matchers(params, B, grammars)
    gen = generator_for(params.seed, input_ids.device)
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
        logits = model.logits(h[:, -1])
        nxt = sample_next_token(logits, params.temperature, params.top_k, params.top_p, gen)
        if first is None:
            first = time.perf_counter() - t0
        for j, r in enumerate(rows):
            t = templates[r]
            if t is not None and len(out[r]) < len(t) and t[len(out[r])] != FREE:
                nxt[j] = t[len(out[r])]
        new, ended = [[int(t)] for t in nxt.tolist()], [False] * len(rows)
        for j, r in enumerate(rows):
            if matchers[r] is not None:
                t, ended[j] = choose_ar(matchers[r], new[j][0], logits[j], params.temperature, params.top_k,
                                        params.top_p, gen)
                new[j] = [] if t is None else [t]
                nxt[j] = t if t is not None else nxt[j]
        keep = [j for j, r in enumerate(rows)
                if commit_tokens(r, new[j], out, reasons, eos, stop_fn, params.max_new_tokens,
                                 len(templates[r] or ()), ended[j])]
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
