"""How solve="auto" uses the fused batched CG: solve_formed on formed blocks, and auto's
choice between matrix-free CG and formed blocks for batched problems.

References are torch.linalg.solve in float64. Tests that need the compiled kernel are skipped
without it; the CI run with IMPLICIT_TORCH_NO_EXT=1 checks the Cholesky path instead.
"""

import pytest
import torch
from problems import DT, gen, nonsym, spd

import implicit_torch as it
from implicit_torch import linear as linear_solve
from implicit_torch import ops

needs_kernel = pytest.mark.skipif(
    not ops.extension_available("cpu"),
    reason="the compiled CPU kernel is not loaded (not built, or IMPLICIT_TORCH_NO_EXT=1)",
)


def spd_batch(B, n, cond, seed=0):
    return torch.stack([spd(n, seed=seed + i, cond=cond) for i in range(B)])


def rhs(B, n, seed=100):
    return torch.randn(B, n, generator=gen(seed), dtype=DT)


def rel_err(x, ref):
    return float(
        (torch.linalg.vector_norm(x - ref, dim=-1) / torch.linalg.vector_norm(ref, dim=-1)).max()
    )


@needs_kernel
def test_well_conditioned_spd_blocks_go_to_the_fused_kernel():
    A, b = spd_batch(6, 40, cond=50.0), rhs(6, 40)
    x, method = linear_solve.solve_formed(A, b, tol=1e-12)
    assert method == "batched_cg"
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-9


def test_without_the_kernel_spd_blocks_go_to_cholesky(monkeypatch):
    monkeypatch.setattr(ops, "extension_available", lambda device=None: False)
    A, b = spd_batch(4, 40, cond=50.0), rhs(4, 40)
    x, method = linear_solve.solve_formed(A, b, tol=1e-12)
    assert method == "cholesky"
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-12


def test_small_blocks_go_to_cholesky():
    n = linear_solve.auto.AUTO_FUSED_MIN_N - 1
    A, b = spd_batch(4, n, cond=10.0), rhs(4, n)
    x, method = linear_solve.solve_formed(A, b)
    assert method == "cholesky"
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-12


@needs_kernel
def test_systems_missing_the_budget_are_finished_by_cholesky():
    # One block conditioned at 1e10: CG cannot reach 1e-12 within clamp(1.5 n, 32, 128)
    # iterations, the others can; only that one is handed to Cholesky.
    n = 40
    A = torch.cat([spd_batch(3, n, cond=10.0), spd_batch(1, n, cond=1e10, seed=9)])
    b = rhs(4, n)
    x, method = linear_solve.solve_formed(A, b, tol=1e-12)
    assert method == "batched_cg+cholesky"
    res = torch.linalg.vector_norm(b - (A @ x.unsqueeze(-1)).squeeze(-1), dim=-1)
    assert bool((res <= 1e-6 * torch.linalg.vector_norm(b, dim=-1)).all()), res
    assert rel_err(x[:3], torch.linalg.solve(A[:3], b[:3])) < 1e-10


@needs_kernel
def test_symmetric_indefinite_blocks_end_in_lu():
    n = 40
    eig = torch.linspace(-2.0, 3.0, n, dtype=DT)
    eig[eig.abs() < 0.2] = 0.7
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen(5), dtype=DT))[0]
    A = (Q * eig) @ Q.T
    A = torch.stack([0.5 * (A + A.T), spd(n, seed=6)])
    b = rhs(2, n)
    x, method = linear_solve.solve_formed(A, b, tol=1e-12)
    assert method == "batched_cg+lu"
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-10


def test_nonsymmetric_blocks_go_to_lu_even_when_nearly_symmetric():
    n = 40
    A = spd_batch(3, n, cond=10.0)
    A[1, 0, n - 1] += 1e-6  # a relative asymmetry of ~1e-7, far above round-off
    b = rhs(3, n)
    x, method = linear_solve.solve_formed(A, b)
    assert method == "lu"
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-12
    x, method = linear_solve.solve_formed(torch.stack([nonsym(n, s) for s in range(3)]), b)
    assert method == "lu"


def test_fused_budget_is_clamped():
    assert linear_solve.auto.auto_fused_budget(4) == 32
    assert linear_solve.auto.auto_fused_budget(40) == 60
    assert linear_solve.auto.auto_fused_budget(1000) == 128


# --- solve_auto on batched problems ------------------------------------------------------------


def block_matvec(A):
    return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)


def test_auto_batched_symmetric_goes_matrix_free():
    A, b = spd_batch(5, 30, cond=100.0), rhs(5, 30)
    x, info = it.solve_auto(block_matvec(A), b, batched=True, tol=1e-12, return_info=True)
    assert info.method == "cg"
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-9


def test_auto_batched_cg_failure_falls_back_to_formed_blocks():
    n = 30
    eig = torch.linspace(-1.0, 2.0, n, dtype=DT)
    eig[eig.abs() < 0.2] = 0.5
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen(11), dtype=DT))[0]
    A_ind = (Q * eig) @ Q.T
    A = torch.stack([spd(n, seed=12), 0.5 * (A_ind + A_ind.T)])
    b = rhs(2, n)
    x, info = it.solve_auto(block_matvec(A), b, batched=True, tol=1e-12, return_info=True)
    assert info.method.startswith("cg+")
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-9


def test_auto_batched_nonsymmetric_small_is_formed_and_lu_solved():
    A = torch.stack([nonsym(12, s) for s in range(4)])
    b = rhs(4, 12)
    x, info = it.solve_auto(block_matvec(A), b, batched=True, return_info=True)
    assert info.method == "lu"
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-12


def test_auto_single_small_system_is_still_formed():
    A, b = spd(40, seed=20, cond=30.0), rhs(1, 40)[0]
    x, info = it.solve_auto(lambda v: A @ v, b, tol=1e-12, return_info=True)
    expected = "batched_cg" if ops.extension_available("cpu") else "cholesky"
    assert info.method == expected
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-9


@needs_kernel
def test_engine_gradient_through_the_fused_path_matches_the_closed_form(monkeypatch):
    # custom_root with solve="auto" on a single 40-unknown ridge problem forms the Hessian and
    # solves it with the fused kernel; the gradient must match autograd through the closed form.
    m, d = 80, 40
    g = gen(30)
    X, y = torch.randn(m, d, generator=g, dtype=DT), torch.randn(m, generator=g, dtype=DT)

    def F(w, lam):
        return X.T @ (X @ w - y) + lam * w

    def closed(lam):
        return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)

    calls = []
    fused = linear_solve.auto._fused_cg
    monkeypatch.setattr(linear_solve.auto, "_fused_cg", lambda *a: calls.append(1) or fused(*a))
    lam = (0.5 + torch.rand(d, generator=g, dtype=DT)).requires_grad_()
    solver = it.custom_root(F, solve=linear_solve.solve_auto)(
        lambda init, lam: closed(lam.detach())
    )
    weights = torch.randn(d, generator=g, dtype=DT)
    (grad,) = torch.autograd.grad((weights * solver(None, lam)).sum(), lam)
    (ref,) = torch.autograd.grad((weights * closed(lam)).sum(), lam)
    assert rel_err(grad, ref) < 1e-8
    assert calls, "the backward solve did not reach the fused kernel"
