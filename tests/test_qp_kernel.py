"""The compiled interior-point kernel of QP (implicit_torch::qp_ipm, csrc/cpu/qp_ipm_cpu.cpp)
against the batched PyTorch loop it replaces on the CPU: same iterates, iteration counts,
errors and convergence flags; when it is (not) used; opcheck; bad input."""

import pytest
import torch
from problems import infeasible_qp as infeasible
from problems import random_qp

import implicit_torch.solvers.qp as qp_module
from implicit_torch import ops
from implicit_torch.ops import _registration
from implicit_torch.solvers.qp import _IPM, QP, _Data

pytestmark = pytest.mark.skipif(
    not _registration.qp_ipm_available(), reason="the compiled extension is not loaded"
)
DT = torch.float64


def test_the_extension_has_the_kernel():
    # A loaded extension without qp_ipm is a stale build: this must not pass silently.
    assert ops.extension_available() and _registration.qp_ipm_available()


def run_both(monkeypatch, *args, **options):
    """``QP(**options).run(None, *args)`` by the kernel and by the PyTorch loop."""
    outs = []
    for use_kernel in (True, False):
        monkeypatch.setattr(qp_module, "_USE_COMPILED_KERNEL", use_kernel)
        outs.append(QP(**options).run(None, *args))
    return outs


def assert_same(kernel, loop, atol):
    for a, b in zip(kernel.params, loop.params):
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert torch.equal(kernel.state.iter_num, loop.state.iter_num)
    assert torch.equal(kernel.state.converged, loop.state.converged)
    torch.testing.assert_close(kernel.state.error, loop.state.error, rtol=1e-3, atol=1e-14)


@pytest.mark.parametrize("p", [0, 2])
@pytest.mark.parametrize("shared", [False, True])
def test_kernel_matches_pytorch_loop(monkeypatch, p, shared):
    Q, c, A, b, G, h = random_qp(0, B=16, n=7, m=9, p=p)
    if shared:  # Q and G shared by the batch, h and b kept feasible for each problem
        Q, G = Q[0], G[0]
        z0 = torch.randn(16, 7, generator=torch.Generator().manual_seed(1), dtype=DT)
        h = z0 @ G.mT + 0.5
        b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    params_eq = (A, b) if p else None
    kernel, loop = run_both(monkeypatch, (Q, c), params_eq, (G, h))
    assert bool(kernel.state.converged.all())
    assert_same(kernel, loop, atol=1e-10)


def test_kernel_matches_loop_in_float32_compute(monkeypatch):
    Q, c, _, _, G, h = random_qp(1, B=8, n=5, m=6, p=0)
    kernel, loop = run_both(monkeypatch, (Q, c), None, (G, h), compute_dtype=torch.float32)
    torch.testing.assert_close(kernel.params.primal, loop.params.primal, atol=1e-4, rtol=0)
    assert torch.equal(kernel.state.converged, loop.state.converged)


