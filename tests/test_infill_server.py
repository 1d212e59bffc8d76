"""Fill in the middle and canvas templates through `dgemma serve` and the official openai client: `suffix` on
/v1/completions (`client.completions.create(..., suffix=...)`) and the extra field `template` on both routes give
exactly the tokens of `dgemma.api.generate_text(suffix=..., template=...)` with the same seed, in diffusion and AR
mode, streamed or not; echo, n, stop, logprobs and drafts with a template; every impossible combination is a 400 in
OpenAI's shape naming the field; a fuzz of the new fields never gets a 5xx. Live random:tiny servers on 127.0.0.1
(tests/helpers.py), stopped by pid."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from helpers import LiveServer, assert_healthy, assert_no_5xx, fuzz_settings, json_values, post_fuzz_body, wait_metrics
from hypothesis import given
from hypothesis import strategies as st

from dgemma.api import generate_text, load

pytestmark = pytest.mark.slow  # live servers

STEPS = 4
PROMPT = "def mean(xs):"
LONG_SUFFIX = "\n    return total / len(xs)\n\n\ndef median(xs):\n    xs = sorted(xs)\n    return xs[len(xs) // 2]\n" * 3
TEMPLATE = "    total = {{6}}\n    return {{4}} # done"


@pytest.fixture(scope="module")
def lm():
    return load("random:tiny")


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Rounding as in a one-shot generate_text call (no batch-invariant padding): one request at a time equals it."""
    with LiveServer(tmp_path_factory.mktemp("plain") / "server.log", "--no-batch-invariant", "--max-model-len",
                    "512") as s:
        s.client = _client(s)
        yield s


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default, batch-invariant server: a choice gets the tokens it gets alone, whoever shares its steps."""
    with LiveServer(tmp_path_factory.mktemp("default") / "server.log", "--max-model-len", "512",
                    "--max-batch", "8") as s:
        s.client = _client(s)
        yield s


def _api(lm, mode, seed, prompt=PROMPT, chat=False, **kw):
    steps = {"max_denoising_steps": STEPS} if mode == "diffusion" else {}
    return generate_text(lm, [prompt], mode=mode, seed=seed, chat=chat, **steps, **kw)[0]


def _complete(server, mode, seed, stream=False, extra=None, **kw):
    """The text and finish_reason of one completion (a stream's deltas joined)."""
    body = {"model": "random:tiny", "prompt": kw.pop("prompt", PROMPT), "seed": seed, "extra_body": {
        "mode": mode, "denoising_steps": STEPS, **(extra or {})}, **kw}
    if not stream:
        r = server.client.completions.create(**body)
        return r.choices[0].text, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in server.client.completions.create(stream=True, **body):
        for ch in chunk.choices:
            text += ch.text
            finish = ch.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
@pytest.mark.parametrize("stream", [False, True])
def test_suffix_equals_generate_text(plain, lm, mode, stream):
    """OpenAI's meaning: the answer is the inserted text alone; its tokens are generate_text's hole. The long suffix
    spans several canvases after the hole's, which the server never computes: the hole is the same."""
    for seed, suffix in ((0, "\n    return total / len(xs)\n"), (1, LONG_SUFFIX)):
        want = _api(lm, mode, seed, suffix=suffix, max_new_tokens=7)
        text, finish = _complete(plain, mode, seed, stream, suffix=suffix, max_tokens=7)
        assert text == want.holes[0], (mode, seed)
        assert finish in ("stop", "length")


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
@pytest.mark.parametrize("stream", [False, True])
def test_template_equals_generate_text(plain, lm, mode, stream):
    from dgemma.template import encode

    holes = encode(lm.tokenizer, TEMPLATE).holes
    filler = {*lm.eos_ids(), lm.tokenizer.pad_id}
    for seed in (2, 3):
        want = _api(lm, mode, seed, template=TEMPLATE)
        text, finish = _complete(plain, mode, seed, stream, extra={"template": TEMPLATE})
        assert text == want.text and text.startswith("    total = ") and text.endswith(" # done")
        # "stop" when the model ended every hole early (filler in its last position), else "length"
        assert finish == ("length" if any(want.token_ids[b - 1] not in filler for _, b in holes) else "stop")
    chat = plain.client.chat.completions.create(model="random:tiny", messages=[{"role": "user", "content": "mean?"}],
                                                seed=4, extra_body={"mode": mode, "denoising_steps": STEPS,
                                                                    "template": TEMPLATE})
    assert chat.choices[0].message.content == _api(lm, mode, 4, prompt="mean?", chat=True, template=TEMPLATE).text


def test_echo_logprobs_and_usage_with_a_suffix(plain, lm):
    want = _api(lm, "ar", 5, suffix="\n    return s\n", max_new_tokens=6)
    r = plain.client.completions.create(model="random:tiny", prompt=PROMPT, suffix="\n    return s\n", max_tokens=6,
                                        seed=5, echo=True, logprobs=2, extra_body={"mode": "ar"})
    choice = r.choices[0]
    assert choice.text == PROMPT + want.holes[0]
    assert "".join(choice.logprobs.tokens) == choice.text  # the prompt's tokens, then the hole's (no suffix)
    assert r.usage.completion_tokens <= 6


def test_n_stop_and_drafts_with_a_template(server, lm):
    """n choices equal single requests with seed + i (batch invariance); a stop string cuts the filled template;
    every draft canvas holds the template's fixed tokens at their positions."""
    template = "x = {{5}}; y = {{9}}; z = {{12}}"
    body = {"model": "random:tiny", "prompt": "a = 1", "extra_body": {"denoising_steps": STEPS, "template": template}}
    many = server.client.completions.create(n=3, seed=10, **body)
    alone = [server.client.completions.create(seed=10 + i, **body).choices[0].text for i in range(3)]
    assert [c.text for c in many.choices] == alone
    cut = server.client.completions.create(seed=10, stop=["; z"], **body).choices[0]
    assert cut.finish_reason == "stop" and cut.text == alone[0][:alone[0].find("; z")]

    from dgemma.template import encode

    tpl = encode(lm.tokenizer, template)
    drafts, text = [], ""
    for chunk in server.client.completions.create(seed=10, stream=True, stream_options={"include_drafts": True},
                                                  **body):
        for ch in chunk.choices:
            text += ch.text
            if (ch.model_extra or {}).get("dgemma_draft"):
                drafts.append(ch.model_extra["dgemma_draft"])
    assert text == alone[0] and drafts
    for d in drafts:
        for i, t in enumerate(d["ids"]):
            pos = d["offset"] + i
            if pos < len(tpl.ids) and tpl.ids[pos] >= 0:
                assert t == tpl.ids[pos], (d["step"], pos)


FIELD_ERRORS = [
    ({"template": "{{x}}"}, "template", "{{N}}"),
    ({"template": "a{{3"}, "template", "not closed"),
    ({"template": ""}, "template", "empty"),
    ({"template": "{{2}}", "suffix": "z"}, "suffix", "not both"),
    ({"template": "a {{3}}", "response_format": {"type": "json_object"}}, "template", "response_format"),
    ({"suffix": "b", "regex": "[0-9]+"}, "suffix", "regex"),
    ({"template": "{{4000}}"}, "template", "context"),
    ({"template": "x " * 600 + "{{2}}"}, "template", "context"),
    ({"suffix": "word " * 600}, "suffix", "context"),
    ({"suffix": "x", "max_tokens": 5000}, "suffix", "context"),
    ({"template": "abc {{9}} def", "max_tokens": 3}, "max_tokens", "spans"),
    ({"suffix": "x", "max_tokens": 0, "echo": True}, "max_tokens", "max_tokens 0"),
    ({"template": "{{3}}", "record": True}, "record", "recorded"),
]


@pytest.mark.parametrize("body, param, message", FIELD_ERRORS)
def test_bad_templates_and_suffixes_are_400s(plain, body, param, message):
    chat_ok = "suffix" not in body and "echo" not in body  # chat has no suffix (an unknown field there) nor echo
    for path, base in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}))[:2 if chat_ok else 1]:
        r = httpx.post(f"{plain.url}{path}", json={"model": "random:tiny", **base, **body}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and message in err["message"] and err["type"] == "invalid_request_error", err
        if "context" in message:
            assert err["code"] == "context_length_exceeded"
    extra = {k: v for k, v in body.items() if k not in ("suffix", "max_tokens", "echo")}
    with pytest.raises(openai.BadRequestError, match="template|suffix|max_tokens|record"):
        plain.client.completions.create(model="random:tiny", prompt="x", suffix=body.get("suffix"),
                                        max_tokens=body.get("max_tokens", 4), echo=body.get("echo"),
                                        extra_body=extra)


def test_a_lone_surrogate_is_a_400(plain):
    """A JSON escape \\ud800 without its pair is no text: a 400 naming the field, in any text field."""
    bodies = [("/v1/completions", b'{"prompt": "x", "%s": "a\\ud800"}' % f.encode(), f) for f in ("template", "suffix",
                                                                                                    "stop")]
    bodies += [("/v1/completions", b'{"prompt": ["x", "a\\udfff"]}', "prompt"),
               ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages")]
    for path, body, field in bodies:
        r = httpx.post(f"{plain.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert "surrogate" in r.json()["error"]["message"]


_json = json_values(max_leaves=6)
_templates = st.lists(st.sampled_from(["a", " = ", "{{", "}}", "\\{{", "{{3}}", "{{1}}", "{{0}}", "{{ 2 }}",
                                       "{{40}}", "{{999}}", "{{x}}", "\n", "é"]), max_size=6).map("".join)
_bodies = st.fixed_dictionaries({"max_tokens": st.integers(-1, 6) | st.none() | _json, "denoising_steps": st.just(2)},
                                optional={"template": _templates | _json, "suffix": st.text(max_size=8) | _json,
                                          "stream": st.booleans(), "n": st.integers(0, 2), "echo": st.booleans(),
                                          "mode": st.sampled_from(["ar", "diffusion"]), "seed": st.integers(-1, 3),
                                          "stop": st.sampled_from(["=", "a", ["}}", "\n"]]),
                                          "logprobs": st.integers(0, 2), "regex": st.sampled_from(["[a-z]+", "("]),
                                          "stream_options": st.fixed_dictionaries({"include_drafts": st.booleans()})})


@fuzz_settings(max_examples=50)
@given(body=_bodies, chat=st.booleans())
def test_fuzz_template_fields_never_5xx(server, body, chat):
    assert_no_5xx(post_fuzz_body(server.url, body, chat), body)


def test_alive_after_fuzz(server):
    assert_healthy(server.url)
    r = server.client.completions.create(model="random:tiny", prompt="x", seed=0,
                                         extra_body={"denoising_steps": 2, "template": "k = {{3}} end"})
    assert r.choices[0].text.startswith("k = ") and r.choices[0].text.endswith(" end")
    assert wait_metrics(server.url, lambda m: "dgemma_requests_running 0.0" in m, timeout_s=30)
