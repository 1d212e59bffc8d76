"""`dgemma bench structured`: grammar-constrained decoding, constrained vs unconstrained, diffusion vs AR.

    dgemma bench structured                              # the bundled model, 48 schemas + 16 regexes, 4 prompts each
    dgemma bench structured --model random:tiny --quick  # a smoke run

Random bounded JSON Schemas (objects with string, integer, number, boolean, enum and array fields, nested objects,
required keys) and regular expressions are drawn from --seed; every case runs a batch of prompts in each mode, with
its grammar and without. Printed per mode and side: validity (the output parses and validates under the schema,
judged by the `jsonschema` library when installed, else by llguidance; regexes by Python's `re`), the share of
outputs that ended by themselves (finish_reason stop), tokens per forward (generated tokens / decoder passes, AR:
encoder passes), tokens/s, and the cost of the grammar (constrained / unconstrained tokens/s). Unconstrained rows
are judged against the same grammar: how often the model gets there alone. A table, then one JSON line, last.
"""

from __future__ import annotations

import json
import random
import re
import time

from dgemma.options import BenchStructuredConfig

PROMPTS = ["# settings as JSON\nconfig = ", "def answer():\n    return ", "data = ", "print("]


# ---- cases ------------------------------------------------------------------------------------------------------
def _scalar(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum"])
    if kind == "string":
        lo = rng.randint(0, 2)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 8)}
    if kind == "integer":
        lo = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 5000)}
    if kind == "number":  # multipleOf bounds the fraction (an unbounded one runs on under random weights)
        lo = rng.randint(-50, 50)
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 100),
                "multipleOf": rng.choice([0.5, 0.25, 1])}
    if kind == "boolean":
        return {"type": "boolean"}
    words = ["red", "green", "blue", "on", "off", "yes", "no", "a b", "x-1"]
    return {"enum": rng.sample(words, rng.randint(1, 4))}


def _field(rng: random.Random, depth: int) -> dict:
    r = rng.random()
    if depth > 0 and r < 0.15:
        return random_schema(rng, depth - 1)
    if depth > 0 and r < 0.35:
        lo = rng.randint(0, 1)
        return {"type": "array", "items": _scalar(rng), "minItems": lo, "maxItems": lo + rng.randint(0, 3)}
    return _scalar(rng)


def random_schema(rng: random.Random, depth: int = 2) -> dict:
    """A bounded object schema: every output a grammar-driven random model writes ends within a few hundred tokens."""
    names = rng.sample(["id", "name", "age", "tags", "ok", "score", "kind", "items", "meta", "city", "count"],
                       rng.randint(1, 5))
    props = {n: _field(rng, depth) for n in names}
    return {"type": "object", "properties": props, "required": [n for n in names if rng.random() < 0.7],
            "additionalProperties": False}


def random_regex(rng: random.Random) -> str:
    atoms = ["[a-z]", "[0-9]", "[A-F0-9]", "(ab|cd)", "(x|42)", "-", "_", r"\.", " ", "Q"]
    parts = []
    for _ in range(rng.randint(1, 6)):
        a = rng.choice(atoms)
        if rng.random() < 0.6:
            lo = rng.randint(0, 3)
            a += f"{{{lo},{lo + rng.randint(0, 4)}}}"
        parts.append(a)
    return "".join(parts)


def _judge():
    try:
        import jsonschema
    except ImportError:
        jsonschema = None

    def valid(grammar: dict, text: str, lm) -> bool:
        if "regex" in grammar:
            return re.fullmatch(grammar["regex"], text, re.DOTALL) is not None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        if jsonschema is None:
            m = lm.grammars.matcher(grammar)
            ids = lm.tokenizer.encode(text)
            return m.ll.validate_tokens(ids) == len(ids) and m.ll.is_accepting()
        try:
            jsonschema.validate(value, grammar["json_schema"])
        except jsonschema.ValidationError:
            return False
        return True

    return valid, "jsonschema" if jsonschema is not None else "llguidance"


