// Batches on AVX-512, for formats whose rows decompress cheaply (bitmask, N:M), from the row counts
// in each format's TiledFrom (2 to 9: where the row kernels, which feed one x load to one dot
// product, fall behind; 2:4 in bf16 has its own GEMM, gemm_nm24.h). Here each task decompresses a
// few weight rows at a time into a tile that stays in the core's caches and multiplies it with x
// in registers:
// - fp32, and bf16 below kGemmMinRows rows: 4 weight rows times 4 rows of x per pass, 16
//   accumulators, each loaded x vector feeding 4 dot products and each tile vector 4;
// - bf16 from kGemmMinRows rows: a GEMM micro-kernel (gemm_micro_bf16) that runs at 92-95% of the
//   dot-product peak, so that decompressing each weight once is the only cost over dense.
// The compressed weight is still read once from memory; the tile never leaves the core's caches.
#pragma once
#include "cpu/kernels/common.h"

namespace sparseflow::cpu::SF_ISA {

#if defined(SF_ISA_avx512)
constexpr int64_t kTileRows = 4;  // weight rows per tile
constexpr int64_t kTileX = 4;     // rows of x per micro-kernel pass

// From how many rows of x each dtype takes the tiles. Below, the row kernels (which read the
// compressed weight once for all rows, streaming it) win: A/B in one process, 4096x4096, bf16
// bitmask at 2 / 3 / 6 rows 1.98x / 1.75x / 1.12x over dense against 1.15x / 1.11x / 0.97x tiled,
// float32 bitmask at 8 rows 2.22x against 2.07x (at 11, 2.33x against 2.60x; from 9 rows a row kernel
// would pass over the weight twice, kRowGroup = 8), float32 2:4 at 4 rows 3.66x against 2.81x.
struct TiledFrom {
  int64_t f32, bf16;
};
inline bool tiled_applies(const LinearIO& io, TiledFrom from) {
  if (io.dtype == DType::f32) return io.M >= from.f32;
  return io.dtype == DType::bf16 && use_bf16_dot() && io.M >= from.bf16;
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
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
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

// ---- bf16, M >= kGemmMinRows: the weight broadcast, x packed 16 rows to a vector ----
// vdpbf16ps adds, in each 32-bit lane, the product of two bf16 pairs. Packing x as
// [16-row block][k pair][16 rows] puts one k pair of 16 rows in a vector; a pair of a
// decompressed weight row is then broadcast and multiplied with it. The weight needs no
// transpose, and the micro-kernel's 24 accumulators make it bound by dot products (one per
// cycle), not by loads: each x vector feeds NR dot products, each broadcast MB of them.
constexpr int64_t kGemmMinRows = 12;  // below it the 4 x 4 kernel measured faster (16 lanes, M padded)
constexpr int64_t kGemmTileRows = 48;   // weight rows decompressed per task (a multiple of 24)
// k pairs per cache block: the block of x stays in L2 (256 KiB at M = 128). 128 to 1024 pairs
// measured within 5%, 512 and 1024 best at M = 128.
constexpr int64_t kGemmBlockPairs = 512;

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// c[i][16 j + l] += sum over p of (pair p of bf16 row i of `bcast`, broadcast) . (lane l of vector
// j of pair p, at vec + j * vec_j + p * vec_p: 16 pairs of bf16). The NR x NV accumulators live in
// registers (NR * NV <= 24): each vector load feeds NR dot products, each broadcast NV. Both bf16
// GEMMs use it: here the weight rows are broadcast against packed x, in gemm_kn.h rows of x against
// packed weight columns.
template <int NR, int NV>
void gemm_micro_bf16(const uint16_t* bcast, int64_t ld, const uint32_t* vec, int64_t vec_j, int64_t vec_p,
                     int64_t pairs, float* c, int64_t ldc) {
  __m512 acc[NR][NV];  // fully unrolled below, so that the accumulators live in registers
#pragma GCC unroll 24
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_loadu_ps(c + i * ldc + 16 * j);
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i v[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) v[j] = _mm512_loadu_si512(vec + j * vec_j + p * vec_p);
#pragma GCC unroll 24
    for (int i = 0; i < NR; ++i) {
      const __m512i b = _mm512_set1_epi32(static_cast<int>(load_pair(bcast + i * ld + 2 * p)));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = dot_bf16(acc[i][j], b, v[j]);
    }
  }
#pragma GCC unroll 24
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

// Packs x (bf16) as [M / 16 blocks, row stride ldxb][pairs][16] pairs, zero past M and K, and
// flags rows that hold a NaN or inf (all exponent bits set). 16 x 16 pairs at a time are
// transposed in registers.
inline void transpose16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {
      t[8 * h + j] = _mm512_shuffle_i32x4(r[8 * h + j], r[8 * h + j + 4], 0x88);
      t[8 * h + j + 4] = _mm512_shuffle_i32x4(r[8 * h + j], r[8 * h + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

inline void pack_x_pairs_bf16(const LinearIO& io, int64_t pairs, int64_t ldxb, uint32_t* xp) {
  const int64_t K = io.K, blocks = (io.M + 15) / 16, full = K / 2;
  const __m512i exp_bits = _mm512_set1_epi16(0x7f80);
  parallel_for(blocks, threads_for(io.threads, io.M * K * 64), [&](int64_t b) {
    const uint16_t* src[16];
    const int64_t valid = std::min<int64_t>(16, io.M - b * 16);
    for (int r = 0; r < 16; ++r) src[r] = static_cast<const uint16_t*>(io.x) + (b * 16 + std::min<int64_t>(r, valid - 1)) * io.ldx;
    uint32_t* dst = xp + b * ldxb;
    __mmask32 nonfinite[16] = {};
    int64_t p = 0;
    for (; p + 16 <= full; p += 16) {
      __m512i v[16];
      for (int r = 0; r < 16; ++r) {
        v[r] = r < valid ? _mm512_loadu_si512(src[r] + 2 * p) : _mm512_setzero_si512();
        nonfinite[r] |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(v[r], exp_bits), exp_bits);
      }
      transpose16_epi32(v);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (p + j) * 16, v[j]);
    }
    for (int r = 0; r < 16; ++r) {  // the last pairs (and an odd K's last element) one at a time
      bool bad = nonfinite[r] != 0;
      for (int64_t q = p; q < pairs; ++q) {
        const uint32_t lo = src[r][2 * q], hi = 2 * q + 1 < K ? src[r][2 * q + 1] : 0;
        const uint32_t v = r < valid ? lo | hi << 16 : 0;
        dst[q * 16 + r] = v;
        bad |= (v & 0x7f80u) == 0x7f80u || (v & 0x7f800000u) == 0x7f800000u;
      }
      if (io.nonfinite && r < valid) io.nonfinite[b * 16 + r] = bad ? 1 : 0;
    }
  });
}

// One tile: weight rows [n0, n0 + rows) decompressed into `tile`, multiplied with all of x into
// c ([kGemmTileRows][Mp] floats), then written to y. `prefetch_next` fetches a share of the next
// tile's compressed bytes per block of k, so that they arrive while this tile computes.
template <class Decompress, class PrefetchNext>
void gemm_tile_bf16(const LinearIO& io, const Decompress& decompress, const PrefetchNext& prefetch_next,
                    int64_t n0, int64_t rows, const uint32_t* xp, int64_t ldxb, int64_t pairs, uint16_t* tile,
                    int64_t ld, float* c) {
  const int64_t K = io.K, blocks = (io.M + 15) / 16, Mp = blocks * 16;
  decompress(n0, n0 + rows, tile, ld);
  // Rows past N and the pad column of an odd K meet zeros of x, but must not hold NaN/inf.
  for (int64_t i = rows; i < kGemmTileRows; ++i) std::fill(tile + i * ld, tile + i * ld + 2 * pairs, uint16_t{0});
  if (K & 1)
    for (int64_t i = 0; i < rows; ++i) tile[i * ld + K] = 0;
  std::fill(c, c + kGemmTileRows * Mp, 0.0f);
  const int64_t kblocks = (pairs + kGemmBlockPairs - 1) / kGemmBlockPairs;
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const int64_t p0 = kb * kGemmBlockPairs, np = std::min(kGemmBlockPairs, pairs - p0);
    prefetch_next(kb, kblocks);
    for (int64_t b0 = 0; b0 < blocks; b0 += 4) {
      const auto run = [&](auto mb) {
        constexpr int MB = decltype(mb)::value, NR = 24 / MB;
        for (int64_t i0 = 0; i0 < kGemmTileRows; i0 += NR)
          gemm_micro_bf16<NR, MB>(tile + i0 * ld + 2 * p0, ld, xp + b0 * ldxb + p0 * 16, ldxb, 16, np,
                                  c + i0 * Mp + b0 * 16, Mp);
      };
      with_count<4>(blocks - b0, run);
    }
  }
  float bias[kGemmTileRows] = {};
  if (io.bias)
    for (int64_t i = 0; i < rows; ++i) bias[i] = load_as_f32(io.bias, n0 + i, io.dtype);
  for (int64_t m = 0; m < io.M; ++m) {
    uint16_t* yrow = static_cast<uint16_t*>(io.y) + m * io.ldy + n0;
    for (int64_t i = 0; i < rows; ++i) yrow[i] = f32_to_bf16(c[i * Mp + m] + bias[i]);
  }
}

template <class Decompress, class Prefetch>
void gemm_linear_bf16(const LinearIO& io, const Decompress& decompress, const Prefetch& prefetch) {
  // Row strides one cache line past a multiple of 64 bytes: rows 8 KiB apart would all fall in
  // one L1 set, and the 24 rows a micro-kernel reads would evict each other.
  const int64_t K = io.K, pairs = (K + 1) / 2, ld = round_up(K, 32) + 32, ldxb = pairs * 16 + 16;
  const int64_t blocks = (io.M + 15) / 16, Mp = blocks * 16;
  thread_local std::vector<uint32_t> xp_kept;
  std::vector<uint32_t> xp_once;
  uint32_t* const xp = call_buffer(xp_kept, xp_once, static_cast<size_t>(blocks * ldxb));  // the workers use it too
  pack_x_pairs_bf16(io, pairs, ldxb, xp);
  // Each task takes consecutive tiles, so the tile it prefetches is the one it runs next.
  const int threads = threads_for(io.threads, io.N * K * io.M);
  const int64_t tiles = (io.N + kGemmTileRows - 1) / kGemmTileRows;
  const int64_t tasks = std::min<int64_t>(tiles, int64_t{threads} * 8);
  parallel_for(tasks, threads, [&](int64_t t) {
    thread_local std::vector<uint16_t> tile_kept;
    thread_local std::vector<float> c_kept;
    std::vector<uint16_t> tile_once;
    std::vector<float> c_once;
    uint16_t* const tile_buf = call_buffer(tile_kept, tile_once, static_cast<size_t>(kGemmTileRows * ld));
    float* const c_buf = call_buffer(c_kept, c_once, static_cast<size_t>(kGemmTileRows * Mp));
    const int64_t end = (t + 1) * tiles / tasks;  // equal shares: tasks differ by one tile at most
    for (int64_t tile = t * tiles / tasks; tile < end; ++tile) {
      const int64_t n0 = tile * kGemmTileRows, next = n0 + kGemmTileRows;
      const int64_t next_rows = tile + 1 < end ? std::min(kGemmTileRows, io.N - next) : 0;
      const auto prefetch_next = [&](int64_t kb, int64_t kblocks) {
        const int64_t r0 = next_rows * kb / kblocks, r1 = next_rows * (kb + 1) / kblocks;
        if (r1 > r0) prefetch(next + r0, next + r1);
      };
      gemm_tile_bf16(io, decompress, prefetch_next, n0, std::min(kGemmTileRows, io.N - n0), xp, ldxb, pairs,
                     tile_buf, ld, c_buf);
    }
  });
}

// `prefetch(n0, n1)` touches the compressed bytes of rows [n0, n1) (see prefetch_range).
template <class Decompress, class Prefetch>
void tiled_linear(const LinearIO& io, const Decompress& decompress, const Prefetch& prefetch) {
  if (io.dtype == DType::f32)
    tiled_linear_typed<float>(io, decompress, prefetch);
  else if (io.M >= kGemmMinRows)
    gemm_linear_bf16(io, decompress, prefetch);
  else
    tiled_linear_typed<uint16_t>(io, decompress, prefetch);
}
#endif


}  // namespace sparseflow::cpu::SF_ISA
