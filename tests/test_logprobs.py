"""Log-probabilities: the engine's (AR tokens, prompt scoring) against the model computed directly and against
transformers' DiffusionGemma, the API's, and the text/token alignment the server relies on (server_text).
Diffusion tokens' log-probabilities: tests/test_diffusion_logprobs.py.

Tolerance: 1e-4 nats against our own model's one-shot forward (the engine's ragged, chunked passes round a little
differently from one causal forward over the whole sequence; fp32), and 1e-4 against transformers' encoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import CONFIGS, dgemma_from_hf, hf_model

from dgemma.cache import KVCache
from dgemma.engine.engine import Engine
from dgemma.model import DiffusionGemma, init_weights
from dgemma.params import MAX_LOGPROBS, EngineConfig, Request, RequestError, SamplingParams
from dgemma.serve.text import TextStream, TokenStream, token_bytes, token_label

TOL = 1e-4


def _model(name="tiny", seed=0):
    return init_weights(DiffusionGemma(CONFIGS[name]), std=0.3, seed=seed).eval()


def _run(model, requests, **cfg) -> dict[str, dict]:
    eng = Engine(model, EngineConfig(max_batch=len(requests), max_model_len=256, **cfg))
    for r in requests:
        eng.add(r)
    out = {r.request_id: {"ids": [], "lp": [], "prompt": [], "reason": None} for r in requests}
    while eng.has_work():
        for ev in eng.step():
            o = out[ev.request_id]
            o["ids"] += ev.new_ids
            o["lp"] += ev.new_logprobs
            o["prompt"] += ev.prompt_logprobs
            o["reason"] = ev.finish_reason or o["reason"]
    return out


@torch.no_grad()
def _direct(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the encoder's next-token logits at every position of one causal forward: [L, V] fp32."""
    h = model.encode(torch.tensor([ids]), KVCache.empty(model.config))
    return F.log_softmax(model.logits(h)[0].float(), dim=-1)


def _prompt(n, seed=1, vocab=256):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_ar_logprobs_are_the_models_raw_distribution(temperature):
    model = _model()
    prompt = _prompt(2 * model.config.sliding_window + 3)  # past the sliding window
    p = SamplingParams(mode="ar", max_new_tokens=6, seed=3, temperature=temperature, top_k=5 if temperature else None,
                       logprobs=3)
    got = _run(model, [Request("a", prompt, p)])["a"]
    ref = _direct(model, prompt + got["ids"])
    assert len(got["lp"]) == len(got["ids"]) == 6
    for k, (t, lp) in enumerate(zip(got["ids"], got["lp"])):
        row = ref[len(prompt) - 1 + k]  # temperature 1, no top-k: the model's distribution, not the sampler's
        assert lp.token_id == t and abs(lp.logprob - row[t].item()) < TOL
        values, ids = torch.topk(row, 3)
        assert [i for i, _ in lp.top] == ids.tolist()
        assert max(abs(v - r) for (_, v), r in zip(lp.top, values.tolist())) < TOL
        if temperature == 0:  # greedy: the chosen token is the most probable, with the very same number
            assert lp.top[0] == (t, lp.logprob)


@pytest.mark.parametrize("chunk", [5, 256])
@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_prompt_logprobs_any_mode_any_chunking(mode, chunk):
    model = _model()
    prompt = _prompt(23)
    p = SamplingParams(mode=mode, max_new_tokens=3, seed=0, max_denoising_steps=2)
    got = _run(model, [Request("a", prompt, p, prompt_logprobs=2), Request("b", _prompt(9, 2), p)],
               prefill_chunk=chunk, sampler_chunk=4)  # several head chunks per prefill chunk too
    plp = got["a"]["prompt"]
    ref = _direct(model, prompt)
    assert len(plp) == len(prompt) and plp[0] is None
    assert max(abs(plp[i].logprob - ref[i - 1, prompt[i]].item()) for i in range(1, len(prompt))) < TOL
    assert all(plp[i].token_id == prompt[i] and len(plp[i].top) == 2 for i in range(1, len(prompt)))
    assert got["b"]["prompt"] == [] and len(got["a"]["ids"]) == 3  # only the row that asked; generation unchanged


def test_logprobs_change_no_token():
    model = _model()
    prompt = _prompt(12)
    p = SamplingParams(mode="ar", max_new_tokens=8, seed=5, temperature=0.8, top_p=0.9)
    plain = _run(model, [Request("a", prompt, p)])["a"]["ids"]
    asked = _run(model, [Request("a", prompt, p.with_(logprobs=MAX_LOGPROBS), prompt_logprobs=1)])["a"]["ids"]
    assert plain == asked


