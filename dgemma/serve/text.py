"""Committed token ids -> text a client may see: stop strings and incomplete characters are held back.

    text = TextStream(tokenizer, stops=["\\n\\n"])
    for ids in committed_chunks:
        send(text.push(ids))        # "" while a stop string or a multi-byte character may still be forming
        if text.stopped:
            break                   # the text was cut before the stop string: abort the request
    send(text.finish())             # whatever was held back, once the request is over

Nothing returned is ever taken back: a suffix of the text that could still grow into a stop string (a prefix of
one) waits until the next ids settle it, and a character split across tokens waits in `StreamDecoder`. Torch-free,
used by the HTTP server (dgemma/serve/app.py).

`TokenStream` follows the same ids with their log-probabilities and releases, for each piece of text sent, the
tokens that make it up: a token's `text` is the characters it completed (so a token ending inside a multi-byte
character has "" and the token completing it has the whole character), and the texts of the released tokens always
join to exactly the text sent. When a stop string begins inside a token, that token is released with its text cut
where the sent text ends (its log-probability is still the whole token's); the tokens after it are never reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from dgemma.tokenizer import StreamDecoder


class TextStream:
    """One request's text: `push` committed ids, get the newly safe text; `stopped` once a stop string appears."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._decoder = StreamDecoder(tokenizer)
        self._text = ""  # complete characters decoded so far
        self._sent = 0  # characters of _text already returned
        self._checked = 0  # _text[:_checked] holds no stop string
        self._ends: list[int] = []  # len(_text) after each id
        self.stopped = False
        self.tokens = 0  # ids consumed; once stopped, the ids up to the one that completed the stop string

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return self._text[: self._sent]

    def push(self, ids: Iterable[int]) -> str:
        """Add committed ids; returns the text that became safe to show ("" if none)."""
        if self.stopped:
            return ""
        for i in ids:
            self._text += self._decoder.push(i)
            self._ends.append(len(self._text))
        self.tokens = len(self._ends)
        return self._release(final=False)

    def finish(self) -> str:
        """The request is over: returns the held-back text (cut at a stop string if one completes there)."""
        if not self.stopped:
            self._text += self._decoder.flush()  # an invalid tail decodes to U+FFFD here
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self._text)
        hit = self._find_stop()
        if hit is not None and not final and (wait := self._earlier_partial(hit[0])) is not None:
            hit, end = None, wait  # a longer stop string may begin before this hit: hold back, search again
            self._checked = wait
        if hit is not None:
            at, stop = hit
            self.stopped = True
            covered = at + len(stop)  # ids needed to produce the text through the stop string
            self.tokens = next((k + 1 for k, e in enumerate(self._ends) if e >= covered), len(self._ends))
            end = at
        elif not final:
            end -= self._partial_stop()
        end = max(end, self._sent)  # never take text back (a stop cannot start in sent text; see the docstring)
        out = self._text[self._sent : end]
        self._sent = end
        return out

    def _find_stop(self) -> tuple[int, str] | None:
        """(index, stop) of the earliest stop string in the text not yet searched, or None."""
        if not self.stops:
            return None
        start = max(0, self._checked - self._longest + 1)  # a new match must end in the new text
        hits = [(i, s) for s in self.stops if (i := self._text.find(s, start)) >= 0]
        self._checked = len(self._text)
        return min(hits) if hits else None

    def _earlier_partial(self, before: int) -> int | None:
        """The earliest index before `before` where the text's tail is a proper prefix of a stop string, or None."""
        for k in range(min(self._longest - 1, len(self._text) - self._sent), 0, -1):
            at = len(self._text) - k
            if at < before and any(len(s) > k and s.startswith(self._text[at:]) for s in self.stops):
                return at
        return None

    def _partial_stop(self) -> int:
        """Length of the longest suffix of the unsent text that is a proper prefix of a stop string."""
        unsent = len(self._text) - self._sent
        for k in range(min(self._longest - 1, unsent), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


@dataclass
class Token:
    """One reported token: its share of the text, its id and log-probability (None for a prompt's first token)."""
    text: str
    token_id: int
    logprob: object = None  # params.TokenLogprob | None (params is not imported: this module stays tiny)
    start: int = 0  # character offset of `text` in the stream's text
    cut: bool = False  # a stop string began inside the token: `text` is only its part before the stop


class TokenStream:
    """Committed ids + their log-probabilities -> the Tokens covering the text sent so far (see the docstring)."""

    def __init__(self, tokenizer):
        self._decoder = StreamDecoder(tokenizer)
        self._tokens: list[Token] = []
        self._end = 0  # characters decoded so far
        self._next = 0  # tokens before this index were released
        self.done = False

    def push(self, ids: Sequence[int], logprobs: Sequence) -> None:
        """Add ids with one log-probability entry each (None where there is none)."""
        for i, lp in zip(ids, logprobs, strict=True):
            piece = self._decoder.push(i)
            self._tokens.append(Token(piece, int(i), lp, self._end))
            self._end += len(piece)

    def release(self, sent: int, final: bool = False) -> list[Token]:
        """The tokens not yet released whose text lies within the first `sent` characters. A token without text of
        its own (part of a character, or a special token) goes out with the next token that has some. `final`: no
        more text comes (the request ended, or a stop string cut it at `sent`): what is left is released, the token
        straddling `sent` cut, the ones past it dropped."""
        if self.done:
            return []
        if final:
            rest = self._decoder.flush()
            if rest and self._tokens:  # an invalid tail: U+FFFD, as the text got it
                self._tokens[-1].text += rest
                self._end += len(rest)
        out = []
        j = self._next
        while j < len(self._tokens):
            t = self._tokens[j]
            j += 1
            end = t.start + len(t.text)
            if t.text and end <= sent:
                out.extend(self._tokens[self._next:j])
                self._next = j
            elif final and (t.start < sent or (not t.text and t.start <= sent and self._end <= sent)):
                keep = max(0, sent - t.start)
                t.text, t.cut = t.text[:keep], keep < len(t.text)
                out.extend(self._tokens[self._next:j])
                self._next = j
            elif t.text:
                break
        if final:
            self.done = True
        return out


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte in a ByteLevel BPE vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The UTF-8 bytes one token stands for, also when they are part of a character (byte-level BPE symbols and
    SentencePiece byte-fallback `<0xNN>` pieces); otherwise its decoded text."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece = tokenizer.id_to_token(token_id) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    table = _byte_level_table()
    if piece and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return text.encode("utf-8")


def token_label(tokenizer, token_id: int) -> str:
    """A token's text for top-logprob lists; a part of a character is shown as OpenAI does, `bytes:\\xe2\\x82`."""
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
