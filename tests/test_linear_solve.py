"""implicit_torch.linear_solve: every solver against torch.linalg.solve (float64 references)."""

import functools
import warnings

import pytest
import torch
from problems import DT, gen, nonsym, spd

import implicit_torch as it
from implicit_torch import linear as linear_solve

ALL = ["cg", "normal_cg", "gmres", "bicgstab", "lu", "cholesky", "auto"]
GENERAL = ["normal_cg", "gmres", "bicgstab", "lu", "auto"]
ITERATIVE = ["cg", "normal_cg", "gmres", "bicgstab"]


def solver(name):
    return getattr(it, f"solve_{name}")


def rel_err(x, ref):
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


@pytest.mark.parametrize("name", ALL)
def test_spd_matches_linalg_solve(name):
    A, b = spd(20, seed=1, cond=50.0), torch.randn(20, generator=gen(2), dtype=DT)
    x = solver(name)(lambda v: A @ v, b, tol=1e-13, maxiter=1000)
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-10


@pytest.mark.parametrize("name", GENERAL)
def test_nonsymmetric_matches_linalg_solve(name):
    A, b = nonsym(15, seed=3), torch.randn(15, generator=gen(4), dtype=DT)
    x = solver(name)(lambda v: A @ v, b, tol=1e-13, maxiter=1000)
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-10


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "lu", "cholesky", "auto"])
def test_ridge_shifts_the_system(name):
    A, b = spd(9, seed=5), torch.randn(9, generator=gen(6), dtype=DT)
    x = solver(name)(lambda v: A @ v, b, ridge=0.3, tol=1e-13)
    assert rel_err(x, torch.linalg.solve(A + 0.3 * torch.eye(9, dtype=DT), b)) < 1e-10


def test_normal_cg_ridge_is_on_the_normal_equations():
    A, b = nonsym(8, seed=7), torch.randn(8, generator=gen(8), dtype=DT)
    x = it.solve_normal_cg(lambda v: A @ v, b, ridge=0.3, tol=1e-13)
    ref = torch.linalg.solve(A.T @ A + 0.3 * torch.eye(8, dtype=DT), A.T @ b)
    assert rel_err(x, ref) < 1e-10


@pytest.mark.parametrize("name", ALL)
def test_pytree_and_matrix_shaped_unknowns(name):
    K = spd(11, seed=9)
    b = {"w": torch.randn(2, 3, generator=gen(10), dtype=DT), "c": [torch.randn(5, dtype=DT)]}

    def flat(t):
        return torch.cat([t["w"].reshape(-1), t["c"][0]])

    def unflat(v):
        return {"w": v[:6].reshape(2, 3), "c": [v[6:]]}

    x = solver(name)(lambda t: unflat(K @ flat(t)), b, tol=1e-13)
    assert set(x) == {"w", "c"} and isinstance(x["c"], list) and x["w"].shape == (2, 3)
    assert rel_err(flat(x), torch.linalg.solve(K, flat(b))) < 1e-10


@pytest.mark.parametrize("name", ITERATIVE)
def test_warm_start_at_the_solution_needs_no_iteration(name):
    A, b = spd(30, seed=11, cond=100.0), torch.randn(30, generator=gen(12), dtype=DT)
    x_true = torch.linalg.solve(A, b)
    x, info = solver(name)(lambda v: A @ v, b, init=x_true, tol=1e-10, return_info=True)
    assert int(info.iterations) == 0 and bool(info.converged)
    assert rel_err(x, x_true) < 1e-12


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab"])
def test_jacobi_preconditioner_cuts_iterations(name):
    D = torch.diag(torch.logspace(0, 2, 40, dtype=DT))
    A = D @ spd(40, seed=13, cond=3.0) @ D  # badly scaled; Jacobi undoes most of it
    b = torch.randn(40, generator=gen(14), dtype=DT)
    diag = torch.diagonal(A).clone()
    kw = dict(tol=1e-10, maxiter=4000, return_info=True, on_failure="ignore")
    _x_plain, info_plain = solver(name)(lambda v: A @ v, b, **kw)
    x_pre, info_pre = solver(name)(lambda v: A @ v, b, M=lambda r: r / diag, **kw)
    assert rel_err(x_pre, torch.linalg.solve(A, b)) < 1e-7
    assert int(info_pre.iterations) < int(info_plain.iterations)


