"""Module round-trips (issue 13): the layers of ``it.nn`` behave like any ``nn.Module``.

``state_dict`` through ``torch.save`` / ``torch.load`` (weights only), ``copy.deepcopy``,
``pickle`` (and ``torch.save`` of the whole module), ``.double()`` / ``.float()`` moves and
``train`` / ``eval``, for :class:`ImplicitLayer`, :class:`DEQ`, :class:`QPLayer` and
:class:`Sparsemax`. The forward warm start lives in non-persistent buffers: never in
``state_dict``, moved and cast by ``.to``, copied with the module and independent of the
original after a copy. A copy's gradients reach the copy's parameters, never the original's.

References: the same layer before the round-trip (bitwise where the computation is the same),
the closed form for the ridge layer, and float32 bounds derived from float32 rounding.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from _refs import DT, gen
from torch import nn

import implicit_torch as it

EPS32 = torch.finfo(torch.float32).eps


class Ridge(it.nn.ImplicitLayer):
    """w* = argmin ½‖Xw − y‖² + ½ Σ exp(log_lam) w²."""

    def __init__(self, d=4, dtype=DT, **kw):
        super().__init__(**kw)
        self.log_lam = nn.Parameter(torch.linspace(-1.0, 1.0, d, dtype=dtype))

    def solve_forward(self, init, X, y):
        H = X.T @ X + torch.diag(self.log_lam.exp())
        return torch.linalg.solve(H, X.T @ y)

    def optimality(self, w, X, y):
        return X.T @ (X @ w - y) + self.log_lam.exp() * w


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x) with ‖W‖₂ = 0.5: a contraction."""

    def __init__(self, d=4, dtype=DT, dropout=0.0):
        super().__init__()
        g = gen(11)
        W = torch.randn(d, d, generator=g, dtype=DT)
        self.W = nn.Parameter((0.5 * W / torch.linalg.matrix_norm(W, 2)).to(dtype))
        self.U = nn.Parameter(torch.randn(d, d, generator=g, dtype=DT).to(dtype))
        self.drop = nn.Dropout(dropout)

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + self.drop(x) @ self.U.T)


def ridge_data(dtype=DT):
    g = gen(12)
    X = torch.randn(15, 4, generator=g, dtype=DT).to(dtype)
    y = torch.randn(15, generator=g, dtype=DT).to(dtype)
    return X, y


def deq_input(dtype=DT):
    return torch.randn(3, 4, generator=gen(13), dtype=DT).to(dtype)


def qp_data():
    g = gen(14)
    M = torch.randn(4, 4, generator=g, dtype=DT)
    Q = M @ M.T + 4 * torch.eye(4, dtype=DT)
    p = torch.randn(3, 4, generator=g, dtype=DT)
    G = torch.randn(6, 4, generator=g, dtype=DT)
    h = torch.rand(6, generator=g, dtype=DT) + 0.1
    return Q, p, G, h


def make(kind, **kw):
    if kind == "ridge":
        return Ridge(**kw), ridge_data()
    if kind == "deq":
        layer = it.nn.DEQ(Cell(), tol=1e-12, maxiter=300, **kw)
        return layer, (deq_input(),)
    if kind == "qp":
        return it.nn.QPLayer(), qp_data()
    return it.nn.Sparsemax(dim=-1), (torch.randn(3, 5, generator=gen(15), dtype=DT),)


def out_and_grads(layer, inputs):
    """The output and the gradients of a fixed loss in every parameter and float input."""
    inputs = tuple(x.detach().clone().requires_grad_() for x in inputs)
    out = layer(*inputs)
    weights = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    wrt = [*layer.parameters(), *inputs]
    grads = torch.autograd.grad((weights * out).sum(), wrt)
    return out.detach(), grads


def assert_same(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b)
    for x, y in zip(grads_a, grads_b):
        assert torch.equal(x, y)


KINDS = ["ridge", "deq", "qp", "sparsemax"]


@pytest.fixture(autouse=True)
def _convergence_warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error", it.ConvergenceWarning)
        yield


# ------------------------------------------------------------------------------------------
# state_dict through torch.save / torch.load
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_through_a_file(kind, tmp_path):
    layer, inputs = make(kind)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(0.9)  # not the constructor's values: the load must carry them
    path = tmp_path / "ckpt.pt"
    torch.save(layer.state_dict(), path)
    fresh, _ = make(kind)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert_same(out_and_grads(fresh, inputs), out_and_grads(layer, inputs))


