// Bitmask (unstructured) weight times a batch of x (AVX-512, any dtype): a GEMM that skips the
// weight's zeros. Decompressing for a dense GEMM (the `batched` path) multiplies every zero and
// measured 0.90-0.96x of torch's GEMM; here each output does only its nonzero products.
// y^T = W @ x^T: x^T is copied once per call into float32 blocks of up to 128 rows of x (a panel)
// by as many inputs as fill 32 KiB (L1); each weight row walks its mask bits block by block, and
// each set bit is one FMA per 16 rows of x: its value broadcast against the block's row. In
// float32, not in bf16 pairs: pairing two nonzeros for vdpbf16ps takes a shuffle per product,
// and here shuffles and dot products do not overlap (a first version of this kernel in bf16
// pairs, after gemm_skip.h, ran 1.10-1.16x of torch's GEMM at 128 rows; this one 1.84-1.92x).
// Rows of x with a NaN or inf are flagged for the caller to recompute: a skipped zero weight
// would not turn an inf into NaN as dense does.
#pragma once
#include "cpu/kernels/gemm_skip.h"

namespace sparseflow::cpu::SF_ISA {

#if defined(SF_ISA_avx512)
constexpr int64_t kBmBlockFloats = 8192;  // one block of x^T: 32 KiB
constexpr int64_t kBmChunk = 256;          // weight rows per task: accumulators of up to 32 KiB
constexpr int64_t kBitmaskGemmMinRows = 24;  // tiled.h below (bf16: 1.06x at 16 rows, 0.80x at 24 against 0.93x here)
constexpr double kBitmaskGemmMaxDensity = 0.65;

inline bool bitmask_gemm_applies(const BitmaskView& w, const LinearIO& io) {
  return io.M >= kBitmaskGemmMinRows &&
         static_cast<double>(w.nnz) <= kBitmaskGemmMaxDensity * static_cast<double>(w.rows * w.cols);
}

// An element of x or of the weight as float32 (T: float, or the 16 bits of bf16 or, with F16, of float16).
template <class T, bool F16>
inline float bm_value(const T* v) {
  if constexpr (std::is_same_v<T, float>) return *v;
  else if constexpr (F16) return f16_to_f32(*v);
  else return bf16_to_f32(*v);
}

// x^T in float32, block (p, b) at xt + (p * blocks + b) * kBmBlockFloats: row r holds input
// b * depth + r of rows [p * width, (p + 1) * width) of x (zeros past K and past M). Flags rows with a NaN
// or inf in io.nonfinite.
template <class T, bool F16>
void bitmask_gemm_copy_xt(const LinearIO& io, int64_t width, int64_t depth, int64_t panels, int64_t blocks, float* xt) {
  parallel_for(panels * blocks, threads_for(io.threads, io.M * io.K * 4), [&](int64_t task) {
    const int64_t p = task / blocks, b = task % blocks;
    float* block = xt + task * kBmBlockFloats;
    std::fill(block, block + kBmBlockFloats, 0.0f);
    const int64_t k0 = b * depth, rows = std::min(depth, io.K - k0);
    for (int64_t t = 0; t < std::min(width, io.M - p * width); ++t) {
      const T* x = static_cast<const T*>(io.x) + (p * width + t) * io.ldx + k0;
      for (int64_t r = 0; r < rows; ++r) block[r * width + t] = bm_value<T, F16>(x + r);
    }
  });
  if (io.nonfinite)
    parallel_for(io.M, threads_for(io.threads, io.M * io.K), [&](int64_t m) {
      const T* x = static_cast<const T*>(io.x) + m * io.ldx;
      bool bad = false;
      for (int64_t k = 0; k < io.K; ++k) bad |= !std::isfinite(bm_value<T, F16>(x + k));
      io.nonfinite[m] = bad ? 1 : 0;
    });
}

// c[0, 16V) (+)= over the set bits k of `bits`: (next value from v) * block row k (row stride 16V).
// Below 8 vectors, set bits alternate between two sets of accumulators: 2V chains of FMAs hide
// their latency (at V = 8 a second set measured 5% slower).
template <int V, class T, bool F16>
inline const T* bitmask_gemm_row(const float* block, uint64_t bits, const T* v, bool first, float* c) {
  __m512 acc[2][V];
  for (int j = 0; j < V; ++j) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
  const auto step = [&](__m512* a) {
    const float* x = block + _tzcnt_u64(bits) * (16 * V);
    const __m512 wv = _mm512_set1_ps(bm_value<T, F16>(v++));
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) a[j] = _mm512_fmadd_ps(wv, _mm512_load_ps(x + 16 * j), a[j]);
    bits = _blsr_u64(bits);
  };
  while (bits) {
    step(acc[0]);
    if constexpr (V < 8) {
      if (!bits) break;
      step(acc[1]);
    }
  }
  for (int j = 0; j < V; ++j) {  // summed by words, as torch sums by blocks (a float32 chain over
    const __m512 sum = _mm512_add_ps(acc[0][j], acc[1][j]);  // all of K erred 4x as much)
    _mm512_store_ps(c + 16 * j, first ? sum : _mm512_add_ps(_mm512_load_ps(c + 16 * j), sum));
  }
  return v;
}

