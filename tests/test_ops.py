"""implicit_torch.ops.batched_cg and the implicit_torch::batched_cg op.

The op is tested against independent float64 references (torch.linalg.solve, and the
pure-torch kernel, which follows the compiled kernels' algorithm step for step). CI runs this
file twice: with the compiled extension and with IMPLICIT_TORCH_NO_EXT=1 (Python kernel).
Tests marked ``cuda`` need a GPU and skip without one.
"""

import math
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import implicit_torch.ops as ops
from implicit_torch.ops import _registration
from implicit_torch.ops._reference import batched_cg_reference
from implicit_torch.ops._schemas import SCHEMAS

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


def test_schemas_are_defined_once_in_python():
    # ops/_schemas.py defines them; the extension only registers kernels under their names.
    for name, schema in SCHEMAS.items():
        overload = getattr(torch.ops.implicit_torch, name).default
        assert str(overload._schema) == f"implicit_torch::{name}{schema}"
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if csrc.is_dir():  # a source checkout
        for path in csrc.rglob("*"):
            if path.suffix in (".h", ".cpp", ".cu", ".cuh"):
                text = path.read_text()
                assert "TORCH_LIBRARY(" not in text and "m.def(" not in text, path


def test_extension_available_follows_the_environment():
    compiled = _registration.compiled_kernels
    if _registration.extension_disabled():
        assert not ops.extension_available() and not compiled
    assert ops.extension_available("cpu") == ("CPU" in _registration.COMPILED_BACKENDS)
    assert _registration.qp_ipm_available() == (("qp_ipm", "CPU") in compiled)
    # The extension's list of its kernels is what the dispatcher holds; the pure-PyTorch
    # kernel (CompositeExplicitAutograd) serves every other backend.
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in SCHEMAS:
        for key in ("CPU", "CUDA"):
            assert has(f"implicit_torch::{name}", key) == ((name, key) in compiled), (name, key)
        assert has(f"implicit_torch::{name}", "CompositeExplicitAutograd")


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
    assert bool((info.residual_norm == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [3, 40])
def test_outputs_are_fully_written(device, n):
    # The kernels allocate their outputs uninitialised (at::empty) and must write every entry.
    # Freed NaN-filled blocks make it likely that the allocator hands back dirty memory.
    B = 9
    A, b = spd_batch(B, n, seed=50 + n, device=device), rhs(B, n, seed=51, device=device)
    for _ in range(3):
        garbage = [torch.full((size,), math.nan, device=device) for size in (B * n, B, B)]
        del garbage
        x, it, res = op(A, b, None, 1e-10, 0.0, 10 * n)
        assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(res).all())
        xr, itr, resr = batched_cg_reference(A, b, None, 1e-10, 0.0, 10 * n)
        assert (it - itr).abs().max() <= 2 and rel_err(x, xr) < 1e-9
        torch.testing.assert_close(res, resr, rtol=0.05, atol=1e-12)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [5, 40])
@pytest.mark.parametrize("maxiter", [0, 5])
def test_infinite_x0_is_reported_as_the_reference_does(device, n, maxiter):
    # x0 = +Inf in one entry and A > 0 entrywise: b − A x0 = −Inf everywhere, so with
    # maxiter = 0 the residual norm is Inf; one step makes x NaN (alpha = Inf / Inf) and the
    # NaN curvature then stops it. Every kernel must report what the reference does (the CUDA
    # warp kernel once turned the Inf into NaN: 0 · Inf in the lanes beyond n).
    A = (n * torch.eye(n, dtype=f64) + 1.0).expand(2, n, n).contiguous().to(device)
    b = torch.ones(2, n, dtype=f64, device=device)
    x0 = torch.zeros(2, n, dtype=f64, device=device)
    x0[0, 1] = math.inf
    x, it, res = op(A, b, x0, 1e-10, 0.0, maxiter)
    xr, itr, resr = batched_cg_reference(A.cpu(), b.cpu(), x0.cpu(), 1e-10, 0.0, maxiter)
    assert it.tolist() == itr.tolist()
    torch.testing.assert_close(res.cpu(), resr, equal_nan=True)
    torch.testing.assert_close(x.cpu(), xr, equal_nan=True)
    assert math.isinf(resr[0]) if maxiter == 0 else math.isnan(resr[0])


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


