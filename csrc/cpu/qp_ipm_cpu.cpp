// CPU kernel of implicit_torch::qp_ipm: the iterations of the batched interior-point QP solver
// (Mehrotra predictor-corrector; implicit_torch/solvers/qp.py, class _IPM, holds the derivation).
// Inputs, outputs and semantics: csrc/qp_ipm.h; implicit_torch/ops/_qp_reference.py is the
// pure-PyTorch version it is tested against.
//
// Why a kernel: the problems a QP layer solves are small (tens of variables and constraints),
// so the batched PyTorch iteration spends most of its time dispatching ~50 tiny operations per
// iteration. Here each thread takes whole problems and runs every iteration of one problem
// with its matrices in cache, stopping that problem as soon as it is done.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "qp_ipm.h"
#include "registry.h"

namespace implicit_torch {
namespace {

// max that propagates NaN from either side (like torch.maximum / amax).
template <typename T>
inline T nan_max(T a, T b) {
  return (std::isnan(a) || a >= b) ? a : b;
}

// y += v M[:, :cols] for a row vector v (rows) and a row-major matrix M whose rows are
// `stride` apart: contiguous rows scaled and added, which -O3 vectorises.
template <typename T>
inline void add_row_times(const T* __restrict v, int64_t rows, const T* __restrict M,
                          int64_t stride, int64_t cols, T* __restrict y) {
  for (int64_t i = 0; i < rows; ++i) {
    const T vi = v[i];
    const T* __restrict row = M + i * stride;
    for (int64_t j = 0; j < cols; ++j) y[j] += vi * row[j];
  }
}

template <typename T>
struct IPMProblem {
  // One problem's inputs (see the file comment) and its sizes.
  const T *K, *q, *M1, *W, *Tm, *nGt;
  int64_t n, p, m;
  int64_t k() const { return p + m; }
  int64_t N() const { return n + p + m; }
};

// Work space of one thread, sized once for the batch's problem size.
template <typename T>
struct IPMWork {
  std::vector<T> u, best, R, P, Y, D0, du, r, L, sl, inv_lam, neg_inv_v, rc;
  explicit IPMWork(int64_t n, int64_t p, int64_t m) {
    const int64_t k = p + m, N = n + k;
    u.resize(N + m);
    best.resize(N + m);
    R.resize(N);
    P.resize(n + k);
    Y.resize(k);  // [Y_e; Y_i]
    D0.resize(N + m);
    du.resize(N + m);
    r.resize(k);
    L.resize(k * k);
    sl.resize(m);
    inv_lam.resize(m);
    neg_inv_v.resize(2 * m);
    rc.resize(m);
  }
};

// Lower Cholesky factor of W + diag(0 (p entries), d (m entries)) into L (k x k, row-major,
// lower triangle). False if a pivot is not positive (or NaN).
template <typename T>
bool cholesky(const T* __restrict W, const T* __restrict d, int64_t p, int64_t k,
              T* __restrict L) {
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) L[i * k + j] = W[i * k + j];
    if (i >= p) L[i * k + i] += d[i - p];
  }
  for (int64_t j = 0; j < k; ++j) {
    T* __restrict Lj = L + j * k;
    T pivot = Lj[j];
    for (int64_t t = 0; t < j; ++t) pivot -= Lj[t] * Lj[t];
    if (!(pivot > T(0))) return false;
    const T diag = std::sqrt(pivot);
    Lj[j] = diag;
    const T inv = T(1) / diag;
    for (int64_t i = j + 1; i < k; ++i) {
      T* __restrict Li = L + i * k;
      T s = Li[j];
      for (int64_t t = 0; t < j; ++t) s -= Li[t] * Lj[t];
      Li[j] = s * inv;
    }
  }
  return true;
}

// Solve (L Lᵀ) y = r in place (r becomes y).
template <typename T>
void cholesky_solve(const T* __restrict L, int64_t k, T* __restrict r) {
  for (int64_t i = 0; i < k; ++i) {
    T s = r[i];
    for (int64_t t = 0; t < i; ++t) s -= L[i * k + t] * r[t];
    r[i] = s / L[i * k + i];
  }
  for (int64_t i = k - 1; i >= 0; --i) {
    T s = r[i];
    for (int64_t t = i + 1; t < k; ++t) s -= L[t * k + i] * r[t];
    r[i] = s / L[i * k + i];
  }
}

