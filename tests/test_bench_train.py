"""dgemma.bench.train: --quick prints a JSON line with every required figure, the FLOP counts against hand counts of a
1-layer config, the timing wrappers leave the losses bit-identical, the plain step really trains, a compiled run
reports its graph and recompile counts, bad input is one line and exit 2, --help imports no torch. No speed is
asserted (STYLE 8)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from dgemma.bench.train import (
    Clock,
    adamw,
    measure,
    objective_flops,
    plain_flops,
    plain_model,
    plain_step,
    timed_model,
)
from dgemma.cli.main import main
from dgemma.config import FULL, preset
from dgemma.model import DiffusionGemma, init_weights
from dgemma.options import BenchTrainConfig
from dgemma.train.objective import sample_noise, training_losses

REQUIRED = ("tokens_per_s", "plain_tokens_per_s", "flops_fraction", "plain_flops_fraction", "flops_per_token",
            "plain_flops_per_token", "peak_fp32_gflops", "step_ms", "data_ms", "encoder_ms", "decoder_pass1_ms",
            "decoder_pass2_ms", "head_ms", "backward_ms", "optimizer_ms")


def one_layer():
    return preset("tiny").replace(num_hidden_layers=1, layer_types=(FULL,))


def test_quick_prints_the_figures_last(capsys):
    assert main(["bench", "train", "--quick", "--threads", "1", "2", "--steps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    assert set(r["by_threads"]) == {"1", "2"} and r["modes"] == ["eager"]
    for n in ("1", "2"):
        v = r["by_threads"][n]
        assert v["threads"] == int(n)
        for k in REQUIRED:
            assert v[k] > 0, (n, k, v[k])
        assert v["compile_s"] is None and v["recompiles"] == 0  # eager: dynamo never ran
        parts = sum(v[f"{k}_ms"] for k in ("data", "encoder", "decoder_pass1", "decoder_pass2", "head",
                                           "forward_other", "backward", "optimizer"))
        assert parts == pytest.approx(v["step_ms"], rel=0.05)  # the split covers the step (timer overhead aside)
        assert v["forward_other_ms"] >= 0
    m = r["machine"]
    assert m["torch"] == torch.__version__ and m["git"] and "avx512_bf16" in m["cpu_flags"]
    assert len(r["load_average_start"]) == 3 and len(r["load_average_end"]) == 3
    assert r["shape"]["batch"] == 4 and r["shape"]["seq_len"] == 64


def test_objective_flops_match_a_hand_count():
    c = one_layer()  # one layer is always full (the last layer is): H 64, 4 heads of 32, 1 K/V head, no v_proj
    B, T, live, n_diff, n_ar = 2, 64, 32, 40, 50
    proj = 64 * 128 + 64 * 32 + 128 * 64  # q, k (values are the raw keys), o multiply-adds per token
    ffn = 3 * 64 * 96 + 64 * 4 + 2 * 3 * 64 * 24  # gated dense MLP, router, the two chosen experts of 24
    enc = 2 * (B * T) * (proj + ffn + 2 * 128 * 64)  # scores + values over 64 keys
    dec = 2 * (B * live) * (proj + ffn + 2 * 128 * 96)  # 64 clean + 32 canvas keys
    sc_mlp = 2 * 3 * 64 * 96 * (B * live)
    expect = {"encoder": 3 * enc, "ar_head": 3 * 2 * 64 * 256 * n_ar,
              "decoder_pass1": dec + sc_mlp + 2 * 64 * 256 * (B * live),
              "decoder_pass2": 3 * (dec + sc_mlp + 2 * 64 * 256 * n_diff) + 2 * 2 * 256 * 64 * (B * live)}
    got = objective_flops(c, B, T, live, n_diff, n_ar)
    for k, v in expect.items():
        assert got[k] == v, k
    assert got["total"] == sum(expect.values())
    # tiny's second layer is sliding: its own head dim 16, 2 K/V heads, a v_proj.
    proj_s = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64
    enc_s = 2 * (B * T) * (proj_s + ffn + 2 * 64 * 64)
    assert objective_flops(preset("tiny"), B, T, live, n_diff, n_ar)["encoder"] == 3 * (enc + enc_s)


def test_plain_flops_match_a_hand_count():
    c = one_layer()
    B, T = 3, 64
    per_token = 2 * (4 * 64 * 64 + 2 * 64 * T + 2 * 64 * 96) + 2 * 64 * 256
    assert plain_flops(c, B, T) == 3 * B * T * per_token


def test_timed_model_leaves_losses_bit_identical():
    model = init_weights(DiffusionGemma(preset("tiny")), seed=0).train()
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 32:] = True  # one supervised canvas: the decoder's subset path too

    def losses():
        noise = sample_noise(x, 256, torch.Generator().manual_seed(1))
        return training_losses(model, x, noise, loss_mask=mask)

    plain = losses()
    clock = Clock()
    with timed_model(model, clock):
        timed = losses()
    assert torch.equal(plain.total, timed.total) and torch.equal(plain.diffusion_sum, timed.diffusion_sum)
    assert torch.equal(plain.ar_sum, timed.ar_sum)
    assert set(clock.s) == {"encoder", "decoder_pass1", "decoder_pass2", "head"}
    assert not {"encode", "denoise_hidden", "logits"} & set(vars(model))  # the wrappers are gone


def test_plain_step_trains_on_a_fixed_batch():
    c = preset("tiny")
    model = plain_model(c, seed=0)
    opt, params = adamw(model)
    batch = torch.randint(0, c.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    losses = [plain_step(model, opt, params, batch, 0, Clock(), torch.autocast("cpu", enabled=False))
              for _ in range(15)]  # index 0 every step: the same noise, so only the weights change
    assert losses[0] == pytest.approx(math.log(c.vocab_size), rel=0.1)
    assert losses[-1] < losses[0] - 0.3 and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_compiled_run_reports_graphs_and_recompiles():
    """The trainer's --compile path on a 1-layer model, 2 warm-up steps and 2 timed ones on new batches (cold
    compile: a minute or two on a 2-core CPU): the experts mix densely under compile, so the layer is one graph with
    no break, and new routings compile nothing more. Two graphs in all: the encoder's, and one that both decoder
    passes share (pass 1 records autograd under --compile instead of compiling a no-gradient graph of its own)."""
    from dgemma.engine.compiled import compiler_available

    if compiler_available() is not None:
        pytest.skip(compiler_available())
    base = init_weights(DiffusionGemma(one_layer()), seed=0)
    cfg = BenchTrainConfig(preset="tiny", batch_size=2, steps=2, warmup=2, threads=(1,))
    r = measure(base, cfg, 64, "compile", peak_fp32=50.0, peak_bf16=None, bf16=False)
    assert r["mode"] == "compile" and r["graphs_compiled"] == 2 and r["plain_graphs_compiled"] == 1
    assert r["recompiles"] == 0 and r["plain_recompiles"] == 0
    assert r["compile_s"] > 0 and r["tokens_per_s"] > 0
    assert r["graph_breaks"] == {}


@pytest.mark.parametrize("argv,says", [
    (["--seq-len", "50"], "not a multiple of the model's canvas_length=32"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "nan"], "--batch-size"),
    (["--vocab-size", "0"], "--vocab-size"),
    (["--threads", "0"], "--threads"),
    (["--threads", "1", "1"], "distinct"),
    (["--steps", "inf"], "--steps"),
    (["--model", "no/such/folder"], "is not a model folder"),
    (["--model", "models/dgemma-sudoku-6x6", "--preset", "tiny"], "not both"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, says):
    assert main(["bench", "train", "--quick", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("dgemma bench train: error: ") and says in err, err


def test_a_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main(["bench", "train", "--model", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "is not a model folder" in err


def test_help_imports_no_torch():
    script = ("import contextlib, io, sys\nfrom dgemma.cli.main import main\n"
              "with contextlib.redirect_stdout(io.StringIO()) as out:\n    code = main(['bench', 'train', '--help'])\n"
              "print(code, len(out.getvalue()), any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    code, chars, torch_loaded = proc.stdout.split()
    assert (code, torch_loaded) == ("0", "False") and int(chars) > 500, proc.stderr
