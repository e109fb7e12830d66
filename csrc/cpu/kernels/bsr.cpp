// Block-sparse (BSR) linear. Blocks are read whole and in storage order (one sequential stream
// per thread); each block row keeps one vector accumulator per row of the block and of x, and
// reduces them once at the end of the block row.
#include "cpu/kernels/kernels.h"

namespace sparseflow::cpu::SF_ISA {
namespace {

#if defined(SF_ISA_avx512)
constexpr int kLanes = 16;
#elif defined(SF_ISA_avx2)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 1;
#endif

template <int R>
void bsr_block_row(const BsrView& w, DType t, int64_t br, const XRows& x, float* vacc, float* out,
                   int64_t out_ld) {
  const int64_t bm = w.bm, bk = w.bk, rows = std::min(bm, w.rows - br * bm);
  std::fill(vacc, vacc + rows * R * kLanes, 0.0f);
  for (int64_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
    const int64_t k0 = static_cast<int64_t>(w.col[b]) * bk;
    const int64_t block = b * bm * bk;
    for (int64_t i = 0; i < rows; ++i) {
      float* a = vacc + i * R * kLanes;
      const int64_t base = block + i * bk;
#if defined(SF_ISA_avx512)
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_loadu_ps(a + r * kLanes);
      for (int64_t k = 0; k < bk; k += 16) {
        const __mmask16 live = static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(std::min<int64_t>(16, bk - k))));
        const __m512 wv = maskz_load16_f32(live, w.values, base + k, t);
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x[r] + k0 + k), acc[r]);
      }
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(a + r * kLanes, acc[r]);
#elif defined(SF_ISA_avx2)
      __m256 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_loadu_ps(a + r * kLanes);
      int64_t k = 0;
      for (; k + 8 <= bk; k += 8) {
        const __m256 wv = load8_f32(w.values, base + k, t);
        for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[r] + k0 + k), acc[r]);
      }
      for (int r = 0; r < R; ++r) _mm256_storeu_ps(a + r * kLanes, acc[r]);
      for (; k < bk; ++k) {  // blocks narrower than 8
        const float wv = load_as_f32(w.values, base + k, t);
        for (int r = 0; r < R; ++r) a[r * kLanes] += wv * x[r][k0 + k];
      }
#else
      for (int64_t k = 0; k < bk; ++k) {
        const float wv = load_as_f32(w.values, base + k, t);
        for (int r = 0; r < R; ++r) a[r] += wv * x[r][k0 + k];
      }
#endif
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int r = 0; r < R; ++r) {
      const float* a = vacc + (i * R + r) * kLanes;
      float s = 0.0f;
      for (int l = 0; l < kLanes; ++l) s += a[l];
      out[r * out_ld + i] = s;
    }
}

}  // namespace

void bsr_linear(const BsrView& w, const LinearIO& io) {
  run_rowwise(io, w.bm, [&](int64_t n0, int64_t n1, const XRows& x, int R, float* acc) {
    thread_local std::vector<float> vacc;
    vacc.resize(static_cast<size_t>(w.bm * kRowGroup * kLanes));
    with_rows(R, [&](auto rows) {
      constexpr int RR = decltype(rows)::value;
      for (int64_t br = n0 / w.bm; br * w.bm < n1; ++br)
        bsr_block_row<RR>(w, io.dtype, br, x, vacc.data(), acc + (br * w.bm - n0), n1 - n0);
    });
  });
}

}  // namespace sparseflow::cpu::SF_ISA
