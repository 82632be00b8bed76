"""Backward pass of a batched problem: matrix-free CG vs formed blocks (fused CG / Cholesky).

B independent ridge regressions (m = 2d samples, d features each), solved in closed form in
the forward pass and differentiated with ``custom_root(..., batched=True)``. The backward pass
solves B symmetric d × d systems. Compared, in one process:

* ``cg``: the engine's matrix-free batched CG, one vjp of the optimality condition per
  iteration;
* ``auto``: ``solve="auto"``, which forms the d × d blocks (d vmapped vjps) and solves them
  with :func:`implicit_torch.linear.solve_formed` (fused batched CG for d ≥ 32 where
  the compiled kernel runs, Cholesky below);
* ``cholesky``: formed blocks and a batched Cholesky;
* ``unrolled``: no implicit differentiation, autograd through ``torch.linalg.solve`` (a
  reference point, not a peer: it needs the closed form).

It answers one question for the engine: when do formed blocks (and so the fused kernel) pay
off against matrix-free CG? Each entry times the gradient computation only (the forward is
outside the timer), median of repeated runs after a warm-up; ratios are ``auto`` / ``cg``.
Gradients of every method are checked against the unrolled one first.

    python benchmarks/batched_backward.py [--threads 2] [--markdown]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

import implicit_torch as it
from implicit_torch import ops

SIZES = [(4096, 8), (1024, 16), (1024, 32), (256, 64)]
M_SAMPLES = 2  # samples per feature: m = 2 d


def ridge_F(w, lam, X, y):
    r = torch.einsum("bmd,bd->bm", X, w) - y
    return torch.einsum("bmd,bm->bd", X, r) + lam * w


def ridge_closed(lam, X, y):
    H = X.transpose(1, 2) @ X + torch.diag_embed(lam)
    return torch.linalg.solve(H, torch.einsum("bmd,bm->bd", X, y))


def make_grad_fn(solve, dtype, B, d):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(B, M_SAMPLES * d, d, generator=g, dtype=dtype)
    y = torch.randn(B, M_SAMPLES * d, generator=g, dtype=dtype)
    lam = torch.full((B, d), 1.0, dtype=dtype, requires_grad=True)
    weights = torch.randn(B, d, generator=g, dtype=dtype)
    if solve == "unrolled":
        w = ridge_closed(lam, X, y)
    else:
        solver = it.custom_root(ridge_F, solve=solve, batched=True)(
            lambda init, lam, X, y: ridge_closed(lam.detach(), X, y)
        )
        w = solver(None, lam, X, y)
    loss = (weights * w).sum()

    def run():
        return torch.autograd.grad(loss, lam, retain_graph=True)[0]

    return run


METHODS = ["cg", "auto", "cholesky", "unrolled"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled fused kernel: "
        f"{ops.extension_available('cpu')}"
    )
    names = METHODS
    sep = " | " if args.markdown else "  "
    header = ["dtype", "B", "d"] + [f"{n} ms" for n in names] + ["auto/cg"]
    print(("| " if args.markdown else "") + sep.join(header) + (" |" if args.markdown else ""))
    if args.markdown:
        print("|" + "---:|" * len(header))
    for dtype in (torch.float32, torch.float64):
        for B, d in SIZES:
            fns = {name: make_grad_fn(name, dtype, B, d) for name in METHODS}
            ref = fns["unrolled"]()
            tol = 1e-3 if dtype == torch.float32 else 1e-7
            times = {}
            for name, fn in fns.items():
                err = float((fn() - ref).norm() / ref.norm())
                if err > tol:
                    raise AssertionError(f"{name} B={B} d={d} {dtype}: gradient error {err:.1e}")
                timer = benchmark.Timer("fn()", globals={"fn": fn})
                times[name] = timer.blocked_autorange(min_run_time=args.min_time).median * 1e3
            ratio = times["auto"] / times["cg"]
            row = [str(dtype).removeprefix("torch."), str(B), str(d)]
            row += [f"{times[n]:.2f}" for n in names] + [f"{ratio:.1f}x"]
            line = sep.join(row)
            print(f"| {line} |" if args.markdown else line, flush=True)


if __name__ == "__main__":
    main()
