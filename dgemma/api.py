"""Text-level generation: load a model and its tokenizer by name or path, turn prompts into text.

    from dgemma.api import load, generate_text
    lm = load("models/dgemma-py-small")              # or "random:tiny" for a random-weight model
    print(generate_text(lm, ["def add(a, b):"], max_new_tokens=64)[0].text)

Defaults come from the model's generation_config.json (`LoadedModel.defaults`, the same place the CLI, eval, bench
and the server read them); keyword overrides go on top. Stop strings, chat templates and decoding live here,
above the id-only generation code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from dgemma.config import ConfigError, ModelConfig
from dgemma.engine.generate import ARParams, DiffusionParams, GenerationStats, StepFn, generate_ar, generate_diffusion
from dgemma.hw import fast_half
from dgemma.model import DiffusionGemma, init_weights
from dgemma.params import RequestError, TokenLogprob
from dgemma.template import fill_ids, hole_texts
from dgemma.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "dgemma-py-small"
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer.json"


class ModelLoadError(ValueError):
    """The model named by the user cannot be loaded; the message says why and what to pass instead."""


@dataclass
class LoadedModel:
    model: DiffusionGemma
    tokenizer: Tokenizer
    name: str
    generation_config: dict = field(default_factory=dict)
    _grammars: object = field(default=None, repr=False, compare=False)

    @property
    def grammars(self):
        """The tokenizer's grammar compiler (engine/constrain.Grammars), built on first use and kept."""
        if self._grammars is None:
            from dgemma.engine.constrain import Grammars

            self._grammars = Grammars.from_tokenizer(self.tokenizer, self.model.config.vocab_size)
        return self._grammars

    def eos_ids(self) -> tuple[int, ...] | None:
        """The ids that end generation: generation_config.json's eos_token_id, else the model config's, else the
        tokenizer's stop tokens."""
        eos = self.generation_config.get("eos_token_id", self.model.config.eos_token_ids or self.tokenizer.stop_ids())
        return tuple(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else None

    def defaults(self, mode: str = "diffusion", **overrides) -> DiffusionParams | ARParams:
        """The one-shot parameters for `mode` from the model's generation_config.json, `overrides` on top (None
        keeps the file's value)."""
        overrides.setdefault("eos_token_ids", None)
        if overrides["eos_token_ids"] is None:
            overrides["eos_token_ids"] = self.eos_ids()
        if mode == "ar":
            return ARParams.from_generation_config(self.generation_config, **overrides)
        if mode == "diffusion":
            overrides.setdefault("pad_token_id", self.model.config.pad_token_id)
            return DiffusionParams.from_generation_config(self.generation_config, **overrides)
        raise ValueError(f"unknown mode {mode!r}; use 'diffusion' or 'ar'")


def load(spec: str | Path | None = None, dtype: torch.dtype | str | None = None) -> LoadedModel:
    """`spec` is a checkpoint folder, or `random:PRESET` for random weights (pipeline demos and tests).
    None means the bundled default model. `dtype`: float32/bfloat16/float16 (a torch dtype or a name such as
    "bf16"); None keeps a checkpoint's stored dtype where it computes fast (`fast_half`), else float32, and
    float32 for random weights.

    Everything a user can get wrong fails here with a ModelLoadError (or the CheckpointError, ConfigError or
    TokenizerError of the file at fault), naming the path and the fix: a missing path, a training run folder
    instead of one of its checkpoints, a folder with no config.json, a corrupt weight (NaN/inf), a tokenizer
    whose vocabulary or special ids do not fit the model."""
    from dgemma.checkpoint import load_checkpoint, load_generation_config, random_config, resolve_dtype

    if spec is None:
        spec = DEFAULT_MODEL
        if not (Path(spec) / "config.json").is_file():
            raise ModelLoadError(f"the bundled default model is missing at {spec}; pass --model PATH, or "
                                 "--model random:small for a random-weight demo")
    spec = str(spec)
    if spec.startswith("random:"):
        try:
            cfg, tok = random_config(spec)
        except ConfigError as e:
            raise ModelLoadError(str(e)) from None
        _check_tokenizer_fits(tok, cfg.vocab_size, f"{spec} (tokenizer {tok.path})")
        model = init_weights(DiffusionGemma(cfg), seed=0).eval()
        target = resolve_dtype(dtype)
        if target is not None:
            model = model.to(target)
        return LoadedModel(model, tok, spec)

    path = Path(spec)
    _check_checkpoint_folder(path)
    try:
        cfg = ModelConfig.from_hf_config(path / "config.json")
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path} has no tokenizer.json; copy the model's tokenizer into the folder")
    tok = Tokenizer.from_path(path)
    _check_tokenizer_fits(tok, cfg.vocab_size, str(path))  # before reading any weights
    _, model = load_checkpoint(path, dtype=dtype)
    if dtype is None and model.dtype in (torch.bfloat16, torch.float16) and not fast_half(model.device):
        model = model.float()  # a half-precision checkpoint on a CPU without fast half matmuls: compute in fp32
    return LoadedModel(model.eval(), tok, str(path), load_generation_config(path))


