"""Peak bytes of the tensors that torch operations allocate inside a block, on any device (CPU included).

CUDA has an allocator that counts (``torch.cuda.max_memory_allocated``); the CPU has none that a benchmark can read.
``LivePeak`` counts at the level of tensors instead: a ``TorchDispatchMode`` sees every operation run inside the
``with`` block (the autograd engine's backward included, which runs CPU work on the calling thread), adds the size
of each *new* storage an operation returns, and subtracts it when the storage is freed (a ``weakref.finalize`` on
the storage). Storages that existed before the block, and views of them, are never counted.

What it does not see: memory that is not a torch storage (a Triton interpreter's numpy copies, a library's own
buffers), the caching allocator's rounding, and storages created without an operation (``torch.Tensor`` built from
Python data). For the question the benchmarks ask, how many tokens x width tensors a layer's forward and backward
keep alive at once, that is the right count, and it is the same on every device.

    with LivePeak() as peak:
        layer(x).backward(dy)
    peak.bytes  # the largest sum of live new storages during the block
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LivePeak(TorchDispatchMode):
    """Peak of the live bytes of storages created inside the block (``bytes``; ``current`` while it runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.bytes = 0
        self._live: dict[int, int] = {}  # storage address -> bytes, for the storages this block created
        self._known: set[int] = set()  # storages seen as inputs that the block did not create

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live or key in self._known:
            return
        self._live[key] = size
        self.current += size
        self.bytes = max(self.bytes, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size = self._live.pop(key, None)
        if size is not None:
            self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        for tensor in inputs:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self._live and key not in self._known:
                self._known.add(key)  # forgotten when freed: its address may come back as a new storage
                weakref.finalize(storage, self._known.discard, key)
        out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return out
