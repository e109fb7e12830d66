// A sparse weight (bitmask, CSR or N:M) times a batch of x (AVX-512, any dtype): a GEMM
// that skips the weight's zeros. Decompressing for a dense GEMM (the `batched` path) multiplies
// every zero and measured 0.90-0.96x of torch's GEMM; here each output does only its nonzero
// products. y^T = W @ x^T: x^T is copied once per call into float32 blocks of up to 128 rows of x
// (a panel) by as many inputs as fill 32 KiB (L1); each weight row walks its nonzeros block by
// block, 64 inputs at a time, and each nonzero is one FMA per 16 rows of x: its value broadcast
// against the block's row. In float32, not in bf16 pairs: pairing two nonzeros for vdpbf16ps
// takes a shuffle per product, and here shuffles and dot products do not overlap (a first
// version in bf16 pairs, after gemm_skip.h, ran 1.10-1.16x of torch's bf16 GEMM at 128 rows;
// this one 1.9-2.1x). Rows of x with a NaN or inf are flagged for the caller to recompute: a
// skipped zero weight would not turn an inf into NaN as dense does.
#pragma once
#include <utility>

#include "cpu/kernels/common.h"

namespace sparseflow::cpu::SF_ISA {

#if defined(SF_ISA_avx512)
constexpr int64_t kSparseGemmBlockFloats = 8192;  // one block of x^T: 32 KiB
constexpr int64_t kSparseGemmChunk = 128;  // weight rows per task: accumulators of up to 64 KiB (L2)
// Inputs are summed in words of 64, words into a partial per group of 1024 inputs, partials into
// the total (one float32 chain of K / 64 word sums erred 2.3-4.9x as much as torch from K = 8192).
constexpr int64_t kSparseGemmWord = 64, kSparseGemmGroup = 1024;
// The fewest rows of x at which this GEMM beats the other kernels (tiled.h decompressing the weight,
// or the CSR row kernel), by weight density: its time follows the nonzeros, theirs does not.
// Measured (bf16, 8192x2048, 2 threads, against torch's dense GEMM): at density 0.1 1.28x at 16
// rows; at 0.5 0.93x at 24 rows (tiled.h 0.80x), 2.1x at 128; at 0.7 0.88x at 32, 1.24x at 64; at
// 0.8 1.08x at 64; at 0.9-1.0 0.86-0.96x at 64, 1.26x at 128 (float32 FMAs outrun torch's bf16
// dot products here).
inline int64_t sparse_gemm_min_rows(double density) {
  if (density <= 0.15) return 16;
  if (density <= 0.55) return 24;
  if (density <= 0.75) return 48;
  if (density <= 0.85) return 64;
  return 128;
}

inline bool sparse_gemm_applies(int64_t nnz, int64_t rows, int64_t cols, const LinearIO& io) {
  const double size = static_cast<double>(rows) * static_cast<double>(cols);
  return io.M >= sparse_gemm_min_rows(size > 0 ? static_cast<double>(nnz) / size : 0.0);
}

// N:M from 64 rows: below, the 2:4 GEMM of gemm_nm24.h and the row kernels win (bf16, 2048x2048 and
// 8192x2048: 2:4 1.42-1.47x here against 1.37-1.38x at 64 rows, 1.90-2.00x against 1.38-1.41x at
// 128; 4:8 0.53x against 0.73x at 24 rows, 1.07x / 1.50x against 0.93x / 0.90x at 64 / 128).
inline bool nm_gemm_applies(const NMView& w, const LinearIO& io) {
  return io.M >= std::max<int64_t>(64, sparse_gemm_min_rows(static_cast<double>(w.n) / static_cast<double>(w.m)));
}

// An element of x or of the weight as float32 (T: float, or the 16 bits of bf16 or, with F16, of float16).
template <class T, bool F16>
inline float sparse_gemm_value(const T* v) {
  if constexpr (std::is_same_v<T, float>) return *v;
  else if constexpr (F16) return f16_to_f32(*v);
  else return bf16_to_f32(*v);
}

// x^T in float32, block (p, b) at xt + (p * blocks + b) * kSparseGemmBlockFloats: row r holds input
// b * depth + r of rows [p * width, (p + 1) * width) of x (zeros past K and past M). Flags rows with a NaN
// or inf in io.nonfinite.
template <class T, bool F16>
void sparse_gemm_copy_xt(const LinearIO& io, int64_t width, int64_t depth, int64_t panels, int64_t blocks, float* xt) {
  parallel_for(panels * blocks, threads_for(io.threads, io.M * io.K * 4), [&](int64_t task) {
    const int64_t p = task / blocks, b = task % blocks;
    float* block = xt + task * kSparseGemmBlockFloats;
    std::fill(block, block + kSparseGemmBlockFloats, 0.0f);
    const int64_t k0 = b * depth, rows = std::min(depth, io.K - k0);
    for (int64_t t = 0; t < std::min(width, io.M - p * width); ++t) {
      const T* x = static_cast<const T*>(io.x) + (p * width + t) * io.ldx + k0;
      for (int64_t r = 0; r < rows; ++r) block[r * width + t] = sparse_gemm_value<T, F16>(x + r);
    }
  });
  if (io.nonfinite)
    parallel_for(io.M, threads_for(io.threads, io.M * io.K), [&](int64_t m) {
      const T* x = static_cast<const T*>(io.x) + m * io.ldx;
      bool bad = false;
      for (int64_t k = 0; k < io.K; ++k) bad |= !std::isfinite(sparse_gemm_value<T, F16>(x + k));
      io.nonfinite[m] = bad ? 1 : 0;
    });
}

// The nonzeros of one weight row in inputs [k, k + kSparseGemmWord), in order: next(r, w) gives the next
// one's offset from k and its value, false past the last.
template <class T, bool F16>
struct BitmaskWord {
  uint64_t bits;
  const T*& v;  // the row's next value
  bool next(int64_t& r, float& w) {
    if (!bits) return false;
    r = static_cast<int64_t>(_tzcnt_u64(bits));
    w = sparse_gemm_value<T, F16>(v++);
    bits = _blsr_u64(bits);
    return true;
  }
};

template <class T, bool F16, class Index>
struct CsrWord {
  const Index* col;  // unsigned: int16 indices of K up to 65536 are stored as their low 16 bits
  const T* values;
  int64_t& p;        // the row's next entry
  int64_t end, k, k1;
  bool next(int64_t& r, float& w) {
    if (p == end || static_cast<int64_t>(col[p]) >= k1) return false;
    r = static_cast<int64_t>(col[p]) - k;
    w = sparse_gemm_value<T, F16>(values + p++);
    return true;
  }
};

// N:M: each group of m inputs keeps n values at stored positions (2-bit fields when m = 4, else
// 4-bit). Words of 64 inputs hold whole groups (m divides 64), so a word is a fixed count of
// values, and its fields start on a byte: they are read 64 bits at a time.
template <class T, bool F16>
struct NmWord {
  const T* values;       // the row's values
  const uint8_t* index;  // the row's position fields
  int64_t index_bytes;
  int64_t v, end;        // the row's next value, and the word's end
  int n, m, bits;
  int64_t col = 0;       // the current group's first input, from k
  int j = 0, left = 0;   // values of the group done; fields left in `fields`
  uint64_t fields = 0;
  static NmWord at(const NMView& w, int64_t per_row, int64_t n, int64_t k, int64_t k1) {
    return {static_cast<const T*>(w.values) + n * per_row, w.index + n * w.index_stride, w.index_stride,
            k / w.m * w.n, (k1 + w.m - 1) / w.m * w.n, static_cast<int>(w.n), static_cast<int>(w.m),
            w.m == 4 ? 2 : 4};
  }
  bool next(int64_t& r, float& w) {
    if (v == end) return false;
    if (left == 0) {
      const int64_t byte = v * bits / 8;
      fields = 0;
      std::memcpy(&fields, index + byte, static_cast<size_t>(std::min<int64_t>(8, index_bytes - byte)));
      left = 64 / bits;
    }
    r = col + static_cast<int64_t>(fields & ((1u << bits) - 1));
    fields >>= bits;
    --left;
    w = sparse_gemm_value<T, F16>(values + v++);
    if (++j == n) j = 0, col += m;
    return true;
  }
};

// 2:4, the common case: a word's 16 groups have 32 values and their 2-bit fields are 64 bits.
template <class T, bool F16>
struct Nm24Word {
  const T* values;  // the word's first value
  uint64_t fields;
  int i = 0, count;  // value i of count (32, fewer in a last partial word)
  static Nm24Word at(const NMView& w, int64_t per_row, int64_t n, int64_t k, int64_t k1) {
    uint64_t fields = 0;  // 2 bits per value, 2 values per 4 inputs: a byte per 8 inputs
    std::memcpy(&fields, w.index + n * w.index_stride + k / 8, static_cast<size_t>(std::min<int64_t>(8, w.index_stride - k / 8)));
    return {static_cast<const T*>(w.values) + n * per_row + k / 2, fields, 0, static_cast<int>((k1 + 3) / 4 * 2 - k / 2)};
  }
  bool next(int64_t& r, float& w) {
    if (i == count) return false;
    r = 4 * (i >> 1) + static_cast<int64_t>((fields >> (2 * i)) & 3);
    w = sparse_gemm_value<T, F16>(values + i++);
    return true;
  }
};

// c[0, 16V) (+)= over the nonzeros of a word: value * block row r (row stride 16V). Below 8
// vectors, nonzeros alternate between two sets of accumulators: 2V chains of FMAs hide their
// latency (at V = 8 a second set measured 5% slower).
template <int V, class Word>
inline void sparse_gemm_row(const float* block, Word word, bool first, float* c) {
  __m512 acc[2][V];
  for (int j = 0; j < V; ++j) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
  int64_t r;
  float w;
  const auto step = [&](__m512* a) {
    const float* x = block + r * (16 * V);
    const __m512 wv = _mm512_set1_ps(w);
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) a[j] = _mm512_fmadd_ps(wv, _mm512_load_ps(x + 16 * j), a[j]);
  };
  while (word.next(r, w)) {
    step(acc[0]);
    if constexpr (V < 8) {
      if (!word.next(r, w)) break;
      step(acc[1]);
    }
  }
  for (int j = 0; j < V; ++j) {  // a word's sum joins its group's partial (see kSparseGemmWord)
    const __m512 sum = _mm512_add_ps(acc[0][j], acc[1][j]);
    _mm512_store_ps(c + 16 * j, first ? sum : _mm512_add_ps(_mm512_load_ps(c + 16 * j), sum));
  }
}

