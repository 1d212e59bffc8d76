"""The engine's vocabulary: per-request settings, engine settings, requests and the events a step returns.

    SamplingParams     one request's decoding settings (mode, steps, bounds, temperatures, seed, max tokens)
    EngineConfig       the engine's own settings (batch and memory budgets, chunk sizes, compile)
    Request            prompt ids + SamplingParams + an id
    Event              what `Engine.step()` reports for one request: committed ids, a draft canvas, a finish
    TokenLogprob       one token's log-probability and its most probable alternatives (Event.new_logprobs)

Torch-free, so the CLI and the server can validate a request without importing torch. Defaults have one home:
`SamplingParams.from_generation_config` reads a model's generation_config.json (transformers' field names);
every entry point (API, CLI, eval, bench, server) builds its SamplingParams through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

MODES = ("diffusion", "ar")
SAMPLERS = ("entropy_bound", "confidence")
MAX_STEPS = 1024  # denoising steps per canvas: far past any useful schedule (the release uses 48 per 256 tokens)
MAX_LOGPROBS = 20  # most alternatives reported per token (SamplingParams.logprobs, Request.prompt_logprobs), as OpenAI
# SamplingParams.grammar's kinds (engine/constrain.py compiles them): a JSON Schema, any JSON object, a regular
# expression, or an llguidance Lark grammar
GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "lark")


class RequestError(ValueError):
    """A request the engine cannot serve as asked; the message names the field and what to do instead."""


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit; retry later."""


