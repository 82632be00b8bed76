"""Shared by the benchmarks: the peak bytes that autograd keeps for the backward pass."""

from __future__ import annotations

import weakref

import torch

__all__ = ["SavedBytes"]


class SavedBytes:
    """Peak bytes of live autograd-saved storages, problem data excluded (see docstring)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.count: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    class _Box:
        __slots__ = ("__weakref__", "t")

        def __init__(self, t):
            self.t = t

    def _pack(self, t: torch.Tensor):
        box = SavedBytes._Box(t)
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.exclude:
            return box
        if self.count.get(ptr, 0) == 0:
            self.size[ptr] = st.nbytes()
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        self.count[ptr] = self.count.get(ptr, 0) + 1
        weakref.finalize(box, self._release, ptr)
        return box

    def _release(self, ptr: int) -> None:
        self.count[ptr] -= 1
        if self.count[ptr] == 0:
            self.live -= self.size.pop(ptr)

    @staticmethod
    def _unpack(box):
        return box.t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)
