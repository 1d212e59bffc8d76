"""`dgemma serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the stepped engine.

    pip install -e ".[serve]"
    dgemma serve --model models/dgemma-py-small --port 8000          # or: python -m dgemma.serve --model ...
    curl localhost:8000/v1/completions -d '{"model": "dgemma-py-small", "prompt": "def add(a, b):", "max_tokens": 32}'

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `GET /health`, `GET /metrics`
(Prometheus: queue length, running rows, tokens and tokens/s, decoder and encoder passes, tokens per forward),
`GET /docs` and `GET /openapi.json` (the request schemas, dgemma's fields included).

The wire format is OpenAI's: `id` (cmpl-... / chatcmpl-...), `object`, `created`, `model`, `choices` (`index`,
`text` or `message` / `delta`, `finish_reason` "stop" or "length", `logprobs`) and `usage`. Streams are
server-sent events `data: {json}`, one chunk per commit (diffusion: a canvas; ar: a token), the same id, created
and model in every chunk, a chat stream's first chunk carrying the role "assistant", a chunk with the finish_reason
per choice, a last chunk with empty choices and the usage when `stream_options.include_usage` is true, then
`data: [DONE]`. Request fields read: prompt (a string, a list of strings, token ids), messages (system,
developer, user and assistant roles, through the tokenizer's chat template), max_tokens / max_completion_tokens
(exact: never a token more; default the model's max_new_tokens, within the context), stop (up to 4 strings),
seed, n (choice i uses seed + i), temperature / top_p (ar mode), stream, stream_options, logprobs and echo
(completions), logprobs / top_logprobs (chat), response_format, suffix (completions). Fields the server does not
know are ignored; known fields of the wrong type, penalties and tools are 400.

Structured output (both routes, both modes, streamed or not): `response_format` {"type": "json_object"} or
{"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (what `client.chat.completions.parse(...,
response_format=PydanticModel)` sends) constrains the output to JSON valid under the schema, and the extra field
`regex` to text matching it (dgemma/engine/constrain.py). An unsupported schema keyword or regex feature is a 400
naming it, never a silently unconstrained answer; an output cut at max_tokens is a prefix, finish_reason "length".

Fill in the middle and templates (both modes, streamed or not; the same tokens as `dgemma.api.generate_text` with
`suffix=` / `template=` and the same seed). `suffix` (completions, OpenAI's field) makes the completion a hole of
max_tokens tokens (default: the model's max_new_tokens, within the context) between the prompt and the suffix, whose
tokens are fixed after it; as in OpenAI's API the answer is the inserted text alone, the suffix is not repeated. The
extra field `template` (both routes; dgemma/template.py's syntax: `{{N}}` a hole of at most N tokens, `\\{{` a
literal `{{`) fixes the output's text around holes; the answer is the template filled in. In diffusion mode the
fixed tokens are clamped at every denoising step, so a hole sees the fixed text after it as far as the end of its
canvas; AR sees only what precedes it. A hole the model fills with fewer tokens leaves EOS or padding in the rest,
which is removed from the text (and from logprobs' tokens; `usage.completion_tokens` counts the answer's tokens).
The request's length is its span: max_tokens, when sent with a template, must be at least the span.
finish_reason is "stop" when the model ended every hole before its room ran out (the hole's last position holds
EOS or padding) or a stop string cut the text, "length" when a hole used all its tokens. `echo` puts the prompt
first; `n`, `stop` (on the answer's text), `logprobs` (the answer's tokens) and `include_drafts` (the canvas as
denoised, fixed tokens in place) work as without them. A request with a suffix stops after the canvas holding the
hole's end (ar: the hole's last token): later tokens cannot change it. 400s name the field: bad hole syntax or an
empty template (`template`), both fields together (`suffix`), a template or suffix that does not fit the context
beside the prompt (code context_length_exceeded), max_tokens below a template's span or 0 (`max_tokens`), either one
with response_format or regex (a template fixes the text, a grammar constrains it: give one of them), with record.

Log-probabilities (`logprobs: N` on completions, `logprobs: true, top_logprobs: N` on chat, N <= 20) are the
model's raw distribution (log-softmax of the logits at temperature 1, whatever temperature/top-k/top-p or a
response_format chose the token): in ar mode the next-token distribution, in diffusion mode the denoiser's at the
token's canvas position at the denoising step that chose it. `echo: true` puts the prompt
first, and with logprobs its tokens' log-probabilities (the first one null); with `max_tokens: 0` the answer is
the prompt alone (scoring, as lm-evaluation-harness asks), in either mode. Completions' logprobs are
{tokens, token_logprobs, top_logprobs: [{text: logprob}], text_offset}, chat's {content: [{token, logprob, bytes,
top_logprobs}]}; streamed chunks carry those of their own text. A token's text is the characters it completed, so
the tokens always join to the returned text; when a stop string begins inside a token, that token is reported with
its text cut at the stop (its log-probability is the whole token's). Prompts may be token ids (a list of ints, or
a list of such lists); they are used as given (no BOS added).

API keys: with `--api-key KEY` (repeatable) or DGEMMA_API_KEY (comma-separated), every /v1 route, /metrics and the
page's vocabulary need `Authorization: Bearer KEY` (401, code invalid_api_key, otherwise); /health and the page stay
open (the page has a key field, kept in the browser's localStorage, or takes `?key=` once).

dgemma's own request fields (extra body fields; the openai client sends them with `extra_body={...}`):

    mode                  "diffusion" (default) or "ar": denoise canvases, or one token per forward
    denoising_steps       most denoising steps per canvas (SamplingParams.max_denoising_steps)
    entropy_bound         entropy-bound sampler: summed entropy (nats) accepted per step
    t_min, t_max          temperature of a canvas's last and first step
    sampler               "entropy_bound" or "confidence"
    commit_threshold      confidence sampler: also commit any proposal more probable than this
    stability_threshold   adaptive stopping: steps the argmax must stay unchanged ...
    confidence_threshold  ... and the mean entropy below which a canvas may stop early
    top_k                 ar mode: sample among the k most probable tokens
    ignore_eos            keep going past the end-of-sequence token (benchmarks)
    regex                 constrain the output to text matching this regular expression (not with response_format)
    template              the output as fixed text with holes, "x = {{8}}\\n" (above; not with suffix, response_format
                          or regex)
    record                true: write each choice's trajectory to --record-dir as ID-INDEX.jsonl (the response's
                          id, the choice's index; format in dgemma/engine/trajectory.py); 400 without --record-dir

A missing field keeps the model's generation_config.json default. Canvas-native streaming: a client that sends
`stream_options: {"include_drafts": true}` also gets, after every denoising step, a chunk whose choice has an empty
delta (chat) or empty text (completions) and an extra field

    "dgemma_draft": {"offset": tokens committed before this canvas, "canvas_index": 0-based,
                     "step": 1-based step in the canvas, "text": the draft decoded, "ids": the draft canvas,
                     "accepted": per position, accepted this step, "mean_entropy": nats or null}

Standard clients ignore it; draft text is provisional (the committed text arrives as ordinary content) and stop
strings do not apply to it. Stop strings are applied to the committed text: text that could still become a stop
string, and characters split across tokens, are held back and never taken back; at a stop the request is aborted
in the engine at once. A client that disconnects, streaming or not, aborts its requests before the next step.
Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed or impossible request
(the field in `param`), 404 for another model name or route, 405, 413 for a body over the cap, 429 with
Retry-After when the engine's queue is full, 503 while the engine is down.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
API_KEY_ENV = "DGEMMA_API_KEY"  # comma-separated keys, added to --api-key's


def add_cli(sub) -> argparse.ArgumentParser:
    """Register `serve` on an argparse subparsers object; imports nothing heavy. Dispatch to `run(args)`."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra)",
                       description="OpenAI-compatible HTTP server; see `python -m pydoc dgemma.serve.main`.")
    _add_flags(p)
    p.set_defaults(func=run)
    return p


