"""Solvers whose solutions are differentiable in their arguments (JAXopt's names and API).

Each solver is a dataclass of hyperparameters with ``run(init_params, *args) -> OptStep(params,
state)``, ``init_state``, ``update`` and ``optimality_fun``; see :mod:`.base` for the shared
conventions (implicit differentiation by default, unrolling on request, convergence checks).
"""

from implicit_torch.solvers.anderson import AndersonAcceleration, AndersonState
from implicit_torch.solvers.base import IterativeSolver, OptStep
from implicit_torch.solvers.bisection import Bisection, BisectionState
from implicit_torch.solvers.block_coordinate_descent import (
    BlockCoordinateDescent,
    BlockCoordinateDescentState,
)
from implicit_torch.solvers.broyden import Broyden, BroydenState
from implicit_torch.solvers.fixed_point_iteration import FixedPointIteration, FixedPointState
from implicit_torch.solvers.gauss_newton import GaussNewton, GaussNewtonState
from implicit_torch.solvers.gradient_descent import GradientDescent
from implicit_torch.solvers.lbfgs import LBFGS, LbfgsState
from implicit_torch.solvers.levenberg_marquardt import LevenbergMarquardt, LevenbergMarquardtState
from implicit_torch.solvers.mirror_descent import MirrorDescent, MirrorDescentState
from implicit_torch.solvers.projected_gradient import ProjectedGradient
from implicit_torch.solvers.proximal_gradient import ProxGradState, ProximalGradient
from implicit_torch.solvers.qp import QP, EqualityConstrainedQP, KKTSolution, QPState

__all__ = [
    "LBFGS",
    "QP",
    "AndersonAcceleration",
    "AndersonState",
    "Bisection",
    "BisectionState",
    "BlockCoordinateDescent",
    "BlockCoordinateDescentState",
    "Broyden",
    "BroydenState",
    "EqualityConstrainedQP",
    "FixedPointIteration",
    "FixedPointState",
    "GaussNewton",
    "GaussNewtonState",
    "GradientDescent",
    "IterativeSolver",
    "KKTSolution",
    "LbfgsState",
    "LevenbergMarquardt",
    "LevenbergMarquardtState",
    "MirrorDescent",
    "MirrorDescentState",
    "OptStep",
    "ProjectedGradient",
    "ProxGradState",
    "ProximalGradient",
    "QPState",
]
