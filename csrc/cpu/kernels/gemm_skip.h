// Activation-sparse linear for batches (bf16, AVX-512): y = x' @ w_t + bias over the active
// inputs of each row of x only (x' is x with |x| <= threshold set to zero). gemm_sparse.h's
// micro-kernel with the operands' roles swapped: each row of x walks its active inputs, a 64-bit
// word of them at a time, and each active input is one FMA per 16 output columns, x's value
// broadcast against its row of w_t. The weight (dense, or a bitmask per input row) is converted to
// float32 once per panel of 128 output columns, into blocks of 64 rows (32 KiB, L1) that every row
// of x reads. Inactive inputs are finite (|x| <= threshold): skipping them is exact for a finite
// weight; NaN and inf are active and meet the weight's zeros as in dense.
// It replaced a bf16 GEMM that paired active inputs for vdpbf16ps (a shuffle per product, and
// here shuffles and dot products do not overlap), and, where most inputs were active, gemm_kn.h,
// which does dense's work over the zeroed x. Warm weights, 2 threads, against torch's GEMM: at 128
// rows and 50% active they ran 1.25-1.34x, this one 1.8-2.0x; at 90% active 0.92-0.98x, this one
// 1.19-1.36x; at 16 rows 0.93-0.96x, this one 1.74-1.85x.
#pragma once
#include "cpu/kernels/batch_rows.h"
#include "cpu/kernels/gemm_kn.h"
#include "cpu/kernels/gemm_sparse.h"

namespace sparseflow::cpu::SF_ISA {

#if defined(SF_ISA_avx512)
// Which of x[k : min(k + 32, k1)) are active (v: those 32 elements, zero past k1); thr as in
// inactive_bits_bf16. The one compare of this GEMM and gemm_union.h.
inline __mmask32 active_bf16(const uint16_t* x, int64_t k, int64_t k1, int32_t thr, __m512i& v) {
  const __mmask32 live = k + 32 <= k1 ? ~0u : _bzhi_u32(~0u, static_cast<unsigned>(k1 - k));
  v = _mm512_maskz_loadu_epi16(live, x + k);
  if (thr < 0) return live;
  return _mm512_mask_cmpgt_epu16_mask(live, _mm512_and_si512(v, _mm512_set1_epi16(0x7fff)),
                                      _mm512_set1_epi16(static_cast<int16_t>(thr)));
}

constexpr int64_t kSkipCols = 128;  // output columns per panel: 8 accumulators per row of x
constexpr int64_t kSkipDepth = kSparseGemmBlockFloats / kSkipCols;  // rows of w_t per block: 64
static_assert(kSparseGemmGroup % kSkipDepth == 0);
constexpr int64_t kSkipPartRows = 256;  // rows of x per part: accumulators of 128 KiB (512 rows: 3-10% slower)
// From how many rows of x this GEMM runs a batch (below, gemm_union.h where it applies). Measured
// with cold weights (bench_kernels.py --flush layers: bf16, 50% active, 2 threads, against dense;
// 8192x2048, 2048x8192, 2048x2048): dense weight 1.40-1.41x at 8 rows against the union kernel's
// 1.16-1.44x (at 4: 1.22-1.38x against 1.18-1.83x); bitmask weight 1.05-1.09x at 24 rows against
// 0.99-1.07x (at 16: 0.88-0.99x against 1.04-1.14x). The bitmask is expanded again for each panel.
constexpr int64_t kSkipMinRowsDense = 8, kSkipMinRowsBitmask = 24;

inline bool gemm_skip_applies(const LinearIO& io) { return io.dtype == DType::bf16 && io.M >= 2; }

// bits[m * words + j]: which inputs [64j, 64j + 64) of row m of x are active.
inline void active_words_bf16(const LinearIO& io, float threshold, int64_t words, uint64_t* bits) {
  const int32_t thr = inactive_bits_bf16(threshold);
  parallel_for(io.M, threads_for(io.threads, io.M * io.K), [&](int64_t m) {
    const uint16_t* x = static_cast<const uint16_t*>(io.x) + m * io.ldx;
    for (int64_t j = 0; j < words; ++j) {
      const int64_t k = 64 * j;
      __m512i v;
      uint64_t word = active_bf16(x, k, io.K, thr, v);
      if (k + 32 < io.K) word |= static_cast<uint64_t>(active_bf16(x, k + 32, io.K, thr, v)) << 32;
      bits[m * words + j] = word;
    }
  });
}

// The active inputs of one row of x in one word: their offsets and values (bf16, from x).
struct ActiveWord {
  uint64_t bits;
  const uint16_t* x;  // the row of x at the word's first input
  bool next(int64_t& r, float& w) {
    if (!bits) return false;
    r = static_cast<int64_t>(_tzcnt_u64(bits));
    w = bf16_to_f32(x[r]);
    bits = _blsr_u64(bits);
    return true;
  }
};

template <class MakeReaders>
void gemm_skip_part(const LinearIO& io, const uint64_t* bits, int64_t words, const MakeReaders& make_readers) {
  const int64_t K = io.K, N = io.N, blocks = (K + kSkipDepth - 1) / kSkipDepth;
  const int threads = threads_for(io.threads, io.M * K * N / 2);
  const int64_t panels = (N + kSkipCols - 1) / kSkipCols;
  const int64_t tasks = std::min<int64_t>(panels, int64_t{threads} * 4);
  std::vector<int64_t> first_cols(static_cast<size_t>(tasks));
  for (int64_t t = 0; t < tasks; ++t) first_cols[static_cast<size_t>(t)] = t * panels / tasks * kSkipCols;
  const auto reader_for = make_readers(first_cols);
  parallel_for(tasks, threads, [&](int64_t t) {
    thread_local std::vector<float> block_kept, c_kept;
    std::vector<float> c_once;
    block_kept.resize(static_cast<size_t>(kSparseGemmBlockFloats + 16));
    float* const block = reinterpret_cast<float*>(round_up(reinterpret_cast<intptr_t>(block_kept.data()), 64));
    float* c = call_buffer(c_kept, c_once, static_cast<size_t>(2 * io.M * kSkipCols + 16));
    c = reinterpret_cast<float*>(round_up(reinterpret_cast<intptr_t>(c), 64));
    float* const part = c + io.M * kSkipCols;  // partial sums of the current group (gemm_sparse.h's kSparseGemmGroup)
    const int64_t first = t * panels / tasks, end = (t + 1) * panels / tasks;
    auto reader = reader_for(t);
    for (int64_t panel = first; panel < end; ++panel) {
      const int64_t n0 = panel * kSkipCols, ncols = std::min(kSkipCols, N - n0);
      if (blocks == 0) std::fill(c, c + io.M * kSkipCols, 0.0f);  // K == 0: y = bias
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * kSkipDepth, rows = std::min(kSkipDepth, K - k0);
        for (int64_t r = 0; r < rows; ++r) {
          if (k0 + r + 8 < K) reader.prefetch(k0 + r + 8, n0, ncols);
          reader.floats(k0 + r, n0, ncols, kSkipCols, block + r * kSkipCols);
        }
        const bool fold = (k0 + rows) % kSparseGemmGroup == 0 || k0 + rows == K;  // the group ends here
        for (int64_t m = 0; m < io.M; ++m) {
          float* const pm = part + m * kSkipCols;
          sparse_gemm_row<kSkipCols / 16>(block, ActiveWord{bits[m * words + b], static_cast<const uint16_t*>(io.x) + m * io.ldx + k0},
                                          k0 % kSparseGemmGroup == 0, pm);
          if (fold) sparse_gemm_fold<kSkipCols / 16>(pm, k0 < kSparseGemmGroup, c + m * kSkipCols);
        }
      }
      store_y_bf16<kSkipCols>(io, n0, ncols, c, kSkipCols);
    }
  });
}

