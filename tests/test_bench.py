"""dgemma.bench.speed: the engine step split on random:tiny (its parts add up, the FLOP fractions and recompile count make
sense; no speed is asserted), the matmul FLOP count's parts, and --threads parsing (one-line errors, exit 2)."""

import argparse

import pytest

from dgemma.api import load
from dgemma.bench.speed import _matmul_flops, engine_split
from dgemma.cli.main import main
from dgemma.options import thread_counts


@pytest.fixture(scope="module")
def tiny():
    return load("random:tiny").model


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
@pytest.mark.parametrize("batch", [1, 2])
def test_engine_split_parts_add_up(tiny, mode, batch):
    r = engine_split(tiny, mode, batch, 4, peak_fp32=50.0, peak_bf16=5.0)
    assert (r["mode"], r["batch"], r["compile"], r["recompiles"]) == (mode, batch, False, 0)
    assert r["timed_steps"] == 4 and r["warmup_steps"] >= 4
    parts = [r[k] for k in ("encoder_layers_ms", "decoder_layers_ms", "head_ms", "sampler_ms")]
    assert all(p >= 0 for p in parts)
    assert r["layers_ms"] == pytest.approx(r["encoder_layers_ms"] + r["decoder_layers_ms"])
    assert sum(parts) <= r["step_ms"] * (1 + 1e-6)
    assert r["overhead_ms"] >= -1e-6 * r["step_ms"]
    assert r["overhead_ms"] == pytest.approx(r["step_ms"] - sum(parts), abs=1e-9)
    assert r["tokens_per_s"] > 0 and r["gflops"] > 0 and r["matmul_gflop_per_step"] > 0
    assert r["fp32_matmul_fraction"] > 0
    assert r["bf16_matmul_fraction"] == pytest.approx(10 * r["fp32_matmul_fraction"])
    C = tiny.config.canvas_length
    assert r["tokens_per_step"] == (batch * C / r["steps_per_canvas"] if mode == "diffusion" else batch)
    if mode == "diffusion":
        assert r["decoder_layers_ms"] > 0
        assert r["encoder_passes_per_step"] == pytest.approx(1 / r["steps_per_canvas"])  # one commit per canvas
    else:
        assert r["decoder_layers_ms"] == 0 and r["encoder_passes_per_step"] == 1


def test_diffusion_window_is_whole_canvases(tiny):
    r = engine_split(tiny, "diffusion", 1, 5, peak_fp32=50.0, peak_bf16=5.0)
    assert r["timed_steps"] == 8  # rounded up to whole canvases of 4 steps


def test_matmul_flops_parts(tiny):
    c = tiny.config
    head = 2 * 3 * c.hidden_size * c.vocab_size
    assert _matmul_flops(tiny, 3, 10) - _matmul_flops(tiny, 3, 10, head=False) == head
    soft = _matmul_flops(tiny, 3, 10, self_conditioning=True) - _matmul_flops(tiny, 3, 10)
    assert soft == head + 2 * 3 * 3 * c.hidden_size * c.intermediate_size  # soft embedding + its gated MLP
    assert _matmul_flops(tiny, 4, 10) == 2 * _matmul_flops(tiny, 2, 10)  # linear in the positions
    assert _matmul_flops(tiny, 1, 100) > _matmul_flops(tiny, 1, 10)


def test_thread_counts_parse():
    assert thread_counts("1,2") == (1, 2)
    assert thread_counts("4") == (4,)
    for bad in ("", "0", "1,,2", "a", "1,1", "-1", "1.5", "2000"):
        with pytest.raises(argparse.ArgumentTypeError, match="thread counts"):
            thread_counts(bad)


@pytest.mark.parametrize("value", ["x", "0", "1,", "2,2"])
def test_malformed_threads_is_one_line_exit_2(capsys, value):
    assert main(["bench", "--model", "random:tiny", f"--threads={value}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("dgemma bench: error: argument --threads") and "must be" in err
