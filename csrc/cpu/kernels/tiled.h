// Small batches (2 <= M) on AVX-512, for formats whose rows decompress cheaply (bitmask, N:M).
// The row kernels feed one x load to one dot product, so past M ~ 3 they fall behind dense GEMM
// (compute-bound, not memory-bound). Here each task decompresses 4 weight rows at a time into a
// tile that stays in L1/L2, and a register-blocked micro-kernel multiplies the tile with 4 rows of
// x per pass: 16 accumulators, each loaded x vector feeds 4 dot products and each tile vector 4.
// The compressed weight is still read once from memory; the tile never leaves the core's caches.
#pragma once
#include "cpu/kernels/common.h"

namespace sparseflow::cpu::SF_ISA {

#if defined(SF_ISA_avx512)
constexpr int64_t kTileRows = 4;  // weight rows per tile
constexpr int64_t kTileX = 4;     // rows of x per micro-kernel pass

inline bool tiled_applies(const LinearIO& io) {
  return io.M >= 2 && (io.dtype == DType::f32 || (io.dtype == DType::bf16 && use_bf16_dot()));
}

// out[i][r] = dot(tile row i, x row r) over kpad columns (both zero past K).
template <int RB>
void tile_micro_bf16(const uint16_t* tile, const uint16_t* x, int64_t kpad, float (*out)[kTileX]) {
  __m512 acc[kTileRows][RB];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t k = 0; k < kpad; k += 32) {
    __m512i w[kTileRows];
    for (int i = 0; i < kTileRows; ++i) w[i] = _mm512_loadu_si512(tile + i * kpad + k);
    for (int r = 0; r < RB; ++r) {
      const __m512i xv = _mm512_loadu_si512(x + r * kpad + k);
      for (int i = 0; i < kTileRows; ++i) acc[i][r] = dot_bf16(acc[i][r], w[i], xv);
    }
  }
  for (int i = 0; i < kTileRows; ++i)
    for (int r = 0; r < RB; ++r) out[i][r] = _mm512_reduce_add_ps(acc[i][r]);
}

template <int RB>
void tile_micro_f32(const float* tile, const float* x, int64_t kpad, float (*out)[kTileX]) {
  __m512 acc[kTileRows][RB];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t k = 0; k < kpad; k += 16) {
    __m512 w[kTileRows];
    for (int i = 0; i < kTileRows; ++i) w[i] = _mm512_loadu_ps(tile + i * kpad + k);
    for (int r = 0; r < RB; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * kpad + k);
      for (int i = 0; i < kTileRows; ++i) acc[i][r] = _mm512_fmadd_ps(w[i], xv, acc[i][r]);
    }
  }
  for (int i = 0; i < kTileRows; ++i)
    for (int r = 0; r < RB; ++r) out[i][r] = _mm512_reduce_add_ps(acc[i][r]);
}

// y = x @ W^T for W given by `decompress(n0, n1, out, ld)`, which writes dense rows [n0, n1) of W
// (K columns, the weight's own dtype) at out with row stride ld. T: uint16_t (bf16) or float.
// Prefetches bytes [p, p + bytes) into the caches: the tile after next is fetched from memory
// while this one computes (each tile is too short for the hardware prefetcher to ramp up).
inline void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}
constexpr int64_t kPrefetchTiles = 2;

template <class T, class Decompress, class Prefetch>
void tiled_linear_typed(const LinearIO& io, const Decompress& decompress, const Prefetch& prefetch) {
  constexpr int64_t kStep = sizeof(T) == 2 ? 32 : 16;
  const int64_t K = io.K, kpad = round_up(K, kStep);
  // x, zero-padded to kpad columns; rows holding NaN/inf are flagged for the caller's fix-up.
  std::vector<T> x(static_cast<size_t>(io.M * kpad), T{0});
  for (int64_t m = 0; m < io.M; ++m) {
    const T* src = static_cast<const T*>(io.x) + m * io.ldx;
    std::copy(src, src + K, x.data() + m * kpad);
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) finite &= std::isfinite(load_as_f32(src, k, io.dtype));
    if (io.nonfinite) io.nonfinite[m] = finite ? 0 : 1;
  }
  const int64_t units = (io.N + kTileRows - 1) / kTileRows;
  const int64_t want_tasks = std::max<int64_t>(1, io.threads) * 8;
  const int64_t per_task = std::max<int64_t>(1, (units + want_tasks - 1) / want_tasks);
  const int64_t tasks = (units + per_task - 1) / per_task;
  parallel_for(tasks, threads_for(io.threads, io.N * K * io.M), [&](int64_t t) {
    thread_local std::vector<T> tile_buf;
    tile_buf.assign(static_cast<size_t>(kTileRows * kpad), T{0});  // the padding columns stay zero
    T* tile = tile_buf.data();
    const int64_t n_end = std::min(io.N, (t + 1) * per_task * kTileRows);
    for (int64_t n0 = t * per_task * kTileRows; n0 < n_end; n0 += kTileRows) {
      const int64_t rows = std::min(kTileRows, io.N - n0);
      const int64_t ahead = n0 + kPrefetchTiles * kTileRows;
      if (ahead < n_end) prefetch(ahead, std::min(n_end, ahead + kTileRows));
      decompress(n0, n0 + rows, tile, kpad);
      for (int64_t i = rows; i < kTileRows; ++i) std::fill(tile + i * kpad, tile + (i + 1) * kpad, T{0});
      for (int64_t m0 = 0; m0 < io.M; m0 += kTileX) {
        const int RB = static_cast<int>(std::min(kTileX, io.M - m0));
        float out[kTileRows][kTileX];
        const T* xs = x.data() + m0 * kpad;
        const auto run = [&](auto rb) {
          constexpr int R = decltype(rb)::value;
          if constexpr (sizeof(T) == 2)
            tile_micro_bf16<R>(tile, xs, kpad, out);
          else
            tile_micro_f32<R>(tile, xs, kpad, out);
        };
        switch (RB) {
          case 1: run(std::integral_constant<int, 1>{}); break;
          case 2: run(std::integral_constant<int, 2>{}); break;
          case 3: run(std::integral_constant<int, 3>{}); break;
          default: run(std::integral_constant<int, 4>{}); break;
        }
        for (int r = 0; r < RB; ++r) {
          char* yrow = static_cast<char*>(io.y) + (m0 + r) * io.ldy * sizeof(T);
          for (int64_t i = 0; i < rows; ++i) {
            float v = out[i][r];
            if (io.bias) v += load_as_f32(io.bias, n0 + i, io.dtype);
            store_from_f32(yrow, n0 + i, io.dtype, v);
          }
        }
      }
    }
  });
}

// `prefetch(n0, n1)` touches the compressed bytes of rows [n0, n1) (see prefetch_range).
template <class Decompress, class Prefetch>
void tiled_linear(const LinearIO& io, const Decompress& decompress, const Prefetch& prefetch) {
  if (io.dtype == DType::f32)
    tiled_linear_typed<float>(io, decompress, prefetch);
  else
    tiled_linear_typed<uint16_t>(io, decompress, prefetch);
}
#endif

}  // namespace sparseflow::cpu::SF_ISA
