// The router's gate on CPU, fused with its input jitter: logits = (x * n) @ W^T, n the jitter
// factor of moe_ops_index.h recomputed from its counters (never stored), and its backward.
//
// With few experts (E <= a few dozen) this is a skinny GEMM that BLAS runs at a third of its
// speed on square shapes; here one pass over x computes all E dot products of a row from L1-resident
// weights, and the jittered row x * n lives only in a per-thread row buffer. Rows are independent
// (a row's logits do not depend on the other rows), so any split of the batch gives the same bits.
//   forward   logits[t, e] = sum_f xn[t, f] W[e, f],        xn = x * n (n = 1 when eps = 0)
//   backward  grad_x[t, f] = n[t, f] * sum_e g[t, e] W[e, f]
//             grad_W[e, f] = sum_t g[t, e] xn[t, f]         (per-thread partial sums, then added
//                                                            in thread order: deterministic)
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <vector>

#include "moe_ops_host.h"
#include "moe_ops_index.h"

namespace moe_ops {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int kExpertBlock = 8;  // dot products kept in registers at once
constexpr int64_t kSerialWork = 1 << 15;

struct Jitter {
  uint64_t seed;
  int64_t first_row;
  float lo, span;
  bool on;

  // row[f] = x[f] * n(t, f) (or x[f] when off) for the d columns of global row first_row + t.
  void apply(const float* x, int64_t t, int64_t d, float* row) const {
    if (!on) {
      std::copy(x, x + d, row);
      return;
    }
    const uint32_t key = noise_row_key(seed, static_cast<uint64_t>(first_row + t));
    for (int64_t f = 0; f < d; ++f) row[f] = x[f] * jitter_factor(key, static_cast<uint32_t>(f), lo, span);
  }

  void scale(int64_t t, int64_t d, float* row) const {
    if (!on) return;
    const uint32_t key = noise_row_key(seed, static_cast<uint64_t>(first_row + t));
    for (int64_t f = 0; f < d; ++f) row[f] = row[f] * jitter_factor(key, static_cast<uint32_t>(f), lo, span);
  }
};

constexpr int kRows = 4;  // rows per register block
constexpr int64_t kW = fVec::size();

// Up to kRows jittered rows of x, in one buffer of kRows x d.
struct RowBlock {
  std::vector<float> buf;
  int64_t d;
  explicit RowBlock(int64_t d_) : buf(kRows * d_), d(d_) {}
  float* row(int r) { return buf.data() + r * d; }
};

// logits[t0 + r, e0 : e0 + V*kW] for r < R: W^T (wt: [d, Ep], zero-padded to Ep columns) times the
// rows, one broadcast column of x at a time. A row's sums run over f = 0..d-1 in the same order
// whatever R is, so a row's logits do not depend on the rows next to it.
template <int R, int V>
void gate_block(RowBlock& rows, const float* wt, int64_t Ep, int64_t e0, float* out, int64_t ldo) {
  fVec acc[R][V];
  MOE_UNROLL
  for (int r = 0; r < R; ++r)
    MOE_UNROLL
    for (int v = 0; v < V; ++v) acc[r][v] = fVec(0.f);
  for (int64_t f = 0; f < rows.d; ++f) {
    fVec w[V];
    MOE_UNROLL
    for (int v = 0; v < V; ++v) w[v] = fVec::loadu(wt + f * Ep + e0 + v * kW);
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
      const fVec xb(rows.row(r)[f]);
      MOE_UNROLL
      for (int v = 0; v < V; ++v) acc[r][v] = at::vec::fmadd(xb, w[v], acc[r][v]);
    }
  }
  MOE_UNROLL
  for (int r = 0; r < R; ++r)
    MOE_UNROLL
    for (int v = 0; v < V; ++v) acc[r][v].store(out + r * ldo + v * kW);
}

template <int R>
void gate_rows(RowBlock& rows, const float* wt, int64_t Ep, float* out, int64_t ldo) {
  int64_t e0 = 0;
  for (; e0 + 2 * kW <= Ep; e0 += 2 * kW) gate_block<R, 2>(rows, wt, Ep, e0, out + e0, ldo);
  for (; e0 < Ep; e0 += kW) gate_block<R, 1>(rows, wt, Ep, e0, out + e0, ldo);
}

