"""Several LoRA adapters served from one engine (lora.attach_adapters): requests for different adapters and for the
base share every pass, and each gets exactly the tokens it gets alone with its adapter applied the single-adapter
way (load_adapter, unmerged LoRALinear), in batch-invariant mode; bad adapters are refused naming the problem."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import random_model
from oracle import CONFIGS

from dgemma.engine.engine import BATCH_INVARIANT_ROWS, Engine
from dgemma.lora import (
    AdapterRows,
    LoRAConfig,
    LoRAError,
    MultiLoRALinear,
    apply_lora,
    attach_adapters,
    load_adapter,
    lora_modules,
    save_adapter,
)
from dgemma.params import EngineConfig, Request, RequestError, SamplingParams


def run(engine: Engine, schedule: dict[int, list[Request]]) -> dict[str, list[int]]:
    out, step = {}, 0
    while engine.has_work() or step <= max(schedule):
        for req in schedule.get(step, []):
            engine.add(req)
            out[req.request_id] = []
        for ev in engine.step():
            out[ev.request_id].extend(ev.new_ids)
        step += 1
        assert step < 10_000
    return out


def _adapters(base, folder, n: int, targets=None) -> dict[str, str]:
    """n PEFT adapter folders for `base`, with random (non-zero) A and B, different targets and scalings, and
    ranks 2, 4, 2, 4, ... (so that the batched product stacks adapters of one rank and keeps ranks apart)."""
    paths = {}
    for i in range(n):
        m = copy.deepcopy(base)
        cfg = LoRAConfig(rank=2 + 2 * (i % 2), alpha=4.0 + i, targets=targets or (("q_proj", "v_proj", "o_proj", "up_proj")
                                                                          if i % 2 else ("q_proj", "down_proj")))
        apply_lora(m, cfg)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for mod in lora_modules(m).values():
                mod.lora_A.copy_(torch.randn(mod.lora_A.shape, generator=g) * 0.3)
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.3)
        path = folder / f"adapter{i}"
        save_adapter(m, path)
        paths[f"ad{i}"] = str(path)
    return paths


@pytest.mark.parametrize("name", ["tiny", "gqa4"])
def test_mixed_adapters_in_one_engine_equal_each_alone(name, tmp_path):
    cfg = CONFIGS[name]
    base = random_model(cfg, seed=0)
    paths = _adapters(base, tmp_path, 4)
    served = copy.deepcopy(base)
    info = attach_adapters(served, paths)
    assert [a.name for a in info] == list(paths) and all(a.nbytes > 0 for a in info)
    g = torch.Generator().manual_seed(7)
    reqs = []
    for i in range(16):
        adapter = [None, "ad0", "ad1", "ad2", "ad3"][i % 5]
        ids = torch.randint(5, cfg.vocab_size, (int(torch.randint(3, 2 * cfg.sliding_window, (1,), generator=g)),),
                            generator=g).tolist()
        mode = "ar" if i % 3 == 2 else "diffusion"
        p = SamplingParams(mode=mode, max_new_tokens=cfg.canvas_length + 5 if mode == "diffusion" else 12, seed=i,
                           max_denoising_steps=3, temperature=0.7 if i % 4 == 0 else 0.0, adapter=adapter)
        reqs.append(Request(str(i), ids, p))
    config = EngineConfig(max_batch=6, max_model_len=512, batch_invariant=True)
    together = run(Engine(served, config), {0: reqs[:5], 1: reqs[5:9], 3: reqs[9:13], 6: reqs[13:]})
    singles = {None: base}
    for a, path in paths.items():
        singles[a] = load_adapter(copy.deepcopy(base), path)
    differs = 0
    for r in reqs:
        one = singles[r.params.adapter]
        solo = Request(r.request_id, r.prompt_ids, r.params.with_(adapter=None))
        alone = run(Engine(one, config), {0: [solo]})
        assert together[r.request_id] == alone[r.request_id], f"request {r.request_id} ({r.params.adapter})"
        if r.params.adapter is not None:
            plain = run(Engine(base, config), {0: [solo]})
            differs += plain[r.request_id] != alone[r.request_id]
    assert differs >= 8, "the adapters barely change the output: the comparison shows little"


def test_without_rows_the_base_product_is_exact(tmp_path):
    base = random_model(CONFIGS["tiny"], seed=1)
    served = copy.deepcopy(base)
    attach_adapters(served, _adapters(base, tmp_path, 2))
    multi = {name: m for name, m in served.named_modules() if isinstance(m, MultiLoRALinear)}
    assert multi
    for name, module in multi.items():
        x = torch.randn(1, 9, module.in_features)
        assert torch.equal(module(x), base.get_submodule(name)(x)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_product_equals_its_grouped_twin(dtype):
    """MultiLoRALinear.forward (one bmm pair per rank over the stacked adapters) against forward_grouped (each
    adapter's rows through its own products): bit for bit at the engine's batch-invariant row minimum, for any
    subset of adapters present, ragged groups and dummy rows of no adapter; close without a row minimum (small
    matmuls round differently at different row counts, so there is no exactness to keep there)."""
    g = torch.Generator().manual_seed(3)
    for n_in, n_out in ((48, 48), (48, 96), (96, 40)):
        rows = AdapterRows()
        module = MultiLoRALinear(torch.nn.Linear(n_in, n_out, bias=False).to(dtype), rows)
        for index, rank in enumerate((4, 4, 8, 4, 2), start=1):
            module.add(index, torch.randn(rank, n_in, generator=g) * 0.3, torch.randn(n_out, rank, generator=g) * 0.3,
                       (2.0 + index) / rank)
        assert sorted(module.stacks) == [2, 4, 8] and module.stacks[4][0] == (1, 2, 4)
        for n, present in ((5, [3]), (16, [1, 2, 3, 4, 5]), (40, [2, 4]), (300, [1, 3, 4, 5]), (64, [])):
            x = torch.randn(1, n, n_in, generator=g).to(dtype)
            order = torch.randperm(n, generator=g)
            parts = order.tensor_split(len(present) + 1)  # the last part: rows of no adapter
            for min_rows in (BATCH_INVARIANT_ROWS, 0):
                rows.groups = [(i, part.sort().values) for i, part in zip(present, parts) if part.numel()]
                rows.min_rows = min_rows
                fast, slow = module(x), module.forward_grouped(x)
                if min_rows:
                    assert torch.equal(fast, slow), (n_in, n_out, n, present)
                else:
                    torch.testing.assert_close(fast, slow)
                base = F.linear(x, module.weight)
                assert torch.equal(fast[0, parts[len(present)]], base[0, parts[len(present)]])  # no adapter's rows
                if present:
                    assert not torch.equal(fast, base)


def test_unknown_adapter_and_bad_folders_are_refused(tmp_path):
    base = random_model(CONFIGS["tiny"], seed=2)
    paths = _adapters(base, tmp_path, 1)
    served = copy.deepcopy(base)
    attach_adapters(served, paths)
    engine = Engine(served, EngineConfig(max_batch=2, max_model_len=256))
    with pytest.raises(RequestError, match="no adapter named 'nope'.*loaded: ad0"):
        engine.add(Request("x", [5, 6, 7], SamplingParams(max_new_tokens=4, adapter="nope")))
    plain = Engine(copy.deepcopy(base), EngineConfig(max_batch=2, max_model_len=256))
    with pytest.raises(RequestError, match="serves the base model only"):
        plain.add(Request("x", [5, 6, 7], SamplingParams(max_new_tokens=4, adapter="ad0")))
    with pytest.raises(RequestError, match="compile=True does not run"):
        Engine(served, EngineConfig(max_batch=2, max_model_len=256, compile=True))
    # another base (other shapes), a folder that is not an adapter: refused naming the adapter, model untouched
    other = _adapters(random_model(CONFIGS["gqa4"], seed=0), tmp_path / "other", 1)
    fresh = copy.deepcopy(base)
    with pytest.raises(LoRAError, match="adapter 'bad'.*another base|adapter 'bad'.*does not have"):
        attach_adapters(fresh, {"ok": paths["ad0"], "bad": other["ad0"]})
    assert not any(isinstance(m, MultiLoRALinear) for m in fresh.modules()) and not hasattr(fresh, "adapter_rows")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAError, match="adapter 'junk'.*adapter_config.json not found"):
        attach_adapters(fresh, {"junk": str(tmp_path / "empty")})
