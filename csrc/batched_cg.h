// Shared declarations of the implicit_torch::batched_cg kernels (CPU and CUDA glue). The schema
// is defined once, in implicit_torch/ops/_schemas.py; the kernels' signatures below must match
// it (the dispatcher checks them when Python defines it).
//
// Semantics (identical in every kernel and in implicit_torch/ops/_reference.py):
//   x = x0 (zeros when absent), r = b - A x, z = D^-1 r with D = diag(A) under Jacobi
//   preconditioning (z = r otherwise), p = z; each iteration
//   alpha = r'z / p'Ap, x += alpha p, r -= alpha Ap, beta = r'z (new) / r'z (old), p = z + beta p.
//   System i stops when ||r_i|| <= max(rtol ||b_i||, atol) (converged), after maxiter
//   iterations, or when p'Ap is not positive (indefinite/singular matrix, NaN or Inf): it is then
//   frozen. A Jacobi diagonal that is not positive stops the system before the first iteration.
//   iterations[i] counts the updates applied; residual_norm[i] = ||b_i - A_i x_i|| of the
//   returned x, recomputed after the loop.
//   A must be symmetric (not checked): the kernels compute A p as sum_k A[k, :] p[k] (row k read
//   as column k), which keeps every inner loop contiguous, and the CPU kernel reads only the
//   upper triangle of matrices of 1 MiB or more.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "py_format.h"

namespace implicit_torch {

// Argument checks shared by the CPU and CUDA kernels; the Python wrapper and the fake kernel
// apply the same rules, in the same order, with the same messages (implicit_torch/ops/
// _reference.py: check_inputs): values are written as Python writes them (py_format.h), so the
// raw op raises the same error with and without the extension.
inline void check_batched_cg_inputs(const at::Tensor& A, const at::Tensor& b,
                                    const std::optional<at::Tensor>& x0, double rtol, double atol,
                                    int64_t maxiter) {
  auto check_layout = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.layout() == at::kStrided, "batched_cg: ", name,
                     " must be a dense (strided) tensor, got ", py::layout(t.layout()));
  };
  check_layout(A, "A");
  check_layout(b, "b");
  if (x0.has_value()) check_layout(*x0, "x0");
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
                   "batched_cg: A must be float32 or float64, got ", py::dtype(A.scalar_type()));
  TORCH_CHECK_VALUE(A.dim() == 3 && A.size(1) == A.size(2),
                    "batched_cg: A must have shape (B, n, n), got ", py::shape(A.sizes()));
  const int64_t B = A.size(0), n = A.size(1);
  auto check_vector = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == A.scalar_type(), "batched_cg: ", name, " has dtype ",
                     py::dtype(t.scalar_type()), " but A has ", py::dtype(A.scalar_type()),
                     "; they must match");
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == n, "batched_cg: ", name,
                      " must have shape (B, n) = ", py::shape({B, n}), " to match A of shape ",
                      py::shape(A.sizes()), ", got ", py::shape(t.sizes()));
    TORCH_CHECK_VALUE(t.device() == A.device(), "batched_cg: ", name, " is on ",
                      py::device(t.device()), " but A is on ", py::device(A.device()),
                      "; they must match");
  };
  check_vector(b, "b");
  if (x0.has_value()) check_vector(*x0, "x0");
  TORCH_CHECK_VALUE(std::isfinite(rtol) && rtol >= 0,
                    "batched_cg: rtol must be finite and non-negative, got ", py::real(rtol));
  TORCH_CHECK_VALUE(std::isfinite(atol) && atol >= 0,
                    "batched_cg: atol must be finite and non-negative, got ", py::real(atol));
  TORCH_CHECK_VALUE(maxiter >= 0, "batched_cg: maxiter must be non-negative, got ", maxiter);
}

// What both kernels start from: the inputs in a contiguous layout (non-contiguous and expanded,
// stride-0 inputs are copied once) and the outputs (x, iterations, residual_norm), left
// uninitialised: every kernel writes all of them. Only when there is nothing to solve (n == 0,
// where no kernel runs) are iterations and residual_norm zero-filled.
struct BatchedCGCall {
  at::Tensor A, b;
  std::optional<at::Tensor> x0;
  at::Tensor x, iterations, residual_norm;
  int64_t batch, n;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {x, iterations, residual_norm};
  }
  bool empty() const { return batch == 0 || n == 0; }
};

inline BatchedCGCall prepare_batched_cg(const at::Tensor& A, const at::Tensor& b,
                                        const std::optional<at::Tensor>& x0) {
  const int64_t B = A.size(0), n = A.size(1);
  const auto alloc = [n](at::IntArrayRef size, const at::TensorOptions& options) {
    return n == 0 ? at::zeros(size, options) : at::empty(size, options);
  };
  return BatchedCGCall{
      A.contiguous(),
      b.contiguous(),
      x0.has_value() ? std::optional<at::Tensor>(x0->contiguous()) : std::nullopt,
      at::empty({B, n}, A.options()),
      alloc({B}, A.options().dtype(at::kLong)),
      alloc({B}, A.options()),
      B,
      n,
  };
}

// The kernels (registered for the CPU and CUDA dispatch keys; the CUDA one exists in CUDA
// builds only).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_cg_cpu(const at::Tensor& A,
                                                              const at::Tensor& b,
                                                              const std::optional<at::Tensor>& x0,
                                                              double rtol, double atol,
                                                              int64_t maxiter, bool jacobi);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_cg_cuda(const at::Tensor& A,
                                                               const at::Tensor& b,
                                                               const std::optional<at::Tensor>& x0,
                                                               double rtol, double atol,
                                                               int64_t maxiter, bool jacobi);

}  // namespace implicit_torch
