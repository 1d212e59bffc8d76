"""The stepped engine (engine.py) against the reference path, and its scheduler against a mock model.

Every request runs beside others that join and leave around it, and must produce exactly the tokens the reference
path (generate.py over model.py + cache.py + sampler.py) gives it alone, with its own seed."""

import pytest
import torch
from helpers import random_model
from oracle import CONFIGS

from dgemma.engine.engine import Engine
from dgemma.engine.generate import ARParams, DiffusionParams, generate_ar, generate_diffusion
from dgemma.params import EngineConfig, QueueFull, Request, RequestError, SamplingParams


def _model(name="tiny", seed=0, scale=0.5, dtype=torch.float32):
    return random_model(CONFIGS[name], seed, scale, dtype), CONFIGS[name]


def _ids(cfg, T, seed):
    return torch.randint(5, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_alone(model, ids, p: SamplingParams) -> list[int]:
    """The reference path, batch 1, with the request's own seed."""
    x = torch.tensor([ids])
    if p.mode == "ar":
        ap = ARParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                      eos_token_ids=p.eos_token_ids, seed=p.seed, engine="reference")
        return generate_ar(model, x, ap).tokens[0]
    dp = DiffusionParams(**{k: getattr(p, k) for k in (
        "max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
        "confidence_threshold", "eos_token_ids", "seed", "sampler", "commit_threshold")}, engine="reference")
    return generate_diffusion(model, x, dp).tokens[0]


def run(engine: Engine, schedule: dict[int, list[Request]], max_steps: int = 10_000, abort_at: dict | None = None):
    """Step the engine, adding requests at the given steps; returns ({id: tokens}, {id: finish reason})."""
    out, reasons, step = {}, {}, 0
    while step < max_steps:
        for req in schedule.get(step, []):
            engine.add(req)
            out[req.request_id] = []
        for rid in (abort_at or {}).get(step, []):
            assert engine.abort(rid)
            reasons[rid] = "abort"
        if not engine.has_work() and step > max(schedule):
            break
        for ev in engine.step():
            out[ev.request_id].extend(ev.new_ids)
            if ev.finished:
                reasons[ev.request_id] = ev.finish_reason
        step += 1
    assert not engine.has_work()
    return out, reasons


def _mixed_requests(cfg, eos_free):
    C, W = cfg.canvas_length, cfg.sliding_window
    base = {"max_denoising_steps": 4}
    return [
        # (prompt length, params)
        (W + 5, SamplingParams(max_new_tokens=3 * C + 3, seed=1, **base)),
        (3, SamplingParams(max_new_tokens=C, seed=2, max_denoising_steps=3)),
        (W + 9, SamplingParams(mode="ar", max_new_tokens=20, seed=3)),
        (7, SamplingParams(max_new_tokens=2 * C, seed=4, sampler="confidence", **base)),
        (11, SamplingParams(mode="ar", max_new_tokens=25, temperature=0.9, top_k=20, seed=5)),
        # adaptive stopping fires at once: any entropy passes, and no stability is asked
        (5, SamplingParams(max_new_tokens=2 * C, seed=6, max_denoising_steps=6, confidence_threshold=1e3,
                           stability_threshold=0)),
        (2 * W + 1, SamplingParams(max_new_tokens=4 * C, seed=7, eos_token_ids=eos_free, **base)),
        (9, SamplingParams(max_new_tokens=2 * C + 1, seed=8, t_min=0.1, t_max=1.5, entropy_bound=2.0, **base)),
    ]


def _mixed(name):
    model, cfg = _model(name, 1)
    # An EOS id the free-running request 6 produces mid-way, so it stops early (reason "stop").
    probe = SamplingParams(max_new_tokens=4 * cfg.canvas_length, seed=7, max_denoising_steps=4)
    free = reference_alone(model, _ids(cfg, 2 * cfg.sliding_window + 1, 106), probe)
    eos = (free[cfg.canvas_length + 5],)
    reqs = [Request(str(i), _ids(cfg, T, 100 + i), p) for i, (T, p) in enumerate(_mixed_requests(cfg, eos))]
    return model, cfg, reqs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_request_alone_equals_reference(name):
    """One engine, requests one after another (slots reused, prompts past the window, EOS, adaptive stopping, both
    samplers, AR greedy and sampled): every request's tokens equal the reference path's, bit for bit."""
    model, cfg, reqs = _mixed(name)
    engine = Engine(model, EngineConfig(max_batch=3, max_model_len=512))
    for r in reqs:
        out, reasons = run(engine, {0: [r]})
        assert out[r.request_id] == reference_alone(model, r.prompt_ids, r.params), f"request {r.request_id}"
        if r.request_id == "6":
            assert reasons["6"] == "stop" and len(out["6"]) < 4 * cfg.canvas_length