// At a group's end its partial joins the total (the first group's partial is the total).
template <int V>
inline void sparse_gemm_fold(const float* part, bool first, float* total) {
  for (int j = 0; j < V; ++j) {
    const __m512 sum = _mm512_load_ps(part + 16 * j);
    _mm512_store_ps(total + 16 * j, first ? sum : _mm512_add_ps(_mm512_load_ps(total + 16 * j), sum));
  }
}

// y[m0 + t][n0 + i] = c[i * ldc + t] + bias[n0 + i] for t < tokens, i < rows: the accumulators
// transposed on the way out, 16 outputs of a row of y at a time.
inline void sparse_gemm_store(const LinearIO& io, int64_t m0, int64_t tokens, int64_t n0, int64_t rows,
                               const float* c, int64_t ldc) {
  const __m512i lanes = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(static_cast<int>(ldc)));
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const __mmask16 live = static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(std::min<int64_t>(16, rows - i0))));
    const __m512 bias = io.bias ? maskz_load16_f32(live, io.bias, n0 + i0, io.dtype) : _mm512_setzero_ps();
    for (int64_t t = 0; t < tokens; ++t) {
      const __m512 v = _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, lanes, c + i0 * ldc + t, 4), bias);
      const int64_t at = (m0 + t) * io.ldy + n0 + i0;
      if (io.dtype == DType::f32) _mm512_mask_storeu_ps(static_cast<float*>(io.y) + at, live, v);
      else if (io.dtype == DType::bf16) _mm256_mask_storeu_epi16(static_cast<uint16_t*>(io.y) + at, live, round_bf16x16(v));
      else _mm256_mask_storeu_epi16(static_cast<uint16_t*>(io.y) + at, live, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
  }
}