def test_float32_stays_float32():
    A = spd(12, seed=15, dtype=torch.float32)
    b = torch.randn(12, generator=gen(16)).float()
    for name in ALL:
        x = solver(name)(lambda v: A @ v, b)
        assert x.dtype == torch.float32, name
        assert rel_err(x.double(), torch.linalg.solve(A.double(), b.double())) < 1e-4, name


# --- batched systems --------------------------------------------------------------------------


def batched_system(B=5, n=6, seed=17, scales=None):
    A = torch.stack([spd(n, seed=seed + i, cond=20.0) for i in range(B)])
    if scales is not None:
        A = A * scales[:, None, None]
    b = torch.randn(B, n, generator=gen(seed), dtype=DT)
    return A, b


@pytest.mark.parametrize("name", ALL)
def test_batched_systems_converge_individually(name):
    # Scales 1e-3 .. 1e3 across systems: a shared step size or a shared convergence test
    # would leave the small systems unsolved.
    scales = torch.tensor([1e-3, 1e3, 1.0, 1e-2, 1e2], dtype=DT)
    A, b = batched_system(scales=scales)
    x, info = solver(name)(
        lambda v: torch.einsum("bij,bj->bi", A, v), b, batched=True, tol=1e-12, return_info=True
    )
    ref = torch.linalg.solve(A, b)
    errs = torch.linalg.vector_norm(x - ref, dim=1) / torch.linalg.vector_norm(ref, dim=1)
    assert bool((errs < 1e-9).all()), errs
    assert info.iterations.shape == (5,) and info.residual_norm.shape == (5,)
    assert bool(info.converged.all())


def test_batched_iterations_are_per_system():
    A = torch.stack([torch.eye(10, dtype=DT), spd(10, seed=18, cond=1000.0)])
    b = torch.randn(2, 10, generator=gen(19), dtype=DT)
    _, info = it.solve_cg(
        lambda v: torch.einsum("bij,bj->bi", A, v), b, batched=True, tol=1e-12, return_info=True
    )
    assert int(info.iterations[0]) == 1 and int(info.iterations[1]) > 5


def test_info_reports_true_residual():
    A, b = spd(25, seed=20, cond=1e4), torch.randn(25, generator=gen(21), dtype=DT)
    x, info = it.solve_cg(lambda v: A @ v, b, maxiter=5, on_failure="ignore", return_info=True)
    true = torch.linalg.vector_norm(b - A @ x)
    assert int(info.iterations) == 5 and not bool(info.converged)
    torch.testing.assert_close(info.residual_norm, true)


# --- failures are reported, never silent ------------------------------------------------------


def test_non_convergence_warns_with_the_residual():
    A, b = spd(25, seed=22, cond=1e4), torch.randn(25, generator=gen(23), dtype=DT)
    with pytest.warns(it.ConvergenceWarning, match=r"did not converge.*residual"):
        it.solve_cg(lambda v: A @ v, b, maxiter=3)


@pytest.mark.parametrize("name", ITERATIVE)
def test_non_convergence_raises_on_request(name):
    A, b = spd(25, seed=24, cond=1e4), torch.randn(25, generator=gen(25), dtype=DT)
    with pytest.raises(it.ConvergenceError, match="did not converge"):
        solver(name)(lambda v: A @ v, b, maxiter=2, on_failure="raise")


