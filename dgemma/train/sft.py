"""Supervised fine-tuning data: JSONL conversations or prompt/completion pairs, and the `python-functions` set.

    dgemma data prepare --source chats.jsonl --format chat --tokenizer MODEL --out data/my-sft
    dgemma data prepare --source pairs.jsonl --format prompt-completion --tokenizer MODEL --out data/my-sft
    dgemma data prepare --source python-functions --tokenizer models/dgemma-py-small --out data/pyfn

Input lines (blank lines are skipped; anything else that is wrong stops prepare with `FILE:LINE: what` and
leaves an existing --out untouched):

    chat                {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                        rendered with the tokenizer's chat template (its chat_template.jinja, else the built-in
                        Gemma format); the last message must be the assistant's answer
    prompt-completion   {"prompt": "...", "completion": "..."}: plain text, bos (as the tokenizer adds it) + prompt

Each example becomes a prompt (everything before the answer: the clean prefix the encoder reads) and an answer (the
assistant's text with its end-of-turn token, then eos; a completion, then eos). `python-functions` is built here, offline,
from the running Python's standard library: for each function with a docstring, the user asks for the function
from its signature and the first line of its docstring, the answer is the function. Documents are split as the
corpus recipes are (sha256 of seed and the file's name), so no function of a held-out file is trained on; a JSONL
example's "document" is its line's canonical JSON (duplicates land in the same split).

The output folder (built beside --out under a temporary name, renamed into place when complete):

    train.bin, val.bin                  uint16/uint32 token ids, examples back to back (prompt then answer)
    {split}_offsets.npy                 int64 [N + 1]: example i is bin[offsets[i]:offsets[i + 1]]
    {split}_prompt_lens.npy             int64 [N]: the first prompt_lens[i] tokens of example i are its prompt
    tokenizer.json, meta.json           the tokenizer given, counts, lengths, sources, hashes
    eval_prompts.json                   the rendered prompts of the val split, for `dgemma eval --prompts-file`

Training (`SFTSplit`, `SFTBatches`) lays one example per row, so no example's canvases see another's: the prompt is
left-filled to a canvas boundary (the filler is masked out of attention), the answer starts a canvas and its last
canvas is filled with eos (supervised, as the reference recipe does). Rows are grouped by length, and a batch is only
as long as its longest row, so batches stay full without packing examples together. An example longer than
--seq-len is truncated (its answer loses its end) or dropped, as asked, and counted in a warning.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dgemma.fsio import install_folder, new_sibling_dir, sha256_file
from dgemma.tokenizer import Tokenizer, TokenizerError
from dgemma.train.corpora import DataError, resolve_source
from dgemma.train.data import split_of, tokenizer_sha256

if TYPE_CHECKING:
    import torch

FORMAT = "dgemma-sft-v1"
FORMATS = ("chat", "prompt-completion")
RECIPES = {"python-functions": "functions of the running Python's standard library with docstrings, asked for by "
                               "signature and first docstring line (built offline by dgemma)"}
ROLES = ("user", "assistant", "system")
MAX_FUNCTION_CHARS = 1200  # python-functions: longer functions are left out (they would not fit small contexts)
MAX_LISTED = 10  # malformed lines reported by line number; the rest are counted

# Position roles in a training row (see SFTSplit.row)
FILL, PROMPT, ANSWER, ANSWER_FILL = 0, 1, 2, 3


class SFTError(DataError):
    """A JSONL line, option or folder that cannot be used; the message names the file and line and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Reading JSONL
@dataclass(frozen=True)
class Record:
    name: str  # what decides the split: the canonical JSON of the line, or a function's file
    lineno: int  # 1-based line in its file (0 for built examples)
    messages: tuple[dict[str, str], ...] | None = None  # chat
    prompt: str | None = None  # prompt-completion
    completion: str | None = None


