// The expert bank's matmuls on CPU with the threads placed across segments (the loop backend of
// moe_train/experts/grouped.py): every expert's rows form one contiguous segment, and BLAS runs
// the small per-segment GEMMs of a layer (256 rows x d at T 4096, E 16) well below its speed on
// one big GEMM when it splits each of them over all threads. Here each thread runs whole GEMM
// pieces on one core (BLAS is sequential inside a parallel region), so the threads never meet
// inside a small GEMM.
//   segment_mm    out[rows of e] = a[rows of e] @ b[e]        a [S, k], b [E, k, n], out [S, n]
//                 rows are split into equal contiguous ranges, one per thread; a range that
//                 crosses a segment end runs one GEMM per piece. A row's result depends only on
//                 that row, so any split gives the GEMM's own numbers.
//   segment_mm_t  out[e] = a[rows of e]^T @ b[rows of e]        a [S, m], b [S, n], out [E, m, n]
//                 the work (rows x output columns) is split into equal shares, one per thread, at
//                 column boundaries: a column's sum over the expert's rows is never split, so a
//                 big expert spreads over threads without partial sums; experts without rows get
//                 zeros.
// One thread (or a call from inside a parallel region) runs the same GEMMs in order.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace moe_ops {
namespace {

// First row of each segment (the ends are cumulative row counts); checks them.
std::vector<int64_t> segment_starts(c10::IntArrayRef ends, int64_t rows, const char* op) {
  std::vector<int64_t> starts(ends.size());
  int64_t prev = 0;
  for (size_t e = 0; e < ends.size(); ++e) {
    TORCH_CHECK(ends[e] >= prev, op, ": ends must be non-decreasing, got ", ends[e], " after ",
                prev);
    starts[e] = prev;
    prev = ends[e];
  }
  TORCH_CHECK(prev == rows, op, ": the last end (", prev, ") must equal the rows of a (", rows,
              ")");
  return starts;
}

bool run_threaded() { return at::get_num_threads() > 1 && !at::in_parallel_region(); }

}  // namespace

void segment_mm_op_cpu(const at::Tensor& a, const at::Tensor& b, c10::IntArrayRef ends,
                       at::Tensor& out) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 3 && out.dim() == 2,
              "segment_mm: a [S, k], b [E, k, n], out [S, n]");
  const int64_t S = a.size(0), E = b.size(0);
  TORCH_CHECK(static_cast<int64_t>(ends.size()) == E, "segment_mm: ", ends.size(),
              " ends for ", E, " experts");
  TORCH_CHECK(b.size(1) == a.size(1) && out.size(0) == S && out.size(1) == b.size(2),
              "segment_mm: shapes a ", a.sizes(), ", b ", b.sizes(), ", out ", out.sizes());
  auto starts = segment_starts(ends, S, "segment_mm");
  auto rows = [&](int64_t r0, int64_t r1) {  // every piece of segments inside [r0, r1)
    auto e = std::upper_bound(ends.begin(), ends.end(), r0) - ends.begin();
    for (; e < E && starts[e] < r1; ++e) {
      const int64_t lo = std::max(r0, starts[e]), hi = std::min(r1, ends[e]);
      if (hi <= lo) continue;
      auto piece = out.narrow(0, lo, hi - lo);
      at::mm_out(piece, a.narrow(0, lo, hi - lo), b[e]);
    }
  };
  if (S == 0) return;
  if (!run_threaded()) return rows(0, S);
  const int64_t T = std::min<int64_t>(at::get_num_threads(), S);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // a worker's own dispatch state
    for (int64_t t = t0; t < t1; ++t) rows(S * t / T, S * (t + 1) / T);
  });
}

void segment_mm_t_op_cpu(const at::Tensor& a, const at::Tensor& b, c10::IntArrayRef ends,
                         at::Tensor& out) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 3,
              "segment_mm_t: a [S, m], b [S, n], out [E, m, n]");
  const int64_t S = a.size(0), E = out.size(0);
  TORCH_CHECK(static_cast<int64_t>(ends.size()) == E, "segment_mm_t: ", ends.size(),
              " ends for ", E, " experts");
  TORCH_CHECK(b.size(0) == S && out.size(1) == a.size(1) && out.size(2) == b.size(1),
              "segment_mm_t: shapes a ", a.sizes(), ", b ", b.sizes(), ", out ", out.sizes());
  auto starts = segment_starts(ends, S, "segment_mm_t");
  for (int64_t e = 0; e < E; ++e)
    if (ends[e] == starts[e]) out[e].zero_();
  const int64_t N = out.size(2);
  // columns [c0, c1) of out[e]: one GEMM over the expert's rows (a column's sum is never split)
  auto columns = [&](int64_t e, int64_t c0, int64_t c1) {
    if (c1 <= c0) return;
    const int64_t n = ends[e] - starts[e];
    auto dst = out[e].narrow(1, c0, c1 - c0);
    auto rows_b = b.narrow(0, starts[e], n).narrow(1, c0, c1 - c0);
    at::mm_out(dst, a.narrow(0, starts[e], n).t(), rows_b);
  };
  if (!run_threaded()) {
    for (int64_t e = 0; e < E; ++e)
      if (ends[e] > starts[e]) columns(e, 0, N);
    return;
  }
  // the work is rows x columns: thread t takes the units [W t / T, W (t+1) / T) of W = S N, and
  // a column of expert e (n_e units) goes to the thread holding its first unit
  const int64_t T = at::get_num_threads();
  const int64_t W = S * N;
  auto first_column = [&](int64_t e, int64_t unit) {  // first column of e starting at >= unit
    const int64_t n = ends[e] - starts[e], base = starts[e] * N;
    if (unit <= base) return int64_t{0};
    return std::min(N, (unit - base + n - 1) / n);
  };
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // a worker's own dispatch state
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u0 = W * t / T, u1 = W * (t + 1) / T;
      for (int64_t e = 0; e < E; ++e) {
        if (ends[e] == starts[e] || ends[e] * N <= u0 || starts[e] * N >= u1) continue;
        columns(e, first_column(e, u0), first_column(e, u1));
      }
    }
  });
}

}  // namespace moe_ops

TORCH_LIBRARY_FRAGMENT(moe_train, m) {
  m.def("segment_mm(Tensor a, Tensor b, int[] ends, Tensor(a!) out) -> ()");
  m.def("segment_mm_t(Tensor a, Tensor b, int[] ends, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(moe_train, CPU, m) {
  m.impl("segment_mm", &moe_ops::segment_mm_op_cpu);
  m.impl("segment_mm_t", &moe_ops::segment_mm_t_op_cpu);
}
