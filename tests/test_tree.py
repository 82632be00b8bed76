"""The pytree arithmetic the solvers use: a single tensor (the fast path) and the same values
in a pytree give the same results; scalars as Python numbers and as 0-d tensors; gradients
flow; structure mismatches are refused."""

import pytest
import torch
from problems import DT, gen

from implicit_torch._tree import (
    tree_add,
    tree_add_scalar_mul,
    tree_detach,
    tree_l2_norm,
    tree_scalar_mul,
    tree_sub,
    tree_vdot,
    tree_where,
)


def pair(seed):
    a = torch.randn(7, generator=gen(seed), dtype=DT)
    b = torch.randn(7, generator=gen(seed + 1), dtype=DT)
    return a, b


def as_tree(x):
    return {"u": x[:3], "v": (x[3:5], x[5:])}


def flat(tree):
    return torch.cat([tree["u"], tree["v"][0], tree["v"][1]])


@pytest.mark.parametrize("s", [0.3, 2, torch.tensor(0.3, dtype=DT)])
def test_tensor_fast_path_matches_pytree_and_reference(s):
    a, b = pair(0)
    ref = a + float(s) * b
    torch.testing.assert_close(tree_add_scalar_mul(a, s, b), ref, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(
        flat(tree_add_scalar_mul(as_tree(a), s, as_tree(b))), ref, rtol=1e-15, atol=1e-15
    )
    torch.testing.assert_close(tree_scalar_mul(s, a), float(s) * a)
    torch.testing.assert_close(flat(tree_scalar_mul(s, as_tree(a))), float(s) * a)


def test_reductions_and_elementwise():
    a, b = pair(2)
    for x, y in ((a, b), (as_tree(a), as_tree(b))):
        torch.testing.assert_close(tree_vdot(x, y), a @ b)
        torch.testing.assert_close(tree_l2_norm(x), a.norm())
        torch.testing.assert_close(tree_l2_norm(x, squared=True), a @ a)
    torch.testing.assert_close(tree_sub(a, b), a - b)
    torch.testing.assert_close(flat(tree_add(as_tree(a), as_tree(b))), a + b)
    cond = torch.tensor(False)
    torch.testing.assert_close(tree_where(cond, a, b), b)
    assert tree_l2_norm(a).dim() == 0 and tree_vdot(a, b).dim() == 0


def test_gradients_flow_through_the_fast_paths():
    a, b = (t.requires_grad_() for t in pair(4))
    s = torch.tensor(0.7, dtype=DT, requires_grad=True)
    out = tree_l2_norm(tree_add_scalar_mul(a, s, b)) + tree_vdot(a, b)
    out.backward()
    with torch.no_grad():
        r = a + s * b
        torch.testing.assert_close(a.grad, r / r.norm() + b)
        torch.testing.assert_close(s.grad, (r / r.norm()) @ b)
    assert not tree_detach(a).requires_grad


def test_structure_mismatch_is_refused():
    a, b = pair(6)
    with pytest.raises(ValueError, match="structures differ"):
        tree_sub(as_tree(a), (a, b))
