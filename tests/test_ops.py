"""implicit_torch.ops.batched_cg and the implicit_torch::batched_cg op.

The op is tested against independent float64 references (torch.linalg.solve, and the
pure-torch kernel, which follows the compiled kernels' algorithm step for step). CI runs this
file twice: with the compiled extension and with IMPLICIT_TORCH_NO_EXT=1 (Python kernel).
Tests marked ``cuda`` need a GPU and skip without one.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import implicit_torch.ops as ops
from implicit_torch.ops import _registration
from implicit_torch.ops._reference import batched_cg_reference

op = torch.ops.implicit_torch.batched_cg
HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[cuda, needs_gpu])]
DTYPES = [torch.float32, torch.float64]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def spd_batch(B, n, dtype=torch.float64, cond=10.0, seed=0, device="cpu"):
    """B symmetric matrices with eigenvalues log-spaced in [1, cond] (built in float64)."""
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=gen(seed), dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    A = Q @ torch.diag_embed(eig.expand(B, n)) @ Q.transpose(1, 2)
    return (0.5 * (A + A.transpose(1, 2))).to(dtype=dtype, device=device)


def rhs(B, n, dtype=torch.float64, seed=1, device="cpu"):
    return torch.randn(B, n, generator=gen(seed), dtype=torch.float64).to(
        dtype=dtype, device=device
    )


def rel_err(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    return (torch.linalg.vector_norm(x - ref, dim=-1) / torch.linalg.vector_norm(ref, dim=-1)).max()


def solve64(A, b):
    return torch.linalg.solve(A.double().cpu(), b.double().cpu())


def true_residual(A, b, x):
    A, b, x = A.double().cpu(), b.double().cpu(), x.double().cpu()
    return torch.linalg.vector_norm(b - (A @ x.unsqueeze(-1)).squeeze(-1), dim=-1)


# ------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------


def test_schema_is_the_one_python_expects():
    expected = torch._C.parse_schema(f"{_registration.NAMESPACE}::{_registration.SCHEMA}")
    assert str(op.default._schema) == str(expected)


def test_extension_available_follows_the_environment():
    disabled = _registration.extension_disabled()
    if disabled:
        assert not ops.extension_available()
    assert ops.extension_available("cpu") == ("CPU" in _registration.COMPILED_BACKENDS)
    for key in ("CPU", "CUDA"):  # every backend has a kernel, compiled or Python
        assert torch._C._dispatch_has_kernel_for_dispatch_key(_registration.QUALNAME, key)


@pytest.mark.skipif(
    os.environ.get("IMPLICIT_TORCH_STRICT_BUILD", "") in ("", "0"),
    reason="only CI (IMPLICIT_TORCH_STRICT_BUILD=1) promises a built extension",
)
def test_strict_build_means_the_extension_is_loaded():
    # CI builds with IMPLICIT_TORCH_STRICT_BUILD=1: the compiled CPU kernel must then serve the
    # op, unless the run disables it on purpose.
    if not _registration.extension_disabled():
        assert ops.extension_available("cpu")


def _run(code, *args, **env_vars):
    """Run ``code`` in a child Python with extra environment variables."""
    env = dict(os.environ, **env_vars)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    return subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


_SOLVE_SOME = """
    import sys, torch, implicit_torch.ops as ops
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (3, 17, 64, 370):
        M = torch.randn(4, n, n, generator=g, dtype=torch.float64)
        A = M @ M.transpose(1, 2) + n * torch.eye(n, dtype=torch.float64)
        b = torch.randn(4, n, generator=g, dtype=torch.float64)
        out += [ops.batched_cg(A, b, rtol=1e-12)[0], ops.batched_cg(A.float(), b.float())[0]]
    torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(not ops.extension_available("cpu"), reason="needs the compiled CPU kernel")
