// Device helpers shared by the CUDA kernels: dtype conversion, vector loads, warp sums, the split-K
// ticket, and host-side checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/launch.h"

namespace sparseflow::cuda {

template <class T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Eight consecutive elements kept as raw bits (4 words for fp16/bf16, 8 for fp32), so a kernel can
// issue many loads before it converts any: unpack8 turns them into floats where they are used.
template <class T>
struct Raw8 {
  uint32_t w[sizeof(T) * 2];
};

// One or two 16-byte loads; `p` must be 16-byte aligned.
template <class T>
__device__ __forceinline__ Raw8<T> load_raw8(const T* p) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < int(sizeof(T)) / 2; ++i) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p) + i);
    r.w[4 * i] = q.x; r.w[4 * i + 1] = q.y; r.w[4 * i + 2] = q.z; r.w[4 * i + 3] = q.w;
  }
  return r;
}

// Elements i < count loaded one by one (the unaligned or partial case), zeros after them.
template <class T>
__device__ __forceinline__ Raw8<T> load_raw8_partial(const T* p, int count) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < int(sizeof(T)) * 2; ++i) r.w[i] = 0u;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i < count) {
      if constexpr (sizeof(T) == 4) {
        r.w[i] = __float_as_uint(__ldg(reinterpret_cast<const float*>(p) + i));
      } else {
        r.w[i / 2] |= uint32_t(__ldg(reinterpret_cast<const unsigned short*>(p) + i)) << (16 * (i & 1));
      }
    }
  }
  return r;
}

template <class T>
__device__ __forceinline__ void unpack8(const Raw8<T>& r, float (&out)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if constexpr (sizeof(T) == 4) {
      out[i] = __uint_as_float(r.w[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      out[i] = __uint_as_float(i & 1 ? r.w[i / 2] & 0xffff0000u : r.w[i / 2] << 16);
    } else {
      out[i] = __half2float(__ushort_as_half((unsigned short)(r.w[i / 2] >> (16 * (i & 1)))));
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Split-K: after this block's atomics into the workspace, take a ticket for output tile `tile`.
// Returns true (in every thread) for the block that arrives last; its reads of the workspace then
// see every block's sums. The fence-barrier-atomic order is the one cooperative groups' grid sync
// uses. Must be called by all threads of the block.
__device__ __forceinline__ bool last_block_of_tile(int* counters, int64_t tile, int splits) {
  __shared__ int ticket;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) ticket = atomicAdd(counters + tile, 1);
  __syncthreads();
  const bool last = ticket == splits - 1;
  if (last) __threadfence();
  return last;
}

// ---- host side ----
inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(kernel) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of the current device (cached per device).
inline int sm_count() {
  static int cached[64] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 108;
  if (device < 0 || device >= 64) return 108;
  if (cached[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 108;
    cached[device] = n;
  }
  return cached[device];
}

inline size_t dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

}  // namespace sparseflow::cuda