def test_cg_detects_an_indefinite_system():
    A = torch.diag(torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=DT))
    b = torch.ones(4, dtype=DT)
    with pytest.raises(it.IndefiniteSystemError, match="not symmetric definite"):
        it.solve_cg(lambda v: A @ v, b, on_failure="raise")
    _x, info = it.solve_cg(lambda v: A @ v, b, on_failure="ignore", return_info=True)
    assert bool(info.indefinite) and not bool(info.converged)


def test_cg_handles_negative_definite_systems():
    # CG on -A has the same iterates, so a negative-definite system (e.g. T(x) - x for a
    # symmetric contraction T) is solved, not flagged.
    A = -spd(10, seed=26)
    b = torch.randn(10, generator=gen(27), dtype=DT)
    x = it.solve_cg(lambda v: A @ v, b, tol=1e-13, on_failure="raise")
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-10


def test_cholesky_falls_back_to_lu_with_a_warning():
    A, b = nonsym(6, seed=28), torch.randn(6, generator=gen(29), dtype=DT)
    with pytest.warns(it.ConvergenceWarning, match="not symmetric"):
        x = it.solve_cholesky(lambda v: A @ v, b)
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-12


def test_singular_dense_system_is_reported():
    A = torch.zeros(3, 3, dtype=DT)
    with pytest.raises((it.ConvergenceError, RuntimeError)):
        it.solve_lu(lambda v: A @ v, torch.ones(3, dtype=DT), on_failure="raise")


def test_nan_is_never_reported_as_converged():
    A = spd(5, seed=30)
    b = torch.ones(5, dtype=DT)
    b[2] = float("nan")
    for name in ALL:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            _, info = solver(name)(lambda v: A @ v, b, return_info=True, on_failure="ignore")
        assert not bool(info.converged), name


# --- bad input --------------------------------------------------------------------------------


def test_matvec_returning_the_wrong_shape_is_a_clear_error():
    b = torch.ones(4, dtype=DT)
    with pytest.raises(ValueError, match="output of matvec"):
        it.solve_cg(lambda v: torch.cat([v, v]), b)


def test_integer_right_hand_side_is_rejected():
    with pytest.raises(TypeError, match="floating"):
        it.solve_cg(lambda v: v, torch.ones(3, dtype=torch.int64))


def test_batched_leaves_must_share_the_batch_dimension():
    b = {"a": torch.ones(3, 2, dtype=DT), "b": torch.ones(4, dtype=DT)}
    with pytest.raises(ValueError, match="leading"):
        it.solve_cg(lambda v: v, b, batched=True)


def test_unknown_options_are_rejected():
    b = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="on_failure"):
        it.solve_cg(lambda v: v, b, on_failure="explode")
    with pytest.raises(ValueError, match="unknown solve"):
        linear_solve.get_solver("qr")
    with pytest.raises(ValueError, match="maxiter"):
        it.solve_cg(lambda v: v, b, maxiter=-1)


# --- loops without host synchronisation ------------------------------------------------------


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "lu", "auto"])
def test_solvers_run_under_vmap(name):
    # Under vmap the loops cannot stop early (no truth value of a batched tensor): they run
    # their full, masked iteration count and still give the right answer.
    A = spd(6, seed=31)
    bs = torch.randn(4, 6, generator=gen(32), dtype=DT)
    solve = functools.partial(solver(name), tol=1e-13, maxiter=60)
    x = torch.func.vmap(lambda b: solve(lambda v: A @ v, b))(bs)
    torch.testing.assert_close(x, torch.linalg.solve(A, bs.T).T, rtol=1e-9, atol=1e-11)


