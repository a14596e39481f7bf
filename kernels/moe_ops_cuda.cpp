// CUDA implementations of the moe_train ops: argument checks and allocation in ATen, kernels
// launched on the current torch stream through the plain launchers of moe_ops_cuda.cu.
// Out-of-range indices are not checked here (that would synchronise): the kernels assert on the
// device (dispatch: index in range; combine: every slot in a CSR row; combine backward: index in
// range), which fails the next synchronising call with "device-side assert triggered".
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "moe_ops_cuda.h"
#include "moe_ops_host.h"

namespace moe_ops {
namespace {

moe_ops_cuda::DType code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return moe_ops_cuda::kFloat32;
    case at::kHalf:
      return moe_ops_cuda::kFloat16;
    case at::kBFloat16:
      return moe_ops_cuda::kBFloat16;
    case at::kDouble:
      return moe_ops_cuda::kFloat64;
    default:
      TORCH_CHECK(false, "moe_train ops: unsupported dtype ", t);
  }
}

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

at::Tensor combine_rows_cuda(const at::Tensor& buf_in, const std::optional<at::Tensor>& weight_in,
                             const at::Tensor& row_ptr_in, const at::Tensor& perm_in,
                             int64_t num_rows, at::ScalarType out_dtype, const char* op) {
  const at::Tensor buf = rows_2d(buf_in, op, "buf");
  const c10::cuda::CUDAGuard guard(buf.device());
  const int64_t slots = buf.size(0), d = buf.size(1);
  const auto [row_ptr, perm] = csr(row_ptr_in, perm_in, num_rows, slots, buf, op);
  const auto weight = weight_1d(weight_in, buf.scalar_type(), slots, buf, op);
  at::Tensor y = at::empty({num_rows, d}, buf.options().dtype(out_dtype));
  check_launch(moe_ops_cuda::combine(buf.data_ptr(), buf.stride(0), code(buf.scalar_type()),
                                     weight ? weight->data_ptr() : nullptr,
                                     row_ptr.data_ptr<int64_t>(), perm.data_ptr<int64_t>(),
                                     num_rows, slots, d, y.data_ptr(), d, code(out_dtype),
                                     stream_of(buf)),
               op);
  return y;
}

}  // namespace

at::Tensor dispatch_op_cuda(const at::Tensor& x_in, const at::Tensor& index_in,
                            std::optional<at::ScalarType> out_dtype) {
  const at::Tensor x = rows_2d(x_in, "dispatch", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor index = index_1d(index_in, x, "dispatch", "index");
  const auto out_t = out_dtype.value_or(x.scalar_type());
  const int64_t slots = index.size(0), d = x.size(1);
  at::Tensor buf = at::empty({slots, d}, x.options().dtype(out_t));
  check_launch(moe_ops_cuda::dispatch(x.data_ptr(), x.stride(0), x.size(0), code(x.scalar_type()),
                                      index.data_ptr<int64_t>(), slots, d, buf.data_ptr(), d,
                                      code(out_t), stream_of(x)),
               "dispatch");
  return buf;
}

at::Tensor dispatch_backward_op_cuda(const at::Tensor& grad_buf, const at::Tensor& row_ptr,
                                     const at::Tensor& perm, int64_t num_rows,
                                     at::ScalarType dtype) {
  return combine_rows_cuda(grad_buf, std::nullopt, row_ptr, perm, num_rows, dtype,
                           "dispatch_backward");
}

at::Tensor combine_op_cuda(const at::Tensor& buf, const std::optional<at::Tensor>& weight,
                           const at::Tensor& index, const at::Tensor& row_ptr,
                           const at::Tensor& perm, int64_t num_rows) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == buf.size(0),
              "combine: index must be int64 of shape [", buf.size(0), "], got ",
              index.scalar_type(), " ", index.sizes());
  return combine_rows_cuda(buf, weight, row_ptr, perm, num_rows, buf.scalar_type(), "combine");
}

std::tuple<at::Tensor, at::Tensor> combine_backward_op_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& buf_in,
    const std::optional<at::Tensor>& weight_in, const at::Tensor& index_in, bool weight_grad) {
  const char* op = "combine_backward";
  const at::Tensor grad_y = rows_2d(grad_y_in, op, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor index = index_1d(index_in, grad_y, op, "index");
  const int64_t slots = index.size(0), d = grad_y.size(1);
  at::Tensor buf;
  if (weight_grad) {
    buf = rows_2d(buf_in, op, "buf");
    TORCH_CHECK(buf.size(0) == slots && buf.size(1) == d &&
                    buf.scalar_type() == grad_y.scalar_type(),
                op, ": buf must be [", slots, ", ", d, "] ", grad_y.scalar_type(), ", got ",
                buf.sizes(), " ", buf.scalar_type());
  }
  const auto weight = weight_1d(weight_in, grad_y.scalar_type(), slots, grad_y, op);
  at::Tensor grad_buf = at::empty({slots, d}, grad_y.options());
  const auto acc = acc_dtype(grad_y.scalar_type());
  at::Tensor grad_w = at::empty({weight_grad ? slots : 0}, grad_y.options().dtype(acc));
  check_launch(moe_ops_cuda::combine_backward(
                   grad_y.data_ptr(), grad_y.stride(0), grad_y.size(0),
                   weight_grad ? buf.data_ptr() : nullptr, weight_grad ? buf.stride(0) : 0,
                   code(grad_y.scalar_type()), weight ? weight->data_ptr() : nullptr,
                   index.data_ptr<int64_t>(), slots, d, grad_buf.data_ptr(), d,
                   weight_grad ? grad_w.data_ptr() : nullptr, stream_of(grad_y)),
               op);
  return {grad_buf, grad_w};
}

at::Tensor jitter_op_cuda(const at::Tensor& x_in, int64_t seed, int64_t first_row, double eps) {
  const at::Tensor x = rows_2d(x_in, "jitter", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "jitter: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(first_row >= 0, "jitter: first_row must be >= 0, got ", first_row);
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  check_launch(moe_ops_cuda::jitter(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1),
                                    static_cast<uint64_t>(seed), first_row,
                                    static_cast<float>(1.0 - eps), static_cast<float>(2.0 * eps),
                                    y.data_ptr<float>(), stream_of(x)),
               "jitter");
  return y;
}

}  // namespace moe_ops

TORCH_LIBRARY_IMPL(moe_train, CUDA, m) {
  m.impl("dispatch", &moe_ops::dispatch_op_cuda);
  m.impl("dispatch_backward", &moe_ops::dispatch_backward_op_cuda);
  m.impl("combine", &moe_ops::combine_op_cuda);
  m.impl("combine_backward", &moe_ops::combine_backward_op_cuda);
  m.impl("jitter", &moe_ops::jitter_op_cuda);
}
