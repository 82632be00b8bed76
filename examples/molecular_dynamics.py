"""Sensitivity of a jammed soft-sphere packing to a particle diameter, by implicit differentiation.

What this example shows
-----------------------
The molecular-dynamics experiment of Blondel et al. (2022): a 2-D packing of soft
discs of two sizes is relaxed to a mechanically stable energy minimum ``x*(d)`` by FIRE, an
optimiser with discrete, history-dependent logic (velocity resets, adaptive time step) that one
would not want to differentiate through. Implicit differentiation needs only the stationarity
condition ``∇ₓE(x*, d) = 0``: one forward-mode linear solve gives the derivative of every
particle position with respect to the small-particle diameter ``d``, drawn as arrows on the
packing and checked against central finite differences of the relaxation itself.

The math
--------
``N`` discs in a periodic ``L × L`` box, half with diameter ``d`` (1.0) and half 1.4, at
packing fraction ``φ = Σ π dᵢ²/4 / L²`` above jamming (0.88 by default). Harmonic repulsion,

    E(x, d) = Σ_{i<j} ½ (1 − r_ij/σ_ij)²  for r_ij < σ_ij,   σ_ij = (d_i + d_j)/2,

with ``r_ij`` the minimum-image distance. FIRE (Bitzek et al. 2006, "Structural relaxation made
simple") is implemented below in plain torch ops. At the minimum, ``F(x, d) = ∇ₓE = 0`` and the
implicit function theorem gives ``ẋ = ∂x*/∂d = −H⁻¹ ∂_d∇ₓE`` with ``H = ∇ₓ²E`` …

… except that ``H`` is singular, for two reasons, and the derivative must be defined in a gauge:

* **translations**: ``E`` is invariant under a rigid shift of all discs (2 zero modes);
* **rattlers**: discs with fewer than 3 contacts (in 2-D) sit loose in a cage of neighbours.
  Their position in the cage is not determined by the minimisation (a zero mode each), and
  their derivative is not defined (a contact at zero overlap makes ``x*(d)`` non-smooth).
  They are found by the usual recursive pruning and taken out of the energy; the rest, the
  rigid *backbone*, is what is differentiated.

The choice made here, deflation, keeps the linear system symmetric positive definite so that
plain CG applies: the optimality condition is

    F(x, d) = ∇ₓE_bb(x, d) + Π (x − x_ref),

where ``E_bb`` sums over backbone pairs, ``x_ref`` is the relaxed configuration and ``Π`` is
the orthogonal projector onto the zero modes known in closed form: rigid translations of the
backbone and every rattler's own displacement. Since ``Π ∇ₓE_bb = 0`` identically (the net
force vanishes by Newton's third law and rattler rows are zero), ``F = 0`` exactly when
``∇ₓE_bb = 0``, the backbone's centre of mass sits at that of ``x_ref``, and rattlers stay at
``x_ref``. So ``x*`` is a root of ``F``, ``∂F/∂x = H + Π`` is positive definite for a jammed
backbone (eigenvalue 1 on the gauge modes), and ``∂F/∂d = ∂_d∇ₓE_bb``. This is also the gauge
FIRE itself works in: the net force is zero, so FIRE conserves the centre of mass, and a
caged rattler feels no force and does not move, which makes the finite-difference reference
comparable. (Alternatives: pin one particle, which leaves rattlers singular; a ridge
``(H + εI)``, which biases the result by O(ε/λ_min); or GMRES on the singular system and
projecting out the mean afterwards, which relies on the right-hand side staying in range.)

Steps
-----
1. Random positions, relaxed by FIRE to ``max |∇E| < 1e-12``; contacts, rattlers, backbone.
2. ``ẋ = implicit_torch.root_jvp(F, x*, (d, ...), (1, ...), solve=CG)``: one forward-mode
   linear solve (matrix-free Hessian-vector products from ``torch.func.jvp``).
3. Checks: (a) against a dense reference, ``−H⁺ ∂_d∇E_bb`` with ``H⁺`` the pseudo-inverse of
   the formed Hessian (the minimum-norm solution, which is the same gauge); (b) against central
   finite differences ``(x*(d + ε) − x*(d − ε)) / 2ε`` of FIRE relaxations started from ``x*``
   with the full energy (rattlers included), compared on the backbone; the contact network is
   checked to be the same in both perturbed minima.
4. A figure: the packing with the arrows ``ẋ``, and implicit vs finite differences.

What to expect: with 128 discs at φ = 0.88, one or two rattlers and a backbone with mean
contact number ≈ 4.6 (isostatic: ≈ 4); the Hessian's zero modes are exactly the deflated ones,
and ``H + Π`` has eigenvalues in about [2e-3, 5]; CG takes about 210 iterations. The implicit
derivative matches the dense pseudo-inverse to ~1e-12 and the finite differences to ~1e-6
(limited by the relaxation tolerance divided by ``2ε``), with the contact network unchanged
between ``d ± ε``. Growing the small discs pushes the backbone around in a collective,
swirling pattern (not a uniform dilation: the box is fixed). The same holds down to φ = 0.84
(more rattlers, softer modes). About 15 seconds on two cores; ``--smoke`` (32 discs) a few.

Run ``python examples/molecular_dynamics.py`` (``--n N``, ``--phi PHI``, ``--seed S``,
``--out DIR``, ``--smoke``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the example only writes a PNG
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.collections import PatchCollection
from matplotlib.patches import Circle
from tqdm import tqdm

import implicit_torch as it

DTYPE = torch.float64
D_SMALL = 1.0  # the differentiated diameter
D_LARGE = 1.4
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
FTOL = 1e-12  # FIRE stops when the largest force component is below this
CONTACT_TOL = 1e-8  # a pair is a contact when its overlap 1 − r/σ exceeds this
FD_EPS = 1e-5  # central finite-difference step on d
FD_TOL = 1e-4  # required agreement with the finite differences (relative, backbone)
DENSE_TOL = 1e-7  # required agreement with the dense pseudo-inverse


# ----------------------------------------------------------------------------------------------
# The system
# ----------------------------------------------------------------------------------------------


def make_system(n: int, phi: float, seed: int) -> dict:
    """``n`` discs (half small, half large) at random positions in a box of packing fraction φ."""
    gen = torch.Generator().manual_seed(seed)
    is_small = torch.arange(n) < n // 2
    diam = torch.where(is_small, D_SMALL, D_LARGE).to(DTYPE)
    box = math.sqrt(float((math.pi / 4 * diam**2).sum()) / phi)
    x0 = torch.rand(n, 2, generator=gen, dtype=DTYPE) * box
    return {"x0": x0, "is_small": is_small, "box": box, "n": n, "phi": phi}


def diameters(d_small, is_small):
    return torch.where(is_small, d_small, torch.as_tensor(D_LARGE, dtype=DTYPE))


def pair_geometry(x, d_small, is_small, box: float):
    """Minimum-image displacements ``x_i − x_j``, distances, σ_ij and overlaps 1 − r/σ."""
    dr = x[:, None, :] - x[None, :, :]
    dr = dr - box * torch.round(dr / box)  # round is piecewise constant: no derivative
    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    # +1 on the diagonal keeps sqrt away from 0 (whose derivative is infinite); masked below.
    r = torch.sqrt((dr * dr).sum(-1) + eye.to(x.dtype))
    d = diameters(d_small, is_small)
    sigma = 0.5 * (d[:, None] + d[None, :])
    overlap = torch.where(eye, torch.zeros_like(r), 1.0 - r / sigma)
    return dr, r, sigma, overlap


def energy_grad(x, d_small, is_small, box: float, include=None):
    """∇ₓE for E = Σ_{i<j} ½(1 − r_ij/σ_ij)² over overlapping pairs (of ``include`` discs only).

    Written with differentiable torch ops, so ``torch.func.jvp`` through it gives Hessian-
    vector products (in x) and the mixed derivative ∂_d∇ₓE (in d).
    """
    dr, r, sigma, overlap = pair_geometry(x, d_small, is_small, box)
    active = overlap > 0
    if include is not None:
        active = active & include[:, None] & include[None, :]
    # ∂/∂x_i ½(1 − r/σ)² = −(1 − r/σ)/σ · (x_i − x_j)/r
    coeff = torch.where(active, -overlap / (sigma * r), torch.zeros_like(r))
    return (coeff[:, :, None] * dr).sum(1)


def energy(x, d_small, is_small, box: float) -> float:
    _, _, _, overlap = pair_geometry(x, d_small, is_small, box)
    return float(0.25 * (overlap.clamp(min=0) ** 2).sum())  # ½ Σ_{i<j} = ¼ Σ_{i≠j}


# ----------------------------------------------------------------------------------------------
# FIRE
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def fire(
    x0,
    force_fn,
    *,
    ftol: float = FTOL,
    max_steps: int = 200_000,
    dt_start: float = 0.1,
    dt_max: float = 0.5,
    n_min: int = 5,
    f_inc: float = 1.1,
    f_dec: float = 0.5,
    alpha_start: float = 0.1,
    f_alpha: float = 0.99,
    desc: str = "FIRE",
    progress: bool = True,
):
    """Fast Inertial Relaxation Engine (Bitzek, Koskinen, Gähler, Moseler & Gumbsch, PRL 97,
    170201, 2006), unit masses, velocity-Verlet steps.

    After each MD step the velocity is mixed towards the force, ``v ← (1 − α)v + α|v| F̂``.
    While the power ``P = F·v`` stays positive for more than ``n_min`` steps the time step
    grows (× ``f_inc``, up to ``dt_max``) and α decays (× ``f_alpha``); when ``P ≤ 0`` the
    system is going uphill: velocities are zeroed, the step is cut (× ``f_dec``) and α reset.
    Stops when ``max |F| < ftol``. The net force is zero for a pair potential, so the centre
    of mass never moves. Returns ``(x, steps, history of max |F|)``.
    """
    x = x0.clone()
    v = torch.zeros_like(x)
    f = force_fn(x)
    dt, alpha, n_pos = dt_start, alpha_start, 0
    history = []
    bar = tqdm(desc=desc, unit="step", disable=not progress, mininterval=0.5)
    step = 0
    for step in range(1, max_steps + 1):
        x = x + dt * v + 0.5 * dt * dt * f
        f_new = force_fn(x)
        v = v + 0.5 * dt * (f + f_new)
        f = f_new
        fmax = float(f.abs().max())
        if step % 10 == 0:
            history.append((step, fmax))
            bar.update(10)
            if step % 1000 == 0:
                bar.set_postfix(max_force=f"{fmax:.1e}")
        if fmax < ftol:
            break
        power = float((f * v).sum())
        if power > 0:
            v = (1 - alpha) * v + alpha * v.norm() * f / f.norm()
            n_pos += 1
            if n_pos > n_min:
                dt = min(dt * f_inc, dt_max)
                alpha *= f_alpha
        else:
            v = torch.zeros_like(v)
            dt *= f_dec
            alpha = alpha_start
            n_pos = 0
    bar.close()
    history.append((step, float(f.abs().max())))
    return x, step, np.array(history)


def relax(x0, d_small, sysd, desc: str, progress: bool = True):
    def force(x):
        return -energy_grad(x, d_small, sysd["is_small"], sysd["box"])

    return fire(x0, force, desc=desc, progress=progress)


# ----------------------------------------------------------------------------------------------
# Contacts, rattlers, and the optimality condition with the zero modes deflated
# ----------------------------------------------------------------------------------------------


def contacts(x, d_small, sysd):
    _, _, _, overlap = pair_geometry(x, d_small, sysd["is_small"], sysd["box"])
    return overlap > CONTACT_TOL


def find_backbone(contact):
    """Recursive pruning: discs with fewer than 3 contacts (d + 1 in 2-D) among non-rattlers
    are rattlers; removing them can make neighbours rattlers too."""
    alive = torch.ones(contact.shape[0], dtype=torch.bool)
    while True:
        z = (contact & alive[None, :]).sum(1)
        new = alive & (z >= 3)
        if bool((new == alive).all()):
            return alive
        alive = new


def project_zero_modes(v, backbone):
    """Π v: the backbone's mean displacement on backbone rows, v itself on rattler rows."""
    mean_bb = (v * backbone[:, None]).sum(0) / backbone.sum()
    return torch.where(backbone[:, None], mean_bb.expand_as(v), v)


