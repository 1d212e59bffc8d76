"""Committed token ids -> text a client may see: stop strings and incomplete characters are held back.

    text = TextStream(tokenizer, stops=["\\n\\n"])
    for ids in committed_chunks:
        send(text.push(ids))        # "" while a stop string or a multi-byte character may still be forming
        if text.stopped:
            break                   # the text was cut before the stop string: abort the request
    send(text.finish())             # whatever was held back, once the request is over

Nothing returned is ever taken back: a suffix of the text that could still grow into a stop string (a prefix of
one) waits until the next ids settle it, and a character split across tokens waits in `StreamDecoder`. Torch-free,
used by the HTTP server (dgemma/server_app.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .tokenizer import StreamDecoder


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

    def _partial_stop(self) -> int:
        """Length of the longest suffix of the unsent text that is a proper prefix of a stop string."""
        unsent = len(self._text) - self._sent
        for k in range(min(self._longest - 1, unsent), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
