// 2:4 GEMV for decode (M <= 16): y = x @ W^T (+ bias) with W in sf.NM 2:4 layout (values [N, G*2],
// 2-bit positions packed 4 per byte, low bits first; G = ceil(K / 4)).
//
// Grid: (row tiles of 32, K chunks of 1024 columns, row tiles of x). A block stages its x chunk in
// shared memory as fp32 (padded by one float per 16 so the lanes' gathers hit different banks),
// then each warp takes 4 weight rows; a lane handles "units" of 4 groups = 16 columns, read as 8
// values in one 16-byte load plus 16 bits of positions, and gathers the two x values each group
// keeps. With several K chunks the rows' sums go to an fp32 workspace by atomics and the last
// block of the row tile writes the output.
//
// NaN/inf: dense F.linear turns x * 0 at pruned weights into NaN. A block whose x chunk holds any
// NaN or inf (block-uniform, found while staging) multiplies all four columns of each group with
// the zeros in place, which gives exactly the dense result; other blocks take the fast path.
#include "cuda/common.cuh"

namespace sparseflow::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;  // 32
constexpr int kChunk = 1024;                          // columns of K per block
constexpr int kUnitCols = 16;                         // 4 groups of 4 columns
constexpr int kUnitsPerLane = kChunk / kUnitCols / 32;  // 2

// Shared-memory slot of chunk column c: one float of padding per 16.
__device__ __forceinline__ int slot(int c) { return c + (c >> 4); }
constexpr int kSlots = kChunk + kChunk / 16;

int m_tile_for(int64_t M) { return M == 1 ? 1 : M == 2 ? 2 : M <= 4 ? 4 : 8; }

template <class T, int MT, bool VEC>
__global__ void __launch_bounds__(kThreads)
nm24_gemv_kernel(const T* __restrict__ x, int64_t M, int64_t K, int64_t ldx, const T* __restrict__ values, int64_t ldv,
                 const uint8_t* __restrict__ index, int64_t ldi, int64_t N, const T* __restrict__ bias,
                 T* __restrict__ y, int64_t ldy, float* __restrict__ ws, int* __restrict__ counters, int splits) {
  __shared__ float xs[MT][kSlots];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t G = (K + 3) / 4;
  const int64_t k0 = int64_t(blockIdx.y) * kChunk;
  const int64_t g0 = k0 / 4;
  const int64_t m0 = int64_t(blockIdx.z) * MT;

  // 1. Stage x[m0:m0+MT, k0:k0+kChunk] (zeros past K and past M).
  bool nonfinite = false;
  for (int i = tid; i < MT * kChunk; i += kThreads) {
    const int m = i / kChunk, c = i % kChunk;
    const int64_t k = k0 + c;
    float v = 0.f;
    if (m0 + m < M && k < K) v = to_f32(x[(m0 + m) * ldx + k]);
    xs[m][slot(c)] = v;
    nonfinite |= !isfinite(v);
  }
  const bool exact = __syncthreads_or(nonfinite);

  // 2. Rows of this warp; lane's units u = lane + 32 * uu.
  float acc[kRowsPerWarp][MT];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
  const int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t n = row0 + r;
    if (n >= N) break;  // warp-uniform
    const T* vrow = values + n * ldv;
    const uint8_t* irow = index + n * ldi;
#pragma unroll
    for (int uu = 0; uu < kUnitsPerLane; ++uu) {
      const int u = lane + 32 * uu;
      const int64_t gs = g0 + int64_t(u) * 4;  // first group of the unit
      if (gs >= G) continue;
      float v[8];
      unsigned bits = 0;  // group q's two positions at bits 4q (first) and 4q + 2 (second)
      if (VEC && gs + 4 <= G) {
        unpack8(load_raw8(vrow + gs * 2), v);
        bits = __ldg(reinterpret_cast<const unsigned short*>(irow + gs / 2));
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t g = gs + q;
          v[2 * q] = v[2 * q + 1] = 0.f;
          if (g < G) {
            v[2 * q] = to_f32(vrow[2 * g]);
            v[2 * q + 1] = to_f32(vrow[2 * g + 1]);
            bits |= ((unsigned(irow[g / 2]) >> ((g & 1) * 4)) & 0xFu) << (4 * q);
          }
        }
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int c = u * kUnitCols + 4 * q;  // chunk column of the group's first element
        const int p0 = (bits >> (4 * q)) & 3, p1 = (bits >> (4 * q + 2)) & 3;
        const float v0 = v[2 * q], v1 = v[2 * q + 1];
        if (!exact) {
#pragma unroll
          for (int m = 0; m < MT; ++m)
            acc[r][m] = fmaf(v1, xs[m][slot(c + p1)], fmaf(v0, xs[m][slot(c + p0)], acc[r][m]));
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float wi = i == p0 ? v0 : (i == p1 ? v1 : 0.f);
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(wi, xs[m][slot(c + i)], acc[r][m]);
          }
        }
      }
    }
  }

  // 3. Row sums: store, or accumulate and let the last block of the row tile store.
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t n = row0 + r;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float s = warp_sum(acc[r][m]);
      if (lane == 0 && n < N && m0 + m < M) {
        if (splits == 1)
          y[(m0 + m) * ldy + n] = from_f32<T>(s + (bias != nullptr ? to_f32(bias[n]) : 0.f));
        else
          atomicAdd(ws + (m0 + m) * N + n, s);
      }
    }
  }
  if (splits == 1) return;
  const int64_t tile = int64_t(blockIdx.z) * gridDim.x + blockIdx.x;
  if (!last_block_of_tile(counters, tile, splits)) return;
  // Last block of the row tile: write the output and leave the workspace zeroed for the next call.
  for (int i = tid; i < kRowsPerBlock * MT; i += kThreads) {
    const int64_t n = int64_t(blockIdx.x) * kRowsPerBlock + i % kRowsPerBlock;
    const int64_t m = m0 + i / kRowsPerBlock;
    if (n < N && m < M) {
      float* cell = ws + m * N + n;
      y[m * ldy + n] = from_f32<T>(__ldcg(cell) + (bias != nullptr ? to_f32(bias[n]) : 0.f));
      *cell = 0.f;
    }
  }
  if (tid == 0) counters[tile] = 0;
}

