// 2:4 weights times a batch of x (bf16, AVX-512 BF16): a GEMM that skips the zeros.
// Each group of 4 weights keeps two values, at positions p0 < p1: they are one bf16 pair, so one
// vdpbf16ps lane does the group's whole product when its x pair is (x[4g + p0], x[4g + p1]). The 4
// x elements of a group (8 bytes of a row of x) are broadcast and a byte shuffle (vpshufb) puts
// each lane's pair in place, with shuffle controls made from the stored positions. That takes half
// the dot products of dense, plus one shuffle each: in L1 the micro-kernel runs at ~0.77 dot
// products per cycle against ~1.0 for dense, each doing twice the useful work.
//
// C[m][n] in tiles of kNm24Cols output features (two vectors of 16 lanes). Per tile and per block
// of kNm24Groups groups, the tile's value pairs are transposed to [group][lane] and its controls
// built as [group][lane] (64 KiB, read in order from L2); then micro-kernels run over the rows of
// x, kNm24MR at a time.
#pragma once
#include <array>

#include "cpu/kernels/tiled.h"

namespace sparseflow::cpu::SF_ISA {

#if defined(SF_ISA_avx512)
constexpr int64_t kNm24Cols = 32;
// Groups per block: 256 (64 KiB of tile data, read in order from L2) measured 5-10% faster than 64
// (L1-sized) at M = 128; 128 (just L1's size) and 1024 (x's block then overflows L2) were slower.
constexpr int64_t kNm24Groups = 256;
constexpr int kNm24MR = 12;  // 24 accumulators
// From 4 rows of x (A/B, 4096x4096: 1.08x / 1.20x / 1.14x over dense at 4 / 6 / 11 rows, where the
// decompressing tiles gave 1.11x / 1.09x / 0.94x; the row kernel wins below).
constexpr int64_t kNm24MinRows = 4;
constexpr int64_t kNm24TileStride = 2 * kNm24Cols;  // per group: 32 value pairs, then 32 controls
constexpr int64_t kNm24TileWords = kNm24Groups * kNm24TileStride;  // a task's tile buffer (64 KiB)

inline bool nm24_gemm_applies(const NMView& w, const LinearIO& io) {
  return io.dtype == DType::bf16 && use_bf16_dot() && w.n == 2 && w.m == 4 && io.M >= kNm24MinRows;
}

// c[r][0, 32) += over groups g < G: (row r of x: its 4 elements of group g, shuffled by ctrl[g])
// . pairs[g], for MR rows of x (row stride ldx, starting at the block's first group).
template <int MR>
void nm24_micro(const uint16_t* x, int64_t ldx, const uint32_t* tile, int64_t G, float* c) {
  constexpr int NV = kNm24Cols / 16;
  __m512 acc[MR][NV];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_loadu_ps(c + r * kNm24Cols + 16 * j);
  for (int64_t g = 0; g < G; ++g) {
    const uint32_t* t = tile + g * kNm24TileStride;
    __m512i w[NV], s[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      w[j] = _mm512_load_si512(t + 16 * j);
      s[j] = _mm512_load_si512(t + kNm24Cols + 16 * j);
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      int64_t quad;
      std::memcpy(&quad, x + r * ldx + 4 * g, 8);
      const __m512i xb = _mm512_set1_epi64(quad);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = dot_bf16(acc[r][j], _mm512_shuffle_epi8(xb, s[j]), w[j]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + r * kNm24Cols + 16 * j, acc[r][j]);
}

// Loads 16 rows of a chunk, rows n.. (the first `live` of them real): v[r] = the 32-bit words
// [word0, word0 + words) of the row's values (bf16 pairs, or float32 values), fields[r] = its
// `bytes` index bytes from byte gc / 2. Missing rows and words past `words` are zero.
template <class Field>
inline void nm24_load_chunk(const NMView& w, int64_t n, int64_t live, int64_t row_words, int64_t word0, int64_t words,
                            int64_t gc, int64_t bytes, __m512i v[16], Field fields[16]) {
  const __mmask16 mask = static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(words)));
  for (int r = 0; r < 16; ++r) {
    fields[r] = 0;
    if (r >= live) {
      v[r] = _mm512_setzero_si512();
      continue;
    }
    v[r] = _mm512_maskz_loadu_epi32(mask, static_cast<const uint32_t*>(w.values) + (n + r) * row_words + word0);
    const uint8_t* f = w.index + (n + r) * w.index_stride + gc / 2;
    if (bytes == static_cast<int64_t>(sizeof(Field)))  // a constant size: a variable one is a library call
      std::memcpy(&fields[r], f, sizeof(Field));
    else
      std::memcpy(&fields[r], f, static_cast<size_t>(bytes));
  }
}

// The pairs and shuffle controls of rows [n0, n0 + rows) (rows <= kNm24Cols) for groups [g0, g0 + G)
// (G <= kNm24Groups), lanes past `rows` zero. 16 rows x 16 groups at a time: the value pairs by a
// 16 x 16 transpose of 32-bit elements; the 4-bit position fields (two groups per index byte) by a
// byte transpose (vpermt2b), then a 16-entry table from the field to the lane's shuffle control.
inline void nm24_prepare(const NMView& w, int64_t n0, int64_t rows, int64_t g0, int64_t G, uint32_t* tile) {
  const int64_t groups = (w.cols + 3) / 4;
  // lane control for each 4-bit field (p0 | p1 << 2): bytes 2 p0, 2 p0 + 1, 2 p1, 2 p1 + 1
  static const std::array<uint32_t, 16> kControl = [] {
    std::array<uint32_t, 16> t{};
    for (uint32_t f = 0; f < 16; ++f) {
      const uint32_t p0 = f & 3, p1 = f >> 2;
      t[f] = (2 * p0) | (2 * p0 + 1) << 8 | (2 * p1) << 16 | (2 * p1 + 1) << 24;
    }
    return t;
  }();
  static const std::array<uint8_t, 128> kTranspose = [] {  // output byte 16 b + r <- input byte 8 r + b
    std::array<uint8_t, 128> t{};
    for (int b = 0; b < 8; ++b)
      for (int r = 0; r < 16; ++r) t[16 * b + r] = static_cast<uint8_t>(8 * r + b);
    return t;
  }();
  const __m512i lut = _mm512_loadu_si512(kControl.data());
  const __m512i tidx0 = _mm512_loadu_si512(kTranspose.data()), tidx1 = _mm512_loadu_si512(kTranspose.data() + 64);
  const __m512i low4 = _mm512_set1_epi32(0xf);
  for (int64_t h = 0; h < kNm24Cols / 16; ++h) {
    const int64_t r0 = 16 * h, live = std::clamp<int64_t>(rows - r0, 0, 16);
    for (int64_t c = 0; c < G; c += 16) {
      const int64_t gc = g0 + c, ng = std::min<int64_t>(16, groups - gc);
      __m512i v[16];
      alignas(64) uint64_t fields[16];
      nm24_load_chunk(w, n0 + r0, live, groups, gc, ng, gc, (ng + 1) / 2, v, fields);
      transpose16_epi32(v);
      for (int j = 0; j < 16; ++j) _mm512_store_si512(tile + (c + j) * kNm24TileStride + r0, v[j]);
      const __m512i a = _mm512_load_si512(fields), b = _mm512_load_si512(fields + 8);
      alignas(64) uint8_t bytes[128];  // [index byte of the chunk][row]
      _mm512_store_si512(bytes, _mm512_permutex2var_epi8(a, tidx0, b));
      _mm512_store_si512(bytes + 64, _mm512_permutex2var_epi8(a, tidx1, b));
      for (int k = 0; k < 8; ++k) {
        const __m512i f = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes + 16 * k)));
        _mm512_store_si512(tile + (c + 2 * k) * kNm24TileStride + kNm24Cols + r0, _mm512_permutexvar_epi32(_mm512_and_si512(f, low4), lut));
        _mm512_store_si512(tile + (c + 2 * k + 1) * kNm24TileStride + kNm24Cols + r0, _mm512_permutexvar_epi32(_mm512_srli_epi32(f, 4), lut));
      }
    }
  }
}

