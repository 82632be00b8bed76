"""implicit_torch.loss and implicit_torch.objective against torch's own losses, closed forms and
independent reference computations (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import implicit_torch.loss as loss
import implicit_torch.objective as objective

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def classification(seed=0, n=12, d=5, k=4):
    g = gen(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, k, (n,), generator=g)
    return X, y


# --- losses ----------------------------------------------------------------------------------


def test_binary_logistic_loss_vs_bce_with_logits_and_gradient():
    logit = torch.tensor([-800.0, -3.0, -0.2, 0.0, 0.7, 5.0, 800.0], dtype=DT)
    label = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=DT)
    x = logit.clone().requires_grad_()
    out = loss.binary_logistic_loss(label, x)
    ref = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    assert torch.isfinite(out).all()
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, torch.sigmoid(logit) - label, rtol=1e-13, atol=1e-13)
    # integer labels broadcast like float ones
    torch.testing.assert_close(loss.binary_logistic_loss(label.long(), logit), ref)


def test_multiclass_logistic_loss_vs_cross_entropy_batched():
    g = gen(1)
    logits = torch.randn(3, 7, 5, generator=g, dtype=DT) * 4
    label = torch.randint(0, 5, (3, 7), generator=g)
    out = loss.multiclass_logistic_loss(label, logits)
    assert out.shape == (3, 7)
    ref = F.cross_entropy(logits.reshape(-1, 5), label.reshape(-1), reduction="none")
    torch.testing.assert_close(out.reshape(-1), ref, rtol=1e-13, atol=1e-13)
    # one sample, JAXopt's signature: label a Python int, logits (k,)
    torch.testing.assert_close(
        loss.multiclass_logistic_loss(2, logits[0, 0]),
        torch.logsumexp(logits[0, 0], 0) - logits[0, 0, 2],
    )


@pytest.mark.parametrize("delta", [0.5, 1.0, 2.0])
def test_huber_loss_vs_torch_and_derivative(delta):
    target = torch.linspace(-3, 3, 13, dtype=DT)
    pred = torch.zeros(13, dtype=DT).requires_grad_()
    out = loss.huber_loss(target, pred, delta)
    ref = F.huber_loss(pred.detach(), target, reduction="none", delta=delta)
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    (g,) = torch.autograd.grad(out.sum(), pred)
    torch.testing.assert_close(g, torch.clamp(pred.detach() - target, -delta, delta))


def test_squared_loss():
    t = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    p = torch.tensor([0.0, 1.0, 0.5], dtype=DT)
    torch.testing.assert_close(loss.squared_loss(t, p), torch.tensor([0.5, 4.5, 0.0], dtype=DT))


def _sparsemax_reference(s):
    """Sparsemax by bisection on the threshold τ: Σ max(s − τ, 0) = 1 (numpy, independent)."""
    s = np.asarray(s, dtype=np.float64)
    lo, hi = s.max() - 1.0, s.max()
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        if np.maximum(s - tau, 0).sum() > 1:
            lo = tau
        else:
            hi = tau
    return np.maximum(s - 0.5 * (lo + hi), 0)


def test_multiclass_sparsemax_loss_vs_reference_and_gradient():
    g = gen(2)
    scores = torch.randn(6, 5, generator=g, dtype=DT) * 1.5
    label = torch.randint(0, 5, (6,), generator=g)
    s = scores.clone().requires_grad_()
    out = loss.multiclass_sparsemax_loss(label, s)
    P = np.stack([_sparsemax_reference(row) for row in scores.numpy()])
    Sn = scores.numpy()
    # Ω*(s) − s_y with Ω(p) = ½(‖p‖² − 1) on the simplex
    ref = (P * Sn).sum(1) - 0.5 * (P * P).sum(1) + 0.5 - Sn[np.arange(6), label.numpy()]
    torch.testing.assert_close(out, torch.tensor(ref), rtol=1e-12, atol=1e-12)
    assert (out >= -1e-14).all()
    (grad,) = torch.autograd.grad(out.sum(), s)
    expected = torch.tensor(P) - F.one_hot(label, 5).to(DT)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss.sparsemax(scores), torch.tensor(P), rtol=1e-12, atol=1e-12)


def test_multiclass_sparsemax_loss_zero_with_margin_one():
    scores = torch.tensor([[3.0, 1.9, 2.0, -1.0]], dtype=DT)
    out = loss.multiclass_sparsemax_loss(torch.tensor([0]), scores)
    torch.testing.assert_close(out, torch.zeros(1, dtype=DT))
    assert loss.multiclass_sparsemax_loss(torch.tensor([1]), scores).item() > 0


def test_fenchel_young_logsumexp_is_logistic_loss():
    fy = loss.make_fenchel_young_loss(lambda s: torch.logsumexp(s, -1))
    g = gen(3)
    scores = torch.randn(8, 4, generator=g, dtype=DT).requires_grad_()
    label = torch.randint(0, 4, (8,), generator=g)
    Y = F.one_hot(label, 4)
    out = fy(Y, scores)
    torch.testing.assert_close(out, loss.multiclass_logistic_loss(label, scores))
    (grad,) = torch.autograd.grad(out.sum(), scores)
    torch.testing.assert_close(grad, torch.softmax(scores.detach(), -1) - Y.to(DT))


def test_multiclass_hinge_loss_vs_loop():
    g = gen(4)
    scores = torch.randn(9, 4, generator=g, dtype=DT)
    label = torch.randint(0, 4, (9,), generator=g)
    out = loss.multiclass_hinge_loss(label, scores)
    for i in range(9):
        y = int(label[i])
        ref = max(float(scores[i, j]) + (j != y) for j in range(4)) - float(scores[i, y])
        assert abs(float(out[i]) - ref) < 1e-13


# --- objectives ------------------------------------------------------------------------------


def test_least_squares_and_ridge_regression():
    g = gen(5)
    X = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randn(10, generator=g, dtype=DT)
    W = torch.randn(3, generator=g, dtype=DT)
    torch.testing.assert_close(objective.least_squares(W, (X, y)), 0.5 * ((X @ W - y) ** 2).mean())
    torch.testing.assert_close(
        objective.ridge_regression(W, 0.3, (X, y)),
        0.5 * ((X @ W - y) ** 2).mean() + 0.15 * (W * W).sum(),
    )
    # multi-output: the mean runs over all n·k residuals
    Y = torch.randn(10, 2, generator=g, dtype=DT)
    W2 = torch.randn(3, 2, generator=g, dtype=DT)
    torch.testing.assert_close(
        objective.least_squares(W2, (X, Y)), 0.5 * ((X @ W2 - Y) ** 2).sum() / 20
    )


def test_logistic_regression_objectives_vs_torch():
    X, y = classification()
    g = gen(6)
    W = torch.randn(5, 4, generator=g, dtype=DT)
    b = torch.randn(4, generator=g, dtype=DT)
    torch.testing.assert_close(
        objective.multiclass_logistic_regression(W, (X, y)), F.cross_entropy(X @ W, y)
    )
    torch.testing.assert_close(
        objective.multiclass_logistic_regression_with_intercept((W, b), (X, y)),
        F.cross_entropy(X @ W + b, y),
    )
    torch.testing.assert_close(
        objective.l2_multiclass_logistic_regression(W, 0.7, (X, y)),
        F.cross_entropy(X @ W, y) + 0.35 * (W * W).sum(),
    )
    torch.testing.assert_close(
        objective.l2_multiclass_logistic_regression_with_intercept((W, b), 0.7, (X, y)),
        F.cross_entropy(X @ W + b, y) + 0.35 * (W * W).sum(),
    )
    yb = (y % 2).to(DT)
    w = W[:, 0]
    torch.testing.assert_close(
        objective.binary_logistic_regression(w, (X, yb)),
        F.binary_cross_entropy_with_logits(X @ w, yb),
    )


def test_multiclass_linear_svm_dual_value():
    X, y = classification(7, n=8, d=3, k=3)
    Y = F.one_hot(y, 3).to(DT)
    beta = torch.softmax(torch.randn(8, 3, generator=gen(8), dtype=DT), -1)
    lam = 0.4
    V = X.T @ (Y - beta)
    ref = 0.5 / lam * (V * V).sum() + (beta * Y).sum()
    torch.testing.assert_close(objective.multiclass_linear_svm_dual(beta, lam, (X, Y)), ref)


_COMPOSITE = [
    ("least_squares", lambda X, y: (torch.randn(5, dtype=DT), (X, y.to(DT))), ()),
    ("binary_logistic_regression", lambda X, y: (torch.randn(5, dtype=DT), (X, y % 2)), ()),
    ("multiclass_logistic_regression", lambda X, y: (torch.randn(5, 4, dtype=DT), (X, y)), ()),
    (
        "multiclass_linear_svm_dual",
        lambda X, y: (
            torch.softmax(torch.randn(12, 4, dtype=DT), -1),
            (X, F.one_hot(y, 4).to(DT)),
        ),
        (0.6,),
    ),
]


@pytest.mark.parametrize("name,make,hps", _COMPOSITE, ids=[c[0] for c in _COMPOSITE])
def test_composite_linear_structure(name, make, hps):
    """value = subfun(A W + c) + ⟨b, W⟩; the closed-form ∇subfun equals autograd's; the block
    gradient Aᵀ∇subfun + b equals ∇f; each block Hessian is bounded by its Lipschitz constant."""
    fun = getattr(objective, name)
    X, y = classification(9)
    W, data = make(X, y)
    args = (*hps, data)
    A = fun.linear_op(*args)
    z = fun.predictions(W, *args)
    c = fun.offset(*args) if fun.offset is not None else 0.0
    torch.testing.assert_close(z, A @ W + c)
    g_auto = torch.func.grad(fun.subfun)(z, *args)
    torch.testing.assert_close(fun.subfun_grad(z, *args), g_auto)
    b = fun.linear_term(*args) if fun.linear_term is not None else 0.0
    torch.testing.assert_close(torch.func.grad(fun)(W, *args), A.T @ g_auto + b)
    L = fun.columnwise_lipschitz_const(*args)
    H = torch.autograd.functional.hessian(lambda w: fun(w, *args), W)
    d = W.shape[0]
    H = H.reshape(d, -1, d, H.shape[-1] if W.dim() == 2 else 1)
    for j in range(d):
        block = H[j, :, j, :]
        assert torch.linalg.eigvalsh(0.5 * (block + block.T)).max() <= L[j] * (1 + 1e-12)
    if name == "least_squares":  # quadratic: the bound is attained
        torch.testing.assert_close(L, (X * X).sum(0) / X.shape[0])
