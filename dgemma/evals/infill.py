"""`dgemma eval --task infill`: fill in the middle on held-out Python, diffusion with the suffix clamped against AR
decoding of the same weights, which can only continue the prefix.

    dgemma eval --task infill                                            # the bundled model, its shipped cases
    dgemma eval --task infill --model M --cases-file F --cases 100 --out benchmarks/results/infill/eval.json
    dgemma eval --task infill --write-cases models/dgemma-py-small/infill_cases.jsonl    # how that file is made

Cases come from --cases-file, else the model folder's infill_cases.jsonl. `--write-cases FILE` makes one from the
functions of the validation split's Python files: --data's (a prepared folder: its sources and split), else the
python-stdlib recipe at `dgemma data prepare`'s default split (seed 0, val fraction 0.02: the bundled model's, see
its MODEL_CARD.md). Nothing is downloaded: the recipe reads the running Python's standard library. For each
function (at most 12 per file, evenly spaced, 3 to 40 lines, dedented, parsing on its own), one line and one span (2
to 4 lines of consecutive statements of one block) are cut from inside the body, never the signature, the docstring
or the last line, chosen by a generator seeded by the file's and function's names. A case is a JSON line
{"id", "kind": "line" | "span", "prefix", "middle", "suffix"}: prefix + middle + suffix is the function. The cut lies
at line ends: the prefix ends before the newline that precedes the removed lines, the middle is that newline and the
lines, the suffix starts with the newline after them (a newline and the next line's indentation are one token of a
byte-level BPE tokenizer). A case is kept only if its prefix, middle and suffix, tokenized one by one, give the
whole function's tokens (with the --model's tokenizer), so neither mode sees a tokenization it never saw in
training. The file's first line is a header: format, origin, split and the command that made it.

Protocol, per case; the hole has the removed middle's own token count N (an oracle length, the same for both modes):
- diffusion: the prompt is the prefix; the output is the template `{{N}}` + the suffix's tokens (SamplingParams
  .template: the suffix clamped at every denoising step), at the model's generation_config defaults (--steps
  overrides the steps per canvas) and --seed. A canvas sees no later canvas, so only the suffix's tokens up to the
  end of the hole's last canvas can inform the hole (at least one is given); the rest is left out of the template:
  the hole's tokens are the same, and the forward passes are those the hole needs. EOS or padding in the hole is filler and is removed from its text;
- ar: greedy decoding of N tokens after the prefix (stopping early at EOS), which cannot see the suffix. Its text is
  spliced in as the middle: the function is prefix + AR's text + the true suffix;
- diffusion, prefix only (the control): diffusion as above with N free positions and no suffix, scored like AR: what
  diffusion gains from seeing the suffix is the difference between its first row and this one.
Scores per mode: exact match (the generated middle equals the removed text, character for character), token
accuracy (the N positions whose token is the removed span's token at that position), parse rate (`ast.parse` of
prefix + generated middle + suffix, the whole function), forward passes per case (diffusion: its denoising passes
and one encoder pass per canvas, the prompt's before the first; AR: one per token, the prefill giving the first)
and seconds per case (one case at a time, after a warm-up). A table, then one JSON line last.
"""

from __future__ import annotations

import ast
import json
import math
import os
import platform
import random
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from dgemma.fsio import git_revision, write_text_atomic

CASES_FILE = "infill_cases.jsonl"  # shipped in a model folder
CASES_FORMAT = "dgemma-infill-cases-v1"
KINDS = ("line", "span")
FUNCTIONS_PER_FILE = 12
FUNCTION_LINES = (3, 40)
MAX_MIDDLE_TOKENS = 48
MAX_CASES_WRITTEN = 240


@dataclass
class InfillEvalConfig:
    model: str | None = None  # checkpoint folder or random:PRESET (None: the bundled model)
    cases_file: str | None = None  # JSONL cases (None: the model folder's infill_cases.jsonl)
    cases: int = 100  # at most this many, evenly spaced through the file
    seed: int = 0  # diffusion's generator (AR is greedy)
    steps: int | None = None  # diffusion: most denoising steps per canvas (None: the model's generation_config)
    out: str | None = None  # also write the JSON here
    compile: bool = False  # both modes through the engine's compiled graphs (not bit-identical to eager)
    data: str | None = None  # --write-cases: a prepared folder whose validation split gives the functions
    write_cases: str | None = None  # write the cases to this file and stop


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    prefix: str
    middle: str
    suffix: str


