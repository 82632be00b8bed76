"""The layers' forward warm start: the previous solution, kept in buffers, as the next guess.

In training, consecutive forward passes solve nearby problems (the parameters move a little,
the inputs are often similar), so the last solution is a good initial guess for the next
solve. :class:`ForwardWarmStart` is the one place that keeps it, for every layer of
:mod:`implicit_torch.nn` (:class:`~implicit_torch.nn.ImplicitLayer` and its subclasses, the
DEQ among them). The backward solve has its own warm start, the linear solvers'
:class:`~implicit_torch.WarmStart` (the previous adjoint), which the layers build for
``warm_start=True``.

Where the state lives: each tensor leaf of the stored solution is a **non-persistent
registered buffer** (``solution_0``, ``solution_1``, ... in leaf order), so

* ``.to(...)``, ``.cuda()``, ``.double()`` move and cast it with the module;
* ``state_dict()`` does not contain it: a checkpoint is the same with or without warm starts,
  and loads into a layer whatever that layer has stored;
* ``named_buffers()`` shows it (under the layer's ``warm_start_state`` child).

The pytree structure of the solution and the counter :attr:`~ForwardWarmStart.count` are
plain attributes (structure and diagnostics, not tensor state). Nothing is stored or recalled
inside ``torch.func`` transforms or in code that ``torch.compile`` compiles (a stored tensor
would escape the transform or the graph): there every solve starts cold.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from implicit_torch import _runtime
from implicit_torch._tree import TreeSpec, tree_flatten, tree_unflatten

__all__ = ["ForwardWarmStart"]

_PREFIX = "solution_"


def _layout(tree: Any) -> tuple[TreeSpec, list[tuple]]:
    """The pytree structure and, leafwise, shape, dtype and device: what a guess must share
    with a solution to stand in for it."""
    leaves, spec = tree_flatten(tree)
    return spec, [(t.shape, t.dtype, t.device) for t in leaves]


def _can_keep_state() -> bool:
    return not (_runtime.under_functorch() or torch.compiler.is_compiling())


class ForwardWarmStart(nn.Module):
    """The last forward solution of a layer, offered as the next forward's initial guess.

    A layer calls :meth:`recall` before its forward solve and :meth:`remember` after it.
    Disabled (``enabled=False``), both do nothing, so a layer calls them unconditionally.

    Args:
        enabled: whether to keep and offer solutions.

    Attributes:
        enabled: as given.
        count: forward solves that started from a stored solution that fitted (a diagnostic;
            :meth:`reset` leaves it alone).
    """

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self.count = 0
        # The solution's structure, as the same containers holding 0s: plain Python objects
        # that deepcopy and pickle handle (a torch TreeSpec warns when copied).
        self._structure: Any = None

    def recall(self, like: Any = None) -> Any:
        """The stored solution (a pytree of buffers), or ``None``.

        Args:
            like: when given, the solution is offered only if it has ``like``'s pytree
                structure and leafwise shapes, dtypes and devices (e.g. the cold start a
                layer would otherwise use), and ``None`` is returned otherwise.
        """
        if not self.enabled or self._structure is None or not _can_keep_state():
            return None
        names = sorted((n for n in self._buffers if n.startswith(_PREFIX)), key=_index)
        spec = tree_flatten(self._structure)[1]
        guess = tree_unflatten([self._buffers[n] for n in names], spec)
        if like is not None and _layout(guess) != _layout(like):
            return None
        return guess

    def remember(self, solution: Any, guess: Any = None) -> None:
        """Store ``solution`` (detached copies of its leaves) for the next :meth:`recall`.

        Args:
            solution: the forward solution, a tensor or pytree of tensors.
            guess: what :meth:`recall` returned for this solve; it counts as a warm start
                (``count += 1``) if the solution has its layout, i.e. the solver could use it.
        """
        if not self.enabled or not _can_keep_state():
            return
        if guess is not None and _layout(guess) == _layout(solution):
            self.count += 1
        leaves, spec = tree_flatten(solution)
        # A failed solve's NaN or Inf would poison every later solve started from it. (The
        # check reads values on the host; recall/remember are skipped where that cannot be.)
        if not all(bool(torch.isfinite(t).all()) for t in leaves):
            self.reset()
            return
        self._drop_buffers(keep=len(leaves))
        for i, leaf in enumerate(leaves):
            # A copy: the caller may edit the returned solution in place.
            self.register_buffer(f"{_PREFIX}{i}", leaf.detach().clone(), persistent=False)
        self._structure = tree_unflatten([0] * len(leaves), spec)

    def reset(self) -> None:
        """Forget the stored solution: the next solve starts cold."""
        self._drop_buffers(keep=0)
        self._structure = None

    def _drop_buffers(self, keep: int) -> None:
        for name in [n for n in self._buffers if n.startswith(_PREFIX)]:
            if _index(name) >= keep:
                delattr(self, name)

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}"


def _index(name: str) -> int:
    return int(name[len(_PREFIX) :])