def _add_flags(p: argparse.ArgumentParser) -> None:
    from dgemma.options import float_in, int_in  # torch-free

    p.add_argument("--model", default=None, help="checkpoint folder, or random:PRESET (default: bundled model)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int_in(0, 65535), default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--model-name", default=None, help="the served model id (default: the model folder's name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights dtype (default: the checkpoint's where this CPU computes it fast, else float32)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="serve with a LoRA adapter applied unmerged (PEFT format, e.g. `dgemma finetune --lora-rank`)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", type=_lora_spec,
                   help="also serve the LoRA adapter in DIR (PEFT format) as model NAME, beside the base (repeatable): "
                        "a request picks it with `model: NAME`; requests for different adapters share every engine "
                        "step, and the base weights are never merged")
    # engine settings: None keeps EngineConfig's default (its one home)
    p.add_argument("--max-batch", type=int_in(1, 4096), default=None, help="rows decoded at once")
    p.add_argument("--kv-memory-mb", type=float_in(0, None, lo_open=True), default=None, help="K/V pool budget in MB")
    p.add_argument("--max-queue", type=int_in(0), default=None, help="waiting requests beyond this get 429")
    p.add_argument("--prefill-chunk", type=int_in(1), default=None, help="prompt tokens per encoder chunk")
    p.add_argument("--max-model-len", type=int_in(2), default=None, help="positions per request (prompt + new tokens)")
    p.add_argument("--engine-factory", default=None, metavar="MODULE:CALLABLE",
                   help="build the engine with CALLABLE(model, EngineConfig) instead of dgemma.engine.engine.Engine "
                        "(tests use a scripted fake)")
    p.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                   help="let a request's rounding depend on the rows it shares steps with (a little faster at small "
                        "batches); by default a seeded request gets the same tokens whoever it is served beside")
    p.add_argument("--compile", action="store_true",
                   help="run the layers and the diffusion sampler as compiled graphs (faster steps; each new batch "
                        "shape compiles once, seconds to a minute, on first use; not bit-identical to the default)")
    p.add_argument("--record-dir", default=None, metavar="DIR",
                   help="where requests with \"record\": true write their trajectories (default: recording off)")
    p.add_argument("--mode", choices=["diffusion", "ar"], default=None,
                   help="decoding mode of requests that send no `mode` field (default: diffusion)")
    p.add_argument("--api-key", action="append", default=[], type=_api_key, metavar="KEY",
                   help=f"require `Authorization: Bearer KEY` on /v1/* and /metrics (repeatable; also {API_KEY_ENV}, "
                        "comma-separated)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])


def _api_key(text: str) -> str:
    if not text or text != text.strip() or any(ch.isspace() or ord(ch) < 32 for ch in text):
        raise argparse.ArgumentTypeError("an API key must be non-empty, without spaces or control characters")
    return text


def api_keys(flags: list[str], env: str | None) -> list[str]:
    """The keys of --api-key and of the environment variable (comma-separated; empty entries ignored)."""
    keys = list(flags)
    for k in (env or "").split(","):
        if k.strip():
            keys.append(_api_key(k.strip()))
    return keys


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _model_name(spec: str | None, lm_name: str) -> str:
    """The folder's name for a checkpoint; the spec itself for random:PRESET."""
    spec = spec or lm_name
    return spec if spec.startswith("random:") else Path(spec).name or spec


def _engine_factory(spec: str | None):
    if spec is None:
        from dgemma.engine import engine

        if getattr(engine, "STEP_API", 0) != 1:
            raise RuntimeError("dgemma/engine/engine.py has no stepped Engine (STEP_API = 1) in this version; "
                               "pass --engine-factory MODULE:CALLABLE")
        return engine.Engine
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise RuntimeError(f"--engine-factory {spec!r}: use MODULE:CALLABLE, e.g. my_engines:make")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"--engine-factory {spec!r}: {e}") from None


