"""Soak (issue 13): long runs, many problems, threads, determinism.

* memory stays flat over 2000 training steps (RSS and the count of live Python objects; the
  bound is a fraction of what leaking one step's saved tensors per step would add, never a
  number tuned to one run);
* B = 100,000 independent 2 × 2 problems (``batched=True``) against the closed form, per
  problem, with a bound from each problem's own conditioning;
* two Python threads solving concurrently get the results of sequential runs, and the
  per-thread state (torch.func levels, host checks) does not leak between threads;
* the same inputs give bitwise the same outputs twice.

No timing is asserted anywhere.
"""

from __future__ import annotations

import functools
import gc
import os
import threading
import warnings

import pytest
import torch
from _refs import DT, EPS, gen

import implicit_torch as it


@pytest.fixture(autouse=True)
def _convergence_warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error", it.ConvergenceWarning)
        yield


def ridge_F(w, lam, X, y):
    return X.T @ (X @ w - y) + lam * w


def ridge_solver(init, lam, X, y):
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype), X.T @ y)


# ------------------------------------------------------------------------------------------
# memory over 2000 training steps
# ------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("solve", ["cg", "lu"])
def test_memory_is_flat_over_2000_training_steps(solve):
    m, d = 2000, 5
    g = gen(0)
    X = torch.randn(m, d, generator=g, dtype=DT)
    y = torch.randn(m, generator=g, dtype=DT)
    log_lam = torch.zeros((), dtype=DT, requires_grad=True)
    scale = torch.ones((), dtype=DT, requires_grad=True)
    opt = torch.optim.SGD([log_lam, scale], lr=1e-4)
    # Each step builds X_s = scale · X (m·d·8 bytes), which the engine saves for the backward:
    # leaking one step's graph leaks at least that much.
    per_step = X.numel() * X.element_size()

    def step():
        opt.zero_grad()
        Xs = X * scale
        w = it.implicit_solve(ridge_solver, ridge_F, None, log_lam.exp(), Xs, y, solve=solve)
        ((w - 0.1) ** 2).sum().backward()
        opt.step()

    for _ in range(100):  # warm-up: lazy imports, allocator pools, caches
        step()
    gc.collect()
    rss0, objects0 = _rss(), len(gc.get_objects())
    steps = 2000
    for _ in range(steps):
        step()
    gc.collect()
    rss_growth, object_growth = _rss() - rss0, len(gc.get_objects()) - objects0
    # Leaking a quarter of each step's saved tensors would add steps · per_step / 4 = 20 MB;
    # leaking one Python object per step would add 2000 objects.
    assert rss_growth < steps * per_step / 4, (rss_growth, per_step)
    assert object_growth < steps / 4, object_growth


# ------------------------------------------------------------------------------------------
# 100,000 tiny problems
# ------------------------------------------------------------------------------------------


def _inv2(A):
    a, b, c, d = A[:, 0, 0], A[:, 0, 1], A[:, 1, 0], A[:, 1, 1]
    det = a * d - b * c
    return (
        torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[:, None, None]
    )


@pytest.mark.parametrize("solve", ["lu", "auto", "cg"])
def test_100k_batched_2x2_problems_match_the_closed_form(solve):
    B = 100_000
    g = gen(1)
    M = torch.randn(B, 2, 2, generator=g, dtype=DT)
    A = M @ M.mT + 0.5 * torch.eye(2, dtype=DT)  # SPD, κ ≤ ~100
    b = torch.randn(B, 2, generator=g, dtype=DT)
    v = torch.randn(B, 2, generator=g, dtype=DT)

    def F(x, A, b):
        return torch.einsum("bij,bj->bi", A, x) - b

    def solver(init, A, b):
        return torch.einsum("bij,bj->bi", _inv2(A), b)

    tol = 1e-13
    solve_fn = functools.partial(it.solve_cg, tol=tol) if solve == "cg" else solve
    Ar, br = A.clone().requires_grad_(), b.clone().requires_grad_()
    x = it.implicit_solve(solver, F, None, Ar, br, batched=True, solve=solve_fn)
    gA, gb = torch.autograd.grad((v * x).sum(), (Ar, br))

    # closed forms: x = A⁻¹ b, ∂(vᵀx)/∂b = A⁻ᵀ v, ∂(vᵀx)/∂A = −(A⁻ᵀ v) xᵀ
    Ainv = _inv2(A)
    ref_x = torch.einsum("bij,bj->bi", Ainv, b)
    ref_gb = torch.einsum("bji,bj->bi", Ainv, v)
    ref_gA = -ref_gb[:, :, None] * ref_x[:, None, :]
    eig = torch.linalg.eigvalsh(A)
    kappa = eig[:, -1] / eig[:, 0]
    # per problem: ‖δ‖ ≤ 10 κᵢ (tol + 2 eps) ‖ref‖ (the forward is the closed form itself)
    rel = 10 * kappa * ((tol if solve == "cg" else 0.0) + 2 * EPS) + 2 * EPS

    def check(got, ref, what):
        err = torch.linalg.vector_norm((got - ref).reshape(B, -1), dim=1)
        size = torch.linalg.vector_norm(ref.reshape(B, -1), dim=1)
        bad = int((err > rel * size + EPS).sum())
        assert bad == 0, f"{what}: {bad} of {B} problems outside their bound"

    check(x.detach(), ref_x, "x")
    check(gb, ref_gb, "grad b")
    check(gA, ref_gA, "grad A")


