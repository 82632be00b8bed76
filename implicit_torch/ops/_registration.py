"""Load the compiled extension and complete the ``implicit_torch::batched_cg`` operator.

The operator exists whether or not the extension is built, so that callers (and
``torch.compile``) always see one op, ``torch.ops.implicit_torch.batched_cg``:

* Extension loaded (``implicit_torch._C``): its ``TORCH_LIBRARY`` block defines the schema and
  its ``TORCH_LIBRARY_IMPL`` blocks register the CPU kernel and, in a CUDA build, the CUDA
  kernel.
* Extension absent, failed to load, or disabled with ``IMPLICIT_TORCH_NO_EXT=1``: the same
  schema is defined here and the pure-PyTorch kernel (:mod:`._reference`) is registered for
  the CPU and CUDA dispatch keys. A backend the extension was built without (a CPU-only build
  used with CUDA tensors) also gets the pure-PyTorch kernel.

In both cases the fake (meta) kernel, the autograd rule and the vmap rule are registered here,
in Python. A failed load prints one warning line and falls back; a build present on disk is
not loaded at all when ``IMPLICIT_TORCH_NO_EXT`` is set.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from implicit_torch.ops._reference import batched_cg_reference, check_inputs

__all__ = [
    "COMPILED_BACKENDS",
    "QUALNAME",
    "SCHEMA",
    "ExtensionWarning",
    "extension_disabled",
    "extension_module",
]

NAMESPACE = "implicit_torch"
QUALNAME = "implicit_torch::batched_cg"
# Must match the m.def(...) string in csrc/implicit_torch.cpp (tests/test_ops.py checks it).
SCHEMA = (
    "batched_cg(Tensor A, Tensor b, Tensor? x0, float rtol, float atol, int maxiter, "
    "bool jacobi=False) -> (Tensor x, Tensor iterations, Tensor residual_norm)"
)
ENV_DISABLE = "IMPLICIT_TORCH_NO_EXT"
_BACKENDS = ("CPU", "CUDA")


class ExtensionWarning(UserWarning):
    """The compiled extension could not be loaded; the pure-PyTorch kernel is used instead."""


def extension_disabled() -> bool:
    """True when ``IMPLICIT_TORCH_NO_EXT`` is set to anything but ``""``/``0``/``false``."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no")


def _load_extension():
    if extension_disabled():
        return None
    try:
        module = importlib.import_module("implicit_torch._C")
    except (ImportError, OSError) as exc:  # not built, or built for another torch
        if isinstance(exc, ModuleNotFoundError) and exc.name == "implicit_torch._C":
            why = "it is not built"
        else:
            first_line = (str(exc).splitlines() or [""])[0]
            why = f"it failed to load ({type(exc).__name__}: {first_line})"
        warnings.warn(
            f"implicit_torch: compiled extension unavailable, {why}; using the pure-PyTorch "
            f"batched_cg (set {ENV_DISABLE}=1 to silence).",
            ExtensionWarning,
            stacklevel=2,
        )
        return None
    return module


extension_module = _load_extension()

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # must stay alive: it owns registrations


def _has_schema() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(QUALNAME, "")
    except RuntimeError:
        return False
    return True


if not _has_schema():
    _LIB.define(SCHEMA)
elif str(torch.ops.implicit_torch.batched_cg.default._schema) != str(
    torch._C.parse_schema(f"{NAMESPACE}::{SCHEMA}")
):
    warnings.warn(
        "implicit_torch: the compiled extension defines batched_cg with another schema (a stale "
        "build?); rebuild it with `pip install --no-build-isolation -e .`.",
        ExtensionWarning,
        stacklevel=2,
    )


def _python_kernel(A, b, x0, rtol, atol, maxiter, jacobi=False):
    return batched_cg_reference(A, b, x0, rtol, atol, maxiter, jacobi)


# Backends whose kernel is compiled (empty without the extension); the others get Python's.
COMPILED_BACKENDS = tuple(
    key for key in _BACKENDS if torch._C._dispatch_has_kernel_for_dispatch_key(QUALNAME, key)
)
for _key in _BACKENDS:
    if _key not in COMPILED_BACKENDS:
        _LIB.impl("batched_cg", _python_kernel, _key)


# ------------------------------------------------------------------------------------------
# Fake kernel: shapes and dtypes only, with the same input checks as the real kernels.
# ------------------------------------------------------------------------------------------


