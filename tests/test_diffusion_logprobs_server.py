"""`dgemma serve` in diffusion mode with log-probabilities, through the official openai client: completions'
`logprobs: N` and chat's `logprobs: true, top_logprobs: N` report each committed token's log-probability under the
denoiser's distribution at the step that chose it (tests/test_diffusion_logprobs.py checks the definition), equal
to the stepped engine's numbers for the same request in this process, plain and streamed alike."""

from __future__ import annotations

import pytest
from helpers import LiveServer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.slow  # live servers

from dgemma.api import load
from dgemma.engine.engine import Engine
from dgemma.params import MAX_LOGPROBS, EngineConfig, Request, SamplingParams

TOL = 1e-4  # nats: the same batch-invariant engine in two processes (in practice the very same numbers)
STEPS = 4
DIFFUSION = {"mode": "diffusion", "denoising_steps": STEPS, "ignore_eos": True}
PROMPT_IDS = [2, 633, 813, 14, 71, 18, 299, 361]  # <bos>def add(a, b):


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(tmp_path_factory.mktemp("dlp") / "server.log", "--mode", "ar", "--max-batch", "4",
                    "--max-model-len", "256") as s:  # AR by default: the requests must ask for diffusion
        s.model = httpx.get(f"{s.url}/v1/models").json()["data"][0]["id"]
        s.client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=120)
        yield s


@pytest.fixture(scope="module")
def lm():
    return load("random:tiny")


def _engine(lm, prompt: list[int], max_new: int, seed: int, top: int, **sampling):
    """The same request on an engine in this process (the server's settings: batch-invariant, ignore_eos)."""
    p = SamplingParams.from_generation_config(lm.generation_config, mode="diffusion", max_new_tokens=max_new,
                                              seed=seed, max_denoising_steps=STEPS, eos_token_ids=(), logprobs=top,
                                              **sampling)
    eng = Engine(lm.model, EngineConfig(max_batch=1, max_model_len=256, batch_invariant=True))
    eng.add(Request("a", prompt, p))
    ids, lps = [], []
    while eng.has_work():
        for ev in eng.step():
            ids += ev.new_ids
            lps += ev.new_logprobs
    return ids, lps


@pytest.mark.parametrize("sampler", ["entropy_bound", "confidence"])
def test_completion_logprobs_equal_the_engines(server, lm, sampler):
    r = server.client.completions.create(model=server.model, prompt=PROMPT_IDS, max_tokens=12, logprobs=2, seed=3,
                                         extra_body={**DIFFUSION, "sampler": sampler})
    ch = r.choices[0]
    lp = ch.logprobs
    ids, ref = _engine(lm, PROMPT_IDS, 12, 3, 2, sampler=sampler)
    assert ch.text == lm.tokenizer.decode(ids) and r.usage.completion_tokens == len(ids) == 12
    assert "".join(lp.tokens) == ch.text and len(lp.token_logprobs) == len(lp.tokens)
    # one reported token per committed id (no stop strings); the values are the engine's
    assert len(lp.tokens) == len(ids)
    assert max(abs(v - e.logprob) for v, e in zip(lp.token_logprobs, ref)) < TOL
    for top, e in zip(lp.top_logprobs, ref):
        assert 1 <= len(top) <= 2 and max(top.values()) <= 0
        assert abs(max(top.values()) - e.top[0][1]) < TOL
    if sampler == "entropy_bound":  # the committed canvas is the last step's argmax: the chosen one is the top
        assert all(abs(max(top.values()) - v) < TOL for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:k]) for k in range(len(lp.tokens))]


def test_streamed_completion_logprobs_equal_the_plain_answer(server):
    kw = {"model": server.model, "prompt": PROMPT_IDS, "max_tokens": 10, "logprobs": 1, "seed": 5,
          "extra_body": DIFFUSION}
    plain = server.client.completions.create(**kw).choices[0]
    text, tokens, values = "", [], []
    for chunk in server.client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            text += ch.text
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens
                values += ch.logprobs.token_logprobs
    assert text == plain.text and tokens == plain.logprobs.tokens and values == plain.logprobs.token_logprobs


def test_chat_logprobs_in_diffusion_mode(server):
    kw = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
          "logprobs": True, "top_logprobs": 2, "seed": 1, "extra_body": DIFFUSION}
    r = server.client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content and len(content) == 6
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert abs(t.logprob - t.top_logprobs[0].logprob) < TOL  # entropy-bound: the chosen token is the top one
    streamed = [t for chunk in server.client.chat.completions.create(stream=True, **kw) for ch in chunk.choices
                if ch.logprobs is not None for t in ch.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_too_many_alternatives_is_a_400_naming_the_field(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=server.model, prompt="x", max_tokens=4, logprobs=MAX_LOGPROBS + 1,
                                         extra_body=DIFFUSION)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=4, logprobs=True, top_logprobs=MAX_LOGPROBS + 1,
                                              extra_body=DIFFUSION)
    assert e.value.body["param"] == "top_logprobs"
