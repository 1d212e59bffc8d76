"""Peak memory of the tensors a block of code allocates, on the CPU, where PyTorch keeps no allocator statistics.

    from dgemma.bench.memtrack import track_memory
    with track_memory() as m:
        logits = model.denoise(canvas, cache)
    print(m.peak_bytes, m.allocated_bytes, m.total_bytes)

How: a TorchDispatchMode sees every aten op run inside the block. Each output tensor's storage that the op did not
receive as an input (so a view or an in-place result of an existing tensor is not new) and that was not seen before
is a new allocation: its bytes are added to a live counter, and a `weakref.finalize` on the storage takes them off
when the storage is freed (PyTorch keeps a storage's Python object alive exactly as long as the storage). Storages
are keyed by their StorageImpl address, so views of one storage count once and a resized storage (an `out=`
argument) is re-measured.

What it does not see: tensors that existed before the block (by design: only new bytes count), growth of such a
tensor by `resize_` inside the block, scratch memory a kernel allocates and frees internally, and memory outside
tensors (Python objects, the allocator's own caching). It runs Python on every op, so time the code separately.
On CUDA the allocator's own `torch.cuda.max_memory_allocated` is the better measure (it sees everything).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class MemoryUsage:
    """Bytes of tensor storage allocated inside the block (tensors from before it are never counted)."""

    peak_bytes: int = 0  # the most bytes alive at once
    allocated_bytes: int = 0  # bytes alive now (frozen at the block's end: what the block left allocated)
    total_bytes: int = 0  # all bytes allocated, freed or not (allocation traffic)
    allocations: int = 0  # new storages seen


class _Tracker(TorchDispatchMode):
    def __init__(self, usage: MemoryUsage, device_type: str):
        super().__init__()
        self.usage = usage
        self.device_type = device_type
        self.live: dict[int, tuple[int, weakref.finalize]] = {}  # StorageImpl address -> (bytes, finalizer)

    def _storage(self, t) -> torch.UntypedStorage | None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {s._cdata for s in map(self._storage, tree_flatten((args, kwargs))[0]) if s is not None}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            s = self._storage(t)
            if s is None:
                continue
            key, nbytes = s._cdata, s.nbytes()
            if key in self.live:  # seen before: only a resize (out= argument) changes its size
                old, fin = self.live[key]
                if nbytes != old:
                    self.live[key] = (nbytes, fin)
                    self._add(nbytes - old)
            elif key not in inputs:  # new storage (an op's output that aliases an input is not)
                fin = weakref.finalize(s, self._free, key)
                fin.atexit = False
                self.live[key] = (nbytes, fin)
                self.usage.allocations += 1
                self._add(nbytes)
        return out

    def _add(self, nbytes: int) -> None:
        u = self.usage
        u.allocated_bytes += nbytes
        u.total_bytes += max(nbytes, 0)
        u.peak_bytes = max(u.peak_bytes, u.allocated_bytes)

    def _free(self, key: int) -> None:
        nbytes, _ = self.live.pop(key)
        self.usage.allocated_bytes -= nbytes

    def close(self) -> None:
        """Stop counting frees (the figures stay as they were at the block's end) and drop the finalizers."""
        for _, fin in self.live.values():
            fin.detach()
        self.live.clear()


@contextmanager
def track_memory(device: str | torch.device = "cpu") -> Iterator[MemoryUsage]:
    """Count the tensor storage on `device` (its type: "cpu", "cuda", ...) allocated inside the `with` block."""
    usage = MemoryUsage()
    tracker = _Tracker(usage, torch.device(device).type)
    try:
        with tracker:
            yield usage
    finally:
        tracker.close()
