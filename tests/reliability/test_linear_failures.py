"""Failure modes of the linear solvers (issue 13): ``converged`` is judged on the true
residual, misses are reported, singular and bad inputs give clear errors, never crashes.

Every case asserts either the right result against a float64 reference or a reported failure.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit_torch as it
from implicit_torch._result import Status

DT = torch.float64
ITERATIVE = ["cg", "gmres", "bicgstab", "normal_cg"]
DIRECT = ["lu", "cholesky", "auto"]


def spd_with_condition(n: int, cond: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond, dtype=DT)).item(), n, dtype=DT)
    return (Q * eig) @ Q.T


def true_residual(A, x, b):
    return float(torch.linalg.vector_norm(b - A @ x))


def solve(name, A, b, **kw):
    return it.linear.SOLVERS[name](lambda v: A @ v, b, return_info=True, **kw)


# -- converged means "the true residual meets the target" ---------------------------------------


@pytest.mark.parametrize("name", ITERATIVE + DIRECT)
def test_converged_flag_matches_the_true_residual_at_kappa_1e12(name):
    A = spd_with_condition(30, 1e12, seed=1)
    b = torch.randn(30, generator=torch.Generator().manual_seed(2), dtype=DT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, info = solve(name, A, b, maxiter=300)
    res = true_residual(A, x, b)
    target = 1e-10 * float(torch.linalg.vector_norm(b))
    assert bool(info.converged) == (res <= target), (name, res, target, info)
    torch.testing.assert_close(info.residual_norm, torch.tensor(res, dtype=DT), rtol=1e-6, atol=0)
    if not bool(info.converged):
        assert any(issubclass(w.category, it.ConvergenceWarning) for w in caught), name
        assert int(info.status) != Status.CONVERGED


def test_normal_cg_is_judged_on_the_original_system():
    # CG on AᵀA stalls at κ(A)² = 1e24: it used to claim convergence with relative error 1.0.
    A = spd_with_condition(30, 1e12, seed=3)
    b = torch.randn(30, generator=torch.Generator().manual_seed(4), dtype=DT)
    with pytest.raises(it.ConvergenceError, match="solve_normal_cg"):
        solve("normal_cg", A, b, on_failure="raise")


def test_normal_cg_on_a_singular_system_is_reported():
    A = torch.ones(2, 2, dtype=DT)
    b = torch.tensor([1.0, 0.0], dtype=DT)
    with pytest.warns(it.ConvergenceWarning, match="did not converge"):
        _, info = solve("normal_cg", A, b)
    assert not bool(info.converged)
    assert float(info.residual_norm) == pytest.approx(0.5**0.5, rel=1e-6)


def test_a_direct_solve_that_misses_says_the_target_is_unattainable():
    A = spd_with_condition(40, 1e14, seed=5)
    b = torch.randn(40, generator=torch.Generator().manual_seed(6), dtype=DT)
    with pytest.raises(it.ConvergenceError, match=r"exact up to rounding.*float64"):
        solve("lu", A, b, tol=1e-15, on_failure="raise")


def test_cg_restarts_when_the_recurrence_drifts():
    """Residual replacement: the recurrence meets the target before the true residual does on
    an ill-conditioned system; the restart brings the true residual down (or reports)."""
    A = spd_with_condition(60, 1e8, seed=7)
    b = torch.randn(60, generator=torch.Generator().manual_seed(8), dtype=DT)
    x, info = solve("cg", A, b, tol=1e-9, maxiter=2000, on_failure="ignore")
    res = true_residual(A, x, b)
    assert bool(info.converged) == (res <= 1e-9 * float(torch.linalg.vector_norm(b)))


# -- singular systems: reported per block, never a raw LinAlgError --------------------------------


@pytest.mark.parametrize("name", ["lu", "cholesky", "auto"])
def test_singular_block_is_reported_and_the_others_are_solved(name):
    good = spd_with_condition(4, 10.0, seed=9)
    A = torch.stack([good, torch.zeros(4, 4, dtype=DT), 2 * good])
    b = torch.ones(3, 4, dtype=DT)

    def matvec(v):
        return torch.einsum("bij,bj->bi", A, v)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, info = it.linear.SOLVERS[name](
            matvec, b, batched=True, on_failure="ignore", return_info=True
        )
    assert info.converged.tolist() == [True, False, True]
    assert int(info.status[1]) in (Status.SINGULAR, Status.NONFINITE)
    ref = torch.linalg.solve(good, b[0])
    torch.testing.assert_close(x[0], ref)
    torch.testing.assert_close(x[2], ref / 2)


def test_singular_system_raises_a_convergence_error_naming_it():
    A = torch.zeros(3, 3, dtype=DT)
    with pytest.raises(it.ConvergenceError, match="singular"):
        it.solve_lu(lambda v: A @ v, torch.ones(3, dtype=DT), on_failure="raise")


def test_singular_system_with_ignore_does_not_raise():
    A = torch.zeros(3, 3, dtype=DT)
    x = it.solve_lu(lambda v: A @ v, torch.ones(3, dtype=DT), on_failure="ignore")
    assert not bool(torch.isfinite(x).all())


# -- bad options and inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ITERATIVE + DIRECT + ["neumann"])
@pytest.mark.parametrize(
    "kw, error",
    [
        ({"tol": float("nan")}, ValueError),
        ({"tol": -1.0}, ValueError),
        ({"atol": float("inf")}, ValueError),
        ({"maxiter": -1}, ValueError),
        ({"maxiter": 2.5}, TypeError),
        ({"on_failure": "loud"}, ValueError),
    ],
)
def test_bad_options_are_rejected_by_every_solver(name, kw, error):
    A = torch.eye(3, dtype=DT)
    with pytest.raises(error):
        it.linear.SOLVERS[name](lambda v: A @ v, torch.ones(3, dtype=DT), **kw)


def test_meta_tensors_get_a_clear_error():
    b = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match="meta"):
        it.solve_cg(lambda v: v, b)


def test_integer_rhs_is_rejected():
    with pytest.raises(TypeError, match="floating"):
        it.solve_cg(lambda v: v, torch.ones(3, dtype=torch.int64))


# -- property: either the target is met and converged is True, or the failure is reported --------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    kind=st.sampled_from(["spd", "nonsym", "singular"]),
    name=st.sampled_from(ITERATIVE + DIRECT + ["neumann"]),
    seed=st.integers(0, 10_000),
)
def test_converged_or_reported(n, kind, name, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    if kind == "spd":
        A = M @ M.T + 0.1 * torch.eye(n, dtype=DT)
    elif kind == "nonsym":
        A = M + n * torch.eye(n, dtype=DT)
    else:
        A = M.clone()
        A[:, 0] = 0.0  # a zero column: singular
    b = torch.randn(n, generator=g, dtype=DT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, info = solve(name, A, b, maxiter=20 * n)
    res = true_residual(A, x, b)
    target = 1e-10 * float(torch.linalg.vector_norm(b))
    reported = any(issubclass(w.category, it.ConvergenceWarning) for w in caught)
    if bool(info.converged):
        assert res <= target * (1 + 1e-12), (name, kind, res, target)
    else:
        assert reported, (name, kind, res, target)