def test_cg_loop_never_reads_values_when_it_cannot(monkeypatch):
    from implicit_torch import _runtime

    monkeypatch.setattr(_runtime, "can_inspect_values", lambda *tensors: False)
    A, b = spd(8, seed=33), torch.randn(8, generator=gen(34), dtype=DT)
    calls = []
    real_bool = torch.Tensor.__bool__

    def spy(self):
        calls.append(1)
        return real_bool(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", spy)
    x = it.solve_cg(lambda v: A @ v, b, tol=1e-13, maxiter=30)
    monkeypatch.undo()
    assert not calls, "the CG loop synchronised with the host"
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-10


# --- the CPU batched-LU guard (pytorch issue 142815) -------------------------------------------


def test_batched_cpu_lu_solves_block_by_block_for_large_n(monkeypatch):
    """The guard for pytorch issue 142815 (batched multi-threaded CPU LU, n ≥ 160) solves
    block by block and never touches the process-wide thread count."""
    from implicit_torch.linear import dense

    seen = []
    real_solve = torch.linalg.solve_ex
    set_calls = []

    def spy(A, b):
        seen.append(tuple(A.shape))
        return real_solve(A, b)

    torch.set_num_threads(2)
    monkeypatch.setattr(torch.linalg, "solve_ex", spy)
    monkeypatch.setattr(torch, "set_num_threads", lambda k: set_calls.append(k))
    n = dense.CPU_BATCHED_LU_SAFE_N
    A = torch.eye(n, dtype=DT).expand(3, n, n) * 2.0
    b = torch.ones(3, n, dtype=DT)
    x, singular = dense.lu_solve(A, b)
    small, _ = dense.lu_solve(A[:, :8, :8], b[:, :8])
    assert not bool(singular.any())
    assert seen == [(n, n)] * 3 + [(3, 8, 8)], seen
    assert set_calls == [], "the guard must not change the global thread count"
    torch.testing.assert_close(x, b / 2)
    torch.testing.assert_close(small, b[:, :8] / 2)


def test_auto_picks_by_size_and_structure():
    n = linear_solve.auto.AUTO_DENSE_MAX_N + 40
    A_sym = spd(n, seed=35, cond=5.0)
    A_gen = nonsym(n, seed=36)
    b = torch.randn(n, generator=gen(37), dtype=DT)
    small = spd(10, seed=38)
    _, info = it.solve_auto(lambda v: small @ v, b[:10], return_info=True)
    assert info.method == "cholesky"
    _, info = it.solve_auto(lambda v: nonsym(10, 39) @ v, b[:10], return_info=True)
    assert info.method == "lu"
    x, info = it.solve_auto(lambda v: A_sym @ v, b, tol=1e-12, return_info=True)
    assert info.method == "cg" and rel_err(x, torch.linalg.solve(A_sym, b)) < 1e-9
    x, info = it.solve_auto(lambda v: A_gen @ v, b, tol=1e-12, return_info=True)
    assert info.method == "gmres" and rel_err(x, torch.linalg.solve(A_gen, b)) < 1e-9
    # symmetric indefinite and large: CG gives up, GMRES finishes
    eig = torch.linspace(-2, 3, n, dtype=DT)
    eig[eig.abs() < 0.1] = 0.5
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen(40), dtype=DT))[0]
    A_ind = Q @ torch.diag(eig) @ Q.T
    A_ind = 0.5 * (A_ind + A_ind.T)
    x, info = it.solve_auto(lambda v: A_ind @ v, b, tol=1e-10, return_info=True)
    assert info.method == "gmres" and rel_err(x, torch.linalg.solve(A_ind, b)) < 1e-7


# --- Neumann series (Richardson) -------------------------------------------------------------


def _contraction_system(n, radius, seed):
    J = torch.randn(n, n, generator=gen(seed), dtype=DT)
    J = radius * J / torch.linalg.matrix_norm(J, ord=2)
    return torch.eye(n, dtype=DT) - J