// R = u[:N] K + q (= [r_d; r_p; Gx − h]) and the KKT error of u: the largest of |r_d|, |r_p|,
// |λ ⊙ (Gx − h)| and (Gx − h)₊.
template <typename T>
T residual(const IPMProblem<T>& P, const T* u, T* R) {
  const int64_t N = P.N(), kp = P.n + P.p;
  for (int64_t j = 0; j < N; ++j) R[j] = P.q[j];
  add_row_times(u, N, P.K, N, N, R);
  T error = T(0);
  for (int64_t j = 0; j < kp; ++j) error = nan_max(error, std::abs(R[j]));
  for (int64_t j = kp; j < N; ++j) {
    error = nan_max(error, std::abs(u[j] * R[j]));
    error = nan_max(error, R[j]);
  }
  return error;
}

// The search direction du = D0 + y T, where y solves the reduced system with right-hand side
// [Y_e; Y_i − rc / λ] (see _IPM.step).
template <typename T>
void direction(const IPMProblem<T>& P, IPMWork<T>& w, const T* rc, T* du) {
  const int64_t n = P.n, p = P.p, m = P.m, k = P.k();
  for (int64_t j = 0; j < p; ++j) w.r[j] = w.Y[j];
  for (int64_t j = 0; j < m; ++j) w.r[p + j] = w.Y[p + j] - rc[j] * w.inv_lam[j];
  cholesky_solve(w.L.data(), k, w.r.data());
  const int64_t len = n + k + m;
  for (int64_t j = 0; j < len; ++j) du[j] = w.D0[j];
  add_row_times(w.r.data(), k, P.Tm, len, len, du);
}

// CVXOPT's starting point into w.u: the Newton system with s/λ = 1 solved from zero, then s
// and λ shifted to be positive. False if the factorisation fails.
template <typename T>
bool start(const IPMProblem<T>& P, IPMWork<T>& w) {
  const int64_t n = P.n, p = P.p, m = P.m, k = P.k(), N = P.N();
  std::vector<T>& d = w.sl;  // ones, as the slack ratio s/λ
  std::fill(d.begin(), d.end(), T(1));
  if (!cholesky(P.W, d.data(), p, k, w.L.data())) return false;
  const T* c = P.q;
  // y solves (W + diag(0, I)) y = q[n:] + c (−Qs⁻¹Cᵀ) = −C Qs⁻¹ c − [b; h].
  for (int64_t j = 0; j < k; ++j) w.r[j] = P.q[n + j];
  for (int64_t i = 0; i < n; ++i) {
    const T ci = c[i];
    const T* row = P.M1 + i * (n + k) + n;
    for (int64_t j = 0; j < k; ++j) w.r[j] += ci * row[j];
  }
  cholesky_solve(w.L.data(), k, w.r.data());
  // x = −Qs⁻¹(c + Cᵀ y) = c (−Qs⁻¹) + y (−Qs⁻¹Cᵀ)ᵀ; the rows of T's first block are −C Qs⁻¹.
  T* x = w.u.data();
  for (int64_t j = 0; j < n; ++j) x[j] = T(0);
  for (int64_t i = 0; i < n; ++i) {
    const T ci = c[i];
    const T* row = P.M1 + i * (n + k);
    for (int64_t j = 0; j < n; ++j) x[j] += ci * row[j];
  }
  add_row_times(w.r.data(), k, P.Tm, n + k + m, n, x);
  // s0 = h − G x, with h = −q[n + p:].
  std::vector<T>& s0 = w.rc;
  for (int64_t j = 0; j < m; ++j) s0[j] = -P.q[n + p + j];
  add_row_times(x, n, P.nGt, m, m, s0.data());
  T lo = std::numeric_limits<T>::infinity(), hi = -lo;
  for (int64_t j = 0; j < m; ++j) {
    lo = std::min(lo, s0[j]);
    hi = std::max(hi, s0[j]);
  }
  const T ap = -lo, ad = hi;
  for (int64_t j = 0; j < p; ++j) w.u[n + j] = w.r[j];
  for (int64_t j = 0; j < m; ++j) {
    w.u[N + j] = ap >= T(0) ? s0[j] + T(1) + ap : s0[j];  // s
    w.u[n + p + j] = ad >= T(0) ? T(1) + ad - s0[j] : -s0[j];  // λ
  }
  return true;
}