# ---- the run ----------------------------------------------------------------------------------------------------
def run(cfg: BenchStructuredConfig) -> dict:
    import torch

    from dgemma.api import generate_text, load
    from dgemma.bench.speed import _device, _git

    torch.set_num_threads(cfg.threads)
    lm = load(cfg.model)
    rng = random.Random(cfg.seed)
    n_schemas, n_regexes = (8, 4) if cfg.quick else (cfg.schemas, cfg.regexes)
    steps = cfg.steps if cfg.steps is not None or not cfg.quick else 4  # --quick: 4 steps unless given
    cases = [{"json_schema": random_schema(rng)} for _ in range(n_schemas)]
    cases += [{"regex": random_regex(rng)} for _ in range(n_regexes)]
    prompts = PROMPTS[:cfg.prompts]
    valid, judge = _judge()
    generate_text(lm, prompts[:1], max_new_tokens=8, seed=0, grammar=cases[0])  # warm-up (tokenizer, first calls)
    sides: dict[str, dict] = {}
    for mode in ("diffusion", "ar"):
        for constrained in (True, False):
            key = f"{mode}_{'constrained' if constrained else 'free'}"
            tot = {"outputs": 0, "valid": 0, "stopped": 0, "tokens": 0, "passes": 0, "seconds": 0.0}
            for i, grammar in enumerate(cases):
                kw = {"max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed + i}
                if mode == "diffusion" and steps is not None:
                    kw["max_denoising_steps"] = steps
                t0 = time.perf_counter()
                out = generate_text(lm, prompts, mode=mode, grammar=grammar if constrained else None, **kw)
                tot["seconds"] += time.perf_counter() - t0
                for r in out:
                    tot["outputs"] += 1
                    tot["valid"] += valid(grammar, r.text, lm)
                    tot["stopped"] += r.finish_reason == "stop"
                    tot["tokens"] += len(r.token_ids)
                tot["passes"] += sum(out[0].stats.decoder_passes)
            sides[key] = {"outputs": tot["outputs"], "validity": tot["valid"] / tot["outputs"],
                          "stop_rate": tot["stopped"] / tot["outputs"],
                          "tokens_per_forward": tot["tokens"] / max(tot["passes"], 1),
                          "tokens_per_s": tot["tokens"] / tot["seconds"], "tokens": tot["tokens"],
                          "seconds": tot["seconds"]}
    d, a = sides["diffusion_constrained"], sides["ar_constrained"]
    return {
        "bench": "structured", "model": lm.name, "git": _git(), "device": _device(), "threads": cfg.threads,
        "seed": cfg.seed, "schemas": n_schemas, "regexes": n_regexes, "prompts": len(prompts),
        "max_new_tokens": cfg.max_new_tokens, "steps": steps, "judge": judge,
        "constrained_outputs": d["outputs"] + a["outputs"], "sides": sides,
        "diffusion_over_ar_tokens_per_forward_constrained": d["tokens_per_forward"] / a["tokens_per_forward"],
        "diffusion_over_ar_tokens_per_s_constrained": d["tokens_per_s"] / a["tokens_per_s"],
        "grammar_cost_diffusion": d["tokens_per_s"] / sides["diffusion_free"]["tokens_per_s"],
        "grammar_cost_ar": a["tokens_per_s"] / sides["ar_free"]["tokens_per_s"],
    }


def print_table(r: dict) -> None:
    print(f"model {r['model']}  git {r['git']}  device {r['device']}  threads {r['threads']}  judge {r['judge']}")
    print(f"{r['schemas']} schemas + {r['regexes']} regexes x {r['prompts']} prompts, max_new_tokens "
          f"{r['max_new_tokens']}")
    print(f"{'side':<24}{'outputs':>8}{'valid':>8}{'stop':>8}{'tok/fwd':>9}{'tok/s':>9}")
    for key, s in r["sides"].items():
        print(f"{key:<24}{s['outputs']:>8}{s['validity']:>8.3f}{s['stop_rate']:>8.3f}{s['tokens_per_forward']:>9.2f}"
              f"{s['tokens_per_s']:>9.1f}")
    print(f"constrained: diffusion/AR tokens per forward {r['diffusion_over_ar_tokens_per_forward_constrained']:.2f}x, "
          f"tokens/s {r['diffusion_over_ar_tokens_per_s_constrained']:.2f}x; grammar cost (constrained/free tok/s): "
          f"diffusion {r['grammar_cost_diffusion']:.2f}, AR {r['grammar_cost_ar']:.2f}")


def run_cli(args) -> int:
    from dataclasses import fields

    from dgemma.bench.speed import finish

    cfg = BenchStructuredConfig(**{f.name: getattr(args, f.name) for f in fields(BenchStructuredConfig)})
    result = run(cfg)
    print_table(result)
    finish(result, cfg.out)
    return 0
