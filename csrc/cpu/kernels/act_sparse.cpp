// Activation-sparse linear: y = sum over active inputs k of x[k] * w_t[k, :], where an input is
// active unless |x[k]| <= threshold, compared in x's dtype (so NaN is always active, and inf unless
// the threshold is inf there). The weight is stored transposed, so each active input reads one
// contiguous row: the bytes read shrink with the activation density. With a bitmask w_t, weight and activation sparsity multiply.
#include "cpu/kernels/batch_rows.h"
#include "cpu/kernels/gemm_skip.h"
#include "cpu/kernels/gemm_union.h"
#include "cpu/kernels/kernels.h"

namespace sparseflow::cpu::SF_ISA {
namespace {

struct Active {
  int64_t k;
  float x;
};

// The threshold rounded to x's dtype (to nearest even): torch compares |x| <= threshold in x's
// dtype, so an input equal to the rounded threshold is inactive even where it exceeds the float.
float threshold_in(DType t, float threshold) {
  if (t == DType::f32) return threshold;
  uint16_t bits;
  store_from_f32(&bits, 0, t, threshold);
  return load_as_f32(&bits, 0, t);
}

// Active inputs of row m of x (the threshold test is fused into this one pass over x).
// Returns whether the row holds a NaN or inf.
bool collect_active(const LinearIO& io, int64_t m, float threshold, std::vector<Active>& out) {
  out.clear();
  const char* row = static_cast<const char*>(io.x) + m * io.ldx * element_size(io.dtype);
  bool finite = true;
  for (int64_t k = 0; k < io.K; ++k) {
    const float v = load_as_f32(row, k, io.dtype);
    if (!(std::fabs(v) <= threshold)) {
      out.push_back({k, v});
      finite &= std::isfinite(v);
    }
  }
  return finite;
}

// acc[0:len] += sum_j xs[j] * rows[j][0:len], J rows at a time to save accumulator traffic.
template <int J>
void axpy_rows(float* acc, int64_t len, const void* const* rows, const float* xs, DType t) {
#if defined(SF_ISA_avx512)
  __m512 xv[J];
  for (int j = 0; j < J; ++j) xv[j] = _mm512_set1_ps(xs[j]);
  for (int64_t n = 0; n < len; n += 16) {
    const __mmask16 live = static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(std::min<int64_t>(16, len - n))));
    __m512 a = _mm512_maskz_loadu_ps(live, acc + n);
    for (int j = 0; j < J; ++j) a = _mm512_fmadd_ps(xv[j], maskz_load16_f32(live, rows[j], n, t), a);
    _mm512_mask_storeu_ps(acc + n, live, a);
  }
#else
  int64_t n = 0;
#if defined(SF_ISA_avx2)
  __m256 xv[J];
  for (int j = 0; j < J; ++j) xv[j] = _mm256_set1_ps(xs[j]);
  for (; n + 8 <= len; n += 8) {
    __m256 a = _mm256_loadu_ps(acc + n);
    for (int j = 0; j < J; ++j) a = _mm256_fmadd_ps(xv[j], load8_f32(rows[j], n, t), a);
    _mm256_storeu_ps(acc + n, a);
  }
#endif
  for (; n < len; ++n)
    for (int j = 0; j < J; ++j) acc[n] += xs[j] * load_as_f32(rows[j], n, t);
#endif
}

