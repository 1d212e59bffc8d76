"""Grammar-constrained decoding (JSON Schema, regular expressions) on a diffusion canvas and in AR mode.

    grammars = Grammars.from_tokenizer(tok, model.config.vocab_size)    # once per model (built by api/serve)
    matcher = grammars.matcher({"json_schema": {"type": "object", ...}})  # once per request (RequestError if bad)

A request's `SamplingParams.grammar` is one of {"json_schema": {...}}, {"json_object": true}, {"regex": "..."} or
{"lark": "..."}. Every output of such a request is a word of the grammar's language, or, when it stops at
max_new_tokens (finish_reason "length", as OpenAI reports a cut), a prefix of one, for every seed and every model:
the guarantee comes from the construction below, not from the model.

The token masks come from llguidance (1.9.1). Measured here against xgrammar 0.2.9 on the bundled 8192-token
tokenizer and a six-field JSON schema (one core): llguidance builds its tokenizer in 0.16 s straight from our
`tokenizers` tokenizer.json, compiles the schema in 1 ms and computes a mask in 31 us per token; xgrammar's mask
is faster (4 us) but its wheel requires torch, transformers and triton, imports torch (3.7 s to first use) and
needs a hand-built vocabulary. A mask is computed only where a token must be repaired (below), far from the cost
of a forward pass, so llguidance's zero dependencies, its tokenizer.json input and its errors that name an
unsupported schema keyword decide. It is imported lazily (`dgemma --help` never loads it).

The canvas algorithm. The engine's diffusion samplers re-decide the canvas at every step (spec A5.2: an accepted
token is kept in the next step's input, not frozen; the commit is the argmax of the canvas's last step), so the
constraint acts at the two places where tokens leave the sampler, reading the canvas left to right with the
matcher in the state after every committed token (carried from canvas to canvas):

1. Every step, the leading run of accepted positions (0, 1, ..., up to the first position the sampler did not
   accept; the confidence sampler's committed positions) is walked left to right: a sampled token the grammar
   allows is kept, a disallowed one is replaced by the best allowed token under that position's logits, and the
   walk ends at an end of the grammar. The next step's input canvas (and, for the confidence sampler, its kept
   tokens) thus starts with a valid prefix; positions past the run behave as without a grammar (accepted tokens
   kept, the rest renoised) and are re-decided by later steps. The matcher is rolled back: nothing is committed.
2. When the canvas is done (adaptive stop, all positions committed, or the step budget), the committed tokens are
   the draft walked the same way over the whole canvas with the last step's logits: each position gets its argmax
   when the grammar allows it, else the best allowed token (the masked argmax), and the matcher consumes them.
   The committed output is therefore a valid prefix by construction, whatever the model did. Every canvas commits
   up to C tokens in at most max_denoising_steps passes, so constrained requests end as unconstrained ones do.

Why not freeze an accepted prefix (commit only a contiguous valid run, renoise the rest, force one token a step)?
That changes the sampler itself (frozen positions have no entropy to spend, later positions lose the draft context
the model settles them with), so a grammar that allows everything would no longer give the unconstrained tokens,
and diffusion would pay for the grammar in steps. Here validity needs only step 2; step 1 steers the canvas toward
it. Correctness argument: `walk` appends a token only after the matcher allowed it (the sampled/argmax token when
`validate_tokens` accepts it, else the argmax over `compute_bitmask`'s allowed set), and a matcher that is not
stopped always allows at least one token, so the committed sequence is always a prefix of a word.

Cost: a mask is computed only at a position whose token the grammar refuses; the logits such a repair needs are the
row's whole canvas through the LM head once per step (the reference's own matmul, so the engine and the reference
repair identically), [C, V] fp32 for that row only.

Ends: an EOS token (the tokenizer's stop ids) is allowed only where the grammar accepts; a walk that reaches an
allowed EOS, or a matcher with nothing left but EOS (`is_stopped`, e.g. a closed JSON object), ends the request
with finish_reason "stop" and the rest of the canvas is dropped. A canvas that ends mid-object continues in the
next one from the carried matcher state. At max_new_tokens the output is cut (finish_reason "length").

AR mode: the drawn token (greedy or sampled) is kept when allowed; otherwise greedy takes the masked argmax and
sampling draws again from the masked distribution (drawing from p, and from p restricted to the allowed tokens
when the first draw is disallowed, draws exactly from p restricted to them). Tokens are the same as without a
grammar wherever the grammar allows them: an always-true grammar ({"lark": "start: <[*]>*"}) gives exactly the
unconstrained tokens in both modes (tests/test_constrain.py), and rows without a grammar never reach this module.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from dgemma.params import GRAMMAR_KINDS, RequestError
from dgemma.sampler import sample_next_token

# JSON Schema compile options (llguidance's JsonCompileOptions): compact JSON with the usual separators, no free
# whitespace (a weak model could otherwise spend its tokens on blanks). A schema's own "x-guidance" may change
# these; `lenient` is forced off so an unimplemented keyword is an error, never a silently unchecked constraint.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_OVERRIDES = {"lenient": False}
ANY_GRAMMAR = {"lark": "start: <[*]>*"}  # every token, EOS included, anywhere: the always-true grammar
CACHE_SIZE = 256  # compiled grammars kept (a server sees many schemas; the least recently used go first)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise RequestError("grammar-constrained decoding needs the llguidance package (a dgemma dependency): "
                           "pip install 'llguidance==1.9.1'") from None
    return llguidance


class Grammars:
    """Compiles grammars against one tokenizer's vocabulary (token bytes from its tokenizer.json) for a model of
    `vocab_size` ids (ids past the tokenizer's are never allowed). Grammars are cached by their JSON text (the
    CACHE_SIZE most recently used). Thread-safe: a server compiles in its handlers while the engine thread builds
    matchers."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int]):
        self.tokenizer_json, self.vocab_size, self.eos = tokenizer_json, vocab_size, frozenset(int(t) for t in eos_ids)
        if not self.eos:
            raise RequestError("constrained decoding needs an end-of-sequence token; the tokenizer has none")
        self._tok = None
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer(cls, tok, vocab_size: int, eos_ids: Sequence[int] | None = None) -> Grammars:
        """From a dgemma.tokenizer.Tokenizer (duck-typed: this module sees no tokenizer code)."""
        return cls(tok.inner.to_str(), vocab_size, eos_ids or tok.stop_ids())

    @property
    def lltokenizer(self):
        with self._lock:
            if self._tok is None:
                ll = _llguidance()
                self._tok = ll.LLTokenizer(self.tokenizer_json, n_vocab=self.vocab_size, eos_token=sorted(self.eos))
            return self._tok

    def compile(self, grammar: dict) -> str:
        """llguidance's grammar text for a SamplingParams.grammar; RequestError naming what is wrong."""
        try:
            key = json.dumps(grammar, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise RequestError(f"the grammar must be plain JSON data (objects, arrays, strings, finite numbers): {e}"
                               ) from None
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        ll = _llguidance()
        M = ll.LLMatcher
        (kind, value), = grammar.items()
        if kind not in GRAMMAR_KINDS:
            raise RequestError(f"unknown grammar kind {kind!r}; use one of {', '.join(GRAMMAR_KINDS)}")
        try:
            if kind == "regex":
                text = M.grammar_from_regex(value)
            elif kind == "lark":
                text = M.grammar_from_lark(value)
            else:
                schema = {"type": "object"} if kind == "json_object" else value
                text = M.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS, overrides=JSON_OVERRIDES)
        except (ValueError, TypeError) as e:
            raise RequestError(f"{kind} is not valid: {e}") from None
        is_error, messages = M.validate_grammar_with_warnings(text, self.lltokenizer)
        if is_error:
            raise RequestError(_explain(kind, messages[0] if messages else "rejected"))
        with self._lock:
            self._cache[key] = text
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return text

    def matcher(self, grammar: dict) -> Matcher:
        m = _llguidance().LLMatcher(self.lltokenizer, self.compile(grammar), log_level=0)
        if m.is_error():
            raise RequestError(_explain(next(iter(grammar)), m.get_error()))
        return Matcher(m, self.eos, self.vocab_size)