@pytest.mark.parametrize("name", list(CONFIGS))
def test_requests_joining_and_leaving_equal_themselves_alone(name):
    """Batch-invariant mode: 8 requests in 3 slots, admitted at different steps and canvases, sharing encoder and
    decoder passes with rows at other places: each gets exactly the tokens it gets alone."""
    model, _cfg, reqs = _mixed(name)
    config = EngineConfig(max_batch=3, max_model_len=512, batch_invariant=True)
    out, reasons = run(Engine(model, config), {0: reqs[:2], 1: reqs[2:4], 3: reqs[4:6], 7: reqs[6:]})
    alone = Engine(model, config)
    for r in reqs:
        solo, _ = run(alone, {0: [r]})
        assert out[r.request_id] == solo[r.request_id], f"request {r.request_id}"
    assert reasons["6"] == "stop" and reasons["0"] == "length"


def test_rows_in_lockstep_share_attention_calls_and_equal_themselves_alone():
    """Rows with the same prompt length added together stay in lockstep, so their attention runs as one batched
    call per layer: each still gets exactly its tokens alone (diffusion and AR)."""
    model, cfg = _model("gqa4", 3)
    config = EngineConfig(max_batch=4, max_model_len=512, batch_invariant=True)
    reqs = [Request(f"d{i}", _ids(cfg, 20, i), SamplingParams(max_new_tokens=3 * cfg.canvas_length, seed=i,
                                                             max_denoising_steps=3)) for i in range(2)]
    reqs += [Request(f"a{i}", _ids(cfg, 20, 10 + i), SamplingParams(mode="ar", max_new_tokens=40, seed=i))
             for i in range(2)]
    out, _ = run(Engine(model, config), {0: reqs})
    alone = Engine(model, config)
    for r in reqs:
        assert out[r.request_id] == run(alone, {0: [r]})[0][r.request_id], r.request_id


def test_without_batch_invariance_shared_passes_agree_to_rounding():
    """The default mode's closest property when rows share a pass: the same logits up to float rounding (BLAS picks
    another kernel for matmuls of very few rows, and in the experts a row shares its expert's matmul with others)."""
    model, _cfg, reqs = _mixed("wide")
    eng = Engine(model, EngineConfig(max_batch=3, max_model_len=512))
    from dgemma.engine.engine import Piece
    a, b = reqs[2].prompt_ids, reqs[4].prompt_ids
    with torch.inference_mode():
        both = eng.runner.run([Piece(0, 0, len(a)), Piece(1, 0, len(b))], model.embed(torch.tensor([a + b])), True)
        one = eng.runner.run([Piece(2, 0, len(b))], model.embed(torch.tensor([b])), True)
    assert torch.allclose(both[0, len(a):], one[0], atol=1e-4, rtol=1e-4)


def test_adaptive_stopping_fires_and_matches():
    model, cfg = _model("wide", 2)
    # any entropy passes the confidence test; the row stops once its argmax is stable for `stability_threshold` steps
    p = SamplingParams(max_new_tokens=3 * cfg.canvas_length, seed=0, max_denoising_steps=8, confidence_threshold=1e3,
                       stability_threshold=0)
    ids = _ids(cfg, 6, 0)
    eng = Engine(model, EngineConfig(max_batch=2, max_model_len=256))
    out, _ = run(eng, {0: [Request("a", ids, p)]})
    ref = generate_diffusion(model, torch.tensor([ids]), DiffusionParams(
        max_new_tokens=p.max_new_tokens, max_denoising_steps=8, confidence_threshold=1e3, stability_threshold=0,
        seed=0, engine="reference"))
    assert out["a"] == ref.tokens[0]
    assert any(s < 8 for s in ref.stats.steps_per_canvas[0])  # stopping did fire


