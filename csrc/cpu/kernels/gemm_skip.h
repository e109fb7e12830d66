// Activation-sparse linear for batches that skips the inactive inputs (bf16, AVX-512 BF16):
// y = x' @ w_t + bias over the active inputs of each row of x only. gemm_kn.h multiplies the
// zeros of x' as dense does and at best matches torch's GEMM; here each row of x does half the
// dot products at 50% activation sparsity. Rows of x no longer share weight vectors, so the
// weight must be near: blocks of 128 rows x 128 columns of w_t are copied (32 KiB, L1), the next
// block prefetched while this one computes. Each row of x lists its active inputs per block
// (index, value); consecutive entries are paired in registers (vpunpcklwd/hwd of two weight rows)
// for vdpbf16ps. The copy permutes each 32 columns so that the unpacks yield them in order.
// Every thread builds the lists of the whole batch itself: read by every thread, lists written by
// one cost more to move between cores than to build again from x (see gemm_skip_bf16).
// Inactive inputs are finite (|x| <= threshold): skipping them is exact for a finite weight.
#pragma once
#include <atomic>

#include "cpu/kernels/gemm_kn.h"

namespace sparseflow::cpu::SF_ISA {

#if defined(SF_ISA_avx512)
constexpr int64_t kSkipCols = 128;   // output columns per panel: 8 accumulators per row of x
constexpr int64_t kSkipBlock = 128;  // weight rows per block: 128 x 128 bf16 = 32 KiB
// List entries per (block, row of x): an odd count below kSkipBlock takes the pad, and each
// 32-entry store of the compress at entry n <= its first input's offset stays inside.
constexpr int64_t kSkipSlot = kSkipBlock;
// The skipping GEMM runs a batch of M rows when at most kSkipMaxActive - kSkipCopyRows / M of its
// inputs are active; above, gemm_kn.h, whose time does not depend on the density, is faster.
// Measured (2048x2048, bf16, 1 thread, against gemm_kn): at 128-512 rows 1.19-1.27x / 1.02-1.08x /
// 0.92-0.94x at 50 / 60 / 70% active; the block copies weigh more at few rows (M = 12: break-even
// near 35% active, M = 32: near 55%).
constexpr double kSkipMaxActive = 0.65;
constexpr double kSkipCopyRows = 3.6;

inline double skip_max_active(int64_t M) { return M > 0 ? kSkipMaxActive - kSkipCopyRows / static_cast<double>(M) : 0.0; }

inline int64_t skip_blocks(int64_t K) { return (K + kSkipBlock - 1) / kSkipBlock; }  // blocks of inputs

// Active inputs of every row of x, block by block: entry i of (block b, row m) at
// (b * M + m) * kSkipSlot + i holds the input's index within the block and its bf16 bits. Counts
// are even: an odd list ends with index kSkipBlock (a zero row) and value 0.
struct ActiveLists {
  std::vector<uint16_t> index, value;
  std::vector<int32_t> count;
};

// Which of x[k : min(k + 32, k1)) are active (v: those 32 elements, zero past k1); thr as in
// inactive_bits_bf16. The one compare both passes over x below share.
inline __mmask32 active_bf16(const uint16_t* x, int64_t k, int64_t k1, int32_t thr, __m512i& v) {
  const __mmask32 live = k + 32 <= k1 ? ~0u : _bzhi_u32(~0u, static_cast<unsigned>(k1 - k));
  v = _mm512_maskz_loadu_epi16(live, x + k);
  if (thr < 0) return live;
  return _mm512_mask_cmpgt_epu16_mask(live, _mm512_and_si512(v, _mm512_set1_epi16(0x7fff)),
                                      _mm512_set1_epi16(static_cast<int16_t>(thr)));
}

// The entries list_active_bf16 would write, pads included, without writing them: what decides
// between the two GEMMs costs one read of x, not the lists.
inline int64_t count_active_bf16(const LinearIO& io, float threshold) {
  const int32_t thr = inactive_bits_bf16(threshold);
  std::vector<int64_t> per_row(static_cast<size_t>(io.M));
  parallel_for(io.M, threads_for(io.threads, io.M * io.K), [&](int64_t m) {
    const uint16_t* x = static_cast<const uint16_t*>(io.x) + m * io.ldx;
    int64_t total = 0;
    for (int64_t k0 = 0; k0 < io.K; k0 += kSkipBlock) {
      const int64_t k1 = std::min(io.K, k0 + kSkipBlock);
      int n = 0;
      __m512i v;
      for (int64_t k = k0; k < k1; k += 32) n += popcount32(active_bf16(x, k, k1, thr, v));
      total += n + n % 2;
    }
    per_row[static_cast<size_t>(m)] = total;
  });
  int64_t entries = 0;
  for (const int64_t n : per_row) entries += n;
  return entries;
}

// Block by block, its rows of x in order, so that the lists are written one after the other.
// (Row by row, each list lay M * 256 bytes past the last, in the same L1 set: building the lists
// took 7% of a 2048x2048 layer's time at 128 rows, under 2% so.)
inline void list_active_bf16(const LinearIO& io, float threshold, ActiveLists& out) {
  const int32_t thr = inactive_bits_bf16(threshold);
  const int64_t blocks = skip_blocks(io.K);
  const size_t slots = static_cast<size_t>(blocks * io.M);
  if (out.index.size() < slots * kSkipSlot) {  // never shrunk: growing back would zero the new part again
    out.index.resize(slots * kSkipSlot);
    out.value.resize(slots * kSkipSlot);
  }
  if (out.count.size() < slots) out.count.resize(slots);
  alignas(64) static const uint16_t kIota[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                                 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
  const __m512i iota = _mm512_load_si512(kIota);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * kSkipBlock, k1 = std::min(io.K, k0 + kSkipBlock);
    for (int64_t m = 0; m < io.M; ++m) {
      const uint16_t* x = static_cast<const uint16_t*>(io.x) + m * io.ldx;
      const size_t slot = static_cast<size_t>(b * io.M + m);
      uint16_t* index = out.index.data() + slot * kSkipSlot;
      uint16_t* value = out.value.data() + slot * kSkipSlot;
      int n = 0;
      for (int64_t k = k0; k < k1; k += 32) {
        __m512i v;
        const __mmask32 active = active_bf16(x, k, k1, thr, v);
        const __m512i at = _mm512_add_epi16(iota, _mm512_set1_epi16(static_cast<int16_t>(k - k0)));
        _mm512_storeu_si512(index + n, _mm512_maskz_compress_epi16(active, at));  // vpcompressw to memory is slow on Zen 4
        _mm512_storeu_si512(value + n, _mm512_maskz_compress_epi16(active, v));
        n += popcount32(active);
      }
      if (n % 2) index[n] = kSkipBlock, value[n++] = 0;
      out.count[slot] = n;
    }
  }
}

// The copy's column order within each 32: unpacklo then takes columns 0-15, unpackhi 16-31.
inline __m512i skip_copy_order() {
  alignas(64) static const uint16_t kOrder[32] = {0,  1,  2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
                                                  8,  9,  10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  return _mm512_load_si512(kOrder);
}

// c[0:128] (+)= sum over the pairs of one list of (value pair) . (the two block rows, paired).
inline void skip_row_bf16(const uint16_t* block, const uint16_t* index, const uint16_t* value, int32_t n, bool first,
                          float* c) {
  constexpr int V = kSkipCols / 16;
  __m512 acc[V];
  for (int j = 0; j < V; ++j) acc[j] = first ? _mm512_setzero_ps() : _mm512_load_ps(c + 16 * j);
  for (int32_t i = 0; i < n; i += 2) {
    const uint16_t* a = block + index[i] * kSkipCols;
    const uint16_t* b = block + index[i + 1] * kSkipCols;
    const __m512i x = _mm512_set1_epi32(static_cast<int>(load_pair(value + i)));
#pragma GCC unroll 4
    for (int h = 0; h < V / 2; ++h) {
      __m512i ra = _mm512_load_si512(a + 32 * h), rb = _mm512_load_si512(b + 32 * h);
      asm("" : "+v"(ra), "+v"(rb));  // one load each: folded into both unpacks, rb was loaded twice
      acc[2 * h] = dot_bf16(acc[2 * h], x, _mm512_unpacklo_epi16(ra, rb));
      acc[2 * h + 1] = dot_bf16(acc[2 * h + 1], x, _mm512_unpackhi_epi16(ra, rb));
    }
  }
  for (int j = 0; j < V; ++j) _mm512_store_ps(c + 16 * j, acc[j]);
}

// y = threshold(x) @ w_t + bias, `entries` list entries in all (count_active_bf16); readers as
// in batch_rows.h. Each thread builds the lists on its first task of the call, into a buffer of its
// own: shared lists, written by one core and read by all, took 2x as long to build (their lines
// still held by the other core) and slowed the products that read them: on 2 threads, 512x2048,
// 128 rows, 0.57-0.96x of dense with a dense weight, own lists 0.96-1.12x (RESULTS.md, session 14).
// Building them costs each thread a pass over x, which every thread reads anyway.
template <class MakeReaders>
void gemm_skip_bf16(const LinearIO& io, float threshold, int64_t entries, const MakeReaders& make_readers) {
  const int64_t K = io.K, N = io.N, blocks = skip_blocks(K);
  if (io.nonfinite) std::fill(io.nonfinite, io.nonfinite + io.M, uint8_t{0});  // NaN/inf are active: as dense
  const int threads = threads_for(io.threads, entries * N);
  const int64_t panels = (N + kSkipCols - 1) / kSkipCols;
  const int64_t tasks = std::min<int64_t>(panels, int64_t{threads} * 4);
  std::vector<int64_t> first_cols(static_cast<size_t>(tasks));
  for (int64_t t = 0; t < tasks; ++t) first_cols[static_cast<size_t>(t)] = t * panels / tasks * kSkipCols;
  const auto reader_for = make_readers(first_cols);
  // `call` tells a thread whether the lists it keeps are this call's.
  static std::atomic<uint64_t> calls{0};
  const uint64_t call = calls.fetch_add(1, std::memory_order_relaxed) + 1;
  parallel_for(tasks, threads, [&](int64_t t) {
    thread_local ActiveLists lists;
    thread_local uint64_t lists_call = 0;
    if (lists_call != call) {
      list_active_bf16(io, threshold, lists);
      lists_call = call;
    }
    struct alignas(64) Block {
      uint16_t rows[kSkipBlock + 1][kSkipCols];  // the last row stays zero (the pad of odd lists)
    };
    thread_local std::vector<Block> block_kept(1);
    thread_local std::vector<float> c_kept;
    std::vector<float> c_once;
    uint16_t(*block)[kSkipCols] = block_kept[0].rows;
    std::fill(block[kSkipBlock], block[kSkipBlock] + kSkipCols, uint16_t{0});
    float* c = call_buffer(c_kept, c_once, static_cast<size_t>(io.M * kSkipCols + 16));
    c = reinterpret_cast<float*>(round_up(reinterpret_cast<intptr_t>(c), 64));  // aligned loads and stores
    const __m512i order = skip_copy_order();
    const int64_t first = t * panels / tasks, end = (t + 1) * panels / tasks;
    auto reader = reader_for(t);
    for (int64_t panel = first; panel < end; ++panel) {
      const int64_t n0 = panel * kSkipCols, ncols = std::min(kSkipCols, N - n0);
      if (blocks == 0) std::fill(c, c + io.M * kSkipCols, 0.0f);  // K == 0: y = bias
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * kSkipBlock, rows = std::min(kSkipBlock, K - k0);
        for (int64_t r = 0; r < rows; ++r) reader.permuted(k0 + r, n0, ncols, kSkipCols, order, block[r]);
        // The next block (of this panel, else of the task's next panel) is fetched into L2 while
        // this one computes, a few rows per row of x: without, each block's first touch waits on
        // memory (-5-10%); all at once, a bitmask's rows came in late on two threads.
        int64_t next_k0 = k0 + kSkipBlock, next_n0 = n0;
        if (b + 1 == blocks) next_k0 = 0, next_n0 = panel + 1 < end ? n0 + kSkipCols : N;
        const int64_t next_cols = std::min(kSkipCols, N - next_n0), ahead = next_cols > 0 ? std::min(kSkipBlock, K - next_k0) : 0;
        const int64_t per_row = (ahead + io.M - 1) / io.M;
        for (int64_t m = 0, fetched = 0; m < io.M; ++m) {
          const size_t slot = static_cast<size_t>(b * io.M + m);
          skip_row_bf16(block[0], lists.index.data() + slot * kSkipSlot, lists.value.data() + slot * kSkipSlot,
                        lists.count[slot], b == 0, c + m * kSkipCols);
          for (const int64_t stop = std::min(ahead, fetched + per_row); fetched < stop; ++fetched)
            reader.prefetch(next_k0 + fetched, next_n0, next_cols);
        }
      }
      store_y_bf16<kSkipCols>(io, n0, ncols, c, kSkipCols);
    }
  });
}

// Runs a batch's activation-sparse product with the skipping GEMM where few enough inputs are
// active, else with gemm_kn.h. Returns false where neither applies (the row kernels run it).
template <class MakeReaders>
bool act_sparse_batch_bf16(const LinearIO& io, float threshold, const MakeReaders& make_readers) {
  if (!gemm_kn_applies(io)) return false;
  const ActBatchGemm mode = act_batch_gemm();
  if (mode == ActBatchGemm::zeros) {
    gemm_kn_bf16(io, threshold, make_readers);
    return true;
  }
  const int64_t entries = count_active_bf16(io, threshold);
  if (mode == ActBatchGemm::automatic &&
      static_cast<double>(entries) > skip_max_active(io.M) * static_cast<double>(io.M * io.K)) {
    gemm_kn_bf16(io, threshold, make_readers);
    return true;
  }
  // Each thread keeps its lists between calls (a fresh buffer page-faults on every call): a batch
  // runs in parts of rows small enough that all threads' lists come to kKeepBytes, or to 128
  // rows' worth each where that is more (a part copies the weight's blocks again: under 3% of
  // its time from 128 rows on, as kSkipCopyRows / M says). Parts are of equal size, so none is
  // left with a few rows.
  constexpr int64_t kKeepBytes = int64_t{16} << 20, kMinPartRows = 128;
  const int64_t row_bytes = skip_blocks(io.K) * (kSkipSlot * 4 + 4);
  const int64_t part_rows =
      std::max(kMinPartRows, kKeepBytes / std::max<int64_t>(1, io.threads) / std::max<int64_t>(1, row_bytes));
  const int64_t parts = (io.M + part_rows - 1) / part_rows;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t m0 = p * io.M / parts;
    LinearIO part = io;
    part.M = (p + 1) * io.M / parts - m0;
    part.x = static_cast<const uint16_t*>(io.x) + m0 * io.ldx;
    part.y = static_cast<uint16_t*>(io.y) + m0 * io.ldy;
    if (io.nonfinite) part.nonfinite = io.nonfinite + m0;
    gemm_skip_bf16(part, threshold, entries * part.M / std::max<int64_t>(1, io.M), make_readers);
  }
  return true;
}
#endif

}  // namespace sparseflow::cpu::SF_ISA
