"""The encoder's KV cache: a plain object passed explicitly to `encode` (which writes it) and `denoise` (which reads it).

Per layer the cache keeps keys after k_norm + RoPE and values after v_norm, `[B, nkv, L_kept, d]`.
Full-attention layers keep every encoded position; sliding layers keep the last `W - 1` (spec A3.1), which is
also what the decoder's sliding layers see. Unlike the reference's static cache (spec A3.3) this stays correct
when the context is longer than the window: trimming happens after the new keys were attended to.

`valid` is the `[B, L]` padding mask of every position ever encoded (False = left padding). Positions are shared
by all rows: position p is the p-th token encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dgemma.config import ModelConfig


@dataclass
class KVCache:
    window: list[int | None]  # per layer: number of positions a sliding layer keeps (W - 1), None for full layers
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    valid: torch.Tensor | None = None  # [B, L] bool
    length: int = 0  # L: positions encoded so far

    @classmethod
    def empty(cls, config: ModelConfig, keep_all: bool = False) -> KVCache:
        """A fresh cache. `keep_all` keeps every position in sliding layers too (training: the clean prefix)."""
        window = [None if (keep_all or not config.is_sliding(i)) else config.sliding_window - 1
                  for i in range(config.num_hidden_layers)]
        n = config.num_hidden_layers
        return cls(window=window, keys=[None] * n, values=[None] * n)

    @property
    def batch_size(self) -> int:
        return 0 if self.valid is None else self.valid.shape[0]

    def start(self, layer: int) -> int:
        """Absolute position of the first key kept for `layer`."""
        w = self.window[layer]
        return 0 if w is None else max(0, self.length - w)

    def extend_valid(self, new_valid: torch.Tensor) -> None:
        """Record the padding mask of the `T` positions about to be encoded (`[B, T]` bool)."""
        self.valid = new_valid if self.valid is None else torch.cat([self.valid, new_valid], dim=1)

    def layer(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer], self.values[layer]

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep `keys/values` (all kept + new positions, `[B, nkv, S, d]`), trimmed to the layer's window."""
        w = self.window[layer]
        if w is not None and keys.shape[2] > w:
            keys, values = keys[:, :, keys.shape[2] - w:], values[:, :, values.shape[2] - w:]
        self.keys[layer], self.values[layer] = keys, values

    def advance(self, n: int) -> None:
        self.length += n

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A cache holding only `rows` (a 1-D index tensor); used to drop finished rows from a batch."""
        pick = (lambda t: None if t is None else t.index_select(0, rows))
        return KVCache(window=list(self.window), keys=[pick(k) for k in self.keys],
                       values=[pick(v) for v in self.values], valid=pick(self.valid), length=self.length)

    def clone(self) -> KVCache:
        cp = (lambda t: None if t is None else t.clone())
        return KVCache(window=list(self.window), keys=[cp(k) for k in self.keys], values=[cp(v) for v in self.values],
                       valid=cp(self.valid), length=self.length)
