"""`dgemma serve --lora NAME=DIR`: several adapters beside the base on one live server, chosen per request with
`model: NAME` through the official openai client; concurrent requests over all of them get the answers a server
with that one adapter (`--adapter`) gives; unknown names are 404s; /metrics counts requests per model; bad
adapters stop the server at start with one line."""

from __future__ import annotations

import concurrent.futures
import copy
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, LiveServer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.slow  # live servers

from dgemma.api import load
from dgemma.lora import LoRAConfig, apply_lora, lora_modules, save_adapter

FAST = {"denoising_steps": 3}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    base = load("random:tiny").model
    folder = tmp_path_factory.mktemp("adapters")
    out = {}
    for i in range(4):
        m = copy.deepcopy(base)
        apply_lora(m, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj") if i % 2 else ("o_proj",)))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for mod in lora_modules(m).values():
                mod.lora_A.copy_(torch.randn(mod.lora_A.shape, generator=g) * 0.5)
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.5)
        save_adapter(m, folder / f"a{i}")
        out[f"a{i}"] = str(folder / f"a{i}")
    return out


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def _ask(client, model: str, i: int, chat: bool = False) -> str:
    if chat:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"q{i}"}],
                                           max_tokens=20, seed=i, extra_body=FAST)
        return r.choices[0].message.content
    mode = "ar" if i % 3 == 0 else "diffusion"
    r = client.completions.create(model=model, prompt=f"def f{i}(x):", max_tokens=24, seed=i,
                                  extra_body={**FAST, "mode": mode, "ignore_eos": True})
    return r.choices[0].text


def test_adapters_per_request(adapters, serve):
    specs = [a for name, path in adapters.items() for a in ("--lora", f"{name}={path}")]
    server = serve(*specs, "--max-batch", "8", "--max-model-len", "512", log="multi.log")
    log = server.log.read_text()
    assert all(f"adapter {name} (" in log and "MiB" in log for name in adapters), log
    client = _client(server)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"random:tiny", *adapters}
    assert all(cards[n].model_extra["parent"] == "random:tiny" for n in adapters)
    models = ["random:tiny", *adapters]
    jobs = [(models[i % len(models)], i, i % 4 == 1) for i in range(16)]  # 16 requests over base + 4 adapters
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: _ask(client, *job), jobs))
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "a0" in e.value.body["message"] and e.value.body["code"] == "model_not_found"
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in models:
        n = sum(m == name for m, _, _ in jobs)
        assert f'dgemma_model_requests_total{{model="{name}"}} {n:.1f}' in metrics, name
    server.stop()
    # each adapter alone on its own server (--adapter, applied the single-adapter way): the same answers
    for name in ("random:tiny", *adapters):
        extra = () if name == "random:tiny" else ("--adapter", adapters[name])
        one = serve(*extra, "--max-model-len", "512", log=f"{name.replace(':', '-')}.log")
        c = _client(one)
        for (model, i, chat), got in zip(jobs, together, strict=True):
            if model == name:
                assert _ask(c, "random:tiny", i, chat) == got, (name, i)
        one.stop()
    assert len({t for (m, _, _), t in zip(jobs, together, strict=True) if m != "random:tiny"}) > 3


@pytest.mark.parametrize("spec, says", [
    ("justaname", "--lora wants NAME=DIR"),
    ("x=/no/such/folder", "adapter 'x'"),
])
def test_bad_lora_stops_at_start_with_one_line(spec, says):
    proc = subprocess.run([sys.executable, "-m", "dgemma.serve", "--model", "random:tiny", "--lora", spec,
                           "--port", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_an_adapter_of_another_base_is_refused(tmp_path):
    from helpers import random_model
    from oracle import CONFIGS

    other = random_model(CONFIGS["gqa4"])
    apply_lora(other, LoRAConfig(rank=2, alpha=2.0))
    save_adapter(other, tmp_path / "gqa4-adapter")
    proc = subprocess.run([sys.executable, "-m", "dgemma.serve", "--model", "random:tiny", "--lora",
                           f"x={tmp_path / 'gqa4-adapter'}", "--port", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2 and "adapter 'x'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1


def test_bench_serve_with_adapters(adapters, tmp_path):
    """`dgemma bench serve --lora ...`: each level also runs spread over the base and the adapters, and the JSON
    line reports that level's tokens/s over the base-only level's."""
    import json

    specs = [a for name, path in adapters.items() for a in ("--lora", f"{name}={path}")]
    proc = subprocess.run([sys.executable, "-m", "dgemma.bench.serve", "--quick", "--concurrency", "4", "--modes",
                           "diffusion", *specs, "--out", str(tmp_path), "--name", "lora"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["lost_requests"] == 0
    (row,) = r["lora_levels"]
    assert row["models"] == ["random:tiny", *adapters] and row["complete"] == row["planned"]
    assert r["lora_tokens_per_s_vs_base"]["diffusion@4"] == pytest.approx(row["tokens_per_s_vs_base"])
    assert row["tokens_per_s_vs_base"] > 0