def _check_chat(obj: dict, where: str) -> tuple[dict[str, str], ...]:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SFTError(f"{where}: needs a non-empty \"messages\" list (chat format: "
                       '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]})')
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SFTError(f"{where}: message {j} needs \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise SFTError(f"{where}: message {j} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise SFTError(f"{where}: message {j} content must be a string (got {type(m['content']).__name__})")
        if m["role"] == "system" and j != 0:
            raise SFTError(f"{where}: message {j} is a system message; only the first message may be one")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise SFTError(f"{where}: the last message has role {out[-1]['role']!r}; it must be the assistant's answer")
    if not out[-1]["content"].strip():
        raise SFTError(f"{where}: the assistant's answer (the last message) is empty; nothing to learn from")
    if not any(m["role"] == "user" for m in out):
        raise SFTError(f"{where}: no user message before the answer")
    return tuple(out)


def _check_pair(obj: dict, where: str) -> tuple[str, str]:
    for key in ("prompt", "completion"):
        if key not in obj:
            raise SFTError(f"{where}: missing field \"{key}\" (prompt-completion format: "
                           '{"prompt": "...", "completion": "..."})')
        if not isinstance(obj[key], str):
            raise SFTError(f"{where}: \"{key}\" must be a string (got {type(obj[key]).__name__})")
    if not obj["completion"].strip():
        raise SFTError(f"{where}: the completion is empty; nothing to learn from")
    return obj["prompt"], obj["completion"]


def read_jsonl(path: str | os.PathLike[str], fmt: str) -> list[Record]:
    """Every example of a JSONL file, checked. Raises SFTError listing malformed lines as `FILE:LINE: problem`."""
    if fmt not in FORMATS:
        raise SFTError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SFTError(f"cannot read {path} ({e.strerror or e}); give an existing JSONL file") from None
    records, problems = [], []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(f"{where}: not UTF-8 ({e.reason} at byte {e.start})")
            continue
        except json.JSONDecodeError as e:
            problems.append(f"{where}: bad JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: a JSON object is expected, got {type(obj).__name__}")
            continue
        try:
            name = json.dumps(obj, sort_keys=True, ensure_ascii=False)
            if fmt == "chat":
                records.append(Record(name, lineno, messages=_check_chat(obj, where)))
            else:
                prompt, completion = _check_pair(obj, where)
                records.append(Record(name, lineno, prompt=prompt, completion=completion))
        except SFTError as e:
            problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise SFTError(f"{len(problems)} malformed line(s) in {path}: " + "; ".join(problems[:MAX_LISTED]) + more
                       + "; fix them (nothing was written)")
    if not records:
        raise SFTError(f"{path} holds no examples; give one JSON object per line")
    return records


# ---------------------------------------------------------------------------------------------------------------
# python-functions
def function_examples(source: str) -> list[tuple[str, str]]:
    """(request, function source) for each function of `source` with a docstring, a body besides the docstring,
    no decorator and at most MAX_FUNCTION_CHARS characters, in file order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list:
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2 or node.end_lineno is None:
            continue
        function = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno])).rstrip()
        header = textwrap.dedent("\n".join(lines[node.lineno - 1:node.body[0].lineno - 1])).strip()
        first = doc.strip().splitlines()[0].strip()
        if len(function) > MAX_FUNCTION_CHARS or not header.endswith(":") or not first:
            continue
        request = f"Write the Python function `{header}`\n{first}"
        out.append((request, function))
    return out


def python_function_records(cache_dir: str | os.PathLike[str] | None = None) -> tuple[list[Record], dict[str, Any]]:
    """The python-functions examples (chat records) and a description of where they came from."""
    corpus = resolve_source("python-stdlib", cache_dir)
    records, files, digest = [], 0, hashlib.sha256()
    for doc in corpus.documents:
        try:
            text = doc.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        examples = function_examples(text)
        files += bool(examples)
        for request, function in examples:
            digest.update(f"{doc.name}\0{request}\0{function}\0".encode())
            records.append(Record(doc.name, 0, messages=({"role": "user", "content": request},
                                                         {"role": "assistant", "content": function})))
    if not records:
        raise SFTError(f"python-functions: no functions with docstrings found in {corpus.origin}")
    return records, {"source": "python-functions", "kind": "recipe", "licence": "PSF-2.0",
                     "origin": corpus.origin, "files": files, "examples": len(records), "sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------------------------
# Rendering
def render_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[str, str]:
    """(prompt text, answer text) of a conversation: the prompt is every turn before the last, with the generation
    prompt; the answer is the rest of the template's rendering of the whole conversation (the assistant's text and
    its end-of-turn marker, trailing whitespace after the marker dropped)."""
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(messages), add_generation_prompt=False)
    if not full.startswith(prompt):
        raise SFTError("the chat template renders the conversation without its prompt as a prefix; dgemma cannot "
                       "tell prompt from answer with this template")
    return prompt, full[len(prompt):].rstrip()


def encode_record(tokenizer: Tokenizer, record: Record) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): chat prompts carry bos in their text; answers end with eos."""
    eos = tokenizer.eos_id
    if record.messages is not None:
        prompt, answer = render_chat(tokenizer, record.messages)
        p, a = tokenizer.encode(prompt), tokenizer.encode(answer)
    else:
        p = tokenizer.encode(record.prompt or "", add_bos=tokenizer.add_bos_default, parse_special=False)
        a = tokenizer.encode(record.completion or "", parse_special=False)
    if eos is None:
        raise SFTError(f"tokenizer {tokenizer.path} has no <eos>; answers need it to learn to stop")
    return p, a + [eos]