// Touches the bytes prepare reads for rows [n0, n0 + rows) and groups [g0, g0 + G) (values of
// `esize` bytes), so that they arrive while the current block computes (32 rows read a few hundred
// bytes each: too many short streams for the hardware prefetcher).
inline void nm24_prefetch(const NMView& w, int64_t esize, int64_t n0, int64_t rows, int64_t g0, int64_t G) {
  const int64_t groups = (w.cols + 3) / 4;
  for (int64_t n = n0; n < n0 + rows; ++n) {
    prefetch_range(static_cast<const char*>(w.values) + (n * groups + g0) * 2 * esize, G * 2 * esize);
    prefetch_range(w.index + n * w.index_stride + g0 / 2, (G + 1) / 2);
  }
}

// x copied with a row stride one cache line past a multiple of 64 bytes (rows 8 KiB apart would
// share one L1 set, and a micro-kernel reads up to 12 of them) and zeros past K (a group reads 4
// elements, and a position past the last column of a partial group must read 0). Rows with a NaN
// or inf are flagged for the caller, which recomputes them: a skipped zero weight would not turn
// an inf into NaN as dense does.
template <class T>
inline const T* nm24_copy_x(const LinearIO& io, std::vector<T>& kept, std::vector<T>& once, int64_t& ldx) {
  const int64_t groups = (io.K + 3) / 4, line = 64 / static_cast<int64_t>(sizeof(T));
  ldx = round_up(groups * 4, line) + line;
  T* const x = call_buffer(kept, once, static_cast<size_t>(io.M * ldx));
  parallel_for(io.M, threads_for(io.threads, io.M * io.K * 16), [&](int64_t m) {
    std::memcpy(x + m * ldx, static_cast<const T*>(io.x) + m * io.ldx, static_cast<size_t>(io.K) * sizeof(T));
    std::fill(x + m * ldx + io.K, x + (m + 1) * ldx, T{0});
    if (io.nonfinite) io.nonfinite[m] = row_nonfinite(x + m * ldx, io.K) ? 1 : 0;
  });
  return x;
}

