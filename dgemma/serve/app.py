"""The HTTP layer of `dgemma serve`: OpenAI wire schemas, routes, SSE streaming, errors and metrics on FastAPI.

    app = create_app(engine, tokenizer, model_name="dgemma-py-small", generation_config=lm.generation_config,
                     canvas_length=lm.model.config.canvas_length)
    uvicorn.run(app, host="127.0.0.1", port=8000)

The wire format, dgemma's extra request fields and the `dgemma_draft` chunk field are documented in
dgemma/serve/main.py, which also builds the app from a model (`server.build_app`). The engine runs in its own thread
(dgemma/serve/loop.py); handlers turn its events into text with dgemma/serve/text.py. This module imports
FastAPI, pydantic and prometheus-client at the top: import it only where the server runs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dgemma.params import MAX_LOGPROBS, QueueFull, RequestError, SamplingParams, check_grammar
from dgemma.params import Request as EngineRequest
from dgemma.serve.loop import EngineFailure, EngineLoop
from dgemma.serve.text import TextStream, Token, TokenStream, token_bytes, token_label
from dgemma.tokenizer import TokenizerError

log = logging.getLogger("dgemma.serve.main")

MAX_BODY_BYTES = 8 * 2**20  # larger request bodies get 413 (a prompt filling a 128k context is about 0.5 MiB)
MAX_DRAIN_BYTES = 64 * 2**20  # an oversized body is read and dropped up to this, so the client sees the 413
MAX_CHOICES = 16  # n x prompts per request
MAX_STOPS = 4  # as OpenAI
RETRY_AFTER_S = 1  # Retry-After of a 429 (the queue is full)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
# With API keys set, these need `Authorization: Bearer KEY` (/health, the page and its static files stay open).
KEYED_PREFIXES, KEYED_PATHS = ("/v1/",), ("/v1", "/metrics", "/playground/vocab.json")


# ---- request schemas (the OpenAI fields dgemma reads, then its own) ---------------------------------------------


class _Strict(BaseModel):
    # strict: "5" is not an integer and 1 is not a boolean, as in OpenAI's API; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, description="a last chunk with empty choices and the usage")
    include_drafts: bool | None = Field(
        None, description="dgemma: after every denoising step, a chunk whose choice carries `dgemma_draft` "
                          "{offset, canvas_index, step, text, ids, accepted, mean_entropy}")


class DgemmaSettings(_Strict):
    """dgemma's own request fields (send them as extra body fields; a missing one keeps the model's default)."""
    mode: Literal["diffusion", "ar"] | None = Field(
        None, description='dgemma: "diffusion" (default: block diffusion, canvas after canvas) or "ar" '
                          "(one token per forward, same weights)")
    denoising_steps: int | None = Field(None, description="dgemma: most denoising steps per canvas")
    entropy_bound: float | None = Field(None, description="dgemma: entropy-bound sampler, nats accepted per step")
    t_min: float | None = Field(None, description="dgemma: temperature of a canvas's last step")
    t_max: float | None = Field(None, description="dgemma: temperature of a canvas's first step")
    sampler: Literal["entropy_bound", "confidence"] | None = Field(None, description="dgemma: diffusion sampler")
    commit_threshold: float | None = Field(
        None, description="dgemma: confidence sampler, also commit any token more probable than this")
    stability_threshold: int | None = Field(
        None, description="dgemma: adaptive stopping, steps the argmax must stay unchanged")
    confidence_threshold: float | None = Field(
        None, description="dgemma: adaptive stopping, mean entropy (nats) below which a canvas may stop")
    top_k: int | None = Field(None, description="ar mode: sample from the k most probable tokens")
    ignore_eos: bool | None = Field(None, description="dgemma: do not stop at the end-of-sequence token")
    regex: str | None = Field(None, description="dgemma: constrain the output to text matching this regular "
                                                "expression (whole output; not with response_format)")
    template: str | None = Field(None, description="dgemma: the output as fixed text with holes, {{N}} a hole of at "
                                                   "most N tokens (\\{{ a literal {{); the answer is the template "
                                                   "filled in, its span the request's length (not with suffix, "
                                                   "response_format or regex)")
    record: bool | None = Field(None, description="dgemma: write each choice's trajectory (every denoising step) to "
                                                  "the server's --record-dir as ID-INDEX.jsonl (dgemma.engine.trajectory)")


class _Common(DgemmaSettings):
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} strings; the text ends before the "
                                                            "first of them")
    seed: int | None = Field(None, description="same seed, same request: same text")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="choices; choice i uses seed + i")
    temperature: float | None = Field(None, description="ar mode only (diffusion uses t_min/t_max)")
    top_p: float | None = Field(None, description="ar mode only")
    presence_penalty: float | None = None  # accepted only as 0
    frequency_penalty: float | None = None  # accepted only as 0
    logit_bias: dict[str, float] | None = None  # accepted only when empty
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"} (default), {"type": "json_object"} or {"type": "json_schema", '
                          '"json_schema": {"name": ..., "schema": {...}, "strict": ...}}: the output is constrained '
                          "to JSON (valid under the schema), in either mode")


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids or a list of such lists")
    max_tokens: int | None = Field(None, ge=0, description="exact upper bound on the new tokens of each choice (0: "
                                                           "none, with echo: score the prompt)")
    echo: bool | None = Field(None, description="the prompt's text (and with logprobs its tokens) before the "
                                                "completion")
    logprobs: int | None = Field(None, description=f"each token's log-probability and its N most probable "
                                                   f"alternatives, 0 <= N <= {MAX_LOGPROBS} (either mode; diffusion: "
                                                   "at the denoising step that chose the token)")
    suffix: str | None = Field(None, description="fill in the middle: the text after the completion; the completion "
                                                 "is a hole of max_tokens tokens between the prompt and the suffix, "
                                                 "and the answer is the hole's text alone (not with template)")
    best_of: int | None = None  # accepted only as n


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="exact upper bound on the new tokens")
    max_tokens: int | None = Field(None, ge=1, description="the older name of max_completion_tokens")
    logprobs: bool | None = Field(None, description="each content token's log-probability (either mode; diffusion: at the "
                                                       "denoising step that chose the token)")
    top_logprobs: int | None = Field(None, description=f"with logprobs: the N most probable alternatives of each "
                                                       f"token, 0 <= N <= {MAX_LOGPROBS}")
    tools: list[Any] | None = None  # accepted only when empty
    functions: list[Any] | None = None  # accepted only when empty


_UNION_MESSAGES = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": f"stop must be a string or a list of up to {MAX_STOPS} strings",
    "content": "content must be a string, null or a list of {\"type\": \"text\", \"text\": ...} parts",
}


# ---- errors -----------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An OpenAI-style error answer: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse(_error_body(self.message, self.kind, self.param, self.code), self.status,
                            headers=self.headers)


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _is_union_tag(part: object) -> bool:
    """pydantic names the union member that failed in an error's location ('str', 'list[int]', 'TextPart')."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool") or part[:1].isupper())


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    loc = [p for p in err["loc"] if not _is_union_tag(p)]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    names = [p for p in loc if isinstance(p, str)]
    if err["type"] == "missing":
        message = f"{param} is required"
    elif names and names[-1] in _UNION_MESSAGES and any(_is_union_tag(p) for p in err["loc"]):
        message = _UNION_MESSAGES[names[-1]] + (f" (at {param})" if param != names[-1] else "")
    else:
        message = f"{param}: {err['msg']}" if param else err["msg"]
    return ApiError(400, message, param=param)