// Rows: cursor(n) is weight row n's state at input 0, word(cursor, n, k, k1) a Word over inputs
// [k, k1) that advances it, prefetch(cursor) fetches what the row reads next.
template <int V, class T, bool F16, class Rows>
void sparse_gemm(const LinearIO& io, int64_t nnz, const Rows& rows) {
  constexpr int64_t kT = 16 * V, kDepth = kSparseGemmBlockFloats / kT;  // rows of x per panel, inputs per block
  static_assert(kDepth % kSparseGemmWord == 0 && kSparseGemmGroup % kDepth == 0);
  const int64_t panels = (io.M + kT - 1) / kT, blocks = (io.K + kDepth - 1) / kDepth;
  thread_local std::vector<float> xt_kept;
  std::vector<float> xt_once;
  float* xt = call_buffer(xt_kept, xt_once, static_cast<size_t>((panels * blocks + 1) * kSparseGemmBlockFloats));
  xt = reinterpret_cast<float*>(round_up(reinterpret_cast<intptr_t>(xt), 64));  // aligned loads
  sparse_gemm_copy_xt<T, F16>(io, kT, kDepth, panels, blocks, xt);
  const int64_t chunks = (io.N + kSparseGemmChunk - 1) / kSparseGemmChunk;
  parallel_for(panels * chunks, threads_for(io.threads, nnz * io.M), [&](int64_t task) {
    const int64_t p = task % panels, n0 = task / panels * kSparseGemmChunk, count = std::min(kSparseGemmChunk, io.N - n0);
    thread_local std::vector<float> c_buf;
    c_buf.resize(static_cast<size_t>(2 * kSparseGemmChunk * kT + 16));
    auto* const c = reinterpret_cast<float(*)[kT]>(round_up(reinterpret_cast<intptr_t>(c_buf.data()), 64));
    auto* const part = c + kSparseGemmChunk;  // the current group's partial sums
    decltype(rows.cursor(0)) cursor[kSparseGemmChunk];
    for (int64_t i = 0; i < count; ++i) cursor[i] = rows.cursor(n0 + i);
    if (blocks == 0) std::fill(c[0], c[0] + count * kT, 0.0f);  // K == 0: y = bias
    for (int64_t b = 0; b < blocks; ++b) {
      const float* block = xt + (p * blocks + b) * kSparseGemmBlockFloats;
      const int64_t k_end = std::min(io.K, (b + 1) * kDepth);
      for (int64_t i = 0; i < count; ++i) {
        rows.prefetch(cursor[i]);
        for (int64_t k = b * kDepth; k < k_end; k += kSparseGemmWord)
          sparse_gemm_row<V>(block + (k - b * kDepth) * kT, rows.word(cursor[i], n0 + i, k, std::min(io.K, k + kSparseGemmWord)),
                              k % kSparseGemmGroup == 0, part[i]);
        if (k_end % kSparseGemmGroup == 0 || k_end == io.K) sparse_gemm_fold<V>(part[i], k_end <= kSparseGemmGroup, c[i]);
      }
    }
    sparse_gemm_store(io, p * kT, std::min(kT, io.M - p * kT), n0, count, c[0], kT);
  });
}