// The task loop of both dtypes: tiles of kNm24Cols output features in equal shares of consecutive
// tiles per task; per tile, blocks of `block` groups are prepared (prepare(n0, rows, g0, G, tile))
// and multiplied with every row of x (micro(mr, m0, g0, G, tile, c) for MR rows from m0), then
// written out (store(n0, rows, c): c is [M][kNm24Cols]).
template <int MR, class Prepare, class Micro, class Store>
void nm24_tiles(const NMView& w, const LinearIO& io, int64_t block, int64_t esize, const Prepare& prepare,
                const Micro& micro, const Store& store) {
  const int64_t groups = (io.K + 3) / 4;
  const int64_t tiles = (io.N + kNm24Cols - 1) / kNm24Cols;
  const int threads = threads_for(io.threads, io.N * io.K * io.M / 2);
  const int64_t tasks = std::min<int64_t>(tiles, int64_t{threads} * 8);
  parallel_for(tasks, threads, [&](int64_t t) {
    alignas(64) thread_local uint32_t tile_data[kNm24TileWords];
    thread_local std::vector<float> c_kept;
    std::vector<float> c_once;
    float* const c = call_buffer(c_kept, c_once, static_cast<size_t>(io.M * kNm24Cols));
    const int64_t end = (t + 1) * tiles / tasks;
    for (int64_t tile = t * tiles / tasks; tile < end; ++tile) {
      const int64_t n0 = tile * kNm24Cols, rows = std::min(kNm24Cols, io.N - n0);
      std::fill(c, c + io.M * kNm24Cols, 0.0f);
      for (int64_t g0 = 0; g0 < groups; g0 += block) {
        const int64_t G = std::min(block, groups - g0);
        prepare(n0, rows, g0, G, tile_data);
        if (g0 + G < groups)  // the next block of this tile, else the next tile's first
          nm24_prefetch(w, esize, n0, rows, g0 + G, std::min(block, groups - g0 - G));
        else if (tile + 1 < end)
          nm24_prefetch(w, esize, n0 + kNm24Cols, std::min(kNm24Cols, io.N - n0 - kNm24Cols), 0, std::min(block, groups));
        for (int64_t m0 = 0; m0 < io.M; m0 += MR)
          with_count<MR>(io.M - m0, [&](auto mr) { micro(mr, m0, g0, G, tile_data, c + m0 * kNm24Cols); });
      }
      store(n0, rows, c);
    }
  });
}

