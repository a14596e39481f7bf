// CUDA kernels of dispatch, combine and combine backward (dispatch backward is combine without
// weights). Includes only CUDA headers and the shared index math: `nvcc -c` compiles it alone.
//
// Geometry: a block is (tx, ty) threads; each of its ty rows is a token/slot row, its tx threads
// stride over the row's columns in chunks of N elements (one 16-byte pack when the row width,
// strides and pointers allow, else N = 1). Rows are spread over blocks (grid-stride).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Out-of-range indices are a device-side assert (the launch would need a host sync to report them
// otherwise): keep assert() on even in builds that define NDEBUG.
#ifdef NDEBUG
#undef NDEBUG
#endif
#include <cassert>
#include <cstdint>

#include "moe_ops_cuda.h"
#include "moe_ops_index.h"

namespace moe_ops {

template <>
struct Cvt<float> {
  MOE_HD static float load(float v) { return v; }
  MOE_HD static float store(float a) { return a; }
};
template <>
struct Cvt<double> {
  MOE_HD static double load(double v) { return v; }
  MOE_HD static double store(double a) { return a; }
};
template <>
struct Cvt<__half> {
  MOE_HD static float load(__half v) { return __half2float(v); }
  MOE_HD static __half store(float a) { return __float2half_rn(a); }
};
template <>
struct Cvt<__nv_bfloat16> {
  MOE_HD static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  MOE_HD static __nv_bfloat16 store(float a) { return __float2bfloat16_rn(a); }
};

}  // namespace moe_ops

namespace moe_ops_cuda {
namespace {

using moe_ops::AccOf;

constexpr int kThreads = 256;

struct Geometry {
  dim3 block;
  unsigned grid;
};

// tx: power of two covering the row's chunks (32..256); ty = rows per block.
Geometry geometry(int64_t rows, int64_t d, int n) {
  const int64_t chunks = (d + n - 1) / n;
  int tx = 32;
  while (tx < kThreads && tx < chunks) tx *= 2;
  const int ty = kThreads / tx;
  int64_t grid = (rows + ty - 1) / ty;
  if (grid > (int64_t{1} << 30)) grid = int64_t{1} << 30;
  return {dim3(tx, ty), static_cast<unsigned>(grid)};
}

template <typename in_t, typename out_t, int N, bool kVec>
__global__ void dispatch_kernel(const in_t* __restrict__ x, int64_t ldx, int64_t num_src,
                                const int64_t* __restrict__ index, int64_t slots, int64_t d,
                                out_t* __restrict__ buf, int64_t ldb) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < slots;
       i += step) {
    assert(moe_ops::in_range(index[i], num_src));
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * N; c < d; c += blockDim.x * N)
      moe_ops::dispatch_cols<in_t, out_t, N, kVec>(x, ldx, index, i, c, buf, ldb);
  }
}

template <typename in_t, typename out_t, int N, bool kVec>
__global__ void combine_kernel(const in_t* __restrict__ buf, int64_t ldb,
                               const typename AccOf<in_t>::type* __restrict__ weight,
                               const int64_t* __restrict__ row_ptr,
                               const int64_t* __restrict__ perm, int64_t num_rows, int64_t slots,
                               int64_t d, out_t* __restrict__ y, int64_t ldy) {
  using acc_t = typename AccOf<in_t>::type;
  // Every slot must land in a row: an index outside [0, num_rows) falls outside every CSR row.
  if (blockIdx.x == 0 && threadIdx.x == 0 && threadIdx.y == 0)
    assert(row_ptr[0] == 0 && row_ptr[num_rows] == slots);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < num_rows;
       r += step) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * N; c < d; c += blockDim.x * N)
      moe_ops::combine_cols<in_t, out_t, acc_t, N, kVec>(buf, ldb, weight, row_ptr, perm, r, c, y,
                                                         ldy);
  }
}

