"""benchmarks/gpu_bench.py and gpu.sh, run on the CPU at the scaled-down shape (the GPU run is the same code).

The figures are not checked (benchmarks are read, not asserted); the keys, the files and the sanity of the values
are, so that the one run on a lent GPU does not fail on a typo."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"
TINY_RUN = ["--scale", "small", "--device", "cpu", "--prompt-tokens", "8", "--new-tokens", "8",
            "--step-repeats", "1", "--gen-repeats", "1"]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


gb = _load()


def _check_main_keys(r: dict) -> None:
    assert r["complete"] is True and r["benchmark"] == "gpu_bench" and r["scale"] == "small"
    assert "CPU" in r["device"] and r["git"]
    for key in ("prefill_ms", "denoise_step_ms", "ar_step_ms", "diffusion_tokens_per_s", "ar_tokens_per_s",
                "diffusion_over_ar", "ar_ms_per_token", "diffusion_ms_per_decoder_pass", "matmul_peak_tflops",
                "copy_gbytes_per_s", "denoise_step_tflops", "denoise_step_peak_fraction", "ar_step_tflops"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["diffusion_over_ar"] == pytest.approx(r["diffusion_tokens_per_s"] / r["ar_tokens_per_s"])
    assert r["model"]["layers"] == r["model"]["layers_full"] == 4 and r["model"]["depth_cut"] is False
    assert r["engine"] in ("fast", "reference (no engine option)")
    gen = r["generation"]["modes"]
    assert gen["ar"]["tokens"] == r["new_tokens"] == 8  # EOS off: every mode returns all the tokens asked for
    head = gen[f"diffusion_{r['steps'][0]}"]
    assert head["tokens"] == 8 and head["decoder_passes"] == r["steps"][0] and head["steps_per_canvas"] == r["steps"][0]
    assert set(r["roofline"]) >= {"denoise_step_floor_ms", "ar_step_floor_ms", "diffusion_over_ar_floor"}


@pytest.fixture
def one_thread():
    """One thread: on a shared 2-core machine this is faster and steadier than two fighting other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_small_scale_run_on_cpu(tmp_path, capsys, one_thread):
    r = gb.run(gb.parse_args([*TINY_RUN, "--steps", "2", "--hf-layers", "1", "--out", str(tmp_path)]))
    _check_main_keys(r)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["diffusion_over_ar"] == pytest.approx(r["diffusion_over_ar"])
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["complete"] and saved["ar_tokens_per_s"] == pytest.approx(r["ar_tokens_per_s"])
    assert (tmp_path / "gpu_bench.log").read_text().strip().splitlines()[-1] == last
    t = r["transformers"]
    if "skipped" not in t and "error" not in t:  # transformers 5.23.0 (the test extra) is installed
        assert t["identical_tokens_compat"] is True  # fp32 on the CPU: compat mode equals transformers generate()
        assert t["speedup_vs_transformers"] > 0 and t["new_tokens"] == 8 and t["layers"] == 1
    else:
        assert "error" not in t, t


@pytest.mark.slow
def test_gpu_sh_runs_the_benchmark_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "BENCH_TIMEOUT": "300",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *TINY_RUN, "--steps", "1", "--hf", "off"],
                       capture_output=True, text=True, env=env, timeout=320, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    _check_main_keys(r)
    assert r["transformers"] == {"skipped": "--hf off"}
    names = {f.name for f in tmp_path.iterdir()}
    assert {"gpu_bench.json", "gpu_bench.log", "gpu.sh.log", "nvidia-smi.txt"} <= names


@pytest.mark.skipif("engine" not in {f.name for f in dataclasses.fields(gb.DiffusionParams)},
                    reason="this dgemma has no engine option")
