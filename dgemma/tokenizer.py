"""Tokenizer: a typed wrapper around the `tokenizers` library, chat templates, streaming decode, BPE training.

Load any Hugging Face `tokenizer.json` (Gemma's, or one trained here) and get Gemma's special ids by name:

    tok = Tokenizer.from_path("path/to/folder_or_tokenizer.json")
    ids = tok.encode("def f():", add_bos=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    stream = StreamDecoder(tok)
    text = "".join(stream.push(i) for i in ids) + stream.flush()

Train a small byte-level BPE whose first ids follow Gemma's convention (pad 0, eos 1, bos 2, unk 3, mask 4,
start_of_turn 5, end_of_turn 6) with `train_bpe(texts, vocab_size, path)`; `dgemma data prepare` does this for you.
This module does not import transformers; jinja2 is imported only when a folder ships its own chat template.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from dgemma.fsio import write_json_atomic, write_text_atomic

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# The order fixes the ids of a tokenizer trained by `train_bpe`: pad 0, eos 1, bos 2, unk 3, mask 4, sot 5, eot 6.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK, MASK, START_OF_TURN, END_OF_TURN)
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # a byte-level BPE needs the specials and all 256 byte symbols
_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode produces for an incomplete or invalid byte sequence


class TokenizerError(ValueError):
    """A tokenizer file, chat template or message list the user supplied cannot be used; the message says why."""


def _tokenizer_file(path: str | os.PathLike[str]) -> Path:
    """`path` is a tokenizer.json file or a folder holding one; anything else is a TokenizerError."""
    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        where = f"folder {p} has no tokenizer.json" if p.is_dir() else f"{p} does not exist"
        raise TokenizerError(
            f"cannot load a tokenizer: {where}; pass a tokenizer.json file or the folder holding one "
            "(train one with `dgemma data prepare --source ... --out DIR`)"
        )
    return file


TOKENIZER_CONFIG = "tokenizer_config.json"


def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """`tokenizer_config.json` beside tokenizer.json as a dict ({} when absent)."""
    config_file = folder / TOKENIZER_CONFIG
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {config_file}: {e}; fix or delete the file") from e
    if not isinstance(config, dict):
        raise TokenizerError(f"{config_file} must hold a JSON object; fix or delete the file")
    return config


def _read_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """A chat template shipped beside tokenizer.json: `chat_template.jinja`, else `tokenizer_config.json`'s."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = folder / TOKENIZER_CONFIG
    template = config.get("chat_template")
    if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_file}: chat_template is neither a string nor a list with a 'default' entry")
    return template


# Where `Tokenizer.add_bos_default` came from (`Tokenizer.add_bos_source`), in the order they are consulted.
BOS_FROM_CONFIG = "tokenizer_config.json add_bos_token"
BOS_FROM_POST_PROCESSOR = "tokenizer.json post_processor"
BOS_FROM_FAMILY = "Gemma default"