// acc[0:cols] += x * (row k of a bitmask matrix, expanded). acc is padded to a multiple of 32
// columns, so whole chunks are written without masks (mask bits past `cols` are zero). Row
// `prefetch_k` (a later active row, or -1) is fetched meanwhile, a line of its values per step:
// the active rows are too scattered for the hardware prefetcher.
void axpy_bitmask_row(float* acc, const BitmaskView& w, int64_t k, float x, DType t, int64_t prefetch_k) {
  const uint8_t* row = w.mask + k * w.mask_stride;
  int64_t v = w.row_offsets[k];
#if defined(SF_ISA_avx512)
  const int64_t esize = element_size(t);
  const char* next = prefetch_k < 0 ? nullptr : static_cast<const char*>(w.values) + w.row_offsets[prefetch_k] * esize;
  const int64_t next_bytes = prefetch_k < 0 ? 0 : (w.row_offsets[prefetch_k + 1] - w.row_offsets[prefetch_k]) * esize;
  const char* next_mask = prefetch_k < 0 ? nullptr : reinterpret_cast<const char*>(w.mask + prefetch_k * w.mask_stride);
  const auto prefetch_step = [&](int64_t step) {  // one line of values per step covers the row
    if (step * 64 < next_bytes) _mm_prefetch(next + step * 64, _MM_HINT_T1);
    if (next_mask && step * 64 < w.mask_stride) _mm_prefetch(next_mask + step * 64, _MM_HINT_T1);
  };
  const __m512 xv = _mm512_set1_ps(x);
  if (t == DType::f32) {
    const float* vals = static_cast<const float*>(w.values);
    for (int64_t n = 0; n < w.cols; n += 16) {
      prefetch_step(n / 16);
      const uint32_t bits = mask_bits(row, w.mask_stride, n, 16);
      const int cnt = popcount32(bits);
      const __m512 wv = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits),
                                               _mm512_maskz_loadu_ps(static_cast<__mmask16>(_bzhi_u32(~0u, cnt)), vals + v));
      _mm512_storeu_ps(acc + n, _mm512_fmadd_ps(xv, wv, _mm512_loadu_ps(acc + n)));
      v += cnt;
    }
    return;
  }
  const uint16_t* vals = static_cast<const uint16_t*>(w.values);
  const bool bf16 = t == DType::bf16;
  for (int64_t n = 0; n < w.cols; n += 32) {
    prefetch_step(n / 32);
    const uint32_t bits = mask_bits(row, w.mask_stride, n, 32);
    const int cnt = popcount32(bits);
    const __m512i wv = _mm512_maskz_expand_epi16(bits, _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, cnt), vals + v));
    const __m256i lo16 = _mm512_castsi512_si256(wv), hi16 = _mm512_extracti64x4_epi64(wv, 1);
    const __m512 lo = bf16 ? cvt16_bf16(lo16) : cvt16_f16(lo16), hi = bf16 ? cvt16_bf16(hi16) : cvt16_f16(hi16);
    _mm512_storeu_ps(acc + n, _mm512_fmadd_ps(xv, lo, _mm512_loadu_ps(acc + n)));
    _mm512_storeu_ps(acc + n + 16, _mm512_fmadd_ps(xv, hi, _mm512_loadu_ps(acc + n + 16)));
    v += cnt;
  }
#else
  (void)prefetch_k;
  for (int64_t byte = 0; byte < w.mask_stride; ++byte)
    for (uint32_t bits = row[byte]; bits; bits &= bits - 1)
      acc[byte * 8 + __builtin_ctz(bits)] += x * load_as_f32(w.values, v++, t);
#endif
}

#if defined(SF_ISA_avx512)
// bf16 with BF16 dot products: two active rows a, b at a time. unpacklo/hi_epi16 interleave their
// weights into (a, b) pairs that one vdpbf16ps multiplies by the pair (x_a, x_b): no conversion
// to f32 and one accumulator update per two rows. The accumulator then holds each 32 columns in
// unpack's lane order; unpermute_chunks (common.h) puts them back in order at the end.
inline __m512i bf16_pair(float xa, float xb) {
  return _mm512_set1_epi32(static_cast<int>(f32_to_bf16(xa) | (static_cast<uint32_t>(f32_to_bf16(xb)) << 16)));
}