def _explain(kind: str, message: str) -> str:
    unimplemented = re.search(r"Unimplemented keys: \[([^\]]*)\]", message)
    if unimplemented:
        keys = ", ".join(k.strip().strip('"') for k in unimplemented.group(1).split(","))
        return (f"json_schema uses unsupported keyword(s) {keys}: constrained decoding cannot enforce them; remove "
                "them from the schema (or restate the constraint with supported keywords)")
    first = message.strip().splitlines()
    detail = " ".join(line.strip() for line in first[:4])
    what = {"regex": "the regex", "lark": "the lark grammar", "json_schema": "the json_schema"}.get(kind, kind)
    return f"{what} cannot be compiled: {detail}"


class Matcher:
    """One request's grammar state: the tokens committed so far. Wraps an llguidance LLMatcher."""

    def __init__(self, ll, eos: frozenset[int], vocab_size: int):
        self.ll, self.eos, self.V = ll, eos, vocab_size
        self._bits = torch.arange(8, dtype=torch.uint8)

    def allows(self, token: int) -> bool:
        return self.ll.validate_tokens([token]) == 1

    def mask(self) -> torch.Tensor:
        """[V] bool: the tokens allowed next."""
        raw = torch.frombuffer(bytearray(self.ll.compute_bitmask()), dtype=torch.uint8)
        return ((raw[:, None] >> self._bits) & 1).view(-1)[:self.V].bool()

    def consume(self, token: int) -> None:
        if not self.ll.consume_token(token):
            raise RuntimeError(f"grammar matcher refused token {token}: {self.ll.get_error()}")

    def rollback(self, n: int) -> None:
        if n and not self.ll.rollback(n):
            raise RuntimeError(f"grammar matcher could not roll back {n} tokens: {self.ll.get_error()}")

    def stopped(self) -> bool:
        """Nothing but EOS may follow (the grammar's word is complete and cannot be extended)."""
        return self.ll.is_stopped()


