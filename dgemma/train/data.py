"""Training data: corpora (see corpora.py) tokenized into shards, canvas-aligned packing and resumable batches.

Prepare shards once (downloads are cached in ~/.cache/dgemma/corpora, or $DGEMMA_CACHE, or --cache-dir):

    dgemma data prepare --source python-stdlib --source python-docs --out data/py --vocab-size 8192
    dgemma data list          # the recipes and their licences
    (`dgemma data prepare ...` takes the same flags)

A source is a recipe name (`python-stdlib`, `python-docs`, `shakespeare`) or a path to your own file or folder
(write `./shakespeare` for a folder that shares a recipe's name); corpora.py lists and fetches them. The output
folder holds:

    train.bin, val.bin                    flat token ids (uint16, or uint32 for vocabularies over 65535),
                                          documents back to back, without bos/eos
    train_doc_offsets.npy, val_...        int64 [documents + 1]: document d is bin[offsets[d]:offsets[d + 1]]
    tokenizer.json                        the byte-level BPE trained on the train split (or the one you gave)
    meta.json                             sources, licences, counts, SHA-256 of each corpus and each file, and
                                          the tokenizer's SHA-256 (eval and train check a model's against it)

Documents go to val when sha256(f"{seed}:{name}") falls under `val_fraction` (name: the path inside its corpus),
so the split depends on neither order nor RNG state. The whole folder is built beside --out under a temporary
name and renamed into place once complete; a folder that already holds prepared data is replaced only with
--force (and only once the new one is complete). Running prepare twice gives byte-identical files.

Training reads the shards memory-mapped and packs them on the fly (see `pack_document`):

    split = PackedSplit.load("data/py", "train", seq_len=256, canvas_length=32)
    batches = Batches(split, batch_size=16, seed=0, rank=rank, world_size=world_size)
    x = next(batches)                     # [16 // world_size, 256] int64
    state = batches.state_dict()          # save with the checkpoint; load_state_dict(state) resumes exactly
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dgemma.fsio import install_folder, new_sibling_dir, sha256_file
from dgemma.options import below_one, positive_int, seed_int
from dgemma.tokenizer import MIN_VOCAB_SIZE, Tokenizer, TokenizerError, train_bpe
from dgemma.train.corpora import RECIPES, Corpus, DataError, _read_document, resolve_source

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SEED = 0
FORMAT = "dgemma-tokens-v1"
SPLITS = ("train", "val")
_ENCODE_BATCH_BYTES = 4 << 20  # text per encode_batch call: bounds memory, keeps both cores busy

if TYPE_CHECKING:  # torch is imported where batches are made, so the CLI's parsers stay torch-free
    import torch


def split_of(name: str, seed: int = DEFAULT_SEED, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """ "val" or "train" for a document name: a hash of (seed, name), independent of order and RNG state."""
    return "val" if _split_score(name, seed) < val_fraction else "train"


def _split_score(name: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the seed and the document's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --- prepare -----------------------------------------------------------------------------------------------------


@dataclass
class SourceReport:
    source: str
    kind: str
    licence: str
    origin: str
    documents: int = 0
    train_documents: int = 0
    val_documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the kept documents
    sha256: str = ""  # over sorted (name, contents) of the kept documents
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


@dataclass
class SplitReport:
    documents: int = 0
    tokens: int = 0  # document tokens, without the bos/eos that packing adds
    bytes: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


@dataclass
class PrepareReport:
    out_dir: Path
    sources: list[SourceReport]
    splits: dict[str, SplitReport]
    vocab_size: int
    tokenizer_trained: bool
    seconds: float
    notes: list[str]

    def summary(self) -> str:
        how = "trained here" if self.tokenizer_trained else "given"
        lines = [f"prepared {self.out_dir} in {self.seconds:.1f} s (vocab {self.vocab_size}, {how})"]
        for s in self.sources:
            skipped = ", ".join(f"{n} {r}" for r, n in sorted(s.skipped.items())) or "none"
            lines.append(
                f"  {s.source:<16} {s.documents:>7} docs {s.bytes / 1e6:>8.2f} MB  {s.licence:<14} skipped: {skipped}"
            )
        for name, sp in self.splits.items():
            lines.append(
                f"  {name:<5} {sp.documents:>7} docs {sp.tokens:>11,} tokens {sp.bytes / 1e6:>8.2f} MB "
                f"{sp.bytes_per_token:.2f} bytes/token"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Kept:
    name: str
    path: Path
    source_index: int
    digest: bytes  # sha256 of the contents, to notice a file that changes while we work
    nbytes: int
    score: float


def _scan(corpora: list[Corpus], seed: int, max_documents: int | None) -> tuple[list[_Kept], list[SourceReport]]:
    """First pass: read every document once for the skip counts, sizes and corpus hashes."""
    kept: list[_Kept] = []
    reports = []
    for index, corpus in enumerate(corpora):
        report = SourceReport(corpus.source, corpus.kind, corpus.licence, corpus.origin)
        corpus_hash = hashlib.sha256()
        for doc in corpus.documents:
            if max_documents is not None and report.documents >= max_documents:
                break
            read = _read_document(doc.path)
            if isinstance(read, str):
                report.skipped[read] = report.skipped.get(read, 0) + 1
                continue
            data = read[0]
            name_bytes = doc.name.encode()
            # Length-prefixed framing, so no two corpora hash alike by shifting bytes between name and contents.
            for part in (len(name_bytes).to_bytes(8, "little"), name_bytes, len(data).to_bytes(8, "little"), data):
                corpus_hash.update(part)
            kept.append(
                _Kept(doc.name, doc.path, index, hashlib.sha256(data).digest(), len(data), _split_score(doc.name, seed))
            )
            report.documents += 1
            report.bytes += len(data)
        report.sha256 = corpus_hash.hexdigest()
        if report.documents == 0:
            skipped = ", ".join(f"{n} {r}" for r, n in sorted(report.skipped.items()))
            raise DataError(
                f"source {corpus.source!r} has no usable documents ({len(corpus.documents)} files found"
                f"{'; skipped ' + skipped if skipped else ''}); give a source with UTF-8 text files"
            )
        reports.append(report)
    return kept, reports


def _assign_splits(kept: list[_Kept], val_fraction: float, notes: list[str]) -> list[str]:
    splits = ["val" if k.score < val_fraction else "train" for k in kept]
    if val_fraction > 0 and "val" not in splits:
        if len(kept) >= 2:  # a tiny corpus: still hold one document out (the one whose hash is lowest)
            lowest = min(range(len(kept)), key=lambda i: kept[i].score)
            splits[lowest] = "val"
            notes.append(f"no document hashed into val at fraction {val_fraction}; held out {kept[lowest].name}")
        else:
            notes.append("only one document: the val split is empty")
    if "train" not in splits:
        highest = max(range(len(kept)), key=lambda i: kept[i].score)
        splits[highest] = "train"
        notes.append(f"every document hashed into val; moved {kept[highest].name} to train")
    return splits


def _read_again(k: _Kept) -> str:
    read = _read_document(k.path)
    if isinstance(read, str) or hashlib.sha256(read[0]).digest() != k.digest:
        raise DataError(f"{k.path} changed while prepare was running; run prepare again once the files are stable")
    return read[1]


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer as dgemma writes tokenizer.json (tokenizers' pretty JSON): equal to the hash of the
    bytes of any tokenizer.json dgemma wrote, and the same for two files that hold the same tokenizer."""
    return hashlib.sha256(tokenizer.inner.to_str(pretty=True).encode()).hexdigest()