@pytest.mark.parametrize("kind", ["ridge", "deq"])
def test_warm_start_buffers_are_never_in_the_state_dict(kind):
    layer, inputs = make(kind, warm_start=True)
    keys = set(layer.state_dict())
    assert keys == {n for n, _ in layer.named_parameters()}
    layer(*inputs)
    layer(*inputs)
    assert layer.warm_starts == 1
    assert [n for n, _ in layer.named_buffers()] == ["warm_start_state.solution_0"]
    assert set(layer.state_dict()) == keys
    # and a strict load into a layer holding a stored solution works and keeps it
    other, _ = make(kind, warm_start=True)
    other(*inputs)
    other.load_state_dict(layer.state_dict(), strict=True)
    assert [n for n, _ in other.named_buffers()] == ["warm_start_state.solution_0"]


def test_ridge_layer_after_a_load_equals_the_closed_form(tmp_path):
    layer = Ridge()
    with torch.no_grad():
        layer.log_lam.copy_(torch.tensor([0.3, -0.2, 0.0, 1.1], dtype=DT))
    torch.save(layer.state_dict(), tmp_path / "r.pt")
    fresh = Ridge()
    fresh.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    X, y = ridge_data()
    w = fresh(X, y)
    (g,) = torch.autograd.grad(w.sum(), fresh.log_lam)
    lam = torch.tensor([0.3, -0.2, 0.0, 1.1], dtype=DT)
    H = X.T @ X + torch.diag(lam.exp())
    ref = torch.linalg.solve(H, X.T @ y)
    # dΣw/d log λ_j = −(H⁻¹ 1)_j λ_j w_j ; CG backward at tol 1e-10: error ≤ κ · 1e-10
    ref_g = -torch.linalg.solve(H, torch.ones(4, dtype=DT)) * lam.exp() * ref
    kappa = float(torch.linalg.cond(H))
    torch.testing.assert_close(w, ref, rtol=0, atol=10 * kappa * 4 * 2.3e-16 * float(ref.norm()))
    torch.testing.assert_close(g, ref_g, rtol=0, atol=10 * kappa * 1e-10 * float(ref_g.norm()))


# ------------------------------------------------------------------------------------------
# copy.deepcopy, pickle, torch.save of the module
# ------------------------------------------------------------------------------------------


def _pickle(layer):
    return pickle.loads(pickle.dumps(layer))


def _torch_save(layer):
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"deepcopy": copy.deepcopy, "pickle": _pickle, "torch.save": _torch_save}


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("kind", KINDS)
def test_copies_compute_the_same_outputs_and_gradients(kind, how):
    layer, inputs = make(kind)
    clone = ROUND_TRIPS[how](layer)
    assert_same(out_and_grads(clone, inputs), out_and_grads(layer, inputs))


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("kind", ["ridge", "deq"])
def test_a_copy_s_gradients_reach_the_copy_s_parameters_only(kind, how):
    # The layers call their optimality through a helper bound to the module: after a copy it
    # must be bound to the copy, or the copy would differentiate the original's parameters.
    layer, inputs = make(kind)
    clone = ROUND_TRIPS[how](layer)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.1)
    clone(*inputs).sum().backward()
    assert all(p.grad is None for p in layer.parameters())
    assert all(p.grad is not None for p in clone.parameters())
    # and the copy's output is the one of its own (changed) parameters
    assert not torch.equal(clone(*inputs), layer(*inputs))


