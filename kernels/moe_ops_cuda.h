// Launchers of the CUDA kernels (moe_ops_cuda.cu), called by the ATen glue (moe_ops_cuda.cpp).
// Plain pointers, strides in elements, dtype codes: no torch headers on either side.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_ops_cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// buf[i, :] = cast(x[index[i], :]); x [T, d] (row stride ldx), buf [S, d] (row stride ldb).
cudaError_t dispatch(const void* x, int64_t ldx, int64_t num_src, DType x_dtype,
                     const int64_t* index, int64_t slots, int64_t d, void* buf, int64_t ldb,
                     DType buf_dtype, cudaStream_t stream);

// y[r, :] = sum_{j in [row_ptr[r], row_ptr[r+1])} w[perm[j]] * buf[perm[j], :]; weight is
// nullable and in the accumulation dtype of buf_dtype (float32, or float64 for float64).
// Device-side assert unless row_ptr[0] == 0 and row_ptr[num_rows] == slots (every slot in a row).
cudaError_t combine(const void* buf, int64_t ldb, DType buf_dtype, const void* weight,
                    const int64_t* row_ptr, const int64_t* perm, int64_t num_rows, int64_t slots,
                    int64_t d, void* y, int64_t ldy, DType y_dtype, cudaStream_t stream);

// grad_buf[s, :] = w[s] * grad_y[index[s], :]; grad_w[s] = dot(grad_y[index[s], :], buf[s, :])
// when grad_w is not null. All of one dtype; weight/grad_w in its accumulation dtype.
// Device-side assert on an index outside [0, num_rows).
cudaError_t combine_backward(const void* grad_y, int64_t ldg, int64_t num_rows, const void* buf,
                             int64_t ldb, DType dtype, const void* weight, const int64_t* index,
                             int64_t slots, int64_t d, void* grad_buf, int64_t ldgb, void* grad_w,
                             cudaStream_t stream);

// y[t, f] = x[t, f] * (lo + span * u), u = noise_uniform(row key(seed, first_row + t), f); float32,
// y contiguous [rows, d].
cudaError_t jitter(const float* x, int64_t ldx, int64_t rows, int64_t d, uint64_t seed,
                   int64_t first_row, float lo, float span, float* y, cudaStream_t stream);

}  // namespace moe_ops_cuda
