"""What the current execution context allows: data-dependent control flow or not.

Iterative loops stop early by reading a convergence flag on the host every few iterations.
That is impossible under ``torch.func.vmap`` (a batched tensor has no single truth value) and
would break a ``torch.compile`` graph, so there the loops run their full, masked iteration
count instead. Results are the same either way: converged systems are frozen by masking.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

import torch

# --------------------------------------------------------------------------------------------
# Private torch APIs: this module is the only one in the package that touches them. Each is
# checked at import, so that a torch release that renames one fails loudly here, naming it,
# instead of silently changing behaviour somewhere else.
# --------------------------------------------------------------------------------------------


def _private(module: str, *names: str):
    """``module`` after checking that it has every attribute in ``names``."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(_renamed(module, exc)) from exc
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise ImportError(_renamed(f"{module}.{missing[0]}"))
    return mod


def _renamed(what: str, exc: Exception | None = None) -> str:
    return (
        f"implicit_torch needs torch's private API {what}, which torch {torch.__version__} does "
        f"not have{f' ({exc})' if exc else ''}: this torch release is not supported (tested: "
        f"torch 2.13); please report it."
    )


_functorch = _private(
    "torch._C._functorch", "get_interpreter_stack", "TransformType", "is_legacy_batchedtensor"
)
_eager_transforms = _private("torch._functorch.eager_transforms", "JVP_NESTING")
_forward_ad = _private("torch.autograd.forward_ad", "_current_level")
# torch has no public pytree module yet (torch 2.13): the package's pytree helpers
# (implicit_torch._tree) use this one.
pytree = _private(
    "torch.utils._pytree", "tree_flatten", "tree_unflatten", "tree_map", "tree_leaves", "TreeSpec"
)


def is_legacy_batched(t: torch.Tensor) -> bool:
    """True for a tensor of the legacy batching of ``autograd.grad(is_grads_batched=True)``."""
    return _functorch.is_legacy_batchedtensor(t)


def under_vmap() -> bool:
    """True inside any level of ``torch.func.vmap``."""
    stack = _functorch.get_interpreter_stack()
    if not stack:
        return False
    return any(level.key() == _functorch.TransformType.Vmap for level in stack)


def under_functorch() -> bool:
    """True inside any torch.func transform (grad, vjp, jvp, vmap, ...)."""
    return bool(_functorch.get_interpreter_stack())


def can_inspect_values(*tensors: torch.Tensor) -> bool:
    """True when Python may branch on a tensor's value (no vmap, not being compiled).

    ``tensors``, when given, are also checked for the legacy batching that
    ``torch.autograd.grad(..., is_grads_batched=True)`` uses, which no interpreter stack shows.
    """
    if torch.compiler.is_compiling():
        return False
    if any(is_legacy_batched(t) for t in tensors):
        return False
    return not under_vmap()


def check_interval(device: torch.device) -> int:
    """Iterations between host-side convergence checks.

    On the CPU a check costs a few nanoseconds, so loops stop as soon as every system has
    converged. On an accelerator each check waits for the device, so it happens every 10
    iterations; the masked extra iterations leave converged systems unchanged.
    """
    return 1 if device.type == "cpu" else 10


def forward_ad_blocks_func_jvp() -> bool:
    """True when ``torch.func.jvp`` cannot run: inside a ``torch.autograd.forward_ad`` dual
    level opened outside torch.func (as ``gradcheck(check_forward_ad=True)`` does), where
    torch refuses to nest forward-mode AD."""
    return _forward_ad._current_level >= 0 and _eager_transforms.JVP_NESTING == 0


def jvp(fn, primals: tuple, tangents: tuple):
    """``(fn(*primals), J·tangents)``, by ``torch.func.jvp`` or, where forward mode cannot
    nest, as the transpose of a vector-Jacobian product (``J t = (u ↦ Jᵀu)ᵀ t``, two reverse
    passes)."""
    if not forward_ad_blocks_func_jvp():
        return torch.func.jvp(fn, primals, tangents)
    out, vjp_fn = torch.func.vjp(fn, *primals)
    zeros = pytree.tree_map(torch.zeros_like, out)
    _, transpose = torch.func.vjp(vjp_fn, zeros)
    return out, transpose(tangents)[0]


# Forward-over-forward through a torch.autograd.Function is silently wrong in torch.func: the
# inner jvp rule runs without the outer level's tangents, so second-order forward terms vanish
# (pytorch issue 197867, open as of torch 2.13). The engine refuses that case instead. To tell
# it from a legitimate nesting -- the engine's own jvp rule calling torch.func.jvp on a user
# function that contains another implicit layer -- the Jvp levels whose rule is running are
# recorded here.
_rules = threading.local()


def _jvp_levels() -> list[int]:
    stack = _functorch.get_interpreter_stack() or []
    return [i.level() for i in stack if i.key() == _functorch.TransformType.Jvp]


@contextlib.contextmanager
def running_jvp_rule():
    """Marks the innermost forward-mode level as handled by an engine jvp rule."""
    levels = _jvp_levels()
    active = _rules.__dict__.setdefault("levels", [])
    active.append(max(levels) if levels else None)
    try:
        yield
    finally:
        active.pop()


def forward_over_forward() -> bool:
    """True when a jvp rule is asked for while an outer torch.func forward level is live."""
    levels = _jvp_levels()
    if len(levels) < 2:
        return False
    active = set(_rules.__dict__.get("levels", []))
    return any(level not in active for level in levels[:-1] if level != max(levels))


# Floating dtypes too coarse for a linear solve: derivatives are computed in float32 instead.
LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def full_precision():
    """Disable ``torch.autocast`` (every device type) for the derivative computations.

    Policy: the linear solves and the derivatives of the optimality function run in the dtypes
    of the solution and parameters (float32 or float64), whatever autocast would pick, so that
    a ``loss.backward()`` inside an autocast region does not solve in bfloat16/float16.
    """
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def upcast(t):
    """``t`` in float32 if it is a float16/bfloat16 tensor, else ``t`` itself."""
    if isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION:
        return t.float()
    return t
