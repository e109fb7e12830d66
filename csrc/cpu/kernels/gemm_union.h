// Activation-sparse linear for small batches (bf16, AVX-512 BF16, from 2 rows of x up to a bound
// per weight format): y = x' @ w_t + bias, each row of w_t read at most once per call. The row
// kernel reads each row of x's own active rows of w_t, so M rows at 50% active stream the weight
// M / 2 times; the batch GEMMs (gemm_kn.h, gemm_skip.h) repack the weight and need more rows to
// pay for it. Here the inputs active in some row of x (their union) are listed once, the rows of
// w_t of the others never read (a quarter of them at 2 rows), and each row read is multiplied
// into every row of x, inactive inputs as zeros: at these row counts the weight's bytes bound the
// time, not the products. Rows of w_t are paired in registers (vpunpcklwd/hwd) for vdpbf16ps,
// each pair used by all rows of x; the weight's zeros are multiplied as dense does, so NaN and
// inf in x propagate as in dense. Threads split the union's rows, each reading whole rows into
// float accumulators for all outputs, which a last pass adds up: a panel of 256 columns at a
// time over all rows (as the batch GEMMs walk the weight) left the reads bound by latency, a new
// page per row, at 0.4-0.6x of dense.
#pragma once
#include "cpu/kernels/gemm_skip.h"

namespace sparseflow::cpu::SF_ISA {

#if defined(SF_ISA_avx512)
constexpr int64_t kUnionMinRows = 2;  // one row: the row kernel reads only its active rows
constexpr int kUnionPairs = 4;        // row pairs per pass over the accumulators (8: no faster)
constexpr int64_t kUnionGroup = 2 * kUnionPairs;

// A thread walks its accumulators in chunks of columns, all its rows per chunk, so that a chunk's
// accumulators stay near: up to 4 rows of x, 256 KiB of them (L2: whole rows of w_t read at a
// time, 2.4-2.8x of dense at 2 rows against 2.0-2.4x with 16 KiB), else 16 KiB (L1: 0.93x
// against 0.67-0.83x at 16 rows). Measured on 2048x2048 and 8192x2048, 2 threads, 50% active.
inline int64_t union_chunk_cols(int64_t M, int64_t cols) {
  const int64_t bytes = M <= 4 ? int64_t{256} << 10 : int64_t{16} << 10;
  return std::min(cols, std::max<int64_t>(128, bytes / (4 * M) / 32 * 32));
}

// Floats from one row of the accumulators to the next (cols: N rounded up to 32). Never a
// multiple of 4 KiB: a store to one row then stalled the load of the next (4K aliasing: dense
// weight, 8 rows, 2048x2048 ran at 0.72x of dense, and at 1.28x 64 bytes past one). Up to 4 rows
// (chunks in L2), 64 bytes past one. Above, a chunk lies in L1, and its rows start a chunk and a
// line apart modulo the L1's 64 sets, so that they fill the sets evenly: 64 bytes past a multiple
// of 4 KiB, the 16 rows of a 256-column chunk crowded up to 16 lines into a set of 8 ways (+2-19%
// at 8-24 rows, bitmask weight). The step in lines is odd: 64 rows differ in their low 12 bits.
inline int64_t union_ldc(int64_t M, int64_t cols) {
  if (M <= 4) return cols + 16;
  const int64_t lines = cols / 16, step = union_chunk_cols(M, cols) / 16 + 1;
  return 16 * (lines + ((step - lines) % 64 + 64) % 64);
}

// The `count` inputs active in some row of x (their union), in order, and x at those inputs, row
// by row: ld (count rounded up to a group) entries, zero past count and where inactive, in rows
// ld + 32 apart (the compresses store whole vectors). Kept between calls: nothing is zeroed twice.
struct UnionInputs {
  std::vector<int32_t> index;
  std::vector<uint16_t> x;
  std::vector<uint16_t> zeros;  // the row a partial last group reads for its dead rows (never written)
  int64_t count = 0, ld = 0;
};

inline void union_inputs_bf16(const LinearIO& io, float threshold, UnionInputs& out) {
  const int32_t thr = inactive_bits_bf16(threshold);
  const int64_t chunks = (io.K + 31) / 32;
  std::vector<uint32_t> any(static_cast<size_t>(chunks), 0u);
  int64_t count = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k = 32 * c;
    uint32_t bits = 0;
    __m512i v;
    for (int64_t m = 0; m < io.M && bits != ~0u; ++m)
      bits |= active_bf16(static_cast<const uint16_t*>(io.x) + m * io.ldx, k, io.K, thr, v);
    any[static_cast<size_t>(c)] = bits;
    count += popcount32(bits);
  }
  out.count = count;
  out.ld = round_up(count, kUnionGroup);
  out.index.resize(static_cast<size_t>(count + 32));
  out.x.resize(static_cast<size_t>(io.M * (out.ld + 32)));
  for (int64_t m = 0; m < io.M; ++m)  // the group's pad: the compresses below may not reach it
    std::fill(out.x.begin() + m * (out.ld + 32) + count, out.x.begin() + m * (out.ld + 32) + out.ld, uint16_t{0});
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t c = 0, at = 0; c < chunks; ++c) {
    const uint32_t bits = any[static_cast<size_t>(c)];
    if (bits == 0) continue;
    const __m512i base = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(32 * c)));
    const int low = popcount32(bits & 0xffffu);
    _mm512_storeu_si512(out.index.data() + at, _mm512_maskz_compress_epi32(static_cast<__mmask16>(bits), base));
    _mm512_storeu_si512(out.index.data() + at + low, _mm512_maskz_compress_epi32(
        static_cast<__mmask16>(bits >> 16), _mm512_add_epi32(base, _mm512_set1_epi32(16))));
    for (int64_t m = 0; m < io.M; ++m) {
      __m512i v;
      const __mmask32 active = active_bf16(static_cast<const uint16_t*>(io.x) + m * io.ldx, 32 * c, io.K, thr, v);
      _mm512_storeu_si512(out.x.data() + m * (out.ld + 32) + at,
                          _mm512_maskz_compress_epi16(bits, _mm512_maskz_mov_epi16(active, v)));
    }
    at += popcount32(bits);
  }
}