# ---------------------------------------------------------------------------------------------------------------
# prepare
@dataclass
class SFTReport:
    out_dir: Path
    counts: dict[str, int]
    tokens: dict[str, int]
    longest: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"prepared {self.out_dir} in {self.seconds:.1f} s ({FORMAT})"]
        for s in ("train", "val"):
            lines.append(f"  {s:<5} {self.counts[s]:>7} examples {self.tokens[s]:>11,} tokens "
                         f"(longest {self.longest[s]} tokens)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def is_sft_request(sources: Sequence[str], fmt: str | None) -> bool:
    """Whether `data prepare` with these sources is an SFT preparation (a --format, or the python-functions set)."""
    return fmt is not None or any(s in RECIPES for s in sources)


def prepare_sft(sources: Sequence[str], out_dir: str | os.PathLike[str], fmt: str | None,
                tokenizer_path: str | os.PathLike[str] | None, val_fraction: float = 0.02, seed: int = 0,
                max_examples: int | None = None, cache_dir: str | os.PathLike[str] | None = None,
                force: bool = False, log: Callable[[str], None] | None = None) -> SFTReport:
    t0 = time.perf_counter()
    say = log or (lambda message: None)
    out = Path(out_dir).expanduser()
    if tokenizer_path is None:
        raise SFTError("SFT data is tokenized with the model's tokenizer: pass --tokenizer MODEL_FOLDER (or its "
                       "tokenizer.json)")
    if len(sources) != 1:
        raise SFTError(f"give one SFT source (got {len(sources)}); concatenate JSONL files into one")
    if out.exists() and not out.is_dir():
        raise SFTError(f"output {out} is a file; give a folder path for --out")
    if (out / "meta.json").exists() and not force:
        raise SFTError(f"--out {out} already holds prepared data (meta.json); pass --force to replace it, or choose "
                       "another --out")
    if out.is_dir() and not (out / "meta.json").exists() and any(out.iterdir()):
        raise SFTError(f"--out {out} is a folder that holds other files, not prepared data; give a new or empty folder")
    source = sources[0]
    try:
        tokenizer = Tokenizer.from_path(tokenizer_path)
    except TokenizerError as e:
        raise SFTError(f"--tokenizer {tokenizer_path}: {e}") from None
    if source in RECIPES:
        if fmt not in (None, "chat"):
            raise SFTError(f"{source} is a chat set; leave out --format or pass --format chat")
        fmt = "chat"
        say(f"building {source} from the standard library")
        records, origin = python_function_records(cache_dir)
    else:
        if fmt is None:
            raise SFTError(f"--source {source}: pass --format {' or '.join(FORMATS)} for a JSONL file")
        records = read_jsonl(source, fmt)
        origin = {"source": source, "kind": "path", "licence": "user-supplied (licence not recorded)",
                  "origin": str(Path(source).expanduser().resolve()), "examples": len(records),
                  "sha256": sha256_file(Path(source).expanduser())}
    if max_examples is not None:
        records = records[:max_examples]

    say(f"tokenizing {len(records)} examples")
    splits: dict[str, list[tuple[list[int], list[int], Record]]] = {"train": [], "val": []}
    for r in records:
        try:
            p, a = encode_record(tokenizer, r)
        except TokenizerError as e:
            where = f"{source}:{r.lineno}" if r.lineno else source
            raise SFTError(f"{where}: {e}") from None
        splits[split_of(r.name, seed, val_fraction)].append((p, a, r))
    notes = []
    if not splits["train"]:
        raise SFTError(f"every example hashed into val at --val-fraction {val_fraction}; lower it or add examples")
    if val_fraction > 0 and not splits["val"]:
        notes.append(f"no example hashed into val at --val-fraction {val_fraction}: the val split is empty")

    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = new_sibling_dir(out, "partial")
    try:
        counts, tokens, longest = {}, {}, {}
        for name, rows in splits.items():
            flat = [t for p, a, _ in rows for t in (*p, *a)]
            np.asarray(flat, dtype=dtype).tofile(staging / f"{name}.bin")
            lens = [len(p) + len(a) for p, a, _ in rows]
            np.save(staging / f"{name}_offsets.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
            np.save(staging / f"{name}_prompt_lens.npy", np.asarray([len(p) for p, _, _ in rows], dtype=np.int64))
            counts[name], tokens[name], longest[name] = len(rows), len(flat), max(lens, default=0)
        tokenizer.save(staging / "tokenizer.json")
        # As eval reads them: `dgemma eval` encodes a prompt with bos when the tokenizer adds it by default.
        skip = 1 if tokenizer.add_bos_default and tokenizer.bos_id is not None else 0
        prompts = [tokenizer.decode(p[skip if p[:1] == [tokenizer.bos_id] else 0:], skip_special_tokens=False)
                   for p, _, _ in splits["val"]]
        if prompts:
            (staging / "eval_prompts.json").write_text(json.dumps({
                "format": "dgemma-eval-prompts-v1",
                "about": f"held-out {source} prompts (the val split, rendered as the model reads them); the answers "
                         "are scored alone (parse: completion)",
                "from": f"val split of {out}", "parse": "completion", "prompts": prompts}, indent=1,
                ensure_ascii=False) + "\n", encoding="utf-8")
        answer_lens = {s: [len(a) for _, a, _ in rows] for s, rows in splits.items()}
        meta = {
            "format": FORMAT, "sft_format": fmt, "sources": [origin],
            "split": {"rule": "val if int.from_bytes(sha256(f'{seed}:{name}')[:8], 'big') / 2**64 < val_fraction",
                      "seed": seed, "val_fraction": val_fraction,
                      "name": "the function's file" if source in RECIPES else "the line's canonical JSON"},
            "splits": {s: {"examples": counts[s], "tokens": tokens[s], "longest": longest[s],
                           "answer_tokens": int(sum(answer_lens[s])),
                           "tokens_file": f"{s}.bin", "offsets_file": f"{s}_offsets.npy",
                           "prompt_lens_file": f"{s}_prompt_lens.npy"} for s in splits},
            "chat_template": ("tokenizer's" if tokenizer.chat_template else "built-in Gemma") if fmt == "chat" else None,
            "tokenizer": {"file": "tokenizer.json", "sha256": tokenizer_sha256(tokenizer), "trained": False,
                          "given": str(Path(tokenizer_path).resolve())},
            "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name,
            "special_ids": {"pad": tokenizer.pad_id, "eos": tokenizer.eos_id, "bos": tokenizer.bos_id,
                            "start_of_turn": tokenizer.start_of_turn_id, "end_of_turn": tokenizer.end_of_turn_id},
            "notes": notes,
        }
        meta["sha256"] = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        install_folder(staging, out)  # a previous output: checked above (prepared data and --force)
    except OSError as e:
        raise SFTError(f"cannot write the output folder {out} ({e}); free space or choose another --out") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SFTReport(out, counts, tokens, longest, time.perf_counter() - t0, notes)


def read_sft_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(data_dir).expanduser() / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SFTError(f"{path} not found; prepare SFT data with `dgemma data prepare --source FILE.jsonl --format "
                       "chat|prompt-completion --tokenizer MODEL --out DIR`") from None
    except (OSError, ValueError) as e:
        raise SFTError(f"cannot read {path} ({e}); run `dgemma data prepare` again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SFTError(f"{path} is not SFT data ({FORMAT}; got {meta.get('format') if isinstance(meta, dict) else None!r})"
                       "; prepare it with --format chat|prompt-completion or --source python-functions")
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Training rows
@dataclass
class Overflow:
    count: int  # examples longer than seq_len
    longest: int
    policy: str  # "truncate" | "drop"


class SFTSplit:
    """One split as examples laid out one per row (see `row`); `overflow` says what to do with examples longer
    than `seq_len`: "truncate" (keep the prompt, cut the answer's end) or "drop"."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray, *, seq_len: int,
                 canvas_length: int, fill_id: int, eos_id: int, overflow: str = "truncate"):
        if canvas_length < 1 or seq_len < 2 * canvas_length or seq_len % canvas_length:
            raise SFTError(f"--seq-len {seq_len} must be a multiple of the canvas length {canvas_length} and at least "
                           "two canvases (one for the prompt, one for the answer)")
        if overflow not in ("truncate", "drop"):
            raise SFTError(f"--overflow {overflow!r}: choose truncate or drop")
        self.tokens, self.offsets = tokens, np.asarray(offsets, dtype=np.int64)
        self.prompt_lens = np.asarray(prompt_lens, dtype=np.int64)
        self.seq_len, self.C, self.fill_id, self.eos_id = seq_len, canvas_length, fill_id, eos_id
        C = canvas_length
        lengths = np.diff(self.offsets)
        answer = lengths - self.prompt_lens
        self.needed = (-(-self.prompt_lens // C) + -(-answer // C)) * C  # [N] row length without truncation
        over = self.needed > seq_len
        self.overflow = Overflow(int(over.sum()), int(lengths.max(initial=0)), overflow)
        keep = np.arange(len(lengths)) if overflow == "truncate" else np.flatnonzero(~over)
        self.index = keep  # example of each row
        self.row_len = np.minimum(self.needed[keep], seq_len)  # [rows] tokens each row needs (multiple of C)

    @classmethod
    def load(cls, data_dir: str | os.PathLike[str], split: str, seq_len: int, canvas_length: int,
             overflow: str = "truncate") -> SFTSplit:
        folder = Path(data_dir).expanduser()
        meta = read_sft_meta(folder)
        info = meta["splits"].get(split)
        if info is None:
            raise SFTError(f"{folder} has no split {split!r}")
        try:
            size = (folder / info["tokens_file"]).stat().st_size
            offsets = np.load(folder / info["offsets_file"])
            prompt_lens = np.load(folder / info["prompt_lens_file"])
        except (OSError, ValueError) as e:
            raise SFTError(f"cannot read the {split} files of {folder} ({e}); run `dgemma data prepare` again") from None
        dtype = np.dtype(meta["dtype"])
        if size != info["tokens"] * dtype.itemsize or len(offsets) != info["examples"] + 1 or \
                len(prompt_lens) != info["examples"]:
            raise SFTError(f"the {split} files of {folder} do not match meta.json; run `dgemma data prepare` again")
        tokens = np.memmap(folder / info["tokens_file"], dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        ids = meta["special_ids"]
        fill = ids.get("pad") if ids.get("pad") is not None else ids["eos"]
        return cls(tokens, offsets, prompt_lens, seq_len=seq_len, canvas_length=canvas_length, fill_id=int(fill),
                   eos_id=int(ids["eos"]), overflow=overflow)

    def __len__(self) -> int:
        return len(self.index)

    def overflow_note(self, split: str) -> str | None:
        o = self.overflow
        if not o.count:
            return None
        done = ("truncated: their answers lose their end (and its eos)" if o.policy == "truncate"
                else "dropped")
        other = "drop" if o.policy == "truncate" else "truncate"
        return (f"warning: {o.count} of {len(self.offsets) - 1} {split} examples need more than --seq-len "
                f"{self.seq_len} tokens (longest example {o.longest} tokens): {done}; raise --seq-len or pass "
                f"--overflow {other}")

    def row(self, i: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Row i as (ids int64 [length], roles int8 [length]); `length` (default: the row's own) is a multiple of C.

        Layout: FILL up to a canvas boundary, PROMPT, ANSWER from that boundary, ANSWER_FILL (eos) to the end of the
        answer's last canvas, then FILL canvases up to `length`."""
        C = self.C
        length = int(self.row_len[i] if length is None else length)
        e = int(self.index[i])
        start, end = int(self.offsets[e]), int(self.offsets[e + 1])
        P = int(self.prompt_lens[e])
        prompt = np.asarray(self.tokens[start:start + P], dtype=np.int64)
        answer = np.asarray(self.tokens[start + P:end], dtype=np.int64)
        room = min(length, self.seq_len)
        if len(prompt) > room - C:  # a prompt that leaves no canvas for the answer keeps its end
            prompt = prompt[len(prompt) - (room - C):]
        lead = -(-len(prompt) // C) * C
        answer = answer[:room - lead]
        ids = np.full(length, self.fill_id, dtype=np.int64)
        roles = np.full(length, FILL, dtype=np.int8)
        ids[lead - len(prompt):lead], roles[lead - len(prompt):lead] = prompt, PROMPT
        ids[lead:lead + len(answer)], roles[lead:lead + len(answer)] = answer, ANSWER
        answer_end = lead + -(-len(answer) // C) * C
        ids[lead + len(answer):answer_end] = self.eos_id
        roles[lead + len(answer):answer_end] = ANSWER_FILL
        return ids, roles


class SFTBatches:
    """Endless, deterministic, length-grouped batches of an SFTSplit: dicts with "input_ids" int64 [b, T] and
    "roles" int8 [b, T], b = batch_size // world_size, T = the longest row of the global batch (<= seq_len).

    Epoch e: the rows in the order of default_rng([seed, e]).permutation, cut into pools of 32 batches, each pool
    sorted by length and cut into batches, the batches of the epoch shuffled again (unless `shuffle` is off: rows in
    order, no grouping). Rank r takes rows [r*b, (r+1)*b) of each global batch; the position counts global batches,
    so a saved state resumes at any world size."""

    POOL = 32

    def __init__(self, split: SFTSplit, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if batch_size < 1 or batch_size % world_size:
            raise SFTError(f"batch_size={batch_size} (global) must be a positive multiple of world_size={world_size}")
        if len(split) < batch_size:
            raise SFTError(f"the split has {len(split)} usable examples, fewer than one batch of {batch_size}; use a "
                           "smaller --batch-size or more data")
        self.split, self.batch_size, self.seed, self.shuffle = split, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.step = 0, 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.split) // self.batch_size

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n, b = len(self.split), self.batch_size
        if not self.shuffle:
            batches = [np.arange(i * b, (i + 1) * b) for i in range(n // b)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)[:n // b * b]
            batches = []
            for s in range(0, len(order), self.POOL * b):
                pool = order[s:s + self.POOL * b]
                pool = pool[np.argsort(self.split.row_len[pool], kind="stable")]
                batches += [pool[i:i + b] for i in range(0, len(pool), b)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        import torch

        if self.step >= self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        rows_global = self.epoch_batches(self.epoch)[self.step]
        self.step += 1
        T = int(self.split.row_len[rows_global].max())
        rows = self.batch_size // self.world_size
        mine = rows_global[self.rank * rows:(self.rank + 1) * rows]
        pairs = [self.split.row(int(i), T) for i in mine]
        return {"input_ids": torch.from_numpy(np.stack([p[0] for p in pairs])),
                "roles": torch.from_numpy(np.stack([p[1] for p in pairs]))}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "rows": len(self.split), "seq_len": self.split.seq_len, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "rows", "seq_len", "shuffle"):
            if state.get(key) != mine[key]:
                raise SFTError(f"cannot resume batches: saved {key}={state.get(key)!r} but this run has {mine[key]!r}; "
                               "resume with the same data, seed, batch size and seq_len")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
