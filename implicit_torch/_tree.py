"""Pytree helpers on torch's pytree module (private in torch 2.13, so it is reached through
:mod:`implicit_torch._runtime`, the one module that touches private APIs).

Solutions, parameters, right-hand sides and residuals may be tensors or nested tuples, lists
and dicts of tensors. The linear solvers work on one flat ``(B, N)`` tensor per system (``B``
independent problems of ``N`` unknowns each; ``B = 1`` for an unbatched problem), so this
module also provides :class:`Raveler`, which turns a pytree into that matrix and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from implicit_torch._runtime import pytree

TreeSpec = pytree.TreeSpec

tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves


def tree_map2(fn: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
    """``fn`` applied leafwise to two pytrees of the same structure."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return fn(a, b)  # the usual case, without the cost of flattening (solver loops)
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        raise ValueError(f"pytree structures differ: {spec_a} vs {spec_b}")
    return tree_unflatten([fn(x, y) for x, y in zip(leaves_a, leaves_b)], spec_a)


def tree_sub(a: Any, b: Any) -> Any:
    """Leafwise ``a - b``."""
    return tree_map2(torch.sub, a, b)


def tree_like(tree: Any, template: Any) -> Any:
    """``tree`` with the keys of its dicts in ``template``'s order (recursively), so that the
    two flatten leaf by leaf in the same order; dicts whose key sets differ are left as they
    are (their specs then differ, which callers report)."""
    if isinstance(tree, dict) and isinstance(template, dict) and set(tree) == set(template):
        return {k: tree_like(tree[k], template[k]) for k in template}
    if isinstance(tree, (tuple, list)) and isinstance(template, (tuple, list)):
        if len(tree) == len(template) and type(tree) is type(template):
            return type(tree)(tree_like(a, b) for a, b in zip(tree, template))
    return tree


def describe(tree: Any) -> str:
    """A short human description of a pytree's leaves, for error messages."""
    leaves, spec = tree_flatten(tree)
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves]
    if spec.num_leaves == 1 and spec.is_leaf():
        return f"tensor of shape {shapes[0]}" if isinstance(leaves[0], torch.Tensor) else shapes[0]
    return f"pytree {spec} with leaf shapes {shapes}"


