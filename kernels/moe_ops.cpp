// Op schemas of the moe_train namespace and their CPU kernels: OpenMP over rows, at::vec over
// columns. The per-row index math (and the scalar column tails) is in moe_ops_index.h, shared
// with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "moe_ops_host.h"
#include "moe_ops_index.h"

namespace moe_ops {

template <>
struct Cvt<float> {
  static float load(float v) { return v; }
  static float store(float a) { return a; }
};
template <>
struct Cvt<double> {
  static double load(double v) { return v; }
  static double store(double a) { return a; }
};
template <>
struct Cvt<at::Half> {
  static float load(at::Half v) { return static_cast<float>(v); }
  static at::Half store(float a) { return at::Half(a); }
};
// Branch-free bfloat16 conversions (round to nearest even, NaN -> 0x7FC0 as c10 does) so the
// inner loops vectorise; c10's scalar conversion does not.
template <>
struct Cvt<at::BFloat16> {
  static float load(at::BFloat16 v) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static at::BFloat16 store(float a) {
    uint32_t u;
    std::memcpy(&u, &a, sizeof u);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return at::BFloat16(static_cast<uint16_t>(a != a ? 0x7FC0u : rounded),
                        at::BFloat16::from_bits());
  }
};

namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;
constexpr int64_t kSerialWork = 1 << 15;  // elements below which one thread does it all

// ---- blocks of kVecs float vectors, loaded from / stored to float, bfloat16 or half ----------
// (at::vec: AVX2/AVX-512 when the extension is built with them, see moe_train/ops/build.py;
// portable code otherwise). Columns past the last whole block go through the scalar functions of
// moe_ops_index.h, as do float64 rows.
constexpr int kVecs = 4;
constexpr int64_t kBlock = kVecs * fVec::size();  // columns per block

template <typename T>
constexpr bool kVectorised = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16> ||
                             std::is_same_v<T, at::Half>;

template <typename T>
inline void load_block(const T* p, fVec* v) {
  if constexpr (std::is_same_v<T, float>) {
    for (int k = 0; k < kVecs; ++k) v[k] = fVec::loadu(p + k * fVec::size());
  } else {
    using rVec = Vectorized<T>;  // 2 float vectors' worth of 16-bit values
    for (int k = 0; k < kVecs / 2; ++k) {
      std::tie(v[2 * k], v[2 * k + 1]) = at::vec::convert_to_float<T>(rVec::loadu(p + k * rVec::size()));
    }
  }
}

template <typename T>
inline void store_block(T* p, const fVec* v) {
  if constexpr (std::is_same_v<T, float>) {
    for (int k = 0; k < kVecs; ++k) v[k].store(p + k * fVec::size());
  } else {
    using rVec = Vectorized<T>;
    for (int k = 0; k < kVecs / 2; ++k) {
      at::vec::convert_from_float<T>(v[2 * k], v[2 * k + 1]).store(p + k * rVec::size());
    }
  }
}

inline float sum_lanes(const fVec& v) {
  alignas(64) float lanes[fVec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int k = 0; k < fVec::size(); ++k) s += lanes[k];
  return s;
}

// Ask for a row of `bytes` bytes ahead of its use (rows gathered in random order defeat the
// hardware prefetcher).
constexpr int64_t kAhead = 2;  // rows of prefetch distance

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// Columns [c0, d) of a row with the scalar N = 1 functions of the shared header.
template <typename F>
inline void tail_columns(int64_t c0, int64_t d, F f) {
  for (int64_t c = c0; c < d; ++c) f(c);
}

template <typename in_t, typename out_t>
void dispatch_cpu(const in_t* x, int64_t ldx, int64_t num_src, const int64_t* index, int64_t slots,
                  int64_t d, out_t* buf) {
  const int nt = at::get_num_threads();
  const bool par = slots * d > kSerialWork;
  constexpr bool vec = kVectorised<in_t> && kVectorised<out_t>;
  int64_t bad = -1;  // an out-of-range slot, if any
  _Pragma("omp parallel for num_threads(nt) if(par) schedule(static) reduction(max : bad)")
  for (int64_t i = 0; i < slots; ++i) {
    if (!in_range(index[i], num_src)) {
      bad = i;
      continue;
    }
    if (i + 1 < slots && in_range(index[i + 1], num_src)) {
      prefetch_row(x + index[i + 1] * ldx, d * static_cast<int64_t>(sizeof(in_t)));
    }
    const in_t* src = x + index[i] * ldx;
    out_t* dst = buf + i * d;
    int64_t c = 0;
    if constexpr (IsSame<in_t, out_t>::value) {  // a row copy
      std::memcpy(dst, src, sizeof(in_t) * d);
      c = d;
    } else if constexpr (vec) {
      for (; c + kBlock <= d; c += kBlock) {
        fVec v[kVecs];
        load_block(src + c, v);
        store_block(dst + c, v);
      }
    }
    tail_columns(c, d, [&](int64_t col) {
      dispatch_cols<in_t, out_t, 1, false>(x, ldx, index, i, col, buf, d);
    });
  }
  TORCH_CHECK(bad < 0, "dispatch: index[", bad, "] = ", index[bad], " is out of range for x with ",
              num_src, " rows");
}

template <typename in_t, typename out_t>
void combine_cpu(const in_t* buf, int64_t ldb, const typename AccOf<in_t>::type* weight,
                 const int64_t* row_ptr, const int64_t* perm, int64_t num_rows, int64_t slots,
                 int64_t d, out_t* y) {
  using acc_t = typename AccOf<in_t>::type;
  const int nt = at::get_num_threads();
  const bool par = (num_rows + slots) * d > kSerialWork;
  _Pragma("omp parallel for num_threads(nt) if(par) schedule(static)")
  for (int64_t r = 0; r < num_rows; ++r) {
    int64_t c = 0;
    if (r + kAhead < num_rows) {  // a later row's slots are random rows of buf: fetch them early
      for (int64_t j = row_ptr[r + kAhead]; j < row_ptr[r + kAhead + 1]; ++j) {
        prefetch_row(buf + perm[j] * ldb, d * static_cast<int64_t>(sizeof(in_t)));
      }
    }
    if constexpr (kVectorised<in_t> && kVectorised<out_t>) {
      const int64_t begin = row_ptr[r], end = row_ptr[r + 1];
      for (; c + kBlock <= d; c += kBlock) {  // one block of the row in registers, over its slots
        fVec acc[kVecs];
        for (int k = 0; k < kVecs; ++k) acc[k] = fVec(0.f);
        for (int64_t j = begin; j < end; ++j) {
          const int64_t s = perm[j];
          const fVec w(weight ? weight[s] : 1.f);
          fVec v[kVecs];
          load_block(buf + s * ldb + c, v);
          for (int k = 0; k < kVecs; ++k) acc[k] = at::vec::fmadd(w, v[k], acc[k]);
        }
        store_block(y + r * d + c, acc);
      }
    }
    tail_columns(c, d, [&](int64_t col) {
      combine_cols<in_t, out_t, acc_t, 1, false>(buf, ldb, weight, row_ptr, perm, r, col, y, d);
    });
  }
}

template <typename T>
void combine_backward_cpu(const T* grad_y, int64_t ldg, int64_t num_rows, const T* buf,
                          int64_t ldb, const typename AccOf<T>::type* weight,
                          const int64_t* index, int64_t slots, int64_t d, T* grad_buf,
                          typename AccOf<T>::type* grad_w) {
  using acc_t = typename AccOf<T>::type;
  const int nt = at::get_num_threads();
  const bool par = slots * d > kSerialWork;
  const bool want_dot = grad_w != nullptr;
  int64_t bad = -1;
  _Pragma("omp parallel for num_threads(nt) if(par) schedule(static) reduction(max : bad)")
  for (int64_t s = 0; s < slots; ++s) {
    if (!in_range(index[s], num_rows)) {
      bad = s;
      continue;
    }
    if (s + 1 < slots && in_range(index[s + 1], num_rows)) {
      prefetch_row(grad_y + index[s + 1] * ldg, d * static_cast<int64_t>(sizeof(T)));
    }
    acc_t dot = 0;
    int64_t c = 0;
    if constexpr (kVectorised<T>) {
      const T* g_row = grad_y + index[s] * ldg;
      const fVec w(weight ? weight[s] : 1.f);
      fVec dots(0.f);
      for (; c + kBlock <= d; c += kBlock) {
        fVec g[kVecs];
        load_block(g_row + c, g);
        if (want_dot) {
          fVec b[kVecs];
          load_block(buf + s * ldb + c, b);
          for (int k = 0; k < kVecs; ++k) dots = at::vec::fmadd(g[k], b[k], dots);
        }
        for (int k = 0; k < kVecs; ++k) g[k] = g[k] * w;
        store_block(grad_buf + s * d + c, g);
      }
      dot = sum_lanes(dots);
    }
    tail_columns(c, d, [&](int64_t col) {
      dot += combine_backward_cols<T, acc_t, 1, false>(grad_y, ldg, num_rows, buf, ldb, weight,
                                                       index, s, col, grad_buf, d, want_dot);
    });
    if (want_dot) grad_w[s] = dot;
  }
  TORCH_CHECK(bad < 0, "combine_backward: index[", bad, "] = ", index[bad],
              " is out of range [0, ", num_rows, ")");
}

void jitter_cpu(const float* x, int64_t ldx, int64_t rows, int64_t d, uint64_t seed,
                int64_t first_row, float lo, float span, float* y) {
  const int nt = at::get_num_threads();
  const bool par = rows * d > kSerialWork;
  _Pragma("omp parallel for num_threads(nt) if(par) schedule(static)")
  for (int64_t t = 0; t < rows; ++t) {
    const uint32_t key = noise_row_key(seed, static_cast<uint64_t>(first_row + t));
    const float* src = x + t * ldx;
    float* dst = y + t * d;
    for (int64_t f = 0; f < d; ++f) {
      dst[f] = src[f] * jitter_factor(key, static_cast<uint32_t>(f), lo, span);
    }
  }
}

#define MOE_DISPATCH_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Shared by combine (weight, out dtype = buf dtype) and dispatch_backward (no weight).
at::Tensor combine_rows_cpu(const at::Tensor& buf_in, const std::optional<at::Tensor>& weight_in,
                            const at::Tensor& row_ptr_in, const at::Tensor& perm_in,
                            int64_t num_rows, at::ScalarType out_dtype, const char* op) {
  const at::Tensor buf = rows_2d(buf_in, op, "buf");
  const int64_t slots = buf.size(0), d = buf.size(1);
  const auto [row_ptr, perm] = csr(row_ptr_in, perm_in, num_rows, slots, buf, op);
  const auto weight = weight_1d(weight_in, buf.scalar_type(), slots, buf, op);
  TORCH_CHECK(supported_dtype(out_dtype), op, ": unsupported output dtype ", out_dtype);
  at::Tensor y = at::empty({num_rows, d}, buf.options().dtype(out_dtype));
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[num_rows] == slots, op, ": ", slots - (rp[num_rows] - rp[0]),
              " index values are outside [0, ", num_rows, ")");
  MOE_DISPATCH_TYPES(buf.scalar_type(), "moe_combine_in", [&] {
    using in_t = scalar_t;
    using acc_t = typename AccOf<in_t>::type;
    const acc_t* w = weight ? weight->data_ptr<acc_t>() : nullptr;
    MOE_DISPATCH_TYPES(out_dtype, "moe_combine_out", [&] {
      combine_cpu<in_t, scalar_t>(buf.data_ptr<in_t>(), buf.stride(0), w, rp,
                                  perm.data_ptr<int64_t>(), num_rows, slots, d,
                                  y.data_ptr<scalar_t>());
    });
  });
  return y;
}

}  // namespace

