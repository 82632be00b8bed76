"""Composition with torch.func transforms and higher-order autograd.

The reference for everything is the same function with the implicit solve replaced by the
closed form through torch.linalg.solve, differentiated by torch itself.
"""

import pytest
import torch
from problems import DT, gen, ridge_closed, ridge_data, ridge_F, tight

import implicit_torch as it

X, Y, LAM = ridge_data(40, m=20, d=4)
XV, YV = torch.randn(9, 4, generator=gen(41), dtype=DT), torch.randn(9, generator=gen(42), dtype=DT)


def implicit_w(lam, solve=None):
    return it.custom_root(ridge_F, solve=solve or tight("cg", maxiter=40))(
        lambda init, lam, X, y: ridge_closed(lam, X, y)
    )(None, lam, X, Y)


def loss_implicit(lam):
    return ((XV @ implicit_w(lam) - YV) ** 2).sum()


def loss_closed(lam):
    return ((XV @ ridge_closed(lam, X, Y) - YV) ** 2).sum()


def close(a, b, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "transform",
    [torch.func.grad, torch.func.jacrev, torch.func.jacfwd, torch.func.hessian],
    ids=["grad", "jacrev", "jacfwd", "hessian"],
)
def test_scalar_loss_transforms(transform):
    close(transform(loss_implicit)(LAM), transform(loss_closed)(LAM))


@pytest.mark.parametrize("transform", [torch.func.jacrev, torch.func.jacfwd], ids=["rev", "fwd"])
def test_solution_jacobians(transform):
    close(transform(implicit_w)(LAM), torch.func.jacrev(lambda t: ridge_closed(t, X, Y))(LAM))


def test_vjp_and_jvp():
    v, t = torch.randn(4, generator=gen(43), dtype=DT), torch.randn(4, generator=gen(44), dtype=DT)
    _, f = torch.func.vjp(implicit_w, LAM)
    _, f_ref = torch.func.vjp(lambda l: ridge_closed(l, X, Y), LAM)
    close(f(v)[0], f_ref(v)[0])
    close(
        torch.func.jvp(implicit_w, (LAM,), (t,))[1],
        torch.func.jvp(lambda l: ridge_closed(l, X, Y), (LAM,), (t,))[1],
    )


@pytest.mark.parametrize(
    "outer, inner",
    [
        (torch.func.jacrev, torch.func.jacrev),
        (torch.func.jacrev, torch.func.jacfwd),
        (torch.func.jacfwd, torch.func.jacrev),
    ],
    ids=["rev-rev", "rev-fwd", "fwd-rev"],
)
def test_second_order_compositions(outer, inner):
    close(
        outer(inner(loss_implicit))(LAM), torch.func.hessian(loss_closed)(LAM), rtol=1e-6, atol=1e-8
    )
    # Reference: reverse-over-reverse of the closed form. (torch's own jacrev(jacfwd(...)) of
    # torch.linalg.solve is off by ~1e-3 here in torch 2.13 -- checked against finite
    # differences -- so the same composition of the closed form is not a reference.)
    ref = torch.func.jacrev(torch.func.jacrev(lambda t: ridge_closed(t, X, Y)))(LAM)
    close(outer(inner(implicit_w))(LAM), ref, rtol=1e-6, atol=1e-8)


def test_second_derivative_of_the_solution_against_finite_differences():
    eps = 1e-6
    jac = torch.func.jacrev(implicit_w)
    basis = torch.eye(4, dtype=DT)
    fd = torch.stack([(jac(LAM + eps * e) - jac(LAM - eps * e)) / (2 * eps) for e in basis], -1)
    close(torch.func.hessian(implicit_w)(LAM), fd, rtol=1e-5, atol=1e-9)


def test_forward_over_forward_is_refused_not_silently_wrong():
    # torch.func loses outer tangents inside an autograd.Function's jvp rule (pytorch
    # issue 197867); the engine raises rather than return a wrong second derivative.
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        torch.func.jacfwd(torch.func.jacfwd(loss_implicit))(LAM)
    t = torch.ones(4, dtype=DT)
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        torch.func.jvp(lambda l: torch.func.jvp(implicit_w, (l,), (t,))[1], (LAM,), (t,))


def test_nested_implicit_layers_under_forward_mode():
    # The outer optimality function contains another implicit solve: the engine's own jvp
    # rule then nests torch.func.jvp legitimately, which must not be refused.
    def inner(lam):
        return implicit_w(lam)

    def outer_F(z, lam):
        return z - 2.0 * inner(lam)

    def outer(lam):
        return it.custom_root(outer_F, solve="lu")(lambda init, lam: 2.0 * inner(lam))(None, lam)

    t = torch.randn(4, generator=gen(48), dtype=DT)
    _, got = torch.func.jvp(outer, (LAM,), (t,))
    _, ref = torch.func.jvp(lambda l: 2.0 * ridge_closed(l, X, Y), (LAM,), (t,))
    close(got, ref)


def test_third_derivative_by_autograd():
    lam = LAM.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_implicit(lam), lam, create_graph=True)
    (h,) = torch.autograd.grad(g[0], lam, create_graph=True)
    (t,) = torch.autograd.grad(h[1], lam)
    lam_ref = LAM.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_closed(lam_ref), lam_ref, create_graph=True)
    (h,) = torch.autograd.grad(g[0], lam_ref, create_graph=True)
    (t_ref,) = torch.autograd.grad(h[1], lam_ref)
    close(t, t_ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("solve", ["cg", "gmres", "lu", "auto"])
def test_vmap_over_params_and_vmap_of_grad(solve):
    lams = 0.5 + torch.rand(6, 4, generator=gen(45), dtype=DT)
    s = tight(solve, maxiter=40) if solve in ("cg", "gmres") else solve
    got = torch.func.vmap(lambda l: implicit_w(l, s))(lams)
    close(got, torch.stack([ridge_closed(l, X, Y) for l in lams]))
    got_g = torch.func.vmap(torch.func.grad(lambda l: ((XV @ implicit_w(l, s) - YV) ** 2).sum()))(
        lams
    )
    close(got_g, torch.stack([torch.func.grad(loss_closed)(l) for l in lams]))


def test_vmap_of_jacfwd():
    lams = 0.5 + torch.rand(3, 4, generator=gen(46), dtype=DT)
    got = torch.func.vmap(torch.func.jacfwd(implicit_w))(lams)
    ref = torch.stack([torch.func.jacrev(lambda t: ridge_closed(t, X, Y))(l) for l in lams])
    close(got, ref)


def test_forward_mode_ad_api():
    import torch.autograd.forward_ad as fwAD

    t = torch.randn(4, generator=gen(47), dtype=DT)
    with fwAD.dual_level():
        w = implicit_w(fwAD.make_dual(LAM, t))
        tangent = fwAD.unpack_dual(w).tangent
    close(tangent, torch.func.jvp(lambda l: ridge_closed(l, X, Y), (LAM,), (t,))[1])


def test_legacy_batched_grads_are_refused_with_a_pointer_to_torch_func():
    lam = LAM.clone().requires_grad_()
    w = implicit_w(lam)
    with pytest.raises(NotImplementedError, match=r"torch\.func\.jacrev"):
        torch.autograd.grad(w, lam, torch.eye(4, dtype=DT), is_grads_batched=True)
