"""dgemma: DiffusionGemma-style block-diffusion language models on one machine or many.

The names most programs need, imported lazily so that `import dgemma` (and `dgemma --help`) stays free of torch:

    import dgemma
    lm = dgemma.load("random:tiny")
    print(dgemma.generate_text(lm, ["def add(a, b):"], params=dgemma.DiffusionParams(max_new_tokens=32))[0].text)

The layers, lowest first: the core modules in this folder (config, params, model, cache, sampler, tokenizer,
checkpoint, quant, lora, template, api), then `engine/` (generation), `serve/` (the HTTP server), `train/`,
`tasks/`, `evals/`, `bench/` and `cli/`. `pyproject.toml` ([tool.importlinter]) states which may import which.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "load": "dgemma.api", "generate_text": "dgemma.api", "LoadedModel": "dgemma.api", "TextResult": "dgemma.api",
    "ModelConfig": "dgemma.config",
    "SamplingParams": "dgemma.params", "EngineConfig": "dgemma.params", "Request": "dgemma.params",
    "Event": "dgemma.params",
    "DiffusionParams": "dgemma.engine.generate", "ARParams": "dgemma.engine.generate",
    "generate_diffusion": "dgemma.engine.generate", "generate_ar": "dgemma.engine.generate",
    "Engine": "dgemma.engine.engine",
    "DiffusionGemma": "dgemma.model",
}
__all__ = ["ARParams", "DiffusionGemma", "DiffusionParams", "Engine", "EngineConfig", "Event", "LoadedModel",
           "ModelConfig", "Request", "SamplingParams", "TextResult", "generate_ar", "generate_diffusion",
           "generate_text", "load"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        try:  # a submodule or folder: dgemma.checkpoint, dgemma.engine, ...
            return importlib.import_module(f"dgemma.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dgemma.{name}":
                raise
            raise AttributeError(f"module 'dgemma' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