inline void nm24_gemm_bf16(const NMView& w, const LinearIO& io) {
  thread_local std::vector<uint16_t> x_kept;
  std::vector<uint16_t> x_once;
  int64_t ldx;
  const uint16_t* const x = nm24_copy_x(io, x_kept, x_once, ldx);
  nm24_tiles<kNm24MR>(
      w, io, kNm24Groups, 2,
      [&](int64_t n0, int64_t rows, int64_t g0, int64_t G, uint32_t* tile) { nm24_prepare(w, n0, rows, g0, G, tile); },
      [&](auto mr, int64_t m0, int64_t g0, int64_t G, const uint32_t* tile, float* c) {
        nm24_micro<decltype(mr)::value>(x + m0 * ldx + 4 * g0, ldx, tile, G, c);
      },
      [&](int64_t n0, int64_t rows, const float* c) { store_y_bf16<kNm24Cols>(io, n0, rows, c, kNm24Cols); });
}

// ---- float32: the same GEMM with two FMAs per group instead of four ----
// The 4 x elements of a group (16 bytes) are broadcast to each 128-bit lane, and an in-lane permute
// (vpermilps) picks each lane's x at p0, another at p1. Per group the tile holds 4 x 32 lanes: the
// first kept values, the second ones, and the two permute controls (positions 0..3). A/B at
// 4096x4096 against dense: 1.61x / 1.43x / 1.75x at 32 / 64 / 128 rows, where the decompressing
// tiles gave 1.53x / 1.26x / 1.25x; below 32 rows (memory-bound) the tiles won.
constexpr int64_t kNm24F32MinRows = 32;
constexpr int64_t kNm24F32Groups = 64;  // 128 products per block sum (see nm24_micro_f32)
constexpr int kNm24F32MR = 8;            // 16 accumulators + 8 tile vectors
constexpr int64_t kNm24F32Stride = 4 * kNm24Cols;
static_assert(kNm24F32Groups * kNm24F32Stride <= kNm24TileWords, "the float32 tile must fit the tile buffer");

