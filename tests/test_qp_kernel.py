"""implicit_torch::qp_ipm, the interior-point iterations of QP: the compiled CPU kernel
(csrc/cpu/qp_ipm_cpu.cpp) against the batched PyTorch loop of QP it replaces (same iterates,
iteration counts, errors and convergence flags; when it is (not) used), the pure-PyTorch
fallback kernel (implicit_torch/ops/_qp_reference.py) against both, opcheck and bad input.
Tests of the compiled kernel skip without the extension; the fallback's always run."""

import pytest
import torch
from problems import infeasible_qp as infeasible
from problems import random_qp

import implicit_torch.solvers.qp as qp_module
from implicit_torch import ops
from implicit_torch.ops import _registration
from implicit_torch.ops._qp_reference import qp_ipm_reference
from implicit_torch.solvers.qp import _IPM, QP, _Data

needs_kernel = pytest.mark.skipif(
    not _registration.qp_ipm_available(), reason="the compiled extension is not loaded"
)
DT = torch.float64
op = torch.ops.implicit_torch.qp_ipm


@needs_kernel
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


@needs_kernel
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


@needs_kernel
def test_kernel_matches_loop_in_float32_compute(monkeypatch):
    Q, c, _, _, G, h = random_qp(1, B=8, n=5, m=6, p=0)
    kernel, loop = run_both(monkeypatch, (Q, c), None, (G, h), compute_dtype=torch.float32)
    torch.testing.assert_close(kernel.params.primal, loop.params.primal, atol=1e-4, rtol=0)
    assert torch.equal(kernel.state.converged, loop.state.converged)


@needs_kernel
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


@needs_kernel
def test_infeasible_problem_is_reported_the_same(monkeypatch):
    with pytest.warns(Warning, match="did not converge"):
        kernel, loop = run_both(monkeypatch, *infeasible(), maxiter=30)
    assert not bool(kernel.state.converged) and not bool(loop.state.converged)
    torch.testing.assert_close(kernel.state.error, loop.state.error, rtol=1e-6, atol=0)


@needs_kernel
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


@needs_kernel
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
    # The compiled kernel when loaded, the pure-PyTorch one otherwise (both: CI runs this file
    # with and without the extension).
    args = kernel_args(ipm_for(5, p=1))
    torch.library.opcheck(op.default, args)
    torch.library.opcheck(op.default, op_inputs(*random_qp(6, B=2, n=3, m=4, p=0)))


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
    with pytest.raises((ValueError, TypeError), match=match):
        op(*args)
    with pytest.raises((ValueError, TypeError), match=match):
        qp_ipm_reference(*args)


def _bad(index, value):
    """kernel_args(ipm_for(6)) (B=3, n=4, m=5, p=0: N=9, k=5) with argument ``index`` changed;
    ``value`` is the new argument or a function of the old one."""

    def make():
        args = list(kernel_args(ipm_for(6)))
        args[index] = value(args[index]) if callable(value) else value
        return args

    return make


def _all_long():
    return [a.long() if isinstance(a, torch.Tensor) else a for a in kernel_args(ipm_for(6))]


# case -> (arguments, the error, its message: values as Python writes them)
BAD_QP = {
    "int-dtype": (
        _all_long,
        TypeError,
        "qp_ipm: the data must be float32 or float64, got torch.int64",
    ),
    "q-shape": (
        _bad(1, torch.zeros(3, 7, dtype=DT)),
        ValueError,
        "qp_ipm: q must have shape (3, 9), got (3, 7)",
    ),
    "q-1d": (
        _bad(1, torch.zeros(3, dtype=DT)),
        ValueError,
        "qp_ipm: q must have shape (3, 9), got (3,)",
    ),
    "W-dtype": (
        _bad(3, lambda W: W.float()),
        TypeError,
        "qp_ipm: W has dtype torch.float32 but K has torch.float64",
    ),
    "T-shape": (
        _bad(4, lambda T: T[:, :, :-1]),
        ValueError,
        "qp_ipm: T must have shape (3, 5, 14), got (3, 5, 13)",
    ),
    "M1-2d": (
        _bad(2, lambda M1: M1[0]),
        ValueError,
        "qp_ipm: K, M1, W and nGt must be batched matrices (3-d)",
    ),
    "no-inequality": (
        _bad(5, lambda nGt: nGt[:, :, :0]),
        ValueError,
        "qp_ipm: inconsistent sizes: N=9, n=4, k=5, m=0",
    ),
    "negative-maxiter": (_bad(6, -1), ValueError, "qp_ipm: maxiter must be non-negative, got -1"),
    "patience-0": (_bad(9, 0), ValueError, "qp_ipm: patience must be at least 1, got 0"),
    "nan-tol": (
        _bad(7, float("nan")),
        ValueError,
        "qp_ipm: tol must be finite and non-negative, got nan",
    ),
    "negative-tol": (
        _bad(7, -1e-300),
        ValueError,
        "qp_ipm: tol must be finite and non-negative, got -1e-300",
    ),
    "inf-acceptable-tol": (
        _bad(8, float("inf")),
        ValueError,
        "qp_ipm: acceptable_tol must be finite and non-negative, got inf",
    ),
    "negative-acceptable-tol": (
        _bad(8, -2.0),
        ValueError,
        "qp_ipm: acceptable_tol must be finite and non-negative, got -2.0",
    ),
}


