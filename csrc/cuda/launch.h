// Host entry points of the CUDA kernels (csrc/cuda/*.cu). Plain types only: raw device pointers,
// sizes, strides (in elements) and the CUDA stream as an integer (torch's
// `torch.cuda.current_stream().cuda_stream`), so neither this header nor the binding needs CUDA or
// torch headers. Each function checks its arguments, launches asynchronously on the stream and
// throws std::invalid_argument (bad arguments) or std::runtime_error (CUDA errors).
//
// Split-K workspace: the caller passes `workspace_bytes(...)` bytes of ZEROED device memory; the
// kernels accumulate fp32 partial sums and per-tile tickets there, and the last block of each tile
// writes the output (so fp16/bf16 outputs never see atomics) and zeroes what the tile used. The
// workspace is therefore zero again after every call: callers keep one per stream, no memset.
#pragma once

#include <cstdint>

namespace sparseflow::cuda {

// Same dtype codes as the CPU binding: 0 = float32, 1 = bfloat16, 2 = float16.
constexpr int kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2;
// Rows of x the decode kernels take.
constexpr int64_t kMaxDecodeM = 16;

// y[M, N] = sum over active k of x[m, k] * w_t[k, :] (+ bias); input k is active for row m unless
// |x[m, k]| <= threshold (NaN and inf are active). w_t is the transposed weight [K, N], row stride
// ldw. A weight row is read only when some row of x needs it.
struct ActSparseArgs {
  int dtype;
  const void* x;  // [M, K], row stride ldx, unit column stride
  int64_t M, K, ldx;
  const void* w_t;  // [K, N], row stride ldw
  int64_t N, ldw;
  float threshold;   // already rounded to x's dtype, as the reference compares
  const void* bias;  // [N] or null
  void* y;           // [M, N], row stride ldy
  int64_t ldy;
  void* workspace;
  int64_t workspace_bytes;
  uintptr_t stream;
};
int64_t act_sparse_gemv_workspace_bytes(int64_t M, int64_t N, int64_t K);
void act_sparse_gemv(const ActSparseArgs& a);

// y[M, N] = x @ W^T (+ bias) for a 2:4 weight in sf.NM layout: values [N, G*2] (row stride ldv),
// index uint8 [N, ldi] with 2-bit positions, 4 per byte, low bits first; G = ceil(K / 4).
struct Nm24Args {
  int dtype;
  const void* x;  // [M, K], row stride ldx, unit column stride
  int64_t M, K, ldx;
  const void* values;
  int64_t ldv;
  const uint8_t* index;
  int64_t ldi;
  int64_t N;
  const void* bias;
  void* y;
  int64_t ldy;
  void* workspace;
  int64_t workspace_bytes;
  uintptr_t stream;
};
int64_t nm24_gemv_workspace_bytes(int64_t M, int64_t N, int64_t K);
void nm24_gemv(const Nm24Args& a);

}  // namespace sparseflow::cuda