at::Tensor dispatch_op_cpu(const at::Tensor& x_in, const at::Tensor& index_in,
                           std::optional<at::ScalarType> out_dtype) {
  const at::Tensor x = rows_2d(x_in, "dispatch", "x");
  const at::Tensor index = index_1d(index_in, x, "dispatch", "index");
  const auto out_t = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(supported_dtype(out_t), "dispatch: unsupported out_dtype ", out_t);
  const int64_t slots = index.size(0), d = x.size(1);
  at::Tensor buf = at::empty({slots, d}, x.options().dtype(out_t));
  MOE_DISPATCH_TYPES(x.scalar_type(), "moe_dispatch_in", [&] {
    using in_t = scalar_t;
    MOE_DISPATCH_TYPES(out_t, "moe_dispatch_out", [&] {
      dispatch_cpu<in_t, scalar_t>(x.data_ptr<in_t>(), x.stride(0), x.size(0),
                                   index.data_ptr<int64_t>(), slots, d, buf.data_ptr<scalar_t>());
    });
  });
  return buf;
}

at::Tensor dispatch_backward_op_cpu(const at::Tensor& grad_buf, const at::Tensor& row_ptr,
                                    const at::Tensor& perm, int64_t num_rows,
                                    at::ScalarType dtype) {
  return combine_rows_cpu(grad_buf, std::nullopt, row_ptr, perm, num_rows, dtype,
                          "dispatch_backward");
}

