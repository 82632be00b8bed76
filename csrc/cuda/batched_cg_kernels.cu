// CUDA kernels of implicit_torch::batched_cg: every system of the batch is solved in one launch,
// each with its own step sizes and its own early exit (semantics in csrc/batched_cg.h).
//
// * n <= 32: one warp per system (4 systems per block). Lane j owns x[j], r[j], p[j] and keeps
//   column j of A in registers (= row j, A being symmetric); A p is a sum of register columns
//   times p[k] broadcast by __shfl_sync; dot products are xor-butterfly warp reductions, whose
//   result is bitwise identical in every lane, so the loop's control flow stays warp-uniform.
// * n > 32: one thread block per system. A is copied once to shared memory when it fits (up to
//   the opt-in limit, 227 KB on Hopper) and streamed from global memory otherwise; the CG
//   vectors live in shared memory (or, for very large n, in a global workspace). The matvec
//   reads A row by row with consecutive threads on consecutive columns (coalesced global loads,
//   conflict-free shared loads, 16-byte vector loads when aligned), threads split into `slices`
//   that share the k sum when n is small. Block reductions: __shfl_down_sync within warps, then
//   one warp over the warp partials; the result is broadcast through shared memory, so the
//   whole block leaves the loop together when its system stops.
//
// Only CUDA runtime headers here (no torch): nvcc can compile this file alone.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "batched_cg_kernels.cuh"

