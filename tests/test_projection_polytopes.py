"""Projections onto polytopes (sparse simplex, box section, Birkhoff, transport and their KL
versions): values against independent references (enumeration, scipy SLSQP, long plain
Sinkhorn, linear_sum_assignment), KKT certificates, and Jacobians against finite differences
(torch.autograd.gradcheck, float64)."""

import itertools
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

from implicit_torch._errors import ConvergenceError, ConvergenceWarning
from implicit_torch.projection import (
    kl_projection_birkhoff,
    kl_projection_simplex,
    kl_projection_transport,
    projection_birkhoff,
    projection_box_section,
    projection_simplex,
    projection_sparse_simplex,
    projection_transport,
)

DT = torch.float64
TIGHT = dict(maxiter=100000, tol=1e-13)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def np_simplex(v, value):
    """Simplex projection by bisection on the threshold (independent of the sort formula)."""
    lo, hi = v.min() - value, v.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(v - mid, 0).sum() > value:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - (lo + hi) / 2, 0)


def slsqp(x, constraints, bounds=None, x0=None):
    x = np.asarray(x, dtype=float)
    res = scipy.optimize.minimize(
        lambda p: 0.5 * np.sum((p - x) ** 2),
        np.zeros_like(x) if x0 is None else x0,
        jac=lambda p: p - x,
        method="SLSQP",
        bounds=bounds,
        constraints=constraints,
        # ftol below ~1e-14 is under what SLSQP's line search resolves in float64: at the
        # optimum it then stops with status 8 ("positive directional derivative").
        options={"ftol": 1e-14, "maxiter": 2000},
    )
    assert res.success, res.message
    return res.x


# ------------------------------------------------------------------------------------------
# Sparse simplex
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_nz", [1, 2, 3, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_simplex_matches_enumeration(max_nz, seed):
    x = torch.randn(6, generator=gen(seed), dtype=DT)
    value = 1.3
    xn = x.numpy()
    best, best_d = None, np.inf
    for T in itertools.combinations(range(6), max_nz):
        p = np.zeros(6)
        p[list(T)] = np_simplex(xn[list(T)], value)
        d = np.sum((p - xn) ** 2)
        if d < best_d:
            best, best_d = p, d
    p = projection_sparse_simplex(x, max_nz, value)
    np.testing.assert_allclose(p.numpy(), best, atol=1e-12)
    assert int((p > 0).sum()) <= max_nz
    assert abs(float(p.sum()) - value) < 1e-12


def test_sparse_simplex_jacobian():
    x = torch.tensor([0.9, -0.3, 0.45, 1.2, 0.05, 0.7], dtype=DT, requires_grad=True)
    value = torch.tensor(1.5, dtype=DT, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, v: projection_sparse_simplex(x, 3, v), (x, value), check_forward_ad=True
    )
    J = torch.autograd.functional.jacobian(lambda x: projection_sparse_simplex(x, 3, 1.5), x)
    p = projection_sparse_simplex(x.detach(), 3, 1.5)
    s = (p > 0).to(DT)
    np.testing.assert_allclose(J.numpy(), (torch.diag(s) - torch.outer(s, s) / s.sum()).numpy())