@needs_kernel
@pytest.mark.parametrize("case", list(BAD_QP))
def test_bad_inputs_give_the_same_error_and_message_with_and_without_the_kernel(case):
    # The compiled kernel's TORCH_CHECKs (csrc/qp_ipm.h) and the pure-PyTorch kernel's checks
    # (ops/_qp_reference.py): the same exception type and the same text (issue 13).
    args = BAD_QP[case][0]()
    with pytest.raises((TypeError, ValueError)) as compiled:
        op(*args)
    with pytest.raises((TypeError, ValueError)) as reference:
        qp_ipm_reference(*args)
    assert compiled.type is reference.type
    assert str(compiled.value) == str(reference.value)


@pytest.mark.parametrize("case", list(BAD_QP))
def test_bad_input_messages_write_values_as_python_does(case):
    # Whichever kernel serves the op (CI runs this file with and without the extension).
    make, error, message = BAD_QP[case]
    for fn in (op, qp_ipm_reference):
        with pytest.raises(error) as caught:
            fn(*make())
        assert str(caught.value) == message


@needs_kernel
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


@needs_kernel
def test_large_problems_use_the_batched_loop(monkeypatch):
    monkeypatch.setattr(qp_module, "_KERNEL_MAX_CONSTRAINTS", 5)
    assert not QP()._use_compiled_kernel(ipm_for(7, m=6))
    assert QP()._use_compiled_kernel(ipm_for(7, m=5))


@needs_kernel
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


# ------------------------------------------------------------------------------------------
# The pure-PyTorch kernel (the op's fallback without the extension)
# ------------------------------------------------------------------------------------------


def op_inputs(Q, c, A, b, G, h, maxiter=50, tol=1e-10, acceptable_tol=1e-6, patience=3):
    """The op's arguments for batched data, formed from their definitions in csrc/qp_ipm.h
    (independently of QP's own construction)."""
    Qs = 0.5 * (Q + Q.mT)
    C = torch.cat([A, G], 1) if A is not None else G
    n, k, m = Q.shape[-1], C.shape[1], G.shape[1]
    Qinv = torch.linalg.inv(Qs)
    K = torch.cat([torch.cat([Qs, C.mT], -1), torch.cat([C, C.new_zeros(C.shape[0], k, k)], -1)], 1)
    q = torch.cat([c, -b, -h] if A is not None else [c, -h], -1)
    M1 = -torch.cat([Qinv, Qinv @ C.mT], -1)
    W = C @ Qinv @ C.mT
    eye = torch.eye(k, dtype=Q.dtype).expand(Q.shape[0], k, k)
    T = torch.cat([-C @ Qinv, eye, C @ Qinv @ G.mT], -1)
    assert K.shape[1] == n + k and T.shape[-1] == n + k + m
    return K, q, M1, W, T, -G.mT, maxiter, tol, acceptable_tol, patience


def qp_data(seed, p, **kw):
    Q, c, A, b, G, h = random_qp(seed, **kw, p=p)
    return (Q, c, A, b, G, h) if p else (Q, c, None, None, G, h)