// acc[0:len] (padded to 32, pair order) += P pairs of dense bf16 rows times their x pairs; with
// kLone, one row (rows[0]) paired with zeros.
template <int P, bool kLone = false>
void axpy_pairs_dense_bf16(float* acc, int64_t len, const uint16_t* const* rows, const __m512i* xp) {
  for (int64_t n = 0; n < len; n += 32) {
    const __mmask32 live = _bzhi_u32(~0u, static_cast<unsigned>(std::min<int64_t>(32, len - n)));
    __m512 lo = _mm512_loadu_ps(acc + n), hi = _mm512_loadu_ps(acc + n + 16);
    for (int p = 0; p < P; ++p) {
      const __m512i a = _mm512_maskz_loadu_epi16(live, rows[2 * p] + n);
      const __m512i b = kLone ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(live, rows[2 * p + 1] + n);
      lo = dot_bf16(lo, _mm512_unpacklo_epi16(a, b), xp[p]);
      hi = dot_bf16(hi, _mm512_unpackhi_epi16(a, b), xp[p]);
    }
    _mm512_storeu_ps(acc + n, lo);
    _mm512_storeu_ps(acc + n + 16, hi);
  }
}

// acc (all columns, padded to 32, pair order) += P pairs of bitmask rows of w_t times their x
// pairs; P = 0 takes one row (act[0]) paired with zeros. The `n_next` rows after them are
// prefetched meanwhile, a cache line of each per 32 columns: a row's values never take more lines
// than it has 32-column steps, and the active rows are too scattered for the hardware prefetcher.
template <int P>
void axpy_bitmask_pairs_bf16(float* acc, const BitmaskView& w, const Active* act, int n_next) {
  constexpr int R = P == 0 ? 1 : 2 * P, Q = P == 0 ? 1 : P;
  const uint8_t* mask[R];
  const uint16_t* v[R];
  __m512i xp[Q];
  for (int j = 0; j < R; ++j) {
    mask[j] = w.mask + act[j].k * w.mask_stride;
    v[j] = static_cast<const uint16_t*>(w.values) + w.row_offsets[act[j].k];
  }
  const char* next_values[R];
  const char* next_mask[R];
  int64_t next_bytes[R];
  n_next = std::min(n_next, R);
  for (int j = 0; j < n_next; ++j) {
    const int64_t k = act[R + j].k;
    next_values[j] = static_cast<const char*>(w.values) + w.row_offsets[k] * 2;
    next_bytes[j] = (w.row_offsets[k + 1] - w.row_offsets[k]) * 2;
    next_mask[j] = reinterpret_cast<const char*>(w.mask + k * w.mask_stride);
  }
  for (int p = 0; p < Q; ++p) xp[p] = P == 0 ? bf16_pair(act[0].x, 0.0f) : bf16_pair(act[2 * p].x, act[2 * p + 1].x);
  for (int64_t n = 0; n < w.cols; n += 32) {
    for (int j = 0; j < n_next; ++j) {
      if (n * 2 < next_bytes[j]) _mm_prefetch(next_values[j] + n * 2, _MM_HINT_T1);  // line n / 32 of its values
      if (n % 512 == 0) _mm_prefetch(next_mask[j] + n / 8, _MM_HINT_T1);
    }
    __m512 lo = _mm512_loadu_ps(acc + n), hi = _mm512_loadu_ps(acc + n + 16);
    for (int p = 0; p < Q; ++p) {
      const __m512i a = expand_next(mask[2 * p], w.mask_stride, n, v[2 * p]);
      const __m512i b = P == 0 ? _mm512_setzero_si512() : expand_next(mask[2 * p + 1], w.mask_stride, n, v[2 * p + 1]);
      lo = dot_bf16(lo, _mm512_unpacklo_epi16(a, b), xp[p]);
      hi = dot_bf16(hi, _mm512_unpackhi_epi16(a, b), xp[p]);
    }
    _mm512_storeu_ps(acc + n, lo);
    _mm512_storeu_ps(acc + n + 16, hi);
  }
}
#endif

int64_t column_chunk(const LinearIO& io) {
  const int64_t per_thread = (io.N + std::max(1, io.threads) - 1) / std::max(1, io.threads);
  return std::max<int64_t>(256, round_up(per_thread, 64));
}

}  // namespace

