"""The compiled ``batched_cg`` kernel against its pure-PyTorch twin (issue 13).

``torch.ops.implicit_torch.batched_cg`` (the extension's CPU kernel) and
``it.ops.batched_cg_reference`` implement the same algorithm; they differ only in rounding
(summation order, fused multiply-adds). So:

* per-system iteration counts are equal wherever the stopping decision is not itself decided
  by rounding: the threshold must lie further from the residual trajectory, at the last two
  iterations, than an ulp-level perturbation of ``A`` moves that trajectory (measured on the
  very system, times 4) plus the recurrence-vs-true residual gap ``K eps (1 + κ) ‖b‖``; most
  systems must be decisive, so the comparison is never vacuous;
* solutions differ by at most ``‖A⁻¹‖ (‖r_ext‖ + ‖r_ref‖)`` (each is within ``‖A⁻¹‖ ‖r‖`` of
  ``A⁻¹b``), residuals measured in float64;
* the reported residual norm is the true residual of the returned ``x``;
* non-contiguous, expanded and transposed inputs give bitwise the results of contiguous ones;
* bad inputs raise the same error, with the same message, from both;
* ``IMPLICIT_TORCH_NO_EXT=1`` in a subprocess gives the same gradients of an implicit problem.

Skips cleanly where the extension is not built (except the subprocess test, which compares
this process, with or without it, against a forced fallback).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _refs import gen

import implicit_torch as it
from implicit_torch.ops import batched_cg_reference

F64 = torch.float64
needs_ext = pytest.mark.skipif(
    not it.ops.extension_available("cpu"), reason="the compiled CPU kernel is not loaded"
)
op = torch.ops.implicit_torch.batched_cg


def spd(B, n, cond, seed, dtype=F64):
    """B symmetric positive-definite matrices, eigenvalues log-spaced in [1, cond]."""
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=gen(seed), dtype=F64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond, dtype=F64)).item(), n, dtype=F64)
    A = Q @ torch.diag_embed(eig.expand(B, n)) @ Q.mT
    return (0.5 * (A + A.mT)).to(dtype)


def rhs(B, n, seed, dtype=F64):
    return torch.randn(B, n, generator=gen(seed), dtype=F64).to(dtype)


def true_residual(A, b, x):
    A, b, x = A.double(), b.double(), x.double()
    return torch.linalg.vector_norm(b - (A @ x.unsqueeze(-1)).squeeze(-1), dim=-1)


def _trajectory(A, b, x0, rtol, kmax, jacobi):
    """(kmax + 1, B): the reference's true residual after K = 0..kmax iterations."""
    runs = [batched_cg_reference(A, b, x0, rtol, 0.0, K, jacobi)[2] for K in range(kmax + 1)]
    return torch.stack(runs).double()


def decisive(A, b, x0, rtol, iters, jacobi, cond):
    """Per system: whether the stop after ``iters`` iterations is not decided by rounding."""
    B, n = b.shape
    eps = torch.finfo(A.dtype).eps
    kmax = int(iters.max()) if B else 0
    base = _trajectory(A, b, x0, rtol, kmax, jacobi)
    E = torch.randn(B, n, n, generator=gen(99), dtype=F64)
    nudged = (A.double() * (1 + 4 * eps * 0.5 * (E + E.mT))).to(A.dtype)
    spread = (_trajectory(nudged, b, x0, rtol, kmax, jacobi) - base).abs()
    bnorm = torch.linalg.vector_norm(b.double(), dim=1)
    K = torch.arange(kmax + 1, dtype=F64)[:, None]
    margin = 4 * spread + K * eps * (1 + cond) * bnorm
    thr = rtol * bnorm
    idx = torch.arange(B)
    k = iters.clamp(min=1)
    above = base[k - 1, idx] - thr > margin[k - 1, idx]
    below = thr - base[k, idx] > margin[k, idx]
    return above & below & (iters > 0)


