"""Bad inputs to every public entry point (issue 13): each case asserts a clear error — the
right exception type, and a message naming what is wrong — or, where the input is legal, the
right result. A raw error from deep inside torch (``max(): Expected reduction dim``,
``iteration over a 0-d tensor``) or a silent wrong result is a defect.

Areas: the engine (``custom_root``, ``custom_fixed_point``, ``implicit_solve``, ``root_vjp``,
``root_jvp``), the linear solvers ``solve_*``, the layers' constructors (validation at
``__init__``), the projection layers' forward, and ``it.ops.batched_cg``.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from torch import nn

import implicit_torch as it

DT = torch.float64
META = "meta"
SOLVER_NAMES = ["cg", "normal_cg", "gmres", "bicgstab", "lu", "cholesky", "auto", "neumann"]


def F(w, a):
    """``F(w, a) = 2w − a``: root ``a / 2``, ``∂w*/∂a = I / 2``."""
    return 2 * w - a


def half(init, a):
    return a / 2


def a_(n=3):
    return torch.arange(1.0, n + 1, dtype=DT).requires_grad_()


# ------------------------------------------------------------------------------------------
# The engine: solve names and callables
# ------------------------------------------------------------------------------------------


def test_unknown_solve_name_at_the_call_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown solve='foo'.*'cg'"):
        it.implicit_solve(half, F, None, a_(), solve="foo")


@pytest.mark.parametrize("decorator", [it.custom_root, it.custom_fixed_point])
def test_unknown_solve_name_is_rejected_at_decoration(decorator):
    # root_tol and on_failure are validated when the decorator is built; the solve name must
    # be too, not only at the first call (possibly deep inside a training loop).
    with pytest.raises(ValueError, match="unknown solve"):
        decorator(F, solve="foo")


@pytest.mark.parametrize("decorator", [it.custom_root, it.custom_fixed_point])
def test_non_callable_solve_is_rejected_at_decoration(decorator):
    with pytest.raises(TypeError, match="solve must be a name or a callable"):
        decorator(F, solve=3)


def test_non_callable_solve_at_the_call():
    with pytest.raises(TypeError, match="solve must be a name or a callable"):
        it.implicit_solve(half, F, None, a_(), solve=3.0)


@pytest.mark.parametrize("entry", ["root_vjp", "root_jvp"])
def test_unknown_solve_name_in_root_vjp_and_jvp(entry):
    a = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="unknown solve"):
        if entry == "root_vjp":
            it.root_vjp(F, a / 2, (a,), torch.ones(3, dtype=DT), solve="nope")
        else:
            it.root_jvp(F, a / 2, (a,), (torch.ones(3, dtype=DT),), solve="nope")


@pytest.mark.parametrize(
    "kw, error",
    [({"root_tol": -1.0}, ValueError), ({"root_tol": float("inf")}, ValueError),
     ({"on_failure": "never"}, ValueError), ({"root_tol": [1e-3]}, TypeError)],
)  # fmt: skip
def test_bad_options_are_rejected_by_implicit_solve_before_the_solver_runs(kw, error):
    ran = []

    def solver(init, a):
        ran.append(True)
        return a / 2

    with pytest.raises(error):
        it.implicit_solve(solver, F, None, a_(), **kw)
    assert not ran, "the options must be checked before the (possibly long) forward solve"


# ------------------------------------------------------------------------------------------
# The engine: what the solver and the optimality function return
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda w, a: F(w, a)[:2], "optimality_fn"),
        (lambda w, a: (F(w, a),), "optimality_fn"),
        (lambda w, a: {"r": F(w, a)}, "optimality_fn"),
        (lambda w, a: None, "optimality_fn"),
        (lambda w, a: F(w, a).reshape(3, 1), "optimality_fn"),
    ],
    ids=["short", "tuple", "dict", "none", "reshaped"],
)
def test_optimality_fn_of_the_wrong_structure_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        it.implicit_solve(half, bad, None, a_())


def test_optimality_fn_with_an_integer_residual_is_rejected_at_the_call():
    # An integer residual has no derivative: the backward would fail later with torch's
    # "element 0 of tensors does not require grad", far from the cause.
    with pytest.raises(TypeError, match="floating"):
        it.implicit_solve(half, lambda w, a: F(w, a).long(), None, a_())


@pytest.mark.parametrize(
    "out, error, match",
    [
        (lambda a: (a / 2).long(), TypeError, "floating-point"),
        (lambda a: [1.0, 2.0, 3.0], TypeError, "tensor or a pytree of tensors"),
        (lambda a: None, TypeError, "tensor or a pytree of tensors"),
        (lambda a: {}, ValueError, "no tensor leaves"),
    ],
    ids=["int", "floats", "none", "empty-dict"],
)
def test_solver_output_that_is_not_a_float_pytree_is_named(out, error, match):
    with pytest.raises(error, match=match):
        it.implicit_solve(lambda init, a: out(a), F, None, a_())


@pytest.mark.parametrize(
    "out", [lambda a: a / 2, lambda a: (a / 2, 1, 2), lambda a: [a / 2, None]],
    ids=["bare", "triple", "list"],
)  # fmt: skip
def test_has_aux_with_a_solver_that_returns_no_pair(out):
    with pytest.raises(TypeError, match=r"has_aux=True.*pair"):
        it.implicit_solve(lambda init, a: out(a), F, None, a_(), has_aux=True)


def test_has_aux_pair_is_unpacked_and_aux_untouched():
    aux = {"iters": 7}
    a = a_()
    w, got = it.implicit_solve(lambda init, a: (a / 2, aux), F, None, a, has_aux=True)
    assert got is aux
    (g,) = torch.autograd.grad(w.sum(), a)
    torch.testing.assert_close(g, torch.full((3,), 0.5, dtype=DT), rtol=0, atol=1e-15)


@pytest.mark.parametrize("what", ["solver", "optimality_fn"])
def test_non_callable_solver_or_optimality_fn(what):
    solver, fn = (3, F) if what == "solver" else (half, 3)
    with pytest.raises(TypeError, match="not callable"):
        it.implicit_solve(solver, fn, None, a_())


def test_empty_solution_gives_an_empty_gradient():
    a = torch.zeros(0, dtype=DT, requires_grad=True)
    w = it.implicit_solve(half, F, None, a)
    assert w.shape == (0,)
    (g,) = torch.autograd.grad(w.sum(), a)
    assert g.shape == (0,)


# ------------------------------------------------------------------------------------------
# The engine: devices, batching, cotangents and tangents
# ------------------------------------------------------------------------------------------


def test_parameter_on_another_device_than_the_solution():
    a = torch.ones(3, device=META)
    with pytest.raises(ValueError, match=r"meta.*cpu|cpu.*meta"):
        it.implicit_solve(lambda init, a: torch.zeros(3), F, None, a)


def test_solution_on_another_device_than_a_parameter():
    with pytest.raises(ValueError, match=r"meta.*cpu|cpu.*meta"):
        it.implicit_solve(lambda init, a: torch.zeros(3, device=META), F, None, a_())


def test_solution_leaves_on_two_devices():
    with pytest.raises(ValueError, match="different devices"):
        it.implicit_solve(
            lambda init, a: (a / 2, torch.zeros(1, device=META)),
            lambda w, a: (F(w[0], a), w[1]),
            None,
            a_(),
        )


def test_zero_d_cpu_parameter_mixes_with_any_device_like_torch():
    # torch lets a 0-d CPU tensor take part in ops on any device; so does the engine.
    s = torch.tensor(2.0, dtype=DT, requires_grad=True)
    w = it.implicit_solve(lambda init, s: torch.full((3,), s.item() / 2, dtype=DT),
                          lambda w, s: 2 * w - s, None, s)  # fmt: skip
    (g,) = torch.autograd.grad(w.sum(), s)
    torch.testing.assert_close(g, torch.tensor(1.5, dtype=DT), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "sol",
    [lambda a: torch.tensor(1.0, dtype=DT),
     lambda a: (torch.zeros(2, dtype=DT), torch.zeros(3, dtype=DT))],
    ids=["0-d", "inconsistent"],
)  # fmt: skip
def test_batched_needs_a_common_leading_dimension(sol):
    with pytest.raises(ValueError, match=r"batched=True.*leading"):
        it.implicit_solve(lambda init, a: sol(a), lambda w, a: w, None, a_(), batched=True)


def test_batched_with_zero_problems():
    a = torch.zeros(0, 3, dtype=DT, requires_grad=True)
    w = it.implicit_solve(half, F, None, a, batched=True)
    assert w.shape == (0, 3)
    (g,) = torch.autograd.grad(w.sum(), a)
    assert g.shape == (0, 3)


@pytest.mark.parametrize(
    "cot, match",
    [(torch.ones(2, dtype=DT), "cotangent"), ((torch.ones(3, dtype=DT),), "cotangent"),
     (torch.ones(3, dtype=torch.int64), "floating"), (torch.ones(3, device=META), "meta")],
    ids=["shape", "structure", "int", "meta"],
)  # fmt: skip
def test_root_vjp_names_a_bad_cotangent(cot, match):
    a = torch.ones(3, dtype=DT)
    with pytest.raises((ValueError, TypeError), match=match):
        it.root_vjp(F, a / 2, (a,), cot)


def test_root_vjp_with_params_that_are_not_a_tuple():
    # params is a tuple of parameters; a bare tensor would be iterated over its first
    # dimension (its rows passed as separate params), which must not happen silently.
    a = torch.ones(3, dtype=DT)
    with pytest.raises(TypeError, match="params"):
        it.root_vjp(F, a / 2, a, torch.ones(3, dtype=DT))


@pytest.mark.parametrize(
    "tangents, match",
    [((), "one tangent per param"), ((torch.ones(2, dtype=DT),), "tangent"),
     ((torch.ones(3, dtype=torch.int64),), "tangent|floating")],
    ids=["count", "shape", "int"],
)  # fmt: skip
def test_root_jvp_names_a_bad_tangent(tangents, match):
    a = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match=match):
        it.root_jvp(F, a / 2, (a,), tangents)


def test_root_jvp_pairs_dict_tangents_by_key_not_by_position():
    # torch.func.jvp refuses tangents whose dict keys are in another order than the primals';
    # root_jvp flattens both and pairs leaves by position, so the tangent meant for "a" is
    # silently used for "b": here it returned 0 where ∂w*/∂a · ȧ = ȧ = 1.
    p = {"a": torch.ones(3, dtype=DT), "b": torch.ones(3, dtype=DT)}
    tangent = {"b": torch.zeros(3, dtype=DT), "a": torch.ones(3, dtype=DT)}
    try:
        w = it.root_jvp(lambda w, p: w - p["a"], p["a"].clone(), (p,), (tangent,))
    except ValueError as exc:
        assert "tangent" in str(exc)
        return
    torch.testing.assert_close(w, torch.ones(3, dtype=DT), rtol=1e-12, atol=0)


def test_root_jvp_and_vjp_are_right_on_legal_input():
    # Against the closed form ∂w*/∂a = I/2: a case that fails if the checks above reject too much.
    a = torch.ones(3, dtype=DT)
    v = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    (g,) = it.root_vjp(F, a / 2, (a,), v)
    torch.testing.assert_close(g, v / 2, rtol=1e-10, atol=0)
    w = it.root_jvp(F, a / 2, (a,), (v,))
    torch.testing.assert_close(w, v / 2, rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------
# A user's solve callable that fails
# ------------------------------------------------------------------------------------------


def test_user_solve_returning_the_wrong_shape_is_named():
    a = a_()
    w = it.implicit_solve(half, F, None, a, solve=lambda matvec, b: b[:1])
    with pytest.raises(ValueError, match="solve"):
        torch.autograd.grad(w.sum(), a)


def test_user_solve_returning_nan_is_reported_not_silent():
    # A NaN gradient from a failed user solve is the same silent failure as a NaN root: the
    # engine can see it (a non-finite adjoint) and must report it.
    a = a_()
    w = it.implicit_solve(half, F, None, a, solve=lambda matvec, b: b * math.nan)
    with pytest.warns(it.ConvergenceWarning):
        torch.autograd.grad(w.sum(), a)


# ------------------------------------------------------------------------------------------
# The linear solvers
# ------------------------------------------------------------------------------------------

A3 = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]], dtype=DT)
B3 = torch.tensor([1.0, -1.0, 2.0], dtype=DT)


def mv(v):
    return A3 @ v


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize(
    "matvec",
    [lambda v: torch.cat([v, v]), lambda v: None, lambda v: (A3 @ v,)],
    ids=["long", "none", "tuple"],
)
def test_matvec_of_the_wrong_structure_is_named(name, matvec):
    with pytest.raises(ValueError, match="matvec"):
        it.linear.SOLVERS[name](matvec, B3)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_batched_solve_with_zero_systems(name):
    b = torch.zeros(0, 3, dtype=DT)
    x, info = it.linear.SOLVERS[name](lambda v: 2 * v, b, batched=True, return_info=True)
    assert x.shape == (0, 3) and info.converged.shape == (0,)


@pytest.mark.parametrize("name", ["cg", "gmres", "lu", "auto"])
def test_pytree_rhs_with_a_matvec_of_another_structure(name):
    b = {"u": B3, "v": B3[:2]}
    with pytest.raises(ValueError, match="matvec"):
        it.linear.SOLVERS[name](lambda t: t["u"], b)


@pytest.mark.parametrize("name", ["cg", "gmres", "lu"])
def test_batched_rhs_with_inconsistent_leading_dims(name):
    b = (torch.ones(2, 3, dtype=DT), torch.ones(3, 3, dtype=DT))
    with pytest.raises(ValueError, match="leading"):
        it.linear.SOLVERS[name](lambda t: t, b, batched=True)


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "neumann"])
def test_init_of_the_wrong_shape_is_named(name):
    with pytest.raises(ValueError, match="init"):
        it.linear.SOLVERS[name](mv, B3, init=torch.zeros(2, dtype=DT))


@pytest.mark.parametrize("name", ["cg", "normal_cg", "gmres", "lu"])
@pytest.mark.parametrize("ridge, error", [("x", TypeError), (float("nan"), ValueError)])
def test_bad_ridge_is_rejected_naming_it(name, ridge, error):
    # Like tol and atol: a NaN ridge is not a system to solve, and a string is not a number
    # (today: torch's "only integer tensors of a single element can be converted to an index").
    with pytest.raises(error, match="ridge"):
        it.linear.SOLVERS[name](mv, B3, ridge=ridge)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_each_solver_is_right_on_the_legal_input_used_above(name):
    # The reference: torch.linalg.solve. Relative error ≤ κ (tol + n eps) with the default tol.
    kw = {"alpha": 0.2} if name == "neumann" else {}  # ρ(I − 0.2 A) < 1 for this A
    with warnings.catch_warnings():
        warnings.simplefilter("error", it.ConvergenceWarning)
        x = it.linear.SOLVERS[name](mv, B3, maxiter=400, **kw)
    ref = torch.linalg.solve(A3, B3)
    kappa = float(torch.linalg.cond(A3))
    rel = 10 * kappa * (1e-10 + 3 * torch.finfo(DT).eps)
    assert float((x - ref).norm() / ref.norm()) <= rel


# ------------------------------------------------------------------------------------------
# Layers: options are validated at construction
# ------------------------------------------------------------------------------------------


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=DT)

    def forward(self, z, x):
        return torch.tanh(0.3 * self.lin(z) + x)


class Shift(it.nn.ImplicitLayer):
    def solve_forward(self, init, a):
        return a / 2

    def optimality(self, x, a):
        return 2 * x - a


@pytest.mark.parametrize(
    "kw, error",
    [
        ({"maxiter": -1}, ValueError),
        ({"maxiter": 2.5}, TypeError),
        ({"tol": -1e-3}, ValueError),
        ({"tol": float("nan")}, ValueError),
        ({"tol": None}, (TypeError, ValueError)),
        ({"on_failure": "loud"}, ValueError),
        ({"adjoint": "gmres"}, TypeError),
        ({"forward_solver": "newton"}, ValueError),
        ({"history_size": 0}, ValueError),
        ({"history_size": -2, "forward_solver": "broyden"}, ValueError),
        ({"backward_maxiter": -1}, ValueError),
        ({"backward_maxiter": 1.5}, TypeError),
    ],
    ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__,
)
def test_deq_validates_at_construction(kw, error):
    with pytest.raises(error):
        it.nn.DEQ(Cell(), **kw)


@pytest.mark.parametrize(
    "adjoint, error",
    [(lambda: "cg", TypeError), (lambda: it.PhantomAdjoint(), TypeError)],
    ids=["string", "phantom-without-fixed-point"],
)  # fmt: skip
def test_implicit_layer_validates_its_adjoint_at_construction(adjoint, error):
    with pytest.raises(error):
        Shift(adjoint=adjoint())


@pytest.mark.parametrize(
    "solve, error", [("foo", ValueError), (3, TypeError), (object(), TypeError)]
)  # fmt: skip
def test_an_implicit_adjoint_validates_its_solve_when_built(solve, error):
    """Every layer and solver is covered at once: the adjoint itself refuses a bad solve."""
    with pytest.raises(error, match="solve"):
        it.ImplicitAdjoint(solve)


@pytest.mark.parametrize(
    "kw, error",
    [({"maxiter": -1}, ValueError), ({"maxiter": 1.5}, TypeError), ({"tol": -1.0}, ValueError),
     ({"tol": float("inf")}, ValueError), ({"on_failure": "quiet"}, ValueError)],
)  # fmt: skip
def test_qp_layer_validates_at_construction(kw, error):
    with pytest.raises(error):
        it.nn.QPLayer(**kw)


@pytest.mark.parametrize(
    "kw, error",
    [({"steps": 0}, ValueError), ({"steps": 2.0}, ValueError),
     ({"damping": 0.0}, ValueError), ({"damping": float("nan")}, ValueError)],
)  # fmt: skip
def test_phantom_adjoint_validates_at_construction(kw, error):
    with pytest.raises(error):
        it.PhantomAdjoint(**kw)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_simplex_projection_rejects_an_empty_or_undefined_simplex_at_construction(value):
    # {p ≥ 0, Σp = value} is empty for value < 0; NaN/Inf define no set. Today the layer is
    # built, and returns zeros (sum 0 ≠ −1) or NaN at the first forward.
    with pytest.raises(ValueError, match="value"):
        it.nn.SimplexProjection(value=value)


# ------------------------------------------------------------------------------------------
# Projection layers (their values at ±inf, NaN, empty and 0-d input: test_solver_failures.py)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [it.nn.Sparsemax, it.nn.SimplexProjection])
@pytest.mark.parametrize("dim", [1.5, "last", None])
def test_projection_layers_validate_dim_at_construction(layer, dim):
    # Today any dim is accepted and the first forward fails inside Tensor.movedim.
    with pytest.raises(TypeError, match="dim"):
        layer(dim=dim)


def test_sparsemax_of_an_out_of_range_dim_is_torch_s_index_error():
    with pytest.raises(IndexError, match="Dimension out of range"):
        it.nn.Sparsemax(dim=3)(torch.zeros(2, 3, dtype=DT))


# ------------------------------------------------------------------------------------------
# it.ops.batched_cg (the cases test_ops.py does not cover)
# ------------------------------------------------------------------------------------------

_A = torch.eye(3, dtype=DT).expand(2, 3, 3).contiguous()
_b = torch.ones(2, 3, dtype=DT)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"maxiter": 2.5}, TypeError, "maxiter"),
        ({"maxiter": True}, TypeError, "maxiter"),
        ({"maxiter": "3"}, TypeError, "maxiter"),
        ({"rtol": "1e-3"}, TypeError, "rtol"),
        ({"rtol": None}, TypeError, "rtol"),
        ({"atol": -1e-9}, ValueError, "atol"),
        ({"rtol": float("nan")}, ValueError, "rtol"),
    ],
    ids=["maxiter-float", "maxiter-bool", "maxiter-str", "rtol-str", "rtol-none", "atol-neg",
         "rtol-nan"],
)  # fmt: skip
def test_batched_cg_validates_its_options_like_the_core(kw, error, match):
    # The same rules as every solver (implicit_torch._result.check_maxiter / check_tolerances):
    # today maxiter=2.5 is silently truncated to 2 and a string tolerance fails with Python's
    # "'>=' not supported between instances of 'str' and 'int'".
    with pytest.raises(error, match=match):
        it.ops.batched_cg(_A, _b, **kw)


@pytest.mark.parametrize(
    "A, b, x0, error, match",
    [
        (_A.to(META), _b, None, ValueError, "meta"),
        (_A, _b, _b.to(META), ValueError, "meta"),
        (_A[None], _b, None, ValueError, r"\(B, n, n\)"),
        (_A, _b[..., None], None, ValueError, r"\(B, n\)"),
        (_A.bfloat16(), _b.bfloat16(), None, TypeError, "float32 or float64"),
        (_A.tolist(), _b, None, TypeError, "must be a tensor"),
    ],
    ids=["A-meta", "x0-meta", "A-4d", "b-3d", "bfloat16", "A-list"],
)  # fmt: skip
def test_batched_cg_bad_tensors(A, b, x0, error, match):
    with pytest.raises(error, match=match):
        it.ops.batched_cg(A, b, x0=x0)


def test_batched_cg_accepts_a_0d_tensor_tolerance_and_solves():
    x, info = it.ops.batched_cg(4 * _A, _b, rtol=torch.tensor(1e-12))
    torch.testing.assert_close(x, _b / 4, rtol=1e-12, atol=0)
    assert bool(info.converged.all())


def test_solver_partial_with_a_bad_option_fails_at_the_first_backward_naming_it():
    # functools.partial cannot validate early; the error must still name the option.
    a = a_()
    w = it.implicit_solve(half, F, None, a, solve=functools.partial(it.solve_cg, tol=-1.0))
    with pytest.raises(ValueError, match="tol"):
        torch.autograd.grad(w.sum(), a)
