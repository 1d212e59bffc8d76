"""Writing files and folders so that a crash or a failed write never leaves a half-written one, and the git revision
that result files record.

    write_text_atomic(path, text)              also write_bytes_atomic, write_json_atomic (a trailing newline)
    with replacing(path, suffix=".png") as tmp: fig.savefig(tmp)     any writer that takes a path
    install_folder(staging, out)               put a complete folder in place, the old one kept if that fails

The rule for files: the data goes to a temporary name beside the target, is fsynced, and is renamed onto the target
(the folder is fsynced after it); on any error the temporary file is removed and the old file is left as it was.
A folder is built in a sibling staging folder (`new_sibling_dir`), fsynced file by file, then swapped in.
Standard library only, and nothing from the package, so every layer can use it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parent  # where git_revision looks by default: this checkout


def temp_sibling(path: Path, suffix: str = "") -> Path:
    """A fresh name `.{name}.{random}.tmp{suffix}` beside `path` (the suffix lets a writer pick its format from it,
    as matplotlib does). Not mkstemp: its files are always 0600, these get the umask's permissions."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}")


def install_file(tmp: Path, path: Path, *, sync: bool = True) -> None:
    """Rename the finished file `tmp` onto `path`, fsynced first unless `sync` is False; `tmp` is gone either way."""
    try:
        if sync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        _fsync_dir(path.parent)


@contextmanager
def replacing(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; installed onto `path` when the block ends, removed if it
    raises. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    install_file(tmp, path)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "xb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, **json_kw: Any) -> None:
    """`obj` as JSON plus a newline; `indent=None` writes one line. An unserialisable `obj` writes nothing."""
    write_text_atomic(path, json.dumps(obj, indent=indent, **json_kw) + "\n")


def new_sibling_dir(target: Path, tag: str) -> Path:
    """A new empty folder `.{target.name}.{tag}-<random>` beside `target` (with the umask's permissions, unlike
    mkdtemp's 0700, since it may become the output folder)."""
    while True:
        path = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def install_folder(staging: Path, target: Path) -> None:
    """Put the complete folder `staging` at `target`, replacing a folder there as a whole. Its files are fsynced
    first. Atomic where the OS can exchange two paths (Linux); elsewhere the old folder is moved aside first, put
    back if the rename fails, and deleted once the new one is in place. `staging` is gone afterwards."""
    for root, _, files in os.walk(staging):
        for name in files:
            if not os.path.islink(file := os.path.join(root, name)):
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
    _fsync_dir(staging)
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # `staging` now holds the old folder
    else:
        aside = new_sibling_dir(target, "old")
        os.rename(target, aside / target.name)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside / target.name, target)
            aside.rmdir()
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; best effort (some file systems refuse to fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git(*args: str, cwd: str | os.PathLike[str] | None) -> str | None:
    try:
        r = subprocess.run(["git", *args], capture_output=True, text=True, check=False, timeout=10,
                           cwd=cwd or _PACKAGE)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_revision(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The short commit hash of the checkout holding `cwd` (default: this package), or None outside a git checkout
    or without git."""
    return _git("rev-parse", "--short", "HEAD", cwd=cwd) or None


def git_dirty(cwd: str | os.PathLike[str] | None = None) -> bool | None:
    """Whether tracked files differ from that commit (untracked files do not count); None outside a checkout."""
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return None if status is None else bool(status)