def test_cpu_baseline_and_avx2_copies_agree(tmp_path):
    # The CPU kernel is compiled twice (baseline and AVX2, chosen at run time);
    # IMPLICIT_TORCH_NO_AVX2=1 forces the baseline copy.
    results = []
    for flag in ("0", "1"):
        path = str(tmp_path / f"out{flag}.pt")
        proc = _run(_SOLVE_SOME, path, IMPLICIT_TORCH_NO_AVX2=flag)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(torch.load(path))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_ext_env_skips_a_built_extension():
    code = """
        import warnings
        warnings.simplefilter("error")  # no "extension unavailable" warning either
        import torch, implicit_torch.ops as ops
        assert not ops.extension_available(), "the extension was loaded"
        x, _ = ops.batched_cg(torch.eye(2).expand(1, 2, 2), torch.ones(1, 2))
        assert torch.allclose(x, torch.ones(1, 2))
    """
    proc = _run(code, IMPLICIT_TORCH_NO_EXT="1")
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,n", [(torch.float32, 513), (torch.float64, 370)])
def test_large_matrices(dtype, n):
    # Above 1 MiB per matrix the CPU kernel reads only the upper triangle (memory bound).
    A = spd_batch(2, n, dtype, cond=10.0, seed=n)
    b = rhs(2, n, dtype, seed=n + 1)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    x, info = ops.batched_cg(A, b, rtol=rtol)
    assert rel_err(x, solve64(A, b)) < (1e-8 if dtype == torch.float64 else 1e-3)
    _, itr, _ = batched_cg_reference(A, b, None, rtol, 0.0, 10 * n)
    assert (info.iterations - itr).abs().max() <= 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 5, 16, 32, 33, 64, 100])