@dataclass(frozen=True)
class SamplingParams:
    mode: str = "diffusion"  # "diffusion" (block diffusion, canvas after canvas) or "ar" (next token, same weights)
    max_new_tokens: int = 256  # exact: never a whole canvas more
    eos_token_ids: tuple[int, ...] | None = None  # stop at the first of these (None: never stop on EOS)
    seed: int | None = None  # the request's own generator; None: a fresh random seed
    # diffusion
    max_denoising_steps: int = 48  # per canvas (the release's default pace for 256-token canvases)
    entropy_bound: float = 0.1  # EB sampler: summed entropy (nats) of the positions accepted per step
    t_min: float = 0.4  # temperature of a canvas's last step
    t_max: float = 0.8  # temperature of a canvas's first step
    stability_threshold: int | None = 1  # adaptive stopping: argmax unchanged for this many steps ...
    confidence_threshold: float | None = 0.005  # ... and mean entropy below this (None in either: never stop early)
    sampler: str = "entropy_bound"  # or "confidence" (commit the most confident proposals, keep them)
    commit_threshold: float = 0.95  # confidence sampler: also commit any proposal more probable than this
    # ar
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    # output
    # Log-probabilities of the generated tokens: None = off; N = each token's log-probability plus its N most
    # probable alternatives (0 <= N <= MAX_LOGPROBS). They are the model's own distribution (the raw log-softmax of
    # the logits: temperature 1, no top-k/top-p, no grammar mask), whatever the sampling settings: AR mode, the
    # next-token distribution the token was chosen from; diffusion, the denoiser's distribution at the token's canvas
    # position at the denoising step that chose it (the canvas's last step for the entropy-bound sampler, the step
    # that committed the position for the confidence sampler; engine.Engine._score_canvases has the details).
    logprobs: int | None = None
    drafts: bool = False  # report the draft canvas after every denoising step (Event.draft)
    # Fixed output positions (canvas templates, infilling): template[i] is the token id the i-th generated token is
    # clamped to, or -1 (sampler.FREE) where the model fills in. Diffusion clamps them at every denoising step; AR
    # emits them as they come. EOS inside the template's span does not end the request (a hole may fill with it);
    # max_new_tokens must cover the template.
    template: tuple[int, ...] | None = None
    # Grammar-constrained decoding (engine/constrain.py): one of {"json_schema": {...}}, {"json_object": True},
    # {"regex": "..."}, {"lark": "..."}; every output is then in the grammar's language (cut at max_new_tokens:
    # finish_reason "length"). Needs an engine built with the tokenizer's `Grammars`. Not hashed: a dict.
    grammar: dict | None = field(default=None, hash=False, compare=True)
    # A LoRA adapter served beside the base weights (lora.attach_adapters, `dgemma serve --lora NAME=PATH`): its
    # name. None: the base model.
    adapter: str | None = None

    @classmethod
    def from_generation_config(cls, g: dict | None, **overrides) -> SamplingParams:
        """The settings of a generation_config.json (field names as in transformers), then `overrides` on top.

        A key the file lacks keeps the dataclass default; an override of None keeps the file's value."""
        g = g or {}
        own, sc = g.get("dgemma") or {}, g.get("sampler_config") or {}
        if not isinstance(own, dict) or not isinstance(sc, dict):
            raise RequestError("generation_config.json: 'dgemma' and 'sampler_config' must be JSON objects, e.g. "
                               '"dgemma": {"sampler": "confidence"}; fix or remove them')
        eos = g.get("eos_token_id")
        values = {
            "max_new_tokens": g.get("max_new_tokens"), "max_denoising_steps": g.get("max_denoising_steps"),
            "entropy_bound": sc.get("entropy_bound"), "t_min": g.get("t_min"), "t_max": g.get("t_max"),
            "stability_threshold": g.get("stability_threshold"),
            "confidence_threshold": g.get("confidence_threshold"),
            "eos_token_ids": tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else None,
            # dgemma's own keys (transformers keeps unknown keys as plain attributes)
            "sampler": own.get("sampler"), "commit_threshold": own.get("commit_threshold"),
        }
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise RequestError(f"unknown sampling setting(s) {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: v for k, v in values.items() if v is not None})

    def with_(self, **changes) -> SamplingParams:
        return replace(self, **changes)

    def validate(self) -> SamplingParams:
        """Raise RequestError naming the first impossible setting; returns self."""
        def num(name, ok, rule, integer=False):
            v = getattr(self, name)
            if v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
                raise RequestError(f"{name} must be {'an integer' if integer else 'a number'} (got {v!r})")
            if not integer and not math.isfinite(v):
                raise RequestError(f"{name} must be a finite number (got {v})")
            if not ok(v):
                raise RequestError(f"{name} must be {rule} (got {v})")

        if self.mode not in MODES:
            raise RequestError(f"mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.sampler not in SAMPLERS:
            raise RequestError(f"sampler must be one of {', '.join(SAMPLERS)} (got {self.sampler!r})")
        num("max_new_tokens", lambda v: v >= 1, ">= 1", integer=True)
        num("max_denoising_steps", lambda v: 1 <= v <= MAX_STEPS, f"in [1, {MAX_STEPS}]", integer=True)
        num("entropy_bound", lambda v: v > 0, "> 0")
        num("t_min", lambda v: v > 0, "> 0 (a canvas's last step divides the logits by it)")
        num("t_max", lambda v: v > self.t_min, f"> t_min ({self.t_min})")
        num("stability_threshold", lambda v: 0 <= v <= MAX_STEPS, f"in [0, {MAX_STEPS}]", integer=True)
        num("confidence_threshold", lambda v: v > 0, "> 0")
        num("commit_threshold", lambda v: 0 < v <= 1, "in (0, 1]")
        num("temperature", lambda v: 0 <= v <= 100, "in [0, 100]")
        num("top_k", lambda v: v >= 1, ">= 1", integer=True)
        num("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        num("logprobs", lambda v: 0 <= v <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}] (the most alternatives per token)",
            integer=True)
        num("seed", lambda v: 0 <= v < 2**63, "in [0, 2**63)", integer=True)
        if self.eos_token_ids is not None and not all(isinstance(t, int) and t >= 0 for t in self.eos_token_ids):
            raise RequestError(f"eos_token_ids must be non-negative token ids (got {self.eos_token_ids!r})")
        if self.grammar is not None:
            check_grammar(self.grammar)
            if self.template is not None:
                raise RequestError("a grammar and a template cannot be combined; give one of them")
        if self.template is not None:
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= -1 for t in self.template):
                raise RequestError("template must hold token ids (>= 0) and -1 for the positions to fill")
            if len(self.template) > self.max_new_tokens:
                raise RequestError(f"the template spans {len(self.template)} tokens, over max_new_tokens="
                                   f"{self.max_new_tokens}; raise max_new_tokens to at least {len(self.template)}")
        return self


def check_grammar(grammar) -> None:
    """RequestError unless `grammar` has SamplingParams.grammar's shape (the library checks the contents)."""
    shapes = ('{"json_schema": {...}}, {"json_object": true}, {"regex": "..."} or {"lark": "..."}')
    if not isinstance(grammar, dict) or len(grammar) != 1:
        raise RequestError(f"grammar must be one of {shapes} (got {grammar!r:.80})")
    (kind, value), = grammar.items()
    if kind not in GRAMMAR_KINDS:
        raise RequestError(f"unknown grammar kind {kind!r}: use one of {', '.join(GRAMMAR_KINDS)}")
    if kind == "json_schema" and not isinstance(value, dict):
        raise RequestError(f"json_schema must be a JSON object (a schema such as {{\"type\": \"object\"}}), got "
                           f"{type(value).__name__}")
    if kind in ("regex", "lark") and (not isinstance(value, str) or not value):
        raise RequestError(f"{kind} must be a non-empty string (got {value!r:.80})")
    if kind == "json_object" and value is not True:
        raise RequestError(f"json_object must be true (got {value!r:.80})")


PREFILL_SPAN = 256  # prompt tokens per encoder chunk: the engine's default, and the static cache's spare room


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 64  # rows (K/V slots) decoded at once; more requests wait in the queue
    max_model_len: int | None = None  # positions per slot (prompt + new tokens); None: the model's, within budget
    kv_memory_mb: float = 1024.0  # K/V pool budget; max_model_len shrinks to fit it
    prefill_chunk: int = PREFILL_SPAN  # prompt tokens per encoder chunk, and the prompt tokens one step may prefill
    max_queue: int = 1024  # waiting requests beyond this get QueueFull
    # Run the layer pieces between attention calls and the diffusion sampler as inductor-compiled graphs at bucketed
    # row counts (compiled.py; compiled once per bucket, on first use). Not bit-identical to eager: opt-in.
    compile: bool = False
    sampler_chunk: int | None = None  # canvas positions per sampler chunk (None: about 2 MiB of logits)
    # Pad every matmul to a minimum height so that a request's tokens do not depend on how many others share the
    # step (BLAS kernels for very few rows round differently). Off: a request alone matches the reference path
    # bit for bit; on: a request matches itself alone in this engine, whoever it shares steps with.
    batch_invariant: bool = False

    def validate(self) -> EngineConfig:
        checks = [("max_batch", self.max_batch >= 1, ">= 1"), ("prefill_chunk", self.prefill_chunk >= 1, ">= 1"),
                  ("max_queue", self.max_queue >= 0, ">= 0"),
                  ("kv_memory_mb", math.isfinite(self.kv_memory_mb) and self.kv_memory_mb > 0, "> 0 and finite"),
                  ("max_model_len", self.max_model_len is None or self.max_model_len >= 1, ">= 1"),
                  ("sampler_chunk", self.sampler_chunk is None or self.sampler_chunk >= 1, ">= 1")]
        for name, ok, rule in checks:
            if not ok:
                raise RequestError(f"engine setting {name} must be {rule} (got {getattr(self, name)})")
        return self


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # Log-probabilities of the prompt's own tokens (echo, scoring): None = off; N = every prompt token's
    # log-probability under the encoder given the tokens before it, plus its N most probable alternatives (the first
    # token has none: Event.prompt_logprobs starts with None). Any mode: they come from the encoder's prefill.
    prompt_logprobs: int | None = None


@dataclass
class TokenLogprob:
    """A token's natural-log probability under the model's raw distribution (log-softmax of the logits,
    temperature 1), and the `top` most probable tokens of that distribution, most probable first. AR and prompt
    tokens: the next-token distribution; diffusion tokens: the denoiser's at the token's canvas position, at the step
    that chose it (SamplingParams.logprobs)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob)


@dataclass
class Draft:
    """A diffusion row's canvas after one denoising step."""
    offset: int  # tokens of this request committed before this canvas
    canvas_index: int  # 0-based
    step: int  # 1-based step within the canvas
    ids: list[int]  # the draft: argmax of every canvas position (accepted or not)
    accepted: list[bool]  # positions the sampler accepted (entropy bound) or committed (confidence) this step
    mean_entropy: float | None  # nats, over the canvas (entropy-bound sampler; None for confidence)
    entropy: list[float] | None = None  # nats, per canvas position (entropy-bound sampler; None for confidence)
    temperature: float | None = None  # the temperature this step sampled at


@dataclass
class Event:
    request_id: str
    new_ids: list[int] = field(default_factory=list)  # committed this step: final, in order
    draft: Draft | None = None  # only for requests with params.drafts
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS), "length" (max_new_tokens) or "error" (see `error`)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # committed so far
    decoder_passes: int = 0  # forwards this request took part in (AR: encoder passes)
    steps_per_canvas: list[int] = field(default_factory=list)  # with finished: denoising steps of each canvas
    error: str | None = None  # with finish_reason "error": what went wrong (non-finite logits)
    # with params.logprobs: one per new_ids entry, in order
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    # with Request.prompt_logprobs: this step's share of the prompt, in prompt order (each prefill chunk reports its
    # tokens; the prompt's first token, which nothing predicts, is None). Joined over the steps: one per prompt token.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