def test_abort_frees_the_slot_and_leaves_others_alone():
    model, cfg = _model("tiny", 0)
    a = Request("a", _ids(cfg, 9, 1), SamplingParams(max_new_tokens=4 * cfg.canvas_length, seed=1,
                                                     max_denoising_steps=3))
    b = Request("b", _ids(cfg, 4, 2), SamplingParams(mode="ar", max_new_tokens=40, seed=2))
    c = Request("c", _ids(cfg, 5, 3), SamplingParams(max_new_tokens=cfg.canvas_length, seed=3,
                                                     max_denoising_steps=3))
    eng = Engine(model, EngineConfig(max_batch=2, max_model_len=256))
    out, reasons = run(eng, {0: [a, b], 1: [c]}, abort_at={4: ["a"]})
    assert reasons["a"] == "abort" and eng.metrics()["running"] == 0
    for r in (b, c):  # c got a's slot once a was aborted
        assert out[r.request_id] == reference_alone(model, r.prompt_ids, r.params)
    assert not eng.abort("a") and not eng.abort("nope")


def test_abort_waiting_request():
    model, _cfg = _model("tiny", 0)
    eng = Engine(model, EngineConfig(max_batch=1, max_model_len=256))
    eng.add(Request("a", [5, 6], SamplingParams(mode="ar", max_new_tokens=3, seed=0)))
    eng.add(Request("b", [5, 6], SamplingParams(mode="ar", max_new_tokens=3, seed=0)))
    assert eng.metrics()["waiting"] == 2 and eng.abort("b")
    while eng.has_work():
        eng.step()
    assert eng.counters["requests"] == 2


def test_long_prompt_is_prefilled_in_chunks_without_stalling_others():
    model, cfg = _model("gqa4", 0)
    ar = Request("ar", _ids(cfg, 4, 0), SamplingParams(mode="ar", max_new_tokens=30, seed=0))
    long = Request("long", _ids(cfg, 90, 1), SamplingParams(max_new_tokens=cfg.canvas_length, seed=1,
                                                             max_denoising_steps=2))
    eng = Engine(model, EngineConfig(max_batch=2, max_model_len=256, prefill_chunk=8))
    eng.add(ar)
    eng.step()
    eng.add(long)
    got = []
    for _ in range(12):  # while the long prompt is being prefilled (90 / 8 steps), the AR row keeps decoding
        evs = {e.request_id: e for e in eng.step()}
        got.append(len(evs["ar"].new_ids) if "ar" in evs else 0)
    assert got == [1] * 12
    while eng.has_work():
        eng.step()
    # chunked prefill computes the same function (to float rounding): the AR row's tokens are untouched
    out, _ = run(Engine(model, EngineConfig(max_batch=2, max_model_len=256)), {0: [ar]})
    assert out["ar"] == reference_alone(model, ar.prompt_ids, ar.params)


def test_bf16_equal_reference():
    model, cfg = _model("tiny", 4, dtype=torch.bfloat16)
    reqs = [Request(str(i), _ids(cfg, 5 + 3 * i, i), SamplingParams(max_new_tokens=2 * cfg.canvas_length, seed=i,
                                                                   max_denoising_steps=3)) for i in range(3)]
    out, _ = run(Engine(model, EngineConfig(max_batch=3, max_model_len=256)), {0: reqs[:2], 2: reqs[2:]})
    for r in reqs:
        assert out[r.request_id] == reference_alone(model, r.prompt_ids, r.params)


def test_one_shot_api_runs_on_the_engine_per_row_seeds():
    """generate_diffusion/generate_ar (engine='fast') run each row as a request seeded seed + row: row r of a batch
    equals the reference alone with that seed."""
    model, cfg = _model("wide", 0)
    prompts = [_ids(cfg, 12, 0), _ids(cfg, 4, 1)]
    ids = torch.zeros(2, 12, dtype=torch.long)
    am = torch.zeros(2, 12, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, 12 - len(p):], am[r, 12 - len(p):] = torch.tensor(p), True
    dp = DiffusionParams(max_new_tokens=2 * cfg.canvas_length + 2, max_denoising_steps=3, seed=10)
    out = generate_diffusion(model, ids, dp, am)
    ap = ARParams(max_new_tokens=17, temperature=0.7, seed=3)
    ar = generate_ar(model, ids, ap, am)
    for r, p in enumerate(prompts):
        assert out.tokens[r] == reference_alone(model, p, dp.sampling(r))
        assert ar.tokens[r] == reference_alone(model, p, ap.sampling(r))
    assert out.stats.decoder_passes == [9, 9] and out.stats.steps_per_canvas == [[3, 3, 3]] * 2