@needs_kernel
@pytest.mark.parametrize("p", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_kernel(p, dtype):
    data = [None if t is None else t.to(dtype) for t in qp_data(10 + p, p, B=12, n=7, m=9)]
    tol, acceptable = (1e-10, 1e-6) if dtype == torch.float64 else (1e-6, 1e-3)
    args = op_inputs(*data, tol=tol, acceptable_tol=acceptable)
    z, iters, error, converged = op(*args)  # the compiled kernel
    zr, itr, er, cr = qp_ipm_reference(*args)
    assert bool(converged.all()) and torch.equal(converged, cr)
    if dtype == torch.float64:
        assert torch.equal(iters, itr)
        torch.testing.assert_close(zr, z, atol=1e-10, rtol=0)
        torch.testing.assert_close(er, error, rtol=1e-3, atol=1e-14)
    else:  # the kernel's sums run in another order, which can move the stop by one step
        same = iters == itr
        assert int((iters - itr).abs().max()) <= 1 and int(same.sum()) >= 8
        torch.testing.assert_close(zr[same], z[same], atol=1e-4, rtol=0)
        torch.testing.assert_close(zr, z, atol=1e-3, rtol=0)


@needs_kernel
def test_reference_matches_kernel_when_they_stop_early():
    # An infeasible problem (stalls unconverged), a problem cut by maxiter, degenerate data
    # whose first factorisation fails (NaN), NaN data and a good problem, in one batch.
    (Q, c), _, (G, h) = infeasible()
    good = random_qp(3, B=1, n=2, m=2, p=0)
    Q = torch.stack([Q, good[0][0], Q, Q])
    c = torch.stack([c, good[1][0], torch.full_like(c, float("nan")), c])
    G, h = torch.stack([G, good[4][0], G, G]), torch.stack([h, good[5][0], h, h])
    args = list(op_inputs(Q, c, None, None, G, h))
    args[3] = args[3].clone()
    args[3][3] = -1.0  # W negative definite: the start cannot be factored
    for maxiter in (50, 2):
        args[6] = maxiter
        kernel, ref = op(*args), qp_ipm_reference(*args)
        assert torch.equal(kernel[1], ref[1]) and torch.equal(kernel[3], ref[3])
        torch.testing.assert_close(ref[0], kernel[0], atol=1e-10, rtol=0, equal_nan=True)
        torch.testing.assert_close(ref[2], kernel[2], rtol=1e-6, atol=0, equal_nan=True)
    assert ref[3].tolist() == [False, False, False, False]  # maxiter 2 stops the good one too
    assert bool(ref[0][3].isnan().all()) and bool(ref[2][3].isnan()) and ref[1][3] == 0


@pytest.mark.parametrize("p", [0, 2])
def test_reference_matches_the_qp_loop(monkeypatch, p):
    # The batched PyTorch loop of QP runs the same iterations on its own construction.
    data = qp_data(20 + p, p, B=8, n=6, m=7)
    monkeypatch.setattr(qp_module, "_USE_COMPILED_KERNEL", False)
    out = QP().run(None, data[:2], data[2:4] if p else None, data[4:])
    z, iters, error, converged = qp_ipm_reference(*op_inputs(*data))
    assert bool(converged.all()) and torch.equal(out.state.converged, converged)
    assert torch.equal(out.state.iter_num, iters)
    torch.testing.assert_close(z[:, :6], out.params.primal, atol=1e-10, rtol=0)
    torch.testing.assert_close(z[:, 6 + p :], out.params.dual_ineq, atol=1e-10, rtol=0)
    torch.testing.assert_close(error, out.state.error, rtol=1e-3, atol=1e-14)


def test_reference_solves_the_kkt_conditions():
    # An independent check of the answer: stationarity, feasibility, complementarity, λ ≥ 0.
    Q, c, A, b, G, h = random_qp(30, B=5, n=6, m=8, p=2)
    z, _, _, converged = qp_ipm_reference(*op_inputs(Q, c, A, b, G, h))
    x, nu, lam = z[:, :6], z[:, 6:8], z[:, 8:]
    assert bool(converged.all())
    mv = lambda M, v: (M @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    stationarity = mv(Q, x) + c + mv(A.mT, nu) + mv(G.mT, lam)
    torch.testing.assert_close(stationarity, torch.zeros_like(x), atol=1e-8, rtol=0)
    torch.testing.assert_close(mv(A, x), b, atol=1e-8, rtol=0)
    slack = h - mv(G, x)
    assert bool((slack > -1e-9).all()) and bool((lam > -1e-9).all())
    assert float((lam * slack).abs().max()) < 1e-8


def test_fallback_outputs_do_not_require_grad():
    args = list(op_inputs(*qp_data(31, 0, B=2, n=3, m=4)))
    args[1] = args[1].clone().requires_grad_()
    outs = op(*args)
    assert not any(t.requires_grad for t in outs)


def test_fake_kernel_checks_and_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = op_inputs(*qp_data(32, 1, B=3, n=4, m=5))
    with FakeTensorMode(allow_non_fake_inputs=True):
        z, iters, error, converged = op(*args)
        with pytest.raises(ValueError, match="patience"):
            op(*args[:-1], 0)
    assert z.shape == (3, 4 + 1 + 5) and iters.dtype == torch.int64
    assert error.shape == (3,) and converged.dtype == torch.bool