// y = threshold(x) @ w_t + bias, in parts of at most kSkipPartRows rows of x. Inactive inputs
// are finite (|x| <= threshold): skipping them is exact for a finite weight; NaN and inf are
// active and meet the weight's zeros as in dense.
template <class MakeReaders>
void gemm_skip_bf16(const LinearIO& io, float threshold, const MakeReaders& make_readers) {
  if (io.nonfinite) std::fill(io.nonfinite, io.nonfinite + io.M, uint8_t{0});
  const int64_t words = (io.K + 63) / 64;
  thread_local std::vector<uint64_t> bits_kept;
  std::vector<uint64_t> bits_once;
  uint64_t* const bits = call_buffer(bits_kept, bits_once, static_cast<size_t>(std::max<int64_t>(1, io.M * words)));
  active_words_bf16(io, threshold, words, bits);
  const int64_t parts = (io.M + kSkipPartRows - 1) / kSkipPartRows;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t m0 = p * io.M / parts;
    LinearIO part = io;
    part.M = (p + 1) * io.M / parts - m0;
    part.x = static_cast<const uint16_t*>(io.x) + m0 * io.ldx;
    part.y = static_cast<uint16_t*>(io.y) + m0 * io.ldy;
    gemm_skip_part(part, bits + m0 * words, words, make_readers);
  }
}

// Runs a batch's activation-sparse product with this GEMM; false where it does not apply (the row
// kernels run it). ActBatchGemm::zeros forces gemm_kn.h instead, for benchmarks.
template <class MakeReaders>
bool act_sparse_batch_bf16(const LinearIO& io, float threshold, const MakeReaders& make_readers) {
  if (act_batch_gemm() == ActBatchGemm::zeros && gemm_kn_applies(io)) {
    gemm_kn_bf16(io, threshold, make_readers);
    return true;
  }
  if (!gemm_skip_applies(io)) return false;
  gemm_skip_bf16(io, threshold, make_readers);
  return true;
}
#endif

}  // namespace sparseflow::cpu::SF_ISA