// Rows of a dense w_t [K, N], read in place: next(c, n) gives 32 columns from n (zeros past N).
// From kSkipMinRowsDense rows, gemm_skip.h is faster.
struct UnionDenseRows {
  static constexpr int64_t kMaxRows = kSkipMinRowsDense - 1;
  const DenseView& w;
  struct Cursor {
    const uint16_t* row;
  };
  Cursor start(int64_t k) const { return {static_cast<const uint16_t*>(w.values) + k * w.ld}; }
  int64_t zeros_size() const { return round_up(w.cols, 32); }
  Cursor zeros(const uint16_t* z) const { return {z}; }
  __m512i next(Cursor& c, int64_t n) const {
    const __mmask32 live = n + 32 <= w.cols ? ~0u : _bzhi_u32(~0u, static_cast<unsigned>(w.cols - n));
    return _mm512_maskz_loadu_epi16(live, c.row + n);
  }
  void prefetch(const Cursor& c, int64_t col, int64_t) const { _mm_prefetch(reinterpret_cast<const char*>(c.row + col), _MM_HINT_T1); }
};

// Rows of a bitmask w_t, expanded 32 columns at a time; a cursor walks its row left to right.
// From kSkipMinRowsBitmask rows, gemm_skip.h is faster.
struct UnionBitmaskRows {
  static constexpr int64_t kMaxRows = kSkipMinRowsBitmask - 1;
  const BitmaskView& w;
  struct Cursor {
    const uint8_t* mask;
    const uint16_t* values;  // the row's next value
  };
  Cursor start(int64_t k) const {
    return {w.mask + k * w.mask_stride, static_cast<const uint16_t*>(w.values) + w.row_offsets[k]};
  }
  int64_t zeros_size() const { return (w.mask_stride + 1) / 2; }
  Cursor zeros(const uint16_t* z) const { return {reinterpret_cast<const uint8_t*>(z), z}; }  // no value is read
  __m512i next(Cursor& c, int64_t n) const { return expand_next(c.mask, w.mask_stride, n, c.values); }
  // Column col, `step` columns into a chunk: a chunk takes at most a line of values per 32 columns.
  void prefetch(const Cursor& c, int64_t col, int64_t step) const {
    _mm_prefetch(reinterpret_cast<const char*>(c.values + step), _MM_HINT_T1);
    if (col % 512 == 0) _mm_prefetch(reinterpret_cast<const char*>(c.mask + col / 8), _MM_HINT_T1);
  }
};