def data_tokenizer_sha256(data_dir: str | os.PathLike[str], meta: dict[str, Any]) -> str | None:
    """The hash of the tokenizer a prepared folder was tokenized with (meta.json; older folders: its tokenizer file).
    None when neither is there."""
    recorded = (meta.get("tokenizer") or {}).get("sha256")
    if recorded:
        return str(recorded)
    file = Path(data_dir).expanduser() / (meta.get("tokenizer") or {}).get("file", "tokenizer.json")
    return tokenizer_sha256(Tokenizer.from_path(file)) if file.is_file() else None


def check_tokenizer(
    data_dir: str | os.PathLike[str], meta: dict[str, Any], model_tokenizer: Tokenizer | str | os.PathLike[str],
    what: str,
) -> None:
    """Raise DataError unless `model_tokenizer` (of `what`, e.g. "model runs/x") is the one the data was tokenized
    with: token ids of another tokenizer mean nothing to the model, even at the same vocabulary size."""
    theirs = data_tokenizer_sha256(data_dir, meta)
    if theirs is None:
        return
    tok = model_tokenizer if isinstance(model_tokenizer, Tokenizer) else Tokenizer.from_path(model_tokenizer)
    mine = tokenizer_sha256(tok)
    if mine != theirs:
        raise DataError(
            f"tokenizer mismatch: the data in {data_dir} was tokenized with tokenizer sha256 {theirs[:12]}, but "
            f"{what} has tokenizer sha256 {mine[:12]}; prepare the data with that tokenizer "
            f"(dgemma data prepare --tokenizer PATH/tokenizer.json ...) or use the model that goes with the data"
        )


