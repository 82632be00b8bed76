"""Layers whose outputs are solutions of inner problems, with implicit gradients.

* :class:`ImplicitLayer` — subclass it, define ``solve_forward`` (any forward solver) and
  ``optimality`` (a residual ``F(x, *inputs)`` that is zero at the solution, written with the
  module's own parameters and buffers). ``layer(*inputs)`` returns ``x*`` differentiable in
  the inputs and in every registered parameter, as its ``adjoint`` object says (by default
  the implicit function theorem).
* :class:`ArgminLayer` — ``x* = argmin_x objective(x, *inputs)``: define ``objective`` (and
  ``initial``); the forward runs gradient descent, the backward differentiates the
  stationarity condition ``∇ₓ objective = 0``.
* :class:`DEQ` — a deep-equilibrium layer ``z* = f(z*, x)`` around any ``nn.Module`` ``f``:
  forward by Anderson acceleration, Broyden or fixed-point iteration, backward by the
  adjoint: implicit, phantom (one-step) or unrolled.
* :class:`QPLayer` — OptNet-style (Amos & Kolter, 2017) batched quadratic program
  ``argmin_x ½xᵀQx + pᵀx  s.t.  Ax = b, Gx ≤ h`` as a layer, differentiable in all its data.
* :class:`Sparsemax` and :class:`SimplexProjection` — Euclidean projections onto the simplex
  along a dimension (Martins & Astudillo, 2016), with their exact Jacobians.
* :class:`BirkhoffProjection` — scores to doubly-stochastic matrices: Sinkhorn (KL projection)
  or the sparse Euclidean projection, differentiated implicitly.

How a layer's solution is differentiated is an object from :mod:`implicit_torch.adjoint`,
passed as ``adjoint=``: ``ImplicitAdjoint(solve)`` (``solve`` the backward linear solver),
``PhantomAdjoint(steps, damping)`` (fixed points) or ``UnrolledAdjoint()``. Warm starts
(``warm_start=True``): the forward from the previous solution, kept in non-persistent buffers
(:class:`ForwardWarmStart`: out of ``state_dict``, moved by ``.to``); the backward from the
previous adjoint (:class:`~implicit_torch.WarmStart`).
"""

from implicit_torch.nn.deq import DEQ
from implicit_torch.nn.implicit_layer import ArgminLayer, ImplicitLayer
from implicit_torch.nn.projections import BirkhoffProjection, SimplexProjection, Sparsemax
from implicit_torch.nn.qp_layer import QPLayer
from implicit_torch.nn.warm_start import ForwardWarmStart

__all__ = [
    "DEQ",
    "ArgminLayer",
    "BirkhoffProjection",
    "ForwardWarmStart",
    "ImplicitLayer",
    "QPLayer",
    "SimplexProjection",
    "Sparsemax",
]
