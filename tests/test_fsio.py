"""dgemma.fsio: atomic file writes leave the old file whole when they fail, a folder swap keeps the old folder when
the rename fails, and the git revision of this checkout (None outside one)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from dgemma import fsio

ROOT = Path(__file__).resolve().parents[1]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_put_the_new_content_in_place(tmp_path):
    fsio.write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    fsio.write_text_atomic(tmp_path / "sub" / "b.txt", "héllo\r\n")  # the parent is created; no newline translation
    fsio.write_json_atomic(tmp_path / "c.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    fsio.write_json_atomic(tmp_path / "d.json", {"x": "é"}, indent=None, ensure_ascii=False)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_bytes() == "héllo\r\n".encode()
    assert (tmp_path / "c.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    assert (tmp_path / "d.json").read_text(encoding="utf-8") == '{"x": "é"}\n'
    fsio.write_text_atomic(tmp_path / "a.bin", "new")  # over an existing file
    assert (tmp_path / "a.bin").read_text() == "new"
    assert _names(tmp_path) == ["a.bin", "c.json", "d.json", "sub"]
    assert _names(tmp_path / "sub") == ["b.txt"]


def test_files_get_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        fsio.write_text_atomic(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_unserialisable_json_leaves_the_old_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old\n")
    with pytest.raises(TypeError):
        fsio.write_json_atomic(target, {"ok": 1, "bad": object()})
    assert target.read_text() == "old\n"
    assert _names(tmp_path) == ["r.json"]


def test_a_failed_rename_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "r.txt"
    target.write_text("old\n")

    def refuse(src, dst):
        raise OSError("rename refused (simulated)")

    monkeypatch.setattr(fsio.os, "replace", refuse)
    with pytest.raises(OSError, match="simulated"):
        fsio.write_text_atomic(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert _names(tmp_path) == ["r.txt"]


def test_replacing_removes_a_half_written_file(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"), fsio.replacing(target, suffix=".png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".png") and tmp.name.startswith(".")
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["plot.png"]
    with fsio.replacing(target, suffix=".png") as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["plot.png"]


def _staged(tmp_path: Path, target: Path, content: str) -> Path:
    staging = fsio.new_sibling_dir(target, "partial")
    assert staging.parent == tmp_path and staging.name.startswith(f".{target.name}.partial-")
    (staging / "sub").mkdir()
    (staging / "sub" / "f.txt").write_text(content)
    return staging


@pytest.mark.parametrize("exchange", [True, False])
def test_install_folder_replaces_or_creates(tmp_path, monkeypatch, exchange):
    if not exchange:  # the move-aside fallback used where the OS cannot swap two paths
        monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    fsio.install_folder(_staged(tmp_path, out, "one"), out)
    assert (out / "sub" / "f.txt").read_text() == "one"
    (out / "stale.txt").write_text("dropped with the old folder")
    fsio.install_folder(_staged(tmp_path, out, "two"), out)
    assert (out / "sub" / "f.txt").read_text() == "two"
    assert _names(out) == ["sub"]
    assert _names(tmp_path) == ["out"]


def test_a_failed_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    staging = _staged(tmp_path, out, "new")
    monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def flaky_rename(src, dst):
        calls.append((Path(src), Path(dst)))
        if Path(src) == staging:  # the new folder moving into place
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(fsio.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"):
        fsio.install_folder(staging, out)
    monkeypatch.undo()
    assert len(calls) == 3  # aside, the failed one, back
    assert _names(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert _names(tmp_path) == sorted(["out", staging.name])  # the caller removes its staging folder


def test_sha256_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 500_000)  # more than one 1 MiB chunk
    assert fsio.sha256_file(tmp_path / "f") == hashlib.sha256(b"abc" * 500_000).hexdigest()


def test_git_revision_of_this_checkout_and_outside_one(tmp_path):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if head.returncode != 0:
        pytest.skip("not run from a git checkout (or git is missing)")
    assert fsio.git_revision() == head.stdout.strip()
    assert fsio.git_revision(ROOT) == head.stdout.strip()
    assert isinstance(fsio.git_dirty(ROOT), bool)
    assert fsio.git_revision(tmp_path) is None
    assert fsio.git_dirty(tmp_path) is None


def test_git_dirty_sees_tracked_changes_only(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})

    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("commit", "-q", "-m", "one")
    assert fsio.git_revision(tmp_path) and fsio.git_dirty(tmp_path) is False
    (tmp_path / "untracked").write_text("x")
    assert fsio.git_dirty(tmp_path) is False
    (tmp_path / "f").write_text("2")
    assert fsio.git_dirty(tmp_path) is True