// Panels of 128 rows of x, then one for the rest of 32, 64 or 128 rows (fewer accumulators per
// weight row at fewer rows: padding 32 rows to a panel of 128 ran at 0.86x of dense, not 1.04x).
// make_rows(T-tag, F16-tag) returns the Rows of sparse_gemm for values of type T.
template <class MakeRows>
void sparse_gemm(const LinearIO& io, int64_t nnz, const MakeRows& make_rows) {
  const auto run = [&](const LinearIO& part, auto tag, auto f16) {
    using T = decltype(tag);
    const auto rows = make_rows(tag, f16);
    if (part.M <= 32) sparse_gemm<2, T, f16.value>(part, nnz, rows);
    else if (part.M <= 64) sparse_gemm<4, T, f16.value>(part, nnz, rows);
    else sparse_gemm<8, T, f16.value>(part, nnz, rows);
  };
  const int64_t whole = io.M / 128 * 128;
  for (const auto [m0, m1] : {std::pair{int64_t{0}, whole}, std::pair{whole, io.M}}) {
    if (m1 == m0) continue;
    LinearIO part = io;
    part.M = m1 - m0;
    part.x = static_cast<const char*>(io.x) + m0 * io.ldx * element_size(io.dtype);
    part.y = static_cast<char*>(io.y) + m0 * io.ldy * element_size(io.dtype);
    if (io.nonfinite) part.nonfinite = io.nonfinite + m0;
    if (io.dtype == DType::f32) run(part, float{}, std::false_type{});
    else if (io.dtype == DType::f16) run(part, uint16_t{}, std::true_type{});
    else run(part, uint16_t{}, std::false_type{});
  }
}