def assert_parity(A, b, rtol, maxiter, jacobi, cond, x0=None, min_decisive=0.5):
    x, it_e, res_e = op(A, b, x0, rtol, 0.0, maxiter, jacobi)
    xr, it_r, res_r = batched_cg_reference(A, b, x0, rtol, 0.0, maxiter, jacobi)
    B, n = b.shape
    assert x.shape == xr.shape == (B, n) and x.dtype == xr.dtype == A.dtype
    assert it_e.dtype == it_r.dtype == torch.int64 and res_e.dtype == A.dtype
    if B == 0:
        return
    # iteration counts: equal on every system whose stop rounding does not decide
    ok = decisive(A, b, x0, rtol, it_r, jacobi, cond)
    assert float(ok.double().mean()) >= min_decisive, "too few decisive systems to compare"
    bad = (ok & (it_e != it_r)).nonzero().flatten().tolist()
    assert not bad, f"systems {bad}: iterations {it_e[bad].tolist()} vs {it_r[bad].tolist()}"
    # solutions: both within ‖A⁻¹‖ ‖r‖ of A⁻¹b
    r_e, r_r = true_residual(A, b, x), true_residual(A, b, xr)
    inv_norm = 1 / torch.linalg.svdvals(A.double())[:, -1]
    diff = torch.linalg.vector_norm(x.double() - xr.double(), dim=1)
    slack = 8 * n * torch.finfo(F64).eps * (1 + torch.linalg.vector_norm(xr.double(), dim=1))
    assert bool((diff <= inv_norm * (r_e + r_r) * (1 + 1e-9) + slack).all())
    # the reported residual is the true residual of the returned x, up to the dtype's rounding
    eps = torch.finfo(A.dtype).eps
    scale = torch.linalg.matrix_norm(A.double(), 2) * torch.linalg.vector_norm(
        x.double(), dim=1
    ) + torch.linalg.vector_norm(b.double(), dim=1)
    assert bool(((res_e.double() - r_e).abs() <= 4 * n * eps * scale).all())
    assert bool(((res_r.double() - r_r).abs() <= 4 * n * eps * scale).all())


# ------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("jacobi", [False, True], ids=["plain", "jacobi"])
def test_compiled_kernel_matches_the_reference(dtype, n, jacobi):
    rtol = 1e-3 if dtype == torch.float32 else 1e-9
    A = spd(48, n, 10.0, seed=n, dtype=dtype)
    b = rhs(48, n, seed=n + 1, dtype=dtype)
    assert_parity(A, b, rtol, 20 * n + 20, jacobi, cond=10.0)


