// Activation-sparse linear for batches (bf16 from kGemmMinRows rows, AVX-512 BF16): y = x' @ w_t
// + bias, x' being x with its inactive inputs (|x| <= threshold) zeroed. Each row of x has its own
// active set, so in a batch nearly every row of w_t is needed by some row of x, and one GEMM over
// the zeroed x beats the row kernel, which streams the active rows once per row of x.
// The weight keeps its [K, N] layout (dense, or a bitmask per input row): panels of 256 output
// columns are packed into k pairs, the operand layout of vdpbf16ps, and pairs of x are broadcast
// against them; 6 rows of x times 4 vectors of columns make 24 accumulators. The zeros of the
// decompressed weight are multiplied as dense would, so NaN and inf in x propagate as in dense.
#pragma once
#include "cpu/kernels/tiled.h"

namespace sparseflow::cpu::SF_ISA {

#if defined(SF_ISA_avx512)
// Output columns per panel: each row of w_t is read 512 bytes at a time. Narrower panels (64
// columns, 2 cache lines per row 8-16 KiB apart) left the weight reads bound by memory latency.
constexpr int64_t kKnPanel = 256;
constexpr int64_t kKnSub = 64;           // columns per micro-kernel call: 4 vectors of 16
constexpr int64_t kKnBlockPairs = 256;   // k pairs per packed block (256 KiB, in L2): 32-128 measured slower
constexpr int kKnRows = 6;               // rows of x per micro-kernel call
constexpr int64_t kKnPrefetchRows = 8;   // rows of w_t fetched ahead of the packing

// The largest bf16 magnitude (as bits) that counts as inactive, or -1 when none does. As torch
// compares |x| <= threshold in x's dtype, the threshold is rounded to bf16 first.
inline int32_t inactive_bits_bf16(float threshold) {
  if (!(threshold >= 0.0f)) return -1;  // negative or NaN: every input is active
  return f32_to_bf16(threshold) & 0x7fff;  // -0.0 compares as +0.0
}

// z[m][0:ldz] = x[m] with inactive inputs and the padding past K set to +0 (ldz: a multiple of 32).
inline void threshold_x_bf16(const LinearIO& io, float threshold, int64_t ldz, uint16_t* z) {
  const int32_t thr = inactive_bits_bf16(threshold);
  const __m512i magnitude = _mm512_set1_epi16(0x7fff), limit = _mm512_set1_epi16(static_cast<int16_t>(thr));
  parallel_for(io.M, threads_for(io.threads, io.M * io.K), [&](int64_t m) {
    const uint16_t* src = static_cast<const uint16_t*>(io.x) + m * io.ldx;
    uint16_t* dst = z + m * ldz;
    for (int64_t k = 0; k < ldz; k += 32) {
      const __mmask32 live = k + 32 <= io.K ? ~0u : _bzhi_u32(~0u, static_cast<unsigned>(std::max<int64_t>(0, io.K - k)));
      const __m512i v = _mm512_maskz_loadu_epi16(live, src + k);
      const __mmask32 inactive =
          thr < 0 ? 0 : _mm512_cmple_epu16_mask(_mm512_and_si512(v, magnitude), limit);
      _mm512_storeu_si512(dst + k, _mm512_maskz_mov_epi16(~inactive, v));
    }
  });
}

// Packs k pairs [p0, p0 + np) of one panel: wp[q][c] = (row 2(p0+q), row 2(p0+q)+1) at column c.
// `row(k)` returns kKnPanel bf16 of row k of the panel (zero past its columns); past K: zeros.
template <class Row>
void pack_kn_pairs_bf16(const Row& row, int64_t K, int64_t p0, int64_t np, uint32_t* wp) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo_idx = _mm512_load_si512(kLo), hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  for (int64_t q = 0; q < np; ++q) {
    const int64_t k = 2 * (p0 + q);
    const uint16_t* r0 = row(k);
    constexpr int H = kKnPanel / 32;
    __m512i a[H], b[H];
    for (int h = 0; h < H; ++h) a[h] = _mm512_loadu_si512(r0 + 32 * h);  // before row(k + 1) reuses a buffer
    if (k + 1 < K) {
      const uint16_t* r1 = row(k + 1);
      for (int h = 0; h < H; ++h) b[h] = _mm512_loadu_si512(r1 + 32 * h);
    } else {
      for (int h = 0; h < H; ++h) b[h] = _mm512_setzero_si512();
    }
    uint32_t* dst = wp + q * kKnPanel;
    for (int h = 0; h < H; ++h) {
      _mm512_storeu_si512(dst + 32 * h, _mm512_permutex2var_epi16(a[h], lo_idx, b[h]));
      _mm512_storeu_si512(dst + 32 * h + 16, _mm512_permutex2var_epi16(a[h], hi_idx, b[h]));
    }
  }
}