# ------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------


def _ridge_task(seed, solve):
    g = gen(seed)
    X = torch.randn(20, 5, generator=g, dtype=DT)
    y = torch.randn(20, generator=g, dtype=DT)
    lam = torch.tensor(0.3 + seed % 7 * 0.1, dtype=DT, requires_grad=True)
    Xr = X.clone().requires_grad_()
    w = it.implicit_solve(ridge_solver, ridge_F, None, lam, Xr, y, solve=solve)
    gl, gX = torch.autograd.grad((w**2).sum(), (lam, Xr))
    H = X.T @ X + lam.detach() * torch.eye(5, dtype=DT)
    return w.detach(), gl, gX, float(torch.linalg.cond(H))


def _run_threads(jobs):
    """Run each job (a callable) in its own thread; return results, re-raising any error."""
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def runner(i):
        try:
            barrier.wait()
            results[i] = jobs[i]()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("solves", [("cg", "gmres"), ("lu", "cg"), ("auto", "bicgstab")])
def test_two_threads_give_the_sequential_results(solves):
    seeds = [list(range(0, 40, 2)), list(range(1, 40, 2))]

    def job(k):
        return lambda: [_ridge_task(s, solves[k]) for s in seeds[k]]

    sequential = [job(0)(), job(1)()]
    concurrent = _run_threads([job(0), job(1)])
    for seq, con in zip(sequential, concurrent):
        for (w, gl, gX, kappa), (w2, gl2, gX2, _) in zip(seq, con):
            # the same computation: equal up to the rounding of differently-threaded kernels,
            # ‖δ‖ ≤ 10 κ (1e-10 + n eps) ‖·‖ (a race would be off by O(1))
            rel = 10 * kappa * (1e-10 + 5 * EPS)
            for a, b in ((w, w2), (gl, gl2), (gX, gX2)):
                assert float((a - b).norm()) <= rel * float(b.norm()) + EPS


def test_per_thread_state_does_not_leak_between_threads():
    # Thread A runs torch.func transforms continuously; thread B's solves must still be
    # checked on the host (they are not under any transform): a cg capped at 1 iteration
    # must raise every time, never be skipped as if B were inside A's vmap/jacrev.
    def T(x, W, u):
        return torch.tanh(W @ x + u)

    W = 0.3 * torch.eye(4, dtype=DT)
    fp = it.custom_fixed_point(T)(lambda init, W, u: _iterate(T, W, u))
    stop = threading.Event()

    def transforms():
        count = 0
        u = torch.linspace(-1, 1, 4, dtype=DT)
        while not stop.is_set() or count < 5:
            torch.func.vmap(torch.func.jacrev(lambda u: fp(None, W, u)))(u.expand(3, 4))
            count += 1
        return count

    def strict_solves():
        raised = 0
        try:
            for s in range(30):
                X = torch.randn(30, 12, generator=gen(s), dtype=DT)
                y = torch.randn(30, generator=gen(s + 100), dtype=DT)
                lam = torch.tensor(1e-3, dtype=DT, requires_grad=True)
                capped = functools.partial(it.solve_cg, maxiter=1, on_failure="raise")
                w = it.implicit_solve(ridge_solver, ridge_F, None, lam, X, y, solve=capped)
                try:
                    torch.autograd.grad(w.sum(), lam)
                except it.ConvergenceError:
                    raised += 1
        finally:
            stop.set()
        return raised

    _, raised = _run_threads([transforms, strict_solves])
    assert raised == 30


