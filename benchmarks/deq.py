"""DEQ layer, forward + backward: implicit gradient vs backprop through the same iterations.

A deep-equilibrium layer ``z* = f(z*, x)`` with ``f(z, x) = tanh(W z + U x + b)``, ``‖W‖₂ =
0.9`` (a contraction, slow enough to need many iterations), a batch of inputs, loss
``Σ (head · z*)²``. Both methods run the same forward, ``K`` plain fixed-point iterations
(``K`` chosen so that ``‖f(z) − z‖`` is about 1e-6 relative), so their accuracy is equal by
construction; they differ in the backward:

* ``implicit``: :class:`implicit_torch.nn.DEQ` (``forward_solver="fixed_point"``), gradient
  by the implicit fixed-point system ``(I − ∂f/∂z)ᵀ u = v``, solved by GMRES
  (``adjoint=ImplicitAdjoint("gmres")``);
* ``neumann``: the same with the Neumann-series solver (``ImplicitAdjoint("neumann")``);
* ``unrolled``: autograd through the ``K`` iterations;
* ``torchdeq``: torchdeq 0.1.0's DEQ with implicit differentiation (``ift=True``), the same
  ``K`` forward iterations and its fixed-point-iteration backward solver, when torchdeq is
  importable (``benchmarks/requirements-peers.txt`` installs it in a separate environment:
  ``PYTHONPATH=. /tmp/peers-venv/bin/python benchmarks/deq.py``).

Then warm starts: 20 SGD steps on one batch, each forward started from the previous solution
and each backward solve from the previous adjoint (``DEQ(warm_start=True)``), against cold
starts; mean iterations per step after the first, for three backward solvers. Both runs give
the DEQ ``ImplicitAdjoint(WarmStart(solve))``, whose ``iterations`` list records every
backward solve; the cold run resets it (``deq.reset_warm_start()``) before each step.

Reported per model size: median time of forward + backward (``torch.utils.benchmark``, after
a warm-up), the peak bytes autograd keeps for the backward (saved tensors, parameters and
inputs excluded; benchmarks/_memory.py), the ratios unrolled / implicit, and each gradient's
relative error against a tightly converged implicit gradient.

    python benchmarks/deq.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import warnings

import torch
from _memory import SavedBytes
from torch import nn
from torch.utils import benchmark

from implicit_torch import WarmStart
from implicit_torch.adjoint import ImplicitAdjoint
from implicit_torch.nn import DEQ

SIZES = [(64, 256), (256, 1024)]  # (batch, width)


class Cell(nn.Module):
    def __init__(self, d: int, contraction: float = 0.9):
        super().__init__()
        self.W = nn.Linear(d, d, bias=False)
        self.U = nn.Linear(d, d)
        with torch.no_grad():
            self.W.weight.mul_(contraction / torch.linalg.matrix_norm(self.W.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


def iterations_needed(f, x, rtol=1e-6, cap=2000):
    """Fixed-point iterations from zero until ‖f(z) − z‖ ≤ rtol ‖z‖."""
    with torch.no_grad():
        z = torch.zeros_like(x)
        for k in range(1, cap + 1):
            z_new = f(z, x)
            if torch.linalg.vector_norm(z_new - z) <= rtol * torch.linalg.vector_norm(z_new):
                return k
            z = z_new
    return cap


def make_losses(f, head, x, K):
    params = [*f.parameters(), *head.parameters()]

    def layer_grad(solve, maxiter, tol):
        deq = DEQ(
            f,
            forward_solver="fixed_point",
            maxiter=maxiter,
            tol=tol,
            adjoint=ImplicitAdjoint(solve),
            on_failure="ignore",
        )

        return lambda: head(deq(x)).square().sum()

    def unrolled():
        z = torch.zeros_like(x)
        for _ in range(K):
            z = f(z, x)
        return head(z).square().sum()

    losses = {
        "implicit": layer_grad("gmres", K, 0.0),
        "neumann": layer_grad("neumann", K, 0.0),
        "unrolled": unrolled,
    }
    try:
        from torchdeq import get_deq
    except ImportError:
        print("(torchdeq is not installed: not compared)")
    else:
        peer = get_deq(
            ift=True,
            f_solver="fixed_point_iter",
            b_solver="fixed_point_iter",
            f_max_iter=K,
            f_tol=0.0,
            b_max_iter=10 * K,
            b_tol=1e-6,
        )

        def torchdeq_loss():
            z_out, _ = peer(lambda z: f(z, x), torch.zeros_like(x))
            return head(z_out[-1]).square().sum()

        losses["torchdeq"] = torchdeq_loss
    reference = layer_grad("gmres", 50 * K, 1e-9)
    return losses, reference, params


def rel_error(grads, ref):
    num = sum(float(torch.linalg.vector_norm(g - r)) ** 2 for g, r in zip(grads, ref))
    den = sum(float(torch.linalg.vector_norm(r)) ** 2 for r in ref)
    return (num / den) ** 0.5


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small size only, short timing")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    sizes = SIZES[:1] if args.quick else SIZES
    min_time = 0.2 if args.quick else 1.0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    header = (
        f"{'batch':>5} {'width':>5} {'K':>4} | {'method':>8} {'ms':>9} {'saved MB':>9} "
        f"{'grad rel err':>12} | {'time ×':>6} {'memory ×':>8}"
    )
    print(header)
    print("-" * len(header))
    for batch, width in sizes:
        f, head = Cell(width), nn.Linear(width, 1)
        x = torch.randn(batch, width)
        K = iterations_needed(f, x)
        losses, reference, params = make_losses(f, head, x, K)
        ref = torch.autograd.grad(reference(), params)
        exclude = {t.untyped_storage().data_ptr() for t in [*params, x]}
        rows = {}
        for name, loss_fn in losses.items():
            err = rel_error(torch.autograd.grad(loss_fn(), params), ref)
            # Saved tensors accumulate during the forward: its end is the peak. (The hooks
            # cannot stay on for the backward, where torch.func refuses them.)
            meter = SavedBytes(exclude)
            with meter:
                loss = loss_fn()
            del loss
            gc.collect()

            def run(loss_fn=loss_fn, params=params):
                return torch.autograd.grad(loss_fn(), params)

            timer = benchmark.Timer("run()", globals={"run": run})
            ms = timer.blocked_autorange(min_run_time=min_time).median * 1e3
            rows[name] = (ms, meter.peak / 2**20, err)
        base_ms, base_mb, _ = rows["unrolled"]
        for name, (ms, mb, err) in rows.items():
            print(
                f"{batch:>5} {width:>5} {K:>4} | {name:>8} {ms:>9.1f} {mb:>9.2f} {err:>12.1e} | "
                f"{base_ms / ms:>6.2f} {base_mb / max(mb, 1e-9):>8.1f}",
                flush=True,
            )
    print("time × and memory ×: unrolled / method (> 1: the method is faster / smaller)")
    warm_start_savings()


def warm_start_savings(width=64, batch=32, steps=20, lr=1e-3):
    print(f"\nwarm starts: width {width}, batch {batch}, {steps} SGD steps (lr {lr}), float64")
    print(f"{'backward':>9} | {'fwd cold':>8} {'fwd warm':>8} | {'bwd cold':>8} {'bwd warm':>8}")
    for solve in ("gmres", "bicgstab", "neumann"):
        row = {}
        for warm in (False, True):
            torch.manual_seed(0)
            f = Cell(width).double()
            x = torch.randn(batch, width, dtype=torch.float64)
            adjoint = ImplicitAdjoint(WarmStart(solve))  # records each backward's iterations
            deq = DEQ(f, tol=1e-8, maxiter=500, adjoint=adjoint, warm_start=warm)
            opt = torch.optim.SGD(f.parameters(), lr=lr)
            fwd = []
            for _ in range(steps):
                if not warm:
                    deq.reset_warm_start()  # the backward's WarmStart forgets: a cold solve
                loss = deq(x).square().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                fwd.append(int(deq.last_state.iter_num))
            bwd = deq.adjoint.solve.iterations
            row[warm] = (sum(fwd[1:]) / (steps - 1), sum(bwd[1:]) / (steps - 1))
        print(
            f"{solve:>9} | {row[False][0]:>8.1f} {row[True][0]:>8.1f} | "
            f"{row[False][1]:>8.1f} {row[True][1]:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