def test_eos_is_cut_with_its_logprob():
    model = _model()
    prompt = _prompt(10)
    first = _run(model, [Request("a", prompt, SamplingParams(mode="ar", max_new_tokens=4))])["a"]["ids"]
    p = SamplingParams(mode="ar", max_new_tokens=4, eos_token_ids=(first[2],), logprobs=0)
    got = _run(model, [Request("a", prompt, p)])["a"]
    assert got["reason"] == "stop" and len(got["ids"]) == len(got["lp"]) == first.index(first[2])


def test_bad_requests_are_refused():
    eng = Engine(_model(), EngineConfig(max_batch=2, max_model_len=512))
    with pytest.raises(RequestError, match=str(MAX_LOGPROBS)):
        eng.add(Request("a", [1, 2], SamplingParams(mode="ar", logprobs=MAX_LOGPROBS + 1)))
    with pytest.raises(RequestError, match="prompt_logprobs"):
        eng.add(Request("a", [1, 2], SamplingParams(mode="ar"), prompt_logprobs=-1))
    with pytest.raises(RequestError, match="integer"):
        SamplingParams(mode="ar", logprobs=True).validate()


@pytest.mark.parametrize("name", ["tiny", "gqa4"])
def test_prompt_logprobs_match_transformers(name):
    pytest.importorskip("transformers")
    cfg = CONFIGS[name]
    hf = hf_model(cfg, seed=3)
    ours = dgemma_from_hf(hf, cfg)
    prompt = _prompt(2 * cfg.sliding_window + 5, seed=7, vocab=cfg.vocab_size)
    got = _run(ours, [Request("a", prompt, SamplingParams(mode="ar", max_new_tokens=2, logprobs=0),
                              prompt_logprobs=0)], prefill_chunk=8)["a"]
    with torch.no_grad():
        ids = torch.tensor([prompt + got["ids"][:1]])
        h = hf.model.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        logits = hf.get_output_embeddings()(h)[0].float()
        cap = hf.config.get_text_config().final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        ref = F.log_softmax(logits, dim=-1)
    seq = ids[0].tolist()
    plp = got["prompt"]
    assert max(abs(plp[i].logprob - ref[i - 1, seq[i]].item()) for i in range(1, len(prompt))) < TOL
    assert abs(got["lp"][0].logprob - ref[len(prompt) - 1, seq[len(prompt)]].item()) < TOL


def test_generate_text_logprobs():
    from dgemma.api import generate_text, load

    lm = load("random:tiny")
    r = generate_text(lm, ["def add(a, b):"], mode="ar", max_new_tokens=5, logprobs=2, seed=0)[0]
    prompt = lm.tokenizer.encode("def add(a, b):", add_bos=lm.tokenizer.add_bos_default)
    ref = _direct(lm.model, prompt + r.token_ids)
    assert len(r.logprobs) == len(r.token_ids) == 5
    assert all(abs(lp.logprob - ref[len(prompt) - 1 + k, t].item()) < TOL
               for k, (t, lp) in enumerate(zip(r.token_ids, r.logprobs)))
    assert generate_text(lm, ["x"], mode="ar", max_new_tokens=2)[0].logprobs is None
    with pytest.raises(RequestError, match="engine='fast'"):
        generate_text(lm, ["x"], mode="ar", logprobs=1, engine="reference")


# ---- tokens and text (what the server reports) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from dgemma.tokenizer import Tokenizer

    return Tokenizer.from_path("dgemma/assets/tokenizer.json")


def _stream(tok, ids, stops, pushes):
    text, tokens = TextStream(tok, stops), TokenStream(tok)
    sent, out, i = "", [], 0
    for n in pushes:
        part = ids[i:i + n]
        i += n
        sent += text.push(part)
        tokens.push(part, [None] * len(part))
        out += tokens.release(len(text.text), final=text.stopped)
        if text.stopped:
            break
    if not text.stopped:
        sent += text.finish()
        out += tokens.release(len(text.text), final=True)
    return sent, out


@pytest.mark.parametrize("stops", [[], ["€ d"], ["ef f"], ["\n"]])
@pytest.mark.parametrize("pushes", [[1] * 20, [3, 5, 20]])
def test_reported_tokens_join_to_the_text(tok, stops, pushes):
    ids = tok.encode("é€ def f(x):\n  return x")
    sent, out = _stream(tok, ids, stops, pushes)
    assert "".join(t.text for t in out) == sent
    assert [t.token_id for t in out] == ids[:len(out)]
    if stops == ["ef f"]:  # the stop begins inside " def": that token is reported cut, nothing after it
        assert sent.endswith(" d") and out[-1].cut and out[-1].text == " d"


def test_token_bytes_and_labels(tok):
    ids = tok.encode("é€x")
    assert b"".join(token_bytes(tok, i) for i in ids) == "é€x".encode()
    assert token_label(tok, ids[0]).startswith("bytes:\\x") and token_label(tok, ids[-1]) == "x"