// The weight-gradient dot is reduced over the row's tx threads in shared memory in a fixed tree
// order, so it is deterministic.
template <typename T, int N, bool kVec>
__global__ void combine_backward_kernel(const T* __restrict__ grad_y, int64_t ldg,
                                        int64_t num_rows, const T* __restrict__ buf, int64_t ldb,
                                        const typename AccOf<T>::type* __restrict__ weight,
                                        const int64_t* __restrict__ index, int64_t slots,
                                        int64_t d, T* __restrict__ grad_buf, int64_t ldgb,
                                        typename AccOf<T>::type* __restrict__ grad_w) {
  using acc_t = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* red = reinterpret_cast<acc_t*>(smem) + threadIdx.y * blockDim.x;
  const bool want_dot = grad_w != nullptr;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // Uniform trip count over the block (for __syncthreads); rows past the end do nothing.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < slots; base += step) {
    const int64_t s = base + threadIdx.y;
    acc_t dot = acc_t(0);
    if (s < slots) {
      if (threadIdx.x == 0) assert(moe_ops::in_range(index[s], num_rows));
      for (int64_t c = static_cast<int64_t>(threadIdx.x) * N; c < d; c += blockDim.x * N)
        dot += moe_ops::combine_backward_cols<T, acc_t, N, kVec>(
            grad_y, ldg, num_rows, buf, ldb, weight, index, s, c, grad_buf, ldgb, want_dot);
    }
    if (want_dot) {
      red[threadIdx.x] = dot;
      __syncthreads();
      for (unsigned o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
      }
      if (threadIdx.x == 0 && s < slots) grad_w[s] = red[0];
      __syncthreads();
    }
  }
}