// One predictor-corrector step of u (in w.u) from its residual R; false if the
// factorisation fails.
template <typename T>
bool step(const IPMProblem<T>& P, IPMWork<T>& w) {
  const int64_t n = P.n, p = P.p, m = P.m, k = P.k(), N = P.N(), kp = n + p;
  T* u = w.u.data();
  const T* lam = u + kp;
  const T* s = u + N;
  for (int64_t j = 0; j < m; ++j) {
    w.inv_lam[j] = T(1) / lam[j];
    w.sl[j] = s[j] * w.inv_lam[j];  // s/λ, for the factorisation
  }
  if (!cholesky(P.W, w.sl.data(), p, k, w.L.data())) return false;
  // P = r_d M1 = [−Qs⁻¹ r_d; −C Qs⁻¹ r_d].
  std::fill(w.P.begin(), w.P.end(), T(0));
  add_row_times(w.R.data(), n, P.M1, n + k, n + k, w.P.data());
  for (int64_t j = 0; j < p; ++j) w.Y[j] = w.P[n + j] + w.R[n + j];  // Y_e
  for (int64_t j = 0; j < m; ++j) w.Y[p + j] = w.P[n + p + j] + w.R[kp + j] + s[j];  // Y_i
  for (int64_t j = 0; j < n; ++j) w.D0[j] = w.P[j];
  for (int64_t j = 0; j < k; ++j) w.D0[n + j] = T(0);
  for (int64_t j = 0; j < m; ++j) w.D0[N + j] = -w.Y[p + j];
  for (int64_t j = 0; j < m; ++j) w.sl[j] = s[j] * lam[j];
  for (int64_t j = 0; j < 2 * m; ++j) w.neg_inv_v[j] = T(-1) / u[kp + j];
  T sl_sum = T(0);
  for (int64_t j = 0; j < m; ++j) sl_sum += w.sl[j];

  // Predictor (affine scaling): the largest α ≤ 1 keeping v = [λ; s] ≥ 0.
  T* du = w.du.data();
  direction(P, w, w.sl.data(), du);
  const T* dv = du + kp;
  T worst = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < 2 * m; ++j) worst = nan_max(worst, dv[j] * w.neg_inv_v[j]);
  const T alpha_aff = T(1) / nan_max(worst, T(1));
  T t_dot = T(0);
  for (int64_t j = 0; j < m; ++j) {
    t_dot += (lam[j] + alpha_aff * dv[j]) * (s[j] + alpha_aff * dv[m + j]);
  }
  T ratio = t_dot / sl_sum;
  ratio = std::isnan(ratio) ? ratio : std::min(std::max(ratio, T(0)), T(1));
  const T sigma_mu = ratio * ratio * ratio * (sl_sum / T(m));

  // Corrector: Mehrotra's second-order term and centring, 0.99 of the way to the boundary.
  for (int64_t j = 0; j < m; ++j) w.rc[j] = w.sl[j] - sigma_mu + du[N + j] * dv[j];
  direction(P, w, w.rc.data(), du);
  worst = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < 2 * m; ++j) worst = nan_max(worst, du[kp + j] * w.neg_inv_v[j]);
  const T alpha = T(0.99) / nan_max(worst, T(0.99));
  for (int64_t j = 0; j < N + m; ++j) u[j] += alpha * du[j];
  return true;
}

struct IPMOptions {
  int64_t maxiter, patience;
  double tol, acceptable_tol;
};

