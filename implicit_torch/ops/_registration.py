"""Define the ``implicit_torch`` operators and register everything but their compiled kernels.

The operators (``torch.ops.implicit_torch.batched_cg`` and ``.qp_ipm``) exist whether or not
the extension is built, so that callers and ``torch.compile`` always see the same ops:

1. The compiled extension ``implicit_torch._C`` is imported, unless it is absent, fails to load
   (one warning line) or is disabled with ``IMPLICIT_TORCH_NO_EXT=1`` (then a build on disk is
   not loaded at all). Its ``TORCH_LIBRARY_IMPL`` blocks register the CPU kernels and, in a
   CUDA build, the CUDA kernel of ``batched_cg``; it defines no schema, and its ``KERNELS``
   attribute lists the ``(op, backend)`` pairs it holds.
2. The schemas of :mod:`._schemas` are defined, once (the dispatcher checks the compiled
   kernels' signatures against them).
3. The pure-PyTorch kernels (:mod:`._reference`, :mod:`._qp_reference`) are registered under
   ``CompositeExplicitAutograd``: the dispatcher runs them for every backend that has no
   compiled kernel (no extension, a CPU-only build given CUDA tensors, other devices).
4. The fake (meta) kernels, the autograd rules and ``batched_cg``'s vmap rule.

Only public ``torch.library`` APIs are used.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from implicit_torch.ops._qp_reference import check_qp_ipm_inputs, qp_ipm_reference
from implicit_torch.ops._reference import batched_cg_reference, check_inputs
from implicit_torch.ops._schemas import NAMESPACE, SCHEMAS

__all__ = [
    "COMPILED_BACKENDS",
    "QP_IPM_QUALNAME",
    "QUALNAME",
    "ExtensionWarning",
    "compiled_kernels",
    "extension_disabled",
    "extension_module",
    "qp_ipm_available",
]

QUALNAME = f"{NAMESPACE}::batched_cg"
QP_IPM_QUALNAME = f"{NAMESPACE}::qp_ipm"
ENV_DISABLE = "IMPLICIT_TORCH_NO_EXT"
_REBUILD = "rebuild it with `pip install --no-build-isolation -e .`"


class ExtensionWarning(UserWarning):
    """The compiled extension could not be loaded, or is stale; pure-PyTorch kernels serve
    what it lacks."""


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
            f"kernels (set {ENV_DISABLE}=1 to silence).",
            ExtensionWarning,
            stacklevel=2,
        )
        return None
    return module


extension_module = _load_extension()

# The (op, backend) pairs of the compiled kernels, e.g. ("batched_cg", "CPU"). A build without
# the list predates the single definition of the schemas: it defined them itself.
compiled_kernels: frozenset[tuple[str, str]] = frozenset(
    (str(op), str(backend)) for op, backend in getattr(extension_module, "KERNELS", ())
)
if extension_module is not None and not hasattr(extension_module, "KERNELS"):
    warnings.warn(
        f"implicit_torch: the compiled extension is stale (built from an older version); "
        f"{_REBUILD}.",
        ExtensionWarning,
        stacklevel=2,
    )
# Backends with a compiled batched_cg kernel (empty without the extension).
COMPILED_BACKENDS = tuple(key for key in ("CPU", "CUDA") if ("batched_cg", key) in compiled_kernels)


def qp_ipm_available() -> bool:
    """Whether the compiled CPU kernel of ``implicit_torch::qp_ipm`` is loaded (without it the
    op runs the pure-PyTorch iterations of :mod:`._qp_reference`)."""
    return ("qp_ipm", "CPU") in compiled_kernels


_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # must stay alive: it owns registrations

for _name, _schema in SCHEMAS.items():
    if hasattr(getattr(torch.ops, NAMESPACE), _name):  # defined before us: a stale build did
        warnings.warn(
            f"implicit_torch: {NAMESPACE}::{_name} was already defined, probably by a stale "
            f"build of the compiled extension; {_REBUILD}.",
            ExtensionWarning,
            stacklevel=2,
        )
    else:
        try:
            torch.library.define(f"{NAMESPACE}::{_name}", _schema, lib=_LIB)
        except RuntimeError as exc:  # a compiled kernel's signature does not match the schema
            raise ImportError(
                f"implicit_torch: the compiled extension's kernel for {NAMESPACE}::{_name} does "
                f"not match its schema (a stale build?); {_REBUILD}, or set {ENV_DISABLE}=1. "
                f"{(str(exc).splitlines() or [''])[0]}"
            ) from exc

torch.library.impl(QUALNAME, "CompositeExplicitAutograd", batched_cg_reference, lib=_LIB)
torch.library.impl(QP_IPM_QUALNAME, "CompositeExplicitAutograd", qp_ipm_reference, lib=_LIB)


# ------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, with the same input checks as the real kernels.
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


@torch.library.register_fake(QP_IPM_QUALNAME, lib=_LIB)
def _qp_ipm_fake(K, q, M1, W, T, nGt, maxiter, tol, acceptable_tol, patience):
    check_qp_ipm_inputs(K, q, M1, W, T, nGt, maxiter, tol, acceptable_tol, patience)
    B, N = K.shape[0], K.shape[1]
    return (
        K.new_empty((B, N)),
        K.new_empty((B,), dtype=torch.int64),
        K.new_empty((B,)),
        K.new_empty((B,), dtype=torch.bool),
    )


# ------------------------------------------------------------------------------------------
# Autograd. batched_cg: x = A⁻¹ b with A symmetric, so  grad_b = A⁻¹ grad_x  (one more
# batched_cg with the same A and options) and  grad_A = −grad_b xᵀ,  the gradient
# torch.linalg.solve gives; iterations and residual_norm are not differentiable; x0 gets no
# gradient (the solution does not depend on it).
# qp_ipm: no output is differentiable (QP differentiates its solution implicitly, or unrolls
# its PyTorch loop), so its outputs never require grad.
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


def _qp_ipm_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _qp_ipm_backward(ctx, *grads):
    return (None,) * 10


torch.library.register_autograd(
    QP_IPM_QUALNAME, _qp_ipm_backward, setup_context=_qp_ipm_setup_context, lib=_LIB
)


# ------------------------------------------------------------------------------------------
# vmap of batched_cg: the op is already batched, so a vmapped dimension is folded into the
# batch dimension.
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