namespace implicit_torch {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;   // warp-per-system kernel: systems per block
constexpr int kMaxThreads = 1024;   // block-per-system kernel
constexpr int kMaxReduceValues = 4;  // values summed by one block reduction, at most
// Shared scalars of block reductions: per-warp partials, then the broadcast slots, kept apart so
// that a reduction's partials never overwrite the previous reduction's result while a slow thread
// may still be reading it. A multiple of 4 (16-byte alignment of what follows).
constexpr int kBroadcastSlot = kWarpSize * kMaxReduceValues;
constexpr int kReduceSlots = kBroadcastSlot + 32;

// max(rtol * ||b||, atol), NaN when rtol * ||b|| is NaN (as torch.clamp in the reference).
__device__ __forceinline__ double stop_threshold(double bnorm, double rtol, double atol) {
  const double scaled = rtol * bnorm;
  return isnan(scaled) ? scaled : fmax(scaled, atol);
}

// "Stopped": ||r|| <= threshold. False for NaN, so a NaN residual is never taken as converged.
template <typename T>
__device__ __forceinline__ bool within(T squared_norm, double threshold) {
  return sqrt(static_cast<double>(squared_norm)) <= threshold;
}

// ------------------------------------------------------------------------------------------
// Warp per system (n <= 32)
// ------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T warp_allreduce(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// (A v)[lane] = sum_k A[k][lane] v[k]; lanes >= n hold zero columns and v = 0.
template <typename T, int NMAX>
__device__ __forceinline__ T warp_symv(const T (&column)[NMAX], T v) {
  T acc = T(0);
#pragma unroll
  for (int k = 0; k < NMAX; ++k) acc += column[k] * __shfl_sync(kFullMask, v, k);
  return acc;
}

template <typename T, int NMAX>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    cg_warp_kernel(const BatchedCGArgs<T> a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t sys = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (sys >= a.batch) return;  // the whole warp leaves together
  const int n = static_cast<int>(a.n);
  const bool mine = lane < n;
  const T* __restrict__ A = a.A + sys * n * n;
  const int64_t base = sys * n;

  T column[NMAX];
#pragma unroll
  for (int k = 0; k < NMAX; ++k) column[k] = (mine && k < n) ? A[k * n + lane] : T(0);
  const T bj = mine ? a.b[base + lane] : T(0);
  T xj = (mine && a.x0 != nullptr) ? a.x0[base + lane] : T(0);
  T rj = bj;
  if (a.x0 != nullptr) rj = bj - warp_symv(column, xj);
  const double threshold = stop_threshold(sqrt(static_cast<double>(warp_allreduce(bj * bj))),
                                          a.rtol, a.atol);

  T dj = mine ? T(1) : T(0);  // Jacobi: 1 / A[j][j]
  bool ok = true;
  if (a.jacobi) {
    const T d = mine ? A[lane * n + lane] : T(1);
    ok = __all_sync(kFullMask, d > T(0) && isfinite(d));
    dj = (mine && d > T(0)) ? T(1) / d : T(0);
  }
  T pj = dj * rj;
  T rz = warp_allreduce(rj * pj);
  T rr = warp_allreduce(rj * rj);
  bool active = ok && !within(rr, threshold);

  int64_t it = 0;
  while (active && it < a.maxiter) {
    const T Apj = warp_symv(column, pj);
    const T pAp = warp_allreduce(pj * Apj);
    if (!(pAp > T(0))) break;  // not positive definite, or NaN: stop, unconverged
    const T alpha = rz / pAp;
    xj += alpha * pj;
    rj -= alpha * Apj;
    ++it;
    rr = warp_allreduce(rj * rj);
    if (within(rr, threshold)) break;
    const T zj = dj * rj;
    const T rz_new = a.jacobi ? warp_allreduce(rj * zj) : rr;
    const T beta = rz_new / rz;
    rz = rz_new;
    pj = zj + beta * pj;
  }

  const T res = bj - warp_symv(column, xj);  // the true residual of the returned x
  const T res2 = warp_allreduce(res * res);
  if (mine) a.x[base + lane] = xj;
  if (lane == 0) {
    a.iterations[sys] = it;
    a.residual_norm[sys] = sqrt(res2);
  }
}

// ------------------------------------------------------------------------------------------
// Block per system (n > 32)
// ------------------------------------------------------------------------------------------

// V consecutive elements at p (16-byte aligned when V > 1).
template <typename T, int V>
struct Vec {
  __device__ __forceinline__ static void load(const T* p, T (&out)[V]) {
#pragma unroll
    for (int q = 0; q < V; ++q) out[q] = p[q];
  }
  __device__ __forceinline__ static void store(T* p, const T (&in)[V]) {
#pragma unroll
    for (int q = 0; q < V; ++q) p[q] = in[q];
  }
};

template <>
struct Vec<float, 4> {
  __device__ __forceinline__ static void load(const float* p, float (&out)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
  __device__ __forceinline__ static void store(float* p, const float (&in)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  }
};

template <>
struct Vec<double, 2> {
  __device__ __forceinline__ static void load(const double* p, double (&out)[2]) {
    const double2 v = *reinterpret_cast<const double2*>(p);
    out[0] = v.x;
    out[1] = v.y;
  }
  __device__ __forceinline__ static void store(double* p, const double (&in)[2]) {
    *reinterpret_cast<double2*>(p) = make_double2(in[0], in[1]);
  }
};

// Sums v[0..NV) over the block; every thread gets the totals. blockDim.x is a multiple of 32.
// `red` holds kReduceSlots shared scalars. Contains two __syncthreads: call it from all threads.
template <typename T, int NV>
__device__ __forceinline__ void block_allreduce(T (&v)[NV], T* red) {
  static_assert(NV <= kMaxReduceValues, "too many values for one block reduction");
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
      v[i] += __shfl_down_sync(kFullMask, v[i], offset);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) red[warp * NV + i] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      T t = lane < num_warps ? red[lane * NV + i] : T(0);
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        t += __shfl_down_sync(kFullMask, t, offset);
      }
      if (lane == 0) red[kBroadcastSlot + i] = t;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = red[kBroadcastSlot + i];
}