def _bos_from_post_processor(inner: tokenizers.Tokenizer) -> bool | None:
    """Whether tokenizer.json's post-processor prepends bos: None without a post-processor, else True only for a
    TemplateProcessing (alone or inside a Sequence) whose single-sequence template starts with the bos token."""
    processor = inner.post_processor
    if processor is None:
        return None
    try:
        state = json.loads(processor.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return False  # a post-processor we cannot read: it is there, and it is not known to add bos
    steps = (state.get("processors") or []) if state.get("type") == "Sequence" else [state]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            first = single[0] if single and isinstance(single[0], dict) else {}
            return (first.get("SpecialToken") or {}).get("id") == BOS
    return False


def _add_bos_token(config: Mapping[str, Any], config_file: Path) -> bool | None:
    value = config.get("add_bos_token")
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{config_file}: add_bos_token must be true or false (got {value!r}); fix the file")
    return value


class Tokenizer:
    """A loaded tokenizer: encode/decode, Gemma's special ids by token string, and the chat template."""

    def __init__(self, inner: tokenizers.Tokenizer, chat_template: str | None = None, path: Path | None = None,
                 add_bos: bool | None = None):
        """`add_bos`: the folder's explicit choice (tokenizer_config.json `add_bos_token`); None = decide from
        tokenizer.json's post-processor, else the Gemma default (see `add_bos_default`)."""
        self.inner = inner
        self.chat_template = chat_template  # jinja source, or None for the built-in Gemma template
        self.path = path
        self._raw: tokenizers.Tokenizer | None = None  # a twin that treats special-token strings as text
        from_post = _bos_from_post_processor(inner)
        if add_bos is not None:
            self._add_bos, self._add_bos_source = add_bos, BOS_FROM_CONFIG
        elif from_post is not None:
            self._add_bos, self._add_bos_source = from_post, BOS_FROM_POST_PROCESSOR
        else:  # Gemma's tokenizer_config says add_bos_token: true; a tokenizer without <bos> cannot comply
            self._add_bos, self._add_bos_source = self.bos_id is not None, BOS_FROM_FAMILY
        self._add_bos_from_files = add_bos is None  # False: only tokenizer_config.json holds the choice
        if self._add_bos and self.bos_id is None:
            raise TokenizerError(
                f"{path or 'the tokenizer'}: {self._add_bos_source} asks for a {BOS} token at the start of every "
                f"prompt, but the vocabulary has no {BOS}; add it to tokenizer.json or set add_bos_token to false "
                f"in {TOKENIZER_CONFIG}"
            )

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` (a file, or a folder holding one) and any chat template beside it."""
        file = _tokenizer_file(path)
        try:
            inner = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON or unknown components
            raise TokenizerError(
                f"{file} is not a valid tokenizer.json ({e}); replace it with a file saved by the tokenizers "
                "library or retrain it with `dgemma data prepare`"
            ) from e
        config = _read_tokenizer_config(file.parent)
        add_bos = _add_bos_token(config, file.parent / TOKENIZER_CONFIG)
        return cls(inner, _read_chat_template(file.parent, config), file, add_bos=add_bos)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json (and chat_template.jinja if this tokenizer has one, and tokenizer_config.json's
        add_bos_token if it was set there) atomically; returns the file.

        `path` ending in `.json` names the file; anything else is a folder that receives `tokenizer.json`.
        """
        p = Path(path).expanduser()
        file = p if p.suffix == ".json" else p / "tokenizer.json"
        write_text_atomic(file, self.inner.to_str(pretty=True))
        if self.chat_template is not None:
            write_text_atomic(file.parent / "chat_template.jinja", self.chat_template)
        # An explicit add_bos_token lives only in tokenizer_config.json: write it there, so the saved folder loads
        # with the same add_bos_default; and drop a different one already in the target folder.
        config = _read_tokenizer_config(file.parent)
        before = dict(config)
        if not self._add_bos_from_files:
            config["add_bos_token"] = self._add_bos
        elif config.get("add_bos_token", self._add_bos) != self._add_bos:
            del config["add_bos_token"]
        if config != before:
            write_json_atomic(file.parent / TOKENIZER_CONFIG, config, ensure_ascii=False)
        return file

    # --- beginning of sequence --------------------------------------------------------------------------------

    @property
    def add_bos_default(self) -> bool:
        """Whether a plain (non-chat) prompt should start with `<bos>`, as the tokenizer's files say (the Hugging
        Face convention), decided once at load:

        1. `add_bos_token` in tokenizer_config.json beside tokenizer.json, when present;
        2. else tokenizer.json's post-processor: a TemplateProcessing whose template starts with `<bos>` means
           yes, any other post-processor means no;
        3. else the model family's default: Gemma prepends `<bos>` (when the vocabulary has one).

        Use it as `tok.encode(text, add_bos=tok.add_bos_default)`. `add_bos_source` says which rule decided."""
        return self._add_bos

    @property
    def add_bos_source(self) -> str:
        """Which rule decided `add_bos_default`: BOS_FROM_CONFIG, BOS_FROM_POST_PROCESSOR or BOS_FROM_FAMILY."""
        return self._add_bos_source

    # --- vocabulary --------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding needs at least this many rows)."""
        return self.inner.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(token_id)

    @property
    def pad_id(self) -> int | None:
        return self.inner.token_to_id(PAD)

    @property
    def eos_id(self) -> int | None:
        return self.inner.token_to_id(EOS)

    @property
    def bos_id(self) -> int | None:
        return self.inner.token_to_id(BOS)

    @property
    def unk_id(self) -> int | None:
        return self.inner.token_to_id(UNK)

    @property
    def mask_id(self) -> int | None:
        return self.inner.token_to_id(MASK)

    @property
    def start_of_turn_id(self) -> int | None:
        return self.inner.token_to_id(START_OF_TURN)

    @property
    def end_of_turn_id(self) -> int | None:
        return self.inner.token_to_id(END_OF_TURN)

    def stop_ids(self) -> list[int]:
        """Ids that end a generation: eos, and end_of_turn when the vocabulary has it."""
        return [i for i in (self.eos_id, self.end_of_turn_id) if i is not None]

    # --- encode / decode ---------------------------------------------------------------------------------------

    def _encoder(self, parse_special: bool) -> tokenizers.Tokenizer:
        if parse_special:
            return self.inner
        if self._raw is None:
            # A separate instance, so the flag never flips under a concurrent caller of `self.inner`.
            self._raw = tokenizers.Tokenizer.from_str(self.inner.to_str())
            self._raw.encode_special_tokens = True
        return self._raw

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. The tokenizer's own post-processor is not applied; `add_bos` prepends bos.

        With `parse_special` (the default, needed for chat prompts) a literal "<eos>" in the text becomes the
        eos id; with `parse_special=False` it is encoded as ordinary text, so any string round-trips.
        """
        ids = self._encoder(parse_special).encode(text, add_special_tokens=False).ids
        return self._with_bos(ids) if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, parse_special: bool = True) -> list[list[int]]:
        """`encode` over many texts at once (parallel in the Rust library)."""
        encoder = self._encoder(parse_special)
        batch = getattr(encoder, "encode_batch_fast", encoder.encode_batch)  # _fast skips offsets (tokenizers>=0.21)
        encodings = batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids) if add_bos else e.ids for e in encodings]

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            raise TokenizerError(f"add_bos=True but the tokenizer {self.path or ''} has no {BOS} token")
        return [self.bos_id, *ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD (use StreamDecoder when streaming)."""
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat --------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt string for a conversation; encode it with `encode(prompt)` (bos is already in the text).

        Uses the folder's jinja template when one was shipped, else Gemma's format:
        `<bos><start_of_turn>user\\n{system}\\n\\n{content}<end_of_turn>\\n<start_of_turn>model\\n`.
        Extra keyword arguments are passed to a jinja template (ignored by the built-in one).
        """
        if self.chat_template is not None:
            return self._render_jinja(messages, add_generation_prompt, kwargs)
        return self._render_gemma(messages, add_generation_prompt)

    def _render_gemma(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        if self.start_of_turn_id is None or self.end_of_turn_id is None:
            raise TokenizerError(
                f"tokenizer {self.path or ''} has no {START_OF_TURN}/{END_OF_TURN} tokens and no chat template; "
                "put a chat_template.jinja beside tokenizer.json or use a tokenizer trained by dgemma"
            )
        messages = list(messages)
        system = ""
        if messages and messages[0].get("role") == "system":
            system = _message_text(messages[0], 0) + "\n\n"  # Gemma folds the system prompt into the first user turn
            messages = messages[1:]
        parts = [BOS] if self.bos_id is not None else []
        for i, message in enumerate(messages):
            role = message.get("role")
            allowed = ("user",) if i % 2 == 0 else ("assistant", "model")
            if role not in allowed:
                raise TokenizerError(
                    f"message {i} has role {role!r}; Gemma conversations are an optional system message, then "
                    "user and assistant (or model) turns alternating, starting with user"
                )
            text = _message_text(message, i)
            if i == 0:
                text = system + text
            parts.append(f"{START_OF_TURN}{'user' if role == 'user' else 'model'}\n{text}{END_OF_TURN}\n")
        if add_generation_prompt:
            parts.append(f"{START_OF_TURN}model\n")
        return "".join(parts)

    def _render_jinja(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, extra: Mapping[str, Any]
    ) -> str:
        import jinja2  # lazily: only folders that ship a template need it
        import jinja2.ext
        import jinja2.sandbox

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template refused the messages: {message}")

        def tojson(value: Any, indent: int | None = None) -> str:  # HF's variant: no HTML escaping
            return json.dumps(value, ensure_ascii=False, indent=indent)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template or "")
            special = {  # as transformers passes them: the token strings, None when absent
                f"{name}_token": token if self.token_to_id(token) is not None else None
                for name, token in (("bos", BOS), ("eos", EOS), ("pad", PAD), ("unk", UNK), ("mask", MASK))
            }
            return template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **special,
                **extra,
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template of {self.path or 'this tokenizer'} failed to render: {e}") from e


def _message_text(message: Mapping[str, Any], index: int) -> str:
    """A message's text, trimmed as Gemma's template does; `content` is a string or a list of text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content).strip()
    raise TokenizerError(
        f"message {index}: content must be a string or a list of {{'type': 'text', 'text': ...}} parts "
        f"(got {type(content).__name__}); this template supports text only"
    )


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back any incomplete UTF-8 character.

    Byte-level BPE splits a multi-byte character across tokens, so the text of one token alone may be half an
    emoji. Each `push` decodes a small window (the ids since the last emitted piece, plus the piece before them,
    so that decoders that strip a leading space see the same context) and emits the new text only once it no
    longer ends in U+FFFD. The pieces joined with `flush()` equal `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this index have been emitted

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; returns the newly completed text ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        emitted = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        if len(text) > len(emitted) and not text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(emitted) :]
        return ""

    def flush(self) -> str:
        """The text still held back (a truly invalid tail decodes to U+FFFD); the decoder is then reset."""
        emitted = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(emitted) :]


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike[str]) -> Tokenizer:
    """Train a byte-level BPE on `texts` and save it atomically to `path` (a .json file, or a folder).

    Ids 0..6 are `<pad> <eos> <bos> <unk> <mask> <start_of_turn> <end_of_turn>`, then the 256 byte symbols, then
    merges. No normaliser and no prefix space: `decode(encode(s, parse_special=False)) == s` for every string.
    The vocabulary can come out smaller than `vocab_size` when the texts have too few distinct merges.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB_SIZE}"
        )
    inner = tokenizers.Tokenizer(tokenizers.models.BPE())
    inner.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    inner.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):  # a tokenizers upgrade must not silently move them
        if inner.token_to_id(token) != expected_id:
            raise TokenizerError(f"BPE training put {token} at id {inner.token_to_id(token)}, expected {expected_id}")
    tokenizer = Tokenizer(inner)
    tokenizer.path = tokenizer.save(path)
    return tokenizer