def test_kernel_gradients_match_loop(monkeypatch):
    Q, c, A, b, G, h = random_qp(2, B=4, n=5, m=7, p=1)
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=DT)
    grads = []
    for use_kernel in (True, False):
        monkeypatch.setattr(qp_module, "_USE_COMPILED_KERNEL", use_kernel)
        leaves = [t.detach().clone().requires_grad_() for t in (Q, c, A, b, G, h)]
        x = QP().run(None, tuple(leaves[:2]), tuple(leaves[2:4]), tuple(leaves[4:])).params
        grads.append(torch.autograd.grad((w * x.primal).sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_infeasible_problem_is_reported_the_same(monkeypatch):
    with pytest.warns(Warning, match="did not converge"):
        kernel, loop = run_both(monkeypatch, *infeasible(), maxiter=30)
    assert not bool(kernel.state.converged) and not bool(loop.state.converged)
    torch.testing.assert_close(kernel.state.error, loop.state.error, rtol=1e-6, atol=0)


def test_nan_data_is_not_converged(monkeypatch):
    Q, c, _, _, G, h = random_qp(3, B=3, n=4, m=5, p=0)
    c = c.clone()
    c[1, 0] = float("nan")
    monkeypatch.setattr(qp_module, "_USE_COMPILED_KERNEL", True)
    with pytest.warns(Warning, match="did not converge on 1 of 3"):
        out = QP().run(None, (Q, c), None, (G, h))
    assert out.state.converged.tolist() == [True, False, True]


def ipm_for(seed, B=3, n=4, m=5, p=0):
    Q, c, A, b, G, h = random_qp(seed, B=B, n=n, m=m, p=p)
    A, b = (A, b) if p else (None, None)
    return _IPM(_Data(Q, c, A, b, G, h), Q, c, A, b, G, h)


def kernel_args(ipm):
    return (ipm.K, ipm.q.squeeze(1), ipm.M1, ipm.W, ipm.T, ipm.neg_Gt, 50, 1e-10, 1e-6, 3)


def test_kernel_is_used_only_where_it_applies():
    solver = QP()
    ipm = ipm_for(0)
    assert solver._use_compiled_kernel(ipm)
    assert not QP(verbose=True)._use_compiled_kernel(ipm)
    Q, c, _, _, G, h = random_qp(0, B=3, n=4, m=5)
    Q = Q.requires_grad_()  # unrolled: autograd must see the PyTorch loop
    recorded = _IPM(_Data(Q, c, None, None, G, h), Q, c, None, None, G, h)
    assert not solver._use_compiled_kernel(recorded)
    with torch.no_grad():
        assert solver._use_compiled_kernel(recorded)


def test_unrolled_qp_differentiates_through_the_loop():
    Q, c, _, _, G, h = random_qp(4, B=2, n=4, m=5, p=0)
    c = c.requires_grad_()
    x = QP(unroll=True).run(None, (Q, c), None, (G, h)).params.primal
    (g,) = torch.autograd.grad(x.sum(), c)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_opcheck():
    args = kernel_args(ipm_for(5, p=1))
    torch.library.opcheck(torch.ops.implicit_torch.qp_ipm.default, args)


@pytest.mark.parametrize(
    "index, value, match",
    [
        (1, torch.zeros(3, 7, dtype=DT), "q must have shape"),
        (3, torch.zeros(3, 5, 5, dtype=torch.float32), "W has dtype"),
        (0, torch.zeros(3, 9, 9, dtype=torch.int64), "float32 or float64"),
    ],
)
def test_bad_input_raises_clear_errors(index, value, match):
    args = list(kernel_args(ipm_for(6)))
    args[index] = value
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        torch.ops.implicit_torch.qp_ipm(*args)


def test_singular_q_is_reported_by_both_paths(monkeypatch):
    # A linear program (Q = 0) is outside the interior point's assumptions (Qₛ definite): both
    # paths must say so rather than return a silent answer.
    n, m = 4, 6
    Q = torch.zeros(2, n, n, dtype=DT)
    c = torch.randn(2, n, generator=torch.Generator().manual_seed(0), dtype=DT)
    G = torch.cat([torch.eye(n, dtype=DT), -torch.eye(n, dtype=DT)])[:m].expand(2, m, n)
    h = torch.ones(2, m, dtype=DT)
    with pytest.warns(Warning, match="did not converge on 2 of 2"):
        kernel, loop = run_both(monkeypatch, (Q, c), None, (G, h))
    assert not bool(kernel.state.converged.any()) and not bool(loop.state.converged.any())


def test_large_problems_use_the_batched_loop(monkeypatch):
    monkeypatch.setattr(qp_module, "_KERNEL_MAX_CONSTRAINTS", 5)
    assert not QP()._use_compiled_kernel(ipm_for(7, m=6))
    assert QP()._use_compiled_kernel(ipm_for(7, m=5))


def test_threads_do_not_change_the_result(monkeypatch):
    Q, c, _, _, G, h = random_qp(8, B=32, n=6, m=7, p=0)
    monkeypatch.setattr(qp_module, "_USE_COMPILED_KERNEL", True)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(QP().run(None, (Q, c), None, (G, h)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0].params.primal, outs[1].params.primal)
    assert torch.equal(outs[0].state.iter_num, outs[1].state.iter_num)
