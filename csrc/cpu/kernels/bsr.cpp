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
        prefetch_stream(static_cast<const char*>(w.values) + (base + k) * element_size(t));
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
        if (k % 16 == 0) prefetch_stream(static_cast<const char*>(w.values) + (base + k) * element_size(t));
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

namespace sparseflow::cpu::SF_ISA {

// Block by block, so the stored values are read in order: each block's rows go to their output
// rows, and the gaps between stored blocks (the same for every row of a block row) are zeroed.
// Edge blocks are cut at the last column: their zero padding is not part of the weight.
void bsr_decompress(const BsrView& w, const DecompressIO& d) {
  const int64_t rows = d.row1 - d.row0;
  if (rows <= 0 || w.cols <= 0) return;
  const int64_t br0 = d.row0 / w.bm, br1 = (d.row1 + w.bm - 1) / w.bm;  // block rows touched
  const int threads = threads_for(d.threads, rows * w.cols);
  const int64_t want_tasks = static_cast<int64_t>(threads) * 4;
  const int64_t per_task = std::max<int64_t>(1, (br1 - br0 + want_tasks - 1) / want_tasks);
  const int64_t tasks = (br1 - br0 + per_task - 1) / per_task;
  with_element(d.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* values = static_cast<const T*>(w.values);
    T* const out = static_cast<T*>(d.out);
    parallel_for_torch_threads(tasks, threads, [&](int64_t t) {
      for (int64_t br = br0 + t * per_task; br < std::min(br1, br0 + (t + 1) * per_task); ++br) {
        const int64_t r0 = std::max(d.row0, br * w.bm), r1 = std::min(d.row1, (br + 1) * w.bm);
        int64_t done = 0;  // columns written so far, in every row of this block row
        for (int64_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
          const int64_t c0 = static_cast<int64_t>(w.col[b]) * w.bk;
          const int64_t len = std::min(w.bk, w.cols - c0);
          const T* block = values + b * w.bm * w.bk;
          for (int64_t r = r0; r < r1; ++r) {
            T* row = out + (r - d.row0) * d.ld;
            std::fill(row + done, row + c0, T{0});
            std::copy_n(block + (r - br * w.bm) * w.bk, len, row + c0);
          }
          done = c0 + len;
        }
        for (int64_t r = r0; r < r1; ++r) {
          T* row = out + (r - d.row0) * d.ld;
          std::fill(row + done, row + w.cols, T{0});
        }
      }
    });
  });
}

}  // namespace sparseflow::cpu::SF_ISA
