"""Euclidean projections onto closed convex sets: ``proj_C(x) = argmin_{p ∈ C} ½‖p − x‖²``.

JAXopt's names and signatures: ``projection_X(x, hyperparams)``, the set's parameters being
the second argument. Each projection is written in torch ops, so it is differentiable by
autograd and the ``torch.func`` transforms (including ``vmap`` over a batch of points), and its
derivative is the Jacobian of the projection wherever that exists (almost everywhere), never
NaN. The closed forms never synchronise with the host; the iterative ones (transport,
Birkhoff, polyhedron) read their convergence on the host at the package's cadence, except
under ``vmap`` and ``torch.compile``, and are differentiated implicitly.

Shapes: ``x`` is one point. The set is defined on all of ``x`` (a tensor of any shape is one
vector; pytrees of tensors are accepted where the docstring says so); for a batch of points
use ``torch.func.vmap``.

Modules: :mod:`._sets` (closed forms onto simple sets), :mod:`._polytopes` (sparse simplex,
box section, polyhedron), :mod:`._transport` (transportation and Birkhoff polytopes); this
package only re-exports them.
"""

from implicit_torch.projection._polytopes import (
    kl_projection_simplex,
    projection_box_section,
    projection_polyhedron,
    projection_sparse_simplex,
)
from implicit_torch.projection._sets import (
    projection_affine_set,
    projection_box,
    projection_halfspace,
    projection_hypercube,
    projection_hyperplane,
    projection_l1_ball,
    projection_l2_ball,
    projection_l2_sphere,
    projection_linf_ball,
    projection_non_negative,
    projection_simplex,
)

# Row-wise simplex projection, used by the sparsemax loss and layers; not in __all__ (a helper).
from implicit_torch.projection._sets import simplex_rows as simplex_rows
from implicit_torch.projection._transport import (
    kl_projection_birkhoff,
    kl_projection_transport,
    projection_birkhoff,
    projection_transport,
)

__all__ = [
    "kl_projection_birkhoff",
    "kl_projection_simplex",
    "kl_projection_transport",
    "projection_affine_set",
    "projection_birkhoff",
    "projection_box",
    "projection_box_section",
    "projection_halfspace",
    "projection_hypercube",
    "projection_hyperplane",
    "projection_l1_ball",
    "projection_l2_ball",
    "projection_l2_sphere",
    "projection_linf_ball",
    "projection_non_negative",
    "projection_polyhedron",
    "projection_simplex",
    "projection_sparse_simplex",
    "projection_transport",
]