int64_t act_sparse_batch_rows(DType t) {
#if defined(SF_ISA_avx512)
  return t == DType::bf16 ? kUnionMinRows : 0;  // gemm_union.h (with BF16 dot products), then gemm_skip.h
#else
  (void)t;
  return 0;
#endif
}

void act_sparse_dense(const DenseView& w_t, float threshold, const LinearIO& io) {
#if defined(SF_ISA_avx512)
  // a batch: each row of w_t read once (gemm_union.h), or one GEMM (gemm_skip.h)
  if (act_sparse_union_bf16(io, threshold, UnionDenseRows{w_t}) || act_sparse_batch_bf16(io, threshold, dense_rows_bf16(w_t)))
    return;
#endif
  const int64_t chunk = column_chunk(io), tasks = (io.N + chunk - 1) / chunk;
  const int64_t esize = element_size(io.dtype);
  std::vector<Active> active;
  std::vector<const void*> rows;
  std::vector<float> xs;
  for (int64_t m = 0; m < io.M; ++m) {
    collect_active(io, m, threshold_in(io.dtype, threshold), active);  // NaN/inf need no fix-up: w_t is dense
    if (io.nonfinite) io.nonfinite[m] = 0;
    rows.resize(active.size());
    xs.resize(active.size());
    for (size_t a = 0; a < active.size(); ++a) {
      rows[a] = static_cast<const char*>(w_t.values) + active[a].k * w_t.ld * esize;
      xs[a] = active[a].x;
    }
    parallel_for(tasks, threads_for(io.threads, static_cast<int64_t>(rows.size()) * io.N), [&](int64_t task) {
      const int64_t n0 = task * chunk, len = std::min(chunk, io.N - n0);
      thread_local std::vector<float> acc;
#if defined(SF_ISA_avx512)
      if (io.dtype == DType::bf16 && use_bf16_dot()) {
        const int64_t len32 = round_up(len, 32);
        acc.assign(static_cast<size_t>(len32), 0.0f);
        const uint16_t* pair_rows[8];
        __m512i xp[4];
        const auto row = [&](size_t a) { return static_cast<const uint16_t*>(rows[a]) + n0; };
        size_t a = 0;
        for (; a + 8 <= rows.size(); a += 8) {
          for (int j = 0; j < 8; ++j) pair_rows[j] = row(a + j);
          for (int p = 0; p < 4; ++p) xp[p] = bf16_pair(xs[a + 2 * p], xs[a + 2 * p + 1]);
          axpy_pairs_dense_bf16<4>(acc.data(), len, pair_rows, xp);
        }
        for (; a + 2 <= rows.size(); a += 2) {
          pair_rows[0] = row(a);
          pair_rows[1] = row(a + 1);
          xp[0] = bf16_pair(xs[a], xs[a + 1]);
          axpy_pairs_dense_bf16<1>(acc.data(), len, pair_rows, xp);
        }
        if (a < rows.size()) {  // an odd last row pairs with zeros
          pair_rows[0] = row(a);
          xp[0] = bf16_pair(xs[a], 0.0f);
          axpy_pairs_dense_bf16<1, true>(acc.data(), len, pair_rows, xp);
        }
        unpermute_chunks(acc.data(), len32);
        store_y_row(io, m, n0, n0 + len, acc.data());
        return;
      }
#endif
      // Rows are summed kScalarBlock at a time into `part`, then into acc: one running sum over
      // thousands of active rows reached 5x the error of torch's dense op (common.h).
      thread_local std::vector<float> part;
      acc.assign(static_cast<size_t>(len), 0.0f);
      part.resize(static_cast<size_t>(len));
      const void* shifted[4];
      for (size_t a0 = 0; a0 < rows.size(); a0 += kScalarBlock) {
        const size_t end = std::min(rows.size(), a0 + static_cast<size_t>(kScalarBlock));
        std::fill(part.begin(), part.begin() + len, 0.0f);
        size_t a = a0;
        for (; a + 4 <= end; a += 4) {
          for (int j = 0; j < 4; ++j) shifted[j] = static_cast<const char*>(rows[a + j]) + n0 * esize;
          axpy_rows<4>(part.data(), len, shifted, xs.data() + a, io.dtype);
        }
        for (; a < end; ++a) {
          shifted[0] = static_cast<const char*>(rows[a]) + n0 * esize;
          axpy_rows<1>(part.data(), len, shifted, xs.data() + a, io.dtype);
        }
        for (int64_t n = 0; n < len; ++n) acc[static_cast<size_t>(n)] += part[static_cast<size_t>(n)];
      }
      store_y_row(io, m, n0, n0 + len, acc.data());
    });
  }
}