def test_sparse_simplex_shapes_and_errors():
    x = torch.randn(2, 3, generator=gen(2), dtype=DT)
    torch.testing.assert_close(projection_sparse_simplex(x, 10), projection_simplex(x))
    assert projection_sparse_simplex(x, 2).shape == (2, 3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_nz"):
            projection_sparse_simplex(x, bad)


def test_kl_projection_simplex():
    x = torch.randn(5, generator=gen(3), dtype=DT)
    p = kl_projection_simplex(x, 2.0)
    assert abs(float(p.sum()) - 2.0) < 1e-14
    # Stationarity of KL(p, exp(x)) + τ(Σp − 2): log p − x is constant.
    r = torch.log(p) - x
    assert float(r.max() - r.min()) < 1e-13


# ------------------------------------------------------------------------------------------
# Box section
# ------------------------------------------------------------------------------------------


def box_section_case(seed, n=7, signs=True):
    g = gen(seed)
    x = 2 * torch.randn(n, generator=g, dtype=DT)
    alpha = -torch.rand(n, generator=g, dtype=DT)
    beta = torch.rand(n, generator=g, dtype=DT) + 0.1
    w = torch.rand(n, generator=g, dtype=DT) + 0.2
    if signs:
        w = w * torch.tensor([1, -1, 1, 1, -1, 1, 1][:n], dtype=DT)
    lo = torch.minimum(w * alpha, w * beta).sum()
    hi = torch.maximum(w * alpha, w * beta).sum()
    c = lo + (hi - lo) * torch.rand((), generator=g, dtype=DT)
    return x, alpha, beta, w, c


@pytest.mark.parametrize("seed", range(4))
def test_box_section_matches_slsqp_and_kkt(seed):
    x, alpha, beta, w, c = box_section_case(seed)
    p = projection_box_section(x, (alpha, beta, w, c), check_feasible=True)
    ref = slsqp(
        x.numpy(),
        [{"type": "eq", "fun": lambda q: w.numpy() @ q - float(c), "jac": lambda q: w.numpy()}],
        bounds=list(zip(alpha.numpy(), beta.numpy())),
        x0=np.clip(np.zeros(7), alpha.numpy(), beta.numpy()),
    )
    np.testing.assert_allclose(p.numpy(), ref, atol=1e-7)
    # KKT: feasible, and p = clip(x − τ w) for one τ (read off a free coordinate).
    assert bool((p >= alpha).all() and (p <= beta).all())
    assert abs(float(w @ p - c)) < 1e-12
    free = (p > alpha + 1e-9) & (p < beta - 1e-9) & (w != 0)
    assert bool(free.any())
    tau = ((x - p) / w)[free][0]
    torch.testing.assert_close(p, torch.clamp(x - tau * w, alpha, beta), atol=1e-12, rtol=0)


def test_box_section_zero_weight_and_scalars():
    x, alpha, beta, w, c = box_section_case(5)
    w = w.clone()
    w[2] = 0.0
    lo, hi = torch.minimum(w * alpha, w * beta).sum(), torch.maximum(w * alpha, w * beta).sum()
    c = (lo + hi) / 2
    p = projection_box_section(x, (alpha, beta, w, c))
    assert float(p[2]) == float(torch.clamp(x[2], alpha[2], beta[2]))
    assert abs(float(w @ p - c)) < 1e-12
    # Scalar bounds and weights: the hypercube section {0 ≤ p ≤ 1, Σ p = 2}.
    y = torch.randn(5, generator=gen(6), dtype=DT)
    q = projection_box_section(y, (0.0, 1.0, 1.0, 2.0))
    ref = slsqp(y.numpy(), [{"type": "eq", "fun": lambda v: v.sum() - 2.0}], [(0, 1)] * 5)
    np.testing.assert_allclose(q.numpy(), ref, atol=1e-7)


def test_box_section_infinite_bounds():
    x = torch.randn(6, generator=gen(13), dtype=DT)
    inf = float("inf")
    # {p ≥ 0, Σ p = 1.5} is the simplex.
    torch.testing.assert_close(
        projection_box_section(x, (0.0, inf, 1.0, 1.5)), projection_simplex(x, 1.5)
    )
    # {p ≤ 0.3, ⟨w, p⟩ = c} with signed weights, against SLSQP; and the Jacobian.
    w = torch.tensor([1.0, -0.5, 2.0, 0.7, 0.0, 1.2], dtype=DT)
    p = projection_box_section(x, (-inf, 0.3, w, 0.4))
    ref = slsqp(
        x.numpy(),
        [{"type": "eq", "fun": lambda q: w.numpy() @ q - 0.4, "jac": lambda q: w.numpy()}],
        bounds=[(None, 0.3)] * 6,
    )
    np.testing.assert_allclose(p.numpy(), ref, atol=1e-7)
    args = [t.clone().requires_grad_() for t in (x, w, torch.tensor(0.4, dtype=DT))]
    torch.autograd.gradcheck(
        lambda x, w, c: projection_box_section(x, (-inf, 0.3, w, c)), args, check_forward_ad=True
    )
    # No bounds at all: the hyperplane projection.
    torch.testing.assert_close(
        projection_box_section(x, (-inf, inf, w, 0.4)),
        x - (w @ x - 0.4) / (w @ w) * w,
    )


def np_box_section(x, alpha, beta, w, c):
    """Reference: bisection on the dual τ of φ(τ) = ⟨w, clip(x − τw, α, β)⟩ (non-increasing)."""
    phi = lambda t: w @ np.clip(x - t * w, alpha, beta)  # noqa: E731
    lo, hi = -1.0, 1.0
    for _ in range(60):  # bracket (φ may be flat, e.g. α = β)
        lo, hi = (lo * 2 if phi(lo) < c else lo), (hi * 2 if phi(hi) > c else hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if phi(mid) > c else (lo, mid)
    return np.clip(x - (lo + hi) / 2 * w, alpha, beta)


def test_box_section_fuzz_vs_bisection():
    g = gen(14)
    inf = float("inf")
    for trial in range(60):
        n = int(torch.randint(1, 9, (), generator=g))
        x = torch.randn(n, generator=g, dtype=DT)
        alpha = -torch.rand(n, generator=g, dtype=DT)
        beta = alpha + torch.rand(n, generator=g, dtype=DT) * (trial % 3 != 0)  # some α = β
        w = torch.randn(n, generator=g, dtype=DT)
        w[torch.rand(n, generator=g) < 0.2] = 0.0
        if trial % 4 == 1:
            alpha[0] = -inf
        if trial % 4 == 2:
            x = x.round()  # ties between breakpoints
        wa, wb = (torch.where(w == 0, 0.0, w * t) for t in (alpha, beta))  # no 0 · ∞
        lo, hi = float(torch.minimum(wa, wb).sum()), float(torch.maximum(wa, wb).sum())
        if np.isinf(lo) and np.isinf(hi):
            lo, hi = -5.0, 5.0
        lo, hi = (hi - 5 if np.isinf(lo) else lo), (lo + 5 if np.isinf(hi) else hi)
        c = lo + (hi - lo) * float(torch.rand((), generator=g, dtype=DT))
        p = projection_box_section(x, (alpha, beta, w, c), check_feasible=True)
        ref = np_box_section(*(t.numpy() for t in (x, alpha, beta, w)), c)
        np.testing.assert_allclose(p.numpy(), ref, atol=1e-9, err_msg=f"trial {trial}")


def test_box_section_flat_dual_segment():
    # Element 0 reaches its lower bound before element 1 leaves its upper one: φ is flat at
    # 1.0 on a whole interval of τ, and c = 1.0 lies on it (the dual root is not unique).
    x = torch.tensor([0.5, 3.0], dtype=DT)
    p = projection_box_section(x, (0.0, 1.0, 1.0, 1.0))
    torch.testing.assert_close(p, torch.tensor([0.0, 1.0], dtype=DT))


def test_box_section_batched_and_vmap():
    cases = [box_section_case(s) for s in range(3)]
    stacked = [torch.stack(t) for t in zip(*cases)]
    x, hp = stacked[0], tuple(stacked[1:])
    out = projection_box_section(x, hp)
    each = torch.stack([projection_box_section(c[0], c[1:]) for c in cases])
    torch.testing.assert_close(out, each, atol=1e-13, rtol=0)
    vm = torch.func.vmap(lambda *a: projection_box_section(a[0], a[1:]))(x, *hp)
    torch.testing.assert_close(vm, each, atol=1e-13, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_box_section_gradcheck(seed):
    args = [t.clone().requires_grad_() for t in box_section_case(seed)]
    torch.autograd.gradcheck(
        lambda x, a, b, w, c: projection_box_section(x, (a, b, w, c)),
        args,
        check_forward_ad=True,
    )


def test_box_section_infeasible():
    x = torch.randn(4, generator=gen(7), dtype=DT)
    with pytest.raises(ValueError, match="empty"):
        projection_box_section(x, (0.0, 1.0, 1.0, 5.0), check_feasible=True)
    with pytest.raises(ValueError, match="alpha > beta"):
        projection_box_section(x, (1.0, 0.0, 1.0, 2.0), check_feasible=True)
    # Without the check: the box point with ⟨w, p⟩ nearest to c (all at the upper bound).
    torch.testing.assert_close(
        projection_box_section(x, (0.0, 1.0, 1.0, 5.0)), torch.ones(4, dtype=DT)
    )
    with pytest.raises(ValueError, match="broadcast"):
        projection_box_section(x, (torch.zeros(3, dtype=DT), 1.0, 1.0, 2.0))


# ------------------------------------------------------------------------------------------
# Transport and Birkhoff (Euclidean)
# ------------------------------------------------------------------------------------------


def transport_case(seed, m=3, n=4):
    g = gen(seed)
    S = torch.randn(m, n, generator=g, dtype=DT)
    a = torch.rand(m, generator=g, dtype=DT) + 0.5
    b = torch.rand(n, generator=g, dtype=DT) + 0.5
    return S, a, b / b.sum() * a.sum()


def transport_slsqp(S, a, b):
    m, n = S.shape
    A = np.zeros((m + n, m * n))
    for i in range(m):
        A[i, i * n : (i + 1) * n] = 1
    for j in range(n):
        A[m + j, j::n] = 1
    # One equation is redundant (Σ rows = Σ columns): drop it, SLSQP needs full rank.
    A, rhs = A[:-1], np.concatenate([a, b])[:-1]
    x0 = np.outer(a, b).ravel() / a.sum()
    cons = [{"type": "eq", "fun": lambda p: A @ p - rhs, "jac": lambda p: A}]
    return slsqp(S.ravel(), cons, bounds=[(0, None)] * (m * n), x0=x0).reshape(m, n)


def assert_transport_kkt(S, P, a, b, atol=1e-10):
    """Feasibility, and a dual certificate: P = max(S + f ⊕ g, 0) for some f, g, i.e.
    fᵢ + gⱼ = Pᵢⱼ − Sᵢⱼ on the support and fᵢ + gⱼ ≤ −Sᵢⱼ off it (an LP feasibility problem)."""
    m, n = S.shape
    assert float(P.min()) >= 0
    torch.testing.assert_close(P.sum(1), a, atol=atol, rtol=0)
    torch.testing.assert_close(P.sum(0), b, atol=atol, rtol=0)
    on = (P > 1e-9).numpy()
    rows, cols = np.indices((m, n))
    M = np.zeros((m * n, m + n))
    M[np.arange(m * n), rows.ravel()] = 1
    M[np.arange(m * n), m + cols.ravel()] = 1
    target = (P - S).numpy().ravel()
    mask = on.ravel()
    res = scipy.optimize.linprog(
        np.zeros(m + n),
        A_ub=M[~mask],
        b_ub=-S.numpy().ravel()[~mask] + 1e-9,
        A_eq=M[mask],
        b_eq=target[mask],
        bounds=[(None, None)] * (m + n),
        method="highs",
    )
    assert res.status == 0, res.message
    np.testing.assert_allclose(M[mask] @ res.x, target[mask], atol=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_transport_matches_slsqp_and_kkt(seed):
    S, a, b = transport_case(seed)
    P = projection_transport(S, (a, b), **TIGHT)
    ref = transport_slsqp(S.numpy(), a.numpy(), b.numpy())
    np.testing.assert_allclose(P.numpy(), ref, atol=1e-6)
    assert_transport_kkt(S, P, a, b)


def test_transport_larger_and_zero_marginal():
    S, a, b = transport_case(10, 12, 9)
    a = a.clone()
    a[3] = 0.0
    b = b / b.sum() * a.sum()
    P = projection_transport(S, (a, b), **TIGHT)
    assert float(P[3].abs().max()) < 1e-12
    assert_transport_kkt(S, P, a, b)


def test_transport_peaked():
    # A large spread: the dual ascent alone would need thousands of sweeps.
    S, a, b = transport_case(15, 30, 25)
    S = 50 * S
    P = projection_transport(S, (a, b), **TIGHT)
    assert_transport_kkt(S, P, a, b)


@pytest.mark.parametrize("seed", [0, 1])
def test_transport_gradcheck(seed):
    S, a, b = transport_case(seed)

    def fn(S, a, b_raw):
        # b renormalised so that every perturbation keeps Σa = Σb.
        return projection_transport(S, (a, b_raw / b_raw.sum() * a.sum()), **TIGHT)

    args = [t.clone().requires_grad_() for t in (S, a, b)]
    torch.autograd.gradcheck(fn, args, atol=1e-6, check_forward_ad=True)


def test_birkhoff_of_permutation_like_matrix():
    M = torch.randn(6, 6, generator=gen(4), dtype=DT)
    rows, cols = scipy.optimize.linear_sum_assignment(M.numpy(), maximize=True)
    perm = torch.zeros(6, 6, dtype=DT)
    perm[rows, cols] = 1
    S = (50 * M).requires_grad_()
    P = projection_birkhoff(S, **TIGHT)
    torch.testing.assert_close(P.detach(), perm, atol=1e-10, rtol=0)
    # At a vertex whose support is a perfect matching the projection is locally constant; the
    # dual Laplacian is singular (one null direction per matched pair) but the gradient is 0.
    (g,) = torch.autograd.grad((P * torch.randn(6, 6, generator=gen(5), dtype=DT)).sum(), S)
    assert float(g.abs().max()) < 1e-8
    # An exact permutation, and a doubly stochastic matrix, are their own projections.
    torch.testing.assert_close(projection_birkhoff(perm, **TIGHT), perm, atol=1e-12, rtol=0)
    D = torch.full((6, 6), 1 / 6, dtype=DT) + 0.05 * (perm - 1 / 6)
    torch.testing.assert_close(projection_birkhoff(D, **TIGHT), D, atol=1e-12, rtol=0)


def test_birkhoff_matches_transport_and_gradcheck():
    S = torch.randn(5, 5, generator=gen(8), dtype=DT)
    P = projection_birkhoff(S, **TIGHT)
    ones = torch.ones(5, dtype=DT)
    torch.testing.assert_close(P, projection_transport(S, (ones, ones), **TIGHT))
    assert_transport_kkt(S, P, ones, ones)
    torch.autograd.gradcheck(
        lambda S: projection_birkhoff(S, **TIGHT), (S.clone().requires_grad_(),), atol=1e-6
    )


# ------------------------------------------------------------------------------------------
# KL versions (Sinkhorn)
# ------------------------------------------------------------------------------------------


def plain_sinkhorn(S, a, b, iters=20000):
    """Sinkhorn's matrix scaling u = a / (K v), v = b / (Kᵀ u), with no log domain."""
    K = np.exp(S)
    v = np.ones(S.shape[1])
    for _ in range(iters):
        u = a / (K @ v)
        v = b / (K.T @ u)
    return u[:, None] * K * v[None, :]


@pytest.mark.parametrize("seed", range(2))
def test_kl_transport_matches_plain_sinkhorn(seed):
    S, a, b = transport_case(seed, 4, 6)
    P = kl_projection_transport(S, (a, b), **TIGHT)
    ref = plain_sinkhorn(S.numpy(), a.numpy(), b.numpy())
    np.testing.assert_allclose(P.numpy(), ref, atol=1e-11)
    torch.testing.assert_close(P.sum(1), a, atol=1e-12, rtol=0)
    torch.testing.assert_close(P.sum(0), b, atol=1e-12, rtol=0)
    # KKT: log P − S = f ⊕ g, i.e. it is annihilated by double centring.
    L = torch.log(P) - S
    Lc = L - L.mean(0, keepdim=True) - L.mean(1, keepdim=True) + L.mean()
    assert float(Lc.abs().max()) < 1e-11


@pytest.mark.parametrize("seed", range(2))
def test_kl_transport_gradcheck(seed):
    S, a, b = transport_case(seed)

    def fn(S, a, b_raw):
        return kl_projection_transport(S, (a, b_raw / b_raw.sum() * a.sum()), **TIGHT)

    args = [t.clone().requires_grad_() for t in (S, a, b)]
    torch.autograd.gradcheck(fn, args, atol=1e-6, check_forward_ad=True)


def test_kl_birkhoff():
    S = torch.randn(5, 5, generator=gen(9), dtype=DT)
    P = kl_projection_birkhoff(S, **TIGHT)
    ones = torch.ones(5, dtype=DT)
    np.testing.assert_allclose(
        P.numpy(), plain_sinkhorn(S.numpy(), ones.numpy(), ones.numpy()), atol=1e-11
    )
    torch.autograd.gradcheck(
        lambda S: kl_projection_birkhoff(S, **TIGHT), (S.clone().requires_grad_(),), atol=1e-6
    )


# ------------------------------------------------------------------------------------------
# Bad input and non-convergence
# ------------------------------------------------------------------------------------------

TRANSPORTS = [projection_transport, kl_projection_transport]
BIRKHOFFS = [projection_birkhoff, kl_projection_birkhoff]


@pytest.mark.parametrize("proj", TRANSPORTS)
def test_transport_bad_input(proj):
    S, a, b = transport_case(0)
    with pytest.raises(ValueError, match="shapes"):
        proj(S, (a, torch.ones(3, dtype=DT)))
    with pytest.raises(ValueError, match="2-d"):
        proj(S[0], (a, b))
    with pytest.raises(ValueError, match="pair"):
        proj(S, a)
    with pytest.raises(ValueError, match="equal sums"):
        proj(S, (a, 2 * b))
    neg = a.clone()
    neg[0] = -0.1
    with pytest.raises(ValueError, match="marginals must be"):
        proj(S, (neg, b / b.sum() * neg.sum()))
    with pytest.raises(ValueError, match="maxiter"):
        proj(S, (a, b), maxiter=0)
    with pytest.raises(ValueError, match="on_failure"):
        proj(S, (a, b), on_failure="loud")


def test_kl_transport_needs_positive_marginals():
    S, a, b = transport_case(0)
    a = a.clone()
    a[0] = 0.0
    with pytest.raises(ValueError, match="positive"):
        kl_projection_transport(S, (a, b / b.sum() * a.sum()))


@pytest.mark.parametrize("proj", BIRKHOFFS)
def test_birkhoff_bad_input(proj):
    with pytest.raises(ValueError, match="square"):
        proj(torch.randn(3, 4, dtype=DT))


@pytest.mark.parametrize("proj", TRANSPORTS)
def test_non_convergence_reported(proj):
    S, a, b = transport_case(1, 6, 6)
    S = 5 * S
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        proj(S, (a, b), maxiter=1, tol=1e-14)
    with pytest.raises(ConvergenceError):
        proj(S, (a, b), maxiter=1, tol=1e-14, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proj(S, (a, b), maxiter=1, tol=1e-14, on_failure="ignore")
        proj(S, (a, b))  # the defaults converge quietly


# ------------------------------------------------------------------------------------------
# Composition: vmap, torch.func.grad, second order
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj", BIRKHOFFS)
def test_birkhoff_vmap_and_second_order(proj):
    S = torch.randn(3, 4, 4, generator=gen(11), dtype=DT)
    out = torch.func.vmap(lambda s: proj(s, maxiter=60, tol=1e-12))(S)
    each = torch.stack([proj(s, tol=1e-12) for s in S])
    torch.testing.assert_close(out, each, atol=1e-10, rtol=0)
    G, D = torch.randn(2, 4, 4, generator=gen(12), dtype=DT)

    def loss(s):
        return ((proj(s, **TIGHT) * G).sum()) ** 2

    # Hessian-vector product (forward over the implicit reverse rule) vs finite differences
    # of the implicit gradient, and torch.func.grad vs autograd.
    _, hvp = torch.func.jvp(torch.func.grad(loss), (S[0],), (D,))
    s0 = S[0].clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(s0), s0, create_graph=True)
    (hvp2,) = torch.autograd.grad((g * D).sum(), s0)
    eps = 1e-5
    fd = (torch.func.grad(loss)(S[0] + eps * D) - torch.func.grad(loss)(S[0] - eps * D)) / (2 * eps)
    torch.testing.assert_close(hvp, fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(hvp2, fd, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("proj", TRANSPORTS)
def test_marginal_tangent_off_balance(proj):
    # A tangent that moves a alone leaves Σa = Σb; the derivative is that of the extension
    # with columns b · Σa/Σb (finite, rows following ȧ), not a blow-up of the singular system.
    S, a, b = transport_case(3)
    da = torch.tensor([1.0, -0.3, 0.5], dtype=DT)

    def extended(a_):
        return proj(S, (a_, b / b.sum() * a_.sum()), **TIGHT)

    _, dP = torch.func.jvp(lambda a_: proj(S, (a_, b), **TIGHT), (a,), (da,))
    eps = 1e-6
    fd = (extended(a + eps * da) - extended(a - eps * da)) / (2 * eps)
    torch.testing.assert_close(dP, fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(dP.sum(1), da, atol=1e-10, rtol=0)


def test_float32_matches_float64():
    S, a, b = transport_case(16, 5, 6)
    for proj in TRANSPORTS:
        p64 = proj(S, (a, b), **TIGHT)
        s32 = S.float().requires_grad_()
        p32 = proj(s32, (a.float(), b.float()))
        assert p32.dtype == torch.float32
        torch.testing.assert_close(p32.double(), p64, atol=1e-4, rtol=0)
        p32.square().sum().backward()
        assert bool(torch.isfinite(s32.grad).all())
    x, alpha, beta, w, c = box_section_case(17)
    p32 = projection_box_section(x.float(), (alpha.float(), beta.float(), w.float(), c.float()))
    torch.testing.assert_close(
        p32.double(), projection_box_section(x, (alpha, beta, w, c)), atol=1e-5, rtol=0
    )