CHECKPOINT_FILES = "config.json, model.safetensors, tokenizer.json"


def _check_checkpoint_folder(path: Path) -> None:
    """A ModelLoadError unless `path` is a folder with a config.json; says what to pass instead."""
    from dgemma.checkpoint import run_folder_checkpoint

    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; pass a checkpoint folder ({CHECKPOINT_FILES}) "
                             "or random:PRESET (e.g. random:tiny)")
    if not path.is_dir():
        what = f"the folder holding it, {path.parent}" if path.name in ("config.json", "model.safetensors",
                                                                         "tokenizer.json") else "a checkpoint folder"
        raise ModelLoadError(f"model path {path} is a file, not a checkpoint folder; pass {what}")
    if (path / "config.json").is_file():
        return
    inner = run_folder_checkpoint(path)
    if inner is not None:
        raise ModelLoadError(f"{path} is a training run folder, not a checkpoint (no config.json at its top level); "
                             f"pass --model {inner} (its newest checkpoint)")
    raise ModelLoadError(f"{path} has no config.json, so it is not a model checkpoint; pass a checkpoint folder "
                         f"({CHECKPOINT_FILES}), e.g. a run's RUN/latest from `dgemma train`, or random:PRESET")


def _check_tokenizer_fits(tok: Tokenizer, vocab_size: int, where: str) -> None:
    """A ModelLoadError if the tokenizer can produce an id the model has no embedding row for: more tokens than
    the model's vocabulary, or a special token (eos, bos, pad, ...) whose id lies outside it."""
    problems = []
    if tok.vocab_size > vocab_size:
        problems.append(f"tokenizer has {tok.vocab_size} tokens but the model only {vocab_size}")
    specials = {"pad": tok.pad_id, "eos": tok.eos_id, "bos": tok.bos_id, "unk": tok.unk_id, "mask": tok.mask_id,
                "start_of_turn": tok.start_of_turn_id, "end_of_turn": tok.end_of_turn_id}
    outside = [f"{name} {tok.id_to_token(i)!r} = {i}" for name, i in specials.items()
               if i is not None and i >= vocab_size]
    if outside:
        problems.append(f"tokenizer's special ids lie outside the model's vocabulary (ids 0..{vocab_size - 1}): "
                        + ", ".join(outside))
    if problems:
        raise ModelLoadError(f"{where}: " + "; ".join(problems) + "; the tokenizer belongs to another model: use the "
                             "tokenizer.json the model was trained with")


@dataclass
class TextResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # with logprobs=N: one per token_ids entry (the model's raw logprob)
    holes: list[str] | None = None  # with a template or suffix: what the model wrote in each hole (filler removed)


def _stop_cut(tok: Tokenizer, stops: list[str]):
    """A StopFn: cut a row's tokens once its text contains a stop string (the text is trimmed exactly later)."""
    def fn(row: int, tokens: list[int]) -> int | None:
        text = tok.decode(tokens)
        hits = [i for s in stops if (i := text.find(s)) >= 0]
        if not hits:
            return None
        at = min(hits)
        for k in range(len(tokens) + 1):  # shortest token prefix whose text reaches past the stop's start
            if len(tok.decode(tokens[:k])) > at:
                return k
        return len(tokens)
    return fn


def _trim(text: str, stops: list[str]) -> str:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return text[:min(hits)] if hits else text


