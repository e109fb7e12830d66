// Bitmask (unstructured) linear: each 1 bit of a row's mask takes the next stored value.
// AVX-512: 32 (16-bit) or 16 (f32) mask bits at a time, a masked load of popcount values and one
// VBMI2 expand put them in place. AVX2: 8 bits at a time through a shuffle table. Scalar: bit scan.
#include "cpu/kernels/gemm_sparse.h"
#include "cpu/kernels/kernels.h"
#include "cpu/kernels/tiled.h"

namespace sparseflow::cpu::SF_ISA {
namespace {

template <int R>
void bitmask_dot_scalar(const BitmaskView& w, DType t, int64_t n, const XRows& x, float* out) {
  float acc[R] = {};
  int64_t v = w.row_offsets[n];
  const uint8_t* row = w.mask + n * w.mask_stride;
  for (int64_t block = 0; block < w.mask_stride; block += kScalarBlock / 8) {  // summed by blocks (common.h)
    float part[R] = {};
    for (int64_t byte = block; byte < std::min(w.mask_stride, block + kScalarBlock / 8); ++byte) {
      for (uint32_t bits = row[byte]; bits; bits &= bits - 1) {
        const int64_t k = byte * 8 + __builtin_ctz(bits);
        const float wv = load_as_f32(w.values, v++, t);
        for (int r = 0; r < R; ++r) part[r] += wv * x[r][k];
      }
    }
    for (int r = 0; r < R; ++r) acc[r] += part[r];
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

#if defined(SF_ISA_avx512)
// bf16 with BF16 dot products: the expanded weights meet x in bf16 directly, no conversion.
template <int R>
void bitmask_dot_bf16(const BitmaskView& w, int64_t n, const XRows& x, float* out) {
  __m512 acc0[R], acc1[R];  // two accumulators per row hide the dot-product latency
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  const uint8_t* row = w.mask + n * w.mask_stride;
  const uint16_t* v = static_cast<const uint16_t*>(w.values) + w.row_offsets[n];
  const auto step = [&](uint32_t bits, int64_t k, __m512* acc) {
    const int cnt = popcount32(bits);
    const __m512i wv = _mm512_maskz_expand_epi16(bits, _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, cnt), v));
    for (int r = 0; r < R; ++r) acc[r] = dot_bf16(acc[r], wv, _mm512_loadu_si512(x.bf16[r] + k));
    v += cnt;
  };
  int64_t k = 0;
  for (; k + 64 <= w.cols; k += 64) {  // whole 64-column chunks: both mask words exist
    uint32_t bits[2];
    std::memcpy(bits, row + k / 8, 8);
    prefetch_stream(v);
    prefetch_stream(row + k / 8, 512);
    step(bits[0], k, acc0);
    step(bits[1], k + 32, acc1);
  }
  for (; k < w.cols; k += 32) step(mask_bits(row, w.mask_stride, k, 32), k, acc0);
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

template <int R>
void bitmask_dot(const BitmaskView& w, DType t, int64_t n, const XRows& x, float* out) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint8_t* row = w.mask + n * w.mask_stride;
  const int64_t K = w.cols;
  if (t == DType::f32) {
    const float* v = static_cast<const float*>(w.values) + w.row_offsets[n];
    const auto step = [&](uint32_t bits, int64_t k, int slot) {
      const int cnt = popcount32(bits);
      const __m512 wv = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits),
                                               _mm512_maskz_loadu_ps(static_cast<__mmask16>(_bzhi_u32(~0u, cnt)), v));
      for (int r = 0; r < R; ++r) acc[r][slot] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x[r] + k), acc[r][slot]);
      v += cnt;
    };
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {  // two 16-column chunks, two accumulator chains
      uint32_t bits;
      std::memcpy(&bits, row + k / 8, 4);
      prefetch_stream(v);
      prefetch_stream(row + k / 8, 512);
      step(bits & 0xffffu, k, 0);
      step(bits >> 16, k + 16, 1);
    }
    for (; k < K; k += 16) step(mask_bits(row, w.mask_stride, k, 16), k, 0);
  } else {
    const uint16_t* v = static_cast<const uint16_t*>(w.values) + w.row_offsets[n];
    const bool bf16 = t == DType::bf16;
    for (int64_t k = 0; k < K; k += 32) {
      prefetch_stream(v);
      prefetch_stream(row + k / 8, 512);
      const uint32_t bits = mask_bits(row, w.mask_stride, k, 32);
      if (!bits) continue;
      const int cnt = popcount32(bits);
      const __m512i packed = _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, cnt), v);
      const __m512i wv = _mm512_maskz_expand_epi16(bits, packed);
      const __m256i lo16 = _mm512_castsi512_si256(wv), hi16 = _mm512_extracti64x4_epi64(wv, 1);
      const __m512 lo = bf16 ? cvt16_bf16(lo16) : cvt16_f16(lo16);
      const __m512 hi = bf16 ? cvt16_bf16(hi16) : cvt16_f16(hi16);
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x[r] + k), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x[r] + k + 16), acc[r][1]);
      }
      v += cnt;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#elif defined(SF_ISA_avx2)
// kExpand (common.h): per 8-bit mask, the shuffle that puts packed values in their lanes.