// c[m][c0:c1] (+)= one group's rows times x's pairs for them, for each row m of x; the rows of
// the next group (`ahead`, from column ahead_c0) are fetched meanwhile. c holds each 32 columns in
// the unpacks' lane order. The group's rows are read without branches, the loop unrolled,
// cursors and pairs in registers: skipping a partial group's missing rows kept them in memory,
// 4-28% slower with a bitmask weight at 2-24 rows. A partial last group reads rows of zeros
// (Rows::zeros) against the zeros of x's padding.
template <class Rows>
void union_group_bf16(const Rows& rows, typename Rows::Cursor* cur, const typename Rows::Cursor* ahead,
                      int64_t ahead_c0, int64_t c0, int64_t c1, const uint16_t* x, int64_t ldx, int64_t M, float* c,
                      int64_t ldc, bool first) {
  typename Rows::Cursor at[kUnionGroup];  // in registers: stores to c might alias cur
  for (int j = 0; j < kUnionGroup; ++j) at[j] = cur[j];
  for (int64_t n = c0; n < c1; n += 32) {
    if (ahead)
      for (int j = 0; j < kUnionGroup; ++j) rows.prefetch(ahead[j], ahead_c0 + (n - c0), n - c0);
    __m512i pairs[2 * kUnionPairs];
#pragma GCC unroll 8
    for (int p = 0; p < kUnionPairs; ++p) {
      const __m512i a = rows.next(at[2 * p], n), b = rows.next(at[2 * p + 1], n);
      pairs[2 * p] = _mm512_unpacklo_epi16(a, b);
      pairs[2 * p + 1] = _mm512_unpackhi_epi16(a, b);
    }
    for (int64_t m = 0; m < M; ++m) {
      float* cm = c + m * ldc + n;
      const uint16_t* xm = x + m * ldx;
      __m512 lo = first ? _mm512_setzero_ps() : _mm512_load_ps(cm), hi = first ? _mm512_setzero_ps() : _mm512_load_ps(cm + 16);
      for (int p = 0; p < kUnionPairs; ++p) {
        const __m512i xp = _mm512_set1_epi32(static_cast<int>(load_pair(xm + 2 * p)));
        lo = dot_bf16(lo, xp, pairs[2 * p]);
        hi = dot_bf16(hi, xp, pairs[2 * p + 1]);
      }
      _mm512_store_ps(cm, lo);
      _mm512_store_ps(cm + 16, hi);
    }
  }
  for (int j = 0; j < kUnionGroup; ++j) cur[j] = at[j];
}

// y[:, n0:n1] = the sum of the threads' accumulators (parts of M x ldc floats, added into the
// first, which is put in column order) + bias, rounded to bf16.
inline void union_store_bf16(const LinearIO& io, float* part, int64_t parts, int64_t ldc, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 32) {
    for (int64_t m = 0; m < io.M; ++m) {
      float* c = part + m * ldc + n;
      for (int64_t t = 1; t < parts; ++t)
        for (int j = 0; j < 32; j += 16)
          _mm512_store_ps(c + j, _mm512_add_ps(_mm512_load_ps(c + j), _mm512_load_ps(c + t * io.M * ldc + j)));
      unpermute_chunks(c, 32);
    }
    store_y_bf16<32>(io, n, std::min<int64_t>(32, io.N - n), part + n, ldc);
  }
}