def _encode_split(
    tokenizer: Tokenizer, kept: list[_Kept], dtype: type[np.unsignedinteger], tokens_file: Path, offsets_file: Path
) -> int:
    """Tokenize documents in batches, appending to `tokens_file`; writes the [D + 1] offsets. Returns tokens."""
    offsets = [0]
    with open(tokens_file, "wb") as out:
        start = 0
        while start < len(kept):
            end, size = start, 0
            while end < len(kept) and (end == start or size < _ENCODE_BATCH_BYTES):
                size += kept[end].nbytes
                end += 1
            texts = [_read_again(k) for k in kept[start:end]]
            # parse_special=False: a literal "<eos>" in a document is text, not a document boundary.
            for ids in tokenizer.encode_batch(texts, parse_special=False):
                np.asarray(ids, dtype=dtype).tofile(out)
                offsets.append(offsets[-1] + len(ids))
            start = end
    with open(offsets_file, "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
    return offsets[-1]


def _check_prepare_args(sources, out_dir, vocab_size, val_fraction, max_documents, tokenizer_path, force) -> Path:
    """The output folder of a `prepare` call whose arguments can work (DataError naming the first that cannot)."""
    if not sources:
        raise DataError("no sources given; pass a recipe name or a path, e.g. --source python-stdlib")
    if len(set(sources)) != len(sources):
        raise DataError(f"a source is given twice in {list(sources)}; give each once")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1); 0.02 holds out about 2% of documents")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents={max_documents} must be at least 1 (or None for all documents)")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file; give a folder path for --out")
    if (out / "meta.json").exists() and not force:
        raise DataError(f"--out {out} already holds prepared data (meta.json); pass --force to replace it, or "
                        "choose another --out")
    if out.is_dir() and not (out / "meta.json").exists() and any(out.iterdir()):
        raise DataError(f"--out {out} is a folder that holds other files, not prepared data; give a new or empty "
                        "folder")
    if tokenizer_path is None and vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB_SIZE}")

    return out


def _list_sources(sources, out: Path, cache_dir, say, notes: list[str]) -> list[Corpus]:
    """Each source's documents, leaving out any that lie inside the output folder."""
    corpora = []
    for source in sources:
        say(f"listing {source}")
        corpus = resolve_source(source, cache_dir)
        # A source folder that holds the output folder must not read our own shards or tokenizer back in.
        inside_out = {d for d in corpus.documents if d.path.resolve().is_relative_to(out.resolve())}
        if inside_out:
            documents = tuple(d for d in corpus.documents if d not in inside_out)
            corpus = Corpus(corpus.source, corpus.kind, corpus.licence, corpus.origin, documents)
            notes.append(f"{source}: left out {len(inside_out)} files inside the output folder {out}")
        corpora.append(corpus)
    return corpora


def _tokenizer_for(given: Tokenizer | None, train_docs, vocab_size: int, staging: Path, say, notes: list[str]):
    """The given tokenizer, or a byte-level BPE trained on the train split; saved into `staging`."""
    if given is None:
        train_bytes = sum(k.nbytes for k in train_docs)
        say(f"training a byte-level BPE (vocab {vocab_size}) on {train_bytes / 1e6:.2f} MB")
        try:
            tokenizer = train_bpe((_read_again(k) for k in train_docs), vocab_size, staging)
        except TokenizerError as e:
            raise DataError(f"cannot train the tokenizer: {e}") from e
        if tokenizer.vocab_size < vocab_size:
            notes.append(f"the corpus supports only {tokenizer.vocab_size} of the {vocab_size} tokens asked for")
    else:
        tokenizer = given
        tokenizer.save(staging)
        if vocab_size != DEFAULT_VOCAB_SIZE:
            notes.append(f"vocab_size={vocab_size} ignored: the given tokenizer has {tokenizer.vocab_size}")
    return tokenizer