// One thread per 4 consecutive columns of a row (grid-stride over rows x column groups).
__global__ void jitter_kernel(const float* __restrict__ x, int64_t ldx, int64_t rows, int64_t d,
                              uint64_t seed, int64_t first_row, float lo, float span,
                              float* __restrict__ y) {
  const int64_t groups = (d + 3) / 4, total = rows * groups;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const int64_t t = i / groups, f0 = (i - t * groups) * 4;
    const uint32_t key = moe_ops::noise_row_key(seed, static_cast<uint64_t>(first_row + t));
    for (int64_t f = f0; f < f0 + 4 && f < d; ++f) {
      const float n = moe_ops::jitter_factor(key, static_cast<uint32_t>(f), lo, span);
      y[t * d + f] = moe_ops::mul_rn(x[t * ldx + f], n);
    }
  }
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) for the element type of a dtype code.
template <typename F>
cudaError_t with_type(DType t, F&& f) {
  switch (t) {
    case kFloat32:
      return f(Tag<float>{});
    case kFloat16:
      return f(Tag<__half>{});
    case kBFloat16:
      return f(Tag<__nv_bfloat16>{});
    case kFloat64:
      return f(Tag<double>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t dispatch(const void* x, int64_t ldx, int64_t num_src, DType x_dtype,
                     const int64_t* index, int64_t slots, int64_t d, void* buf, int64_t ldb,
                     DType buf_dtype, cudaStream_t stream) {
  if (slots == 0 || d == 0) return cudaSuccess;
  return with_type(x_dtype, [&](auto ti) {
    using in_t = typename decltype(ti)::type;
    return with_type(buf_dtype, [&](auto to) {
      using out_t = typename decltype(to)::type;
      constexpr int N = moe_ops::pack_elems<in_t, out_t>();
      const auto* xp = static_cast<const in_t*>(x);
      auto* bp = static_cast<out_t*>(buf);
      if (moe_ops::pack_ok(d, N, xp, ldx, sizeof(in_t), bp, ldb, sizeof(out_t))) {
        const Geometry g = geometry(slots, d, N);
        dispatch_kernel<in_t, out_t, N, true>
            <<<g.grid, g.block, 0, stream>>>(xp, ldx, num_src, index, slots, d, bp, ldb);
      } else {
        const Geometry g = geometry(slots, d, 1);
        dispatch_kernel<in_t, out_t, 1, false>
            <<<g.grid, g.block, 0, stream>>>(xp, ldx, num_src, index, slots, d, bp, ldb);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t combine(const void* buf, int64_t ldb, DType buf_dtype, const void* weight,
                    const int64_t* row_ptr, const int64_t* perm, int64_t num_rows, int64_t slots,
                    int64_t d, void* y, int64_t ldy, DType y_dtype, cudaStream_t stream) {
  if (num_rows == 0 || d == 0) return cudaSuccess;
  return with_type(buf_dtype, [&](auto ti) {
    using in_t = typename decltype(ti)::type;
    using acc_t = typename AccOf<in_t>::type;
    return with_type(y_dtype, [&](auto to) {
      using out_t = typename decltype(to)::type;
      constexpr int N = moe_ops::pack_elems<in_t, out_t>();
      const auto* bp = static_cast<const in_t*>(buf);
      const auto* wp = static_cast<const acc_t*>(weight);
      auto* yp = static_cast<out_t*>(y);
      if (moe_ops::pack_ok(d, N, bp, ldb, sizeof(in_t), yp, ldy, sizeof(out_t))) {
        const Geometry g = geometry(num_rows, d, N);
        combine_kernel<in_t, out_t, N, true><<<g.grid, g.block, 0, stream>>>(
            bp, ldb, wp, row_ptr, perm, num_rows, slots, d, yp, ldy);
      } else {
        const Geometry g = geometry(num_rows, d, 1);
        combine_kernel<in_t, out_t, 1, false><<<g.grid, g.block, 0, stream>>>(
            bp, ldb, wp, row_ptr, perm, num_rows, slots, d, yp, ldy);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t combine_backward(const void* grad_y, int64_t ldg, int64_t num_rows, const void* buf,
                             int64_t ldb, DType dtype, const void* weight, const int64_t* index,
                             int64_t slots, int64_t d, void* grad_buf, int64_t ldgb, void* grad_w,
                             cudaStream_t stream) {
  if (slots == 0) return cudaSuccess;
  return with_type(dtype, [&](auto tt) {
    using T = typename decltype(tt)::type;
    using acc_t = typename AccOf<T>::type;
    constexpr int N = moe_ops::pack_elems<T, T>();
    const auto* gp = static_cast<const T*>(grad_y);
    const auto* bp = static_cast<const T*>(buf);
    const auto* wp = static_cast<const acc_t*>(weight);
    auto* gbp = static_cast<T*>(grad_buf);
    auto* gwp = static_cast<acc_t*>(grad_w);
    // buf is only read for the weight gradient; when absent its pointer is not checked.
    const bool vec = moe_ops::pack_ok(d, N, gp, ldg, sizeof(T), gbp, ldgb, sizeof(T)) &&
                     (gwp == nullptr || moe_ops::pack_ok(d, N, bp, ldb, sizeof(T), bp, ldb,
                                                         sizeof(T)));
    const Geometry g = geometry(slots, d, vec ? N : 1);
    const size_t smem = gwp ? sizeof(acc_t) * g.block.x * g.block.y : 0;
    if (vec) {
      combine_backward_kernel<T, N, true><<<g.grid, g.block, smem, stream>>>(
          gp, ldg, num_rows, bp, ldb, wp, index, slots, d, gbp, ldgb, gwp);
    } else {
      combine_backward_kernel<T, 1, false><<<g.grid, g.block, smem, stream>>>(
          gp, ldg, num_rows, bp, ldb, wp, index, slots, d, gbp, ldgb, gwp);
    }
    return cudaGetLastError();
  });
}

cudaError_t jitter(const float* x, int64_t ldx, int64_t rows, int64_t d, uint64_t seed,
                   int64_t first_row, float lo, float span, float* y, cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  const int64_t work = rows * ((d + 3) / 4);
  int64_t grid = (work + kThreads - 1) / kThreads;
  if (grid > (int64_t{1} << 30)) grid = int64_t{1} << 30;
  jitter_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(x, ldx, rows, d, seed,
                                                                      first_row, lo, span, y);
  return cudaGetLastError();
}

}  // namespace moe_ops_cuda