_WIRE_NAMES = {"max_new_tokens": "max_tokens", "max_denoising_steps": "denoising_steps"}


def _sampling_error(e: RequestError) -> ApiError:
    """A SamplingParams.validate message, with dgemma's field names turned into the request's."""
    message = str(e)
    name = message.split(" ", 1)[0]
    wire = _WIRE_NAMES.get(name, name)
    if name in _WIRE_NAMES:
        message = wire + message[len(name):]
    return ApiError(400, message, param=wire if wire.isidentifier() else None)


async def _read_json(request: HTTPRequest, schema: type[BaseModel]) -> BaseModel:
    raw = await request.body()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text; send JSON") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object (got {type(data).__name__})")
    for key in schema.model_fields.keys() & data.keys():  # an escape such as \ud800 alone: a str no tokenizer takes
        try:
            json.dumps(data[key], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{key} holds a lone UTF-16 surrogate (an escape in \\ud800-\\udfff without its "
                                "pair), which is not text; send UTF-8 text", param=key) from None
        except (TypeError, ValueError, RecursionError):
            pass  # left to the schema's checks
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply") from None


# ---- one request's generation --------------------------------------------------------------------------------


@dataclass
class _Choice:
    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    prompt_index: int = 0
    finish_reason: str | None = None
    recorder: Any = None  # dgemma.engine.trajectory.StreamRecorder when the request asked for `record`
    top: int | None = None  # logprobs asked for: alternatives per token (None: no logprobs)
    echo: bool = False  # the prompt comes first (its tokens' logprobs too, with `top`)
    score_only: bool = False  # max_tokens 0: the engine's one token is not shown (the prompt is the answer)
    tokens: TokenStream | None = None  # the completion's tokens with their logprobs (with `top`)
    prompt_logprobs: list = field(default_factory=list)  # echo with `top`: arrived so far
    offset: int = 0  # characters of the choice's text covered by the tokens reported so far (text_offset)
    layout: _Layout | None = None  # a template or suffix: which output positions the answer shows
    emitted: int = 0  # output positions committed so far (with a layout)
    full_holes: int = 0  # holes whose last position the model filled with a token, not filler (with a layout)

    @property
    def completion_tokens(self) -> int:
        return self.text.tokens

    def shown(self, ids: Sequence[int], logprobs: list) -> tuple[list[int], list]:
        """The newly committed ids (and their logprobs) that belong to the answer: all of them without a template;
        with one, filler inside holes is dropped, and for a suffix everything but the hole."""
        if self.layout is None:
            return list(ids), logprobs
        keep_ids, keep_lps = [], []
        for i, lp in zip(ids, logprobs, strict=True):
            pos, self.emitted = self.emitted, self.emitted + 1
            kind = self.layout.kinds[pos] if pos < len(self.layout.kinds) else FIXED
            filler = i in self.layout.filler
            if pos in self.layout.hole_ends and not filler:
                self.full_holes += 1
            if kind == FIXED or (kind == HOLE and not filler):
                keep_ids.append(i)
                keep_lps.append(lp)
        return keep_ids, keep_lps

    def template_finish(self, reason: str) -> str:
        """A template or suffix ends with its span: "stop" when the model ended every hole before its room ran out
        (its last position holds filler), else "length" (a hole used all its tokens)."""
        if self.layout is None or reason != "length":
            return reason
        return "length" if self.full_holes else "stop"


FIXED, HOLE, HIDDEN = 0, 1, 2  # _Layout.kinds: fixed text shown, a hole's position, a suffix's position not shown


@dataclass(frozen=True)
class _Layout:
    """The output positions of a template or suffix request: what each one is (FIXED, HOLE, HIDDEN), the last
    position of each hole, and the ids that are filler inside a hole (EOS and padding)."""
    kinds: tuple[int, ...]
    hole_ends: frozenset[int]
    filler: frozenset[int]


@dataclass
class _Piece:
    """Text newly safe to show, and the tokens (with logprobs) newly covered by the text shown (None: not asked)."""
    text: str
    tokens: list[Token] | None = None


class _Failed(Exception):
    def __init__(self, failure: EngineFailure):
        super().__init__(failure.message)
        self.failure = failure


@dataclass
class _Generation:
    """The engine requests of one HTTP request (one per choice) and the queue their events arrive on."""
    state: _State
    id: str
    choices: list[_Choice]
    include_drafts: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending: dict[str, _Choice] = {}

    def deliver(self, item: object) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def start(self) -> None:
        requests = [EngineRequest(c.request_id, c.prompt_ids, c.params,
                                  prompt_logprobs=c.top if c.echo and c.top is not None else None)
                    for c in self.choices]
        future = self.state.engine.submit(requests, self.deliver)
        try:
            await asyncio.wrap_future(future)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except RequestError as e:
            raise ApiError(400, str(e)) from None
        except asyncio.CancelledError:  # the handler went away while the engine thread was adding
            future.add_done_callback(lambda f: f.exception() is None and self._abort(self.choices))
            raise
        except RuntimeError as e:  # the engine thread is stopping
            raise ApiError(503, f"the engine cannot take requests ({e})") from None
        self.pending = {c.request_id: c for c in self.choices}

    def _abort(self, choices: Sequence[_Choice]) -> None:
        for c in choices:
            self.state.engine.abort(c.request_id)

    def cancel(self, reason: str = "disconnect") -> None:
        """Abort every choice still running (the client left, or the response failed)."""
        for c in self.choices:  # unfinished recordings are dropped (a no-op for finished ones)
            if c.recorder is not None:
                c.recorder.abandon()
        if self.pending:
            self.state.aborts.labels(reason).inc(len(self.pending))
            self._abort(list(self.pending.values()))
            self.pending.clear()

    async def pieces(self) -> AsyncIterator[tuple[str, _Choice, Any]]:
        """("draft", choice, Draft), ("text", choice, _Piece) and ("finish", choice, reason) in arrival order."""
        for c in self.choices:
            if c.echo and c.top is None:  # echo without logprobs: the prompt's text at once
                yield "text", c, _Piece(self.state.tokenizer.decode(c.prompt_ids))
        while self.pending:
            item = await self.queue.get()
            if isinstance(item, EngineFailure):
                raise _Failed(item)
            c = self.pending.get(item.request_id)
            if c is None:
                continue
            if c.recorder is not None:
                c.recorder.event(item)
            if item.draft is not None and self.include_drafts:
                yield "draft", c, item.draft
            if c.echo and c.top is not None and (echoed := self._echo(c, item.prompt_logprobs)) is not None:
                yield "text", c, echoed
            if item.new_ids and not c.score_only:
                ids, lps = c.shown(item.new_ids, _aligned(item.new_logprobs, len(item.new_ids)))
                piece = _Piece(c.text.push(ids))
                if c.tokens is not None:
                    c.tokens.push(ids, lps)
                    piece.tokens = c.tokens.release(len(c.text.text), final=c.text.stopped)
                if piece.text or piece.tokens:
                    yield "text", c, piece
                if c.text.stopped:  # a stop string: the row is freed now, its remaining tokens are never made
                    del self.pending[c.request_id]
                    self.state.engine.abort(c.request_id)
                    self.state.aborts.labels("stop_string").inc()
                    c.finish_reason = "stop"
                    if c.recorder is not None:
                        c.recorder.finish("stop")
                    yield "finish", c, "stop"
                    continue
            if item.finished:
                del self.pending[c.request_id]
                if item.finish_reason not in ("stop", "length"):
                    error = getattr(item, "error", None) or f"the engine ended the request ({item.finish_reason})"
                    raise _Failed(EngineFailure(error))
                rest = _Piece(c.text.finish())
                if c.tokens is not None:
                    rest.tokens = c.tokens.release(len(c.text.text), final=True)
                if rest.text or rest.tokens:
                    yield "text", c, rest
                c.finish_reason = ("length" if c.score_only else "stop" if c.text.stopped
                                   else c.template_finish(item.finish_reason))
                yield "finish", c, c.finish_reason

    def _echo(self, c: _Choice, entries: list) -> _Piece | None:
        """Once the whole prompt's logprobs arrived (prefill may take several steps): its text and its tokens."""
        if not entries:
            return None
        c.prompt_logprobs.extend(entries)
        if len(c.prompt_logprobs) < len(c.prompt_ids):
            return None
        prompt = TokenStream(self.state.tokenizer)
        prompt.push(c.prompt_ids, c.prompt_logprobs)
        tokens = prompt.release(1 << 62, final=True)
        return _Piece("".join(t.text for t in tokens), tokens)

    def logprobs_json(self, wire, c: _Choice, tokens: list[Token] | None) -> dict | None:
        """The wire's logprobs object for `tokens` (the next ones of choice `c`); None when it did not ask."""
        if c.top is None:
            return None
        tokens = tokens or []
        out = wire.logprobs(self.state.tokenizer, tokens, c.offset)
        c.offset += sum(len(t.text) for t in tokens)
        return out

    def usage(self) -> dict:
        prompts = {c.prompt_index: len(c.prompt_ids) for c in self.choices}  # a prompt counts once, whatever n
        prompt, completion = sum(prompts.values()), sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def draft_json(self, draft) -> dict:
        return {"offset": draft.offset, "canvas_index": draft.canvas_index, "step": draft.step,
                "text": self.state.tokenizer.decode(draft.ids), "ids": list(draft.ids),
                "accepted": [bool(a) for a in draft.accepted], "mean_entropy": draft.mean_entropy}


# ---- the two endpoints' wire shapes ---------------------------------------------------------------------------


def _aligned(logprobs: list, n: int) -> list:
    """An event's logprobs, one per new id (None where an engine reported none)."""
    return list(logprobs) if len(logprobs) == n else [None] * n


class _CompletionWire:
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    @staticmethod
    def first(index: int) -> dict | None:
        return None

    @staticmethod
    def delta(index: int, text: str = "", finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    @staticmethod
    def draft(index: int) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": None}

    @staticmethod
    def choice(index: int, text: str, finish: str, logprobs: dict | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    @staticmethod
    def logprobs(tokenizer, tokens: list[Token], offset: int) -> dict:
        """OpenAI's legacy shape: parallel lists; a prompt's first token has null logprob and alternatives."""
        offsets, tops = [], []
        for t in tokens:
            offsets.append(offset)
            offset += len(t.text)
            top: dict[str, float] | None = None
            if t.logprob is not None:
                top = {}
                for i, v in t.logprob.top:  # two ids with one text: the more probable keeps the key
                    top.setdefault(token_label(tokenizer, i), v)
            tops.append(top)
        return {"tokens": [t.text for t in tokens],
                "token_logprobs": [None if t.logprob is None else t.logprob.logprob for t in tokens],
                "top_logprobs": tops, "text_offset": offsets}


class _ChatWire:
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def first(index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def delta(index: int, text: str = "", finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"index": index, "delta": {"content": text} if finish is None else {}, "logprobs": logprobs,
                "finish_reason": finish}

    @staticmethod
    def draft(index: int) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def choice(index: int, text: str, finish: str, logprobs: dict | None = None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs, "finish_reason": finish}

    @staticmethod
    def logprobs(tokenizer, tokens: list[Token], offset: int) -> dict:
        """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}."""
        def alt(i: int, v: float) -> dict:
            return {"token": token_label(tokenizer, i), "logprob": v, "bytes": list(token_bytes(tokenizer, i))}

        content = []
        for t in tokens:
            raw = t.text.encode("utf-8") if t.cut else token_bytes(tokenizer, t.token_id)
            lp = t.logprob
            content.append({"token": t.text, "logprob": -9999.0 if lp is None else lp.logprob, "bytes": list(raw),
                            "top_logprobs": [] if lp is None else [alt(i, v) for i, v in lp.top]})
        return {"content": content, "refusal": None}


def _sse(obj: dict) -> bytes:
    # ASCII JSON: U+2028, U+0085 and friends are line breaks to some SSE readers (str.splitlines); escape them all
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class _SSEResponse(StreamingResponse):
    """Server-sent events that always watch for the client leaving (whatever the ASGI spec version), so that a
    closed stream cancels its generator at once; `on_close` runs however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def pump() -> None:
                    await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(pump)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._on_close()


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ---- the app --------------------------------------------------------------------------------------------------


@dataclass
class _State:
    engine: EngineLoop
    tokenizer: Any
    model_name: str
    generation_config: dict
    eos_token_ids: tuple[int, ...] | None
    canvas_length: int
    vocab_size: int
    default_max_tokens: int
    registry: CollectorRegistry
    aborts: Counter
    started: int = field(default_factory=lambda: int(time.time()))
    record_dir: str | None = None  # where requests with `record: true` write their trajectories
    default_mode: str | None = None  # the mode of requests that name none (None: SamplingParams' default)
    adapters: dict[str, str] = field(default_factory=dict)  # served LoRA adapters: name -> folder (model: NAME)
    model_requests: Counter | None = None  # completion requests per model name (the base and each adapter)


class _EngineCollector:
    """Prometheus view of the engine thread's last metrics() snapshot, read at scrape time."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def collect(self):
        s = self.loop.stats
        passes = s.get("decoder_passes", 0) + s.get("encoder_passes", 0)
        gauges = [("dgemma_requests_waiting", "requests in the engine's queue", s.get("waiting", 0)),
                  ("dgemma_requests_running", "rows being decoded", s.get("running", 0)),
                  ("dgemma_tokens_per_second", "committed tokens per second over the last 10 s",
                   s.get("tokens_per_s", 0.0)),
                  ("dgemma_tokens_per_forward", "committed tokens per model pass (encoder + decoder), since start",
                   s.get("tokens", 0) / passes if passes else 0.0)]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [("dgemma_tokens", "committed tokens", "tokens"), ("dgemma_steps", "engine steps", "steps"),
                    ("dgemma_decoder_passes", "decoder (denoising) passes", "decoder_passes"),
                    ("dgemma_encoder_passes", "encoder (prefill, commit, AR) passes", "encoder_passes"),
                    ("dgemma_engine_failures", "engine steps that raised", "engine_failures")]
        for name, doc, key in counters:
            yield CounterMetricFamily(name, doc, value=s.get(key, 0))


class _Guard:
    """ASGI middleware: checks the API key (401), caps the request body (413), hands it on whole, and counts requests
    by route and status."""

    def __init__(self, app, max_body: int, requests: Counter, api_keys: Sequence[str] = ()):
        self.app, self.max_body, self.requests = app, max_body, requests
        self.keys = [k.encode("utf-8") for k in api_keys if k]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "") if scope.get("path", "") in ROUTES else "other"
        status = 500

        async def counted_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if (denied := self._denied(scope)) is not None:
                await denied.response()(scope, receive, counted_send)
                return
            body = await self._read(receive)
            if body is None:  # the client left while sending
                status = 499
                return
            if isinstance(body, ApiError):
                await body.response()(scope, receive, counted_send)
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counted_send)
        finally:
            self.requests.labels(route, str(status)).inc()

    def _denied(self, scope) -> ApiError | None:
        """A 401 when keys are set, the route needs one and `Authorization: Bearer KEY` does not hold one of them.
        Every key is compared, each in constant time, so the answer's timing tells nothing about any key."""
        path = scope.get("path", "")
        if not self.keys or not (path.startswith(KEYED_PREFIXES) or path in KEYED_PATHS):
            return None
        header = next((v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"), None)
        scheme, _, given = (header or b"").strip().partition(b" ")
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given.strip(), key)
        if ok and scheme.lower() == b"bearer":
            return None
        message = ("this server needs an API key: send the header Authorization: Bearer KEY" if header is None
                   else "invalid API key: send Authorization: Bearer KEY with one of the server's keys")
        return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read(self, receive) -> bytes | ApiError | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size <= self.max_body:
                chunks.append(message.get("body", b""))
            elif size > MAX_DRAIN_BYTES:
                break
            if not message.get("more_body", False):
                break
        if size > self.max_body:
            return ApiError(413, f"the request body is over {self.max_body} bytes", code="request_too_large")
        return b"".join(chunks)


def create_app(engine, tokenizer, *, model_name: str, generation_config: dict | None = None,
               eos_token_ids: Sequence[int] | None = None, canvas_length: int = 1, vocab_size: int | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, record_dir: str | None = None,
               api_keys: Sequence[str] = (), default_mode: str | None = None,
               adapters: dict[str, str] | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (the add/step/abort contract of dgemma/engine/engine.py).

    `api_keys`: when any, every /v1 route, /metrics and the page's vocabulary need `Authorization: Bearer KEY`
    (401 otherwise); /health and the page's files stay open. `default_mode`: "diffusion" or "ar" for requests that
    send no `mode` (None: the engine's default, diffusion). `adapters`: name -> folder of the LoRA adapters the
    engine's model carries (lora.attach_adapters); a request chooses one with `model: NAME`.

    The engine thread starts with the app (lifespan startup) and stops with it. `eos_token_ids` defaults to the
    generation config's, else the tokenizer's stop ids; `canvas_length` is the model's C (a diffusion request
    needs whole canvases of room); `vocab_size` bounds token-id prompts (default: the tokenizer's)."""
    g = dict(generation_config or {})
    if eos_token_ids is None:
        eos = g.get("eos_token_id")
        eos_token_ids = (eos if isinstance(eos, list) else [eos]) if eos is not None else tokenizer.stop_ids()
    registry = CollectorRegistry()
    requests = Counter("dgemma_http_requests", "HTTP requests by route and status", ["route", "status"],
                       registry=registry)
    aborts = Counter("dgemma_aborted_requests", "engine requests the server aborted, by reason", ["reason"],
                     registry=registry)
    loop = EngineLoop(engine)
    registry.register(_EngineCollector(loop))
    state = _State(loop, tokenizer, model_name, g, tuple(eos_token_ids), canvas_length,
                   vocab_size or tokenizer.vocab_size, SamplingParams.from_generation_config(g).max_new_tokens,
                   registry, aborts, adapters=dict(adapters or {}))
    state.model_requests = Counter("dgemma_model_requests", "completion requests by model (the base or an adapter)",
                                   ["model"], registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop.stop)

    app = FastAPI(title="dgemma", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  description="OpenAI-compatible completions and chat over a block-diffusion LM. "
                              "See the dgemma.serve.main module docstring for dgemma's extra request fields.")
    state.record_dir = record_dir
    state.default_mode = default_mode
    app.state.dgemma = state
    app.add_middleware(_Guard, max_body=max_body_bytes, requests=requests, api_keys=tuple(api_keys))

    _add_error_handlers(app)

    def body_schema(name: str) -> dict:
        return {"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}}

    @app.get("/health")
    async def health():
        if not loop.alive:
            return JSONResponse({"status": "engine stopped"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state, name) for name in (state.model_name, *state.adapters)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(state, model_id)
        return _model_card(state, model_id)

    @app.post("/v1/completions", openapi_extra=body_schema("CompletionRequest"))
    async def completions(request: HTTPRequest):
        return await _completions(request, state)

    @app.post("/v1/chat/completions", openapi_extra=body_schema("ChatRequest"))
    async def chat_completions(request: HTTPRequest):
        return await _chat_completions(request, state)

    app.openapi = lambda: _openapi(app)
    from dgemma.serve.playground import add_routes  # GET /: the playground page (dgemma/serve/web/)

    add_routes(app, tokenizer)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error body: ours (ApiError), routing (404/405), validation (400), and a crash (500,
    logged, the server keeps running)."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(_error_body(message, kind, code=str(exc.status_code)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return JSONResponse(_error_body(str(jsonable_encoder(exc.errors())), "invalid_request_error"), 400)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(_error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)


async def _completions(request: HTTPRequest, state: _State):
    """POST /v1/completions."""
    body = await _read_json(request, CompletionRequest)
    _check_model(state, body.model, count=True)
    _check_top(body.logprobs, "logprobs")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens must be >= 1 (0 only with echo: true, to score the prompt alone)",
                       param="max_tokens")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise ApiError(400, "best_of is not supported (only best_of == n)", param="best_of")
    prompts = _completion_prompts(state, body.prompt)
    return await _serve(request, state, body, _CompletionWire, prompts, body.max_tokens, "max_tokens", "prompt",
                        top=body.logprobs, echo=bool(body.echo))


async def _chat_completions(request: HTTPRequest, state: _State):
    """POST /v1/chat/completions."""
    body = await _read_json(request, ChatRequest)
    _check_model(state, body.model, count=True)
    _check_top(body.top_logprobs, "top_logprobs")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    _unsupported(body.tools, "tools", "tools are not supported by this server")
    _unsupported(body.functions, "functions", "functions are not supported by this server")
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if not isinstance(m.content, list) else [p.model_dump() for p in m.content]}
                for m in body.messages]
    try:
        ids = state.tokenizer.encode(state.tokenizer.apply_chat_template(messages))
    except TokenizerError as e:
        raise ApiError(400, str(e), param="messages") from None
    limit, name = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens is not None
                   else (body.max_tokens, "max_tokens"))
    return await _serve(request, state, body, _ChatWire, [ids], limit, name, "messages",
                        top=(body.top_logprobs or 0) if body.logprobs else None)


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI schema, with the request bodies the routes read themselves (to answer errors OpenAI's way)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model_cls in (CompletionRequest, ChatRequest):
            s = model_cls.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(s.pop("$defs", {}))
            components[model_cls.__name__] = s
        app.openapi_schema = schema
    return app.openapi_schema


def _model_card(state: _State, name: str) -> dict:
    card = {"id": name, "object": "model", "created": state.started, "owned_by": "dgemma",
            "max_model_len": state.engine.max_model_len, "canvas_length": state.canvas_length}
    if name in state.adapters:  # a LoRA adapter on the base weights (vLLM's shape: root and parent)
        card.update(root=state.adapters[name], parent=state.model_name)
    return card


def _check_model(state: _State, name: str | None, count: bool = False) -> None:
    if name is not None and name != state.model_name and name not in state.adapters:
        served = ", ".join(repr(n) for n in (state.model_name, *state.adapters))
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {served}",
                       param="model", code="model_not_found")
    if count and state.model_requests is not None:
        state.model_requests.labels(model=name or state.model_name).inc()


def _check_top(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"{param} must be in [0, {MAX_LOGPROBS}] (got {value}): at most {MAX_LOGPROBS} "
                            "alternatives per token", param=param)


def _unsupported(value, param: str, message: str) -> None:
    if value:  # null, false, 0, "" and [] mean "not asked for"
        raise ApiError(400, message, param=param)


def _completion_prompts(state: _State, prompt) -> list[list[int]]:
    tok = state.tokenizer
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty: give at least one character of text", param="prompt")
    add_bos = getattr(tok, "add_bos_default", tok.bos_id is not None)
    out = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise ApiError(400, "prompt is empty: give at least one character of text", param="prompt")
            out.append(tok.encode(p, add_bos=add_bos))
        else:
            if not p:
                raise ApiError(400, "prompt has an empty list of token ids", param="prompt")
            if not all(0 <= t < state.vocab_size for t in p):
                raise ApiError(400, f"prompt token ids must be in [0, {state.vocab_size})", param="prompt")
            out.append(list(p))
    return out


def _grammar(body: _Common) -> tuple[dict | None, str | None]:
    """(SamplingParams.grammar, the request field it came from) for response_format / regex."""
    rf = body.response_format
    kind = rf.get("type") if isinstance(rf, dict) else None
    if rf is not None and kind not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"response_format.type must be \"text\", \"json_object\" or \"json_schema\" (got "
                            f"{kind!r:.60})", param="response_format")
    if body.regex is not None and kind in ("json_object", "json_schema"):
        raise ApiError(400, "give either regex or a JSON response_format, not both", param="regex")
    if body.regex is not None:
        return {"regex": body.regex}, "regex"
    if kind == "json_object":
        return {"json_object": True}, "response_format"
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, 'response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}',
                           param="response_format")
        schema = spec.get("schema")
        if schema is None:  # OpenAI's schema is optional: then any JSON object
            return {"json_object": True}, "response_format"
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON object (a JSON Schema)",
                           param="response_format")
        return {"json_schema": schema}, "response_format"
    return None, None