def _meta(source_reports, split_reports, tokenizer, dtype, trained: bool, tokenizer_path, vocab_size: int, seed: int,
          val_fraction: float, max_documents, staging: Path, notes: list[str]) -> dict[str, Any]:
    """meta.json of a prepared folder whose files are all in `staging`."""
    return {
        "format": FORMAT,
        "layout": "documents back to back without bos/eos; doc d is bin[offsets[d]:offsets[d+1]]",
        "sources": [asdict(r) for r in source_reports],
        "corpus_sha256": "over the kept documents in name order: u64le(len(name)) name u64le(len(data)) data",
        "max_documents": max_documents,
        "split": {
            "rule": "val if int.from_bytes(sha256(f'{seed}:{name}')[:8], 'big') / 2**64 < val_fraction",
            "seed": seed,
            "val_fraction": val_fraction,
        },
        "splits": {
            name: {
                "documents": r.documents,
                "tokens": r.tokens,
                "bytes": r.bytes,
                "tokens_file": f"{name}.bin",
                "offsets_file": f"{name}_doc_offsets.npy",
            }
            for name, r in split_reports.items()
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": tokenizer_sha256(tokenizer),  # what eval and train compare with a model's tokenizer
            "trained": trained,
            "requested_vocab_size": vocab_size,
            "given": str(Path(tokenizer_path).resolve()) if tokenizer_path is not None else None,
        },
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "special_ids": {
            "pad": tokenizer.pad_id,
            "eos": tokenizer.eos_id,
            "bos": tokenizer.bos_id,
            "unk": tokenizer.unk_id,
            "mask": tokenizer.mask_id,
            "start_of_turn": tokenizer.start_of_turn_id,
            "end_of_turn": tokenizer.end_of_turn_id,
        },
        "sha256": {p.name: sha256_file(p) for p in sorted(staging.iterdir())},
        "notes": notes,
    }


