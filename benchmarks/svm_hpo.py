"""Hyperparameter optimisation of a multiclass linear SVM: one hypergradient, implicit vs unrolled.

The experiment of Blondel et al. (2022, §4.1, Figure 4). The inner problem is the dual of the
multiclass linear SVM (Crammer & Singer), every row of ``β ∈ R^{n×k}`` on the simplex:

    β*(λ) = argmin_β  ½/λ · ‖Xᵀ(Y − β)‖² + ⟨β, Y⟩        (objective.multiclass_linear_svm_dual)

with primal weights ``W(λ) = Xᵀ(Y − β*)/λ``; the outer loss is the mean multiclass logistic loss
of ``X_val W(λ)`` on a validation set, and one hypergradient is ``d L_val / dλ`` (forward solve
+ backward). Three forward solvers, each differentiated through its own fixed point:

* ``md``: MirrorDescent with the entropic (KL) step ``β⁺ = softmax(log β − η∇f)``, row-wise;
* ``pg``: ProjectedGradient (FISTA) with the Euclidean projection of each row onto the simplex
  (both given the objective's closed-form gradient, ``value_and_grad=True``, in both modes;
  ``--autograd-gradient`` takes it by autograd instead);
* ``bcd``: BlockCoordinateDescent over the rows of ``β`` (samples), projection as block prox,
  differentiated through the projected-gradient fixed point.

``implicit``: ``run`` as is (forward under ``no_grad``, backward = one linear solve with the
optimality condition's Jacobian: GMRES, BiCGSTAB for ``md``); ``unrolled``: the same solver
with ``unroll=True``, backward through its iterations. Both run the same, fixed number of
iterations (``tol=0``), so they compute the gradient at the same point; the table reports their
relative difference (small when the forward solve has converged, which is what implicit
differentiation assumes) and the solver's final error.

Data (no download): ``sklearn.datasets.make_classification`` with ``n_train`` training and as
many validation samples, ``k = 5`` classes, ``d`` features (10 informative, ``d/2`` redundant, i.e.
linear combinations of those, the rest noise), standardised and divided by ``√d`` (so
``‖x_i‖ = 1`` on average at every size): the Gram matrix ``XXᵀ`` keeps a class structure of
rank 10 on top of a well-conditioned noise part, and ``n_train < d`` makes the dual's solution
unique. (With only noise features added, ``XXᵀ → I`` as ``d`` grows and the hypergradient
vanishes.) ``λ = 2``, where the validation loss depends on ``λ`` at every size. Steps:
``1/L`` for ``pg`` and ``4/L`` for ``md`` (the entropic step tolerates it), with
``L = λ_max(XXᵀ)/λ``; the block constants ``‖x_i‖²/λ`` for ``bcd``.

Timing: one process, float64, ``--threads`` intra-op threads (default 1); a warm-up call per
configuration, then ``--repeats`` calls with implicit and unrolled interleaved (so load from
other processes hits both alike), median reported. The machine is shared: read the ratios, and
the medians as rough.

Usage::

    python benchmarks/svm_hpo.py            # d = 100 … 5000
    python benchmarks/svm_hpo.py --quick    # d = 100, 500, 1000; 3 repeats (1-2 minutes)
    python benchmarks/svm_hpo.py --smoke    # d = 50, few iterations: the suite's smoke test

Writes ``benchmarks/out/svm_hpo.png`` (time vs d, one panel per solver) and
``benchmarks/out/svm_hpo.json`` (``svm_hpo_quick.*`` with ``--quick``); ``benchmarks/out/`` is
git-ignored.

Columns: ``implicit ms`` and ``unrolled ms`` are whole hypergradients (solve + backward) and
``ratio`` their quotient; ``solve ms`` is the solve alone (no recording, no backward), which both
modes must pay, and ``diff. ratio`` compares what each mode adds to it, the cost of
differentiating: the backward (timed directly) plus the forward's excess over the solve
(``max(forward − solve, 0)``: recording, for unrolling), unrolled over implicit.

What to expect. For ``md`` and ``pg`` one unrolled iteration costs its forward (two products
with ``X``, recorded) plus a backward of about the same cost, while the implicit forward costs
the forward alone and the backward is one linear solve: with equal iteration counts the ratio
is bounded by about ``1 + backward/forward ≈ 2`` in eager PyTorch, however large ``d``. ``bcd``
records one small graph per block, whose backward is much costlier than the in-place
no-grad sweep, so there implicit differentiation gains more (about 4-5x at large ``d``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import implicit_torch.objective as objective
from implicit_torch.projection import projection_simplex, simplex_rows
from implicit_torch.prox import make_prox_from_projection
from implicit_torch.solvers.block_coordinate_descent import BlockCoordinateDescent
from implicit_torch.solvers.mirror_descent import MirrorDescent, projection_grad_kl_simplex
from implicit_torch.solvers.projected_gradient import ProjectedGradient

DT = torch.float64
OUT = Path(__file__).resolve().parent / "out"
SIZES = (100, 250, 500, 1000, 2000, 5000)
QUICK_SIZES = (100, 500, 1000)
SOLVERS = ("md", "pg", "bcd")


def make_data(d: int, n: int, k: int, seed: int = 0):
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=2 * n,
        n_features=d,
        n_informative=10,
        n_redundant=d // 2,
        n_classes=k,
        n_clusters_per_class=1,
        random_state=seed,
    )
    X = torch.tensor(X, dtype=DT)
    X = (X - X.mean(0)) / X.std(0) / d**0.5
    y = torch.tensor(y)
    return X[:n], y[:n], X[n:], y[n:]


def rows_on_simplex(beta, hyperparams=None):
    return simplex_rows(beta)


def make_solver(
    name: str, unroll: bool, X: torch.Tensor, lam: float, iters: dict, value_and_grad: bool = True
):
    common = dict(tol=0.0, on_failure="ignore", unroll=unroll, maxiter=iters[name])
    L = torch.linalg.eigvalsh(X @ X.T).max().item() / lam
    # The objective's closed-form gradient (value_and_grad=True) for MD and PG, in both modes:
    # it saves an autograd pass per iteration (the forward of either mode, ~30% at d = 5000).
    svm = objective.multiclass_linear_svm_dual
    fun = dict(fun=svm.value_and_grad, value_and_grad=True) if value_and_grad else dict(fun=svm)
    if name == "md":
        # BiCGSTAB for the backward: on this non-symmetric fixed-point Jacobian it took 73 ms
        # against GMRES's (the default) 200 ms at d = 1000, same hypergradient to 1e-11.
        return MirrorDescent(
            projection_grad=projection_grad_kl_simplex,
            stepsize=4.0 / L,
            implicit_diff_solve="bicgstab",
            **fun,
            **common,
        )
    if name == "pg":
        return ProjectedGradient(
            projection=rows_on_simplex,
            stepsize=1.0 / L,
            **fun,
            **common,
        )
    return BlockCoordinateDescent(
        fun=objective.multiclass_linear_svm_dual,
        block_prox=make_prox_from_projection(projection_simplex),
        **common,
    )


def solver_inputs(name, X, y, k):
    """One-hot labels ``Y``, the uniform start on the simplices, and the block-prox
    hyperparameter (the simplex's value, for BCD)."""
    Y = F.one_hot(y, k).to(DT)
    init = torch.full((X.shape[0], k), 1.0 / k, dtype=DT)
    return Y, init, 1.0 if name == "bcd" else None


def hypergradient(solver, name, lam0, X, y, Xv, yv, k):
    """One hypergradient ``d L_val / dλ``: the solve and the backward.

    Returns (grad, solver error, forward seconds, backward seconds)."""
    Y, init, hp = solver_inputs(name, X, y, k)
    lam = torch.tensor(lam0, dtype=DT, requires_grad=True)
    t0 = time.perf_counter()
    out = solver.run(init, hp, lam, (X, Y))
    t1 = time.perf_counter()
    W = X.T @ (Y - out.params) / lam
    loss = F.cross_entropy(Xv @ W, yv)
    (grad,) = torch.autograd.grad(loss, lam)
    t2 = time.perf_counter()
    return grad.item(), out.state.error.item(), t1 - t0, t2 - t1


def forward_only(solver, name, lam0, X, y, k):
    """The solve alone, nothing recorded: the work both modes share."""
    Y, init, hp = solver_inputs(name, X, y, k)
    with torch.no_grad():
        solver.run(init, hp, torch.tensor(lam0, dtype=DT), (X, Y))


def timed(fn, *args):
    t = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="d = 100, 500, 1000; 3 repeats")
    parser.add_argument("--smoke", action="store_true", help="d = 50, 60 iterations, 1 repeat")
    parser.add_argument("--out", default=str(OUT), help="folder for the figure and the JSON")
    parser.add_argument("--sizes", type=int, nargs="*", help="numbers of features")
    parser.add_argument("--solvers", nargs="*", default=list(SOLVERS), choices=SOLVERS)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--md-iters", type=int, default=1000)
    parser.add_argument("--pg-iters", type=int, default=1000)
    parser.add_argument("--bcd-iters", type=int, default=100, help="sweeps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--autograd-gradient",
        action="store_true",
        help="MD and PG take the objective's gradient by autograd, not value_and_grad=True",
    )
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args) -> dict:
    sizes = args.sizes or ((50,) if args.smoke else QUICK_SIZES if args.quick else SIZES)
    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 5)
    iters = {"md": args.md_iters, "pg": args.pg_iters, "bcd": args.bcd_iters}
    if args.smoke:
        iters = {"md": 60, "pg": 60, "bcd": 6}
    lam0, k = 2.0, args.classes
    rows = []
    print(
        f"multiclass SVM dual, n_train = n_val = {args.n_train}, k = {k}, λ = {lam0}, float64, "
        f"{args.threads} thread(s); iterations {iters}; median of {repeats} (shared machine: "
        "timings are noisy, ratios are the robust part)"
    )
    header = (
        f"{'solver':>6} {'d':>6} {'implicit ms':>12} {'unrolled ms':>12} {'ratio':>7} "
        f"{'solve ms':>9} {'diff. ratio':>11} {'grad rel diff':>14} {'solver error':>13}"
    )
    print(header)
    for d in tqdm(sizes, desc="numbers of features", unit="size", leave=False):
        X, y, Xv, yv = make_data(d, args.n_train, k)
        for name in args.solvers:
            solvers = {
                u: make_solver(name, u, X, lam0, iters, not args.autograd_gradient)
                for u in (False, True)
            }
            times: dict[bool, list[float]] = {False: [], True: []}
            fwd: dict[bool, list[float]] = {False: [], True: []}
            bwd: dict[bool, list[float]] = {False: [], True: []}
            solve_times: list[float] = []
            results = {}
            for u in (False, True):  # warm-up
                results[u] = hypergradient(solvers[u], name, lam0, X, y, Xv, yv, k)
            for _ in range(repeats):
                for u in (False, True):
                    t, results[u] = timed(hypergradient, solvers[u], name, lam0, X, y, Xv, yv, k)
                    times[u].append(t)
                    fwd[u].append(results[u][2])
                    bwd[u].append(results[u][3])
                solve_times.append(timed(forward_only, solvers[False], name, lam0, X, y, k)[0])
            t_imp, t_unr = statistics.median(times[False]), statistics.median(times[True])
            t_solve = statistics.median(solve_times)

            # Differentiation cost: what a mode adds to the plain solve both share, i.e. the
            # backward (timed directly) plus the forward's excess over the solve (recording,
            # for unrolling; nothing but noise for implicit, hence the clamp at 0).
            diff_s = {
                u: max(statistics.median(fwd[u]) - t_solve, 0.0) + statistics.median(bwd[u])
                for u in (False, True)
            }
            diff_ratio = diff_s[True] / diff_s[False]
            g_imp, g_unr = results[False][0], results[True][0]
            rel = abs(g_imp - g_unr) / max(abs(g_unr), 1e-300)
            row = dict(
                solver=name,
                d=d,
                implicit_s=t_imp,
                unrolled_s=t_unr,
                ratio=t_unr / t_imp,
                solve_s=t_solve,
                diff_implicit_s=diff_s[False],
                diff_unrolled_s=diff_s[True],
                diff_ratio=diff_ratio,
                grad_implicit=g_imp,
                grad_unrolled=g_unr,
                grad_rel_diff=rel,
                solver_error=results[False][1],
                implicit_all_s=times[False],
                unrolled_all_s=times[True],
            )
            rows.append(row)
            print(
                f"{name:>6} {d:>6} {1e3 * t_imp:>12.1f} {1e3 * t_unr:>12.1f} "
                f"{t_unr / t_imp:>6.1f}x {1e3 * t_solve:>9.1f} {diff_ratio:>10.1f}x "
                f"{rel:>14.1e} {row['solver_error']:>13.1e}",
                flush=True,
            )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(n_train=args.n_train, classes=k, l2reg=lam0, iters=iters, threads=args.threads)
    stem = "svm_hpo_smoke" if args.smoke else "svm_hpo_quick" if args.quick else "svm_hpo"
    (out / f"{stem}.json").write_text(json.dumps(dict(config=meta, rows=rows), indent=1))
    print(f"wrote {out / stem}.json")
    figure = None
    if not args.no_plot:
        figure = out / f"{stem}.png"
        plot(rows, args.solvers, figure)
        print(f"wrote {figure}")
    return {"rows": rows, "figure": None if figure is None else str(figure)}


def plot(rows, solvers, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "md": "Mirror descent\n(MD fixed point)",
        "pg": "Projected gradient\n(PG fixed point)",
        "bcd": "Block coordinate descent\n(PG fixed point)",
    }
    fig, axes = plt.subplots(1, len(solvers), figsize=(4.2 * len(solvers), 3.6), squeeze=False)
    for ax, name in zip(axes[0], solvers):
        sel = [r for r in rows if r["solver"] == name]
        ds = [r["d"] for r in sel]
        ax.plot(ds, [r["unrolled_s"] for r in sel], "o-", label="unrolling")
        ax.plot(ds, [r["implicit_s"] for r in sel], "s-", label="implicit diff")
        ax.plot(ds, [r["solve_s"] for r in sel], ":", color="gray", label="solve alone")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of features")
        ax.set_title(titles[name], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time of one hypergradient (s)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
