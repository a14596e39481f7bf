// Host-side argument checks and output allocation shared by the CPU ops (moe_ops.cpp) and the
// CUDA glue (moe_ops_cuda.cpp). ATen only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

namespace moe_ops {

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Accumulation dtype of a value dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A 2-D floating tensor with unit column stride (copied if needed).
inline at::Tensor rows_2d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [rows, d], got shape ", t.sizes());
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  return t.stride(1) == 1 ? t : t.contiguous();
}

// A 1-D int64 tensor of the given length on `like`'s device (contiguous).
inline at::Tensor index_1d(const at::Tensor& t, const at::Tensor& like, const char* op,
                           const char* name, int64_t length = -1) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(length < 0 || t.size(0) == length, op, ": ", name, " must have ", length,
              " entries, got ", t.size(0));
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
              " but the data is on ", like.device());
  return t.contiguous();
}

// Optional per-slot weight [S] in the accumulation dtype of `value_dtype`.
inline std::optional<at::Tensor> weight_1d(const std::optional<at::Tensor>& w,
                                           at::ScalarType value_dtype, int64_t slots,
                                           const at::Tensor& like, const char* op) {
  if (!w.has_value() || !w->defined()) return std::nullopt;
  const auto want = acc_dtype(value_dtype);
  TORCH_CHECK(w->scalar_type() == want, op, ": weight must be ", want, " for ", value_dtype,
              " data, got ", w->scalar_type());
  TORCH_CHECK(w->dim() == 1 && w->size(0) == slots, op, ": weight must have shape [", slots,
              "], got ", w->sizes());
  TORCH_CHECK(w->device() == like.device(), op, ": weight is on ", w->device(),
              " but the data is on ", like.device());
  return w->contiguous();
}

// Checks of the CSR by destination row; returns (row_ptr, perm) contiguous.
inline std::pair<at::Tensor, at::Tensor> csr(const at::Tensor& row_ptr, const at::Tensor& perm,
                                             int64_t num_rows, int64_t slots,
                                             const at::Tensor& like, const char* op) {
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  return {index_1d(row_ptr, like, op, "row_ptr", num_rows + 1),
          index_1d(perm, like, op, "perm", slots)};
}

}  // namespace moe_ops