def masked_argmax(logits: torch.Tensor, mask: torch.Tensor) -> int:
    """The most probable allowed token of logits [V] (the first of equals, as torch.argmax); mask [V] bool on the CPU
    (the logits may live on another device)."""
    return int(torch.where(mask.to(logits.device), logits, torch.finfo(logits.dtype).min).argmax())


def walk(m: Matcher, tokens: list[int], logits_at: Callable[[int], torch.Tensor]) -> tuple[list[int], bool]:
    """Read `tokens` left to right from the matcher's state, consuming: an allowed token stays, a disallowed one
    becomes the masked argmax of `logits_at(i)` ([V]). Returns (the tokens consumed, ended): ended when an EOS the
    grammar allows is reached (not returned, not consumed) or the matcher is stopped; then the rest is dropped."""
    out: list[int] = []
    i = 0
    while i < len(tokens):
        if m.stopped():
            return out, True
        ok = m.ll.validate_tokens(tokens[i:])
        run = tokens[i:i + ok]
        end = next((k for k, t in enumerate(run) if t in m.eos), None)
        if end is not None:
            run = run[:end]
        for t in run:  # one at a time: the matcher may stop inside the run
            m.consume(t)
            out.append(t)
            if m.stopped():
                return out, True
        if end is not None:
            return out, True
        i += len(run)
        if i == len(tokens):
            break
        t = masked_argmax(logits_at(i), m.mask())
        if t in m.eos:
            return out, True
        m.consume(t)
        out.append(t)
        i += 1
    return out, m.stopped()


def guide_run(m: Matcher, tokens: list[int], logits_at: Callable[[int], torch.Tensor]) -> list[int]:
    """Step-time walk (docstring, 1.): the leading accepted run `tokens` made a valid prefix, the matcher left as it
    was. Returns the repaired run; it may be shorter than `tokens` when the grammar ends inside it (the positions
    after the end keep what the sampler put there)."""
    out, _ = walk(m, tokens, logits_at)
    m.rollback(len(out))
    return out


def choose_ar(m: Matcher, token: int, logits: torch.Tensor, temperature: float, top_k: int | None,
              top_p: float | None, generator: torch.Generator | None) -> tuple[int | None, bool]:
    """AR mode: the token to emit after the drawn `token` (logits [V] fp32), consumed by the matcher.
    Returns (token or None at an end, ended)."""
    if not m.allows(token):
        mask = m.mask()
        if temperature <= 0:
            token = masked_argmax(logits, mask)
        else:
            masked = logits.masked_fill(~mask.to(logits.device), float("-inf"))[None]
            token = int(sample_next_token(masked, temperature, top_k, top_p, generator))
    if token in m.eos:
        return None, True
    m.consume(token)
    return token, m.stopped()