async def _check_grammar(state: _State, grammar: dict, param: str) -> None:
    """A 400 naming the problem for a grammar the engine cannot enforce; never a silently unconstrained answer."""
    grammars = getattr(state.engine.engine, "grammars", None)
    if grammars is None:
        raise ApiError(400, "this server's engine cannot constrain output (no grammar support); drop "
                            f"{param}", param=param)
    try:
        await asyncio.to_thread(grammars.compile, grammar)
    except RequestError as e:
        raise ApiError(400, str(e), param=param) from None


@dataclass(frozen=True)
class _Shape:
    """A request's `template` (parsed once) or `suffix` (its text: the hole's length depends on the prompt)."""
    param: str  # the request field: "template" or "suffix"
    template: Any = None  # dgemma.template.Template
    suffix: str | None = None


def _template_request(state: _State, body: _Common, score_only: bool, grammar_param: str | None) -> _Shape | None:
    """The request's template or suffix, checked against the fields it cannot be combined with; None for neither."""
    from dgemma.template import TemplateError, encode, parse

    text, suffix = body.template, getattr(body, "suffix", None) or None
    if text is None and suffix is None:
        return None
    param = "template" if text is not None else "suffix"
    if text is not None and suffix is not None:
        raise ApiError(400, "give either suffix or template, not both (a suffix is the template \"{{N}}SUFFIX\" "
                            "with N = max_tokens)", param="suffix")
    if score_only:
        raise ApiError(400, f"{param} cannot be combined with max_tokens 0 (which scores the prompt alone); give "
                            "max_tokens >= 1 or leave it out", param="max_tokens")
    if grammar_param is not None:
        raise ApiError(400, f"{param} cannot be combined with {grammar_param}: a template fixes the output's text "
                            "around its holes, a grammar constrains the whole output; give one of them", param=param)
    if body.record:
        raise ApiError(400, f"a request with a {param} cannot be recorded yet; drop record", param="record")
    if suffix is not None:
        return _Shape(param, suffix=suffix)
    try:
        holes = sum(p for p in parse(text) if isinstance(p, int))
        if holes > state.engine.max_model_len:  # before building the ids: the holes alone overflow the context
            raise ApiError(400, f"the template's holes span {holes} tokens, over this server's "
                                f"{state.engine.max_model_len}-token context; shorten them", param="template",
                           code="context_length_exceeded")
        return _Shape(param, template=encode(state.tokenizer, text))
    except TemplateError as e:
        raise ApiError(400, str(e), param="template") from None
    except TokenizerError as e:
        raise ApiError(400, f"template: {e}", param="template") from None