def test_requests_that_cannot_fit_are_refused_before_allocating():
    model, cfg = _model("tiny", 0)
    eng = Engine(model, EngineConfig(max_batch=2, max_model_len=100))
    with pytest.raises(RequestError, match="max_new_tokens"):
        eng.add(Request("a", [5] * 10, SamplingParams(max_new_tokens=1_000_000_000)))
    with pytest.raises(RequestError, match="empty"):
        eng.add(Request("b", [], SamplingParams()))
    with pytest.raises(RequestError, match="prompt ids"):
        eng.add(Request("c", [cfg.vocab_size], SamplingParams()))
    with pytest.raises(RequestError, match="temperature"):
        eng.add(Request("d", [5], SamplingParams(mode="ar", temperature=float("nan"))))
    with pytest.raises(RequestError, match="kv_memory_mb"):
        Engine(model, EngineConfig(max_batch=64, max_model_len=4096, kv_memory_mb=0.01))
    with pytest.raises(RequestError, match="max_position_embeddings"):
        generate_diffusion(model, torch.tensor([[5, 6]]), DiffusionParams(max_new_tokens=1_000_000_000))
    with pytest.raises(RequestError, match="max_position_embeddings"):
        generate_ar(model, torch.tensor([[5, 6]]), ARParams(max_new_tokens=1_000_000_000))


def test_non_finite_logits_end_the_request_with_an_error():
    model, _cfg = _model("tiny", 0)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    eng = Engine(model, EngineConfig(max_batch=2, max_model_len=256))
    eng.add(Request("a", [5, 6, 7], SamplingParams(max_new_tokens=8, seed=0)))
    evs = []
    while eng.has_work():
        evs += eng.step()
    assert evs[-1].finish_reason == "error" and "non-finite" in evs[-1].error
    with pytest.raises(RequestError, match="non-finite"):
        generate_diffusion(model, torch.tensor([[5, 6]]), DiffusionParams(max_new_tokens=8, seed=0))


def test_adaptive_stopping_at_different_steps_equals_reference():
    model, cfg = _model("tiny", seed=2, scale=3.0)  # peaky logits: entropy falls as the temperature does
    p = SamplingParams(max_new_tokens=3 * cfg.canvas_length, max_denoising_steps=20, confidence_threshold=1.6,
                       stability_threshold=0)
    eng = Engine(model, EngineConfig(max_batch=2, max_model_len=256))
    steps = []
    for i in range(3):
        r = Request(str(i), _ids(cfg, 10, i), p.with_(seed=3 + i))
        out, _ = run(eng, {0: [r]})
        ref = generate_diffusion(model, torch.tensor([r.prompt_ids]), DiffusionParams(
            max_new_tokens=p.max_new_tokens, max_denoising_steps=20, confidence_threshold=1.6, stability_threshold=0,
            seed=3 + i, engine="reference"))
        assert out[r.request_id] == ref.tokens[0]
        steps += ref.stats.steps_per_canvas[0]
    assert len(set(steps)) > 1 and max(steps) < 20  # rows stopped, at different steps


@pytest.mark.parametrize("name", list(CONFIGS))
def test_confidence_sampler_threshold_commits_equal_reference(name):
    """Commit-by-confidence with a low threshold: canvases end at different steps."""
    model, cfg = _model(name, 4, scale=1.0)
    p = SamplingParams(max_new_tokens=3 * cfg.canvas_length, max_denoising_steps=5, sampler="confidence",
                       commit_threshold=0.6)
    eng = Engine(model, EngineConfig(max_batch=2, max_model_len=512))
    steps = []
    for i in range(3):
        r = Request(str(i), _ids(cfg, cfg.sliding_window + 3, 20 + i), p.with_(seed=6 + i))
        out, _ = run(eng, {0: [r]})
        ref = generate_diffusion(model, torch.tensor([r.prompt_ids]), DiffusionParams(
            max_new_tokens=p.max_new_tokens, max_denoising_steps=5, sampler="confidence", commit_threshold=0.6,
            seed=6 + i, engine="reference"))
        assert out[r.request_id] == ref.tokens[0]
        steps += ref.stats.steps_per_canvas[0]
    assert len(set(steps)) > 1 and min(steps) < 5