inline void bitmask_gemm(const BitmaskView& w, const LinearIO& io) {
  sparse_gemm(io, w.nnz, [&](auto tag, auto f16) {
    using T = decltype(tag);
    struct Rows {
      const BitmaskView& w;
      const T* cursor(int64_t n) const { return static_cast<const T*>(w.values) + w.row_offsets[n]; }
      BitmaskWord<T, decltype(f16)::value> word(const T*& v, int64_t n, int64_t k, int64_t) const {
        const uint8_t* mask = w.mask + n * w.mask_stride;  // no bits past cols (validated)
        return {static_cast<uint64_t>(mask_bits(mask, w.mask_stride, k, 32)) |
                    static_cast<uint64_t>(mask_bits(mask, w.mask_stride, k + 32, 32)) << 32,
                v};
      }
      void prefetch(const T* v) const { _mm_prefetch(reinterpret_cast<const char*>(v) + 256, _MM_HINT_T0); }
    };
    return Rows{w};
  });
}

// N:M rows: no cursor (a row's values before input k are k / m * n of them) and no prefetch (a
// row is read in order, a word after the other).
template <class Word>
struct NmRows {
  const NMView& w;
  int64_t per_row;
  int64_t cursor(int64_t) const { return 0; }
  Word word(int64_t&, int64_t n, int64_t k, int64_t k1) const { return Word::at(w, per_row, n, k, k1); }
  void prefetch(int64_t) const {}
};

inline void nm_gemm(const NMView& w, const LinearIO& io) {
  const int64_t per_row = (w.cols + w.m - 1) / w.m * w.n;
  if (w.n == 2 && w.m == 4)
    sparse_gemm(io, w.rows * per_row, [&](auto tag, auto f16) {
      return NmRows<Nm24Word<decltype(tag), decltype(f16)::value>>{w, per_row};
    });
  else
    sparse_gemm(io, w.rows * per_row, [&](auto tag, auto f16) {
      return NmRows<NmWord<decltype(tag), decltype(f16)::value>>{w, per_row};
    });
}

template <class Index>
void csr_gemm(const CsrView& w, const LinearIO& io) {
  sparse_gemm(io, w.nnz, [&](auto tag, auto f16) {
    using T = decltype(tag);
    struct Rows {
      const CsrView& w;
      int64_t cursor(int64_t n) const { return w.row_ptr[n]; }
      CsrWord<T, decltype(f16)::value, Index> word(int64_t& p, int64_t n, int64_t k, int64_t k1) const {
        return {static_cast<const Index*>(w.col), static_cast<const T*>(w.values), p, w.row_ptr[n + 1], k, k1};
      }
      void prefetch(int64_t p) const {
        _mm_prefetch(reinterpret_cast<const char*>(static_cast<const T*>(w.values) + p) + 256, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(static_cast<const Index*>(w.col) + p) + 256, _MM_HINT_T0);
      }
    };
    return Rows{w};
  });
}
#endif

}  // namespace sparseflow::cpu::SF_ISA