def test_a_failing_engine_falls_back_to_the_reference(tmp_path, monkeypatch, one_thread):
    real = gb.measure_generation

    def flaky(model, prompt, new_tokens, steps, repeats, opts, *rest):
        if opts.engine == "fast":
            raise RuntimeError("fast engine broke")
        return real(model, prompt, new_tokens, steps, repeats, opts, *rest)

    monkeypatch.setattr(gb, "measure_generation", flaky)
    r = gb.run(gb.parse_args([*TINY_RUN, "--steps", "1", "--hf", "off"]))
    assert r["complete"] and r["generation"]["engine_error"] == {"fast": "RuntimeError: fast engine broke"}
    assert r["engine"] == "reference" and r["diffusion_tokens_per_s"] > 0


def test_an_interrupted_run_still_reports(tmp_path, monkeypatch, capsys, one_thread):
    def stop(*args):  # what `timeout` does to the run: SIGTERM, handled as Interrupted
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not turned into Interrupted")

    monkeypatch.setattr(gb, "measure_steps", stop)
    r = gb.run(gb.parse_args([*TINY_RUN, "--out", str(tmp_path)]))
    assert r["complete"] is False and r["interrupted"] == "signal 15" and r["model"]["layers"] == 4
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["interrupted"] == "signal 15"
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["interrupted"] == "signal 15"
    assert gb.main([*TINY_RUN, "--out", str(tmp_path)]) == 1  # the exit status says the run is incomplete
    assert signal.getsignal(signal.SIGTERM) is not gb._on_sigterm  # the handler is put back


def test_flops_and_roofline_of_the_real_shape():
    cfg = gb.model_config("full")
    n = cfg.num_parameters()
    assert cfg.num_hidden_layers == 30 and cfg.canvas_length == 256 and 25e9 < n["total"] < 26e9
    f_dn = gb.pass_flops(cfg, 256, 512, denoise=True)
    assert f_dn > 2 * n["active_per_token"] * 256  # plus attention and the soft embedding
    assert f_dn < 1.3 * 2 * n["active_per_token"] * 256
    # A 256-token canvas routes to (almost) every expert: a denoising step reads nearly all the weights, an AR step
    # only the active ones.
    assert gb.pass_weight_bytes(cfg, 256, True, 2) > 2 * n["total"]
    assert gb.pass_weight_bytes(cfg, 1, False, 2) < 2 * n["active_per_token"]
    roof = gb.roofline(cfg, 512, 16, peak_tflops=800.0, gbytes_per_s=3000.0, bytes_per=2)
    assert roof["denoise_step_bound"] == "memory" and roof["ar_step_bound"] == "memory"
    assert 0 < roof["diffusion_over_ar_floor"] < 16


def test_engine_options_are_feature_detected():
    from dataclasses import dataclass

    @dataclass
    class Old:
        max_new_tokens: int = 1

    kw, name, compiled = gb.engine_kwargs(Old, gb.EngineOptions("fast", True, 256))
    assert kw == {} and name.startswith("reference") and compiled is False

    @dataclass
    class New:
        engine: str = "reference"
        compile: bool = False
        sampler_chunk: int | None = None

    opts = gb.EngineOptions("fast", True, 256)
    assert gb.engine_kwargs(New, opts) == ({"engine": "fast", "compile": True, "sampler_chunk": 256}, "fast", True)
    assert gb.engine_kwargs(New, gb.EngineOptions("fast")) == ({"engine": "fast"}, "fast", False)
    assert gb.engine_kwargs(New, gb.EngineOptions("reference", False, 256))[0] == {"engine": "reference"}


def test_depth_cut_and_on_device_build():
    cfg = gb.model_config("small")
    assert gb.fit_layers(cfg, torch.device("cpu"), torch.float32, None) == (4, "preset")
    assert gb.fit_layers(cfg, torch.device("cpu"), torch.float32, 2)[0] == 2
    cut = gb.with_layers(gb.model_config("full"), 7)
    assert cut.num_hidden_layers == 7 and cut.layer_types[-1] == "full_attention" and cut.layer_types[5] == "full_attention"
    m = gb.build_model(gb.with_layers(cfg, 2), torch.device("cpu"), torch.bfloat16, seed=0)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
    assert m.embed_tokens.weight.float().std().item() == pytest.approx(0.02, rel=0.1)
