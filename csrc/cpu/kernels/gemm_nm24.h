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
      const __mmask16 gmask = static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(ng)));
      __m512i v[16];
      alignas(64) uint64_t fields[16];
      for (int r = 0; r < 16; ++r) {
        fields[r] = 0;
        if (r >= live) {
          v[r] = _mm512_setzero_si512();
          continue;
        }
        const int64_t n = n0 + r0 + r;
        const uint32_t* row = reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(w.values) + n * groups * 2);
        v[r] = _mm512_maskz_loadu_epi32(gmask, row + gc);
        const uint8_t* f = w.index + n * w.index_stride + gc / 2;
        if (ng == 16)  // a constant size: a variable one is a library call
          std::memcpy(&fields[r], f, 8);
        else
          std::memcpy(&fields[r], f, static_cast<size_t>((ng + 1) / 2));
      }
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

// Touches the bytes prepare reads for rows [n0, n0 + rows) and groups [g0, g0 + G), so that they
// arrive while the current block computes (32 rows read 288 bytes each: too many short streams
// for the hardware prefetcher).
inline void nm24_prefetch(const NMView& w, int64_t n0, int64_t rows, int64_t g0, int64_t G) {
  const int64_t groups = (w.cols + 3) / 4;
  for (int64_t n = n0; n < n0 + rows; ++n) {
    prefetch_range(static_cast<const uint16_t*>(w.values) + (n * groups + g0) * 2, G * 4);
    prefetch_range(w.index + n * w.index_stride + g0 / 2, (G + 1) / 2);
  }
}

// Rows of x with a NaN or inf (all exponent bits set) go to the caller, which recomputes them:
// a skipped zero weight would not turn an inf into NaN as dense does.
inline void nm24_flag_nonfinite(const LinearIO& io) {
  const __m512i exp_bits = _mm512_set1_epi16(0x7f80);
  for (int64_t m = 0; m < io.M; ++m) {
    const uint16_t* row = static_cast<const uint16_t*>(io.x) + m * io.ldx;
    __mmask32 bad = 0;
    for (int64_t k = 0; k < io.K; k += 32) {
      const __mmask32 live = static_cast<__mmask32>(_bzhi_u32(~0u, static_cast<unsigned>(std::min<int64_t>(32, io.K - k))));
      const __m512i v = _mm512_maskz_loadu_epi16(live, row + k);
      bad |= _mm512_mask_cmpeq_epi16_mask(live, _mm512_and_si512(v, exp_bits), exp_bits);
    }
    io.nonfinite[m] = bad ? 1 : 0;
  }
}

inline void nm24_gemm_bf16(const NMView& w, const LinearIO& io) {
  if (io.nonfinite) nm24_flag_nonfinite(io);
  // x is copied with a row stride one cache line past a multiple of 64 bytes (rows 8 KiB apart
  // would share one L1 set, and a micro-kernel reads 12 of them) and zeros past K (a group reads 8
  // bytes, and a position past the last column of a partial group must read 0).
  const int64_t groups = (io.K + 3) / 4, ldx = round_up(groups * 4, 32) + 32;
  thread_local std::vector<uint16_t> x_kept;
  std::vector<uint16_t> x_once;
  uint16_t* const x = call_buffer(x_kept, x_once, static_cast<size_t>(io.M * ldx));
  parallel_for(io.M, threads_for(io.threads, io.M * io.K * 16), [&](int64_t m) {
    std::memcpy(x + m * ldx, static_cast<const uint16_t*>(io.x) + m * io.ldx, static_cast<size_t>(io.K) * 2);
    std::fill(x + m * ldx + io.K, x + (m + 1) * ldx, uint16_t{0});
  });
  const int64_t tiles = (io.N + kNm24Cols - 1) / kNm24Cols;
  const int threads = threads_for(io.threads, io.N * io.K * io.M / 2);
  const int64_t tasks = std::min<int64_t>(tiles, int64_t{threads} * 8);
  parallel_for(tasks, threads, [&](int64_t t) {
    alignas(64) thread_local uint32_t tile_data[kNm24Groups * kNm24TileStride];
    thread_local std::vector<float> c_kept;
    std::vector<float> c_once;
    float* const c = call_buffer(c_kept, c_once, static_cast<size_t>(io.M * kNm24Cols));
    const int64_t end = (t + 1) * tiles / tasks;
    for (int64_t tile = t * tiles / tasks; tile < end; ++tile) {
      const int64_t n0 = tile * kNm24Cols, rows = std::min(kNm24Cols, io.N - n0);
      std::fill(c, c + io.M * kNm24Cols, 0.0f);
      for (int64_t g0 = 0; g0 < groups; g0 += kNm24Groups) {
        const int64_t G = std::min(kNm24Groups, groups - g0);
        nm24_prepare(w, n0, rows, g0, G, tile_data);
        if (g0 + G < groups)  // the next block of this tile, else the next tile's first
          nm24_prefetch(w, n0, rows, g0 + G, std::min(kNm24Groups, groups - g0 - G));
        else if (tile + 1 < end)
          nm24_prefetch(w, n0 + kNm24Cols, std::min(kNm24Cols, io.N - n0 - kNm24Cols), 0, std::min(kNm24Groups, groups));
        for (int64_t m0 = 0; m0 < io.M; m0 += kNm24MR)
          with_count<kNm24MR>(io.M - m0, [&](auto mr) {
            nm24_micro<decltype(mr)::value>(x + m0 * ldx + 4 * g0, ldx, tile_data, G, c + m0 * kNm24Cols);
          });
      }
      // y = bf16(c + bias), 16 features at a time
      __m512 bias[kNm24Cols / 16];
      for (int j = 0; j < kNm24Cols / 16; ++j) {
        bias[j] = _mm512_setzero_ps();
        const int64_t live = std::clamp<int64_t>(rows - 16 * j, 0, 16);
        const __mmask16 mask = static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(live)));
        if (io.bias && live) bias[j] = cvt16_bf16(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(io.bias) + n0 + 16 * j));
      }
      for (int64_t m = 0; m < io.M; ++m) {
        uint16_t* yrow = static_cast<uint16_t*>(io.y) + m * io.ldy + n0;
        for (int j = 0; j < kNm24Cols / 16; ++j) {
          const int64_t live = std::clamp<int64_t>(rows - 16 * j, 0, 16);
          if (!live) continue;
          const __m512 v = _mm512_add_ps(_mm512_loadu_ps(c + m * kNm24Cols + 16 * j), bias[j]);
          const __m256i h = round_bf16x16(v);  // as f32_to_bf16 (vcvtneps2bf16 flushes subnormals)
          _mm256_mask_storeu_epi16(yrow + 16 * j, static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(live))), h);
        }
      }
    }
  });
}
#endif

}  // namespace sparseflow::cpu::SF_ISA