void gate_forward(const float* x, int64_t ldx, const float* w, int64_t rows, int64_t d, int64_t E,
                  const Jitter& jit, float* logits) {
  const int64_t Ep = (E + kW - 1) / kW * kW;
  std::vector<float> wt(d * Ep, 0.f);  // W^T, zero-padded to whole vectors
  for (int64_t e = 0; e < E; ++e)
    for (int64_t f = 0; f < d; ++f) wt[f * Ep + e] = w[e * d + f];
  const int nt = at::get_num_threads();
  const bool par = rows * d > kSerialWork;
  const int64_t blocks = (rows + kRows - 1) / kRows;
  _Pragma("omp parallel num_threads(nt) if(par)") {
    RowBlock rb(d);
    std::vector<float> out(kRows * Ep);
    _Pragma("omp for schedule(static)") for (int64_t b = 0; b < blocks; ++b) {
      const int64_t t0 = b * kRows;
      const int n = static_cast<int>(std::min<int64_t>(kRows, rows - t0));
      for (int r = 0; r < n; ++r) jit.apply(x + (t0 + r) * ldx, t0 + r, d, rb.row(r));
      if (n == kRows) {
        gate_rows<kRows>(rb, wt.data(), Ep, out.data(), Ep);
      } else {
        for (int r = 0; r < n; ++r) {  // a row at a time: the same sums as in a block
          RowBlock one(d);
          std::copy(rb.row(r), rb.row(r) + d, one.row(0));
          gate_rows<1>(one, wt.data(), Ep, out.data() + r * Ep, Ep);
        }
      }
      for (int r = 0; r < n; ++r) std::copy(out.data() + r * Ep, out.data() + r * Ep + E, logits + (t0 + r) * E);
    }
  }
}

// out[r, c : c + V*kW] = sum_e g[r, e] W[e, c : c + V*kW] for R rows (e ascending in every row).
template <int R, int V>
inline void grad_x_block(const float* g, int64_t E, const float* w, int64_t d, int64_t c,
                         float* out) {
  fVec acc[R][V];
  MOE_UNROLL
  for (int r = 0; r < R; ++r)
    MOE_UNROLL
    for (int v = 0; v < V; ++v) acc[r][v] = fVec(0.f);
  for (int64_t e = 0; e < E; ++e) {
    fVec wv[V];
    MOE_UNROLL
    for (int v = 0; v < V; ++v) wv[v] = fVec::loadu(w + e * d + c + v * kW);
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
      const fVec gb(g[r * E + e]);
      MOE_UNROLL
      for (int v = 0; v < V; ++v) acc[r][v] = at::vec::fmadd(gb, wv[v], acc[r][v]);
    }
  }
  MOE_UNROLL
  for (int r = 0; r < R; ++r)
    MOE_UNROLL
    for (int v = 0; v < V; ++v) acc[r][v].store(out + r * d + c + v * kW);
}

template <int R>
void grad_x_rows(const float* g, int64_t E, const float* w, int64_t d, float* out) {
  int64_t c = 0;
  for (; c + 2 * kW <= d; c += 2 * kW) grad_x_block<R, 2>(g, E, w, d, c, out);
  for (; c + kW <= d; c += kW) grad_x_block<R, 1>(g, E, w, d, c, out);
  for (; c < d; ++c) {
    MOE_UNROLL
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t e = 0; e < E; ++e) s += g[r * E + e] * w[e * d + c];
      out[r * d + c] = s;
    }
  }
}

// grad_x[t] = n[t] * (g[t] @ W)
void gate_grad_x(const float* g, const float* w, int64_t rows, int64_t d, int64_t E,
                 const Jitter& jit, float* gx) {
  const int nt = at::get_num_threads();
  const bool par = rows * d > kSerialWork;
  const int64_t blocks = (rows + kRows - 1) / kRows;
  _Pragma("omp parallel for num_threads(nt) if(par) schedule(static)")
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t t0 = b * kRows;
    const int n = static_cast<int>(std::min<int64_t>(kRows, rows - t0));
    if (n == kRows) {
      grad_x_rows<kRows>(g + t0 * E, E, w, d, gx + t0 * d);
    } else {
      for (int r = 0; r < n; ++r) grad_x_rows<1>(g + (t0 + r) * E, E, w, d, gx + (t0 + r) * d);
    }
    for (int r = 0; r < n; ++r) jit.scale(t0 + r, d, gx + (t0 + r) * d);
  }
}

// acc[e, :] += sum_r g[r, e] * rows[r, :] for R rows (r ascending).
template <int R>
void grad_w_rows(const float* g, int64_t E, RowBlock& rows, float* acc) {
  const int64_t d = rows.d;
  for (int64_t e = 0; e < E; ++e) {
    fVec gb[R];
    MOE_UNROLL
    for (int r = 0; r < R; ++r) gb[r] = fVec(g[r * E + e]);
    float* a = acc + e * d;
    int64_t c = 0;
    for (; c + kW <= d; c += kW) {
      fVec s = fVec::loadu(a + c);
      MOE_UNROLL
      for (int r = 0; r < R; ++r) s = at::vec::fmadd(gb[r], fVec::loadu(rows.row(r) + c), s);
      s.store(a + c);
    }
    for (; c < d; ++c) {
      float s = a[c];
      MOE_UNROLL
      for (int r = 0; r < R; ++r) s += g[r * E + e] * rows.row(r)[c];
      a[c] = s;
    }
  }
}