def _iterate(T, W, u):
    x = torch.zeros_like(u)
    for _ in range(100):
        x = T(x, W, u)
    return x


def test_two_threads_calling_batched_cg_get_the_sequential_results():
    Bn, n = 400, 12
    g = gen(2)
    Q, _ = torch.linalg.qr(torch.randn(2, Bn, n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, 2, n, dtype=DT)
    A = Q @ torch.diag_embed(eig.expand(2, Bn, n)) @ Q.mT
    A = 0.5 * (A + A.mT)
    b = torch.randn(2, Bn, n, generator=g, dtype=DT)

    def job(k):
        return lambda: [it.ops.batched_cg(A[k], b[k], rtol=1e-12)[0] for _ in range(5)]

    sequential = [job(0)(), job(1)()]
    concurrent = _run_threads([job(0), job(1)])
    for seq, con in zip(sequential, concurrent):
        for x, y in zip(seq, con):
            # each system is solved by one thread, in a fixed order: bitwise the same
            assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------


def _det_custom_root(solve):
    def run():
        g = gen(3)
        X = torch.randn(25, 6, generator=g, dtype=DT)
        y = torch.randn(25, generator=g, dtype=DT)
        lam = torch.tensor(0.2, dtype=DT, requires_grad=True)
        w = it.implicit_solve(ridge_solver, ridge_F, None, lam, X, y, solve=solve)
        return (w.detach(), *torch.autograd.grad((w**3).sum(), lam))

    return run


def _det_batched():
    g = gen(4)
    M = torch.randn(64, 20, 20, generator=g, dtype=DT)
    A = M @ M.mT / 20 + torch.eye(20, dtype=DT)
    b = torch.randn(64, 20, generator=g, dtype=DT).requires_grad_()

    def F(x, A, b):
        return torch.einsum("bij,bj->bi", A, x) - b

    x = it.implicit_solve(lambda i, A, b: torch.linalg.solve(A, b), F, None, A, b,
                          batched=True, solve="auto")  # fmt: skip
    return (x.detach(), *torch.autograd.grad(x.pow(2).sum(), b))


def _det_deq():
    torch.manual_seed(5)
    cell = torch.nn.Sequential(torch.nn.Linear(8, 8, dtype=DT), torch.nn.Tanh())

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = cell

        def forward(self, z, x):
            return 0.5 * self.net(z) + x

    layer = it.nn.DEQ(Cell(), tol=1e-10, maxiter=200)
    x = torch.randn(4, 8, generator=gen(6), dtype=DT)
    z = layer(x)
    return (z.detach(), *torch.autograd.grad(z.sum(), list(layer.parameters())))


def _det_batched_cg():
    g = gen(7)
    M = torch.randn(300, 16, 16, generator=g, dtype=DT)
    A = M @ M.mT + 16 * torch.eye(16, dtype=DT)
    b = torch.randn(300, 16, generator=g, dtype=DT)
    x, info = it.ops.batched_cg(A, b, rtol=1e-12)
    return x, info.iterations, info.residual_norm


def _det_qp():
    g = gen(8)
    M = torch.randn(4, 4, generator=g, dtype=DT)
    Q = M @ M.T + 4 * torch.eye(4, dtype=DT)
    p = torch.randn(3, 4, generator=g, dtype=DT).requires_grad_()
    G = torch.randn(6, 4, generator=g, dtype=DT)
    h = torch.rand(6, generator=g, dtype=DT) + 0.1
    x = it.nn.QPLayer()(Q, p, G, h)
    return (x.detach(), *torch.autograd.grad(x.sum(), p))


DETERMINISM = {
    "custom_root-cg": _det_custom_root("cg"),
    "custom_root-gmres": _det_custom_root("gmres"),
    "custom_root-bicgstab": _det_custom_root("bicgstab"),
    "batched-auto": _det_batched,
    "deq": _det_deq,
    "batched_cg": _det_batched_cg,
    "qp_layer": _det_qp,
}


@pytest.mark.parametrize("case", list(DETERMINISM))
def test_same_inputs_give_bitwise_the_same_outputs(case):
    first, second = DETERMINISM[case](), DETERMINISM[case]()
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