def test_neumann_solves_contractive_fixed_point_systems():
    A, b = _contraction_system(12, 0.6, seed=50), torch.randn(12, generator=gen(51), dtype=DT)
    x, info = it.solve_neumann(lambda v: A @ v, b, tol=1e-12, return_info=True)
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-10
    assert info.method == "neumann" and bool(info.converged)
    # the error shrinks at the contraction rate: at most ~log(1e-12)/log(0.6) ≈ 55 steps
    assert int(info.iterations) <= 60


def test_neumann_batched_systems_converge_individually():
    A = torch.stack([_contraction_system(6, r, seed=52 + i) for i, r in enumerate((0.1, 0.9))])
    b = torch.randn(2, 6, generator=gen(54), dtype=DT)
    x, info = it.solve_neumann(
        lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), b, batched=True, tol=1e-12, return_info=True
    )
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-10
    assert int(info.iterations[0]) < int(info.iterations[1])


def test_neumann_accepts_either_sign_of_a_fixed_point_system():
    A, b = _contraction_system(10, 0.7, seed=57), torch.randn(10, generator=gen(58), dtype=DT)
    x = it.solve_neumann(lambda v: -(A @ v), b, tol=1e-12)  # F = f(z) − z: A = J − I
    assert rel_err(x, torch.linalg.solve(-A, b)) < 1e-10


def test_neumann_reports_divergence():
    # J symmetric with eigenvalues in [-1.5, 1.5]: spectral radius 1.5, no sign helps
    Q = torch.linalg.qr(torch.randn(8, 8, generator=gen(55), dtype=DT))[0]
    J = Q @ torch.diag(torch.linspace(-1.5, 1.5, 8, dtype=DT)) @ Q.T
    A, b = torch.eye(8, dtype=DT) - J, torch.randn(8, generator=gen(56), dtype=DT)
    with pytest.warns(it.ConvergenceWarning, match="diverged"):
        it.solve_neumann(lambda v: A @ v, b, maxiter=500)
    with pytest.raises(it.ConvergenceError, match="not contractive"):
        it.solve_neumann(lambda v: A @ v, b, maxiter=500, on_failure="raise")


# --- WarmStart ---------------------------------------------------------------------------------


def test_warm_start_reuses_the_previous_solution_of_nearby_systems():
    A0, b0 = spd(30, seed=60, cond=1e3), torch.randn(30, generator=gen(61), dtype=DT)
    warm = it.WarmStart("cg")
    cold = []
    for k in range(4):
        A, b = A0 + 1e-6 * k * torch.eye(30, dtype=DT), b0 + 1e-6 * k
        x = warm(lambda v, A=A: A @ v, b, tol=1e-12)
        assert rel_err(x, torch.linalg.solve(A, b)) < 1e-9
        _, info = it.solve_cg(lambda v, A=A: A @ v, b, tol=1e-12, return_info=True)
        cold.append(int(info.iterations))
    assert warm.iterations[0] == cold[0]
    # CG from the previous solution (1e-6 away) needs fewer iterations than from zero
    assert all(w < c for w, c in zip(warm.iterations[1:], cold[1:])), (warm.iterations, cold)
    warm.reset()
    warm(lambda v: A0 @ v, b0, tol=1e-12)
    assert warm.iterations[-1] == cold[0]


def test_warm_start_ignores_a_solution_of_another_shape_and_wraps_builtins_only():
    warm = it.WarmStart("gmres")
    warm(lambda v: 2 * v, torch.ones(3, dtype=DT))
    x = warm(lambda v: 2 * v, torch.ones(5, dtype=DT))  # the stored (3,) guess does not fit
    torch.testing.assert_close(x, torch.full((5,), 0.5, dtype=DT))
    with pytest.raises(TypeError, match="built-in"):
        it.WarmStart(lambda matvec, b: b)