template <class T, int MT, bool VEC>
void launch(const Nm24Args& a, int64_t splits, int64_t m_tiles) {
  const dim3 grid(unsigned(ceil_div(a.N, kRowsPerBlock)), unsigned(splits), unsigned(m_tiles));
  float* ws = static_cast<float*>(a.workspace);
  int* counters = reinterpret_cast<int*>(ws + a.M * a.N);
  nm24_gemv_kernel<T, MT, VEC><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(
      static_cast<const T*>(a.x), a.M, a.K, a.ldx, static_cast<const T*>(a.values), a.ldv, a.index, a.ldi, a.N,
      static_cast<const T*>(a.bias), static_cast<T*>(a.y), a.ldy, ws, counters, int(splits));
}

template <class T>
void dispatch(const Nm24Args& a, int m_tile, int64_t splits, int64_t m_tiles, bool vec) {
  switch (m_tile * 2 + (vec ? 1 : 0)) {
    case 2: return launch<T, 1, false>(a, splits, m_tiles);
    case 3: return launch<T, 1, true>(a, splits, m_tiles);
    case 4: return launch<T, 2, false>(a, splits, m_tiles);
    case 5: return launch<T, 2, true>(a, splits, m_tiles);
    case 8: return launch<T, 4, false>(a, splits, m_tiles);
    case 9: return launch<T, 4, true>(a, splits, m_tiles);
    case 16: return launch<T, 8, false>(a, splits, m_tiles);
    default: return launch<T, 8, true>(a, splits, m_tiles);
  }
}

}  // namespace

int64_t nm24_gemv_workspace_bytes(int64_t M, int64_t N, int64_t /*K*/) {
  if (M < 1 || N < 1) return 0;
  return (M * N + ceil_div(N, kRowsPerBlock) * ceil_div(M, m_tile_for(M))) * 4;
}

void nm24_gemv(const Nm24Args& a) {
  require(a.dtype == kFloat32 || a.dtype == kBFloat16 || a.dtype == kFloat16,
          "nm24_gemv: dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
  require(a.M >= 1 && a.M <= kMaxDecodeM, "nm24_gemv: M must be in [1, 16], got " + std::to_string(a.M));
  require(a.K >= 1 && a.N >= 1, "nm24_gemv: K and N must be positive");
  const int64_t G = ceil_div(a.K, 4);
  require(a.ldx >= a.K && a.ldy >= a.N, "nm24_gemv: a row stride of x or y is smaller than its row");
  require(a.ldv >= 2 * G, "nm24_gemv: values row stride " + std::to_string(a.ldv) + " < 2 * groups");
  require(a.ldi >= ceil_div(G, 2), "nm24_gemv: index row stride " + std::to_string(a.ldi) + " < ceil(groups / 2)");
  require(a.x && a.values && a.index && a.y, "nm24_gemv: null data pointer");
  require(a.workspace && a.workspace_bytes >= nm24_gemv_workspace_bytes(a.M, a.N, a.K), "nm24_gemv: workspace too small");
  const int m_tile = m_tile_for(a.M);
  const int64_t splits = ceil_div(a.K, kChunk), m_tiles = ceil_div(a.M, m_tile);
  require(splits <= 65535 && ceil_div(a.N, kRowsPerBlock) <= 0x7fffffff, "nm24_gemv: shape too large");
  const int64_t esize = int64_t(dtype_size(a.dtype));
  const bool vec = aligned16(a.values) && (a.ldv * esize) % 16 == 0 &&
                   (reinterpret_cast<uintptr_t>(a.index) & 1u) == 0 && a.ldi % 2 == 0;
  switch (a.dtype) {
    case kFloat32: dispatch<float>(a, m_tile, splits, m_tiles, vec); break;
    case kBFloat16: dispatch<__nv_bfloat16>(a, m_tile, splits, m_tiles, vec); break;
    default: dispatch<__half>(a, m_tile, splits, m_tiles, vec); break;
  }
  check_launch("nm24_gemv");
}

}  // namespace sparseflow::cuda
