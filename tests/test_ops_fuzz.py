"""Property-based tests of implicit_torch::batched_cg: random shapes, strides, dtypes and
malformed arguments. Valid inputs must agree with the pure-torch reference and with
torch.linalg.solve; invalid ones must raise TypeError/ValueError, never crash."""

import pytest
import torch

pytest.importorskip("hypothesis")  # (a GPU machine may lack it: skip, not a collection error)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import implicit_torch.ops as ops
from implicit_torch.ops._reference import batched_cg_reference

op = torch.ops.implicit_torch.batched_cg
FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
LAYOUTS = ["contiguous", "transposed", "strided", "expanded", "offset"]


def spd(B, n, cond, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, float(torch.log10(torch.tensor(cond))), n, dtype=torch.float64)
    A = Q @ torch.diag_embed(eig.expand(B, n)) @ Q.transpose(1, 2)
    return 0.5 * (A + A.transpose(1, 2))


def relayout(t, layout):
    """The same values as ``t`` in another memory layout."""
    if layout == "transposed":  # column-major copy
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
    if layout == "expanded" and t.shape[0] > 0:
        # only valid as a layout when all batch entries are equal: use the first for all
        return t[:1].expand(t.shape)
    if layout == "offset":
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        out = flat[1:].view(t.shape)
        out.copy_(t)
        return out
    return t


@FUZZ
@given(
    B=st.integers(0, 5),
    n=st.integers(0, 40),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    layout_A=st.sampled_from(LAYOUTS),
    layout_b=st.sampled_from(LAYOUTS),
    with_x0=st.booleans(),
    jacobi=st.booleans(),
    cond=st.floats(1.0, 1e3),
    seed=st.integers(0, 2**16),
)
def test_valid_inputs_agree_with_reference(
    B, n, dtype, layout_A, layout_b, with_x0, jacobi, cond, seed
):
    A64 = relayout(spd(B, n, cond, seed), layout_A)
    g = torch.Generator().manual_seed(seed + 1)
    b64 = relayout(torch.randn(B, n, generator=g, dtype=torch.float64), layout_b)
    x064 = torch.randn(B, n, generator=g, dtype=torch.float64) if with_x0 else None
    A, b = A64.to(dtype), b64.to(dtype)
    x0 = None if x064 is None else x064.to(dtype)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    maxiter = 10 * n + 20

    x, it, res = op(A, b, x0, rtol, 0.0, maxiter, jacobi)
    assert x.shape == (B, n) and it.shape == (B,) and res.shape == (B,)
    assert x.dtype == dtype and it.dtype == torch.int64 and res.dtype == dtype
    assert x.is_contiguous()
    assert bool(((it >= 0) & (it <= maxiter)).all())
    _, itr, _ = batched_cg_reference(A, b, x0, rtol, 0.0, maxiter, jacobi)
    if B:
        assert int((it - itr).abs().max()) <= (3 if dtype == torch.float64 else 5)
    if B and n:
        sol = torch.linalg.solve(A.double(), b.double())
        scale = torch.linalg.vector_norm(sol, dim=-1).clamp(min=1e-30)
        err = torch.linalg.vector_norm(x.double() - sol, dim=-1) / scale
        bound = cond * (1e-8 if dtype == torch.float64 else 1e-3)
        assert float(err.max()) < bound, (err, it)
        true = torch.linalg.vector_norm(b64 - (A64 @ x.double().unsqueeze(-1)).squeeze(-1), dim=-1)
        bnorm = torch.linalg.vector_norm(b64, dim=-1)
        tol = 1e-3 if dtype == torch.float32 else 1e-9
        assert bool((res.double() - true).abs().le(0.05 * true + tol * bnorm + 1e-30).all())


DTYPES_ANY = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
]


def _tensor(shape, dtype):
    return torch.ones(shape, dtype=dtype)


@FUZZ
@given(
    a_shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
    b_shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    x0_shape=st.none() | st.lists(st.integers(0, 4), min_size=1, max_size=3),
    a_dtype=st.sampled_from(DTYPES_ANY),
    b_dtype=st.sampled_from(DTYPES_ANY),
    rtol=st.sampled_from([1e-6, 0.0, -1.0, float("nan"), float("inf")]),
    maxiter=st.sampled_from([0, 5, -3]),
)
def test_any_arguments_raise_or_succeed_never_crash(
    a_shape, b_shape, x0_shape, a_dtype, b_dtype, rtol, maxiter
):
    A, b = _tensor(a_shape, a_dtype), _tensor(b_shape, b_dtype)
    x0 = None if x0_shape is None else _tensor(x0_shape, b_dtype)
    valid = (
        len(a_shape) == 3
        and a_shape[1] == a_shape[2]
        and a_dtype in (torch.float32, torch.float64)
        and b_dtype == a_dtype
        and list(b_shape) == a_shape[:2]
        and (x0_shape is None or list(x0_shape) == a_shape[:2])
        and rtol >= 0
        and rtol != float("inf")
        and maxiter >= 0
    )
    for call in (
        lambda: op(A, b, x0, rtol, 0.0, maxiter),
        lambda: ops.batched_cg(A, b, x0=x0, rtol=rtol, maxiter=maxiter),
    ):
        if valid:
            x = call()[0]
            assert x.shape == tuple(b_shape)
        else:
            with pytest.raises((TypeError, ValueError)):
                call()