// Av = M v for the symmetric n x n matrix M (shared or global memory): Av[c] = sum_k M[k][c] v[k].
// Thread (g, s) = (tid % G, tid / G) sums rows k = s, s + S, ... for columns g*V .. g*V+V-1;
// with S > 1 the slices' partial sums meet in `partial` (S x n). v must be visible to the whole
// block on entry; Av is complete once the caller has synchronised (block_allreduce does).
// Returns this thread's share of v . Av. Call from all threads.
template <typename T, int V>
__device__ __forceinline__ T block_symv(const T* __restrict__ M, const T* v, T* Av, T* partial,
                                        int n, int slices) {
  const int tid = threadIdx.x, num_threads = blockDim.x;
  const int groups = n / V;
  T vAv = T(0);
  if (slices == 1) {
    for (int g = tid; g < groups; g += num_threads) {
      T acc[V];
#pragma unroll
      for (int q = 0; q < V; ++q) acc[q] = T(0);
      const T* col = M + g * V;
#pragma unroll 4
      for (int k = 0; k < n; ++k) {
        T m[V];
        Vec<T, V>::load(col + static_cast<int64_t>(k) * n, m);
        const T vk = v[k];
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] += m[q] * vk;
      }
#pragma unroll
      for (int q = 0; q < V; ++q) {
        Av[g * V + q] = acc[q];
        vAv += v[g * V + q] * acc[q];
      }
    }
  } else {
    const int g = tid % groups, s = tid / groups;
    if (s < slices) {
      T acc[V];
#pragma unroll
      for (int q = 0; q < V; ++q) acc[q] = T(0);
      const T* col = M + g * V;
#pragma unroll 4
      for (int k = s; k < n; k += slices) {
        T m[V];
        Vec<T, V>::load(col + static_cast<int64_t>(k) * n, m);
        const T vk = v[k];
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] += m[q] * vk;
      }
#pragma unroll
      for (int q = 0; q < V; ++q) partial[s * n + g * V + q] = acc[q];
    }
    __syncthreads();
    for (int j = tid; j < n; j += num_threads) {
      T sum = T(0);
      for (int s2 = 0; s2 < slices; ++s2) sum += partial[s2 * n + j];
      Av[j] = sum;
      vAv += v[j] * sum;
    }
  }
  return vAv;
}

__host__ __device__ inline int64_t vector_elems(int64_t n, int slices) {
  return (5 + (slices > 1 ? slices : 0)) * n;  // x, r, p, Ap, dinv (+ slice partials)
}

