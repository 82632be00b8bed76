// The CPU solve of implicit_torch::batched_cg, one system at a time (semantics in batched_cg.h).
//
// This file is included twice by batched_cg_cpu.cpp, inside two namespaces: once compiled for
// the baseline instruction set and once under `#pragma GCC target("avx2")`, chosen at run time.
// So it has no include guard, includes nothing and uses nothing but plain loops and the
// declarations batched_cg_cpu.cpp makes before including it (<cmath>, <cstdint>, CGOptions,
// kUpperMinBytes).
//
// The inner loops are unit-stride and free of reductions: A p is a sum of rows of A scaled by
// p[k] (equal to A p because A is symmetric, and it keeps each row contiguous), so -O3
// vectorises them without -ffast-math. The O(n) dot products accumulate in double with four
// partial sums.

// y = A v for a symmetric row-major n x n matrix A: y = sum_k A[k, :] v[k], four rows at a time
// (four multiply-adds per load and store of y).
template <typename T>
inline void symv_full(const T* __restrict A, const T* __restrict v, T* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = T(0);
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const T* __restrict a0 = A + k * n;
    const T* __restrict a1 = a0 + n;
    const T* __restrict a2 = a1 + n;
    const T* __restrict a3 = a2 + n;
    const T v0 = v[k], v1 = v[k + 1], v2 = v[k + 2], v3 = v[k + 3];
    for (int64_t j = 0; j < n; ++j) {
      y[j] += a0[j] * v0 + a1[j] * v1 + a2[j] * v2 + a3[j] * v3;
    }
  }
  for (; k < n; ++k) {
    const T* __restrict a0 = A + k * n;
    const T v0 = v[k];
    for (int64_t j = 0; j < n; ++j) y[j] += a0[j] * v0;
  }
}

// y = A v reading the upper triangle of A only: row k adds A[k][j] v[k] to y[j] and
// A[k][j] v[j] to y[k] for j > k. Half the memory traffic of symv_full, for matrices too large
// to stay in cache, where memory bandwidth bounds the solve. `omp simd reduction` lets the
// compiler vectorise the row's dot product without -ffast-math.
template <typename T>
inline void symv_upper(const T* __restrict A, const T* __restrict v, T* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = T(0);
  for (int64_t k = 0; k < n; ++k) {
    const T* __restrict row = A + k * n;
    const T vk = v[k];
    T s = row[k] * vk;
#pragma omp simd reduction(+ : s)
    for (int64_t j = k + 1; j < n; ++j) {
      y[j] += row[j] * vk;
      s += row[j] * v[j];
    }
    y[k] += s;
  }
}

template <typename T>
inline void symv(const T* __restrict A, const T* __restrict v, T* __restrict y, int64_t n) {
  if (n * n * int64_t(sizeof(T)) >= kUpperMinBytes) {
    symv_upper(A, v, y, n);
  } else {
    symv_full(A, v, y, n);
  }
}

// sum_j a[j] b[j] in double, with four independent partial sums (no serial dependency chain).
template <typename T>
inline double dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += double(a[j]) * double(b[j]);
    s1 += double(a[j + 1]) * double(b[j + 1]);
    s2 += double(a[j + 2]) * double(b[j + 2]);
    s3 += double(a[j + 3]) * double(b[j + 3]);
  }
  for (; j < n; ++j) s0 += double(a[j]) * double(b[j]);
  return (s0 + s1) + (s2 + s3);
}

// Solves one system. `work` holds 5 n scalars (r, z, p, Ap, dinv).
template <typename T>
void solve_system(const T* __restrict A, const T* __restrict b, const T* __restrict x0,
                  T* __restrict x, T* __restrict work, int64_t n, const CGOptions& opt,
                  int64_t* iterations, T* residual_norm) {
  T* __restrict r = work;
  T* __restrict z = work + n;
  T* __restrict p = work + 2 * n;
  T* __restrict Ap = work + 3 * n;
  T* __restrict dinv = work + 4 * n;

  if (x0 != nullptr) {
    for (int64_t j = 0; j < n; ++j) x[j] = x0[j];
    symv(A, x, Ap, n);
    for (int64_t j = 0; j < n; ++j) r[j] = b[j] - Ap[j];
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = T(0);
    for (int64_t j = 0; j < n; ++j) r[j] = b[j];
  }
  // NaN propagates into the threshold (as torch.clamp does in the reference): a NaN threshold
  // never reads as converged.
  const double scaled = opt.rtol * std::sqrt(dot(b, b, n));
  const double threshold = std::isnan(scaled) ? scaled : (scaled > opt.atol ? scaled : opt.atol);

  bool ok = true;
  if (opt.jacobi) {
    for (int64_t j = 0; j < n; ++j) {
      const T d = A[j * n + j];
      ok = ok && d > T(0) && std::isfinite(d);
      dinv[j] = d > T(0) ? T(1) / d : T(0);
      z[j] = dinv[j] * r[j];
    }
  }
  const T* __restrict zr = opt.jacobi ? z : r;  // the preconditioned residual
  for (int64_t j = 0; j < n; ++j) p[j] = zr[j];
  double rz = dot(r, zr, n);
  // !(norm <= threshold) rather than norm > threshold: a NaN residual keeps the system going,
  // and its NaN curvature then stops it, unconverged.
  bool active = ok && !(std::sqrt(dot(r, r, n)) <= threshold);

  int64_t it = 0;
  while (active && it < opt.maxiter) {
    symv(A, p, Ap, n);
    const double pAp = dot(p, Ap, n);
    if (!(pAp > 0)) break;  // not positive definite (or NaN): stop, unconverged
    const T alpha = T(rz / pAp);
    for (int64_t j = 0; j < n; ++j) {
      x[j] += alpha * p[j];
      r[j] -= alpha * Ap[j];
    }
    ++it;
    const double rr = dot(r, r, n);
    if (std::sqrt(rr) <= threshold) break;
    double rz_new = rr;
    if (opt.jacobi) {
      for (int64_t j = 0; j < n; ++j) z[j] = dinv[j] * r[j];
      rz_new = dot(r, z, n);
    }
    const T beta = T(rz_new / rz);
    rz = rz_new;
    for (int64_t j = 0; j < n; ++j) p[j] = zr[j] + beta * p[j];
  }

  // The true residual of the returned x (not the recurrence, which drifts in float32).
  symv(A, x, Ap, n);
  for (int64_t j = 0; j < n; ++j) r[j] = b[j] - Ap[j];
  *iterations = it;
  *residual_norm = T(std::sqrt(dot(r, r, n)));
}

// Solves systems [begin, end) of contiguous (B, n, n) / (B, n) arrays.
template <typename T>
void solve_range(const T* A, const T* b, const T* x0, T* x, int64_t* iterations,
                 T* residual_norm, T* work, int64_t n, const CGOptions& opt, int64_t begin,
                 int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    solve_system<T>(A + i * n * n, b + i * n, x0 == nullptr ? nullptr : x0 + i * n, x + i * n,
                    work, n, opt, iterations + i, residual_norm + i);
  }
}
