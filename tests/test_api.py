"""The text-level API: one home for defaults (the model's generation_config.json), the docstring example."""

import pytest

from dgemma.api import DEFAULT_MODEL, generate_text, load


def test_defaults_come_from_generation_config():
    lm = load(DEFAULT_MODEL)
    d = lm.defaults()
    assert d.max_denoising_steps == lm.generation_config["max_denoising_steps"] == 4
    assert d.eos_token_ids == (1, 6)
    assert lm.defaults("ar").max_new_tokens == lm.generation_config["max_new_tokens"]
    assert lm.defaults(max_denoising_steps=7).max_denoising_steps == 7


def test_docstring_example_runs_and_uses_the_models_pace():
    lm = load(DEFAULT_MODEL)
    r = generate_text(lm, ["def add(a, b):"], max_new_tokens=64, seed=0)[0]
    assert len(r.token_ids) <= 64 and r.stats.steps_per_canvas[0] and max(r.stats.steps_per_canvas[0]) <= 4
    with pytest.raises(ValueError, match="not both"):
        generate_text(lm, ["x"], params=lm.defaults(), seed=1)


def test_invalid_utf8_prompt_is_a_clear_error():
    lm = load("random:tiny")
    bad = b"def \xff():".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        generate_text(lm, [bad], max_new_tokens=4)


def test_bos_follows_the_tokenizer():
    lm = load("random:tiny")
    from dgemma.api import encode_prompts
    ids, _ = encode_prompts(lm, ["hi"])
    assert (ids[0, 0].item() == lm.tokenizer.bos_id) == lm.tokenizer.add_bos_default


def test_half_checkpoints_compute_in_fp32_where_half_is_slow():
    """The bundled model is stored in bf16; load() keeps bf16 only where the CPU has native bf16 (detected)."""
    import torch

    from dgemma.api import fast_half

    stored = load(DEFAULT_MODEL, dtype="bfloat16").model.dtype
    auto = load(DEFAULT_MODEL).model.dtype
    assert stored == torch.bfloat16
    assert auto == (torch.bfloat16 if fast_half(torch.device("cpu")) else torch.float32)


def test_cpuinfo_is_read_on_x86_and_arm():
    from dgemma.hw import parse_cpuinfo

    x86 = ("processor\t: 0\nmodel name\t: Example Xeon\nflags\t\t: fpu avx2 avx512f\n\n"
           "processor\t: 1\nmodel name\t: second\nflags\t\t: fpu\n")
    assert parse_cpuinfo(x86) == ("Example Xeon", frozenset({"fpu", "avx2", "avx512f"}))
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16\nCPU part\t: 0xd40\n"
    assert parse_cpuinfo(arm) == ("", frozenset({"fp", "asimd", "bf16"}))
    assert parse_cpuinfo("garbage without colons\n") == ("", frozenset())


@pytest.mark.parametrize("flags, onednn, fast", [
    (("avx2", "fma"), False, False),
    (("avx2", "avx512f", "avx512bw"), True, False),  # oneDNN says yes, but would emulate bf16
    (("avx512f", "avx512_bf16"), True, True),
    (("avx512f", "amx_bf16", "amx_tile"), True, True),
    (("fp", "asimd", "bf16"), True, True),
    (None, True, True),  # flags unreadable: oneDNN's answer stands
    (None, False, False),
])
def test_half_precision_is_fast_only_with_native_bf16_instructions(monkeypatch, flags, onednn, fast):
    """bf16 weights at load and bf16 autocast in training both follow the CPU's own flags, not oneDNN's answer
    alone: an AVX-512 CPU without the BF16 extension emulates bf16 several times slower than fp32."""
    import torch

    from dgemma import hw
    from dgemma.api import fast_half
    from dgemma.train.dist import bf16_supported

    monkeypatch.setattr(hw, "cpu_info", lambda: None if flags is None else ("cpu", frozenset(flags)))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    cpu = torch.device("cpu")
    assert fast_half(cpu) is fast and bf16_supported(cpu) is fast


def test_thread_counts_follow_the_cores_this_process_may_use(monkeypatch):
    """`taskset -c 0 dgemma train` on a 2-core machine: two torchrun processes get one thread each from the cores
    allowed, not from all the machine has; where the platform has no affinity call, the machine's count."""
    import os

    import torch

    from dgemma import hw
    from dgemma.train.dist import Distributed, set_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert hw.cores_allowed() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    before = torch.get_num_threads()
    try:
        set_threads(None, Distributed(0, 2, 0, 2, torch.device("cpu"), False))
        assert torch.get_num_threads() == 2
        set_threads(3, Distributed(0, 1, 0, 1, torch.device("cpu"), False))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    monkeypatch.delattr(os, "sched_getaffinity")
    assert hw.cores_allowed() == 8
