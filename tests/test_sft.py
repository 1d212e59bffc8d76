"""SFT data: answer-only supervision position by position, chat rendering, malformed JSONL with line numbers,
prepared data never lost, python-functions split by document, length-grouped batches."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dgemma.tokenizer import Tokenizer
from dgemma.train.data import split_of
from dgemma.train.sft import (
    ANSWER,
    ANSWER_FILL,
    FILL,
    PROMPT,
    SFTBatches,
    SFTError,
    SFTSplit,
    encode_record,
    function_examples,
    prepare_sft,
    read_jsonl,
    render_chat,
)

TOKENIZER = Path(__file__).resolve().parents[1] / "dgemma" / "assets" / "tokenizer.json"
EOS, FILL_ID = 1, 0


def _split(prompts, answers, seq_len=16, C=4, overflow="truncate"):
    tokens = np.array([t for p, a in zip(prompts, answers) for t in (*p, *a)], dtype=np.uint16)
    lens = [len(p) + len(a) for p, a in zip(prompts, answers)]
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return SFTSplit(tokens, offsets, np.array([len(p) for p in prompts]), seq_len=seq_len, canvas_length=C,
                    fill_id=FILL_ID, eos_id=EOS, overflow=overflow)


def test_hand_made_example_supervises_only_the_answer_position_by_position():
    from dgemma.train.objective import sft_masks

    split = _split([[10, 11, 12]], [[20, 21, 22, 23, 24, EOS]])
    ids, roles = split.row(0)
    assert ids.tolist() == [FILL_ID, 10, 11, 12, 20, 21, 22, 23, 24, EOS, EOS, EOS]
    assert roles.tolist() == [FILL, PROMPT, PROMPT, PROMPT] + [ANSWER] * 6 + [ANSWER_FILL] * 2
    ids16, roles16 = split.row(0, 16)  # a longer batch: filler canvases after the answer
    assert roles16.tolist()[12:] == [FILL] * 4 and ids16.tolist()[:12] == ids.tolist()
    valid, diff, ar = sft_masks(torch.from_numpy(roles16)[None], ar_on_prompt=False)
    assert valid[0].tolist() == [False] + [True] * 11 + [False] * 4
    assert diff[0].tolist() == [False] * 4 + [True] * 8 + [False] * 4  # answer + its canvas's eos fill
    assert ar[0].tolist() == [False] * 4 + [True] * 6 + [False] * 6  # next-token targets: answer tokens only
    _, _, ar_p = sft_masks(torch.from_numpy(roles16)[None], ar_on_prompt=True)
    assert ar_p[0].tolist() == [False, False, True, True] + [True] * 6 + [False] * 6  # 1st prompt token: no context


def test_filler_and_other_rows_do_not_change_the_losses():
    """The filler is masked out of attention: any filler token gives the same losses."""
    from dgemma.config import preset
    from dgemma.model import DiffusionGemma, init_weights
    from dgemma.train.objective import sample_noise, sft_losses

    cfg = preset("tiny")
    C = cfg.canvas_length
    model = init_weights(DiffusionGemma(cfg), std=0.1, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, cfg.vocab_size, (1, 3 * C), generator=g)
    roles = torch.tensor([[FILL] * 5 + [PROMPT] * (C - 5) + [ANSWER] * (C + 3) + [ANSWER_FILL] * (C - 3)],
                         dtype=torch.int8)
    noise = sample_noise(x, cfg.vocab_size, torch.Generator().manual_seed(1))
    out = [sft_losses(model, x, roles, noise)]
    for fill in (0, 7):
        y = x.clone()
        y[:, :5] = fill
        n2 = sample_noise(y, cfg.vocab_size, torch.Generator().manual_seed(1))
        n2.noisy[:, 5:] = noise.noisy[:, 5:]
        out.append(sft_losses(model, y, roles, n2))
    for o in out[1:]:
        assert abs(float(o[1]) - float(out[0][1])) < 1e-3 and abs(float(o[2]) - float(out[0][2])) < 1e-3


def test_overflow_is_truncated_or_dropped_and_counted():
    prompts, answers = [[5] * 3, [5] * 3], [[6] * 4 + [EOS], [6] * 20 + [EOS]]
    t = _split(prompts, answers, seq_len=12)
    assert len(t) == 2 and t.overflow.count == 1 and "1 of 2 train examples" in t.overflow_note("train")
    ids, roles = t.row(1)
    assert len(ids) == 12 and (roles == ANSWER).sum() == 8 and EOS not in ids[4:].tolist()
    d = _split(prompts, answers, seq_len=12, overflow="drop")
    assert len(d) == 1 and "dropped" in d.overflow_note("train")
    assert _split(prompts[:1], answers[:1], seq_len=12).overflow_note("train") is None


def test_chat_rendering_equals_the_template():
    tok = Tokenizer.from_path(TOKENIZER)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Add 2 and 2"},
                {"role": "assistant", "content": "4"}]
    prompt, answer = render_chat(tok, messages)
    assert prompt == tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
    assert prompt + answer == tok.apply_chat_template(messages, add_generation_prompt=False).rstrip()
    from dgemma.train.sft import Record

    p, a = encode_record(tok, Record("x", 1, messages=tuple(messages)))
    assert p == tok.encode(prompt) and p[0] == tok.bos_id
    assert a[-2:] == [tok.end_of_turn_id, tok.eos_id] and tok.decode(a[:-2]) == "4"
    p2, a2 = encode_record(tok, Record("y", 1, prompt="def f(x):\n", completion="    return x\n"))
    assert p2[0] == tok.bos_id and a2[-1] == tok.eos_id and tok.decode(a2[:-1]) == "    return x\n"


BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "a"}', "bad JSON"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}', 'needs "role" and "content"'),
    ('{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}', "is empty"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "must be the assistant's answer"),
]
GOOD = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_malformed_chat_line_is_reported_with_its_line_number(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(SFTError, match=rf"d\.jsonl:3: .*{message}"):
        read_jsonl(f, "chat")


@pytest.mark.parametrize("line,message", [('{"prompt": "a"}', 'missing field "completion"'),
                                          ('{"prompt": "a", "completion": ""}', "completion is empty"),
                                          ('[1, 2]', "JSON object is expected"),
                                          ('{"prompt": 3, "completion": "x"}', '"prompt" must be a string')])
def test_malformed_prompt_completion_line_is_reported(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "p", "completion": "c"}\n' + line + "\n")
    with pytest.raises(SFTError, match=rf"d\.jsonl:2: .*{message}"):
        read_jsonl(f, "prompt-completion")


def _hashes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prepare_never_loses_prepared_data(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(40)))
    out = tmp_path / "sft"
    report = prepare_sft([str(good)], out, "prompt-completion", TOKENIZER, val_fraction=0.2)
    assert report.counts["train"] + report.counts["val"] == 40 and report.counts["val"] > 0
    before = _hashes(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"prompt": "x"}\n')
    for force in (False, True):
        with pytest.raises(SFTError):
            prepare_sft([str(bad)], out, "prompt-completion", TOKENIZER, force=force)
        assert _hashes(out) == before
    with pytest.raises(SFTError, match="already holds prepared data"):
        prepare_sft([str(good)], out, "prompt-completion", TOKENIZER)
    with pytest.raises(SFTError, match="--tokenizer"):
        prepare_sft([str(good)], tmp_path / "x", "prompt-completion", None)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    split = SFTSplit.load(out, "train", seq_len=64, canvas_length=32)
    assert len(split) == report.counts["train"]
    ids, roles = split.row(0)
    assert ids[roles == ANSWER][-1] == 1  # the answer ends with eos


def test_function_examples_ask_for_the_function_from_its_signature_and_docstring():
    source = ('def add(a, b):\n    """Add two numbers.\n\n    More text.\n    """\n    return a + b\n\n\n'
              'def nodoc(x):\n    return x\n\n\n@decorated\ndef deco():\n    """Doc."""\n    return 1\n')
    [(request, function)] = function_examples(source)
    assert request == "Write the Python function `def add(a, b):`\nAdd two numbers."
    assert function == source.split("\n\n\n")[0]


@pytest.mark.slow
def test_python_functions_is_split_by_document(tmp_path):
    from dgemma.train.sft import python_function_records

    records, origin = python_function_records()
    assert origin["examples"] == len(records) > 1000
    by_file = {}
    for r in records:
        by_file.setdefault(r.name, set()).add(split_of(r.name, 0, 0.02))
    assert all(len(s) == 1 for s in by_file.values())  # no file contributes to both splits
    assert any(s == {"val"} for s in by_file.values())


def test_batches_are_length_grouped_deterministic_resumable_and_split_across_ranks():
    rng = np.random.default_rng(0)
    prompts = [[5] * int(rng.integers(1, 9)) for _ in range(64)]
    answers = [[6] * int(rng.integers(1, 30)) + [EOS] for _ in range(64)]
    split = _split(prompts, answers, seq_len=48, C=4)
    a = SFTBatches(split, 8, seed=3)
    first = [next(a) for _ in range(5)]
    for b in first:
        assert b["input_ids"].shape[1] <= 48 and b["input_ids"].shape[1] % 4 == 0
        assert (b["roles"][:, -4:] != FILL).any()  # as long as its longest row, no longer
    state = a.state_dict()
    later = [next(a) for _ in range(10)]  # crosses an epoch (8 batches per epoch)
    b = SFTBatches(split, 8, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(later, [next(b) for _ in range(10)]))
    ranks = [SFTBatches(split, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for full in first:
        got = torch.cat([next(r)["input_ids"] for r in ranks])
        assert torch.equal(got, full["input_ids"])
    with pytest.raises(SFTError, match="cannot resume"):
        SFTBatches(split, 4, seed=3).load_state_dict(state)


def test_data_prepare_command_line_reports_the_line_and_exits_2(tmp_path, capsys):
    from dgemma.cli.main import main

    f = tmp_path / "d.jsonl"
    f.write_text(GOOD + "\n" + '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n')
    out = tmp_path / "out"
    assert main(["data", "prepare", "--source", str(f), "--format", "chat", "--tokenizer", str(TOKENIZER),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d.jsonl:2:" in err and "role 'bot'" in err and not out.exists()
    f.write_text(GOOD + "\n" + GOOD.replace("Hi", "Hey") + "\n")
    assert main(["data", "prepare", "--source", str(f), "--format", "chat", "--tokenizer", str(TOKENIZER),
                 "--out", str(out), "--val-fraction", "0"]) == 0
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["examples"] == 2
    assert main(["data", "list"]) == 0 and "python-functions" in capsys.readouterr().out