at::Tensor combine_op_cpu(const at::Tensor& buf, const std::optional<at::Tensor>& weight,
                          const at::Tensor& index, const at::Tensor& row_ptr,
                          const at::Tensor& perm, int64_t num_rows) {
  TORCH_CHECK(index.scalar_type() == at::kLong, "combine: index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == buf.size(0),
              "combine: index must have shape [", buf.size(0), "], got ", index.sizes());
  return combine_rows_cpu(buf, weight, row_ptr, perm, num_rows, buf.scalar_type(), "combine");
}

std::tuple<at::Tensor, at::Tensor> combine_backward_op_cpu(const at::Tensor& grad_y_in,
                                                           const at::Tensor& buf_in,
                                                           const std::optional<at::Tensor>& weight_in,
                                                           const at::Tensor& index_in,
                                                           bool weight_grad) {
  const char* op = "combine_backward";
  const at::Tensor grad_y = rows_2d(grad_y_in, op, "grad_y");
  const at::Tensor index = index_1d(index_in, grad_y, op, "index");
  const int64_t slots = index.size(0), d = grad_y.size(1);
  at::Tensor buf;
  if (weight_grad) {
    buf = rows_2d(buf_in, op, "buf");
    TORCH_CHECK(buf.size(0) == slots && buf.size(1) == d && buf.scalar_type() == grad_y.scalar_type(),
                op, ": buf must be [", slots, ", ", d, "] ", grad_y.scalar_type(), ", got ",
                buf.sizes(), " ", buf.scalar_type());
  }
  const auto weight = weight_1d(weight_in, grad_y.scalar_type(), slots, grad_y, op);
  at::Tensor grad_buf = at::empty({slots, d}, grad_y.options());
  const auto acc = acc_dtype(grad_y.scalar_type());
  at::Tensor grad_w = at::empty({weight_grad ? slots : 0}, grad_y.options().dtype(acc));
  MOE_DISPATCH_TYPES(grad_y.scalar_type(), "moe_combine_backward", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    combine_backward_cpu<scalar_t>(
        grad_y.data_ptr<scalar_t>(), grad_y.stride(0), grad_y.size(0),
        weight_grad ? buf.data_ptr<scalar_t>() : nullptr, weight_grad ? buf.stride(0) : 0,
        weight ? weight->data_ptr<acc_t>() : nullptr, index.data_ptr<int64_t>(), slots, d,
        grad_buf.data_ptr<scalar_t>(), weight_grad ? grad_w.data_ptr<acc_t>() : nullptr);
  });
  return {grad_buf, grad_w};
}