// y = threshold(x) @ w_t + bias. `make_readers(first_cols)` is called once, with each task's
// first column, and returns reader_for(t): task t's reader (batch_rows.h), whose row(k, n0, ncols,
// width, buf) gives `width` bf16 of row k from column n0 (ncols of them real, zeros after) and is
// called for k = 0, 1, ... K-1 in order, panel after panel; prefetch(k, n0, ncols) fetches them ahead.
template <class MakeReaders>
void gemm_kn_bf16(const LinearIO& io, float threshold, const MakeReaders& make_readers) {
  const int64_t K = io.K, N = io.N, pairs = (K + 1) / 2;
  const int64_t ldz = round_up(K, 32) + 32;  // off 4 KiB multiples: the 6 rows fall in different L1 sets
  thread_local std::vector<uint16_t> z_kept;
  std::vector<uint16_t> z_once;
  uint16_t* const z = call_buffer(z_kept, z_once, static_cast<size_t>(io.M * ldz));  // the workers use it too
  threshold_x_bf16(io, threshold, ldz, z);
  if (io.nonfinite) std::fill(io.nonfinite, io.nonfinite + io.M, uint8_t{0});  // computed as dense: no fix-up
  const int threads = threads_for(io.threads, io.M * K * N);
  const int64_t panels = (N + kKnPanel - 1) / kKnPanel;
  const int64_t tasks = std::min<int64_t>(panels, int64_t{threads} * 8);
  std::vector<int64_t> first_cols(static_cast<size_t>(tasks));
  for (int64_t t = 0; t < tasks; ++t) first_cols[static_cast<size_t>(t)] = t * panels / tasks * kKnPanel;  // equal shares
  const auto reader_for = make_readers(first_cols);
  parallel_for(tasks, threads, [&](int64_t t) {
    thread_local std::vector<uint32_t> wp_buf;
    thread_local std::vector<float> c_kept;
    std::vector<float> c_once;
    wp_buf.resize(static_cast<size_t>(kKnBlockPairs * kKnPanel));
    uint32_t* wp = wp_buf.data();
    float* c = call_buffer(c_kept, c_once, static_cast<size_t>(io.M * kKnPanel));
    alignas(64) uint16_t row_buf[kKnPanel];
    const int64_t first = t * panels / tasks, end = (t + 1) * panels / tasks;
    auto reader = reader_for(t);
    for (int64_t panel = first; panel < end; ++panel) {
      const int64_t n0 = panel * kKnPanel, ncols = std::min(kKnPanel, N - n0);
      std::fill(row_buf, row_buf + kKnPanel, uint16_t{0});
      std::fill(c, c + io.M * kKnPanel, 0.0f);
      const auto row = [&](int64_t k) {
        if (k + kKnPrefetchRows < K) reader.prefetch(k + kKnPrefetchRows, n0, ncols);
        return reader.row(k, n0, ncols, kKnPanel, row_buf);
      };
      for (int64_t p0 = 0; p0 < pairs; p0 += kKnBlockPairs) {
        const int64_t np = std::min(kKnBlockPairs, pairs - p0);
        pack_kn_pairs_bf16(row, K, p0, np, wp);
        for (int64_t s = 0; s < ncols; s += kKnSub) {
          const auto micro = [&](auto rows, int64_t m0) {
            constexpr int MR = decltype(rows)::value, NV = kKnSub / 16;
            gemm_micro_bf16<MR, NV>(z + m0 * ldz + 2 * p0, ldz, wp + s, 16, kKnPanel, np, c + m0 * kKnPanel + s,
                                    kKnPanel);
          };
          int64_t m0 = 0;
          for (; m0 + kKnRows <= io.M; m0 += kKnRows) micro(std::integral_constant<int, kKnRows>{}, m0);
          if (m0 < io.M) with_count<kKnRows - 1>(io.M - m0, [&](auto rows) { micro(rows, m0); });
        }
      }
      store_y_bf16<kKnPanel>(io, n0, ncols, c, kKnPanel);
    }
  });
}

// Rows of x from which the act-sparse kernels run a batch as this GEMM in dtype t (0: never).
inline int64_t gemm_kn_min_rows(DType t) { return t == DType::bf16 && use_bf16_dot() ? kGemmMinRows : 0; }

inline bool gemm_kn_applies(const LinearIO& io) {
  const int64_t rows = gemm_kn_min_rows(io.dtype);
  return rows > 0 && io.M >= rows;
}
#endif

}  // namespace sparseflow::cpu::SF_ISA
