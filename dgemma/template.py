"""Canvas templates and fill-in-the-middle: text with holes, turned into fixed output positions.

A template is the text the model must produce, with holes for it to fill:

    def area(r):\n    return {{12}}\n

`{{N}}` is a hole of at most N tokens; the rest is fixed text. Write `\\{{` for a literal `{{`. The template becomes
`SamplingParams.template`: the fixed text's token ids at their positions and -1 (sampler.FREE) for every hole
position. In diffusion mode the fixed positions are clamped at every denoising step, so the model fills each hole
seeing the text on both sides of it; in AR mode they are emitted as they come, so a hole sees only what precedes it.

A hole always spans N positions. A hole the model fills with fewer tokens leaves filler in the rest: EOS or padding
tokens, which are removed from the hole's text (`fill_text`); EOS inside a template's span never ends the request.
`--suffix TEXT` is the template `{{N}}TEXT`: fill in the middle between the prompt and the suffix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FREE = -1  # the same value as sampler.FREE (this module is torch-free)
MAX_HOLE = 4096  # tokens in one hole

_TOKEN = re.compile(r"\\\{\{|\{\{|\}\}")


class TemplateError(ValueError):
    """A template that cannot be parsed or does not fit; the message says where and how to fix it."""


@dataclass(frozen=True)
class Template:
    ids: tuple[int, ...]  # fixed token ids, FREE at hole positions
    holes: tuple[tuple[int, int], ...]  # (start, end) output positions of each hole

    def __len__(self) -> int:
        return len(self.ids)


def parse(text: str) -> list[str | int]:
    """Split a template into fixed-text segments (str) and hole lengths (int), in order."""
    parts: list[str | int] = []
    buf, i = [], 0
    for m in _TOKEN.finditer(text):
        if m.start() < i:
            continue
        buf.append(text[i:m.start()])
        i = m.end()
        if m.group() == "\\{{":
            buf.append("{{")
        elif m.group() == "}}":
            buf.append("}}")
        else:
            close = text.find("}}", i)
            if close < 0:
                raise TemplateError(f"template: the hole opened at character {m.start()} is not closed; write "
                                    "{{N}} (N tokens), or \\{{ for a literal {{")
            body = text[i:close].strip()
            if not body.isdigit():
                raise TemplateError(f"template: the hole at character {m.start()} reads {{{{{body}}}}}; a hole is "
                                    "{{N}} with N its length in tokens, e.g. {{16}}")
            n = int(body)
            if not 1 <= n <= MAX_HOLE:
                raise TemplateError(f"template: the hole at character {m.start()} has length {n}; it must be in "
                                    f"[1, {MAX_HOLE}]")
            if buf:
                parts.append("".join(buf))
                buf = []
            parts.append(n)
            i = close + 2
    buf.append(text[i:])
    if "".join(buf):
        parts.append("".join(buf))
    return [p for p in parts if p != ""]


def encode(tokenizer, text: str) -> Template:
    """A template's fixed text tokenized segment by segment (no BOS), holes as FREE runs."""
    ids: list[int] = []
    holes: list[tuple[int, int]] = []
    for part in parse(text):
        if isinstance(part, int):
            holes.append((len(ids), len(ids) + part))
            ids.extend([FREE] * part)
        else:
            ids.extend(tokenizer.encode(part, add_bos=False))
    if not ids:
        raise TemplateError("template: it is empty; give fixed text, holes ({{N}}) or both")
    return Template(tuple(ids), tuple(holes))


def with_suffix(tokenizer, suffix: str, hole: int) -> Template:
    """Fill in the middle: a hole of `hole` tokens, then the suffix's tokens."""
    if not 1 <= hole <= MAX_HOLE:
        raise TemplateError(f"the hole before the suffix must be 1 to {MAX_HOLE} tokens (got {hole})")
    tail = tokenizer.encode(suffix, add_bos=False) if suffix else []
    if not tail:
        raise TemplateError("the suffix is empty; give the text that must follow the generated middle")
    return Template(tuple([FREE] * hole + tail), ((0, hole),))


def fill_ids(tokens: Sequence[int], template: Template, filler: Iterable[int]) -> list[int]:
    """The generated tokens with the filler (EOS or padding ids) inside holes removed."""
    drop = set(filler)
    in_hole = [False] * len(template)
    for a, b in template.holes:
        in_hole[a:b] = [True] * (b - a)
    return [t for i, t in enumerate(tokens) if not (i < len(in_hole) and in_hole[i] and t in drop)]


def hole_texts(tokenizer, tokens: Sequence[int], template: Template, filler: Iterable[int]) -> list[str]:
    """What the model wrote in each hole (filler removed)."""
    drop = set(filler)
    return [tokenizer.decode([t for t in tokens[a:b] if t not in drop]) for a, b in template.holes]