template <typename T, int V, bool MATRIX_IN_SMEM>
__global__ void __launch_bounds__(kMaxThreads)
    cg_block_kernel(const BatchedCGArgs<T> a, const int slices, const bool vectors_in_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t sys = blockIdx.x;
  const int n = static_cast<int>(a.n);
  const int tid = threadIdx.x, num_threads = blockDim.x;
  const int64_t base = sys * n;
  const T* __restrict__ A = a.A + sys * static_cast<int64_t>(n) * n;
  const T* __restrict__ b = a.b + base;

  // Shared layout: reduction slots | matrix (n*n, when in smem) | vectors (when in smem). The
  // offsets are multiples of 16 bytes (kReduceSlots * sizeof(T); n*n*sizeof(T) with n % V == 0).
  T* red = smem;
  T* after_matrix = smem + kReduceSlots + (MATRIX_IN_SMEM ? n * n : 0);
  T* vec = vectors_in_smem ? after_matrix : a.workspace + sys * vector_elems(n, slices);
  T* x = vec;
  T* r = vec + n;
  T* p = vec + 2 * n;
  T* Ap = vec + 3 * n;
  T* dinv = vec + 4 * n;
  T* partial = vec + 5 * n;

  const T* M = A;
  if (MATRIX_IN_SMEM) {
    T* As = smem + kReduceSlots;
    const int chunks = n * n / V;
    for (int i = tid; i < chunks; i += num_threads) {
      T m[V];
      Vec<T, V>::load(A + i * V, m);
      Vec<T, V>::store(As + i * V, m);
    }
    M = As;
  }
  for (int j = tid; j < n; j += num_threads) {
    x[j] = a.x0 != nullptr ? a.x0[base + j] : T(0);
  }
  __syncthreads();  // the matrix and x are visible to the block
  if (a.x0 != nullptr) {
    block_symv<T, V>(M, x, Ap, partial, n, slices);
    __syncthreads();
  }

  // r = b - A x0, z = D^-1 r, p = z; one reduction for ||b||^2, bad diagonals, r'z and r'r.
  T sums[4] = {T(0), T(0), T(0), T(0)};
  for (int j = tid; j < n; j += num_threads) {
    const T bj = b[j];
    const T rj = a.x0 != nullptr ? bj - Ap[j] : bj;
    T dj = T(1);
    if (a.jacobi) {
      const T d = M[static_cast<int64_t>(j) * n + j];
      sums[1] += (d > T(0) && isfinite(d)) ? T(0) : T(1);
      dj = d > T(0) ? T(1) / d : T(0);
      dinv[j] = dj;
    }
    r[j] = rj;
    p[j] = dj * rj;
    sums[0] += bj * bj;
    sums[2] += rj * dj * rj;
    sums[3] += rj * rj;
  }
  block_allreduce<T, 4>(sums, red);  // also makes p visible
  const double threshold = stop_threshold(sqrt(static_cast<double>(sums[0])), a.rtol, a.atol);
  T rz = sums[2];
  bool active = sums[1] == T(0) && !within(sums[3], threshold);

  int64_t it = 0;
  while (active && it < a.maxiter) {
    T pAp[1] = {block_symv<T, V>(M, p, Ap, partial, n, slices)};
    block_allreduce<T, 1>(pAp, red);
    if (!(pAp[0] > T(0))) break;  // not positive definite, or NaN: stop, unconverged
    const T alpha = rz / pAp[0];
    T rs[2] = {T(0), T(0)};  // r'r, r'D^-1 r
    for (int j = tid; j < n; j += num_threads) {
      x[j] += alpha * p[j];
      const T rj = r[j] - alpha * Ap[j];
      r[j] = rj;
      rs[0] += rj * rj;
      if (a.jacobi) rs[1] += rj * dinv[j] * rj;
    }
    ++it;
    block_allreduce<T, 2>(rs, red);
    if (within(rs[0], threshold)) break;
    const T rz_new = a.jacobi ? rs[1] : rs[0];
    const T beta = rz_new / rz;
    rz = rz_new;
    for (int j = tid; j < n; j += num_threads) {
      const T zj = a.jacobi ? dinv[j] * r[j] : r[j];
      p[j] = zj + beta * p[j];
    }
    __syncthreads();  // p is visible before the next matvec
  }

  // The true residual of the returned x.
  __syncthreads();
  block_symv<T, V>(M, x, Ap, partial, n, slices);
  __syncthreads();
  T res[1] = {T(0)};
  for (int j = tid; j < n; j += num_threads) {
    const T e = b[j] - Ap[j];
    res[0] += e * e;
    a.x[base + j] = x[j];
  }
  block_allreduce<T, 1>(res, red);
  if (tid == 0) {
    a.iterations[sys] = it;
    a.residual_norm[sys] = sqrt(res[0]);
  }
}

template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);  // elements per 16-byte load