void act_sparse_bitmask(const BitmaskView& w_t, float threshold, const LinearIO& io) {
#if defined(SF_ISA_avx512)
  if (act_sparse_union_bf16(io, threshold, UnionBitmaskRows{w_t}) ||
      act_sparse_batch_bf16(io, threshold, bitmask_rows_bf16(w_t, io.threads)))
    return;
#endif
  // Each thread sums its share of the active rows into a private accumulator over all N outputs;
  // a second pass adds the accumulators (splitting N instead would need per-chunk value offsets).
  const int64_t parts = threads_for(io.threads, io.K * io.N);
  const int64_t chunk = column_chunk(io), tasks = (io.N + chunk - 1) / chunk;
  const int64_t ld = round_up(io.N, 32);  // accumulator rows padded for whole-chunk stores
  std::vector<Active> active;
  std::vector<float> partial(static_cast<size_t>(parts * ld)), blocks(static_cast<size_t>(parts * ld));
  for (int64_t m = 0; m < io.M; ++m) {
    const bool finite = collect_active(io, m, threshold_in(io.dtype, threshold), active);
    if (io.nonfinite) io.nonfinite[m] = finite ? 0 : 1;
    parallel_for(parts, static_cast<int>(parts), [&](int64_t p) {
      float* acc = partial.data() + p * ld;
      std::fill(acc, acc + ld, 0.0f);
      const size_t lo = active.size() * p / parts, hi = active.size() * (p + 1) / parts;
#if defined(SF_ISA_avx512)
      if (io.dtype == DType::bf16 && use_bf16_dot()) {
        size_t a = lo;
        const auto after = [&](size_t end) { return static_cast<int>(std::min<size_t>(8, hi - end)); };
        for (; a + 8 <= hi; a += 8) axpy_bitmask_pairs_bf16<4>(acc, w_t, active.data() + a, after(a + 8));
        for (; a + 2 <= hi; a += 2) axpy_bitmask_pairs_bf16<1>(acc, w_t, active.data() + a, after(a + 2));
        if (a < hi) axpy_bitmask_pairs_bf16<0>(acc, w_t, active.data() + a, 0);
        unpermute_chunks(acc, ld);
        return;
      }
#endif
      float* part = blocks.data() + p * ld;  // kScalarBlock rows at a time, as in act_sparse_dense
      for (size_t a0 = lo; a0 < hi; a0 += kScalarBlock) {
        std::fill(part, part + ld, 0.0f);
        for (size_t a = a0; a < std::min(hi, a0 + static_cast<size_t>(kScalarBlock)); ++a)
          axpy_bitmask_row(part, w_t, active[a].k, active[a].x, io.dtype, a + 2 < hi ? active[a + 2].k : -1);
        for (int64_t n = 0; n < ld; ++n) acc[n] += part[n];
      }
    });
    parallel_for(tasks, static_cast<int>(parts), [&](int64_t task) {
      const int64_t n0 = task * chunk, n1 = std::min(io.N, n0 + chunk);
      for (int64_t p = 1; p < parts; ++p)
        for (int64_t n = n0; n < n1; ++n) partial[n] += partial[p * ld + n];
      store_y_row(io, m, n0, n1, partial.data() + n0);
    });
  }
}

}  // namespace sparseflow::cpu::SF_ISA