// y = x * jitter factor per (global row, column); x float32 [rows, d] (the router's input).
at::Tensor jitter_op_cpu(const at::Tensor& x_in, int64_t seed, int64_t first_row, double eps) {
  const at::Tensor x = rows_2d(x_in, "jitter", "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "jitter: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(first_row >= 0, "jitter: first_row must be >= 0, got ", first_row);
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  jitter_cpu(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), static_cast<uint64_t>(seed),
             first_row, static_cast<float>(1.0 - eps), static_cast<float>(2.0 * eps),
             y.data_ptr<float>());
  return y;
}

// CSR of slots by destination row by a stable counting sort, O(S + R), serial: the same
// (row_ptr, perm) as a stable argsort of index, without torch.sort's cost on small CPUs.
std::tuple<at::Tensor, at::Tensor> csr_by_row_op_cpu(const at::Tensor& index_in, int64_t num_rows) {
  const at::Tensor index = index_1d(index_in, index_in, "csr_by_row", "index");
  TORCH_CHECK(num_rows >= 0, "csr_by_row: num_rows must be >= 0, got ", num_rows);
  const int64_t slots = index.size(0);
  at::Tensor row_ptr = at::zeros({num_rows + 1}, index.options());
  at::Tensor perm = at::empty({slots}, index.options());
  const int64_t* idx = index.data_ptr<int64_t>();
  int64_t* rp = row_ptr.data_ptr<int64_t>();
  int64_t* pm = perm.data_ptr<int64_t>();
  for (int64_t s = 0; s < slots; ++s) {
    TORCH_CHECK(in_range(idx[s], num_rows), "combine: index[", s, "] = ", idx[s],
                " is out of range [0, ", num_rows, ")");
    ++rp[idx[s] + 1];
  }
  for (int64_t r = 0; r < num_rows; ++r) rp[r + 1] += rp[r];
  std::vector<int64_t> next(rp, rp + num_rows);
  for (int64_t s = 0; s < slots; ++s) pm[next[idx[s]]++] = s;
  return {row_ptr, perm};
}

}  // namespace moe_ops