template <typename T, int V>
cudaError_t launch_block(const BatchedCGArgs<T>& a, const BatchedCGPlan& plan,
                         cudaStream_t stream) {
  void (*kernel)(const BatchedCGArgs<T>, int, bool) =
      plan.matrix_in_smem ? cg_block_kernel<T, V, true> : cg_block_kernel<T, V, false>;
  if (plan.smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(a.batch), plan.threads, plan.smem_bytes, stream>>>(
      a, plan.slices, plan.vectors_in_smem);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t plan_batched_cg(int64_t batch, int64_t n, bool aligned16, int device,
                            BatchedCGPlan* plan) {
  *plan = BatchedCGPlan{BatchedCGKind::kEmpty, 0, 1, 1, false, false, 0, 0};
  if (batch < 0 || n < 0 || n > INT_MAX) return cudaErrorInvalidValue;
  if (batch == 0 || n == 0) return cudaSuccess;
  if (n <= kWarpSize) {
    if ((batch + kWarpsPerBlock - 1) / kWarpsPerBlock > INT_MAX) return cudaErrorInvalidValue;
    plan->kind = BatchedCGKind::kWarpPerSystem;
    plan->threads = kWarpsPerBlock * kWarpSize;
    return cudaSuccess;
  }
  if (batch > INT_MAX) return cudaErrorInvalidValue;
  plan->kind = BatchedCGKind::kBlockPerSystem;
  const int64_t vw = kVecWidth<T>;
  plan->vec = (aligned16 && n % vw == 0) ? static_cast<int>(vw) : 1;
  const int64_t threads = std::min<int64_t>(kMaxThreads, std::max<int64_t>(64, (n + 31) / 32 * 32));
  const int64_t groups = n / plan->vec;
  plan->threads = static_cast<int>(threads);
  plan->slices = static_cast<int>(std::max<int64_t>(1, threads / groups));

  int max_smem = 0;
  cudaError_t err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                           device);
  if (err != cudaSuccess) return err;
  const size_t limit = static_cast<size_t>(max_smem);
  const size_t reduce_bytes = kReduceSlots * sizeof(T);
  const size_t vector_bytes = static_cast<size_t>(vector_elems(n, plan->slices)) * sizeof(T);
  const size_t matrix_bytes = static_cast<size_t>(n) * static_cast<size_t>(n) * sizeof(T);
  plan->vectors_in_smem = reduce_bytes + vector_bytes <= limit;
  plan->matrix_in_smem = plan->vectors_in_smem && reduce_bytes + vector_bytes + matrix_bytes <= limit;
  plan->smem_bytes = reduce_bytes + (plan->vectors_in_smem ? vector_bytes : 0) +
                     (plan->matrix_in_smem ? matrix_bytes : 0);
  plan->workspace_elems = plan->vectors_in_smem ? 0 : batch * vector_elems(n, plan->slices);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_batched_cg(const BatchedCGArgs<T>& a, const BatchedCGPlan& plan,
                              cudaStream_t stream) {
  switch (plan.kind) {
    case BatchedCGKind::kEmpty:
      return cudaSuccess;
    case BatchedCGKind::kWarpPerSystem: {
      const unsigned blocks = static_cast<unsigned>((a.batch + kWarpsPerBlock - 1) / kWarpsPerBlock);
      if (a.n <= 8) {
        cg_warp_kernel<T, 8><<<blocks, plan.threads, 0, stream>>>(a);
      } else if (a.n <= 16) {
        cg_warp_kernel<T, 16><<<blocks, plan.threads, 0, stream>>>(a);
      } else {
        cg_warp_kernel<T, 32><<<blocks, plan.threads, 0, stream>>>(a);
      }
      return cudaGetLastError();
    }
    case BatchedCGKind::kBlockPerSystem:
      if (a.workspace == nullptr && !plan.vectors_in_smem) return cudaErrorInvalidValue;
      return plan.vec == 1 ? launch_block<T, 1>(a, plan, stream)
                           : launch_block<T, kVecWidth<T>>(a, plan, stream);
  }
  return cudaErrorInvalidValue;
}

template cudaError_t plan_batched_cg<float>(int64_t, int64_t, bool, int, BatchedCGPlan*);
template cudaError_t plan_batched_cg<double>(int64_t, int64_t, bool, int, BatchedCGPlan*);
template cudaError_t launch_batched_cg<float>(const BatchedCGArgs<float>&, const BatchedCGPlan&,
                                              cudaStream_t);
template cudaError_t launch_batched_cg<double>(const BatchedCGArgs<double>&,
                                               const BatchedCGPlan&, cudaStream_t);

}  // namespace cuda
}  // namespace implicit_torch