template <int R>
void bitmask_dot(const BitmaskView& w, DType t, int64_t n, const XRows& x, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const uint8_t* row = w.mask + n * w.mask_stride;
  const int64_t begin = w.row_offsets[n];
  const int64_t safe_end = w.nnz - 8;  // a full 8-value load from below here stays in bounds
  const int64_t esize = element_size(t);
  const char* base = static_cast<const char*>(w.values);
  int64_t v = begin;
  for (int64_t byte = 0; byte < w.mask_stride; ++byte) {
    if (byte % 4 == 0) {
      prefetch_stream(base + v * esize);
      prefetch_stream(row + byte, 512);
    }
    const uint32_t bits = row[byte];
    if (!bits) continue;
    const int cnt = popcount32(bits);
    alignas(32) uint8_t tail[32];
    const char* src = base + v * esize;
    if (v > safe_end) {  // near the end of the buffer: copy what exists
      std::memset(tail, 0, sizeof tail);
      std::memcpy(tail, src, cnt * esize);
      src = reinterpret_cast<const char*>(tail);
    }
    __m256 wv;
    if (t == DType::f32) {
      const __m256 packed = _mm256_loadu_ps(reinterpret_cast<const float*>(src));
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.perm32[bits]));
      const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.keep32[bits])));
      wv = _mm256_and_ps(_mm256_permutevar8x32_ps(packed, perm), keep);
    } else {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      const __m128i h = _mm_shuffle_epi8(packed, _mm_load_si128(reinterpret_cast<const __m128i*>(kExpand.shuffle16[bits])));
      wv = t == DType::bf16 ? cvt8_bf16(h) : _mm256_cvtph_ps(h);
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[r] + byte * 8), acc[r]);
    v += cnt;
  }
  for (int r = 0; r < R; ++r) out[r] = hsum8(acc[r]);
}
#else
template <int R>
void bitmask_dot(const BitmaskView& w, DType t, int64_t n, const XRows& x, float* out) {
  bitmask_dot_scalar<R>(w, t, n, x, out);
}
#endif

}  // namespace

void bitmask_linear(const BitmaskView& w, const LinearIO& io) {
#if defined(SF_ISA_avx512)
  if (sparse_gemm_applies(w.nnz, w.rows, w.cols, io)) {  // many rows: a GEMM that skips the zeros
    bitmask_gemm(w, io);
    return;
  }
  if (tiled_applies(io, {9, 7})) {  // decompress 4 rows at a time into a tile, register-blocked GEMM
    const int64_t esize = element_size(io.dtype);
    tiled_linear(
        io,
        [&](int64_t n0, int64_t n1, void* out, int64_t ld) {
          bitmask_decompress(w, DecompressIO{io.dtype, n0, n1, 0, w.cols, nullptr, out, ld, 1});
        },
        [&](int64_t n0, int64_t n1) {
          prefetch_range(w.mask + n0 * w.mask_stride, (n1 - n0) * w.mask_stride);
          prefetch_range(static_cast<const char*>(w.values) + w.row_offsets[n0] * esize,
                         (w.row_offsets[n1] - w.row_offsets[n0]) * esize);
        });
    return;
  }
#endif
  run_rowwise(io, 1, [&](int64_t n0, int64_t n1, const XRows& x, int R, float* acc) {
    with_rows(R, [&](auto rows) {
      constexpr int RR = decltype(rows)::value;
      float out[RR];
#if defined(SF_ISA_avx512)
      if (io.dtype == DType::bf16 && use_bf16_dot()) {
        for (int64_t n = n0; n < n1; ++n) {
          bitmask_dot_bf16<RR>(w, n, x, out);
          for (int r = 0; r < RR; ++r) acc[r * (n1 - n0) + (n - n0)] = out[r];
        }
        return;
      }
#endif
      for (int64_t n = n0; n < n1; ++n) {
        bitmask_dot<RR>(w, io.dtype, n, x, out);
        for (int r = 0; r < RR; ++r) acc[r * (n1 - n0) + (n - n0)] = out[r];
      }
    });
  });
}

}  // namespace sparseflow::cpu::SF_ISA

namespace sparseflow::cpu::SF_ISA {

// A column range [col0, col1) starts at the row's value that follows the set bits before col0
// (col0 is a multiple of 8, so whole mask bytes are skipped and counted), or at the cursor.
void bitmask_decompress(const BitmaskView& w, const DecompressIO& d) {
  const int64_t skip = d.col0 / 8, width = d.col1 - d.col0, stride = (width + 7) / 8;
  with_element(d.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* values = static_cast<const T*>(w.values);
    run_decompress<T>(d, width, [&](int64_t n, T* out) {
      const uint8_t* row = w.mask + n * w.mask_stride;
      int64_t begin;
      if (d.cursor) {
        begin = d.cursor[n - d.row0];
      } else {
        begin = w.row_offsets[n];
        int64_t b = 0;
        for (; b + 8 <= skip; b += 8) {
          uint64_t word;
          std::memcpy(&word, row + b, 8);
          begin += __builtin_popcountll(word);
        }
        for (; b < skip; ++b) begin += __builtin_popcount(row[b]);
      }
      const int64_t taken = expand_row(values + begin, w.nnz - begin, row + skip, stride, width, out);
      if (d.cursor) d.cursor[n - d.row0] = begin + taken;
    });
  });
}

}  // namespace sparseflow::cpu::SF_ISA
