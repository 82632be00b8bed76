// CPU kernel of implicit_torch::batched_cg: at::parallel_for over the batch; each system is
// solved by plain conjugate gradient with its own stopping test (batched_cg_cpu_kernel.h;
// semantics in batched_cg.h).
//
// Speed comes from locality rather than from one big matrix product per iteration: a thread
// keeps one system's matrix in its caches for the whole solve, instead of streaming all B
// matrices through memory once per iteration.
//
// The build uses no -march flag (the binary must run on any x86-64 or aarch64 machine). On
// x86-64 with GCC or Clang the solve is compiled a second time for AVX2 (function-level target
// pragma) and that copy runs when the CPU supports it: twice the SIMD width of the SSE2
// baseline. No fused multiply-add is generated (ISO C++ mode keeps -ffp-contract=off), and
// both copies perform the same operations in the same order, so they give the same results.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "batched_cg.h"
#include "registry.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(IMPLICIT_TORCH_NO_AVX2)
#define IMPLICIT_TORCH_AVX2_DISPATCH 1
#else
#define IMPLICIT_TORCH_AVX2_DISPATCH 0
#endif

namespace implicit_torch {
namespace {

// Matrices of at least this many bytes are read by their upper triangle only (symv_upper).
#ifndef IMPLICIT_TORCH_UPPER_MIN_BYTES
#define IMPLICIT_TORCH_UPPER_MIN_BYTES (1 << 20)
#endif
constexpr int64_t kUpperMinBytes = IMPLICIT_TORCH_UPPER_MIN_BYTES;

struct CGOptions {
  double rtol, atol;
  int64_t maxiter;
  bool jacobi;
};

namespace baseline {
#include "cpu/batched_cg_cpu_kernel.h"
}  // namespace baseline

#if IMPLICIT_TORCH_AVX2_DISPATCH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif
namespace avx2 {
#include "cpu/batched_cg_cpu_kernel.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// IMPLICIT_TORCH_NO_AVX2=1 in the environment (read once) forces the baseline copy (tests).
bool use_avx2() {
  static const bool use = [] {
    const char* off = std::getenv("IMPLICIT_TORCH_NO_AVX2");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return use;
}
#endif

template <typename T>
void solve_range(const T* A, const T* b, const T* x0, T* x, int64_t* iterations,
                 T* residual_norm, T* work, int64_t n, const CGOptions& opt, int64_t begin,
                 int64_t end) {
#if IMPLICIT_TORCH_AVX2_DISPATCH
  if (use_avx2()) {
    avx2::solve_range<T>(A, b, x0, x, iterations, residual_norm, work, n, opt, begin, end);
    return;
  }
#endif
  baseline::solve_range<T>(A, b, x0, x, iterations, residual_norm, work, n, opt, begin, end);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_cg_cpu(const at::Tensor& A,
                                                              const at::Tensor& b,
                                                              const std::optional<at::Tensor>& x0,
                                                              double rtol, double atol,
                                                              int64_t maxiter, bool jacobi) {
  check_batched_cg_inputs(A, b, x0, rtol, atol, maxiter);
  TORCH_CHECK_VALUE(A.device().is_cpu(), "batched_cg: the CPU kernel got A on ", A.device());
  BatchedCGCall call = prepare_batched_cg(A, b, x0);
  if (call.empty()) return call.outputs();
  const int64_t B = call.batch, n = call.n;

  const CGOptions opt{rtol, atol, maxiter, jacobi};
  // Enough systems per task that small problems are not split into tiny tasks.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (n * n));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "batched_cg_cpu", [&] {
    const scalar_t* A_data = call.A.const_data_ptr<scalar_t>();
    const scalar_t* b_data = call.b.const_data_ptr<scalar_t>();
    const scalar_t* x0_data = call.x0.has_value() ? call.x0->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* x_data = call.x.mutable_data_ptr<scalar_t>();
    int64_t* it_data = call.iterations.mutable_data_ptr<int64_t>();
    scalar_t* res_data = call.residual_norm.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> work(5 * n);
      solve_range<scalar_t>(A_data, b_data, x0_data, x_data, it_data, res_data, work.data(), n,
                            opt, begin, end);
    });
  });
  return call.outputs();
}

TORCH_LIBRARY_IMPL(implicit_torch, CPU, m) {
  m.impl("batched_cg", &batched_cg_cpu);
  note_compiled_kernel("batched_cg", "CPU");
}

}  // namespace implicit_torch
