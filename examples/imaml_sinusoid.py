"""iMAML on sinusoid regression: meta-learning with implicit meta-gradients.

What this example shows
-----------------------
Few-shot regression: each task is a sine wave ``y = A sin(x − φ)`` with its own amplitude and
phase, seen through K = 10 samples. The model is ``head(body(x))``: a ReLU network ``body``
(1 → 40 → 40 features) shared by all tasks, and a linear ``head`` adapted to each task.

iMAML (Rajeswaran et al., 2019) adapts the head's meta-initialisation ``θ`` by solving, per
task ``i``, the proximally regularised problem

    φᵢ*(θ, ψ) = argmin_φ  Lᵢ^support(φ; ψ) + (reg/2) ‖φ − θ‖²        (ψ: the body's weights)

by gradient descent, and trains ``θ`` and ``ψ`` on the query loss ``Σᵢ Lᵢ^query(φᵢ*; ψ)``.
The meta-gradient goes through ``φᵢ*`` by the implicit function theorem applied to the
stationarity condition ``∇Lᵢ(φᵢ*) + reg (φᵢ* − θ) = 0``:

    dφᵢ*/dθ = reg (∇²Lᵢ(φᵢ*) + reg I)⁻¹,   dφᵢ*/dψ = −(∇²Lᵢ + reg I)⁻¹ ∂²Lᵢ/∂φ∂ψ,

a conjugate-gradient solve with Hessian-vector products per task instead of backprop through
the inner loop. :func:`implicit_torch.meta.imaml_adapt` does all tasks at once.

Why adapt the head only: with a squared loss the inner problem in the head is a strongly
convex quadratic, so ``φᵢ*`` is unique and ``∇²Lᵢ + reg I`` is positive definite, as CG and
the implicit function theorem need. Adapting every weight of a ReLU network makes the inner
problem non-convex (the network is bilinear in consecutive layers' weights), and its
``∇²Lᵢ + reg I`` indefinite at the points a short inner loop reaches unless ``reg`` is large
(measured: eigenvalues down to −35 at initialisation for these waves), which would swamp the
adaptation.

Steps
-----
1. A check, in float64: the implicit meta-gradient (in ``θ`` and in the body ``ψ``) against
   autograd through the closed-form solution of the inner problem.
2. Meta-training: Adam on ``θ`` and ``ψ`` over meta-batches of tasks (tqdm progress).
3. Evaluation on 100 new tasks: query MSE after adaptation with the meta-learned model,
   without adaptation, and adapting a random model; a figure of a few adapted fits.

What to expect: the meta-gradient check agrees to ~1e-10; after 400 meta-steps the adapted
meta-learned model reaches a query MSE of about 0.26 on new waves, against about 3.1 without
adaptation and 4.3 adapting a random model (about 45 s on two CPU cores).

Run ``python examples/imaml_sinusoid.py`` (``--meta-steps N``, ``--out DIR``, ``--smoke``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from tqdm import tqdm

from implicit_torch.meta import imaml_adapt

K_SHOT = 10
REG = 1.0
WIDTH = 40


def body(dtype=torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(1, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU()).to(
        dtype
    )


def init_head(dtype=torch.float32, gen=None) -> dict:
    w = torch.randn(WIDTH, generator=gen, dtype=dtype) / WIDTH**0.5
    return {"w": w, "b": torch.zeros((), dtype=dtype)}


def sample_tasks(n_tasks: int, n_points: int, gen: torch.Generator, dtype=torch.float32):
    """Inputs (T, n, 1) uniform on [−5, 5] and targets A sin(x − φ), A ∈ [0.1, 5], φ ∈ [0, π]."""
    amp = 0.1 + 4.9 * torch.rand(n_tasks, 1, 1, generator=gen, dtype=dtype)
    phase = math.pi * torch.rand(n_tasks, 1, 1, generator=gen, dtype=dtype)
    x = -5 + 10 * torch.rand(n_tasks, n_points, 1, generator=gen, dtype=dtype)
    return x, (amp * torch.sin(x - phase))[..., 0], (amp, phase)


def make_loss(net: nn.Module):
    """Squared error of ``head(body(x))`` for one task; ``psi`` are the body's weights."""

    def predict(head, x, psi):
        return torch.func.functional_call(net, psi, (x,)) @ head["w"] + head["b"]

    def loss(head, x, y, psi):
        return (predict(head, x, psi) - y).square().mean()

    return loss, predict


def adapt(net, theta, psi, x, y):
    """φ* for every task, differentiable in θ and ψ (the heads are solved in closed form:
    any forward solver will do, the gradient comes from the stationarity condition)."""

    def solve_heads(theta, psi, x, y):
        return closed_form_heads(net, theta, psi, x, y)

    return imaml_adapt(
        make_loss(net)[0], theta, x, y, reg=REG, inner_lr=0.0, shared=psi, inner_solver=solve_heads
    )


def query_loss(net, phi, psi, x, y):
    loss = make_loss(net)[0]
    return torch.func.vmap(loss, in_dims=(0, 0, 0, None))(phi, x, y, psi).mean()


def closed_form_heads(net, theta, psi, x, y):
    """argmin_φ mean((F w + b − y)²) + reg/2 ‖φ − θ‖² per task, by a linear solve."""
    feats = torch.func.functional_call(net, psi, (x,))  # (T, K, WIDTH)
    Z = torch.cat([feats, torch.ones_like(feats[..., :1])], -1)
    K = x.shape[1]
    eye = torch.eye(Z.shape[-1], dtype=Z.dtype)
    A = 2 * Z.mT @ Z / K + REG * eye
    th = torch.cat([theta["w"], theta["b"].reshape(1)])
    rhs = 2 * (Z.mT @ y.unsqueeze(-1)).squeeze(-1) / K + REG * th
    sol = torch.linalg.solve(A, rhs)
    return {"w": sol[:, :-1], "b": sol[:, -1]}


