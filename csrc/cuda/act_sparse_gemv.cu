// Activation-sparse GEMV (decode, M <= 16): y = x_active @ w_t (+ bias) with the transposed weight
// w_t [K, N]. Input k is active for row m unless |x[m, k]| <= threshold (NaN and inf stay active).
//
// Grid: (column tiles of 256, K slices, row tiles of x). A block first compacts the active inputs
// of its K slice into shared memory (ballot + prefix counts, so the threshold test is the only
// pass over x), then its 8 warps take that list in batches of 8 rows: each lane reads 8 consecutive
// columns of an active weight row with one 16-byte load, issuing a whole batch (and the next one)
// before it waits on any. Inactive rows are never read, so bytes shrink with the
// activation density. The warps' sums meet in shared memory; with several K slices they go to an
// fp32 workspace by atomics and the last block of the column tile writes the output.
#include "cuda/common.cuh"

#include <algorithm>

namespace sparseflow::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kColsPerLane = 8;
constexpr int kTileN = 32 * kColsPerLane;  // columns per block
constexpr int64_t kMinChunk = 128;         // rows of K per block
constexpr int64_t kMaxChunk = 2048;        // bounds the shared-memory list
constexpr int kBatch = 8;  // active rows a warp loads before it multiplies any

int m_tile_for(int64_t M) { return M == 1 ? 1 : M == 2 ? 2 : 4; }