template <typename T>
void solve_problem(const IPMProblem<T>& P, IPMWork<T>& w, const IPMOptions& opt, T* z,
                   int64_t* iterations, T* error_out, bool* converged) {
  const int64_t N = P.N();
  T q_max = T(0);
  for (int64_t j = 0; j < N; ++j) q_max = nan_max(q_max, std::abs(P.q[j]));
  const T limit = T(opt.tol) * (T(1) + q_max);
  const T acceptable = T(opt.acceptable_tol) * (T(1) + q_max);
  T best_error = std::numeric_limits<T>::quiet_NaN();
  int64_t iters = 0, stall = 0;
  if (start(P, w)) {
    best_error = residual(P, w.u.data(), w.R.data());
    std::copy(w.u.begin(), w.u.end(), w.best.begin());
    // `best_error > limit` is false for NaN: a NaN start is not iterated.
    while (iters < opt.maxiter && best_error > limit && stall < opt.patience) {
      ++iters;
      if (!step(P, w)) {
        stall = opt.patience;  // cannot continue: stop at the best iterate
        break;
      }
      const T error = residual(P, w.u.data(), w.R.data());
      if (error < best_error) {
        best_error = error;
        std::copy(w.u.begin(), w.u.end(), w.best.begin());
        stall = 0;
      } else {
        ++stall;
      }
    }
  } else {
    std::fill(w.best.begin(), w.best.end(), std::numeric_limits<T>::quiet_NaN());
  }
  std::copy(w.best.begin(), w.best.begin() + N, z);
  *iterations = iters;
  *error_out = best_error;
  *converged = best_error <= limit || (stall >= opt.patience && best_error <= acceptable);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qp_ipm_cpu(
    const at::Tensor& K, const at::Tensor& q, const at::Tensor& M1, const at::Tensor& W,
    const at::Tensor& Tm, const at::Tensor& nGt, int64_t maxiter, double tol,
    double acceptable_tol, int64_t patience) {
  check_qp_ipm_inputs(K, q, M1, W, Tm, nGt, maxiter, tol, acceptable_tol, patience);
  TORCH_CHECK_VALUE(K.device().is_cpu(), "qp_ipm: the CPU kernel got K on ", K.device());
  const int64_t B = K.size(0), N = K.size(1), n = M1.size(1), k = W.size(1), m = nGt.size(2);
  const int64_t p = k - m;

  // Expanded (shared) data is copied once per problem: each problem then reads its own
  // contiguous block.
  const at::Tensor Kc = K.contiguous(), qc = q.contiguous(), M1c = M1.contiguous(),
                   Wc = W.contiguous(), Tc = Tm.contiguous(), nGtc = nGt.contiguous();
  at::Tensor z = at::empty({B, N}, K.options());
  at::Tensor iterations = at::empty({B}, K.options().dtype(at::kLong));
  at::Tensor error = at::empty({B}, K.options());
  at::Tensor converged = at::empty({B}, K.options().dtype(at::kBool));
  const IPMOptions opt{maxiter, patience, tol, acceptable_tol};
  // Each problem is ~10⁵ flops per iteration at n = m = 20: a few problems per task.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 12) / (N * N));
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "qp_ipm_cpu", [&] {
    using T = scalar_t;
    const T *K_d = Kc.const_data_ptr<T>(), *q_d = qc.const_data_ptr<T>(),
            *M1_d = M1c.const_data_ptr<T>(), *W_d = Wc.const_data_ptr<T>(),
            *T_d = Tc.const_data_ptr<T>(), *nGt_d = nGtc.const_data_ptr<T>();
    T* z_d = z.mutable_data_ptr<T>();
    int64_t* it_d = iterations.mutable_data_ptr<int64_t>();
    T* err_d = error.mutable_data_ptr<T>();
    bool* conv_d = converged.mutable_data_ptr<bool>();
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      IPMWork<T> work(n, p, m);
      for (int64_t b = begin; b < end; ++b) {
        const IPMProblem<T> problem{K_d + b * N * N,       q_d + b * N,
                                    M1_d + b * n * (n + k), W_d + b * k * k,
                                    T_d + b * k * (n + k + m), nGt_d + b * n * m,
                                    n, p, m};
        solve_problem(problem, work, opt, z_d + b * N, it_d + b, err_d + b, conv_d + b);
      }
    });
  });
  return {z, iterations, error, converged};
}

TORCH_LIBRARY_IMPL(implicit_torch, CPU, m) {
  m.impl("qp_ipm", &qp_ipm_cpu);
  note_compiled_kernel("qp_ipm", "CPU");
}

}  // namespace implicit_torch