def encode_prompts(lm: LoadedModel, prompts: list[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, L] and mask for a list of prompts."""
    tok = lm.tokenizer
    seqs = []
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt {p[:40]!r} is not valid UTF-8 text (byte {e.start}); pass UTF-8") from None
        if chat:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
        else:
            ids = tok.encode(p, add_bos=tok.add_bos_default)
        if not ids:
            raise ValueError("empty prompt: give at least one character of text")
        seqs.append(ids)
    L = max(len(s) for s in seqs)
    pad = tok.pad_id or 0
    ids = torch.tensor([[pad] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def generate_text(lm: LoadedModel, prompts: list[str], mode: str = "diffusion",
                  params: DiffusionParams | ARParams | None = None, stop: list[str] | None = None,
                  chat: bool = False, on_step: StepFn | None = None, record: str | Path | None = None,
                  logprobs: int | None = None, template: str | None = None, suffix: str | None = None,
                  json_schema: dict | str | None = None, regex: str | None = None,
                  **overrides) -> list[TextResult]:
    """Continue each prompt. `params` None: the model's defaults (`lm.defaults(mode, **overrides)`), e.g.
    `generate_text(lm, ["def f():"], max_new_tokens=64, seed=0)`. `record`: write every denoising step of the
    (single) prompt's run to this JSONL file (dgemma/engine/trajectory.py), same tokens as without it. `logprobs=N`:
    TextResult.logprobs holds each token's log-probability under the model's raw distribution (log-softmax of the
    logits at temperature 1, whatever temperature/top-k/top-p or grammar chose it) and its N most probable
    alternatives; in diffusion mode the distribution is the denoiser's at the token's canvas position, at the
    denoising step that chose it (SamplingParams.logprobs). The tokens are the same as without logprobs.

    `template` (dgemma/template.py syntax, e.g. "x = {{8}}\\n") fixes the output's text around holes; `suffix` is
    fill-in-the-middle: a hole of max_new_tokens tokens, then the suffix. Either one makes the output exactly the
    template's span; TextResult.text is the filled template and TextResult.holes what each hole received.

    `json_schema` (a dict, or its JSON text) or `regex` constrains the output to the grammar's language
    (dgemma/engine/constrain.py); so does `grammar={"json_object": True}` (any SamplingParams.grammar). A cut at
    max_new_tokens (finish_reason "length") leaves a prefix of a word of the language."""
    if mode not in ("ar", "diffusion"):
        raise ValueError(f"unknown mode {mode!r}; use 'diffusion' or 'ar'")
    if logprobs is not None and record is not None:
        raise ValueError("logprobs and record cannot be combined; record a run without logprobs")
    grammar = grammar_of(json_schema, regex)
    if grammar is not None:
        if overrides.get("grammar") is not None or (params is not None and params.grammar is not None):
            raise ValueError("give json_schema, regex or grammar, not several")
        if params is None:
            overrides["grammar"] = grammar
        else:
            params = replace(params, grammar=grammar)
    if params is None:
        params = lm.defaults(mode, **overrides, **({} if logprobs is None else {"logprobs": logprobs}))
    elif overrides:
        raise ValueError(f"give either params or keyword settings ({', '.join(overrides)}), not both")
    elif logprobs is not None:
        params = replace(params, logprobs=logprobs)
    if record is not None and params.grammar is not None:
        raise ValueError("a constrained run cannot be recorded yet; drop record (or the grammar)")
    if record is not None and (template is not None or suffix is not None):
        raise ValueError("a template or suffix cannot be recorded yet; drop record (or the template)")
    if record is not None:
        return generate_recorded(lm, prompts, mode, params, [s for s in (stop or []) if s], chat, on_step, record)
    tpl = None
    if template is not None or suffix is not None:
        tpl, params = _template_for(lm, params, template, suffix)
    ids, mask = encode_prompts(lm, prompts, chat)
    stops = [s for s in (stop or []) if s]
    stop_fn = _stop_cut(lm.tokenizer, stops) if stops else None
    templates = None if tpl is None else [tpl.ids] * len(prompts)
    grammars = lm.grammars if params.grammar is not None else None
    if mode == "ar":
        out = generate_ar(lm.model, ids, params, mask, stop_fn=stop_fn, templates=templates, grammars=grammars)
    else:
        out = generate_diffusion(lm.model, ids, params, mask, stop_fn=None if params.compat else stop_fn,
                                 on_step=on_step, templates=templates, grammars=grammars)
    results = []
    filler = {*(params.eos_token_ids or ()), *([lm.tokenizer.pad_id] if lm.tokenizer.pad_id is not None else [])}
    for row, toks in enumerate(out.tokens):
        kept = toks if tpl is None else fill_ids(toks, tpl, filler)
        text = _trim(lm.tokenizer.decode(kept), stops)
        lps = out.logprobs[row] if out.logprobs is not None else None
        holes = None if tpl is None else hole_texts(lm.tokenizer, toks, tpl, filler)
        results.append(TextResult(text, toks, out.finish_reasons[row], out.stats, lps, holes))
    return results


def grammar_of(json_schema: dict | str | None = None, regex: str | None = None) -> dict | None:
    """SamplingParams.grammar for a JSON schema (a dict or its JSON text) or a regex; None for neither. RequestError
    for both, or for schema text that is not JSON."""
    import json

    if json_schema is not None and regex is not None:
        raise RequestError("give either a JSON schema or a regex, not both")
    if regex is not None:
        return {"regex": regex}
    if json_schema is None:
        return None
    if isinstance(json_schema, str):
        try:
            json_schema = json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise RequestError(f"the JSON schema is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                               "pass a JSON object such as '{\"type\": \"object\"}'") from None
    return {"json_schema": json_schema}


def _template_for(lm: LoadedModel, params, template: str | None, suffix: str | None) -> tuple:
    """The Template of a `template` or `suffix` argument, and the params whose max_new_tokens is its span."""
    from dgemma.template import TemplateError, encode, with_suffix

    if template is not None and suffix is not None:
        raise TemplateError("give either a template or a suffix, not both (a suffix is the template '{{N}}SUFFIX')")
    tpl = encode(lm.tokenizer, template) if template is not None else with_suffix(lm.tokenizer, suffix,
                                                                                   params.max_new_tokens)
    return tpl, replace(params, max_new_tokens=len(tpl))


def generate_recorded(lm, prompts: list[str], mode: str, params, stops: list[str], chat: bool, on_step, path):
    """`api.generate_text(..., record=path)`: one prompt through the one-shot driver (engine.generate_batch) with a
    trajectory recorder as its sink, every step written to `path`. The same engine, settings and seed as
    `generate_text` without a recording, so the same tokens."""
    from dgemma.engine.engine import generate_batch
    from dgemma.engine.trajectory import Recorder

    if len(prompts) != 1:
        raise ValueError(f"--record records one prompt at a time (got {len(prompts)}); run one prompt per file")
    if getattr(params, "compat", False) or getattr(params, "engine", "fast") != "fast":
        raise ValueError("--record needs the stepped engine: drop --compat and --engine reference")
    params.validate()
    tok = lm.tokenizer
    ids, mask = encode_prompts(lm, prompts, chat)
    prompt_ids = ids[0][mask[0].bool()].tolist()
    sp = params.sampling(0).with_(drafts=True)
    with Recorder(path) as rec:
        rec.header(lm.name, mode, prompts[0], prompt_ids, lm.model.config.canvas_length,
                   {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(sp).items()})
        sink = _RecordSink(rec, mode)
        out = generate_batch(lm.model, [prompt_ids], [sp], _stop_cut(tok, stops) if stops else None, on_step,
                             params.compile, getattr(params, "sampler_chunk", None), sink=sink)
        tokens, stats = out.tokens[0], out.stats
        rec.end(tok, out.finish_reasons[0], tokens, decoder_passes=stats.decoder_passes[0],
                encoder_passes=stats.encoder_passes,
                steps_per_canvas=stats.steps_per_canvas[0] if stats.steps_per_canvas else [])
    return [TextResult(_trim(tok.decode(tokens), stops), tokens, out.finish_reasons[0], stats)]


class _RecordSink:
    """generate_batch's sink for one recorded row: every draft a step record, every commit a commit record (with
    the canvas it came from in diffusion mode)."""

    def __init__(self, rec, mode: str):
        self.rec, self.mode, self.canvas = rec, mode, 0

    def draft(self, row: int, draft) -> None:
        self.canvas = draft.canvas_index
        self.rec.step(draft)

    def commit(self, row: int, offset: int, ids: list[int]) -> None:
        self.rec.commit(self.canvas if self.mode == "diffusion" else None, offset, ids)