template <class T, int MT, bool VEC>
__global__ void __launch_bounds__(kThreads)
act_sparse_gemv_kernel(const T* __restrict__ x, int64_t M, int64_t K, int64_t ldx, const T* __restrict__ w, int64_t N,
                       int64_t ldw, float threshold, const T* __restrict__ bias, T* __restrict__ y, int64_t ldy,
                       float* __restrict__ ws, int* __restrict__ counters, int64_t chunk, int splits) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* list_k = reinterpret_cast<int*>(smem);                  // [chunk] active row, relative to k_lo
  float* list_x = reinterpret_cast<float*>(smem) + chunk;      // [chunk][MT] its x (0 where inactive)
  float* partial = reinterpret_cast<float*>(smem);             // [kWarps][MT][kTileN], after the list
  __shared__ int warp_count[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t n0 = int64_t(blockIdx.x) * kTileN;
  const int64_t k_lo = int64_t(blockIdx.y) * chunk;
  const int64_t k_hi = k_lo + chunk < K ? k_lo + chunk : K;
  const int64_t m0 = int64_t(blockIdx.z) * MT;

  // 1. Compact the active inputs of [k_lo, k_hi).
  int count = 0;
  for (int64_t base = k_lo; base < k_hi; base += kThreads) {
    const int64_t k = base + tid;
    float xv[MT];
    bool active = false;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      xv[m] = 0.f;
      if (k < k_hi && m0 + m < M) {
        const float v = to_f32(x[(m0 + m) * ldx + k]);
        if (!(fabsf(v) <= threshold)) {
          xv[m] = v;
          active = true;
        }
      }
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, active);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = count, pass = 0;
#pragma unroll
    for (int w2 = 0; w2 < kWarps; ++w2) {
      if (w2 < warp) offset += warp_count[w2];
      pass += warp_count[w2];
    }
    if (active) {
      const int pos = offset + __popc(ballot & ((1u << lane) - 1u));
      list_k[pos] = int(k - k_lo);
#pragma unroll
      for (int m = 0; m < MT; ++m) list_x[pos * MT + m] = xv[m];
    }
    count += pass;
    __syncthreads();  // warp_count is rewritten by the next pass; the list is complete after the last
  }

  // 2. Warps take the active rows in batches of kBatch: a lane issues the batch's loads (columns
  //    [col, col + 8) of each row) before it uses any, and the next batch's before it multiplies
  //    this one, so each lane keeps 8-16 loads in flight. Rows past the list re-read its last
  //    row and are not added.
  float acc[MT][kColsPerLane];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) acc[m][j] = 0.f;
  const int64_t col = n0 + lane * kColsPerLane;
  const bool full = VEC && col + kColsPerLane <= N;
  const int cols = col >= N ? 0 : N - col < kColsPerLane ? int(N - col) : kColsPerLane;
  auto load_batch = [&](int base, Raw8<T> (&raw)[kBatch]) {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int a = base + i < count ? base + i : count - 1;
      const T* row = w + (k_lo + list_k[a]) * ldw + col;
      raw[i] = full ? load_raw8(row) : load_raw8_partial(row, cols);
    }
  };
  if (warp * kBatch < count) {
    Raw8<T> cur[kBatch], next[kBatch];
    load_batch(warp * kBatch, cur);
    for (int base = warp * kBatch; base < count; base += kWarps * kBatch) {
      const int following = base + kWarps * kBatch;
      if (following < count) load_batch(following, next);
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        if (base + i >= count) break;  // warp-uniform
        float wv[kColsPerLane];
        unpack8(cur[i], wv);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float xm = list_x[(base + i) * MT + m];
#pragma unroll
          for (int j = 0; j < kColsPerLane; ++j) acc[m][j] = fmaf(xm, wv[j], acc[m][j]);
        }
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) cur[i] = next[i];
    }
  }

  // 3. Sum the warps (the list's shared memory is reused), then store or accumulate.
  __syncthreads();
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) partial[(warp * MT + m) * kTileN + lane * kColsPerLane + j] = acc[m][j];
  __syncthreads();
  const int64_t n = n0 + tid;  // each thread now owns one column for all MT rows
  float s[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    s[m] = 0.f;
#pragma unroll
    for (int w2 = 0; w2 < kWarps; ++w2) s[m] += partial[(w2 * MT + m) * kTileN + tid];
  }
  const float b = (bias != nullptr && n < N) ? to_f32(bias[n]) : 0.f;
  if (splits == 1) {
    if (n < N)
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m0 + m < M) y[(m0 + m) * ldy + n] = from_f32<T>(s[m] + b);
    return;
  }
  if (n < N)
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m0 + m < M) atomicAdd(ws + (m0 + m) * N + n, s[m]);
  const int64_t tile = int64_t(blockIdx.z) * gridDim.x + blockIdx.x;
  if (!last_block_of_tile(counters, tile, splits)) return;
  // Last block of the tile: write the output and leave the workspace zeroed for the next call.
  if (n < N)
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m0 + m < M) {
        float* cell = ws + (m0 + m) * N + n;
        y[(m0 + m) * ldy + n] = from_f32<T>(__ldcg(cell) + b);
        *cell = 0.f;
      }
  if (tid == 0) counters[tile] = 0;
}

// Dynamic shared memory of a block: the active-row list, reused afterwards for the warps' sums.
size_t smem_bytes(int64_t chunk, int m_tile) {
  return std::max(size_t(chunk) * (4 + 4 * m_tile), size_t(kWarps) * m_tile * kTileN * 4);
}

struct Plan {
  int64_t n_tiles, m_tiles, chunk, splits;
  size_t smem;
};

// K is split so that the grid is about one wave of the blocks that fit on the GPU at once: fewer
// blocks leave SMs idle, more add a second round of each block's serial steps.
Plan plan_for(int64_t M, int64_t N, int64_t K, int m_tile, int blocks_per_sm) {
  Plan p{};
  p.n_tiles = ceil_div(N, kTileN);
  p.m_tiles = ceil_div(M, m_tile);
  const int64_t want = std::max<int64_t>(1, int64_t(blocks_per_sm) * sm_count() / (p.n_tiles * p.m_tiles));
  p.chunk = std::clamp<int64_t>(ceil_div(ceil_div(K, want), 32) * 32, kMinChunk, kMaxChunk);
  p.splits = ceil_div(K, p.chunk);
  p.smem = smem_bytes(p.chunk, m_tile);
  return p;
}