# ---------------------------------------------------------------------------------------------------------------
# Scheduler tests against a mock model: known logits, no layers, so thousands of steps run in milliseconds.
class MockModel(torch.nn.Module):
    """A DiffusionGemma stand-in with no layers whose logits put almost all mass on token `favourite`: every canvas
    is accepted at its first step, and adaptive stopping ends it at the second."""

    def __init__(self, vocab=16, canvas=4, favourite=7):
        super().__init__()
        # one layer in the config (K/V buffers are sized from it), none in the model: passes are no-ops
        self.config = CONFIGS["tiny"].replace(vocab_size=vocab, canvas_length=canvas, num_hidden_layers=1,
                                              layer_types=("full_attention",), max_position_embeddings=4096)
        self.embed_tokens = torch.nn.Embedding(vocab, self.config.hidden_size)
        self.register_buffer("embed_scale", torch.tensor(1.0))
        for t in ("sliding_attention", "full_attention"):
            self.register_buffer(f"inv_freq_{t}", torch.ones(4))
        self.layers = torch.nn.ModuleList()
        self.soft_matmul = None
        self.favourite = favourite

    dtype = property(lambda self: torch.float32)
    device = property(lambda self: torch.device("cpu"))

    def embed(self, ids):
        return self.embed_tokens(ids)

    def self_conditioning(self, e, soft):
        return e + soft

    def norm(self, h):
        return h

    def logits(self, hidden):
        out = torch.full((*hidden.shape[:-1], self.config.vocab_size), -20.0)
        out[..., self.favourite] = 20.0
        return out


def _mock_engine(**kw):
    return Engine(MockModel(), EngineConfig(**{"max_model_len": 512, **kw}))


def test_mock_admission_is_first_come_first_served_and_slots_are_reused():
    eng = _mock_engine(max_batch=2)
    p = SamplingParams(max_new_tokens=8, max_denoising_steps=4, seed=0)
    for i in range(6):
        eng.add(Request(str(i), [1, 2, 3], p))
    finished, running_seen = [], []
    while eng.has_work():
        for ev in eng.step():
            if ev.finished:
                finished.append(ev.request_id)
        running_seen.append(eng.metrics()["running"])
    assert finished == [str(i) for i in range(6)]
    assert max(running_seen) <= 2


def test_mock_queue_limit():
    eng = _mock_engine(max_batch=1, max_queue=2)
    eng.add(Request("a", [1], SamplingParams()))
    eng.add(Request("b", [1], SamplingParams()))
    with pytest.raises(QueueFull):
        eng.add(Request("c", [1], SamplingParams()))
    eng.step()  # "a" is admitted: the queue has room again
    eng.add(Request("c", [1], SamplingParams()))
    with pytest.raises(RequestError, match="already"):
        eng.add(Request("c", [1], SamplingParams()))


def test_mock_no_request_waits_forever():
    """A stream of new short requests keeps arriving; the early long one still finishes, and every request is
    admitted within a bounded number of steps of arriving (FCFS)."""
    eng = _mock_engine(max_batch=4, prefill_chunk=16)
    long = Request("long", list(range(1, 15)) * 20, SamplingParams(mode="ar", max_new_tokens=50, seed=0))
    eng.add(long)
    arrived, admitted, done = {}, {}, set()
    for step in range(400):
        if step < 300 and step % 2 == 0:
            rid = f"s{step}"
            eng.add(Request(rid, [1, 2], SamplingParams(max_new_tokens=4, max_denoising_steps=2, seed=step)))
            arrived[rid] = step
        eng.step()
        for row in eng.rows.values():
            admitted.setdefault(row.req.request_id, step)
        done |= {rid for rid in arrived if rid not in eng.by_id}
    assert "long" not in eng.by_id  # finished
    waits = [admitted[r] - arrived[r] for r in arrived if r in admitted]
    assert len(waits) == len(arrived) and max(waits) < 40