// y[m0 + t][n0 + i] = c[i * ldc + t] + bias[n0 + i] for t < tokens, i < rows: the accumulators
// transposed on the way out, 16 outputs of a row of y at a time.
inline void bitmask_gemm_store(const LinearIO& io, int64_t m0, int64_t tokens, int64_t n0, int64_t rows,
                               const float* c, int64_t ldc) {
  const __m512i lanes = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(static_cast<int>(ldc)));
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const __mmask16 live = static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(std::min<int64_t>(16, rows - i0))));
    __m512 bias = _mm512_setzero_ps();
    if (io.bias) {
      const int64_t n = n0 + i0;
      if (io.dtype == DType::f32) bias = _mm512_maskz_loadu_ps(live, static_cast<const float*>(io.bias) + n);
      else if (io.dtype == DType::bf16) bias = cvt16_bf16(_mm256_maskz_loadu_epi16(live, static_cast<const uint16_t*>(io.bias) + n));
      else bias = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, static_cast<const uint16_t*>(io.bias) + n));
    }
    for (int64_t t = 0; t < tokens; ++t) {
      const __m512 v = _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, lanes, c + i0 * ldc + t, 4), bias);
      const int64_t at = (m0 + t) * io.ldy + n0 + i0;
      if (io.dtype == DType::f32) _mm512_mask_storeu_ps(static_cast<float*>(io.y) + at, live, v);
      else if (io.dtype == DType::bf16) _mm256_mask_storeu_epi16(static_cast<uint16_t*>(io.y) + at, live, round_bf16x16(v));
      else _mm256_mask_storeu_epi16(static_cast<uint16_t*>(io.y) + at, live, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
  }
}

template <int V, class T, bool F16>
void bitmask_gemm(const BitmaskView& w, const LinearIO& io) {
  constexpr int64_t kT = 16 * V, kDepth = kBmBlockFloats / kT;  // rows of x per panel, inputs per block
  const int64_t panels = (io.M + kT - 1) / kT, blocks = std::max<int64_t>(1, (io.K + kDepth - 1) / kDepth);
  thread_local std::vector<float> xt_kept;
  std::vector<float> xt_once;
  float* xt = call_buffer(xt_kept, xt_once, static_cast<size_t>((panels * blocks + 1) * kBmBlockFloats));
  xt = reinterpret_cast<float*>(round_up(reinterpret_cast<intptr_t>(xt), 64));  // aligned loads
  bitmask_gemm_copy_xt<T, F16>(io, kT, kDepth, panels, blocks, xt);
  const int64_t chunks = (io.N + kBmChunk - 1) / kBmChunk;
  parallel_for(panels * chunks, threads_for(io.threads, w.nnz * io.M), [&](int64_t task) {
    const int64_t p = task % panels, n0 = task / panels * kBmChunk, rows = std::min(kBmChunk, io.N - n0);
    thread_local std::vector<float> c_buf;
    c_buf.resize(static_cast<size_t>(kBmChunk * kT + 16));
    auto* const c = reinterpret_cast<float(*)[kT]>(round_up(reinterpret_cast<intptr_t>(c_buf.data()), 64));
    const T* v[kBmChunk];
    for (int64_t i = 0; i < rows; ++i) v[i] = static_cast<const T*>(w.values) + w.row_offsets[n0 + i];
    for (int64_t b = 0; b < blocks; ++b) {
      const float* block = xt + (p * blocks + b) * kBmBlockFloats;
      for (int64_t i = 0; i < rows; ++i) {
        const uint8_t* mask = w.mask + (n0 + i) * w.mask_stride;
        _mm_prefetch(reinterpret_cast<const char*>(v[i]) + 256, _MM_HINT_T0);
        for (int64_t k = b * kDepth; k < std::min(io.K, (b + 1) * kDepth); k += 64) {  // a mask word at a time
          const uint64_t bits = static_cast<uint64_t>(mask_bits(mask, w.mask_stride, k, 32)) |
                                static_cast<uint64_t>(mask_bits(mask, w.mask_stride, k + 32, 32)) << 32;
          v[i] = bitmask_gemm_row<V, T, F16>(block + (k - b * kDepth) * kT, bits, v[i], k == 0, c[i]);
        }
        if (io.K == 0) std::fill(c[i], c[i] + kT, 0.0f);
      }
    }
    bitmask_gemm_store(io, p * kT, std::min(kT, io.M - p * kT), n0, rows, c[0], kT);
  });
}

// Panels of 128 rows of x, then one for the rest of 32, 64 or 128 rows (fewer accumulators per
// weight row at fewer rows: padding 32 rows to a panel of 128 ran at 0.86x of dense, not 1.04x).
inline void bitmask_gemm(const BitmaskView& w, const LinearIO& io) {
  const auto run = [&](const LinearIO& part, auto tag, auto f16) {
    using T = decltype(tag);
    if (part.M <= 32) bitmask_gemm<2, T, f16.value>(w, part);
    else if (part.M <= 64) bitmask_gemm<4, T, f16.value>(w, part);
    else bitmask_gemm<8, T, f16.value>(w, part);
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
#endif

}  // namespace sparseflow::cpu::SF_ISA