def check_meta_gradient(gen: torch.Generator) -> float:
    """Implicit meta-gradient vs autograd through the closed-form inner solution (float64):
    the same forward, two independent derivatives."""
    net = body(torch.float64)
    psi = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
    theta = {k: v.requires_grad_() for k, v in init_head(torch.float64, gen).items()}
    xs, ys, _ = sample_tasks(4, K_SHOT, gen, torch.float64)
    xq, yq, _ = sample_tasks(4, K_SHOT, gen, torch.float64)
    leaves = [*theta.values(), *psi.values()]
    phi = adapt(net, theta, psi, xs, ys)
    implicit = torch.autograd.grad(query_loss(net, phi, psi, xq, yq), leaves)
    phi_ref = closed_form_heads(net, theta, psi, xs, ys)
    reference = torch.autograd.grad(query_loss(net, phi_ref, psi, xq, yq), leaves)
    num = sum(float((a - b).square().sum()) for a, b in zip(implicit, reference))
    return (num / sum(float(b.square().sum()) for b in reference)) ** 0.5


def meta_train(net, theta, meta_steps: int, meta_batch: int, gen, lr: float = 3e-3):
    psi = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    theta = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    opt = torch.optim.Adam([*theta.values(), *psi.values()], lr=lr)
    history = []
    bar = tqdm(range(meta_steps), desc="meta-steps", unit="step")
    for _ in bar:
        x, y, _ = sample_tasks(meta_batch, 2 * K_SHOT, gen)
        (xs, xq), (ys, yq) = x.split(K_SHOT, 1), y.split(K_SHOT, 1)
        loss = query_loss(net, adapt(net, theta, psi, xs, ys), psi, xq, yq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        bar.set_postfix(query_mse=f"{sum(history[-20:]) / len(history[-20:]):.3f}")
    return theta, psi, history


def evaluate(net, theta, psi, gen, n_tasks=100):
    x, y, _ = sample_tasks(n_tasks, 2 * K_SHOT, gen)
    (xs, xq), (ys, yq) = x.split(K_SHOT, 1), y.split(K_SHOT, 1)
    with torch.no_grad():
        phi = adapt(net, theta, psi, xs, ys)
        same = {k: v.expand(n_tasks, *v.shape) for k, v in theta.items()}
        return float(query_loss(net, phi, psi, xq, yq)), float(query_loss(net, same, psi, xq, yq))


def plot(net, models, history, gen, path: Path):
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    window = max(1, len(history) // 20)
    smooth = [
        sum(history[max(0, i - window) : i + 1]) / len(history[max(0, i - window) : i + 1])
        for i in range(len(history))
    ]
    axes[0].plot(smooth)
    axes[0].set(title="meta-training query MSE", xlabel="meta-step", yscale="log")
    xs, ys, (amp, phase) = sample_tasks(3, K_SHOT, gen)
    grid = torch.linspace(-5, 5, 200).reshape(1, -1, 1).expand(3, -1, -1)
    predict = make_loss(net)[1]
    with torch.no_grad():
        preds = {}
        for name, (theta, psi) in models.items():
            phi = adapt(net, theta, psi, xs, ys)
            preds[name] = torch.func.vmap(predict, in_dims=(0, 0, None))(phi, grid, psi)
    for i, ax in enumerate(axes[1:]):
        truth = (amp[i] * torch.sin(grid[i] - phase[i]))[:, 0]
        ax.plot(grid[i, :, 0], truth, "k-", lw=1, label="true")
        ax.plot(xs[i, :, 0], ys[i], "ko", ms=4, label=f"{K_SHOT} shots")
        for name, pred in preds.items():
            ax.plot(grid[i, :, 0], pred[i], label=f"adapted, {name}")
        ax.set(title=f"new task {i + 1}", xlabel="x")
    axes[1].legend(fontsize=7)
    fig.suptitle(
        "iMAML on sinusoids: heads adapted by a proximal inner problem, implicit meta-gradients"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meta-steps", type=int, default=400)
    parser.add_argument("--meta-batch", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    parser.add_argument("--smoke", action="store_true", help="a few meta-steps")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    err = check_meta_gradient(gen)
    print(f"implicit meta-gradient vs closed form (float64): relative difference {err:.1e}")
    meta_steps = 5 if args.smoke else args.meta_steps
    net = body()
    theta0 = init_head(gen=gen)
    random_model = (theta0, {k: v.detach().clone() for k, v in net.named_parameters()})
    theta, psi, history = meta_train(net, theta0, meta_steps, args.meta_batch, gen)
    adapted, unadapted = evaluate(net, theta, psi, torch.Generator().manual_seed(1))
    random_adapted, _ = evaluate(net, *random_model, torch.Generator().manual_seed(1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "imaml_sinusoid.png"
    models = {"meta-learned": (theta, psi), "random model": random_model}
    plot(net, models, history, torch.Generator().manual_seed(2), path)
    print(
        f"query MSE on 100 new tasks: meta-learned model adapted {adapted:.3f}, not adapted "
        f"{unadapted:.3f}; random model adapted {random_adapted:.3f}; figure: {path}"
    )
    return {
        "grad_check": err,
        "mse_adapted": adapted,
        "mse_random_adapted": random_adapted,
        "mse_unadapted": unadapted,
        "figure": str(path),
    }


if __name__ == "__main__":
    main()