def _fit_template(state: _State, shape: _Shape, ids: list[int], room: int, whole: int, max_tokens: int | None,
                  max_tokens_name: str) -> tuple[int, tuple[int, ...], _Layout]:
    """(max_new_tokens, SamplingParams.template, _Layout) of a template or suffix request for one prompt. The whole
    span must fit in the context (a 400 naming the field otherwise), as `api.generate_text` requires. A suffix's
    request stops at the end of the canvases holding the hole (ar: the hole's last token): the tokens after it cannot
    change the hole's (a canvas sees no later canvas), so they are never computed."""
    from dgemma.template import TemplateError, with_suffix

    canvases = f" in whole canvases of {whole}" if whole > 1 else ""
    filler = frozenset({*state.eos_token_ids, *([state.tokenizer.pad_id] if state.tokenizer.pad_id is not None
                                                 else [])})
    if shape.suffix is not None:
        tail = len(state.tokenizer.encode(shape.suffix, add_bos=False))
        hole = max_tokens if max_tokens is not None else max(1, min(state.default_max_tokens, room - tail))
        if hole + tail > room:
            need = (f"{max_tokens_name}={hole} plus the suffix's {tail} tokens need {hole + tail} positions"
                    if max_tokens is not None else f"the suffix's {tail} tokens and a hole need {hole + tail} positions")
            raise ApiError(400, f"{need} after the prompt's {len(ids)} tokens, but the {state.engine.max_model_len}-"
                                f"token context leaves {max(room, 0)}{canvases}; shorten the suffix or the prompt"
                                + (f", or lower {max_tokens_name}" if max_tokens is not None else ""),
                           param="suffix", code="context_length_exceeded")
        try:
            tpl = with_suffix(state.tokenizer, shape.suffix, hole)
        except TemplateError as e:
            raise ApiError(400, str(e), param=max_tokens_name if "hole" in str(e) else "suffix") from None
        cover = min(len(tpl), -(-hole // whole) * whole)
        kinds = (HOLE,) * hole + (HIDDEN,) * (cover - hole)
        return cover, tpl.ids[:cover], _Layout(kinds, frozenset({hole - 1}), filler)
    tpl = shape.template
    span = len(tpl)
    if max_tokens is not None and max_tokens < span:
        raise ApiError(400, f"the template spans {span} tokens, over {max_tokens_name}={max_tokens}; raise "
                            f"{max_tokens_name} to at least {span} or leave it out", param=max_tokens_name)
    if span > room:
        raise ApiError(400, f"the template spans {span} tokens, but after the prompt's {len(ids)} tokens the "
                            f"{state.engine.max_model_len}-token context leaves {max(room, 0)}{canvases}; shorten the "
                            "template or the prompt", param="template", code="context_length_exceeded")
    kinds = [FIXED] * span
    for a, b in tpl.holes:
        kinds[a:b] = [HOLE] * (b - a)
    return span, tpl.ids, _Layout(tuple(kinds), frozenset(b - 1 for _, b in tpl.holes), filler)


def _sampling(state: _State, body: _Common, max_new: int, seed: int | None, drafts: bool) -> SamplingParams:
    over: dict[str, Any] = {
        "mode": body.mode or state.default_mode, "max_new_tokens": max_new, "seed": seed, "drafts": drafts,
        "max_denoising_steps": body.denoising_steps, "entropy_bound": body.entropy_bound, "t_min": body.t_min,
        "t_max": body.t_max, "sampler": body.sampler, "commit_threshold": body.commit_threshold,
        "stability_threshold": body.stability_threshold, "confidence_threshold": body.confidence_threshold,
        "eos_token_ids": () if body.ignore_eos else state.eos_token_ids,
        "adapter": body.model if body.model in state.adapters else None}
    if over["mode"] == "ar":
        over.update(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)
    try:
        return SamplingParams.from_generation_config(state.generation_config, **over).validate()
    except RequestError as e:
        raise _sampling_error(e) from None


async def _serve(request: HTTPRequest, state: _State, body: _Common, wire, prompts: list[list[int]],
                 max_tokens: int | None, max_tokens_name: str, prompt_name: str, top: int | None = None,
                 echo: bool = False) -> Response:
    """Validate what is left, start the engine requests, and answer as a stream or as one JSON body. `top`: the
    logprobs asked for (alternatives per token); `echo`: the prompt first; max_tokens 0 (with echo) scores the prompt
    alone, in any mode: the engine runs it as one greedy AR token that is never shown."""
    for name, value in (("presence_penalty", body.presence_penalty), ("frequency_penalty", body.frequency_penalty),
                        ("logit_bias", body.logit_bias)):
        _unsupported(value, name, f"{name} is not supported by diffusion decoding")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS or not all(stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", param="stop")
    n = body.n or 1
    if n * len(prompts) > MAX_CHOICES:
        raise ApiError(400, f"n x prompts is {n * len(prompts)}; at most {MAX_CHOICES} choices per request",
                       param="n")
    options = body.stream_options or StreamOptions()
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    include_drafts = bool(options.include_drafts)
    probe = _sampling(state, body, 1, body.seed, include_drafts)  # settings errors first, whatever the prompt
    score_only = max_tokens == 0
    grammar, grammar_param = _grammar(body)
    if grammar is not None and not score_only:
        if body.record:
            raise ApiError(400, "a constrained request cannot be recorded yet; drop record", param="record")
        try:
            check_grammar(grammar)
        except RequestError as e:
            raise ApiError(400, str(e), param=grammar_param) from None
        await _check_grammar(state, grammar, grammar_param)
        probe = probe.with_(grammar=grammar)
    shape = _template_request(state, body, score_only, grammar_param)
    if score_only:
        probe = probe.with_(mode="ar", temperature=0.0, top_k=None, top_p=None)
    whole = state.canvas_length if probe.mode == "diffusion" else 1
    max_len = state.engine.max_model_len
    gen_id = f"{wire.prefix}-{secrets.token_hex(12)}"
    choices = []
    for p, ids in enumerate(prompts):
        room = (max_len - len(ids)) // whole * whole  # a diffusion request needs room for whole canvases
        if room < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, which leaves no room for new tokens in this "
                                f"server's {max_len}-token context; shorten it", param=prompt_name,
                           code="context_length_exceeded")
        layout = None
        if shape is not None:
            max_new, template, layout = _fit_template(state, shape, ids, room, whole, max_tokens, max_tokens_name)
        elif score_only:
            max_new = 1
        elif max_tokens is None:
            max_new = min(state.default_max_tokens, room)
        elif max_tokens > room:
            canvases = f" in whole canvases of {whole}" if whole > 1 else ""
            raise ApiError(400, f"{max_tokens_name}={max_tokens} does not fit: the prompt has {len(ids)} tokens and "
                                f"the context {max_len}, leaving {room}{canvases}; lower {max_tokens_name} or shorten "
                                "the prompt", param=max_tokens_name, code="context_length_exceeded")
        else:
            max_new = max_tokens
        for j in range(n):
            seed = None if body.seed is None else body.seed + j
            params = probe.with_(max_new_tokens=max_new, seed=seed, logprobs=None if score_only else top)
            if layout is not None:
                params = params.with_(template=template)
            index = p * n + j
            choices.append(_Choice(index, f"{gen_id}-{index}", ids, params, TextStream(state.tokenizer, stops), p,
                                   top=top, echo=echo, score_only=score_only,
                                   tokens=TokenStream(state.tokenizer) if top is not None else None, layout=layout))
    if body.seed is not None and n > 1:
        _sampling(state, body, 1, body.seed + n - 1, include_drafts)  # the last choice's seed is in range too
    if body.record:
        from dgemma.engine.trajectory import StreamRecorder, record_dir_error

        if (why := record_dir_error(state.record_dir)) is not None:
            raise ApiError(400, why, param="record")
        for c in choices:
            c.params = c.params.with_(drafts=True)
    gen = _Generation(state, gen_id, choices, include_drafts)
    await gen.start()
    for c in choices if body.record else ():  # events wait in the queue until the response reads them
        c.recorder = StreamRecorder(Path(state.record_dir) / f"{c.request_id}.jsonl", state.tokenizer,
                                    state.model_name, c.prompt_ids, state.canvas_length, c.params)
    if body.stream:
        return _SSEResponse(_stream(gen, wire, bool(options.include_usage)), on_close=gen.cancel)
    return await _respond(request, gen, wire)


async def _stream(gen: _Generation, wire, include_usage: bool) -> AsyncIterator[bytes]:
    base = {"id": gen.id, "object": wire.chunk_object, "created": gen.created, "model": gen.state.model_name}

    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        out = {**base, "choices": choices}
        if include_usage:
            out["usage"] = usage  # null in every chunk but the last, as OpenAI does
        return _sse(out)

    try:
        for c in gen.choices:
            first = wire.first(c.index)
            if first is not None:
                yield chunk([first])
        async for kind, c, x in gen.pieces():
            if kind == "text":
                yield chunk([wire.delta(c.index, x.text, logprobs=gen.logprobs_json(wire, c, x.tokens))])
            elif kind == "draft":
                yield chunk([{**wire.draft(c.index), "dgemma_draft": gen.draft_json(x)}])
            else:
                yield chunk([wire.delta(c.index, finish=x)])
        if include_usage:
            yield chunk([], gen.usage())
        yield b"data: [DONE]\n\n"
    except _Failed as e:
        yield _sse(_error_body(e.failure.message, "server_error"))
        gen.cancel("error")
    finally:
        gen.cancel()


async def _respond(request: HTTPRequest, gen: _Generation, wire) -> Response:
    texts: dict[int, list[str]] = {c.index: [] for c in gen.choices}
    tokens: dict[int, list[Token]] = {c.index: [] for c in gen.choices}

    async def collect() -> None:
        async for kind, c, x in gen.pieces():
            if kind == "text":
                texts[c.index].append(x.text)
                tokens[c.index].extend(x.tokens or ())

    work = asyncio.ensure_future(collect())
    left = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client left: free its rows now
            work.cancel()
            return Response(status_code=499)
        try:
            work.result()
        except _Failed as e:
            gen.cancel("error")
            raise ApiError(e.failure.status, e.failure.message) from None
    finally:
        left.cancel()
        gen.cancel()
    return JSONResponse({
        "id": gen.id, "object": wire.object, "created": gen.created, "model": gen.state.model_name,
        "choices": [wire.choice(c.index, "".join(texts[c.index]), c.finish_reason,
                                gen.logprobs_json(wire, c, tokens[c.index])) for c in gen.choices],
        "usage": gen.usage(),
    })