TORCH_LIBRARY(moe_train, m) {
  m.def("csr_by_row(Tensor index, SymInt num_rows) -> (Tensor, Tensor)");
  m.def("dispatch(Tensor x, Tensor index, ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "dispatch_backward(Tensor grad_buf, Tensor row_ptr, Tensor perm, SymInt num_rows, "
      "ScalarType dtype) -> Tensor");
  m.def(
      "combine(Tensor buf, Tensor? weight, Tensor index, Tensor row_ptr, Tensor perm, "
      "SymInt num_rows) -> Tensor");
  m.def(
      "combine_backward(Tensor grad_y, Tensor buf, Tensor? weight, Tensor index, "
      "bool weight_grad) -> (Tensor, Tensor)");
  m.def("jitter(Tensor x, int seed, int first_row, float eps) -> Tensor");
  // the router's gate fused with its jitter (CPU only: moe_gate_cpu.cpp)
  m.def("gate(Tensor x, Tensor weight, int seed, int first_row, float eps) -> Tensor");
  m.def(
      "gate_backward(Tensor grad, Tensor x, Tensor weight, int seed, int first_row, float eps, "
      "bool x_grad, bool weight_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_train, CPU, m) {
  m.impl("csr_by_row", &moe_ops::csr_by_row_op_cpu);
  m.impl("dispatch", &moe_ops::dispatch_op_cpu);
  m.impl("dispatch_backward", &moe_ops::dispatch_backward_op_cpu);
  m.impl("combine", &moe_ops::combine_op_cpu);
  m.impl("combine_backward", &moe_ops::combine_backward_op_cpu);
  m.impl("jitter", &moe_ops::jitter_op_cpu);
}