def _lora_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"--lora wants NAME=DIR (got {text!r}), e.g. --lora sql=runs/sql-lora/latest")
    return name.strip(), path.strip()


def build_app(lm, engine, model_name: str | None = None, **kwargs):
    """The FastAPI app serving `engine` for a loaded model (dgemma.api.load); kwargs go to create_app."""
    from dgemma.serve.app import create_app

    eos = lm.eos_ids()
    return create_app(engine, lm.tokenizer, model_name=model_name or _model_name(None, lm.name),
                      generation_config=lm.generation_config or {}, eos_token_ids=list(eos) if eos else eos, canvas_length=lm.model.config.canvas_length,
                      vocab_size=lm.model.config.vocab_size, **kwargs)


def run(args) -> int:
    """Load the model, build the engine and serve until SIGINT/SIGTERM. User errors: one line, exit status 2."""
    try:
        import uvicorn

        from dgemma.serve import app as server_app  # noqa: F401  (fastapi, pydantic, prometheus-client)
    except ImportError as e:
        print(f"dgemma serve: {e.name or e} is not installed; pip install 'dgemma[serve]'", file=sys.stderr)
        return 2
    import torch

    from dgemma.api import ModelLoadError, load
    from dgemma.params import EngineConfig, RequestError

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    settings = {k: getattr(args, k) for k in ("max_batch", "kv_memory_mb", "max_queue", "prefill_chunk",
                                              "max_model_len") if getattr(args, k) is not None}
    settings["batch_invariant"] = args.batch_invariant
    settings["compile"] = getattr(args, "compile", False)
    try:
        factory = _engine_factory(args.engine_factory)
        config = EngineConfig(**settings).validate()
        lm = load(args.model, dtype=dtype)
        if getattr(args, "adapter", None):
            from dgemma.lora import load_adapter

            load_adapter(lm.model, args.adapter)
        adapters = _attach(args, lm, args.model_name or _model_name(args.model, lm.name))
        keys = api_keys(getattr(args, "api_key", []), os.environ.get(API_KEY_ENV))
        # the real engine constrains output (response_format, regex) with the tokenizer's grammars; a factory's
        # engine without a `grammars` attribute makes the server refuse constrained requests with a 400
        engine = factory(lm.model, config, grammars=lm.grammars) if args.engine_factory is None else factory(
            lm.model, config)
        app = build_app(lm, engine, args.model_name or _model_name(args.model, lm.name),
                        record_dir=getattr(args, "record_dir", None), api_keys=keys,
                        default_mode=getattr(args, "mode", None), adapters=adapters)
    except (ModelLoadError, RequestError, RuntimeError, OSError, ValueError, argparse.ArgumentTypeError) as e:
        print(f"dgemma serve: {e}", file=sys.stderr)
        return 2
    print(f"dgemma serve: {app.state.dgemma.model_name} on http://{args.host}:{args.port} "
          f"(max_model_len {engine.max_model_len})", file=sys.stderr, flush=True)
    if not keys and not _loopback(args.host):
        print(f"dgemma serve: warning: listening on {args.host} without an API key: anyone who can reach it can use "
              f"it; pass --api-key KEY or set {API_KEY_ENV}", file=sys.stderr, flush=True)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown (open streams get 5 s), the app's lifespan then stops
    # the engine thread, and uvicorn raises the signal again once done: exit quietly with status 0 on either.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_quietly) if main_thread else None
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _attach(args, lm, base_name: str) -> dict[str, str]:
    """`--lora NAME=DIR ...`: the adapters attached to the model (unmerged), one line each on stderr with its
    memory; name -> folder."""
    specs = getattr(args, "lora", None) or []
    if not specs:
        return {}
    if getattr(args, "adapter", None):
        raise ValueError("--adapter and --lora cannot be combined: --adapter changes the base model; serve it as "
                         "one more --lora NAME=DIR instead")
    names = [n for n, _ in specs]
    if len(set(names)) != len(names) or base_name in names:
        raise ValueError(f"--lora names must be distinct and differ from the base model's name {base_name!r} "
                         f"(got {', '.join(names)})")
    from dgemma.lora import attach_adapters

    for a in attach_adapters(lm.model, dict(specs)):
        print(f"dgemma serve: adapter {a.name} ({a.path}): rank {a.config.rank}, {', '.join(a.config.targets)}, "
              f"{a.nbytes / 2**20:.2f} MiB", file=sys.stderr, flush=True)
    return dict(specs)


def _exit_quietly(signum, frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dgemma.serve", description=__doc__.split("\n", 1)[0])
    _add_flags(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