def prepare(
    sources: Sequence[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    tokenizer_path: str | os.PathLike[str] | None = None,
    max_documents: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    force: bool = False,
) -> PrepareReport:
    """Tokenize `sources` into `out_dir` (layout in the module docstring) and return what was written.

    Trains a byte-level BPE of `vocab_size` on the train split unless `tokenizer_path` is given (which must have
    bos and eos). `max_documents` keeps the first N usable documents of each source (for quick runs and tests).
    The folder is built beside `out_dir` under a temporary name and renamed into place once complete. An `out_dir`
    that already holds prepared data is refused unless `force`, and then replaced only after the new one is
    complete; a folder holding anything else is always refused.
    """
    t0 = time.perf_counter()
    say = log or (lambda message: None)
    out = _check_prepare_args(sources, out_dir, vocab_size, val_fraction, max_documents, tokenizer_path, force)
    given: Tokenizer | None = None
    if tokenizer_path is not None:
        given = Tokenizer.from_path(tokenizer_path)
        if given.bos_id is None or given.eos_id is None:
            raise DataError(f"tokenizer {tokenizer_path} has no <bos>/<eos> tokens, which packing needs; train one")

    notes: list[str] = []
    corpora = _list_sources(sources, out, cache_dir, say, notes)
    kept, source_reports = _scan(corpora, seed, max_documents)
    assignment = _assign_splits(kept, val_fraction, notes)
    by_split = {name: [k for k, s in zip(kept, assignment, strict=True) if s == name] for name in SPLITS}
    for k, s in zip(kept, assignment, strict=True):
        report = source_reports[k.source_index]
        if s == "train":
            report.train_documents += 1
        else:
            report.val_documents += 1
    for r in source_reports:
        say(f"{r.source}: {r.documents} documents, {r.bytes / 1e6:.2f} MB, skipped {r.skipped or 'none'}")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = new_sibling_dir(out, "partial")  # becomes `out` once every file in it is complete
    except OSError as e:
        raise DataError(f"cannot write beside the output folder {out} ({e}); choose a writable --out") from e
    try:
        tokenizer = _tokenizer_for(given, by_split["train"], vocab_size, staging, say, notes)
        dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32

        split_reports = {}
        for name in SPLITS:
            say(f"tokenizing {name}: {len(by_split[name])} documents")
            tokens = _encode_split(
                tokenizer, by_split[name], dtype, staging / f"{name}.bin", staging / f"{name}_doc_offsets.npy"
            )
            split_reports[name] = SplitReport(len(by_split[name]), tokens, sum(k.nbytes for k in by_split[name]))

        meta = _meta(source_reports, split_reports, tokenizer, dtype, given is None, tokenizer_path, vocab_size, seed,
                     val_fraction, max_documents, staging, notes)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        # Everything is complete: put the folder in place (a previous output was checked above: prepared data, and
        # --force).
        install_folder(staging, out)
    except OSError as e:  # disk full, permissions: the previous output (if any) is still in place
        raise DataError(f"cannot write the output folder {out} ({e}); free space or choose another --out") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    return PrepareReport(
        out, source_reports, split_reports, tokenizer.vocab_size, given is None, time.perf_counter() - t0, notes
    )


def read_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of a prepared folder, checked to be this module's format."""
    path = Path(data_dir).expanduser() / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path} not found; create the folder with `dgemma data prepare --out {data_dir}`") from e
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); run `dgemma data prepare` again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        other = meta.get("format") if isinstance(meta, dict) else None
        if isinstance(other, str) and other.startswith("dgemma-"):
            raise DataError(f"{data_dir} holds {other} data, not packed training tokens: `dgemma train --data` "
                            "reads Sudoku folders itself (from Python, pass train(cfg, data=sudoku_data_source(...)) "
                            "from dgemma.tasks.sudoku), and SFT data is for `dgemma finetune`")
        raise DataError(f"{path} is not a {FORMAT} meta.json; run `dgemma data prepare` again")
    return meta


# --- packing -----------------------------------------------------------------------------------------------------


