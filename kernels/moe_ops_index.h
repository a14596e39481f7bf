// Per-row index math of the dispatch/combine ops, shared by the CPU loop (moe_ops_cpu.cpp) and
// the CUDA kernels (moe_ops_cuda.cu). Only <cstdint>: compiles with g++ and with nvcc alone.
//
// Ops (S slots, T source rows, R output rows, d columns):
//   dispatch          buf[i, :] = cast(x[index[i], :])                          i in [0, S)
//   combine           y[r, :]   = sum_{j in [row_ptr[r], row_ptr[r+1])} w[perm[j]] * buf[perm[j], :]
//                     (CSR by destination row; perm is a stable argsort of index, so the sum order
//                     is fixed and each output row is written by exactly one worker: deterministic)
//   combine backward  grad_buf[s, :] = w[s] * grad_y[index[s], :]
//                     grad_w[s]      = dot(grad_y[index[s], :], buf[s, :])
//   jitter            y[t, f] = x[t, f] * ((1 - eps) + 2 eps * u), u = noise(seed, row0 + t, f)
//                     (counter-based: the same u for a global (token, feature) on any split)
// Each function below handles N consecutive columns starting at `col` of one row; the CPU calls
// them on chunks of a row, the GPU gives each thread one chunk (a 16-byte pack when kVec).
// Conversions go through Cvt<T> (load: T -> acc, store: acc -> T), specialised per back end.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#define MOE_UNROLL _Pragma("unroll")
#else
#define MOE_HD inline
#define MOE_UNROLL _Pragma("GCC unroll 16")
#endif