template <int MR>
void nm24_micro_f32(const float* x, int64_t ldx, const uint32_t* tile, int64_t G, float* c) {
  __m512 acc[MR][2];
  // Each block of groups is summed from zero and then added to c: one running sum over all of K
  // had 4-10x the rounding error of torch's blocked GEMM at K = 1024-14336; blocks of 64 groups
  // keep it within 1.0-1.8x.
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint32_t* t = tile + g * kNm24F32Stride;
    __m512 w0[2], w1[2];
    __m512i i0[2], i1[2];
    for (int j = 0; j < 2; ++j) {
      w0[j] = _mm512_castsi512_ps(_mm512_load_si512(t + 16 * j));
      w1[j] = _mm512_castsi512_ps(_mm512_load_si512(t + kNm24Cols + 16 * j));
      i0[j] = _mm512_load_si512(t + 2 * kNm24Cols + 16 * j);
      i1[j] = _mm512_load_si512(t + 3 * kNm24Cols + 16 * j);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(x + r * ldx + 4 * g));
      for (int j = 0; j < 2; ++j) {
        acc[r][j] = _mm512_fmadd_ps(w0[j], _mm512_permutevar_ps(xb, i0[j]), acc[r][j]);
        acc[r][j] = _mm512_fmadd_ps(w1[j], _mm512_permutevar_ps(xb, i1[j]), acc[r][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2; ++j) {
      float* cj = c + r * kNm24Cols + 16 * j;
      _mm512_storeu_ps(cj, _mm512_add_ps(_mm512_loadu_ps(cj), acc[r][j]));
    }
}

// The tile of rows [n0, n0 + rows) for groups [g0, g0 + G): 16 rows x 8 groups at a time, the
// 16 values of each row's 8 groups transposed so that vector j holds value j % 2 of group j / 2.
inline void nm24_prepare_f32(const NMView& w, int64_t n0, int64_t rows, int64_t g0, int64_t G, uint32_t* tile) {
  const int64_t groups = (w.cols + 3) / 4;
  const __m512i three = _mm512_set1_epi32(3);
  for (int64_t h = 0; h < kNm24Cols / 16; ++h) {
    const int64_t r0 = 16 * h, live = std::clamp<int64_t>(rows - r0, 0, 16);
    for (int64_t c = 0; c < G; c += 8) {
      const int64_t gc = g0 + c, ng = std::min<int64_t>(8, groups - gc);
      __m512i v[16];
      alignas(64) uint32_t fields[16];
      nm24_load_chunk(w, n0 + r0, live, 2 * groups, 2 * gc, 2 * ng, gc, (ng + 1) / 2, v, fields);
      transpose16_epi32(v);
      for (int j = 0; j < 16; ++j) _mm512_store_si512(tile + (c + j / 2) * kNm24F32Stride + (j % 2) * kNm24Cols + r0, v[j]);
      const __m512i f = _mm512_load_si512(fields);
      for (int k = 0; k < 8; ++k) {
        const __m512i nib = _mm512_srli_epi32(f, 4 * k);
        uint32_t* t = tile + (c + k) * kNm24F32Stride + r0;
        _mm512_store_si512(t + 2 * kNm24Cols, _mm512_and_si512(nib, three));
        _mm512_store_si512(t + 3 * kNm24Cols, _mm512_and_si512(_mm512_srli_epi32(nib, 2), three));
      }
    }
  }
}

inline bool nm24_gemm_f32_applies(const NMView& w, const LinearIO& io) {
  return io.dtype == DType::f32 && w.n == 2 && w.m == 4 && io.M >= kNm24F32MinRows;
}

inline void nm24_gemm_f32(const NMView& w, const LinearIO& io) {
  thread_local std::vector<float> x_kept;
  std::vector<float> x_once;
  int64_t ldx;
  const float* const x = nm24_copy_x(io, x_kept, x_once, ldx);
  nm24_tiles<kNm24F32MR>(
      w, io, kNm24F32Groups, 4,
      [&](int64_t n0, int64_t rows, int64_t g0, int64_t G, uint32_t* tile) { nm24_prepare_f32(w, n0, rows, g0, G, tile); },
      [&](auto mr, int64_t m0, int64_t g0, int64_t G, const uint32_t* tile, float* c) {
        nm24_micro_f32<decltype(mr)::value>(x + m0 * ldx + 4 * g0, ldx, tile, G, c);
      },
      [&](int64_t n0, int64_t rows, const float* c) {
        for (int64_t m = 0; m < io.M; ++m) store_y_row(io, m, n0, n0 + rows, c + m * kNm24Cols);
      });
}
#endif

}  // namespace sparseflow::cpu::SF_ISA