@needs_ext
@pytest.mark.parametrize("B", [0, 1, 3000])
def test_batch_sizes_zero_one_and_large(B):
    n = 4
    assert_parity(spd(B, n, 10.0, seed=B), rhs(B, n, seed=B + 1), 1e-9, 60, False, cond=10.0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_warm_start_parity(dtype):
    A = spd(16, 9, 10.0, seed=5, dtype=dtype)
    b = rhs(16, 9, seed=6, dtype=dtype)
    x0 = rhs(16, 9, seed=7, dtype=dtype)
    rtol = 1e-3 if dtype == torch.float32 else 1e-9
    assert_parity(A, b, rtol, 200, False, cond=10.0, x0=x0)


@needs_ext
def test_maxiter_zero_returns_x0_from_both():
    A, b, x0 = spd(5, 6, 10.0, seed=8), rhs(5, 6, seed=9), rhs(5, 6, seed=10)
    for fn in (op, batched_cg_reference):
        x, iters, res = fn(A, b, x0, 1e-9, 0.0, 0, False)
        assert torch.equal(x, x0) and bool((iters == 0).all())
        torch.testing.assert_close(res, true_residual(A, b, x0), rtol=1e-12, atol=0)


@needs_ext
def test_ill_conditioned_systems_report_their_true_residual_in_both():
    # κ = 1e8: the trajectories diverge (rounding decides), but each result is honest.
    A, b = spd(8, 40, 1e8, seed=11), rhs(8, 40, seed=12)
    for fn in (op, batched_cg_reference):
        x, _, res = fn(A, b, None, 1e-12, 0.0, 400, False)
        r = true_residual(A, b, x)
        scale = torch.linalg.matrix_norm(A, 2) * torch.linalg.vector_norm(x, dim=1)
        assert bool(
            ((res - r).abs() <= 4 * 40 * torch.finfo(F64).eps * (scale + b.norm(dim=1))).all()
        )


# ------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------


def _layouts():
    A = spd(6, 10, 10.0, seed=13)
    b = rhs(6, 10, seed=14)
    wide = torch.stack([b, -b], dim=-1).reshape(6, 20)  # b at stride 2
    one = spd(1, 10, 10.0, seed=15)
    return {
        "transposed-A": (A.mT, b, A, b),
        "strided-b": (A, wide[:, ::2], A, b),
        "expanded-A": (one.expand(6, 10, 10), b, one.expand(6, 10, 10).contiguous(), b),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("impl", ["compiled", "reference"], ids=["compiled", "reference"])
def test_non_contiguous_inputs_give_bitwise_the_contiguous_results(layout, impl):
    if impl == "compiled" and not it.ops.extension_available("cpu"):
        pytest.skip("the compiled CPU kernel is not loaded")
    fn = op if impl == "compiled" else batched_cg_reference
    A, b, A_c, b_c = _layouts()[layout]
    assert not (A.is_contiguous() and b.is_contiguous())
    got = fn(A, b, None, 1e-10, 0.0, 100, False)
    want = fn(A_c.contiguous(), b_c.contiguous(), None, 1e-10, 0.0, 100, False)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ------------------------------------------------------------------------------------------
# errors: the same type and message from both
# ------------------------------------------------------------------------------------------

_A = torch.eye(3, dtype=F64).expand(2, 3, 3).contiguous()
_b = torch.ones(2, 3, dtype=F64)
BAD = {
    "int-dtype": (_A.long(), _b.long(), None, 1e-6, 0.0, 10),
    "A-shape": (torch.ones(3, 4, 5, dtype=F64), _b, None, 1e-6, 0.0, 10),
    "b-shape": (_A, torch.ones(2, 4, dtype=F64), None, 1e-6, 0.0, 10),
    "mixed-dtypes": (_A, _b.float(), None, 1e-6, 0.0, 10),
    "nan-rtol": (_A, _b, None, float("nan"), 0.0, 10),
    "negative-maxiter": (_A, _b, None, 1e-6, 0.0, -1),
}


@needs_ext
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_give_the_same_error_and_message(case):
    args = BAD[case]
    with pytest.raises((TypeError, ValueError)) as compiled:
        op(*args)
    with pytest.raises((TypeError, ValueError)) as reference:
        batched_cg_reference(*args)
    assert compiled.type is reference.type
    assert str(compiled.value) == str(reference.value)


# ------------------------------------------------------------------------------------------
# IMPLICIT_TORCH_NO_EXT=1: the same gradients, in a subprocess
# ------------------------------------------------------------------------------------------

_PROBLEM = """
import sys, torch, implicit_torch as it
g = torch.Generator().manual_seed(0)
d = 24  # >= 16 unknowns: "auto" forms the Hessian and, with the extension, runs batched_cg
X = torch.randn(60, d, generator=g, dtype=torch.float64)
y = torch.randn(60, generator=g, dtype=torch.float64)
lam = torch.full((d,), 0.5, dtype=torch.float64, requires_grad=True)

def F(w, lam):
    return X.T @ (X @ w - y) + lam * w

def solver(init, lam):
    return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)

w = it.implicit_solve(solver, F, None, lam, solve="auto")
(grad,) = torch.autograd.grad((w ** 2).sum(), lam)
H = X.T @ X + torch.diag(lam.detach())
out = {"w": w.detach(), "grad": grad, "cond": torch.linalg.cond(H),
       "ext": it.ops.extension_available("cpu")}
if globals().get("__name__") == "__main__":  # the subprocess (exec'd in-process: no file)
    torch.save(out, sys.argv[1])
"""


def test_no_ext_subprocess_gives_the_same_gradients(tmp_path):
    here: dict = {}
    exec(compile(_PROBLEM, "<problem>", "exec"), here)
    mine = here["out"]
    path = tmp_path / "no_ext.pt"
    env = dict(os.environ, IMPLICIT_TORCH_NO_EXT="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PROBLEM), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(path)
    assert theirs["ext"] is False
    assert torch.equal(mine["w"], theirs["w"])  # the forward is the same torch.linalg.solve
    # the backward solves differ (fused CG vs Cholesky), each to relative residual 1e-10:
    # the adjoints differ by ≤ 2 κ (1e-10 + n eps) relatively, and so do the gradients
    kappa = float(mine["cond"])
    rel = 10 * 2 * kappa * (1e-10 + 24 * torch.finfo(F64).eps)
    err = float((mine["grad"] - theirs["grad"]).norm())
    assert err <= rel * float(theirs["grad"].norm()), (err, rel)
