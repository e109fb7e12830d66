// N:M linear: each group of m weights keeps n values and their positions in the group (2-bit
// indices for m = 4, 4-bit otherwise). The vector paths decode the positions of a chunk of
// values at once and fetch the matching x elements: AVX-512 by a two-register permute when the
// chunk spans 32 x elements (2:4, 4:8, 8:16), by a gather otherwise; AVX2 by a gather.
#include "cpu/kernels/kernels.h"

namespace sparseflow::cpu::SF_ISA {
namespace {

inline int index_bits(const NMView& w) { return w.m == 4 ? 2 : 4; }

inline int64_t nm_index(const NMView& w, int64_t n, int64_t v) {
  const int b = index_bits(w);
  const int64_t bit = v * b;
  return (w.index[n * w.index_stride + (bit >> 3)] >> (bit & 7)) & ((1 << b) - 1);
}

#if defined(SF_ISA_avx512)
constexpr int kLanes = 16;
#elif defined(SF_ISA_avx2)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 1;
#endif

template <int R>
void nm_dot(const NMView& w, DType t, int64_t n, const float* const* x, float* out) {
  const int64_t groups = (w.cols + w.m - 1) / w.m, per_row = groups * w.n;
  const int64_t vbase = n * per_row;
  float acc[R] = {};
  int64_t v = 0;
#if !defined(SF_ISA_scalar)
  if (kLanes % w.n == 0) {
    const int b = index_bits(w);
    const int64_t span = kLanes / w.n * w.m;  // x elements one chunk of values covers
    const uint8_t* idx_row = w.index + n * w.index_stride;
#if defined(SF_ISA_avx512)
    alignas(64) int32_t sel[16], shift[16], base[16];
    for (int j = 0; j < 16; ++j) {
      sel[j] = j * b / 32;
      shift[j] = j * b % 32;
      base[j] = static_cast<int32_t>(j / w.n * w.m);
    }
    const __m512i vsel = _mm512_load_si512(sel), vshift = _mm512_load_si512(shift), vbase16 = _mm512_load_si512(base);
    const __m512i low = _mm512_set1_epi32((1 << b) - 1);
    __m512 vacc[R];
    for (int r = 0; r < R; ++r) vacc[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; v + 16 <= per_row; v += 16, k += span) {
      uint64_t word = 0;
      std::memcpy(&word, idx_row + v * b / 8, 16 * b / 8);
      const __m512i words = _mm512_permutexvar_epi32(vsel, _mm512_castsi128_si512(_mm_cvtsi64_si128(static_cast<long long>(word))));
      const __m512i pos = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(words, vshift), low), vbase16);
      const __m512 wv = load16_f32(w.values, vbase + v, t);
      for (int r = 0; r < R; ++r) {
        const float* xr = x[r] + k;
        const __m512 xv = span == 32 ? _mm512_permutex2var_ps(_mm512_loadu_ps(xr), pos, _mm512_loadu_ps(xr + 16))
                                     : _mm512_i32gather_ps(pos, xr, 4);
        vacc[r] = _mm512_fmadd_ps(wv, xv, vacc[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_ps(vacc[r]);
#else
    alignas(32) int32_t shift[8], base[8];
    for (int j = 0; j < 8; ++j) {
      shift[j] = j * b;
      base[j] = static_cast<int32_t>(j / w.n * w.m);
    }
    const __m256i vshift = _mm256_load_si256(reinterpret_cast<const __m256i*>(shift));
    const __m256i vbase8 = _mm256_load_si256(reinterpret_cast<const __m256i*>(base));
    const __m256i low = _mm256_set1_epi32((1 << b) - 1);
    __m256 vacc[R];
    for (int r = 0; r < R; ++r) vacc[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; v + 8 <= per_row; v += 8, k += span) {
      uint32_t word = 0;
      std::memcpy(&word, idx_row + v * b / 8, 8 * b / 8);
      const __m256i pos = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), vshift), low), vbase8);
      const __m256 wv = load8_f32(w.values, vbase + v, t);
      for (int r = 0; r < R; ++r) vacc[r] = _mm256_fmadd_ps(wv, _mm256_i32gather_ps(x[r] + k, pos, 4), vacc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r] = hsum8(vacc[r]);
#endif
  }
#endif
  for (; v < per_row; ++v) {  // scalar path and vector tails
    const float wv = load_as_f32(w.values, vbase + v, t);
    const int64_t k = v / w.n * w.m + nm_index(w, n, v);
    for (int r = 0; r < R; ++r) acc[r] += wv * x[r][k];
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

}  // namespace

void nm_linear(const NMView& w, const LinearIO& io) {
  run_rowwise(io, 1, [&](int64_t n0, int64_t n1, const float* const* x, int R, float* acc) {
    with_rows(R, [&](auto rows) {
      constexpr int RR = decltype(rows)::value;
      float out[RR];
      for (int64_t n = n0; n < n1; ++n) {
        nm_dot<RR>(w, io.dtype, n, x, out);
        for (int r = 0; r < RR; ++r) acc[r * (n1 - n0) + (n - n0)] = out[r];
      }
    });
  });
}

}  // namespace sparseflow::cpu::SF_ISA
