"""Recorded trajectories (dgemma/engine/trajectory.py): a recording replays to exactly the tokens the run produced, the
file round-trips, and a truncated or foreign file is refused with the line at fault. random:tiny, CPU."""

from __future__ import annotations

import io
import json

import pytest

from dgemma.api import generate_text, load
from dgemma.cli import main as cli
from dgemma.engine.trajectory import FORMAT, VERSION, Recorder, TrajectoryError, plot, read, replay, settle_steps


@pytest.fixture(scope="module")
def lm():
    return load("random:tiny")


@pytest.fixture(scope="module")
def recorded(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("traj") / "run.jsonl"
    kw = {"max_new_tokens": 40, "seed": 3, "max_denoising_steps": 6}
    with_record = generate_text(lm, ["def add(a, b):"], record=path, **kw)[0]
    without = generate_text(lm, ["def add(a, b):"], **kw)[0]
    return path, with_record, without


def test_recorded_run_replays_to_its_tokens(recorded, lm):
    path, res, plain = recorded
    assert res.token_ids == plain.token_ids and res.text == plain.text  # recording changes nothing
    traj = read(path)
    assert traj.tokens() == res.token_ids
    assert traj.end["tokens"] == len(res.token_ids) and traj.end["text"] == lm.tokenizer.decode(res.token_ids)
    assert traj.end["finish_reason"] == res.finish_reason
    C = lm.model.config.canvas_length
    assert traj.header["version"] == VERSION and traj.header["canvas_length"] == C
    assert traj.header["prompt_ids"] == lm.tokenizer.encode("def add(a, b):", add_bos=lm.tokenizer.add_bos_default)
    canvases = traj.canvases()
    assert len(canvases) == -(-40 // C)
    assert [len(g) for g in canvases] == res.stats.steps_per_canvas[0] == traj.end["steps_per_canvas"]
    assert sum(len(g) for g in canvases) == res.stats.decoder_passes[0] == traj.end["decoder_passes"]
    for g in canvases:
        assert [s["step"] for s in g] == list(range(1, len(g) + 1))
        for s in g:
            assert len(s["entropy"]) == C and all(h >= 0 for h in s["entropy"])
            assert s["temperature"] is not None and 0.4 - 1e-6 <= s["temperature"] <= 0.8 + 1e-6
            assert abs(sum(s["entropy"]) / C - s["mean_entropy"]) < 1e-3
        assert g[0]["temperature"] == pytest.approx(0.8) and g[-1]["step"] == len(g)
    assert all(str(i) in traj.end["pieces"] for i in res.token_ids)
    # the terminal replay shows the same run and returns the same tokens
    from rich.console import Console

    out = io.StringIO()
    assert replay(traj, speed=0, console=Console(file=out, force_terminal=False)) == res.token_ids


def test_ar_recording(lm, tmp_path):
    path = tmp_path / "ar.jsonl"
    res = generate_text(lm, ["x = "], mode="ar", record=path, max_new_tokens=12, seed=0)[0]
    assert res.token_ids == generate_text(lm, ["x = "], mode="ar", max_new_tokens=12, seed=0)[0].token_ids
    traj = read(path)
    assert traj.header["mode"] == "ar" and not traj.steps and len(traj.commits) == len(res.token_ids)
    assert traj.tokens() == res.token_ids


def test_round_trip(recorded, tmp_path):
    path = recorded[0]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    again = tmp_path / "again.jsonl"
    again.write_text("".join(json.dumps(r) + "\n" for r in records))
    a, b = read(path), read(again)
    assert (a.header, a.steps, a.commits, a.end) == (b.header, b.steps, b.commits, b.end)


def test_recorder_round_trip_by_hand(tmp_path):
    from dgemma.params import Draft

    class Tok:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    path = tmp_path / "hand.jsonl"
    with Recorder(path) as rec:
        rec.header("m", "diffusion", "p", [5, 6], 4, {"seed": 0})
        rec.step(Draft(0, 0, 1, [1, 2, 3, 4], [True, False, False, True], 0.5, [0.1, 1.0, 0.8, 0.1], 0.8))
        rec.step(Draft(0, 0, 2, [1, 2, 9, 4], [True, True, True, True], 0.01, [0.0, 0.01, 0.03, 0.0], 0.4))
        rec.commit(0, 0, [1, 2, 9])
        assert not path.exists()  # written under a temporary name until the end record
        rec.end(Tok(), "length", [1, 2, 9], decoder_passes=2, encoder_passes=1, steps_per_canvas=[2])
    traj = read(path)
    assert traj.tokens() == [1, 2, 9] and traj.end["text"] == "<1><2><9>" and traj.piece(9) == "<9>"
    assert settle_steps(traj.steps) == [1.0, 2.0, 2.0, 1.0]
    assert not list(tmp_path.glob(".*tmp"))


def test_interrupted_recording_leaves_no_file(tmp_path):
    path = tmp_path / "cut.jsonl"
    with pytest.raises(RuntimeError), Recorder(path) as rec:
        rec.header("m", "diffusion", None, [1], 4, {})
        raise RuntimeError("boom")
    assert not path.exists() and not list(tmp_path.iterdir())


def test_truncated_files_name_the_line(recorded, tmp_path):
    lines = recorded[0].read_text().splitlines()
    no_end = tmp_path / "no_end.jsonl"
    no_end.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(TrajectoryError, match=rf"ends at line {len(lines) - 1} without its end record"):
        read(no_end)
    mid = tmp_path / "mid.jsonl"
    mid.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    with pytest.raises(TrajectoryError, match=r"mid.jsonl line 4 is not JSON \(the file looks cut short\)"):
        read(mid)
    short = tmp_path / "short.jsonl"
    step = json.loads(lines[1])
    step["ids"] = step["ids"][:-1]
    short.write_text(lines[0] + "\n" + json.dumps(step) + "\n")
    with pytest.raises(TrajectoryError, match="line 2: a step needs"):
        read(short)


def test_foreign_files_are_refused(tmp_path, recorded):
    cases = {
        "other.jsonl": ('{"prompt": "x", "text": "y"}\n', "other.jsonl line 1 is not a trajectory record"),
        "header.jsonl": ('{"type": "header", "format": "something-else", "version": 1}\n',
                         "line 1 is not a dgemma trajectory header"),
        "newer.jsonl": (json.dumps({"type": "header", "format": FORMAT, "version": VERSION + 1}) + "\n",
                        "line 1: trajectory version 2 is newer"),
        "text.jsonl": ("hello world\n", "text.jsonl line 1 is not JSON"),
        "empty.jsonl": ("", "is empty"),
    }
    for name, (body, message) in cases.items():
        (tmp_path / name).write_text(body)
        with pytest.raises(TrajectoryError, match=message):
            read(tmp_path / name)
    (tmp_path / "bin.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(TrajectoryError, match="not UTF-8"):
        read(tmp_path / "bin.jsonl")
    lines = recorded[0].read_text().splitlines()
    (tmp_path / "twice.jsonl").write_text("\n".join(lines + lines) + "\n")
    with pytest.raises(TrajectoryError, match=f"line {len(lines) + 1}: a second header"):
        read(tmp_path / "twice.jsonl")


def test_edited_commit_is_caught(recorded, tmp_path):
    records = [json.loads(line) for line in recorded[0].read_text().splitlines()]
    commit = next(r for r in records if r["type"] == "commit")
    commit["ids"][0] = (commit["ids"][0] + 1) % 50
    path = tmp_path / "edited.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(TrajectoryError, match="not its last step's draft"):
        read(path).tokens()


def test_plot_writes_a_png(recorded, tmp_path):
    pytest.importorskip("matplotlib")
    out = plot(read(recorded[0]), tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_replay_and_plot(recorded, tmp_path, capsys):
    path, res, _ = recorded
    assert cli.main(["replay", str(path), "--speed", "0"]) == 0
    assert capsys.readouterr().out == res.text + "\n"  # stdout: the completion
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n')
    assert cli.main(["replay", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma replay: error: ") and "bad.jsonl line 1" in err and err.count("\n") == 1
    assert cli.main(["plot", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(path), "--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").is_file()


def test_record_needs_one_prompt(lm, tmp_path):
    with pytest.raises(ValueError, match="one prompt at a time"):
        generate_text(lm, ["a", "b"], record=tmp_path / "x.jsonl", max_new_tokens=4)


def test_record_with_a_stop_string(lm, tmp_path):
    kw = {"max_new_tokens": 40, "seed": 3, "max_denoising_steps": 6}
    full = generate_text(lm, ["def add(a, b):"], **kw)[0].text
    stop = full[20:23]  # a piece of the second canvas's text (canvas 16)
    plain = generate_text(lm, ["def add(a, b):"], stop=[stop], **kw)[0]
    res = generate_text(lm, ["def add(a, b):"], stop=[stop], record=tmp_path / "s.jsonl", **kw)[0]
    assert (res.text, res.token_ids, res.finish_reason) == (plain.text, plain.token_ids, plain.finish_reason)
    traj = read(tmp_path / "s.jsonl")
    assert traj.tokens() == res.token_ids and traj.end["finish_reason"] == "stop"
