"""The one iteration driver: ``state ← step(state)`` until no system is active or ``maxiter``.

Every iterative loop of the package (the Krylov solvers, the solver classes, the QP, Sinkhorn,
iMAML's inner loop) runs through :func:`iterate`, so the policy for reading values on the host
— the only thing that lets a loop stop early — is decided here, once:

* on the CPU a read costs nanoseconds: convergence is checked before every step;
* on an accelerator each read waits for the device: every ``check_every`` steps (10 by
  default); the steps in between are masked by the caller's ``step`` (a finished system is
  frozen by ``torch.where``), so results do not depend on the cadence;
* under ``torch.func.vmap`` or ``torch.compile`` nothing can be read: all ``maxiter`` masked
  steps run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from implicit_torch import _runtime

__all__ = ["Cadence", "iterate"]

State = TypeVar("State")


class Cadence:
    """When a loop may read tensor values on the host.

    Args:
        device: where the loop's tensors live.
        *tensors: tensors whose batching decides whether values can be read at all (the
            legacy batching of ``is_grads_batched`` shows only on the tensors).
        check_every: steps between reads; ``None``: 1 on the CPU, 10 on an accelerator.
    """

    def __init__(
        self, device: torch.device, *tensors: torch.Tensor, check_every: int | None = None
    ):
        if check_every is not None and (isinstance(check_every, bool) or check_every < 1):
            raise ValueError(f"check_every must be a positive integer, got {check_every}")
        self.inspect = _runtime.can_inspect_values(*tensors)
        self.interval = check_every or _runtime.check_interval(device)

    @property
    def every_step(self) -> bool:
        """Values are read before every step, so a step only ever runs on active systems and
        needs no masking."""
        return self.inspect and self.interval == 1

    def due(self, k: int) -> bool:
        """Whether values are read before step ``k``."""
        return self.inspect and k % self.interval == 0


def iterate(
    step: Callable[[State], State],
    state: State,
    *,
    active: Callable[[State], torch.Tensor],
    maxiter: int,
    cadence: Cadence,
    start: int = 0,
    on_check: Callable[[int, State], Any] | None = None,
) -> tuple[State, int]:
    """Apply ``step`` from ``start`` until ``maxiter`` steps or no system is active.

    Args:
        step: one iteration, ``state -> state``; it must leave inactive systems unchanged
            unless ``cadence.every_step`` (then it only runs while some system is active, but
            the others may still need masking when batched).
        state: the initial state.
        active: ``state -> bool tensor``, the systems still running; read on the host at the
            cadence's checks (a NaN comparison is False, so a NaN stops the loop too).
        maxiter: the step count at which the loop stops regardless.
        cadence: when values may be read.
        start: steps already taken (by a caller's fast path).
        on_check: called with ``(k, state)`` at every host check (for ``verbose`` printing).

    Returns:
        ``(state, k)``: the final state and the number of steps taken, ``start`` included.
    """
    k = start
    while k < maxiter:
        if cadence.due(k):
            if on_check is not None:
                on_check(k, state)
            if not bool(active(state).any()):
                break
        state = step(state)
        k += 1
    return state, k