def test_matches_linalg_solve_and_reference(device, dtype, n):
    B = 7
    A = spd_batch(B, n, dtype, cond=50.0, seed=n, device=device)
    b = rhs(B, n, dtype, seed=n + 1, device=device)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    x, info = ops.batched_cg(A, b, rtol=rtol, maxiter=20 * n + 20)
    assert x.shape == (B, n) and x.dtype == dtype and x.device.type == device
    assert info.iterations.dtype == torch.int64 and info.residual_norm.dtype == dtype
    assert rel_err(x, solve64(A, b)) < (1e-9 if dtype == torch.float64 else 1e-3)
    torch.testing.assert_close(
        info.residual_norm.double().cpu(), true_residual(A, b, x), rtol=0.05, atol=1e-5
    )
    xr, itr, _ = batched_cg_reference(A, b, None, rtol, 0.0, 20 * n + 20)
    # float32 rounding (the kernels sum dot products in another order and precision) moves the
    # stopping point by a few iterations at most
    assert (info.iterations - itr).abs().max() <= (2 if dtype == torch.float64 else 4)
    assert rel_err(x, xr) < (1e-9 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_jacobi_preconditioning(device):
    # Badly scaled SPD systems: A = S C S with C well conditioned; Jacobi undoes the scaling.
    B, n = 4, 24
    C = spd_batch(B, n, cond=4.0, seed=3)
    s = torch.logspace(-2, 2, n, dtype=torch.float64)
    A = (s[:, None] * C * s[None, :]).to(device)
    b = rhs(B, n, seed=4, device=device)
    x_plain, info_plain = ops.batched_cg(A, b, rtol=1e-10, maxiter=2000)
    x_jac, info_jac = ops.batched_cg(A, b, rtol=1e-10, maxiter=2000, jacobi=True)
    ref = solve64(A, b)
    assert rel_err(x_jac, ref) < 1e-6 and bool(info_jac.converged.all())
    assert bool((info_jac.iterations < info_plain.iterations).all())
    _, itr, _ = batched_cg_reference(A, b, None, 1e-10, 0.0, 2000, jacobi=True)
    assert (info_jac.iterations.cpu() - itr.cpu()).abs().max() <= 1
    assert rel_err(x_plain, ref) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_per_system_convergence_and_info(device):
    n = 20
    A = torch.stack([torch.eye(n, dtype=torch.float64), spd_batch(1, n, cond=1e3, seed=5)[0]])
    A = A.to(device)
    b = rhs(2, n, seed=6, device=device)
    x, info = ops.batched_cg(A, b, rtol=1e-10, maxiter=500)
    assert info.iterations[0] == 1 and info.iterations[1] > 10
    assert bool(info.converged.all())
    assert info["iterations"] is info.iterations  # mapping access too
    # a cap of 3 iterations stops the hard system, unconverged, and leaves the easy one alone
    x3, info3 = ops.batched_cg(A, b, rtol=1e-10, maxiter=3)
    assert info3.iterations.tolist() == [1, 3] and info3.converged.tolist() == [True, False]
    torch.testing.assert_close(x3[0], x[0])
    x0, info0 = ops.batched_cg(A, b, maxiter=0)
    assert info0.iterations.tolist() == [0, 0] and bool((x0 == 0).all())
    torch.testing.assert_close(info0.residual_norm, torch.linalg.vector_norm(b, dim=1))


@pytest.mark.parametrize("device", DEVICES)
def test_atol_and_warm_start(device):
    A = spd_batch(3, 10, seed=7, device=device)
    b = rhs(3, 10, seed=8, device=device)
    x_star = torch.linalg.solve(A, b)
    _, info = ops.batched_cg(A, b, x0=x_star, rtol=0.0, atol=1e-8)
    assert info.iterations.tolist() == [0, 0, 0]  # the exact solution needs no iteration
    _, info = ops.batched_cg(A, b, rtol=0.0, atol=1e-3)
    assert bool((info.residual_norm <= 1e-3).all())
    x, _ = ops.batched_cg(A, b, x0=torch.randn_like(b), rtol=1e-12)
    assert rel_err(x, x_star) < 1e-9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,n", [(0, 5), (3, 0), (0, 0), (0, 40)])
def test_empty_batches_and_systems(device, B, n):
    A = torch.zeros(B, n, n, device=device)
    b = torch.zeros(B, n, device=device)
    x, info = ops.batched_cg(A, b)
    assert x.shape == (B, n) and info.iterations.shape == (B,) and info.residual_norm.shape == (B,)
    assert bool((info.iterations == 0).all()) and bool(info.converged.all())


@pytest.mark.parametrize("device", DEVICES)
def test_large_batch(device):
    B, n = 1500, 6
    A = spd_batch(B, n, seed=9, device=device)
    b = rhs(B, n, seed=10, device=device)
    x, info = ops.batched_cg(A, b, rtol=1e-12)
    assert rel_err(x, solve64(A, b)) < 1e-9 and bool(info.converged.all())
    # the CPU kernel splits the batch over threads (tests otherwise run on one): same answer
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x2, info2 = ops.batched_cg(A, b, rtol=1e-12)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(x2, x) and torch.equal(info2.iterations, info.iterations)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_expanded_inputs(device):
    B, n = 5, 12
    A = spd_batch(B, n, seed=11, device=device)
    b = rhs(B, n, seed=12, device=device)
    x_ref, _ = ops.batched_cg(A, b, rtol=1e-12)
    At = A.transpose(1, 2)  # the same symmetric matrices, transposed strides
    b_strided = torch.stack([b, b], dim=-1)[..., 0]
    assert not At.is_contiguous() and not b_strided.is_contiguous()
    x, _ = ops.batched_cg(At, b_strided, rtol=1e-12)
    torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-12)
    # one matrix shared by the whole batch (stride 0), one right-hand side shared too
    A1 = A[:1].expand(B, n, n)
    b1 = b[:1].expand(B, n)
    x, _ = ops.batched_cg(A1, b1, rtol=1e-12)
    torch.testing.assert_close(x, x_ref[:1].expand(B, n), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Documented handling of bad values: stop, report unconverged, never hang
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_indefinite_and_singular_systems_stop_unconverged(device):
    n = 8
    eig = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)  # indefinite
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(13), dtype=torch.float64))
    indefinite = Q @ torch.diag(eig) @ Q.T
    A = torch.stack([indefinite, -torch.eye(n, dtype=torch.float64), torch.zeros(n, n)])
    A = torch.cat([A, spd_batch(1, n, seed=14)]).to(device)
    b = rhs(4, n, seed=15, device=device)
    x, info = ops.batched_cg(A, b, rtol=1e-10, maxiter=10_000)
    assert info.converged.tolist() == [False, False, False, True]
    assert int(info.iterations[:3].max()) < 10_000  # stopped by the curvature test, not the cap
    assert info.iterations[1] == 0 and info.iterations[2] == 0
    assert bool(torch.isfinite(x[1:]).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_stop_unconverged(device, bad):
    A = spd_batch(3, 6, seed=16, device=device)
    b = rhs(3, 6, seed=17, device=device)
    A[0, 2, 3] = bad
    b[1, 4] = bad
    x, info = ops.batched_cg(A, b, rtol=1e-10, maxiter=1000)
    assert info.converged.tolist() == [False, False, True]
    assert int(info.iterations.max()) < 1000
    assert rel_err(x[2:], solve64(A[2:], b[2:])) < 1e-9


def test_jacobi_with_nonpositive_diagonal_stops_at_once():
    A = spd_batch(2, 5, seed=18)
    A[0, 1, 1] = -1.0
    _, info = ops.batched_cg(A, rhs(2, 5, seed=19), jacobi=True, rtol=1e-10)
    assert info.iterations[0] == 0 and not bool(info.converged[0])
    assert bool(info.converged[1])


# ------------------------------------------------------------------------------------------
# Bad arguments: a Python exception from the wrapper, the raw op and the fake kernel
# ------------------------------------------------------------------------------------------

f64 = torch.float64
_A = torch.eye(4, dtype=f64).expand(3, 4, 4).contiguous()
_b = torch.ones(3, 4, dtype=f64)
BAD = {
    "A not square": (torch.ones(3, 4, 5, dtype=f64), _b, None, {}, ValueError),
    "A is 2-d": (torch.eye(4, dtype=f64), _b, None, {}, ValueError),
    "b wrong n": (_A, torch.ones(3, 5, dtype=f64), None, {}, ValueError),
    "b wrong batch": (_A, torch.ones(2, 4, dtype=f64), None, {}, ValueError),
    "b is 1-d": (_A, torch.ones(4, dtype=f64), None, {}, ValueError),
    "x0 wrong shape": (_A, _b, torch.ones(3, 3, dtype=f64), {}, ValueError),
    "integer dtype": (_A.long(), _b.long(), None, {}, TypeError),
    "half dtype": (_A.half(), _b.half(), None, {}, TypeError),
    "complex dtype": (_A.cdouble(), _b.cdouble(), None, {}, TypeError),
    "mixed dtypes": (_A, _b.float(), None, {}, TypeError),
    "x0 other dtype": (_A, _b, _b.float(), {}, TypeError),
    "negative rtol": (_A, _b, None, {"rtol": -1.0}, ValueError),
    "nan atol": (_A, _b, None, {"atol": float("nan")}, ValueError),
    "inf rtol": (_A, _b, None, {"rtol": float("inf")}, ValueError),
    "negative maxiter": (_A, _b, None, {"maxiter": -1}, ValueError),
    "sparse A": (_A.to_sparse(), _b, None, {}, (TypeError, NotImplementedError, RuntimeError)),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_arguments_raise(case):
    A, b, x0, kw, error = BAD[case]
    with pytest.raises(error, match=r"batched_cg|sparse|Sparse"):
        ops.batched_cg(A, b, x0=x0, **kw)
    args = dict(rtol=1e-6, atol=0.0, maxiter=10) | kw
    with pytest.raises(error):
        op(A, b, x0, args["rtol"], args["atol"], args["maxiter"])


def test_bad_arguments_raise_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with pytest.raises(ValueError, match="shape"):
            op(torch.ones(3, 4, 5, dtype=f64), torch.ones(3, 4, dtype=f64), None, 1e-6, 0.0, 10)
        x, it, res = op(torch.ones(3, 4, 4), torch.ones(3, 4), None, 1e-6, 0.0, 10)
    assert x.shape == (3, 4) and it.dtype == torch.int64 and res.shape == (3,)


def test_devices_must_match():
    with pytest.raises(ValueError, match=r"device|meta|cpu"):
        ops.batched_cg(_A, _b.to("meta"))
    with pytest.raises(ValueError, match=r"device|meta|cpu"):
        op(_A, _b.to("meta"), None, 1e-6, 0.0, 10)


@cuda
@needs_gpu
def test_devices_must_match_cuda():
    with pytest.raises(ValueError, match="cuda"):
        ops.batched_cg(_A.cuda(), _b)
    with pytest.raises(ValueError, match="cuda"):
        op(_A.cuda(), _b, None, 1e-6, 0.0, 10)
    with pytest.raises(ValueError, match="cuda"):
        op(_A, _b.cuda(), None, 1e-6, 0.0, 10)


# ------------------------------------------------------------------------------------------
# Autograd, opcheck, torch.compile, vmap
# ------------------------------------------------------------------------------------------


def _sym(P, n):
    """A symmetric positive-definite function of P, so that gradcheck's entrywise perturbations
    keep A symmetric (the op, like CG, is defined for symmetric A only)."""
    return P + P.transpose(-1, -2) + 2 * n * torch.eye(n, dtype=P.dtype, device=P.device)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    B, n = 3, 5
    P = torch.randn(B, n, n, generator=gen(20), dtype=f64).to(device).requires_grad_()
    b = torch.randn(B, n, generator=gen(21), dtype=f64).to(device).requires_grad_()

    def f(P, b):
        return ops.batched_cg(_sym(P, n), b, rtol=1e-14, maxiter=100)[0]

    assert torch.autograd.gradcheck(f, (P, b))
    assert torch.autograd.gradgradcheck(f, (P, b))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_linalg_solve(device):
    B, n = 4, 9
    A = spd_batch(B, n, seed=22, device=device).requires_grad_()
    b = rhs(B, n, seed=23, device=device).requires_grad_()
    w = rhs(B, n, seed=24, device=device)
    gA, gb = torch.autograd.grad((w * ops.batched_cg(A, b, rtol=1e-13)[0]).sum(), (A, b))
    rA, rb = torch.autograd.grad((w * torch.linalg.solve(A, b)).sum(), (A, b))
    torch.testing.assert_close(gb, rb, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gA, rA, rtol=1e-9, atol=1e-11)


def test_only_x_is_differentiable():
    A = spd_batch(2, 4, seed=25).requires_grad_()
    x, info = ops.batched_cg(A, rhs(2, 4, seed=26))
    assert x.requires_grad
    assert not info.iterations.requires_grad and not info.residual_norm.requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("jacobi", [False, True])
def test_opcheck(device, jacobi):
    A = spd_batch(3, 6, seed=27, device=device).requires_grad_()
    b = rhs(3, 6, seed=28, device=device).requires_grad_()
    x0 = rhs(3, 6, seed=29, device=device)
    torch.library.opcheck(op.default, (A, b, None, 1e-10, 0.0, 60, jacobi))
    torch.library.opcheck(op.default, (A, b, x0, 1e-10, 0.0, 60, jacobi))
    torch.library.opcheck(op.default, (A.detach().float(), b.detach().float(), None, 1e-5, 0.0, 60))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(A, b):
        x, info = ops.batched_cg(A, b, rtol=1e-10, maxiter=100)
        return 2 * x, info.iterations, info.converged

    A, b = spd_batch(3, 6, seed=30), rhs(3, 6, seed=31)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(A, b), f(A, b)):
        torch.testing.assert_close(got, want)


def test_vmap_folds_into_the_batch():
    V, B, n = 3, 2, 5
    A = spd_batch(V * B, n, seed=32).reshape(V, B, n, n)
    b = rhs(V * B, n, seed=33).reshape(V, B, n)
    x_v = torch.func.vmap(lambda A, b: ops.batched_cg(A, b, rtol=1e-12)[0])(A, b)
    x = ops.batched_cg(A.reshape(-1, n, n), b.reshape(-1, n), rtol=1e-12)[0]
    torch.testing.assert_close(x_v, x.reshape(V, B, n))
    # the matrix shared by every vmapped problem, vmapped over dim 1 of b
    x_v = torch.func.vmap(lambda bb: ops.batched_cg(A[0], bb, rtol=1e-12)[0], in_dims=1)(
        b.transpose(0, 1)
    )
    torch.testing.assert_close(
        x_v,
        ops.batched_cg(
            A[0].expand(V, B, n, n).reshape(-1, n, n),
            b.transpose(0, 1).transpose(0, 1).reshape(-1, n),
            rtol=1e-12,
        )[0].reshape(V, B, n),
    )


# ------------------------------------------------------------------------------------------
# CUDA only: the kernel's launch configurations against the reference
# ------------------------------------------------------------------------------------------


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "n", [2, 8, 9, 17, 31, 32, 33, 48, 63, 64, 65, 100, 128, 130, 257, 300, 1024]
)
@pytest.mark.parametrize("jacobi", [False, True])
def test_cuda_kernel_matches_reference(dtype, n, jacobi):
    B = 6
    A = spd_batch(B, n, dtype, cond=30.0, seed=n, device="cuda")
    b = rhs(B, n, dtype, seed=n + 1, device="cuda")
    x0 = rhs(B, n, dtype, seed=n + 2, device="cuda") if n % 2 else None
    rtol = 1e-11 if dtype == torch.float64 else 1e-5
    x, it, res = op(A, b, x0, rtol, 0.0, 10 * n + 50, jacobi)
    xr, itr, _ = batched_cg_reference(
        A.cpu(), b.cpu(), None if x0 is None else x0.cpu(), rtol, 0.0, 10 * n + 50, jacobi
    )
    slack = 3 if dtype == torch.float64 else 5
    assert (it.cpu() - itr).abs().max() <= slack, (it.tolist(), itr.tolist())
    tol = 1e-8 if dtype == torch.float64 else 2e-3
    assert rel_err(x, xr) < tol and rel_err(x, solve64(A, b)) < tol
    torch.testing.assert_close(res.double().cpu(), true_residual(A, b, x), rtol=0.05, atol=1e-5)


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_cuda_misaligned_and_strided(dtype):
    B, n = 3, 64  # n % 4 == 0 would allow 16-byte loads; the offset forbids them
    A = spd_batch(B, n, dtype, seed=40, device="cuda")
    flat = torch.empty(B * n * n + 1, dtype=dtype, device="cuda")
    A_mis = flat[1:].view(B, n, n)
    A_mis.copy_(A)
    b = rhs(B, n, dtype, seed=41, device="cuda")
    x1, it1, _ = op(A_mis, b, None, 1e-6, 0.0, 500)
    x2, it2, _ = op(A.transpose(1, 2), b, None, 1e-6, 0.0, 500)
    x3, it3, _ = op(A, b, None, 1e-6, 0.0, 500)
    torch.testing.assert_close(x1, x3)
    torch.testing.assert_close(x2, x3)
    assert it1.tolist() == it3.tolist() and it2.tolist() == it3.tolist()