class Raveler:
    """Maps a pytree of tensors to a ``(B, N)`` matrix and back.

    Unbatched: every leaf is flattened and concatenated into one row, ``B = 1``.
    Batched: dim 0 of every leaf indexes ``B`` independent problems; each leaf is reshaped to
    ``(B, -1)`` and the pieces are concatenated along dim 1.

    The flat dtype is the promotion of the leaves' (floating) dtypes; :meth:`unravel` casts each
    piece back to its leaf's dtype.
    """

    def __init__(self, example: Any, batched: bool, what: str = "the solution"):
        leaves, self.spec = tree_flatten(example)
        if not leaves:
            raise ValueError(f"{what} has no tensor leaves")
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"{what} must be a tensor or a pytree of tensors, found a leaf "
                    f"of type {type(leaf).__name__}"
                )
            if not leaf.is_floating_point():
                raise TypeError(
                    f"{what} must have floating-point leaves, found dtype {leaf.dtype} "
                    f"({describe(example)})"
                )
        devices = {leaf.device for leaf in leaves}
        if len(devices) > 1:
            raise ValueError(f"{what} has leaves on different devices: {sorted(map(str, devices))}")
        self.batched = batched
        self.shapes = [leaf.shape for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.dtype = _promote(self.dtypes)
        self.device = leaves[0].device
        if batched:
            sizes = {leaf.shape[0] if leaf.dim() else None for leaf in leaves}
            if None in sizes or len(sizes) != 1:
                raise ValueError(
                    f"batched=True needs every leaf of {what} to have the same "
                    f"leading (batch) dimension, got {describe(example)}"
                )
            self.batch_size = sizes.pop()
            self.sizes = [math.prod(s[1:]) for s in self.shapes]
        else:
            self.batch_size = 1
            self.sizes = [math.prod(s) for s in self.shapes]
        self.size = sum(self.sizes)
        # A single tensor (the usual case) takes a fast path: reshapes only.
        self.single = self.spec.is_leaf()
        self.flat_shape = (self.batch_size, self.size)

    def check(self, tree: Any, what: str) -> list[torch.Tensor]:
        """Leaves of ``tree``, after checking they have this raveler's structure and shapes."""
        leaves, spec = tree_flatten(tree)
        if spec != self.spec or any(
            not isinstance(x, torch.Tensor) or x.shape != s for x, s in zip(leaves, self.shapes)
        ):
            expected = [tuple(s) for s in self.shapes]
            raise ValueError(
                f"{what} must have the structure and shapes of the solution "
                f"({self.spec}, leaf shapes {expected}); got {describe(tree)}"
            )
        return leaves

    def ravel(self, tree: Any, what: str = "a pytree") -> torch.Tensor:
        """The ``(B, N)`` matrix holding ``tree``'s leaves."""
        if self.single and isinstance(tree, torch.Tensor) and tree.shape == self.shapes[0]:
            flat = tree.reshape(self.flat_shape)
            return flat if flat.dtype == self.dtype else flat.to(self.dtype)
        leaves = self.check(tree, what)
        return self.ravel_leaves(leaves)

    def ravel_leaves(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        B = self.batch_size
        pieces = [leaf.reshape(B, n).to(self.dtype) for leaf, n in zip(leaves, self.sizes)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def unravel_leaves(self, flat: torch.Tensor) -> list[torch.Tensor]:
        pieces = [flat] if len(self.sizes) == 1 else torch.split(flat, self.sizes, dim=1)
        return [p.reshape(s).to(d) for p, s, d in zip(pieces, self.shapes, self.dtypes)]

    def unravel(self, flat: torch.Tensor) -> Any:
        """The pytree whose leaves are held in the ``(B, N)`` matrix ``flat``."""
        if self.single:
            out = flat.reshape(self.shapes[0])
            return out if out.dtype == self.dtypes[0] else out.to(self.dtypes[0])
        return tree_unflatten(self.unravel_leaves(flat), self.spec)


def _promote(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


# -- arithmetic on pytrees of tensors (used by the solvers) ------------------------------------


def tree_add(a: Any, b: Any) -> Any:
    """Leafwise ``a + b``."""
    return tree_map2(torch.add, a, b)


def tree_scalar_mul(s: Any, a: Any) -> Any:
    """Leafwise ``s · a`` for a scalar (number or 0-d tensor) ``s``."""
    if isinstance(a, torch.Tensor):
        return s * a
    return tree_map(lambda x: s * x, a)


def _axpy(x: torch.Tensor, s: Any, y: torch.Tensor) -> torch.Tensor:
    # One fused operation instead of two: add with alpha for a Python number (a fixed step
    # size), addcmul for a tensor (a step or momentum coefficient held in the state).
    if isinstance(s, torch.Tensor):
        return torch.addcmul(x, s, y)
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return torch.add(x, y, alpha=s)
    return x + s * y


def tree_add_scalar_mul(a: Any, s: Any, b: Any) -> Any:
    """Leafwise ``a + s · b`` for a scalar (number or 0-d tensor) ``s``."""
    return tree_map2(lambda x, y: _axpy(x, s, y), a, b)


def tree_vdot(a: Any, b: Any) -> torch.Tensor:
    """``Σ_leaves ⟨a, b⟩``: the inner product of two pytrees as one 0-d tensor."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.vdot(a.reshape(-1), b.reshape(-1))
    products = [torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(*_leaves2(a, b))]
    return _sum(products)


def tree_l2_norm(a: Any, squared: bool = False) -> torch.Tensor:
    """``‖a‖₂`` over all leaves (``‖a‖₂²`` when ``squared``), a 0-d tensor."""
    leaves = [a] if isinstance(a, torch.Tensor) else tree_leaves(a)
    sq = _sum([(x * x).sum() for x in leaves])
    return sq if squared else torch.sqrt(sq)


def _sum(terms: list[torch.Tensor]) -> torch.Tensor:
    # Python's sum() starts from the integer 0: one more (scalar-wrapping) operation.
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def tree_zeros_like(a: Any) -> Any:
    """A pytree of zeros shaped like ``a``."""
    return tree_map(torch.zeros_like, a)


def tree_where(cond: torch.Tensor, a: Any, b: Any) -> Any:
    """Leafwise ``torch.where(cond, a, b)`` for a (0-d, or broadcastable) boolean ``cond``."""
    return tree_map2(lambda x, y: torch.where(cond, x, y), a, b)


def tree_detach(a: Any) -> Any:
    """``a`` with every tensor leaf detached (other leaves unchanged)."""
    if isinstance(a, torch.Tensor):
        return a.detach()
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, a)


def _leaves2(a: Any, b: Any) -> tuple[list, list]:
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        raise ValueError(f"pytree structures differ: {spec_a} vs {spec_b}")
    return leaves_a, leaves_b
