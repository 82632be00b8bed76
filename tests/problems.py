"""A small zoo of problems with independent float64 references, shared by the tests.

Each reference is computed without implicit_torch: closed forms through torch.linalg.solve
(differentiated by autograd), or dense implicit-function-theorem solves built from
torch.autograd.functional.jacobian.
"""

import functools
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import implicit_torch as it

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tight(kind: str = "cg", **kw):
    """A solve callable with a tolerance far below the tests' assertion tolerances."""
    return functools.partial(getattr(it, f"solve_{kind}"), tol=1e-13, **kw)


def spd(n: int, seed: int, cond: float = 10.0, dtype=DT) -> torch.Tensor:
    """A random symmetric positive-definite matrix with condition number ``cond``."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=DT))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    A = Q @ torch.diag(eig) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def nonsym(n: int, seed: int) -> torch.Tensor:
    """A random well-conditioned non-symmetric matrix."""
    g = gen(seed)
    return 2.0 * torch.eye(n, dtype=DT) + 0.5 * torch.randn(n, n, generator=g, dtype=DT) / n**0.5


# --- ridge regression: F(w, λ) = Xᵀ(Xw − y) + λ ⊙ w ------------------------------------------


def ridge_data(seed=0, m=25, d=5):
    g = gen(seed)
    X = torch.randn(m, d, generator=g, dtype=DT)
    y = torch.randn(m, generator=g, dtype=DT)
    lam = 0.5 + torch.rand(d, generator=g, dtype=DT)
    return X, y, lam


def ridge_F(w, lam, X, y):
    return X.T @ (X @ w - y) + lam * w


def ridge_closed(lam, X, y):
    """w(λ) = (XᵀX + diag λ)⁻¹ Xᵀy; λ may be a scalar or one value per feature."""
    d = X.shape[1]
    H = X.T @ X + lam * torch.eye(d, dtype=X.dtype) if lam.dim() == 0 else X.T @ X + torch.diag(lam)
    return torch.linalg.solve(H, X.T @ y)


def ridge_gd(init, lam, X, y, iters=3000):
    """Gradient descent with step 1/L: an iterative forward solver (converges to 1e-15)."""
    H = X.T @ X
    L = torch.linalg.eigvalsh(H).max() + lam.max()
    w = torch.zeros(X.shape[1], dtype=X.dtype) if init is None else init
    for _ in range(iters):
        w = w - ridge_F(w, lam, X, y) / L
    return w


def dense_ift(F, x, params):
    """−(∂ₓF)⁻¹ ∂_θF for every param, by dense Jacobians (the independent reference)."""
    n = x.numel()
    Jx = torch.autograd.functional.jacobian(lambda z: F(z, *params), x).reshape(n, n)
    out = []
    for k, p in enumerate(params):

        def f(q, k=k):
            args = list(params)
            args[k] = q
            return F(x, *args)

        Jp = torch.autograd.functional.jacobian(f, p).reshape(n, -1)
        out.append((-torch.linalg.solve(Jx, Jp)).reshape(*x.shape, *p.shape))
    return out


# --- solver tests: a small regression problem and the implicit-vs-unrolled comparison ---------


def regression_data(seed: int = 0, n: int = 30, d: int = 6):
    """A well-conditioned ``(X, y)``: ``X (n, d)`` with a diagonal boost, ``y (n,)``."""
    g = gen(seed)
    X = torch.randn(n, d, generator=g, dtype=DT) / n**0.5 + 0.4 * torch.eye(n, d, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    return X, y


def assert_implicit_matches_unrolled(make_case) -> None:
    """``make_case(unroll=...) -> (solver, args)``; at convergence the implicit and unrolled
    gradients of a loss of the solution, in ``t`` and ``y``, must agree."""
    X, y = regression_data(9)
    t = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.4, 0.6], dtype=DT)
    grads = []
    for unroll in (False, True):
        solver, args = make_case(unroll=unroll)
        tt, yy = t.clone().requires_grad_(), y.clone().requires_grad_()
        w = solver.run(torch.zeros(6, dtype=DT), *args(X, yy, tt)).params
        loss = ((w - 0.1) ** 2).sum()
        grads.append(torch.autograd.grad(loss, (tt, yy)))
    for gi, gu in zip(*grads):
        torch.testing.assert_close(gi, gu, rtol=1e-7, atol=1e-9)


def assert_failure_is_reported(make_case, maxiter: int) -> None:
    """``make_case(on_failure=...) -> (solver, args)`` stopped after ``maxiter`` iterations:
    the failure warns by default, raises with ``on_failure="raise"``, is silent with
    ``"ignore"``, and the state holds the iteration count and the error."""
    X, y = regression_data(9)
    t = torch.full((6,), 0.2, dtype=DT)
    solver, args = make_case(on_failure="warn")
    solver.maxiter = maxiter
    init = torch.zeros(6, dtype=DT)
    with pytest.warns(it.ConvergenceWarning, match="did not converge"):
        out = solver.run(init, *args(X, y, t))
    assert int(out.state.iter_num) == maxiter and out.state.error > solver.tol
    solver.on_failure = "raise"
    with pytest.raises(it.ConvergenceError, match=f"maxiter={maxiter}"):
        solver.run(init, *args(X, y, t))
    solver.on_failure = "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solver.run(init, *args(X, y, t))


# --- scripts (examples/, benchmarks/) ---------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """Import a script of the repository (``examples/x.py``, ``benchmarks/y.py``) as a module,
    without running its ``__main__`` block: those folders are not packages."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_example(name: str):
    """``examples/<name>.py`` as a module (see :func:`load_script`)."""
    return load_script(f"examples/{name}.py")


def random_qp(seed, B=3, n=6, m=8, p=1, dtype=DT, batched=True):
    """Feasible, strictly convex problems (qpth's construction): Q = LLᵀ + εI, h = G z₀ + s₀
    with s₀ > 0 so z₀ is strictly feasible, b = A z₀."""
    g = gen(seed)
    shape = (B,) if batched else ()
    L = torch.randn(*shape, n, n, generator=g, dtype=dtype)
    Q = L @ L.mT / n + 0.1 * torch.eye(n, dtype=dtype)
    c = torch.randn(*shape, n, generator=g, dtype=dtype)
    G = torch.randn(*shape, m, n, generator=g, dtype=dtype)
    z0 = torch.randn(*shape, n, generator=g, dtype=dtype)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(*shape, m, generator=g, dtype=dtype)
    A = torch.randn(*shape, p, n, generator=g, dtype=dtype)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    return Q, c, A, b, G, h


def infeasible_qp():
    """A QP whose constraints cannot hold: x₁ ≤ −1 and x₁ ≥ 1; arguments of ``QP.run``."""
    Q = torch.eye(2, dtype=DT)
    c = torch.zeros(2, dtype=DT)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT)  # x₁ ≤ −1 and x₁ ≥ 1
    h = torch.tensor([-1.0, -1.0], dtype=DT)
    return (Q, c), None, (G, h)