@cuda
@needs_gpu
def test_cuda_streamed_matrix_and_global_workspace():
    # n = 6000 in float64: neither the matrix (288 MB) nor the CG vectors fit in shared memory.
    # A fixed number of iterations (rtol = 0) compares the iterates themselves.
    n, iters = 6000, 15
    g = torch.Generator(device="cuda").manual_seed(0)
    M = torch.randn(n, n, generator=g, device="cuda", dtype=f64) / n**0.5
    A = (M @ M.T + torch.eye(n, device="cuda", dtype=f64)).unsqueeze(0)
    b = torch.randn(1, n, generator=g, device="cuda", dtype=f64)
    x, it, res = op(A, b, None, 0.0, 0.0, iters)
    xr, itr, resr = batched_cg_reference(A, b, None, 0.0, 0.0, iters)
    assert it.item() == itr.item() == iters
    assert rel_err(x, xr) < 1e-10
    torch.testing.assert_close(res, resr, rtol=1e-8, atol=0)


@cuda
@needs_gpu
def test_cuda_many_systems_and_early_exit():
    B, n = 70_000, 4
    A = spd_batch(B, n, seed=42, device="cuda")
    A[::2] = torch.eye(n, dtype=f64, device="cuda")
    b = rhs(B, n, seed=43, device="cuda")
    x, info = ops.batched_cg(A, b, rtol=1e-12)
    assert bool((info.iterations[::2] == 1).all()) and bool(info.converged.all())
    assert rel_err(x, solve64(A, b)) < 1e-9


@cuda
@needs_gpu
def test_cuda_current_stream():
    A, b = spd_batch(8, 40, seed=44, device="cuda"), rhs(8, 40, seed=45, device="cuda")
    expected = ops.batched_cg(A, b, rtol=1e-12)[0]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        A2, b2 = A.clone(), b.clone()
        x = ops.batched_cg(A2, b2, rtol=1e-12)[0]
    stream.synchronize()
    torch.testing.assert_close(x, expected)
