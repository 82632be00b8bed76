"""An OptNet-style QP layer that learns its constraints: recovering a hidden polytope.

What this example shows
-----------------------
A layer whose output is the solution of a quadratic program, here the Euclidean projection

    y(x; G, h) = argmin_y ½‖y − x‖²   subject to   G y ≤ h,

with the constraint data ``(G, h)`` as learnable parameters. Training data are points ``x``
and their projections onto a hidden polygon (a regular hexagon); fitting the layer's output
to those projections by gradient descent moves its constraints onto the hidden polygon's
edges. The gradient of the loss with respect to ``G`` and ``h`` goes through the QP's
solution by implicit differentiation of its KKT conditions

    y − x + Gᵀλ = 0,   λ ⊙ (G y − h) = 0,   λ ≥ 0,  G y ≤ h,

(:class:`implicit_torch.nn.QPLayer`, solved by a batched interior-point method), with no
backpropagation through the solver's iterations. Points inside the learned polygon carry no
gradient (the projection is the identity there); points outside pull the active edges.

Steps
-----
1. Data: points drawn uniformly in [−2, 2]², targets their projections onto the hexagon
   (computed by the same layer with the true constraints).
2. A check: the layer's gradient in ``(G, h)`` against central finite differences.
3. Training: Adam on ``(G, h)`` from a random polygon (tqdm progress).
4. A figure: the true and learned polygons and the training loss.

What to expect: the finite-difference check agrees to ~1e-7; the loss falls from ~1e-1 to
~1e-14 and the learned polygon lies on the hexagon (about 15 s on two CPU cores).

Run ``python examples/optnet_polytope.py`` (``--steps N``, ``--out DIR``, ``--smoke``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

from implicit_torch.nn import QPLayer

DT = torch.float64
N_SIDES = 6


def hexagon():
    """G y ≤ h for a regular hexagon of inradius 1: unit normals at 60° steps, offsets 1."""
    angles = torch.arange(N_SIDES, dtype=DT) * 2 * math.pi / N_SIDES
    return torch.stack([angles.cos(), angles.sin()], 1), torch.ones(N_SIDES, dtype=DT)


def project(layer, x, G, h):
    return layer(torch.eye(2, dtype=DT), -x, G, h)


def check_gradient(layer, x, y, G, h, eps=1e-6) -> float:
    """Max error of d loss/d(G, h) against central finite differences, relative to the
    gradient's largest entry."""
    G, h = G.clone().requires_grad_(), h.clone().requires_grad_()
    loss = lambda G, h: (project(layer, x, G, h) - y).square().mean()  # noqa: E731
    gG, gh = torch.autograd.grad(loss(G, h), (G, h))
    errors = []
    with torch.no_grad():
        for param, grad in ((G, gG), (h, gh)):
            flat, gflat = param.view(-1), grad.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])
                flat[i] = old + eps
                up = loss(G, h)
                flat[i] = old - eps
                down = loss(G, h)
                flat[i] = old
                fd = float(up - down) / (2 * eps)
                errors.append(abs(fd - float(gflat[i])))
    return max(errors) / max(float(gG.abs().max()), float(gh.abs().max()))


def polygon_vertices(G, h, grid=400):
    """Boundary of {G y ≤ h} ∩ [−3, 3]² for plotting: a fine grid's feasible points' hull."""
    from scipy.spatial import ConvexHull

    t = torch.linspace(-3, 3, grid, dtype=DT)
    pts = torch.cartesian_prod(t, t)
    inside = pts[(pts @ G.T <= h).all(1)]
    if len(inside) < 3:
        return None
    hull = ConvexHull(inside.numpy())
    v = inside.numpy()[hull.vertices]
    return [*v, v[0]]


def plot(G_true, h_true, G0, h0, G, h, history, x, y, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for (Gp, hp), style, label in (
        ((G_true, h_true), "k-", "hidden hexagon"),
        ((G0, h0), "C1:", "initial constraints"),
        ((G, h), "C0--", "learned constraints"),
    ):
        v = polygon_vertices(Gp.detach(), hp.detach())
        if v is not None:
            xs, ys = zip(*v)
            axes[0].plot(xs, ys, style, label=label)
    axes[0].scatter(x[:200, 0], x[:200, 1], s=4, c="0.7", label="inputs x")
    axes[0].scatter(y[:200, 0], y[:200, 1], s=4, c="C3", label="targets (projections)")
    axes[0].set(aspect="equal", xlim=(-2.2, 2.2), ylim=(-2.2, 2.2), title="constraints")
    axes[0].legend(fontsize=7, loc="upper right")
    axes[1].semilogy(history)
    axes[1].set(title="training loss (MSE of the projections)", xlabel="step")
    fig.suptitle("QP layer learning its constraints through implicit differentiation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    parser.add_argument("--smoke", action="store_true", help="a few steps")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    layer = QPLayer()
    G_true, h_true = hexagon()
    x = -2 + 4 * torch.rand(512, 2, generator=gen, dtype=DT)
    with torch.no_grad():
        y = project(layer, x, G_true, h_true)

    # the initial polygon: the hexagon turned by 25° and grown by 40%, with perturbed normals
    # (every edge stays active for some points: an edge that no point touches gets no
    # gradient and would stay where it is)
    turn = math.radians(25)
    R = torch.tensor(
        [[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]], dtype=DT
    )
    G0 = G_true @ R.T + 0.05 * torch.randn(N_SIDES, 2, generator=gen, dtype=DT)
    h0 = 1.4 + 0.1 * torch.rand(N_SIDES, generator=gen, dtype=DT)
    # (a tight solver tolerance: finite differences divide the solution's error by eps)
    err = check_gradient(QPLayer(tol=1e-13), x[:32], y[:32], G0, h0)
    print(f"QP layer gradient vs central finite differences: max relative error {err:.1e}")

    G, h = G0.clone().requires_grad_(), h0.clone().requires_grad_()
    opt = torch.optim.Adam([G, h], lr=0.02)
    history = []
    steps = 10 if args.smoke else args.steps
    for _ in tqdm(range(steps), desc="training", unit="step"):
        loss = (project(layer, x, G, h) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "optnet_polytope.png"
    plot(G_true, h_true, G0, h0, G, h, history, x, y, path)
    print(
        f"training loss: {history[0]:.2e} → {history[-1]:.2e} after {steps} steps; figure: {path}"
    )
    return {
        "grad_check": err,
        "loss_initial": history[0],
        "loss_final": history[-1],
        "figure": str(path),
    }


if __name__ == "__main__":
    main()