// Blocks of this kernel one SM holds at once (registers bound it), asked of the runtime once.
template <class T, int MT, bool VEC>
int resident_blocks_per_sm() {
  static const int blocks = [] {
    int b = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, act_sparse_gemv_kernel<T, MT, VEC>, kThreads,
                                                      smem_bytes(kMaxChunk, MT)) !=
            cudaSuccess || b < 1) {
      (void)cudaGetLastError();
      b = 2;
    }
    return b;
  }();
  return blocks;
}

template <class T, int MT, bool VEC>
void launch(const ActSparseArgs& a) {
  const Plan p = plan_for(a.M, a.N, a.K, MT, resident_blocks_per_sm<T, MT, VEC>());
  require(p.splits <= 65535 && p.m_tiles <= 65535 && p.n_tiles <= 0x7fffffff, "act_sparse_gemv: shape too large");
  const dim3 grid(unsigned(p.n_tiles), unsigned(p.splits), unsigned(p.m_tiles));
  float* ws = static_cast<float*>(a.workspace);
  int* counters = reinterpret_cast<int*>(ws + a.M * a.N);
  act_sparse_gemv_kernel<T, MT, VEC><<<grid, kThreads, p.smem, reinterpret_cast<cudaStream_t>(a.stream)>>>(
      static_cast<const T*>(a.x), a.M, a.K, a.ldx, static_cast<const T*>(a.w_t), a.N, a.ldw, a.threshold,
      static_cast<const T*>(a.bias), static_cast<T*>(a.y), a.ldy, ws, counters, p.chunk, int(p.splits));
}

template <class T>
void dispatch(const ActSparseArgs& a, bool vec) {
  switch (m_tile_for(a.M) * 2 + (vec ? 1 : 0)) {
    case 2: return launch<T, 1, false>(a);
    case 3: return launch<T, 1, true>(a);
    case 4: return launch<T, 2, false>(a);
    case 5: return launch<T, 2, true>(a);
    case 8: return launch<T, 4, false>(a);
    default: return launch<T, 4, true>(a);
  }
}

}  // namespace

int64_t act_sparse_gemv_workspace_bytes(int64_t M, int64_t N, int64_t /*K*/) {
  if (M < 1 || N < 1) return 0;
  return (M * N + ceil_div(N, kTileN) * ceil_div(M, m_tile_for(M))) * 4;
}

void act_sparse_gemv(const ActSparseArgs& a) {
  require(a.dtype == kFloat32 || a.dtype == kBFloat16 || a.dtype == kFloat16,
          "act_sparse_gemv: dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
  require(a.M >= 1 && a.M <= kMaxDecodeM, "act_sparse_gemv: M must be in [1, 16], got " + std::to_string(a.M));
  require(a.K >= 1 && a.N >= 1, "act_sparse_gemv: K and N must be positive");
  require(a.K < (int64_t(1) << 31), "act_sparse_gemv: K must be below 2^31");
  require(a.ldx >= a.K && a.ldw >= a.N && a.ldy >= a.N, "act_sparse_gemv: a row stride is smaller than its row");
  require(a.x && a.w_t && a.y, "act_sparse_gemv: null data pointer");
  require(a.threshold >= 0.f, "act_sparse_gemv: threshold must be >= 0");
  require(a.workspace && a.workspace_bytes >= act_sparse_gemv_workspace_bytes(a.M, a.N, a.K),
          "act_sparse_gemv: workspace too small");
  const bool vec = aligned16(a.w_t) && (a.ldw * int64_t(dtype_size(a.dtype))) % 16 == 0;
  switch (a.dtype) {
    case kFloat32: dispatch<float>(a, vec); break;
    case kBFloat16: dispatch<__nv_bfloat16>(a, vec); break;
    default: dispatch<__half>(a, vec); break;
  }
  check_launch("act_sparse_gemv");
}

}  // namespace sparseflow::cuda