def test_mock_tokens_and_reasons():
    eng = _mock_engine(max_batch=3)
    eng.add(Request("len", [1], SamplingParams(max_new_tokens=6, max_denoising_steps=3)))
    eng.add(Request("eos", [1], SamplingParams(max_new_tokens=6, max_denoising_steps=3, eos_token_ids=(7,))))
    eng.add(Request("ar", [1], SamplingParams(mode="ar", max_new_tokens=5)))
    got, why = {}, {}
    while eng.has_work():
        for ev in eng.step():
            got.setdefault(ev.request_id, []).extend(ev.new_ids)
            if ev.finished:
                why[ev.request_id] = ev.finish_reason
    assert got["len"] == [7] * 6 and why["len"] == "length"  # exact length: 6 of the second 4-token canvas' 8
    assert got["eos"] == [] and why["eos"] == "stop"
    assert got["ar"] == [7] * 5 and why["ar"] == "length"


def test_t_min_zero_is_refused_before_it_divides_by_zero():
    with pytest.raises(RequestError, match="t_min must be > 0"):
        SamplingParams(t_min=0.0).validate()


@pytest.mark.slow
def test_compiled_layers_agree_with_eager_and_stop_compiling():
    """EngineConfig(compile=True): the layer pieces and the diffusion sampler run as compiled graphs (compiled.py) at
    bucketed row counts. The hidden states of the same ragged pass agree with the eager modules to float rounding
    (the pieces themselves are tested in tests/test_compiled.py), and once the buckets in use are compiled, further
    steps compile nothing."""
    from dgemma.engine.compiled import compiler_available
    from dgemma.engine.engine import Piece, Runner

    if compiler_available() is not None:
        pytest.skip(compiler_available())
    model, _ = _model("tiny")
    eng = Engine(model, EngineConfig(max_batch=3, max_model_len=256))
    eager = eng.runner
    comp = Runner(model, eng.pool, compile=True)
    torch.manual_seed(0)
    H = model.config.hidden_size
    for slot, n in enumerate((5, 9, 3)):  # prompts of different lengths in three slots, one ragged encoder pass
        eng.pool.free(slot)
    pieces = [Piece(0, 0, 5), Piece(1, 0, 9), Piece(2, 0, 3)]
    h = torch.randn(1, 17, H)
    with torch.inference_mode():
        a = eager.run(pieces, h, encoder=True)
        b = comp.run(pieces, h, encoder=True)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)

    eng2 = Engine(model, EngineConfig(max_batch=2, max_model_len=256, compile=True))
    for i, mode in enumerate(("diffusion", "ar")):
        eng2.add(Request(str(i), [2, 5, 7, 9], SamplingParams(mode=mode, max_new_tokens=200, seed=i, max_denoising_steps=4,
                                                              stability_threshold=None, confidence_threshold=None)))
    for _ in range(12):
        eng2.step()
    before = (eng2.runner.compiled.compilations, eng2.compiled_sampler.compilations)
    for _ in range(8):
        eng2.step()
    after = (eng2.runner.compiled.compilations, eng2.compiled_sampler.compilations)
    assert after == before and min(before) > 0


def test_compiled_pieces_are_reused_until_the_weights_change():
    """The compiled pieces live on the model (one-shot calls reuse their graphs) and hold its weight tensors, so a
    model whose tensors were replaced since (here: int8 quantisation) gets new ones, not stale graphs."""
    from dgemma.engine.compiled import compiler_available
    from dgemma.engine.engine import compiled_pieces
    from dgemma.quant import quantize_int8

    if compiler_available() is not None:
        pytest.skip(compiler_available())
    import copy

    model, _ = _model("tiny")
    first = compiled_pieces(model, 0)
    assert compiled_pieces(model, 0) is first
    assert compiled_pieces(copy.deepcopy(model), 0) is not first  # a copy can be made, and gets pieces of its own
    assert compiled_pieces(model, 16) is not first  # batch-invariant padding: pieces of its own
    quantize_int8(model)
    assert compiled_pieces(model, 0) is not first


def test_compile_refuses_unmerged_lora_adapters():
    """The compiled graphs read base weights only: an unmerged adapter would be ignored silently, so it is refused."""
    from dgemma.lora import LoRAConfig, apply_lora

    model, _ = _model("tiny")
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(RequestError, match="unmerged LoRA"):
        Engine(model, EngineConfig(max_batch=1, max_model_len=64, compile=True))