# The raw op's messages, as Python writes the values (dtypes, tuples, float repr), whichever
# kernel serves it: the compiled one and the pure-PyTorch one raise the same text (issue 13).
_A2 = torch.eye(3, dtype=f64).expand(2, 3, 3).contiguous()
_b2 = torch.ones(2, 3, dtype=f64)
MESSAGES = {
    "int dtype": (
        (_A2.long(), _b2.long(), None, 1e-6, 0.0, 10),
        TypeError,
        "batched_cg: A must be float32 or float64, got torch.int64",
    ),
    "A shape": (
        (torch.ones(3, 4, 5, dtype=f64), _b2, None, 1e-6, 0.0, 10),
        ValueError,
        "batched_cg: A must have shape (B, n, n), got (3, 4, 5)",
    ),
    "b 1-d": (
        (_A2, torch.ones(2, dtype=f64), None, 1e-6, 0.0, 10),
        ValueError,
        "batched_cg: b must have shape (B, n) = (2, 3) to match A of shape (2, 3, 3), got (2,)",
    ),
    "x0 dtype": (
        (_A2, _b2, _b2.float(), 1e-6, 0.0, 10),
        TypeError,
        "batched_cg: x0 has dtype torch.float32 but A has torch.float64; they must match",
    ),
    "nan rtol": (
        (_A2, _b2, None, math.nan, 0.0, 10),
        ValueError,
        "batched_cg: rtol must be finite and non-negative, got nan",
    ),
    "inf atol": (
        (_A2, _b2, None, 1e-6, math.inf, 10),
        ValueError,
        "batched_cg: atol must be finite and non-negative, got inf",
    ),
    "negative maxiter": (
        (_A2, _b2, None, 1e-6, 0.0, -3),
        ValueError,
        "batched_cg: maxiter must be non-negative, got -3",
    ),
}


@pytest.mark.parametrize("case", list(MESSAGES))
@pytest.mark.parametrize("fn", [op, batched_cg_reference], ids=["op", "reference"])
def test_raw_op_messages_write_values_as_python_does(fn, case):
    args, error, message = MESSAGES[case]
    with pytest.raises(error) as caught:
        fn(*args)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "value",
    [-1.0, -2.5, -1e-06, -1e-05, -0.0001, -0.1, -1 / 3, -1e15, -1e16, -1.5e16, -123456.789,
     -9007199254740993.0, -1e-300, -5e-324, -1.7976931348623157e308, -1e22, -math.inf],
)  # fmt: skip
def test_raw_op_writes_a_bad_tolerance_as_python_s_repr(value):
    # The compiled kernel formats doubles itself (shortest round trip, Python's layout).
    for fn in (op, batched_cg_reference):
        with pytest.raises(ValueError) as caught:
            fn(_A2, _b2, None, 1e-6, value, 10)
        assert (
            str(caught.value) == f"batched_cg: atol must be finite and non-negative, got {value!r}"
        )


@pytest.mark.parametrize(
    "kw, error, message",
    [
        ({"maxiter": 2.5}, TypeError, "batched_cg: maxiter must be an integer, got float"),
        ({"maxiter": True}, TypeError, "batched_cg: maxiter must be an integer, got bool"),
        ({"maxiter": -1}, ValueError, "batched_cg: maxiter must be non-negative, got -1"),
        ({"rtol": "1e-3"}, TypeError, "batched_cg: rtol must be a number, got str"),
        ({"rtol": None}, TypeError, "batched_cg: rtol must be a number, got NoneType"),
        ({"atol": None}, TypeError, "batched_cg: atol must be a number, got NoneType"),
        (
            {"rtol": math.nan},
            ValueError,
            "batched_cg: rtol must be finite and non-negative, got nan",
        ),
        (
            {"atol": -1e-9},
            ValueError,
            "batched_cg: atol must be finite and non-negative, got -1e-09",
        ),
        (
            {"rtol": torch.tensor(-1.0)},
            ValueError,
            "rtol must be finite and non-negative, got -1.0",
        ),
        ({"maxiter": torch.tensor(2.5)}, TypeError, "maxiter must be an integer, got float"),
        ({"rtol": torch.ones(2)}, TypeError, "batched_cg: rtol must be a number, got Tensor"),
    ],
)
def test_wrapper_checks_its_options_with_the_core_rules(kw, error, message):
    with pytest.raises(error) as caught:
        ops.batched_cg(_A2, _b2, **kw)
    assert str(caught.value).endswith(message)


