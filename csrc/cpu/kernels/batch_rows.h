// Readers of w_t's rows for the activation-sparse batch GEMMs (gemm_kn.h, gemm_skip.h). A task
// walks its panels of output columns left to right and, within a panel, the rows in order:
// row(k, n0, ncols, width, buf) gives `width` bf16 of row k from column n0, ncols of them real and
// zeros after (buf: `width` elements, zero past ncols on entry); prefetch(k, n0, ncols) fetches
// the same ahead of time; floats(k, n0, ncols, width, dst) writes that row to dst in float32
// (gemm_skip.h's blocks), straight from registers (a row through buf, stored and loaded again, cost
// a bitmask GEMM 6-35%). make_readers(first_cols) returns reader_for(t), task t's reader.
#pragma once
#include "cpu/kernels/tiled.h"

namespace sparseflow::cpu::SF_ISA {

#if defined(SF_ISA_avx512)
struct DenseRowsBf16 {  // read in place where the panel lies whole in the matrix
  const DenseView* w;
  const uint16_t* row(int64_t k, int64_t n0, int64_t ncols, int64_t width, uint16_t* buf) const {
    const uint16_t* src = at(k, n0);
    if (ncols == width) return src;
    std::copy(src, src + ncols, buf);  // the last panel
    return buf;
  }
  void prefetch(int64_t k, int64_t n0, int64_t ncols) const { prefetch_range(at(k, n0), ncols * 2); }
  // Row k from column n0 into dst: `width` (a multiple of 16) floats, ncols real and zeros after.
  void floats(int64_t k, int64_t n0, int64_t ncols, int64_t width, float* dst) const {
    const uint16_t* src = at(k, n0);
    if (ncols == width) {  // a whole panel
      for (int64_t h = 0; h < width; h += 16) _mm512_store_ps(dst + h, load16_f32(src, h, DType::bf16));
      return;
    }
    for (int64_t h = 0; h < width; h += 16) {
      const __mmask16 live = h + 16 <= ncols ? 0xffff : h < ncols ? static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(ncols - h))) : 0;
      _mm512_store_ps(dst + h, maskz_load16_f32(live, src, h, DType::bf16));
    }
  }
  const uint16_t* at(int64_t k, int64_t n0) const { return static_cast<const uint16_t*>(w->values) + k * w->ld + n0; }
};

inline auto dense_rows_bf16(const DenseView& w) {
  return [&w](const std::vector<int64_t>&) { return [&w](int64_t) { return DenseRowsBf16{&w}; }; };
}

// A bitmask's rows, each entered at the task's first column through a cursor: the index of the
// row's next value, which row() advances past the columns it expands.
struct BitmaskRowsBf16 {
  const BitmaskView* w;
  std::vector<int64_t> cursor;
  const uint16_t* row(int64_t k, int64_t n0, int64_t ncols, int64_t, uint16_t* buf) {
    int64_t& next = cursor[static_cast<size_t>(k)];
    next += expand_row(values() + next, w->nnz - next, w->mask + k * w->mask_stride + n0 / 8, w->mask_stride - n0 / 8,
                       ncols, buf);
    return buf;
  }
  void prefetch(int64_t k, int64_t n0, int64_t ncols) const {
    prefetch_range(w->mask + k * w->mask_stride + n0 / 8, (ncols + 7) / 8);
    prefetch_range(values() + cursor[static_cast<size_t>(k)], ncols * 2);
  }
  // As DenseRowsBf16::floats, expanded in registers. The row kNear rows on is fetched into L1
  // first: its mask and values wait in L2 (prefetch), and the expansion's loads depend on each
  // other through the mask's counts, so out of order execution hides little of L2's latency
  // (+5-11% at 50% density against no near fetch; dense rows lose 1-3% by it and take none).
  static constexpr int64_t kNear = 6;
  void floats(int64_t k, int64_t n0, int64_t ncols, int64_t width, float* dst) {
    if (k + kNear < w->rows) {
      _mm_prefetch(reinterpret_cast<const char*>(w->mask + (k + kNear) * w->mask_stride + n0 / 8), _MM_HINT_T0);
      const char* ahead = reinterpret_cast<const char*>(values() + cursor[static_cast<size_t>(k + kNear)]);
      for (int64_t b = 0; b < ncols; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);  // ncols / 2 values at 50%
    }
    cursor[static_cast<size_t>(k)] += expand_row_chunks(
        values() + cursor[static_cast<size_t>(k)], w->mask + k * w->mask_stride + n0 / 8, w->mask_stride - n0 / 8, ncols,
        [&](int64_t h, __m512i lanes, __mmask32 live) {
          const __m512i v = _mm512_maskz_mov_epi16(live, lanes);
          _mm512_store_ps(dst + h, cvt16_bf16(_mm512_castsi512_si256(v)));
          _mm512_store_ps(dst + h + 16, cvt16_bf16(_mm512_extracti64x4_epi64(v, 1)));
        });
    for (int64_t h = round_up(ncols, 32); h < width; h += 16) _mm512_store_ps(dst + h, _mm512_setzero_ps());
  }
  const uint16_t* values() const { return static_cast<const uint16_t*>(w->values); }
};

// Each task's cursors at its first column (a multiple of 8), found in one pass over each mask row.
inline auto bitmask_rows_bf16(const BitmaskView& w, int threads) {
  return [&w, threads](const std::vector<int64_t>& first_cols) {
    const size_t tasks = first_cols.size(), rows = static_cast<size_t>(w.rows);
    std::vector<int64_t> starts(tasks * rows);
    const int64_t chunk = 64;
    parallel_for((w.rows + chunk - 1) / chunk, threads_for(threads, w.rows * w.mask_stride), [&](int64_t c) {
      for (int64_t k = c * chunk; k < std::min(w.rows, (c + 1) * chunk); ++k) {
        const uint8_t* mask = w.mask + k * w.mask_stride;
        int64_t next = w.row_offsets[k], b = 0;
        for (size_t t = 0; t < tasks; ++t) {
          const int64_t skip = first_cols[t] / 8;  // whole mask bytes before that column
          for (; b + 8 <= skip; b += 8) {
            uint64_t word;
            std::memcpy(&word, mask + b, 8);
            next += __builtin_popcountll(word);
          }
          for (; b < skip; ++b) next += __builtin_popcount(mask[b]);
          starts[t * rows + static_cast<size_t>(k)] = next;
        }
      }
    });
    return [&w, rows, starts = std::move(starts)](int64_t t) {
      const auto first = starts.begin() + static_cast<int64_t>(static_cast<size_t>(t) * rows);
      return BitmaskRowsBf16{&w, std::vector<int64_t>(first, first + static_cast<int64_t>(rows))};
    };
  };
}
#endif

}  // namespace sparseflow::cpu::SF_ISA