# ---------------------------------------------------------------------------------------------------------------
# Cases: cutting held-out functions, reading and writing the file
def _blocks(node: ast.AST):
    """Every statement list inside a function's body, nested blocks included, nested defs and classes not."""
    for name in ("body", "orelse", "finalbody"):
        stmts = getattr(node, name, None)
        if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
            yield stmts
            for s in stmts:
                if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    yield from _blocks(s)
    for h in getattr(node, "handlers", None) or ():
        yield from _blocks(h)
    for c in getattr(node, "cases", None) or ():
        yield from _blocks(c)


def _owns_lines(lines: list[str], first: ast.stmt, last: ast.stmt) -> bool:
    """Whether the statements first..last fill their lines alone: nothing before the first on its line, nothing but
    a comment after the last on its line."""
    head = lines[first.lineno - 1].encode()[:first.col_offset]
    tail = lines[last.end_lineno - 1].encode()[last.end_col_offset:].decode(errors="replace").strip()
    return not head.strip() and (not tail or tail.startswith("#"))


def cut(function: str, first: int, last: int) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of a function with its lines first..last (0-based, inclusive) removed."""
    lines = function.rstrip("\n").split("\n")
    return ("\n".join(lines[:first]), "\n" + "\n".join(lines[first:last + 1]),
            "\n" + "\n".join(lines[last + 1:]) + "\n")


def function_cases(source: str, name: str) -> list[tuple[str, int, str, int, int]]:
    """(function text, its line in `source`, kind, first removed line, last removed line) of the cases cut from
    `source`'s functions (see the docstring); line numbers of removed lines are 0-based in the function's text."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    src_lines = source.split("\n")
    funcs = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                   key=lambda n: n.lineno)
    found = []
    for node in funcs:
        text = textwrap.dedent("\n".join(src_lines[node.lineno - 1:node.end_lineno])) + "\n"
        try:
            fn = ast.parse(text).body[0]
        except (SyntaxError, ValueError, IndexError):
            continue
        lines = text.rstrip("\n").split("\n")
        if not FUNCTION_LINES[0] <= len(lines) <= FUNCTION_LINES[1] or len(text) > 4000:
            continue
        doc_end = 0
        if ast.get_docstring(fn) is not None:
            doc_end = fn.body[0].end_lineno
        end = fn.end_lineno  # the function's last line (1-based): never removed
        ones, spans = [], []
        for stmts in _blocks(fn):
            for a, s in enumerate(stmts):
                if s.lineno <= max(doc_end, fn.body[0].lineno - 1) or s.end_lineno >= end:
                    continue
                if s.lineno == s.end_lineno and _owns_lines(lines, s, s) and lines[s.lineno - 1].strip():
                    ones.append((s.lineno - 1, s.lineno - 1))
                for b in (a, a + 1, a + 2):
                    if b < len(stmts) and stmts[b].end_lineno < end:
                        first, last = s.lineno, stmts[b].end_lineno
                        if 2 <= last - first + 1 <= 4 and _owns_lines(lines, s, stmts[b]):
                            spans.append((first - 1, last - 1))
        rng = random.Random(f"{name}:{node.name}:{node.lineno}")
        if ones:
            found.append((text, node.lineno, "line", *rng.choice(sorted(set(ones)))))
        if spans:
            found.append((text, node.lineno, "span", *rng.choice(sorted(set(spans)))))
    return found


def _spread(items: list, count: int) -> list:
    """Up to `count` items evenly spaced through `items` (all of them when there are no more)."""
    if len(items) <= count:
        return list(items)
    return [items[math.floor(i * len(items) / count)] for i in range(count)]


def _boundaries_hold(tok, prefix: str, middle: str, suffix: str) -> bool:
    """Whether the three pieces tokenized one by one give the whole text's tokens (the prefix with BOS)."""
    bos = getattr(tok, "add_bos_default", False)
    whole = tok.encode(prefix + middle + suffix, add_bos=bos)
    parts = tok.encode(prefix, add_bos=bos) + tok.encode(middle, add_bos=False) + tok.encode(suffix, add_bos=False)
    n = len(tok.encode(middle, add_bos=False))
    return whole == parts and 1 <= n <= MAX_MIDDLE_TOKENS


