"""`dgemma serve` end to end: the official openai client and raw SSE against live servers, plus the text logic.

Three kinds of server, each a subprocess on 127.0.0.1 (module-scoped, stopped by pid):
- `live`: `--model random:tiny` on the real stepped engine (dgemma/engine/engine.py with STEP_API = 1; the scripted
  tests/fake_engine.py while that is absent): wire format, streaming, stop strings, seeds, concurrency, errors, fuzz.
- `fake`: the fake engine, 16 rows: the server keeps concurrent requests apart (exactly, whatever the engine).
- `slow`: the fake engine at 10 ms a step with one row and a queue of one: 429, disconnects, stop-string aborts.
- one per signal, stopped by SIGINT / SIGTERM mid-stream: a clean exit.
DGEMMA_TEST_FAKE_ENGINE=1 runs the `live` tests on the fake engine too.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from helpers import (
    STARTUP_S,
    LiveServer,
    assert_healthy,
    assert_no_5xx,
    free_port,
    fuzz_settings,
    json_values,
    post_fuzz_content,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from dgemma.serve.text import TextStream

pytestmark = pytest.mark.slow  # live servers

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
ENGINE_PY = ROOT / "dgemma" / "engine" / "engine.py"
REAL_ENGINE = (ENGINE_PY.is_file() and re.search(r"^STEP_API\s*=\s*1\b", ENGINE_PY.read_text(), re.MULTILINE) is not None
               and not os.environ.get("DGEMMA_TEST_FAKE_ENGINE"))  # set it to run the live tests on the fake
FAST = {"denoising_steps": 4}  # keeps the real tiny model quick


# ---- servers -------------------------------------------------------------------------------------------------


class Server(LiveServer):
    """A `random:tiny` server with the client helpers these tests use."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None):
        super().__init__(tmp / f"server-{time.monotonic_ns()}.log", *args, env=env)
        key = args[args.index("--api-key") + 1] if "--api-key" in args else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = httpx.get(f"{self.url}/v1/models", headers=headers).json()["data"][0]["id"]

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 5.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["dgemma_requests_running"] == 0 and m["dgemma_requests_waiting"] == 0:
                return m
            assert time.monotonic() < deadline, f"rows still busy: {m}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    args = [] if REAL_ENGINE else ["--engine-factory", "fake_engine:FakeEngine"]
    server = Server(tmp_path_factory.mktemp("live"), *args, "--max-batch", "16", "--max-model-len", "512")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("fake"), "--engine-factory", "fake_engine:FakeEngine", "--max-batch",
                    "16", "--max-model-len", "512")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("slow"), "--engine-factory", "fake_engine:slow", "--max-batch", "1",
                    "--max-queue", "1", "--model-name", "dgemma-test")
    assert server.model == "dgemma-test"
    yield server
    server.stop()


def _complete(server: Server, prompt="def add(a, b):", **kw) -> Completion:
    extra = {**FAST, "ignore_eos": True, **kw.pop("extra_body", {})}
    return server.client().completions.create(model=server.model, prompt=prompt, extra_body=extra, **kw)


def _sse_chunks(server: Server, path: str, body: dict) -> list[dict | str]:
    """The raw stream: every `data:` payload parsed (the final "[DONE]" kept as a string)."""
    out: list[dict | str] = []
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


class _CompletionChunkChoice(CompletionChoice):
    # Completion serves streams and bodies alike; a stream's chunks before the last carry finish_reason null
    finish_reason: Optional[Literal["stop", "length", "content_filter"]] = None  # noqa: UP045


class _CompletionChunk(Completion):
    choices: list[_CompletionChunkChoice]