// y = threshold(x) @ w_t + bias for kUnionMinRows <= M <= Rows::kMaxRows.
template <class Rows>
void gemm_union_bf16(const LinearIO& io, float threshold, const Rows& rows) {
  const int64_t N = io.N, ldc = union_ldc(io.M, round_up(N, 32));
  thread_local UnionInputs kept;
  UnionInputs& in = kept;  // the calling thread's, which the workers read (a thread_local named in the task would be theirs)
  union_inputs_bf16(io, threshold, in);
  if (static_cast<int64_t>(in.zeros.size()) < rows.zeros_size()) in.zeros.assign(static_cast<size_t>(rows.zeros_size()), 0);
  const uint16_t* zeros = in.zeros.data();
  if (io.nonfinite) std::fill(io.nonfinite, io.nonfinite + io.M, uint8_t{0});  // computed as dense: no fix-up
  const int64_t groups = in.ld / kUnionGroup;
  const int64_t parts = std::min<int64_t>(threads_for(io.threads, io.M * in.ld * N), std::max<int64_t>(groups, 1));
  thread_local std::vector<float> part_kept;
  std::vector<float> part_once;
  float* part = call_buffer(part_kept, part_once, static_cast<size_t>(parts * io.M * ldc + 16));
  part = reinterpret_cast<float*>(round_up(reinterpret_cast<intptr_t>(part), 64));
  if (groups == 0) std::fill(part, part + io.M * ldc, 0.0f);  // nothing active: y = bias
  const int64_t cols = round_up(N, 32), chunk = union_chunk_cols(io.M, cols);
  parallel_for(groups > 0 ? parts : 0, static_cast<int>(parts), [&](int64_t t) {
    const int64_t g0 = t * groups / parts, g1 = (t + 1) * groups / parts, first = g0 * kUnionGroup;
    thread_local std::vector<typename Rows::Cursor> cursors;  // of the task's rows, kUnionGroup per group
    cursors.resize(static_cast<size_t>((g1 - g0) * kUnionGroup));
    for (int64_t i = 0; i < (g1 - g0) * kUnionGroup; ++i)
      cursors[static_cast<size_t>(i)] = first + i < in.count ? rows.start(in.index[static_cast<size_t>(first + i)]) : rows.zeros(zeros);
    float* c = part + t * io.M * ldc;
    for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
      const int64_t c1 = std::min(cols, c0 + chunk);
      for (int64_t g = g0; g < g1; ++g) {
        // fetched meanwhile: the next group's rows in this chunk, or the first group's in the next
        const bool last = g + 1 == g1;
        const auto* ahead = !last ? cursors.data() + (g + 1 - g0) * kUnionGroup : c1 < cols ? cursors.data() : nullptr;
        union_group_bf16(rows, cursors.data() + (g - g0) * kUnionGroup, ahead, last ? c1 : c0, c0, c1,
                         in.x.data() + g * kUnionGroup, in.ld + 32, io.M, c, ldc, g == g0);
      }
    }
  });
  const int64_t per = round_up((cols + parts - 1) / parts, 32);
  parallel_for(parts, static_cast<int>(parts), [&](int64_t t) {
    union_store_bf16(io, part, groups > 0 ? parts : 1, ldc, t * per, std::min(cols, (t + 1) * per));
  });
}

// Runs a small batch's activation-sparse product here; false where it does not apply.
template <class Rows>
bool act_sparse_union_bf16(const LinearIO& io, float threshold, const Rows& rows) {
  if (io.dtype != DType::bf16 || !use_bf16_dot() || io.M < kUnionMinRows || io.M > Rows::kMaxRows) return false;
  gemm_union_bf16(io, threshold, rows);
  return true;
}
#endif

}  // namespace sparseflow::cpu::SF_ISA