def held_out_cases(tok, data: str | None) -> tuple[list[Case], dict]:
    """The cases of the validation split's Python files (--data's, else the python-stdlib recipe's default split),
    and where they came from."""
    from dgemma.train.corpora import iter_documents, resolve_source
    from dgemma.train.data import DEFAULT_SEED, DEFAULT_VAL_FRACTION, read_meta, split_of

    if data is not None:
        meta = read_meta(data)
        seed, frac = meta["split"]["seed"], meta["split"]["val_fraction"]
        sources = [s for s in meta["sources"] if s.get("kind") == "recipe" or Path(s["source"]).exists()]
        origin = {"from": f"validation split of {data}", "sources": [
            {k: s.get(k) for k in ("source", "kind", "origin", "documents", "sha256")} for s in sources]}
        names = [s["source"] for s in sources]
    else:
        seed, frac, names = DEFAULT_SEED, DEFAULT_VAL_FRACTION, ["python-stdlib"]
        corpus = resolve_source("python-stdlib")
        origin = {"from": "validation split of the python-stdlib recipe",
                  "sources": [{"source": "python-stdlib", "kind": "recipe", "origin": corpus.origin,
                               "files": len(corpus.documents)}]}
    origin["split"] = {"rule": "val if int.from_bytes(sha256(f'{seed}:{name}')[:8], 'big') / 2**64 < val_fraction",
                       "seed": seed, "val_fraction": frac}
    cases: list[Case] = []
    for source in names:
        for name, text in iter_documents(source):
            if not name.endswith(".py") or split_of(name, seed, frac) != "val":
                continue
            by_fn: dict[int, list[Case]] = {}  # the cases of each function, by its line in the file
            for function, line, kind, first, last in function_cases(text, name):
                prefix, middle, suffix = cut(function, first, last)
                if _boundaries_hold(tok, prefix, middle, suffix):
                    fn = function.split("(")[0].split()[-1]
                    by_fn.setdefault(line, []).append(Case(f"{name}:{line}:{fn}:{kind}", kind, prefix, middle,
                                                           suffix))
            for group in _spread(list(by_fn.values()), FUNCTIONS_PER_FILE):  # evenly spaced through the file
                cases.extend(group)
    if not cases:
        raise ValueError(f"{origin['from']}: no Python functions to cut infill cases from; pass --data DIR with "
                         "Python files in its validation split")
    return _spread(cases, MAX_CASES_WRITTEN), origin


def write_cases(path: str | os.PathLike[str], cases: list[Case], origin: dict, cfg: InfillEvalConfig) -> None:
    """The cases file (a header line, then one case a line), written to a temporary name and renamed into place."""
    path = Path(path).expanduser()
    again = ["dgemma eval --task infill" + (f" --model {cfg.model}" if cfg.model else "")
             + (f" --data {cfg.data}" if cfg.data else "") + f" --write-cases {path}"]
    header = {"format": CASES_FORMAT,
              "about": "held-out fill-in-the-middle cases for `dgemma eval --task infill`: one line or a span of 2 to "
                       "4 lines cut from inside the body of functions of the validation split's Python files; "
                       "prefix + middle + suffix is the dedented function",
              "made_with": again, **origin, "cases": len(cases)}
    lines = [json.dumps(header, ensure_ascii=False)] + [
        json.dumps({"id": c.id, "kind": c.kind, "prefix": c.prefix, "middle": c.middle, "suffix": c.suffix},
                   ensure_ascii=False) for c in cases]
    try:
        write_text_atomic(path, "".join(line + "\n" for line in lines))
    except OSError as e:
        raise OSError(f"cannot write the cases file {path} ({e.strerror or e}); choose a writable path") from None


def read_cases(path: str | os.PathLike[str]) -> tuple[list[Case], dict]:
    """The cases of a cases file and its header ({} without one); a ValueError naming the line for a bad one."""
    path = Path(path).expanduser()
    fix = (f"make one with `dgemma eval --task infill --write-cases {path}`, or write JSON lines "
           '{"id": ..., "kind": "line", "prefix": ..., "middle": ..., "suffix": ...}')
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"cases file {path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the cases file {path} ({e}); {fix}") from None
    header, cases = {}, []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"cases file {path} line {n} is not JSON ({e}); {fix}") from None
        if n == 1 and isinstance(row, dict) and "format" in row:
            if row["format"] != CASES_FORMAT:
                raise ValueError(f"cases file {path} has format {row['format']!r}, not {CASES_FORMAT!r}; {fix}")
            header = row
            continue
        ok = isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k] for k in ("prefix", "middle",
                                                                                            "suffix"))
        if not ok or row.get("kind", "line") not in KINDS:
            raise ValueError(f"cases file {path} line {n} is not a case (an object with non-empty strings prefix, "
                             f"middle and suffix, and kind {' or '.join(KINDS)}); {fix}")
        cases.append(Case(str(row.get("id", n)), row.get("kind", "line"), row["prefix"], row["middle"],
                          row["suffix"]))
    if not cases:
        raise ValueError(f"cases file {path} holds no cases; {fix}")
    return cases, header