@pytest.mark.parametrize("kind", ["ridge", "deq"])
def test_a_deep_copy_s_warm_start_is_its_own(kind):
    layer, inputs = make(kind, warm_start=True)
    layer(*inputs)
    clone = copy.deepcopy(layer)
    stored = layer.warm_start_state.solution_0
    copied = clone.warm_start_state.solution_0
    assert torch.equal(stored, copied) and stored.data_ptr() != copied.data_ptr()
    layer.reset_warm_start()
    assert [n for n, _ in clone.named_buffers()] == ["warm_start_state.solution_0"]
    clone(*inputs)
    assert clone.warm_starts == 1 and layer.warm_starts == 0


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
def test_copies_of_a_warm_started_layer_emit_no_warning(how):
    # Today the stored pytree structure (a torch TreeSpec) makes every copy warn
    # "FutureWarning: isinstance(treespec, LeafSpec) is deprecated": a copy that a future
    # torch may refuse.
    layer, inputs = make("deq", warm_start=True)
    layer(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone = ROUND_TRIPS[how](layer)
    torch.testing.assert_close(clone(*inputs), layer(*inputs), rtol=0, atol=1e-10)


def test_a_deep_copy_s_backward_warm_start_is_its_own():
    layer = Ridge(adjoint=it.ImplicitAdjoint("gmres"), warm_start=True)
    X, y = ridge_data()
    layer(X, y).sum().backward()
    clone = copy.deepcopy(layer)
    assert clone.adjoint.solve is not layer.adjoint.solve
    layer.reset_warm_start()
    assert layer.adjoint.solve.last is None and clone.adjoint.solve.last is not None


# ------------------------------------------------------------------------------------------
# dtype moves
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ridge", "deq"])
def test_double_of_a_float32_layer_equals_the_float64_layer(kind):
    layer64, inputs = make(kind)
    layer32 = copy.deepcopy(layer64).float()
    assert all(p.dtype == torch.float32 for p in layer32.parameters())
    moved = layer32.double()
    assert all(p.dtype == DT for p in moved.parameters())
    # float64 → float32 → float64 rounds each parameter once: compare against the layer with
    # those rounded parameters, computed in float64 throughout
    rounded = copy.deepcopy(layer64)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.float().double())
    out, grads = out_and_grads(moved, inputs)
    assert out.dtype == DT and all(g.dtype == DT for g in grads)
    assert_same((out, grads), out_and_grads(rounded, inputs))


@pytest.mark.parametrize("kind", ["ridge", "deq", "sparsemax"])
def test_float_of_a_float64_layer_is_within_float32_rounding(kind):
    layer64, inputs = make(kind)
    if kind == "deq":  # a forward tolerance that float32 attains: 1e-5 ≫ eps32 · ‖z‖
        layer64 = it.nn.DEQ(Cell(), tol=1e-5, maxiter=300)
    out64 = layer64(*inputs).detach()
    layer32 = copy.deepcopy(layer64).float()
    out32 = layer32(*(x.float() for x in inputs)).detach()
    assert out32.dtype == torch.float32
    # float32 inputs and parameters perturb the problem by eps32 relatively; the solution moves
    # by at most κ · eps32 times its size, κ the conditioning of the problem: ridge's H, the
    # DEQ's I − ∂f/∂z with ‖∂f/∂z‖ ≤ 0.5 (κ ≤ 3), the projection's Lipschitz constant 1. The
    # DEQ's forward tolerance 1e-5 adds ‖(I − ∂f/∂z)⁻¹‖ · 1e-5 ≤ 2e-5 per solve.
    if kind == "ridge":
        X = inputs[0]
        H = X.T @ X + torch.diag(layer64.log_lam.detach().exp())
        kappa = float(torch.linalg.cond(H))
    else:
        kappa = 3.0
    bound = 10 * kappa * 16 * EPS32 * (1 + float(out64.norm()))
    if kind == "deq":
        bound += 2 * 2e-5
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=bound)


def test_warm_start_buffers_move_with_to_and_keep_fitting():
    layer, inputs = make("deq", warm_start=True)
    layer(*inputs)
    layer.float()
    assert layer.warm_start_state.solution_0.dtype == torch.float32
    layer.double()
    assert layer.warm_start_state.solution_0.dtype == DT
    layer(*inputs)
    assert layer.warm_starts == 1


def test_to_meta_moves_parameters_and_warm_start_together():
    layer, inputs = make("deq", warm_start=True)
    layer(*inputs)
    layer.to("meta")
    assert all(t.device.type == "meta" for t in [*layer.parameters(), *layer.buffers()])


# ------------------------------------------------------------------------------------------
# train / eval
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_train_and_eval_propagate_and_leave_a_deterministic_layer_unchanged(kind):
    layer, inputs = make(kind)
    train = out_and_grads(layer, inputs)
    layer.eval()
    assert not any(m.training for m in layer.modules())
    evaluated = out_and_grads(layer, inputs)
    layer.train()
    assert all(m.training for m in layer.modules())
    assert_same(evaluated, train)


def test_deq_with_dropout_is_deterministic_in_eval_mode():
    layer = it.nn.DEQ(Cell(dropout=0.5), tol=1e-12, maxiter=300)
    x = deq_input()
    layer.eval()
    first, second = layer(x), layer(x)
    assert torch.equal(first, second)
    # and eval's fixed point is the dropout-free one: z* = tanh(W z* + U x)
    z = first.detach()
    torch.testing.assert_close(layer.f.forward(z, x).detach(), z, rtol=0, atol=1e-11)
