"""Text-level generation: load a model and its tokenizer by name or path, turn prompts into text.

    from dgemma.api import load, generate_text
    lm = load("models/dgemma-py-small")              # or "random:tiny" for a random-weight model
    print(generate_text(lm, ["def add(a, b):"], max_new_tokens=64)[0].text)

Stop strings, chat templates and decoding live here, above the id-only generation code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError, preset
from .generate import ARParams, DiffusionParams, GenerationStats, StepFn, generate_ar, generate_diffusion
from .model import DiffusionGemma, init_weights
from .tokenizer import Tokenizer

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


def load(spec: str | Path | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """`spec` is a checkpoint folder, or `random:PRESET` for random weights (pipeline demos and tests).
    None means the bundled default model."""
    if spec is None:
        spec = DEFAULT_MODEL
        if not (Path(spec) / "config.json").is_file():
            raise ModelLoadError(f"the bundled default model is missing at {spec}; pass --model PATH, or "
                                 "--model random:small for a random-weight demo")
    spec = str(spec)
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        try:
            cfg = preset(name)
        except ConfigError as e:
            raise ModelLoadError(str(e)) from None
        tok = Tokenizer.from_path(BUNDLED_TOKENIZER)
        if cfg.vocab_size < tok.vocab_size:
            cfg = cfg.replace(vocab_size=tok.vocab_size)
        cfg = cfg.replace(eos_token_ids=tuple(tok.stop_ids()))
        model = init_weights(DiffusionGemma(cfg), seed=0).eval()
        if dtype is not None:
            model = model.to(dtype)
        return LoadedModel(model, tok, spec)
    from .checkpoint import load_checkpoint, load_generation_config

    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; pass a checkpoint folder (config.json, "
                             "model.safetensors, tokenizer.json) or random:PRESET")
    _, model = load_checkpoint(path, dtype=dtype)
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelLoadError(f"{path} has no tokenizer.json; copy the model's tokenizer into the folder")
    tok = Tokenizer.from_path(path)
    if tok.vocab_size > model.config.vocab_size:
        raise ModelLoadError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}; the tokenizer belongs to another model")
    return LoadedModel(model.eval(), tok, str(path), load_generation_config(path))


@dataclass
class TextResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats


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
        if chat:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
        else:
            ids = tok.encode(p, add_bos=tok.bos_id is not None)
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
                  chat: bool = False, on_step: StepFn | None = None) -> list[TextResult]:
    ids, mask = encode_prompts(lm, prompts, chat)
    stops = [s for s in (stop or []) if s]
    stop_fn = _stop_cut(lm.tokenizer, stops) if stops else None
    if mode == "ar":
        params = params or ARParams(eos_token_ids=tuple(lm.tokenizer.stop_ids()))
        out = generate_ar(lm.model, ids, params, mask, stop_fn=stop_fn)
    elif mode == "diffusion":
        params = params or DiffusionParams(eos_token_ids=tuple(lm.tokenizer.stop_ids()))
        out = generate_diffusion(lm.model, ids, params, mask, stop_fn=None if params.compat else stop_fn,
                                 on_step=on_step)
    else:
        raise ValueError(f"unknown mode {mode!r}; use 'diffusion' or 'ar'")
    results = []
    for row, toks in enumerate(out.tokens):
        text = _trim(lm.tokenizer.decode(toks), stops)
        results.append(TextResult(text, toks, out.finish_reasons[row], out.stats))
    return results