def load_cases(cfg: InfillEvalConfig) -> tuple[list[Case], str]:
    """--cases-file, else the model folder's infill_cases.jsonl; up to cfg.cases of them, evenly spaced."""
    from dgemma.api import DEFAULT_MODEL

    if cfg.cases_file:
        file = Path(cfg.cases_file)
    else:
        folder = Path(DEFAULT_MODEL) if cfg.model is None else (None if cfg.model.startswith("random:")
                                                                else Path(cfg.model).expanduser())
        if folder is None or not (folder / CASES_FILE).is_file():
            where = f"{folder} has no {CASES_FILE}" if folder is not None else f"{cfg.model} has no model folder"
            raise ValueError(f"no infill cases: {where}; pass --cases-file FILE (made with `dgemma eval --task infill "
                             "--write-cases FILE`)")
        file = folder / CASES_FILE
    cases, _ = read_cases(file)
    return _spread(cases, cfg.cases), f"file {file}"


def check_text_tokenizer(lm, cases: list[Case]) -> None:
    """A ValueError unless the model's tokenizer writes every case's text back exactly (a text model)."""
    tok = lm.tokenizer
    for c in cases:
        text = c.prefix + c.middle + c.suffix
        if tok.decode(tok.encode(text, add_bos=False)) != text:
            raise ValueError(f"model {lm.name}'s tokenizer cannot write the Python text of case {c.id} back (it is "
                             "not a text tokenizer, e.g. a task model's); --task infill needs a text model such as "
                             "models/dgemma-py-small")


# ---------------------------------------------------------------------------------------------------------------
# Filling and scoring
@dataclass
class Filled:
    text: str  # the generated middle
    ids: list[int]  # its tokens (diffusion: the hole's N positions, filler included; AR: up to N, cut at EOS)
    passes: int
    seconds: float


def fill(lm, case: Case, mode: str, params, with_suffix: bool = True) -> Filled:
    """One case in one mode (the protocol in the module docstring). `with_suffix` False (diffusion): the control,
    N free positions after the prefix and no suffix, so that what the suffix adds can be told apart."""
    import torch

    from dgemma.engine.generate import generate_ar, generate_diffusion
    from dgemma.sampler import FREE

    tok = lm.tokenizer
    prompt = torch.tensor([tok.encode(case.prefix, add_bos=getattr(tok, "add_bos_default", False))])
    n = len(tok.encode(case.middle, add_bos=False))
    t0 = time.perf_counter()
    if mode == "ar":
        out = generate_ar(lm.model, prompt, _replace(params, max_new_tokens=n))
        ids = out.tokens[0]
        return Filled(tok.decode(ids), ids, max(1, len(ids)), time.perf_counter() - t0)
    C = lm.model.config.canvas_length
    tail = tok.encode(case.suffix, add_bos=False)
    visible = max(1, min(len(tail), math.ceil(n / C) * C - n))  # suffix tokens sharing a canvas with the hole
    template = (FREE,) * n + tuple(tail[:visible]) if with_suffix else (FREE,) * n
    out = generate_diffusion(lm.model, prompt, _replace(params, max_new_tokens=len(template)), templates=[template])
    seconds = time.perf_counter() - t0
    ids = out.tokens[0][:n]
    filler = {*(params.eos_token_ids or ()), *([tok.pad_id] if tok.pad_id is not None else [])}
    st = out.stats
    passes = st.decoder_passes[0] + max(1, len(st.steps_per_canvas[0]))
    return Filled(tok.decode([t for t in ids if t not in filler]), ids, passes, seconds)


def _replace(params, **changes):
    from dataclasses import replace

    return replace(params, **changes)