def pack_document(tokens: Sequence[int] | np.ndarray, bos_id: int, eos_id: int, canvas_length: int) -> np.ndarray:
    """[bos] + tokens + [eos], padded with eos to a multiple of `canvas_length` → int64 [k * canvas_length].

    The reference for `PackedSplit`: each document starts on a canvas boundary and its last canvas ends in eos,
    which is what the block-diffusion objective learns to produce to stop.
    """
    n = len(tokens) + 2
    packed = np.full(-(-n // canvas_length) * canvas_length, eos_id, dtype=np.int64)
    packed[0] = bos_id
    packed[1 : n - 1] = np.asarray(tokens, dtype=np.int64)
    return packed


class PackedSplit:
    """A split as `len(self)` sequences of `seq_len` tokens: the packed documents (see `pack_document`) laid end
    to end and cut every `seq_len` tokens, the incomplete tail dropped. Built on demand from memory-mapped shards;
    only the [D + 1] document offsets are held in memory."""

    def __init__(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        *,
        bos_id: int,
        eos_id: int,
        seq_len: int,
        canvas_length: int,
    ):
        if canvas_length < 1 or seq_len < 1 or seq_len % canvas_length:
            raise DataError(
                f"seq_len={seq_len} must be a positive multiple of canvas_length={canvas_length}, so that sequences "
                "cut packed documents only at canvas boundaries"
            )
        self.tokens = tokens  # [T] uint16/uint32, usually an np.memmap
        self.doc_offsets = np.asarray(doc_offsets, dtype=np.int64)  # [D + 1]
        self.bos_id, self.eos_id = bos_id, eos_id
        self.seq_len, self.canvas_length = seq_len, canvas_length
        lengths = np.diff(self.doc_offsets)
        padded = -(-(lengths + 2) // canvas_length) * canvas_length
        self.packed_offsets = np.concatenate([[0], np.cumsum(padded)]).astype(np.int64)  # [D + 1], bos positions

    @classmethod
    def load(
        cls, data_dir: str | os.PathLike[str], split: str, seq_len: int, canvas_length: int, verify: bool = False
    ) -> PackedSplit:
        """Open `data_dir/{split}.bin` memory-mapped. `verify` re-hashes the files against meta.json."""
        folder = Path(data_dir).expanduser()
        meta = read_meta(folder)
        if split not in meta["splits"]:
            raise DataError(f"{folder} has no split {split!r}; choose one of {', '.join(meta['splits'])}")
        info = meta["splits"][split]
        tokens_path, offsets_path = folder / info["tokens_file"], folder / info["offsets_file"]
        if verify:
            for path in (tokens_path, offsets_path):
                if sha256_file(path) != meta["sha256"][path.name]:
                    raise DataError(f"{path} does not match the SHA-256 in meta.json; run `dgemma data prepare` again")
        dtype = np.dtype(meta["dtype"])
        try:
            size = tokens_path.stat().st_size
            offsets = np.load(offsets_path)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the {split} shards in {folder} ({e}); run `dgemma data prepare` again") from e
        if (
            size != info["tokens"] * dtype.itemsize
            or len(offsets) != info["documents"] + 1
            or offsets[-1] != (info["tokens"])
        ):
            raise DataError(f"the {split} shards in {folder} do not match meta.json; run `dgemma data prepare` again")
        # np.memmap cannot map an empty file; an empty split is a valid (if useless) zero-length array.
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
        ids = meta["special_ids"]
        return cls(tokens, offsets, bos_id=ids["bos"], eos_id=ids["eos"], seq_len=seq_len, canvas_length=canvas_length)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_packed_tokens(self) -> int:
        return int(self.packed_offsets[-1])

    def __len__(self) -> int:
        return self.num_packed_tokens // self.seq_len

    def __getitem__(self, index: int) -> np.ndarray:
        """Sequence `index`: int64 [seq_len]."""
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences")
        start, end = index * self.seq_len, (index + 1) * self.seq_len
        out = np.full(self.seq_len, self.eos_id, dtype=np.int64)  # padding is eos; bos and tokens go on top
        doc = int(np.searchsorted(self.packed_offsets, start, side="right")) - 1
        while doc < self.num_documents and self.packed_offsets[doc] < end:
            base = int(self.packed_offsets[doc])  # packed position of this document's bos
            if base >= start:
                out[base - start] = self.bos_id
            first, n = int(self.doc_offsets[doc]), int(self.doc_offsets[doc + 1] - self.doc_offsets[doc])
            lo, hi = max(start, base + 1), min(end, base + 1 + n)  # packed range of the tokens inside the window
            if hi > lo:
                out[lo - start : hi - start] = self.tokens[first + lo - base - 1 : first + hi - base - 1]
            doc += 1
        return out


class Batches:
    """Endless, deterministic batches of a PackedSplit: int64 tensors [batch_size // world_size, seq_len].

    Epoch e visits the sequences in the order of `default_rng([seed, e]).permutation` (or in order without
    `shuffle`), `batch_size` at a time, dropping the incomplete last batch. `batch_size` is the global batch:
    rank r gets rows [r * b, (r + 1) * b) of it, so the ranks together see exactly what one process would.
    The position is counted in global batches, so a state saved at one world size resumes at another.
    """

    def __init__(
        self,
        split: PackedSplit,
        batch_size: int,
        seed: int = DEFAULT_SEED,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1 or batch_size % world_size:
            raise DataError(f"batch_size={batch_size} (global) must be a positive multiple of world_size={world_size}")
        if len(split) < batch_size:
            raise DataError(
                f"the split has {len(split)} sequences of {split.seq_len} tokens, fewer than one batch of {batch_size}; "
                "use a smaller batch or seq_len, or more data"
            )
        self.split = split
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.step = 0  # global batches already taken in this epoch
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    @property
    def batches_per_epoch(self) -> int:
        return len(self.split) // self.batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.split)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.step >= self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        order = self._epoch_order(self.epoch)
        rows = self.batch_size // self.world_size
        start = self.step * self.batch_size + self.rank * rows
        batch = np.stack([self.split[int(i)] for i in order[start : start + rows]])  # [rows, seq_len] int64
        self.step += 1
        import torch

        return torch.from_numpy(batch)

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_sequences": len(self.split),
            "seq_len": self.split.seq_len,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; refuses a state from different data or batch settings."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "num_sequences", "seq_len", "shuffle"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot resume batches: saved {key}={state.get(key)!r} but this run has {mine[key]!r}; "
                    "resume with the same data, seed, batch size and seq_len"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


# --- command line ------------------------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data prepare` and `data list` on a parent parser's subparsers; dispatch with `run_cli(args)`."""
    data = subparsers.add_parser("data", help="prepare tokenized training corpora")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="{prepare,list}")
    p = commands.add_parser("prepare", help="tokenize corpora into train/val shards")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="NAME_OR_PATH",
        help=f"a recipe ({', '.join(RECIPES)}) or a file/folder of your own; repeat for several",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--force", action="store_true", help="replace --out if it already holds prepared data")
    p.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary to train")
    p.add_argument("--val-fraction", type=below_one, default=DEFAULT_VAL_FRACTION, help="share of documents in val")
    p.add_argument("--seed", type=seed_int, default=DEFAULT_SEED, help="seed of the train/val split")
    p.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json instead of training one")
    p.add_argument("--max-documents", type=positive_int, default=None, help="at most N documents per source")
    p.add_argument("--cache-dir", type=Path, default=None, help="download cache (default $DGEMMA_CACHE or ~/.cache)")
    p.add_argument("--format", choices=["chat", "prompt-completion"], default=None,
                   help="SFT data (sft.py): --source is a JSONL file of chats or prompt/completion pairs, tokenized "
                        "with --tokenizer (the model's); --source python-functions builds the demonstration set")
    g = p.add_argument_group("--source sudoku (generated puzzles; see dgemma/tasks/sudoku.py)")
    g.add_argument("--size", type=positive_int, choices=[6, 9], default=6, help="6 (2x3 boxes) or 9 (3x3 boxes)")
    g.add_argument("--count", type=positive_int, default=None, help="training puzzles (default 50000)")
    g.add_argument("--val-count", type=positive_int, default=None, help="validation puzzles (default 500)")
    g.add_argument("--test-count", type=positive_int, default=None, help="held-out test puzzles (default 1000)")
    g.add_argument("--givens", type=positive_int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="givens per puzzle, uniform in [MIN, MAX] (default 12 20 for 6x6, 30 45 for 9x9)")
    commands.add_parser("list", help="list the corpus recipes and their licences")
    data.set_defaults(func=run_cli)
    return data


def run_cli(args: argparse.Namespace) -> int:
    """Run a parsed `data ...` command. User errors (DataError, TokenizerError) propagate to `cli.main`, which
    prints them as one line and exits with status 2."""
    if args.data_command == "list":
        for recipe in RECIPES.values():
            print(f"{recipe.name:<14} {recipe.licence:<14} {recipe.description}")
        print(f"{'sudoku':<14} {'generated':<14} unique-solution 6x6 / 9x9 puzzles from our own generator (--size)")
        from dgemma.train.sft import RECIPES as SFT_RECIPES

        for name, description in SFT_RECIPES.items():
            print(f"{name:<14} {'PSF-2.0':<14} SFT: {description}")
        return 0
    from dgemma.train.sft import is_sft_request, prepare_sft

    if is_sft_request(args.source, args.format):  # SFT examples (sft.py), not a corpus
        print(prepare_sft(args.source, args.out, args.format, args.tokenizer, val_fraction=args.val_fraction,
                          seed=args.seed, max_examples=args.max_documents, cache_dir=args.cache_dir, force=args.force,
                          log=lambda message: print(message, file=sys.stderr, flush=True)).summary())
        return 0
    if "sudoku" in args.source:
        raise DataError("--source sudoku is prepared by the command line (`dgemma data prepare --source sudoku`)")
    report = prepare(
        args.source,
        args.out,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        tokenizer_path=args.tokenizer,
        max_documents=args.max_documents,
        cache_dir=args.cache_dir,
        log=lambda message: print(message, file=sys.stderr, flush=True),
        force=args.force,
    )
    print(report.summary())
    return 0