def optimality(x, d_small, x_ref, backbone, is_small, box):
    """F(x, d) = ∇ₓE_bb(x, d) + Π(x − x_ref): zero at the relaxed x*, with ∂F/∂x = H + Π
    positive definite (see the module docstring)."""
    grad = energy_grad(x, d_small, is_small, box, include=backbone)
    return grad + project_zero_modes(x - x_ref, backbone)


# ----------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------


def draw_packing(ax, x, d_small, sysd, backbone, xdot):
    box = sysd["box"]
    xw = torch.remainder(x, box).numpy()
    d = diameters(torch.tensor(d_small, dtype=DTYPE), sysd["is_small"]).numpy()
    patches, colours = [], []
    for i in range(len(xw)):
        colour = "0.8" if not backbone[i] else ("#8fb8de" if sysd["is_small"][i] else "#f4b183")
        for sx in (-box, 0.0, box):  # periodic images that overlap the box
            for sy in (-box, 0.0, box):
                cx, cy = xw[i, 0] + sx, xw[i, 1] + sy
                r = d[i] / 2
                if -r < cx < box + r and -r < cy < box + r:
                    patches.append(Circle((cx, cy), r))
                    colours.append(colour)
    ax.add_collection(PatchCollection(patches, facecolor=colours, edgecolor="0.3", linewidth=0.5))
    bb = backbone.numpy()
    v = xdot.numpy()
    scale = 1.2 / np.abs(v[bb]).max()  # longest arrow ≈ 1.2 particle diameters
    ax.quiver(
        xw[bb, 0],
        xw[bb, 1],
        v[bb, 0] * scale,
        v[bb, 1] * scale,
        angles="xy",
        scale_units="xy",
        scale=1,
        width=0.004,
        color="k",
    )
    ax.plot([0, box, box, 0, 0], [0, 0, box, box, 0], color="k", lw=1)
    ax.set_xlim(0, box)
    ax.set_ylim(0, box)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def make_figure(res: dict, sysd: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.2), gridspec_kw={"width_ratios": [1.25, 1, 1]})
    ax = axes[0]
    draw_packing(ax, res["x_star"], D_SMALL, sysd, res["backbone"], res["xdot"])
    ax.set_title(
        f"{sysd['n']} discs, φ = {sysd['phi']:.2f}: arrows ∂x*/∂d_small\n(blue: d = {D_SMALL}, "
        f"orange: {D_LARGE}, grey: rattlers; periodic box)",
        fontsize=10,
    )

    ax = axes[1]
    bb = res["backbone"].numpy()
    impl = res["xdot"].numpy()[bb].ravel()
    fd = res["xdot_fd"].numpy()[bb].ravel()
    ax.scatter(fd, impl, s=10, color="C0")
    lim = 1.05 * max(np.abs(fd).max(), np.abs(impl).max())
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8, label="y = x")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel(f"central finite differences of FIRE (ε = {FD_EPS:g})")
    ax.set_ylabel("implicit (root_jvp, CG on H + Π)")
    ax.set_title(f"Backbone position derivatives (rel. err {res['err_fd']:.1e})")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[2]
    for name, hist, colour in (
        ("relaxation from random positions", res["hist"], "C0"),
        ("d + ε from x*", res["hist_plus"], "C2"),
        ("d − ε from x*", res["hist_minus"], "C3"),
    ):
        ax.semilogy(hist[:, 0], hist[:, 1], color=colour, label=name)
    ax.axhline(FTOL, color="k", ls=":", lw=1, label=f"tolerance {FTOL:g}")
    ax.set_xlabel("FIRE step")
    ax.set_ylabel("max |force component|")
    ax.set_title("FIRE convergence")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    fig.suptitle(
        "Soft-sphere packing: sensitivity of the energy minimum to the small-disc diameter "
        "by implicit differentiation",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=128, help="number of discs (default 128)")
    parser.add_argument("--phi", type=float, default=0.88, help="packing fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the figure")
    parser.add_argument("--smoke", action="store_true", help="32 discs")
    args = parser.parse_args(argv)
    if args.smoke and args.n == 128:
        args.n = 32
    # Small dense pair computations: one thread avoids thread start-up and contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    sysd = make_system(args.n, args.phi, args.seed)
    is_small, box, n = sysd["is_small"], sysd["box"], sysd["n"]
    d = torch.tensor(D_SMALL, dtype=DTYPE)
    print(
        f"{n} discs ({n // 2} of d = {D_SMALL}, {n - n // 2} of {D_LARGE}) in a periodic "
        f"{box:.3f} × {box:.3f} box, φ = {args.phi}"
    )

    # 1. Relax from random positions.
    x_star, steps, hist = relax(sysd["x0"], d, sysd, "FIRE from random positions")
    e_star = energy(x_star, d, is_small, box)
    contact = contacts(x_star, d, sysd)
    backbone = find_backbone(contact)
    n_bb = int(backbone.sum())
    z_bb = float((contact & backbone[None, :]).sum(1)[backbone].float().mean()) if n_bb else 0.0
    print(
        f"FIRE: {steps} steps, max |force| {hist[-1, 1]:.1e}, energy per disc {e_star / n:.3e}; "
        f"{n - n_bb} rattler(s), backbone of {n_bb} discs with mean contact number {z_bb:.2f} "
        f"(isostatic: 4 − 4/N_bb = {4 - 4 / max(n_bb, 1):.2f})"
    )
    if n_bb < 3:
        raise RuntimeError("no rigid backbone: the packing is not jammed (raise --phi)")

    # 2. The derivative by implicit differentiation: one forward-mode linear solve.
    params = (d, x_star, backbone, is_small, box)
    tangents = (torch.ones_like(d), None, None, None, None)
    solves = []

    def cg(matvec, rhs):
        # CG with a tight tolerance, keeping its diagnostics (iterations, residual) to print.
        sol, info = it.solve_cg(matvec, rhs, tol=1e-12, maxiter=20 * 2 * n, return_info=True)
        solves.append(info)
        return sol

    residual = float(optimality(x_star, *params).abs().max())
    t0 = time.perf_counter()
    xdot = it.root_jvp(optimality, x_star, params, tangents, solve=cg)
    t_impl = time.perf_counter() - t0
    cg_iters = int(solves[-1].iterations)
    print(
        f"implicit derivative ∂x*/∂d by root_jvp: {t_impl * 1e3:.0f} ms, {cg_iters} CG "
        f"iterations on H + Π (matrix-free); optimality residual at x*: {residual:.1e}"
    )

    # 3a. Dense reference: the minimum-norm solution with the pseudo-inverse of the Hessian.
    def grad_bb(x, dd):
        return energy_grad(x, dd, is_small, box, include=backbone)

    H = torch.func.jacfwd(grad_bb)(x_star, d).reshape(2 * n, 2 * n)
    b = torch.func.jacfwd(grad_bb, argnums=1)(x_star, d).reshape(2 * n)
    H = 0.5 * (H + H.T)
    eig_H = torch.linalg.eigvalsh(H)
    cutoff = 1e-9 * float(eig_H.abs().max())
    n_zero = int((eig_H.abs() < cutoff).sum())
    n_negative = int((eig_H < -cutoff).sum())
    xdot_dense = -(torch.linalg.pinv(H, hermitian=True, rtol=1e-9) @ b).reshape(n, 2)
    A = H + torch.func.jacfwd(lambda v: project_zero_modes(v, backbone))(
        torch.zeros(n, 2, dtype=DTYPE)
    ).reshape(2 * n, 2 * n)
    eig_A = torch.linalg.eigvalsh(0.5 * (A + A.T))
    err_dense = float((xdot - xdot_dense).norm() / xdot_dense.norm())
    print(
        f"Hessian: {n_zero} zero modes (2 translations + 2 × {n - n_bb} rattlers = "
        f"{2 + 2 * (n - n_bb)}), {n_negative} negative; H + Π: eigenvalues in "
        f"[{float(eig_A[0]):.2e}, {float(eig_A[-1]):.2e}]"
    )

    # 3b. Central finite differences of the relaxation itself, started from x*.
    x_plus, s_plus, h_plus = relax(x_star, d + FD_EPS, sysd, "FIRE at d + ε")
    x_minus, s_minus, h_minus = relax(x_star, d - FD_EPS, sysd, "FIRE at d − ε")
    xdot_fd = (x_plus - x_minus) / (2 * FD_EPS)
    bb = backbone[:, None]
    err_fd = float(((xdot - xdot_fd) * bb).norm() / (xdot_fd * bb).norm())
    worst = float(((xdot - xdot_fd) * bb).norm(dim=1).max() / (xdot_fd * bb).norm(dim=1).max())
    rattler_motion = float((xdot_fd * ~bb).abs().max()) if n_bb < n else 0.0
    same_contacts = bool(
        (contacts(x_plus, d + FD_EPS, sysd) == contact).all()
        and (contacts(x_minus, d - FD_EPS, sysd) == contact).all()
    )
    com_drift = float((x_plus.mean(0) - x_star.mean(0)).abs().max())

    def report(what: str, value: float, passed: bool) -> bool:
        print(f"  {what:64s} {value:9.2e}  [{'ok' if passed else 'FAIL'}]")
        return passed

    print("checks (relative errors on the backbone):")
    ok = report("implicit vs dense pseudo-inverse −H⁺ ∂_d∇E", err_dense, err_dense < DENSE_TOL)
    ok &= report(
        f"implicit vs central finite differences of FIRE (ε = {FD_EPS:g})", err_fd, err_fd < FD_TOL
    )
    print(f"    worst single disc (relative to the largest derivative)         {worst:9.2e}")
    print(
        f"  finite differences: {s_plus} / {s_minus} FIRE steps; contact network "
        f"{'unchanged' if same_contacts else 'CHANGED'} between d ± ε; largest rattler "
        f"displacement derivative {rattler_motion:.1e}; centre-of-mass drift {com_drift:.1e}"
    )
    ok &= same_contacts
    modes_ok = n_zero == 2 + 2 * (n - n_bb) and n_negative == 0
    print(
        f"  Hessian zero modes are exactly the deflated ones (translations + rattlers): "
        f"{'yes' if modes_ok else 'NO'}"
    )
    ok &= modes_ok
    print(f"molecular dynamics check {'passed' if ok else 'FAILED'}")

    speed = xdot[backbone].norm(dim=1)
    print(
        f"|∂x_i/∂d| on the backbone: median {float(speed.median()):.2f}, max "
        f"{float(speed.max()):.2f} (length per unit of diameter)"
    )

    res = {
        "x_star": x_star,
        "backbone": backbone,
        "xdot": xdot,
        "xdot_fd": xdot_fd,
        "err_fd": err_fd,
        "hist": hist,
        "hist_plus": h_plus,
        "hist_minus": h_minus,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "molecular_dynamics.png"
    make_figure(res, sysd, png)
    shown = os.path.relpath(png)
    shown = str(png.resolve()) if shown.startswith("..") else shown
    print(f"done in {time.perf_counter() - t_start:.1f} s; figure written to {shown}")
    return {
        "check_passed": ok,
        "err_dense": err_dense,
        "err_fd": err_fd,
        "n_rattlers": n - n_bb,
        "lambda_min": float(eig_A[0]),
        "fire_steps": steps,
        "cg_iterations": cg_iters,
        "figure": str(png),
    }


if __name__ == "__main__":
    main()