def test_wrapper_takes_0d_tensor_options_as_numbers():
    x, info = ops.batched_cg(
        2 * _A2, _b2, rtol=torch.tensor(1e-12), atol=torch.tensor(0.0), maxiter=torch.tensor(5)
    )
    torch.testing.assert_close(x, _b2 / 2, rtol=1e-12, atol=0)
    assert bool(info.converged.all())


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


# ------------------------------------------------------------------------------------------
# CUDA only: the launch variants (IMPLICIT_TORCH_CG_* environment variables, read at every
# call) give the semantics of the default launch
# ------------------------------------------------------------------------------------------

VARIANTS = {
    "auto": {},
    "global": {"IMPLICIT_TORCH_CG_STRATEGY": "global"},
    "smem-cap-16k": {"IMPLICIT_TORCH_CG_SMEM_CAP_BYTES": "16384"},
    "smem-cap-0": {"IMPLICIT_TORCH_CG_SMEM_CAP_BYTES": "0"},  # vectors in the workspace too
    "multiblock": {"IMPLICIT_TORCH_CG_STRATEGY": "multiblock"},
    "multiblock-1": {"IMPLICIT_TORCH_CG_STRATEGY": "multiblock", "BLOCKS": "1"},
    "multiblock-3": {"IMPLICIT_TORCH_CG_STRATEGY": "multiblock", "BLOCKS": "3"},
    # 64 asked: fewer when the columns do not divide evenly (a whole number of groups each)
    "multiblock-64": {"IMPLICIT_TORCH_CG_STRATEGY": "multiblock", "BLOCKS": "64"},
}
# What IMPLICIT_TORCH_CG_LOG_PLAN reports for n > 32.
VARIANT_KIND = {"global": "matrix_in_smem=0", "smem-cap-0": "vectors_in_smem=0"}


def _use_variant(monkeypatch, variant, log=False):
    """Set the variant's environment (and, with ``log``, the plan log) for the calls that
    follow."""
    for key in ("STRATEGY", "SMEM_CAP_BYTES", "BLOCKS_PER_SYSTEM", "LOG_PLAN"):
        monkeypatch.delenv(f"IMPLICIT_TORCH_CG_{key}", raising=False)
    for key, value in VARIANTS[variant].items():
        key = "IMPLICIT_TORCH_CG_BLOCKS_PER_SYSTEM" if key == "BLOCKS" else key
        monkeypatch.setenv(key, value)
    if log:
        monkeypatch.setenv("IMPLICIT_TORCH_CG_LOG_PLAN", "1")