def parses(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


@dataclass
class ModeScore:
    exact: list[bool] = field(default_factory=list)
    token_acc: list[float] = field(default_factory=list)
    parsed: list[bool] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def add(self, case: Case, out: Filled, middle_ids: list[int]) -> None:
        self.exact.append(out.text == case.middle)
        same = sum(a == b for a, b in zip(out.ids, middle_ids))
        self.token_acc.append(same / len(middle_ids))
        self.parsed.append(parses(case.prefix + out.text + case.suffix))
        self.passes.append(out.passes)
        self.seconds.append(out.seconds)
        self.outputs.append(out.text)

    def summary(self, keep: list[bool] | None = None) -> dict:
        pick = (lambda xs: [x for x, k in zip(xs, keep) if k]) if keep is not None else (lambda xs: xs)
        n = len(pick(self.exact))
        mean = (lambda xs: sum(xs) / n if n else float("nan"))
        return {"cases": n, "exact_match": mean(pick(self.exact)), "token_accuracy": mean(pick(self.token_acc)),
                "parse_rate": mean(pick(self.parsed)), "passes_per_case": mean(pick(self.passes)),
                "seconds_per_case": mean(pick(self.seconds))}


def evaluate(cfg: InfillEvalConfig) -> dict:
    import torch

    from dgemma.api import load

    if cfg.write_cases:
        lm = load(cfg.model)
        cases, origin = held_out_cases(lm.tokenizer, cfg.data)
        write_cases(cfg.write_cases, cases, origin, cfg)
        print(f"wrote {len(cases)} cases ({origin['from']}) to {cfg.write_cases}", file=sys.stderr)
        return {"cases": len(cases), **origin}
    cases, origin = load_cases(cfg)
    lm = load(cfg.model)
    check_text_tokenizer(lm, cases)
    diff = lm.defaults("diffusion", seed=cfg.seed, compile=cfg.compile, max_denoising_steps=cfg.steps)
    ar = lm.defaults("ar", temperature=0.0, compile=cfg.compile)
    tok = lm.tokenizer
    middle_ids = [tok.encode(c.middle, add_bos=False) for c in cases]
    settings = {"diffusion": ("diffusion", diff, True), "ar": ("ar", ar, True),
                "diffusion_prefix_only": ("diffusion", diff, False)}  # the control: no suffix in the canvas
    scores = {name: ModeScore() for name in settings}
    for name, (mode, params, with_suffix) in settings.items():
        fill(lm, cases[0], mode, params, with_suffix)  # warm-up, not counted
        for c, ids in zip(cases, middle_ids):
            scores[name].add(c, fill(lm, c, mode, params, with_suffix), ids)
    rows = []
    for name, s in scores.items():
        label = name.replace("_", ", ").replace("prefix, only", "prefix only")
        rows.append({"setting": label, **s.summary()})
        for kind in KINDS if name != "diffusion_prefix_only" else ():
            keep = [c.kind == kind for c in cases]
            if any(keep):
                rows.append({"setting": f"{label}, {kind}s", **s.summary(keep)})
    d, a, p = (scores[name].summary() for name in ("diffusion", "ar", "diffusion_prefix_only"))
    result = {
        "task": "infill", "model": lm.name, "cases": len(cases), "cases_from": origin,
        "kinds": {k: sum(c.kind == k for c in cases) for k in KINDS},
        "hole": "the removed middle's own token count (every setting)",
        "middle_tokens_mean": sum(map(len, middle_ids)) / len(cases),
        "original_parse_rate": sum(parses(c.prefix + c.middle + c.suffix) for c in cases) / len(cases),
        "rows": rows,
        **{f"{k}_{mode}": v[k] for mode, v in (("diffusion", d), ("ar", a), ("diffusion_prefix_only", p))
           for k in ("exact_match", "token_accuracy", "parse_rate", "passes_per_case", "seconds_per_case")},
        "diffusion_settings": {k: getattr(diff, k) for k in (
            "sampler", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
            "confidence_threshold")},
        "sample": {"id": cases[0].id, "middle": cases[0].middle, "diffusion": scores["diffusion"].outputs[0],
                   "ar": scores["ar"].outputs[0]},
        "seed": cfg.seed, "compile": cfg.compile, "git": git_revision(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    _print(result)
    line = json.dumps(result)
    if cfg.out:
        write_text_atomic(cfg.out, line + "\n")
    print(line)
    return result


def _print(r: dict) -> None:
    print(f"infill: {r['cases']} held-out cases ({r['cases_from']}; {r['kinds']['line']} lines, {r['kinds']['span']} "
          f"spans, {r['middle_tokens_mean']:.1f} tokens each on average), model {r['model']}"
          + (", compiled (--compile)" if r["compile"] else ""))
    print("hole: the removed middle's token count; diffusion sees the suffix, AR continues the prefix and is spliced in")
    print(f"{'setting':<24} {'cases':>5} {'exact':>7} {'tok acc':>8} {'parses':>7} {'passes':>7} {'s/case':>8}")
    for row in r["rows"]:
        print(f"{row['setting']:<24} {row['cases']:>5} {row['exact_match']:>7.3f} {row['token_accuracy']:>8.3f} "
              f"{row['parse_rate']:>7.3f} {row['passes_per_case']:>7.2f} {row['seconds_per_case']:>8.4f}")