@torch.library.register_fake(QUALNAME, lib=_LIB)
def _fake(A, b, x0, rtol, atol, maxiter, jacobi=False):
    check_inputs(A, b, x0, rtol, atol, maxiter)
    B, n = A.shape[0], A.shape[1]
    return (
        A.new_empty((B, n)),
        A.new_empty((B,), dtype=torch.int64),
        A.new_empty((B,)),
    )


# ------------------------------------------------------------------------------------------
# Autograd: x = A⁻¹ b with A symmetric, so  grad_b = A⁻¹ grad_x  (one more batched_cg with the
# same A and options) and  grad_A = −grad_b xᵀ,  the gradient torch.linalg.solve gives.
# iterations and residual_norm are not differentiable; x0 gets no gradient (the solution does
# not depend on it).
# ------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    A, _b, _x0, rtol, atol, maxiter, *rest = inputs
    x, iterations, residual_norm = output
    ctx.mark_non_differentiable(iterations, residual_norm)
    ctx.save_for_backward(A, x)
    ctx.options = (rtol, atol, maxiter, bool(rest[0]) if rest else False)


def _backward(ctx, grad_x, _grad_iterations, _grad_residual_norm):
    A, x = ctx.saved_tensors
    need_A, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_A = grad_b = None
    if grad_x is not None and (need_A or need_b):
        grad_b = torch.ops.implicit_torch.batched_cg(A, grad_x, None, *ctx.options)[0]
        if need_A:
            grad_A = -grad_b.unsqueeze(-1) * x.unsqueeze(-2)
    return grad_A, grad_b if need_b else None, None, None, None, None, None


torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context, lib=_LIB)


# ------------------------------------------------------------------------------------------
# vmap: the op is already batched, so a vmapped dimension is folded into the batch dimension.
# ------------------------------------------------------------------------------------------


def _vmap(info, in_dims, A, b, x0, rtol, atol, maxiter, jacobi=False):
    size = info.batch_size

    def fold(t, dim):
        if t is None:
            return None
        t = t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
        return t.reshape(size * t.shape[1], *t.shape[2:])

    A_dim, b_dim, x0_dim = in_dims[:3]
    batch = A.shape[0] if A_dim is None else A.movedim(A_dim, 0).shape[1]
    x, iterations, residual_norm = torch.ops.implicit_torch.batched_cg(
        fold(A, A_dim), fold(b, b_dim), fold(x0, x0_dim), rtol, atol, maxiter, jacobi
    )
    out = (
        x.reshape(size, batch, *x.shape[1:]),
        iterations.reshape(size, batch),
        residual_norm.reshape(size, batch),
    )
    return out, (0, 0, 0)


torch.library.register_vmap(QUALNAME, _vmap, lib=_LIB)


# ------------------------------------------------------------------------------------------
# implicit_torch::qp_ipm: the interior-point iterations of implicit_torch.solvers.QP, a CPU
# kernel of the extension only. Without it (no extension, CUDA tensors, torch.func transforms,
# torch.compile, unrolling) QP runs the same iterations as batched PyTorch operations, which are
# the reference the kernel is tested against. Not differentiable: QP differentiates its
# solution implicitly. The fake kernel lets torch.library.opcheck and tracing see its shapes.
# ------------------------------------------------------------------------------------------

QP_IPM_QUALNAME = "implicit_torch::qp_ipm"
# Must match the m.def(...) string in csrc/implicit_torch.cpp.
QP_IPM_SCHEMA = (
    "qp_ipm(Tensor K, Tensor q, Tensor M1, Tensor W, Tensor T, Tensor nGt, int maxiter, "
    "float tol, float acceptable_tol, int patience) -> (Tensor z, Tensor iterations, "
    "Tensor error, Tensor converged)"
)


def qp_ipm_available() -> bool:
    """Whether the compiled CPU kernel of ``implicit_torch::qp_ipm`` is loaded (a stale build
    of the extension may predate it)."""
    return extension_module is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        QP_IPM_QUALNAME, "CPU"
    )


if qp_ipm_available():

    @torch.library.register_fake(QP_IPM_QUALNAME, lib=_LIB)
    def _qp_ipm_fake(K, q, M1, W, T, nGt, maxiter, tol, acceptable_tol, patience):
        B, N = K.shape[0], K.shape[1]
        return (
            K.new_empty((B, N)),
            K.new_empty((B,), dtype=torch.int64),
            K.new_empty((B,)),
            K.new_empty((B,), dtype=torch.bool),
        )
