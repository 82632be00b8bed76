"""Per-call cost of the engine on small problems: ``custom_root`` vs a hand-written implicit
gradient.

Problem: ridge regression ``w* = argmin ½‖Xw − y‖² + ½ λ‖w‖²`` with ``n`` features and
``m = 2n`` samples (float64), forward by ``torch.linalg.solve`` so that only the
differentiation is compared; the hypergradient of the validation loss ``‖X_v w* − y_v‖²`` in
``λ`` is computed by

* ``hand``: the implicit gradient written out, ``dλ = −wᵀ (XᵀX + λI)⁻¹ ∇_w L`` by a dense solve;
* ``custom_root[solve]``: ``@custom_root(stationarity)`` around the same forward, backward by
  the engine with ``solve`` in {cg, cholesky, auto}.

Timing: ``torch.utils.benchmark.Timer.blocked_autorange`` per configuration (median), after a
warm-up; every configuration runs in one process, so the ratios compare like with like.
``--json PATH`` writes the medians, so that two checkouts can be compared
(``PYTHONPATH=<checkout> python benchmarks/engine_overhead.py``).

Usage: ``python benchmarks/engine_overhead.py [--sizes 20 100] [--threads 1] [--device cuda]``
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.utils.benchmark as tb

import implicit_torch as it

DT = torch.float64


def make_problem(n: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    m = 2 * n
    X = torch.randn(m, n, generator=g, dtype=DT) / m**0.5
    y = torch.randn(m, generator=g, dtype=DT)
    Xv = torch.randn(m, n, generator=g, dtype=DT) / m**0.5
    yv = torch.randn(m, generator=g, dtype=DT)
    return tuple(t.to(device) for t in (X, y, Xv, yv))


def hand_written(X, y, Xv, yv):
    """The implicit gradient written out by hand (what a user would write without a library)."""
    lam = torch.tensor(1.0, dtype=DT, device=X.device, requires_grad=True)

    def step():
        H = X.T @ X + lam.detach() * torch.eye(X.shape[1], dtype=DT, device=X.device)
        w = torch.linalg.solve(H, X.T @ y)
        w_ = w.detach().requires_grad_()
        loss = ((Xv @ w_ - yv) ** 2).sum()
        (gw,) = torch.autograd.grad(loss, w_)
        u = torch.linalg.solve(H, gw)
        return -(u @ w)  # dL/dλ = −∇_wLᵀ H⁻¹ w

    return step


def with_engine(X, y, Xv, yv, solve: str):
    def optimality(w, lam, X, y):
        return X.T @ (X @ w - y) + lam * w

    @it.custom_root(optimality, solve=solve)
    def ridge(init, lam, X, y):
        H = X.T @ X + lam * torch.eye(X.shape[1], dtype=DT, device=X.device)
        return torch.linalg.solve(H, X.T @ y)

    lam = torch.tensor(1.0, dtype=DT, device=X.device, requires_grad=True)

    def step():
        w = ridge(None, lam, X, y)
        loss = ((Xv @ w - yv) ** 2).sum()
        (g,) = torch.autograd.grad(loss, lam)
        return g

    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[20, 100])
    ap.add_argument("--solves", nargs="*", default=["cg", "cholesky", "auto"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--json", help="write the medians (ms) here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dry-run", action="store_true", help="parse the arguments and stop")
    args = ap.parse_args(argv)
    if args.dry_run:
        return {}
    torch.set_num_threads(args.threads)
    results: dict = {}
    print(
        f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), float64; "
        "medians in ms"
    )
    print(f"{'n':>5} {'method':>22} {'ms':>9} {'/ hand':>8}")
    for n in args.sizes:
        data = make_problem(n, device=args.device)
        steps = {"hand": hand_written(*data)}
        steps.update({f"custom_root[{s}]": with_engine(*data, s) for s in args.solves})
        ref = steps["hand"]()
        for fn in steps.values():
            torch.testing.assert_close(fn(), ref, rtol=1e-6, atol=1e-10)  # same hypergradient
        for name, fn in steps.items():
            t = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=args.min_time)
            results[f"{n}/{name}"] = t.median * 1e3
        for name in steps:
            ms = results[f"{n}/{name}"]
            print(f"{n:>5} {name:>22} {ms:9.3f} {ms / results[f'{n}/hand']:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