// grad_W = g^T @ xn: each thread sums its static share of rows into its own [E, d] partial; the
// partials are added in thread order.
void gate_grad_w(const float* g, const float* x, int64_t ldx, int64_t rows, int64_t d, int64_t E,
                 const Jitter& jit, float* gw) {
  const int want = rows * d > kSerialWork ? at::get_num_threads() : 1;
  std::vector<std::vector<float>> partial(want);
  int used = 1;
  _Pragma("omp parallel num_threads(want)") {
    const int n = omp_get_num_threads(), me = omp_get_thread_num();
    _Pragma("omp single") used = n;
    const int64_t lo = rows * me / n, hi = rows * (me + 1) / n;
    std::vector<float>& acc = partial[me];
    acc.assign(E * d, 0.f);
    RowBlock rb(d);
    int64_t t = lo;
    for (; t + kRows <= hi; t += kRows) {
      for (int r = 0; r < kRows; ++r) jit.apply(x + (t + r) * ldx, t + r, d, rb.row(r));
      grad_w_rows<kRows>(g + t * E, E, rb, acc.data());
    }
    for (; t < hi; ++t) {
      jit.apply(x + t * ldx, t, d, rb.row(0));
      grad_w_rows<1>(g + t * E, E, rb, acc.data());
    }
  }
  std::copy(partial[0].begin(), partial[0].end(), gw);
  for (int p = 1; p < used; ++p) {
    for (int64_t i = 0; i < E * d; ++i) gw[i] += partial[p][i];
  }
}

Jitter make_jitter(int64_t seed, int64_t first_row, double eps) {
  TORCH_CHECK(first_row >= 0, "gate: first_row must be >= 0, got ", first_row);
  return {static_cast<uint64_t>(seed), first_row, static_cast<float>(1.0 - eps),
          static_cast<float>(2.0 * eps), eps != 0.0};
}

std::pair<at::Tensor, at::Tensor> gate_args(const at::Tensor& x_in, const at::Tensor& w_in,
                                            const char* op) {
  const at::Tensor x = rows_2d(x_in, op, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(w_in.scalar_type() == at::kFloat && w_in.dim() == 2 && w_in.size(1) == x.size(1),
              op, ": weight must be float32 [E, ", x.size(1), "], got ", w_in.scalar_type(), " ",
              w_in.sizes());
  return {x, w_in.contiguous()};
}

}  // namespace

at::Tensor gate_op_cpu(const at::Tensor& x_in, const at::Tensor& w_in, int64_t seed,
                       int64_t first_row, double eps) {
  const auto [x, w] = gate_args(x_in, w_in, "gate");
  const int64_t rows = x.size(0), d = x.size(1), E = w.size(0);
  at::Tensor logits = at::empty({rows, E}, x.options());
  gate_forward(x.data_ptr<float>(), x.stride(0), w.data_ptr<float>(), rows, d, E,
               make_jitter(seed, first_row, eps), logits.data_ptr<float>());
  return logits;
}

std::tuple<at::Tensor, at::Tensor> gate_backward_op_cpu(const at::Tensor& grad_in,
                                                        const at::Tensor& x_in,
                                                        const at::Tensor& w_in, int64_t seed,
                                                        int64_t first_row, double eps,
                                                        bool x_grad, bool weight_grad) {
  const auto [x, w] = gate_args(x_in, w_in, "gate_backward");
  const int64_t rows = x.size(0), d = x.size(1), E = w.size(0);
  const at::Tensor g = grad_in.contiguous();
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.dim() == 2 && g.size(0) == rows && g.size(1) == E,
              "gate_backward: grad must be float32 [", rows, ", ", E, "], got ", g.sizes());
  const Jitter jit = make_jitter(seed, first_row, eps);
  at::Tensor gx = at::empty({x_grad ? rows : 0, d}, x.options());
  at::Tensor gw = at::empty({weight_grad ? E : 0, d}, x.options());
  if (x_grad) gate_grad_x(g.data_ptr<float>(), w.data_ptr<float>(), rows, d, E, jit, gx.data_ptr<float>());
  if (weight_grad) {
    gate_grad_w(g.data_ptr<float>(), x.data_ptr<float>(), x.stride(0), rows, d, E, jit,
                gw.data_ptr<float>());
  }
  return {gx, gw};
}

}  // namespace moe_ops

TORCH_LIBRARY_IMPL(moe_train, CPU, m) {
  m.impl("gate", &moe_ops::gate_op_cpu);
  m.impl("gate_backward", &moe_ops::gate_backward_op_cpu);
}
