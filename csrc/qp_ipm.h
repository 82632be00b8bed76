// Shared declarations of the implicit_torch::qp_ipm kernel: the iterations of the batched
// interior-point QP solver (implicit_torch.solvers.QP). The schema is defined once, in
// implicit_torch/ops/_schemas.py; the kernel's signature below must match it (the dispatcher
// checks it when Python defines it).
//
// Semantics (identical in csrc/cpu/qp_ipm_cpu.cpp and implicit_torch/ops/_qp_reference.py):
// Mehrotra's predictor-corrector primal-dual interior-point method on B problems
// min ½ xᵀQₛx + cᵀx s.t. A x = b, G x ≤ h (n variables, p equalities, m ≥ 1 inequalities,
// k = p + m, N = n + k), given each problem's matrices as QP forms them once (float32 or
// float64, one dtype and device):
//   K    (B, N, N)         the symmetric KKT matrix [[Qₛ, Cᵀ], [C, 0]], C = [A; G]
//   q    (B, N)            [c; −b; −h]
//   M1   (B, n, n + k)     −[Qₛ⁻¹, Qₛ⁻¹ Cᵀ]
//   W    (B, k, k)         C Qₛ⁻¹ Cᵀ (its lower triangle is read)
//   T    (B, k, n + k + m) [−C Qₛ⁻¹, I, C Qₛ⁻¹ Gᵀ]: the direction is D0 + y T
//   nGt  (B, n, m)         −Gᵀ
// The iterate is u = [x; ν; λ; s] (length N + m). Per problem: CVXOPT's starting point; then,
// while the best error so far exceeds limit = tol (1 + ‖q‖∞), fewer than `maxiter` steps were
// taken and the best error improved within the last `patience` steps: one predictor-corrector
// step (counted in iterations), the KKT error of the new iterate (the largest of |r_d|, |r_p|,
// |λ ⊙ (Gx − h)|, (Gx − h)₊), and the best iterate kept. A Cholesky factorisation of
// W + diag(0, s/λ) that fails (a pivot not positive, or NaN) stops the problem at its best
// iterate, as if it had stalled; one that fails at the start gives z = NaN, error = NaN.
// Outputs: z (B, N) = the best iterate's [x; ν; λ], iterations (B,) int64, error (B,) its KKT
// error, converged (B,) bool = error ≤ limit, or stalled with error ≤ acceptable_tol (1 +
// ‖q‖∞). NaN errors propagate (never "converged").
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <tuple>

#include "py_format.h"

namespace implicit_torch {

// Argument checks; implicit_torch/ops/_qp_reference.py (check_qp_ipm_inputs) applies the same
// rules, in the same order, with the same messages (values written as Python writes them:
// py_format.h) for the fake kernel and the pure-PyTorch kernel.
inline void check_qp_ipm_input(const at::Tensor& t, const char* name, const at::Tensor& K,
                               std::initializer_list<int64_t> shape) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "qp_ipm: ", name,
                   " must be a dense (strided) tensor, got ", py::layout(t.layout()));
  TORCH_CHECK_TYPE(t.scalar_type() == K.scalar_type(), "qp_ipm: ", name, " has dtype ",
                   py::dtype(t.scalar_type()), " but K has ", py::dtype(K.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == K.device(), "qp_ipm: ", name, " is on ", py::device(t.device()),
                    " but K is on ", py::device(K.device()));
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), "qp_ipm: ", name, " must have shape ",
                    py::shape(shape), ", got ", py::shape(t.sizes()));
}

inline void check_qp_ipm_tolerance(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, "qp_ipm: ", name,
                    " must be finite and non-negative, got ", py::real(value));
}

inline void check_qp_ipm_inputs(const at::Tensor& K, const at::Tensor& q, const at::Tensor& M1,
                                const at::Tensor& W, const at::Tensor& T, const at::Tensor& nGt,
                                int64_t maxiter, double tol, double acceptable_tol,
                                int64_t patience) {
  TORCH_CHECK_TYPE(K.scalar_type() == at::kFloat || K.scalar_type() == at::kDouble,
                   "qp_ipm: the data must be float32 or float64, got ", py::dtype(K.scalar_type()));
  TORCH_CHECK_VALUE(K.dim() == 3 && M1.dim() == 3 && W.dim() == 3 && nGt.dim() == 3,
                    "qp_ipm: K, M1, W and nGt must be batched matrices (3-d)");
  const int64_t B = K.size(0), N = K.size(1), n = M1.size(1), k = W.size(1), m = nGt.size(2);
  const int64_t p = k - m;
  TORCH_CHECK_VALUE(m > 0 && p >= 0 && N == n + k, "qp_ipm: inconsistent sizes: N=", N,
                    ", n=", n, ", k=", k, ", m=", m);
  check_qp_ipm_input(K, "K", K, {B, N, N});
  check_qp_ipm_input(q, "q", K, {B, N});
  check_qp_ipm_input(M1, "M1", K, {B, n, n + k});
  check_qp_ipm_input(W, "W", K, {B, k, k});
  check_qp_ipm_input(T, "T", K, {B, k, n + k + m});
  check_qp_ipm_input(nGt, "nGt", K, {B, n, m});
  TORCH_CHECK_VALUE(maxiter >= 0, "qp_ipm: maxiter must be non-negative, got ", maxiter);
  TORCH_CHECK_VALUE(patience >= 1, "qp_ipm: patience must be at least 1, got ", patience);
  check_qp_ipm_tolerance(tol, "tol");
  check_qp_ipm_tolerance(acceptable_tol, "acceptable_tol");
}

// The CPU kernel (csrc/cpu/qp_ipm_cpu.cpp): problems in parallel, each solved to its own stop.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qp_ipm_cpu(
    const at::Tensor& K, const at::Tensor& q, const at::Tensor& M1, const at::Tensor& W,
    const at::Tensor& T, const at::Tensor& nGt, int64_t maxiter, double tol,
    double acceptable_tol, int64_t patience);

}  // namespace implicit_torch