def _check_stream(chunks: list, chat: bool, n: int = 1, usage: bool = False, drafts: bool = False) -> dict:
    """Every chunk against the openai types; constant id/created/model; role first; one finish per choice; usage
    last when asked; [DONE] last. Returns {"text": [per choice], "drafts": [...], "finish": [...], "usage": ...}."""
    assert chunks and chunks[-1] == "[DONE]" and "[DONE]" not in chunks[:-1]
    body = chunks[:-1]
    first = body[0]
    kind = ChatCompletionChunk if chat else _CompletionChunk
    texts, finish, seen_drafts, got_usage = [""] * n, [None] * n, [], None
    started = [False] * n
    for i, c in enumerate(body):
        kind.model_validate(c)
        assert c["object"] == ("chat.completion.chunk" if chat else "text_completion")
        assert (c["id"], c["created"], c["model"]) == (first["id"], first["created"], first["model"])
        assert c["id"].startswith("chatcmpl-" if chat else "cmpl-")
        if usage and i == len(body) - 1:
            assert c["choices"] == [] and c["usage"]["total_tokens"] == (
                c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"])
            got_usage = c["usage"]
            continue
        assert ("usage" in c) == usage and c.get("usage") is None
        assert len(c["choices"]) == 1
        ch = c["choices"][0]
        k = ch["index"]
        assert finish[k] is None, "a chunk after this choice's finish"
        if chat and not started[k]:
            assert ch["delta"] == {"role": "assistant", "content": ""}
            started[k] = True
            continue
        piece = ch["delta"].get("content") if chat else ch["text"]
        if "dgemma_draft" in ch:
            assert drafts and not piece and ch["finish_reason"] is None
            d = ch["dgemma_draft"]
            assert set(d) == {"offset", "canvas_index", "step", "text", "ids", "accepted", "mean_entropy"}
            assert len(d["ids"]) == len(d["accepted"]) and d["step"] >= 1 and d["canvas_index"] >= 0
            seen_drafts.append(d)
        elif ch["finish_reason"] is not None:
            assert ch["finish_reason"] in ("stop", "length") and not piece
            finish[k] = ch["finish_reason"]
        else:
            assert piece, "an empty content chunk"
            texts[k] += piece
    assert all(f is not None for f in finish)
    assert (got_usage is not None) == usage
    return {"text": texts, "drafts": seen_drafts, "finish": finish, "usage": got_usage}


def _error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


# ---- the text logic, no server --------------------------------------------------------------------------------


class _Bytes:
    """A tokenizer whose ids are bytes: the worst case for split characters."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _push_text(stream: TextStream, text: str) -> str:
    return stream.push(text.encode())


def test_stop_string_across_pushes_is_cut_and_held_back():
    s = TextStream(_Bytes(), ["o w"])
    assert _push_text(s, "hel") == "hel"
    assert _push_text(s, "lo") == "l"  # "o" could start "o w": held back
    assert not s.stopped
    assert _push_text(s, " world") == ""  # the stop completed: the held "o" is dropped, never sent
    assert s.stopped and s.text == "hell" and s.tokens == len("hello w")
    assert _push_text(s, "more") == "" and s.finish() == ""


def test_partial_stop_released_when_it_does_not_complete():
    s = TextStream(_Bytes(), ["abc", "zz"])
    assert _push_text(s, "xab") == "x"
    assert _push_text(s, "d") == "abd"
    assert _push_text(s, "z") == ""
    assert s.finish() == "z" and not s.stopped and s.text == "xabdz"


def test_utf8_split_characters_are_held_back():
    text = "é😀 日本"
    s = TextStream(_Bytes())
    pieces = [s.push([b]) for b in text.encode()]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) + s.finish() == text
    assert "" in pieces  # at least one byte completed nothing
    bad = TextStream(_Bytes())
    assert bad.push(b"ok\xf0\x9f") == "ok" and bad.finish() == "\ufffd"  # a truly broken tail shows at the end


def test_utf8_with_the_bundled_tokenizer():
    from dgemma.tokenizer import Tokenizer

    tok = Tokenizer.from_path(ROOT / "dgemma" / "assets" / "tokenizer.json")
    text = "naïve café 😀👍🏽 def f(x): return x"
    s = TextStream(tok, ["return"])
    out = "".join(s.push([i]) for i in tok.encode(text, parse_special=False)) + s.finish()
    assert out == text[: text.index("return")] and s.stopped


@settings(max_examples=150, deadline=None, database=None)
@given(text=st.text(alphabet="abc d", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text(alphabet="abc d", min_size=1, max_size=4), max_size=3))
@example(text=" aa", cuts=[2], stops=["a", " aa"])  # " a" completes "a" while " aa" may still begin earlier
def test_stream_never_takes_text_back(text, cuts, stops):
    s = TextStream(_Bytes(), stops)
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    sent = ""
    for a, b in itertools.pairwise(bounds):
        sent += _push_text(s, text[a:b])
    sent += s.finish()
    hits = [i for x in stops if (i := text.find(x)) >= 0]
    assert sent == (text[: min(hits)] if hits else text)
    assert s.stopped == bool(hits)


def test_engine_loop_survives_a_failing_step():
    from dgemma.params import Request, SamplingParams
    from dgemma.serve.loop import EngineFailure, EngineLoop

    class Broken:
        max_model_len = 64

        def __init__(self):
            self.ids: list[str] = []

        def add(self, r):
            self.ids.append(r.request_id)

        def abort(self, rid):
            self.ids.remove(rid)
            return True

        def has_work(self):
            return bool(self.ids)

        def metrics(self):
            return {"running": len(self.ids)}

        def step(self):
            raise ValueError("boom")

    got = []
    loop = EngineLoop(Broken())
    loop.start()
    try:
        loop.submit([Request("a", [1], SamplingParams())], got.append).result(5)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(got[0], EngineFailure) and "boom" in got[0].message
        assert loop.alive and loop.engine.ids == []
    finally:
        loop.stop()
    assert not loop.alive


def test_server_module_is_light():
    code = ("import sys, argparse, dgemma.serve.main as s; p = argparse.ArgumentParser(); s.add_cli(p.add_subparsers()); "
            "a = p.parse_args(['serve', '--model', 'random:tiny', '--port', '1']); assert a.func is s.run; "
            "heavy = {'torch', 'fastapi', 'pydantic', 'uvicorn', 'prometheus_client'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- the live server: wire format ---------------------------------------------------------------------------


def test_models(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [live.model] and models.data[0].object == "model"
    assert httpx.get(f"{live.url}/v1/models/{live.model}").json()["id"] == live.model
    _error(httpx.get(f"{live.url}/v1/models/nope"), 404, "model")


def test_openapi_documents_dgemma_fields(live):
    spec = httpx.get(f"{live.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name, path in (("CompletionRequest", "/v1/completions"), ("ChatRequest", "/v1/chat/completions")):
        props = schemas[name]["properties"]
        for field in ("mode", "denoising_steps", "entropy_bound", "t_min", "t_max", "sampler", "commit_threshold",
                      "stability_threshold", "confidence_threshold", "stream_options", "stop", "seed"):
            assert field in props, (name, field)
        assert "dgemma" in props["denoising_steps"]["description"]
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
    assert "include_drafts" in schemas["StreamOptions"]["properties"]


def test_completion(live):
    r = _complete(live, max_tokens=40, seed=1)
    Completion.model_validate(r.model_dump())
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == live.model
    assert r.choices[0].finish_reason == "length" and r.choices[0].index == 0 and r.choices[0].text
    assert r.usage.completion_tokens == 40 and r.usage.total_tokens == r.usage.prompt_tokens + 40
    assert abs(r.created - time.time()) < 120


def test_chat(live):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text",
                                                                                            "text": "Add 2 and 3"}]}]
    r = live.client().chat.completions.create(model=live.model, messages=messages, max_completion_tokens=20,
                                              seed=2, extra_body={**FAST, "ignore_eos": True})
    ChatCompletion.model_validate(r.model_dump())
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens > 10


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_max_tokens_is_exact(live, mode):
    for max_tokens in (1, 5, 33):
        r = _complete(live, max_tokens=max_tokens, seed=3, extra_body={"mode": mode})
        assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (max_tokens, "length")


def test_seed_gives_the_same_text(live):
    a, b = (_complete(live, max_tokens=24, seed=7).choices[0].text for _ in range(2))
    c = _complete(live, max_tokens=24, seed=8).choices[0].text
    assert a == b and a != c
    ar = [_complete(live, max_tokens=12, seed=7, temperature=1.0, extra_body={"mode": "ar"}).choices[0].text
          for _ in range(2)]
    assert ar[0] == ar[1]


def test_n_choices_use_consecutive_seeds(live):
    r = _complete(live, max_tokens=10, seed=20, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [_complete(live, max_tokens=10, seed=s).choices[0].text for s in (20, 21)]
    assert r.usage.completion_tokens == 20


def test_prompt_forms(live):
    one = _complete(live, prompt="x = 1", max_tokens=8, seed=4)
    assert _complete(live, prompt=["x = 1"], max_tokens=8, seed=4).choices[0].text == one.choices[0].text
    ids = _complete(live, prompt=[5, 300, 301, 302], max_tokens=8, seed=4)
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 8
    two = _complete(live, prompt=["x = 1", "y = 2"], max_tokens=8, seed=4)
    assert len(two.choices) == 2 and two.choices[0].text == one.choices[0].text


def test_streams_match_the_schema_and_the_plain_answer(live):
    plain = _complete(live, max_tokens=70, seed=5).choices[0].text
    body = {"model": live.model, "prompt": "def add(a, b):", "max_tokens": 70, "seed": 5, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, **FAST}
    got = _check_stream(_sse_chunks(live, "/v1/completions", body), chat=False, usage=True)
    assert got["text"] == [plain] and got["finish"] == ["length"] and got["usage"]["completion_tokens"] == 70

    messages = [{"role": "user", "content": "hello"}]
    chat_plain = live.client().chat.completions.create(model=live.model, messages=messages, max_tokens=40, seed=5,
                                                       n=2, extra_body={**FAST, "ignore_eos": True})
    body = {"model": live.model, "messages": messages, "max_tokens": 40, "seed": 5, "n": 2, "stream": True,
            "ignore_eos": True, **FAST}
    got = _check_stream(_sse_chunks(live, "/v1/chat/completions", body), chat=True, n=2)
    assert got["text"] == [c.message.content for c in chat_plain.choices]


def test_stream_with_the_openai_client(live):
    stream = live.client().chat.completions.create(
        model=live.model, messages=[{"role": "user", "content": "hi"}], max_tokens=30, seed=6, stream=True,
        stream_options={"include_usage": True}, extra_body={**FAST, "ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert chunks[-2].choices[0].finish_reason == "length"
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1


def test_drafts_are_extra_chunk_fields(live):
    steps = 3
    stream = live.client().completions.create(
        model=live.model, prompt="import os", max_tokens=40, seed=9, stream=True,
        stream_options={"include_usage": True, "include_drafts": True},
        extra_body={"denoising_steps": steps, "ignore_eos": True})
    drafts, text = [], ""
    for chunk in stream:
        if not chunk.choices:
            continue
        extra = chunk.choices[0].model_extra or {}
        if "dgemma_draft" in extra:
            drafts.append(extra["dgemma_draft"])
            assert chunk.choices[0].text == ""
        else:
            text += chunk.choices[0].text
    assert drafts and {d["canvas_index"] for d in drafts} == {0, 1}
    assert all(1 <= d["step"] <= steps and isinstance(d["text"], str) for d in drafts)
    assert next(d["offset"] for d in drafts if d["canvas_index"] == 1) == 32
    assert text == _complete(live, prompt="import os", max_tokens=40, seed=9,
                             extra_body={"denoising_steps": steps}).choices[0].text
    # the raw stream with drafts validates too
    body = {"model": live.model, "prompt": "import os", "max_tokens": 40, "seed": 9, "stream": True,
            "stream_options": {"include_drafts": True}, "denoising_steps": steps, "ignore_eos": True}
    assert _check_stream(_sse_chunks(live, "/v1/completions", body), chat=False, drafts=True)["text"] == [text]


def test_stop_string_spanning_chunks(live):
    base = {"model": live.model, "prompt": "class A:", "max_tokens": 128, "seed": 11, "stream": True,
            "ignore_eos": True, **FAST}
    chunks = [c["choices"][0]["text"] for c in _sse_chunks(live, "/v1/completions", base)[:-1]
              if c["choices"] and c["choices"][0]["text"]]
    full = "".join(chunks)
    k = next(i for i in range(len(chunks) - 1) if len(chunks[i]) >= 3 and len(chunks[i + 1]) >= 3)
    stop = chunks[k][-3:] + chunks[k + 1][:3]  # begins in one commit and ends in the next
    expected = full[: full.find(stop)]
    got = _check_stream(_sse_chunks(live, "/v1/completions", {**base, "stop": [stop, "\x00never"]}), chat=False)
    assert got["text"] == [expected] and got["finish"] == ["stop"]  # nothing sent had to be taken back
    plain = _complete(live, prompt="class A:", max_tokens=128, seed=11, stop=stop)
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens < 128
    live.wait_idle()


# The real engine's rows are not yet bit-identical to the same request alone for every request (seen: prompt
# "# task 113\n", seed 113, diffusion, 4 steps, 137 tokens differs from token 64 on when it shares steps with any
# other row, in-process too, so not a server effect). The fake engine checks the server's side strictly.
@pytest.mark.parametrize("which", ["live", "fake"])
def test_concurrent_clients_get_their_own_answers(request, which):
    if which == "fake" and not REAL_ENGINE:
        pytest.skip("the live server already runs the fake engine")
    server = request.getfixturevalue(which)

    def ask(seed: int) -> str:
        mode = "ar" if seed % 4 == 0 else "diffusion"
        return _complete(server, prompt=f"# task {seed}\n", max_tokens=40 + 3 * (seed - 100), seed=seed,
                         extra_body={"mode": mode}).choices[0].text

    seeds = list(range(100, 116))
    alone = [ask(s) for s in seeds]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, seeds))
    server.wait_idle()
    assert [s for s, a, b in zip(seeds, alone, together) if a != b] == []


# ---- the live server: errors -------------------------------------------------------------------------------


def test_client_errors(live):
    c = live.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="other-model", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=live.model, prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                  extra_body={"denoising_steps": 0})
    assert e.value.body["param"] == "denoising_steps"


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"), ({}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"prompt": [99999999]}, "prompt"), ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"), ({"prompt": "x", "stream": 1}, "stream"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "mode": "fast"}, "mode"), ({"prompt": "x", "t_min": "a"}, "t_min"),
    ({"prompt": "x", "seed": -1}, "seed"), ({"prompt": "x", "t_min": 0.9, "t_max": 0.5}, "t_max"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"), ({"prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"), ({"prompt": "x " * 600}, "prompt"),
])
def test_bad_completion_requests(live, body, param):
    _error(httpx.post(f"{live.url}/v1/completions", json=body), 400, param)


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format"),
])
def test_bad_chat_requests(live, body, param):
    _error(httpx.post(f"{live.url}/v1/chat/completions", json=body), 400, param)


def test_hostile_bodies(live):
    url = f"{live.url}/v1/completions"
    _error(httpx.post(url, content=b"{not json"), 400)
    _error(httpx.post(url, content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"}), 400)
    _error(httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000), 400)
    _error(httpx.post(url, content=b'{"a":' * 50_000 + b"1" + b"}" * 50_000), 400)
    _error(httpx.post(url, content=b"[1, 2]"), 400)
    _error(httpx.post(url, content=b"prompt=x", headers={"content-type": "application/x-www-form-urlencoded"}), 400)
    _error(httpx.post(url, content=b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}'), 413)
    _error(httpx.get(f"{live.url}/v2/nothing"), 404)
    r = httpx.get(url)
    _error(r, 405)
    # unknown fields are ignored, as OpenAI does
    ok = httpx.post(url, json={"prompt": "x", "max_tokens": 2, "frobnicate": {"a": [1]}, "user": "u", **FAST})
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}


_json = json_values(max_leaves=8, max_int=2**70, floats=True, max_text=12, max_key=6)
_fields = {
    "model": st.sampled_from(["random:tiny", "other"]) | _json,
    "prompt": st.text(max_size=20) | st.lists(st.integers(-5, 9000), max_size=4) | _json,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]) | _json,
                                                "content": st.text(max_size=12) | _json}), max_size=3) | _json,
    "stream": st.booleans() | _json,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                          "include_drafts": st.booleans()}) | _json,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | _json,
    "seed": st.integers(-3, 2**64) | _json, "n": st.integers(-1, 3) | _json,
    "mode": st.sampled_from(["diffusion", "ar"]) | _json, "temperature": st.floats(-1, 3) | _json,
    "sampler": st.sampled_from(["entropy_bound", "confidence"]) | _json, "t_min": _json, "entropy_bound": _json,
    "logprobs": st.integers(-1, 22) | st.booleans() | _json, "top_logprobs": st.integers(-1, 22) | _json,
    "echo": st.booleans() | _json,
    "suffix": st.text(max_size=8) | _json,
    "template": st.sampled_from(["x {{2}}", "{{3}}y", "{{x}}", "a{{", "\\{{1}}", "{{4000}}"]) | st.text(max_size=10)
    | _json,
}
_bodies = st.fixed_dictionaries(
    # always a small max_tokens and step count (or garbage there): valid requests stay cheap
    {"max_tokens": st.integers(-2, 6) | _json, "denoising_steps": st.integers(-1, 3) | _json}, optional=_fields)


@fuzz_settings(max_examples=100)
@given(body=_bodies, extra=st.dictionaries(st.text(max_size=8), _json, max_size=2), chat=st.booleans(),
       raw=st.none() | st.binary(max_size=64))
def test_fuzz_never_5xx(live, body, extra, chat, raw):
    # the body as it is (no minimal request under it: a missing prompt is fuzzed too), JSON with NaN and Infinity
    # (which httpx's json= refuses), or random bytes
    content = raw if raw is not None else json.dumps({**extra, **body}).encode()
    r = post_fuzz_content(live.url, content, chat)
    assert_no_5xx(r, body)
    if r.status_code >= 400:
        _error(r, r.status_code)  # this server's error object exactly: message (non-empty), type, param, code


def test_server_alive_after_fuzz(live):
    assert_healthy(live.url)
    assert _complete(live, max_tokens=3, seed=1).usage.completion_tokens == 3
    live.wait_idle()


# ---- log-probabilities, echo, token-id prompts -----------------------------------------------------------------

LP_TOL = 1e-4  # nats: the server's batch-invariant ragged passes against one plain causal forward, fp32
AR = {**FAST, "mode": "ar", "ignore_eos": True}
needs_model = pytest.mark.skipif(not REAL_ENGINE, reason="compares with the model itself: needs the real engine")


@pytest.fixture(scope="module")
def reference():
    """log-softmax of random:tiny's encoder logits at every position of ids: the server's model, computed here."""
    import torch
    import torch.nn.functional as F

    from dgemma.api import load
    from dgemma.cache import KVCache

    lm = load("random:tiny")

    @torch.no_grad()
    def logprobs(ids: list[int]):
        h = lm.model.encode(torch.tensor([ids]), KVCache.empty(lm.model.config))
        return F.log_softmax(lm.model.logits(h)[0].float(), dim=-1)

    logprobs.tokenizer = lm.tokenizer
    return logprobs


PROMPT_IDS = [2, 633, 813, 14, 71, 18, 299, 361]  # <bos>def add(a, b):


@needs_model
def test_completion_logprobs_equal_the_model(live, reference):
    r = _complete(live, prompt=PROMPT_IDS, max_tokens=5, logprobs=3, extra_body=AR)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == 5
    ids = reference.tokenizer.encode(r.choices[0].text)  # whole-character pieces: text -> ids is the inverse here
    ref = reference(PROMPT_IDS + ids)
    for k, (t, v, top) in enumerate(zip(ids, lp.token_logprobs, lp.top_logprobs)):
        assert abs(v - ref[len(PROMPT_IDS) - 1 + k, t].item()) < LP_TOL
        assert len(top) <= 3 and abs(max(top.values()) - v) < LP_TOL  # greedy: the chosen one is the most probable
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:k]) for k in range(5)]


@needs_model
def test_echo_with_max_tokens_0_scores_the_prompt(live, reference):
    ref = reference(PROMPT_IDS)
    for mode in ("ar", "diffusion"):  # the prompt's logprobs come from the encoder, whatever the mode
        r = _complete(live, prompt=[PROMPT_IDS, PROMPT_IDS[:4]], max_tokens=0, echo=True, logprobs=1, temperature=0,
                      extra_body={"mode": mode})
        for ch, ids in zip(r.choices, (PROMPT_IDS, PROMPT_IDS[:4])):
            lp = ch.logprobs
            assert ch.finish_reason == "length" and "".join(lp.tokens) == ch.text == reference.tokenizer.decode(ids)
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
            assert max(abs(v - ref[i - 1, ids[i]].item()) for i, v in enumerate(lp.token_logprobs) if i) < LP_TOL
        assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(PROMPT_IDS) + 4


def test_echo_then_completion_and_token_id_prompts(live):
    r = _complete(live, prompt=PROMPT_IDS, max_tokens=3, echo=True, logprobs=0, extra_body=AR)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(PROMPT_IDS) + 3 and lp.token_logprobs[0] is None
    assert all(v is not None for v in lp.token_logprobs[1:]) and "".join(lp.tokens) == r.choices[0].text
    plain = _complete(live, prompt=PROMPT_IDS, max_tokens=3, extra_body=AR).choices[0].text
    assert r.choices[0].text.endswith(plain) and r.choices[0].text.startswith("def add(a, b):")
    echo_only = _complete(live, prompt="def add", max_tokens=3, echo=True)  # echo without logprobs, diffusion
    assert echo_only.choices[0].text.startswith("def add") and echo_only.choices[0].logprobs is None


def test_streamed_logprobs_equal_the_plain_answer(live):
    kw = {"prompt": PROMPT_IDS, "max_tokens": 6, "logprobs": 2, "echo": True, "seed": 4, "temperature": 0.7,
          "extra_body": AR}
    plain = _complete(live, **kw).choices[0]
    tokens, values, offsets, text = [], [], [], ""
    for chunk in _complete(live, stream=True, **kw):
        for ch in chunk.choices:
            text += ch.text
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens
                values += ch.logprobs.token_logprobs
                offsets += ch.logprobs.text_offset
    assert text == plain.text and tokens == plain.logprobs.tokens and offsets == plain.logprobs.text_offset
    assert values == plain.logprobs.token_logprobs


def test_chat_logprobs_plain_and_streamed(live):
    c = live.client()
    kw = {"model": live.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True,
          "top_logprobs": 2, "seed": 1, "extra_body": AR}
    r = c.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content and len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in content if t.token.isascii())
    streamed = [t for chunk in c.chat.completions.create(stream=True, **kw) for ch in chunk.choices
                if ch.logprobs is not None for t in ch.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    assert c.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None}).choices[0].logprobs is None


def test_logprobs_with_a_stop_string_match_the_text(live):
    first = _complete(live, prompt=PROMPT_IDS, max_tokens=8, extra_body=AR).choices[0].text
    stop = first[len(first) // 2:len(first) // 2 + 2]  # two characters from the middle, maybe inside a token
    r = _complete(live, prompt=PROMPT_IDS, max_tokens=8, logprobs=1, stop=[stop], extra_body=AR).choices[0]
    assert r.text == first[:first.find(stop)] and "".join(r.logprobs.tokens) == r.text


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "echo": 1}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_logprob_requests(live, path, body, param):
    _error(httpx.post(f"{live.url}{path}", json={"max_tokens": 2, **body}), 400, param)


def test_openai_client_sees_the_400s(live):
    c = live.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                  logprobs=True, top_logprobs=21, extra_body=AR)
    assert e.value.body["param"] == "top_logprobs" and "20" in e.value.body["message"]


# ---- API keys -----------------------------------------------------------------------------------------------------

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    args = [] if REAL_ENGINE else ["--engine-factory", "fake_engine:FakeEngine"]
    server = Server(tmp_path_factory.mktemp("keyed"), *args, "--api-key", KEYS[0], "--max-model-len", "256",
                    env={"DGEMMA_API_KEY": f" ,{KEYS[1]}"})
    yield server
    server.stop()


def test_api_keys(keyed):
    for key in KEYS:
        c = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=key, max_retries=0, timeout=60)
        assert c.completions.create(model="random:tiny", prompt="x", max_tokens=2, extra_body=FAST).choices
        assert c.models.list().data[0].id == "random:tiny"
    for key in ("wrong", KEYS[0] + "x", KEYS[0][:-1]):
        c = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=key, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            c.completions.create(model="random:tiny", prompt="x", max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics", "/v1/nothing",
                 "/playground/vocab.json"):
        r = httpx.post(f"{keyed.url}{path}", json={}) if "completions" in path else httpx.get(f"{keyed.url}{path}")
        assert _error(r, 401, None)["code"] == "invalid_api_key"
    r = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"})
    _error(r, 401)
    for bare in ("Bearer", "bearer"):  # the scheme without a key
        assert _error(httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": bare}), 401, None)["code"] == \
            "invalid_api_key"
    assert httpx.get(f"{keyed.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{keyed.url}/").status_code == 200  # the page loads; its API calls send the key
    assert httpx.get(f"{keyed.url}/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"}).status_code == 200


@fuzz_settings(max_examples=40)
@given(body=_bodies, chat=st.booleans(), key=st.none() | st.text(max_size=12),
       raw=st.none() | st.binary(max_size=64))
def test_fuzz_with_a_key_never_gets_past_401(keyed, body, chat, key, raw):
    headers = {}
    if key and key.isascii() and key.isprintable() and key.strip() == key:  # a header httpx can send
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    r = post_fuzz_content(keyed.url, content, chat, headers)
    # stricter than never a 5xx: whatever the body, a wrong or missing key is a 401 before anything else
    assert _error(r, 401, None)["code"] == "invalid_api_key"


def test_keyed_server_alive_after_fuzz(keyed):
    assert_healthy(keyed.url)
    c = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEYS[0], max_retries=0, timeout=60)
    assert c.completions.create(model="random:tiny", prompt="x", max_tokens=3, seed=1,
                                extra_body=FAST).usage.completion_tokens == 3


def test_public_host_without_a_key_warns(tmp_path):
    """--host 0.0.0.0 without a key: one warning line at start (the server is stopped at once)."""
    port = free_port()
    log = tmp_path / "warn.log"
    env = {k: v for k, v in os.environ.items() if k != "DGEMMA_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dgemma.serve.main", "--model", "random:tiny", "--host", "0.0.0.0",
                                 "--port", str(port), "--engine-factory", "fake_engine:FakeEngine"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_S
        while "warning" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(15)
    lines = [ln for ln in log.read_text().splitlines() if "without an API key" in ln]
    assert len(lines) == 1 and "--api-key" in lines[0]


# ---- the slow fake: queue, disconnects, stop aborts ------------------------------------------------------------


def _long_stream(server: Server, **extra):
    body = {"model": server.model, "prompt": "x", "max_tokens": 4000, "stream": True, "denoising_steps": 4, **extra}
    return httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30)


def test_queue_full_is_429_with_retry_after(slow):
    with _long_stream(slow) as a, _long_stream(slow) as b:  # one row runs, one waits
        assert a.status_code == b.status_code == 200
        r = httpx.post(f"{slow.url}/v1/completions", json={"prompt": "x", "max_tokens": 5})
        err = _error(r, 429)
        assert err["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            slow.client().completions.create(model=slow.model, prompt="x", max_tokens=5)
    slow.wait_idle()


def test_disconnect_mid_stream_aborts(slow):
    before = slow.metrics().get('dgemma_aborted_requests_total{reason="disconnect"}', 0)
    with _long_stream(slow) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert slow.metrics()["dgemma_requests_running"] == 1
    m = slow.wait_idle(timeout=2)
    assert m['dgemma_aborted_requests_total{reason="disconnect"}'] == before + 1
    assert _complete(slow, max_tokens=4, seed=1).usage.completion_tokens == 4


def test_disconnect_while_waiting_for_a_plain_answer_aborts(slow):
    try:
        r = httpx.post(f"{slow.url}/v1/completions", json={"prompt": "x", "max_tokens": 4000, **FAST}, timeout=0.5)
        pytest.fail(f"answered in 0.5 s: {r.status_code} {r.json().get('usage')} {r.elapsed}")
    except httpx.ReadTimeout:
        pass  # the client gave up and closed the connection
    slow.wait_idle(timeout=2)


def test_stop_string_frees_the_row(slow):
    first = _complete(slow, max_tokens=40, seed=12).choices[0].text
    stop = first[10:14]
    t0 = time.monotonic()
    r = _complete(slow, max_tokens=4000, seed=12, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == first[: first.find(stop)]
    assert time.monotonic() - t0 < 5  # not the 500 canvases the request asked for
    assert slow.wait_idle()['dgemma_aborted_requests_total{reason="stop_string"}'] >= 1


def test_eos_finishes_with_stop(slow):
    r = slow.client().completions.create(model=slow.model, prompt="x", max_tokens=50, seed=10**6 + 5,
                                         extra_body=FAST)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 6  # 5 tokens, then EOS


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_cleanly(tmp_path, sig):
    """A signal mid-stream: the stream still ends properly (within uvicorn's grace period), then the process exits 0."""
    server = Server(tmp_path, "--engine-factory", "fake_engine:slow")
    with _long_stream(server, max_tokens=320) as r:  # about 0.5 s of steps
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        server.proc.send_signal(sig)
        rest = [line for line in lines if line]
        rc = server.proc.wait(20)
    assert rest[-1] == "data: [DONE]"
    assert rc == 0, server.log.read_text()
    assert "Traceback" not in server.log.read_text()