namespace moe_ops {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Conversion policy, specialised by each back end for its element types.
template <typename T>
struct Cvt;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename A, typename B>
struct IsSame {
  static constexpr bool value = false;
};
template <typename A>
struct IsSame<A, A> {
  static constexpr bool value = true;
};

// Unsigned compare: true iff 0 <= v < n.
MOE_HD bool in_range(int64_t v, int64_t n) {
  return static_cast<uint64_t>(v) < static_cast<uint64_t>(n);
}

// Elements per 16-byte pack for a copy from in_t to out_t.
template <typename in_t, typename out_t>
constexpr int pack_elems() {
  return 16 / (sizeof(in_t) > sizeof(out_t) ? sizeof(in_t) : sizeof(out_t));
}

// True when rows of width d at these pointers/strides (in elements) can use N-element packs.
MOE_HD bool pack_ok(int64_t d, int n, const void* a, int64_t lda, int a_bytes, const void* b,
                    int64_t ldb, int b_bytes) {
  return n > 1 && d % n == 0 && lda % n == 0 && ldb % n == 0 &&
         reinterpret_cast<uintptr_t>(a) % (static_cast<uintptr_t>(a_bytes) * n) == 0 &&
         reinterpret_cast<uintptr_t>(b) % (static_cast<uintptr_t>(b_bytes) * n) == 0;
}

template <typename T, int N, bool kVec, typename acc_t>
MOE_HD void load_n(const T* p, acc_t* out) {
  if constexpr (kVec) {
    const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
MOE_UNROLL
    for (int k = 0; k < N; ++k) out[k] = static_cast<acc_t>(Cvt<T>::load(pk.v[k]));
  } else {
MOE_UNROLL
    for (int k = 0; k < N; ++k) out[k] = static_cast<acc_t>(Cvt<T>::load(p[k]));
  }
}

template <typename T, typename acc_t, int N, bool kVec>
MOE_HD void store_n(T* p, const acc_t* in) {
  if constexpr (kVec) {
    Pack<T, N> pk;
MOE_UNROLL
    for (int k = 0; k < N; ++k) pk.v[k] = Cvt<T>::store(in[k]);
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
  } else {
MOE_UNROLL
    for (int k = 0; k < N; ++k) p[k] = Cvt<T>::store(in[k]);
  }
}

// dispatch, slot i, columns [col, col+N): buf[i] = cast(x[index[i]]). src must be in range.
template <typename in_t, typename out_t, int N, bool kVec>
MOE_HD void dispatch_cols(const in_t* x, int64_t ldx, const int64_t* index, int64_t i, int64_t col,
                          out_t* buf, int64_t ldb) {
  using acc_t = typename AccOf<in_t>::type;
  const in_t* from = x + index[i] * ldx + col;
  out_t* to = buf + i * ldb + col;
  if constexpr (IsSame<in_t, out_t>::value) {  // plain copy, no conversion
    if constexpr (kVec) {
      *reinterpret_cast<Pack<out_t, N>*>(to) = *reinterpret_cast<const Pack<in_t, N>*>(from);
    } else {
      MOE_UNROLL
      for (int k = 0; k < N; ++k) to[k] = from[k];
    }
  } else {
    acc_t v[N];
    load_n<in_t, N, kVec>(from, v);
    store_n<out_t, acc_t, N, kVec>(to, v);
  }
}

// combine, output row r, columns [col, col+N). weight may be null (= ones).
template <typename in_t, typename out_t, typename acc_t, int N, bool kVec>
MOE_HD void combine_cols(const in_t* buf, int64_t ldb, const acc_t* weight, const int64_t* row_ptr,
                         const int64_t* perm, int64_t r, int64_t col, out_t* y, int64_t ldy) {
  acc_t acc[N];
MOE_UNROLL
  for (int k = 0; k < N; ++k) acc[k] = acc_t(0);
  const int64_t begin = row_ptr[r], end = row_ptr[r + 1];
  for (int64_t j = begin; j < end; ++j) {
    const int64_t s = perm[j];
    const acc_t w = weight ? weight[s] : acc_t(1);
    acc_t v[N];
    load_n<in_t, N, kVec>(buf + s * ldb + col, v);
MOE_UNROLL
    for (int k = 0; k < N; ++k) acc[k] += w * v[k];
  }
  store_n<out_t, acc_t, N, kVec>(y + r * ldy + col, acc);
}

// combine backward, slot s, columns [col, col+N): writes grad_buf[s] = w[s] * grad_y[index[s]]
// (zeros if index[s] is out of range) and returns this chunk's part of dot(grad_y[index[s]], buf[s])
// when want_dot. weight may be null (= ones).
template <typename T, typename acc_t, int N, bool kVec>
MOE_HD acc_t combine_backward_cols(const T* grad_y, int64_t ldg, int64_t num_rows, const T* buf,
                                   int64_t ldb, const acc_t* weight, const int64_t* index,
                                   int64_t s, int64_t col, T* grad_buf, int64_t ldgb,
                                   bool want_dot) {
  const int64_t r = index[s];
  acc_t g[N];
  if (in_range(r, num_rows)) {
    load_n<T, N, kVec>(grad_y + r * ldg + col, g);
  } else {
MOE_UNROLL
    for (int k = 0; k < N; ++k) g[k] = acc_t(0);
  }
  const acc_t w = weight ? weight[s] : acc_t(1);
  acc_t out[N];
MOE_UNROLL
  for (int k = 0; k < N; ++k) out[k] = w * g[k];
  store_n<T, acc_t, N, kVec>(grad_buf + s * ldgb + col, out);
  acc_t dot = acc_t(0);
  if (want_dot) {
    acc_t b[N];
    load_n<T, N, kVec>(buf + s * ldb + col, b);
MOE_UNROLL
    for (int k = 0; k < N; ++k) dot += g[k] * b[k];
  }
  return dot;
}

// ---- counter-based noise: a pure function of (seed, global row, column) ----------------------
// Row key: SplitMix64 (Steele et al. 2014) of the global row, once per row; per column: the
// MurmurHash3 32-bit finaliser of key + column * golden, 32-bit integer math that vectorises.

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr uint32_t kGolden32 = 0x9E3779B9u;

// The i-th output of a SplitMix64 stream seeded with `seed`: mix(seed + golden * (i + 1)).
MOE_HD uint64_t splitmix64(uint64_t seed, uint64_t i) {
  uint64_t z = seed + kGolden * (i + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

MOE_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

MOE_HD uint32_t noise_row_key(uint64_t seed, uint64_t row) {
  return static_cast<uint32_t>(splitmix64(seed, row));
}

// U[0, 1) with 24 random bits for column `col` of the row with key `key` (exact: k * 2^-24).
MOE_HD float noise_uniform(uint32_t key, uint32_t col) {
  const uint32_t h = fmix32(key + col * kGolden32);
  return static_cast<float>(static_cast<int32_t>(h >> 8)) * (1.0f / 16777216.0f);
}

// The jitter factor lo + span * u, rounded after the product and after the sum: no fused
// multiply-add (__fmul_rn/__fadd_rn on the GPU, -ffp-contract=off on the CPU), so the CPU kernel,
// the CUDA kernel and torch's elementwise reference agree bit for bit.
MOE_HD float jitter_factor(uint32_t key, uint32_t col, float lo, float span) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(lo, __fmul_rn(span, noise_uniform(key, col)));
#else
  return lo + span * noise_uniform(key, col);
#endif
}

// Rounded product (no contraction with a following add).
MOE_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

}  // namespace moe_ops
