"""implicit_torch: automatic implicit differentiation of optimization problems in PyTorch.

Write a forward solver and an optimality condition ``F(x, *params) = 0`` its solution
satisfies; the solution becomes differentiable in ``params`` through the implicit function
theorem (Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022).
"""

from implicit_torch import linear, loss, meta, nn, objective, ops, optimality, projection, prox
from implicit_torch._errors import ConvergenceError, ConvergenceWarning, IndefiniteSystemError
from implicit_torch._implicit_diff import (
    custom_fixed_point,
    custom_root,
    implicit_solve,
    root_jvp,
    root_vjp,
)
from implicit_torch.adjoint import ImplicitAdjoint, PhantomAdjoint, UnrolledAdjoint
from implicit_torch.linear import (
    LinearOperator,
    SolveInfo,
    WarmStart,
    solve_auto,
    solve_bicgstab,
    solve_cg,
    solve_cholesky,
    solve_gmres,
    solve_lu,
    solve_neumann,
    solve_normal_cg,
)
from implicit_torch.solvers import (
    LBFGS,
    QP,
    AndersonAcceleration,
    Bisection,
    BlockCoordinateDescent,
    Broyden,
    EqualityConstrainedQP,
    FixedPointIteration,
    GaussNewton,
    GradientDescent,
    LevenbergMarquardt,
    MirrorDescent,
    OptStep,
    ProjectedGradient,
    ProximalGradient,
)

__version__ = "0.1.0"

__all__ = [
    "LBFGS",
    "QP",
    "AndersonAcceleration",
    "Bisection",
    "BlockCoordinateDescent",
    "Broyden",
    "ConvergenceError",
    "ConvergenceWarning",
    "EqualityConstrainedQP",
    "FixedPointIteration",
    "GaussNewton",
    "GradientDescent",
    "ImplicitAdjoint",
    "IndefiniteSystemError",
    "LevenbergMarquardt",
    "LinearOperator",
    "MirrorDescent",
    "OptStep",
    "PhantomAdjoint",
    "ProjectedGradient",
    "ProximalGradient",
    "SolveInfo",
    "UnrolledAdjoint",
    "WarmStart",
    "custom_fixed_point",
    "custom_root",
    "implicit_solve",
    "linear",
    "loss",
    "meta",
    "nn",
    "objective",
    "ops",
    "optimality",
    "projection",
    "prox",
    "root_jvp",
    "root_vjp",
    "solve_auto",
    "solve_bicgstab",
    "solve_cg",
    "solve_cholesky",
    "solve_gmres",
    "solve_lu",
    "solve_neumann",
    "solve_normal_cg",
]