def _logged_plan(call):
    """``(result, plan description)`` of one op call with IMPLICIT_TORCH_CG_LOG_PLAN set."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    plans = [str(w.message) for w in caught if "batched_cg CUDA launch" in str(w.message)]
    assert plans, "no launch was logged"
    return out, plans[-1]


@cuda
@needs_gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n,B", [(33, 5), (64, 3), (130, 2), (257, 4), (1024, 1)])
@pytest.mark.parametrize("jacobi", [False, True])
def test_cuda_variants_match_reference(monkeypatch, variant, dtype, n, B, jacobi):
    _use_variant(monkeypatch, variant, log=True)
    A = spd_batch(B, n, dtype, cond=30.0, seed=n, device="cuda")
    if n == 64:  # misaligned: no 16-byte loads
        flat = torch.empty(B * n * n + 1, dtype=dtype, device="cuda")
        A = flat[1:].view(B, n, n).copy_(A)
    b = rhs(B, n, dtype, seed=n + 1, device="cuda")
    x0 = rhs(B, n, dtype, seed=n + 2, device="cuda") if n % 2 else None
    rtol, maxiter = (1e-11 if dtype == torch.float64 else 1e-5), 10 * n + 50
    (x, it, res), plan = _logged_plan(lambda: op(A, b, x0, rtol, 0.0, maxiter, jacobi))
    expected = "multiblock" if variant.startswith("multiblock") else "block per system"
    assert expected in plan and VARIANT_KIND.get(variant, "") in plan, plan
    if variant.startswith("multiblock-"):  # as many as asked, fewer if columns run out
        blocks = int(re.search(r"blocks_per_system=(\d+)", plan).group(1))
        asked = int(VARIANTS[variant]["BLOCKS"])
        assert 1 <= blocks <= asked and (blocks == asked or asked == 64), plan
    xr, itr, _ = batched_cg_reference(
        A.cpu(), b.cpu(), None if x0 is None else x0.cpu(), rtol, 0.0, maxiter, jacobi
    )
    slack = 3 if dtype == torch.float64 else 5
    assert (it.cpu() - itr).abs().max() <= slack, (it.tolist(), itr.tolist())
    tol = 1e-8 if dtype == torch.float64 else 2e-3
    assert rel_err(x, xr) < tol and rel_err(x, solve64(A, b)) < tol
    torch.testing.assert_close(res.double().cpu(), true_residual(A, b, x), rtol=0.05, atol=1e-5)


@cuda
@needs_gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_variants_stop_each_system_on_its_own(monkeypatch, variant):
    # Identity (1 step), a hard system, an indefinite one (curvature stop), NaN data, an
    # exact warm start (0 steps): each stops as the reference does, with maxiter cutting the
    # hard one; a fixed iteration count (rtol = 0) compares the iterates themselves.
    _use_variant(monkeypatch, variant)
    n = 96
    eig = torch.linspace(-1.0, 2.0, n, dtype=f64)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(60), dtype=f64))
    hard = spd_batch(2, n, cond=1e3, seed=61)
    A = torch.stack([torch.eye(n, dtype=f64), hard[0], Q @ torch.diag(eig) @ Q.T, hard[1], hard[1]])
    A[3, 5, 7] = math.nan
    b = rhs(5, n, seed=62)
    x0 = torch.zeros(5, n, dtype=f64)
    x0[4] = torch.linalg.solve(A[4], b[4])
    A, b, x0 = A.cuda(), b.cuda(), x0.cuda()
    for rtol, maxiter in [(1e-10, 1000), (1e-10, 7), (0.0, 12)]:
        x, it, res = op(A, b, x0, rtol, 0.0, maxiter)
        xr, itr, _ = batched_cg_reference(A.cpu(), b.cpu(), x0.cpu(), rtol, 0.0, maxiter)
        it, itr = it.tolist(), itr.tolist()
        assert it[0] == itr[0] == 1 and it[3] == itr[3] == 0  # identity; NaN curvature
        assert it[4] == itr[4] == (0 if rtol else maxiter)  # exact warm start
        assert abs(it[1] - itr[1]) <= 3 and abs(it[2] - itr[2]) <= 3
        if maxiter < 100:
            assert it[1] == itr[1] == maxiter  # the hard system is cut by the cap
        keep = [0, 1, 4] if maxiter < 100 else [0, 4]
        assert rel_err(x[keep], xr[keep]) < 1e-8
        assert bool(res[3].isnan())


@cuda
@needs_gpu
@pytest.mark.parametrize(
    "key, value",
    [
        ("IMPLICIT_TORCH_CG_STRATEGY", "fastest"),
        ("IMPLICIT_TORCH_CG_SMEM_CAP_BYTES", "-5"),
        ("IMPLICIT_TORCH_CG_BLOCKS_PER_SYSTEM", "two"),
    ],
)
def test_cuda_bad_variant_environment_raises(monkeypatch, key, value):
    monkeypatch.setenv(key, value)
    A, b = spd_batch(2, 40, device="cuda"), rhs(2, 40, device="cuda")
    with pytest.raises(ValueError, match=key):
        op(A, b, None, 1e-6, 0.0, 100)


@cuda
@needs_gpu
def test_cuda_threads_with_different_shared_memory_sizes():
    # Two host threads launching the block kernel with different dynamic shared memory sizes
    # above 48 KB (float64, n = 80: 59 KB; n = 120: 123 KB): the kernel attribute is set once
    # to the device maximum, so neither launch can find it lowered by the other.
    problems = {
        n: (spd_batch(4, n, seed=n, device="cuda"), rhs(4, n, seed=n, device="cuda"))
        for n in (80, 120)
    }
    expected = {n: op(A, b, None, 1e-10, 0.0, 2000)[0] for n, (A, b) in problems.items()}
    errors = []

    def run(n):
        try:
            A, b = problems[n]
            for _ in range(50):
                torch.testing.assert_close(op(A, b, None, 1e-10, 0.0, 2000)[0], expected[n])
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in (80, 120, 80, 120)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