def test_warm_start_in_the_engine_keeps_gradients_exact():
    # custom_root with solve=WarmStart(...): the backward solve starts from the last adjoint
    X = torch.randn(60, 30, generator=gen(62), dtype=DT)
    y = torch.randn(60, generator=gen(63), dtype=DT)
    warm = it.WarmStart(functools.partial(it.solve_cg, tol=1e-13))

    def F(w, lam):
        return X.T @ (X @ w - y) + lam * w

    solver = it.custom_root(F, solve=warm)(
        lambda init, lam: torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)
    )
    for k in range(3):
        lam = torch.full((30,), 1.0 + 1e-4 * k, dtype=DT, requires_grad=True)
        (g,) = torch.autograd.grad(solver(None, lam).sum(), lam)
        lam_ref = lam.detach().clone().requires_grad_()
        w_ref = torch.linalg.solve(X.T @ X + torch.diag(lam_ref), X.T @ y)
        (r,) = torch.autograd.grad(w_ref.sum(), lam_ref)
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert len(warm.iterations) == 3 and warm.iterations[2] < warm.iterations[0]


def test_gmres_stops_inside_a_restart_cycle():
    # A well-conditioned system converges in far fewer Arnoldi steps than the restart length:
    # the per-step least-squares residual lets the cycle stop there (no whole 20-step cycle).
    n = 200
    A = torch.eye(n, dtype=DT) + 0.1 * torch.randn(n, n, generator=gen(70), dtype=DT) / n**0.5
    b = torch.randn(n, generator=gen(71), dtype=DT)
    x, info = it.solve_gmres(lambda v: A @ v, b, tol=1e-10, return_info=True)
    assert bool(info.converged) and int(info.iterations) < 20
    assert rel_err(x, torch.linalg.solve(A, b)) < 1e-9


def test_warm_start_forgets_a_non_finite_solution():
    warm = it.WarmStart("lu")  # LU passes a NaN right-hand side through (GMRES returns 0)
    b = torch.tensor([float("nan"), 1.0, 1.0, 1.0], dtype=DT)
    with pytest.warns(it.ConvergenceWarning):
        x = warm(lambda v: 2 * v, b)
    assert not bool(torch.isfinite(x).all()) and warm.last is None
    x = warm(lambda v: 2 * v, torch.ones(4, dtype=DT))
    torch.testing.assert_close(x, torch.full((4,), 0.5, dtype=DT))


def test_neumann_step_size_converges_where_the_plain_series_diverges():
    """torchopt's ``alpha``: Richardson with step α converges iff ρ(I − αA) < 1. For A with
    eigenvalues in [0.5, 3] the plain series (α = 1) diverges; α = 0.5 converges."""
    g = gen(71)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))
    A = (Q * torch.linspace(0.5, 3.0, 6, dtype=DT)) @ Q.T
    b = torch.randn(6, generator=g, dtype=DT)
    with pytest.warns(it.ConvergenceWarning, match="diverged"):
        it.solve_neumann(lambda v: A @ v, b, maxiter=200)
    x = it.solve_neumann(lambda v: A @ v, b, alpha=0.5, maxiter=500, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)


def test_neumann_fixed_steps_sums_exactly_maxiter_terms():
    """``fixed_steps``: the truncated series α Σ_{k<K} (I − αA)^k b, whatever the residual."""
    g = gen(72)
    A = torch.eye(4, dtype=DT) + 0.3 * torch.randn(4, 4, generator=g, dtype=DT) / 2
    b = torch.randn(4, generator=g, dtype=DT)
    K, alpha = 7, 0.8
    ref, term = torch.zeros(4, dtype=DT), b.clone()
    for _ in range(K):
        ref = ref + alpha * term
        term = term - alpha * (A @ term)
    x, info = it.solve_neumann(
        lambda v: A @ v, b, alpha=alpha, maxiter=K, fixed_steps=True, on_failure="ignore",
        return_info=True,
    )  # fmt: skip
    torch.testing.assert_close(x, ref)
    assert int(info.iterations) == K
    with pytest.raises(ValueError, match="alpha"):
        it.solve_neumann(lambda v: A @ v, b, alpha=0.0)
