// Shared by every kernel file and compiled once per ISA level (SF_ISA is the namespace).
// Holds: scalar dtype conversions, the x-block loader (converts rows of x to float32, pads them
// with zeros and flags NaN/inf rows), the output writer (bias + rounding to the output dtype) and
// the row-wise driver that splits output features across threads.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/cpuinfo.h"
#include "cpu/kernels/args.h"
#include "cpu/thread_pool.h"

#ifndef SF_ISA
#error "SF_ISA must name the ISA level this file is compiled for"
#endif

namespace sparseflow::cpu::SF_ISA {

inline int64_t element_size(DType t) { return t == DType::f32 ? 4 : 2; }  // bytes of one element

// The row-wise (small M) kernels stream each weight buffer once, row after row, and the hardware
// prefetcher alone left them waiting on memory (A/B in one process, bf16 4096x14336: bitmask 70%
// 2.71 -> 2.07 ms, 2:4 3.08 -> 2.52 ms). So each step also asks for the line `ahead` bytes past
// where it reads: into L1, or into L2 where L1 holds what the kernel needs more (hint and distance
// per kernel were measured the same way).
constexpr int kToL1 = 3, kToL2 = 2;  // __builtin_prefetch locality: prefetcht0, prefetcht1
template <int Locality = kToL1>
inline void prefetch_stream(const void* p, int64_t ahead = 2048) {
  __builtin_prefetch(static_cast<const char*>(p) + ahead, 0, Locality);
}

// ---- scalar conversions (bit exact with torch: round to nearest even) ----
inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
inline float f16_to_f32(uint16_t h) {
#if defined(SF_ISA_scalar)
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400u));
      bits = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#else
  return _cvtsh_ss(h);
#endif
}
inline uint16_t f32_to_f16(float f) {
#if defined(SF_ISA_scalar)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;          // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;         // overflow (rounds to) inf
  if (abs < 0x38800000u) {                               // subnormal half or zero
    if (abs < 0x33000000u) return sign;                  // below half of the smallest subnormal
    const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(abs >> 23);  // 14..24
    uint32_t half = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t h = abs - 0x38000000u;  // rebias exponent 127 -> 15
  h += 0xfffu + ((h >> 13) & 1u);
  return sign | static_cast<uint16_t>(h >> 13);
#else
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#endif
}

inline float load_as_f32(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void store_from_f32(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::f32: static_cast<float*>(p)[i] = v; break;
    case DType::bf16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}

inline int popcount32(uint32_t v) { return __builtin_popcount(v); }

// A buffer of n elements for one call: the calling thread's `kept` one when it is small enough to
// keep between calls (a fresh buffer page-faults on every call, ~1 us per 4 KiB page), else
// `once`, which the caller frees on return (a prefill-sized x would otherwise stay resident).
template <class T>
T* call_buffer(std::vector<T>& kept, std::vector<T>& once, size_t n) {
  constexpr size_t kKeepBytes = size_t{16} << 20;
  if (n * sizeof(T) > kKeepBytes) {
    once.resize(n);
    return once.data();
  }
  if (kept.size() < n) kept.resize(n);
  return kept.data();
}
inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Converts `rows` rows of x starting at m0 to float32 (row stride kpad, zero padding) and flags
// rows that hold a NaN or inf.
inline void load_x_block(const LinearIO& io, int64_t m0, int64_t rows, int64_t kpad, float* buf) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    float* dst = buf + r * kpad;
    const char* src = static_cast<const char*>(io.x) + m * io.ldx * element_size(io.dtype);
    bool finite = true;
    for (int64_t k = 0; k < io.K; ++k) {
      const float v = load_as_f32(src, k, io.dtype);
      dst[k] = v;
      finite &= std::isfinite(v);
    }
    std::fill(dst + io.K, dst + kpad, 0.0f);
    if (io.nonfinite) io.nonfinite[m] = finite ? 0 : 1;
  }
}

// y[m, n0:n1] = acc + bias, rounded to the output dtype.
inline void store_y_row(const LinearIO& io, int64_t m, int64_t n0, int64_t n1, const float* acc) {
  char* row = static_cast<char*>(io.y) + m * io.ldy * element_size(io.dtype);
  for (int64_t n = n0; n < n1; ++n) {
    float v = acc[n - n0];
    if (io.bias) v += load_as_f32(io.bias, n, io.dtype);
    store_from_f32(row, n, io.dtype, v);
  }
}

// Mask bits [k, k + width) of a row, reading only bytes that exist (width is 8, 16 or 32).
inline uint32_t mask_bits(const uint8_t* row, int64_t stride, int64_t k, int width) {
  const int64_t byte = k >> 3;
  const int64_t avail = std::min<int64_t>(width / 8, stride - byte);
  uint32_t bits = 0;
  if (avail == width / 8) {
    std::memcpy(&bits, row + byte, width / 8);
  } else {
    for (int64_t i = 0; i < avail; ++i) bits |= static_cast<uint32_t>(row[byte + i]) << (8 * i);
  }
  return bits;
}

constexpr int64_t kRowGroup = 8;     // rows of x that share one pass over the weights
// Scalar dot products sum this many terms apart before adding them to the total: one running sum
// over a row of K = 8192 reached 5.9x the error of torch's dense op; blocks bound it by about
// (kScalarBlock + terms / kScalarBlock) roundings, as the vector paths' lanes do.
constexpr int64_t kScalarBlock = 64;

// Up to kRowGroup rows of x, zero-padded to padded_k(K): as float32 (x[r]) and, for bf16 inputs,
// also as the original bf16 bits (x.bf16[r]) for kernels that use bf16 dot-product instructions.
struct XRows {
  const float* f32[kRowGroup] = {};
  const uint16_t* bf16[kRowGroup] = {};
  const float* operator[](int r) const { return f32[r]; }
};
constexpr int64_t kXBlockRows = 64;  // rows of x converted at a time

// Room for a whole last block (bk <= 128) and for 64-byte vector reads past K.
inline int64_t padded_k(int64_t K) { return round_up(K, 128) + 128; }

// Threads worth waking for `work` multiply-adds: waking a sleeping thread costs tens of
// microseconds (much more on a busy machine), so small problems run on the caller alone.
inline int threads_for(int threads, int64_t work) {
  constexpr int64_t kMinWorkPerThread = int64_t{1} << 18;
  return static_cast<int>(std::clamp<int64_t>(work / kMinWorkPerThread, 1, std::max(1, threads)));
}

// Runs a row kernel over all outputs. `rows_fn(n0, n1, xrows, R, acc)` must write
// acc[r * (n1 - n0) + (n - n0)] = dot(W[n, :], xrows[r]) for r < R, n in [n0, n1).
// Output features are split into tasks of `align` rows (a block row for BSR).
template <class RowsFn>
void run_rowwise(const LinearIO& io, int64_t align, const RowsFn& rows_fn) {
  const int64_t kpad = padded_k(io.K);
  const int64_t units = (io.N + align - 1) / align;
  const int64_t want_tasks = std::max<int64_t>(1, io.threads) * 8;
  const int64_t units_per_task = std::max<int64_t>(1, (units + want_tasks - 1) / want_tasks);
  const int64_t tasks = (units + units_per_task - 1) / units_per_task;
  const int threads = threads_for(io.threads, io.N * io.K * std::min(io.M, kXBlockRows));
  std::vector<float> xbuf(static_cast<size_t>(std::min(io.M, kXBlockRows) * kpad));
  std::vector<uint16_t> xbf16(io.dtype == DType::bf16 ? xbuf.size() : 0);
  for (int64_t m0 = 0; m0 < io.M; m0 += kXBlockRows) {
    const int64_t mb = std::min(kXBlockRows, io.M - m0);
    load_x_block(io, m0, mb, kpad, xbuf.data());
    for (int64_t r = 0; r < mb && !xbf16.empty(); ++r) {
      const uint16_t* src = static_cast<const uint16_t*>(io.x) + (m0 + r) * io.ldx;
      std::copy(src, src + io.K, xbf16.data() + r * kpad);
      std::fill(xbf16.data() + r * kpad + io.K, xbf16.data() + (r + 1) * kpad, uint16_t{0});
    }
    parallel_for(tasks, threads, [&](int64_t t) {
      const int64_t n0 = t * units_per_task * align;
      const int64_t n1 = std::min(io.N, n0 + units_per_task * align);
      if (n0 >= n1) return;
      thread_local std::vector<float> acc;
      acc.resize(static_cast<size_t>(kRowGroup * (n1 - n0)));
      for (int64_t r0 = 0; r0 < mb; r0 += kRowGroup) {
        const int R = static_cast<int>(std::min(kRowGroup, mb - r0));
        XRows xrows;
        for (int r = 0; r < R; ++r) {
          xrows.f32[r] = xbuf.data() + (r0 + r) * kpad;
          if (!xbf16.empty()) xrows.bf16[r] = xbf16.data() + (r0 + r) * kpad;
        }
        rows_fn(n0, n1, xrows, R, acc.data());
        for (int r = 0; r < R; ++r) store_y_row(io, m0 + r0 + r, n0, n1, acc.data() + r * (n1 - n0));
      }
    });
  }
}

// Calls f(std::integral_constant<int, v>) for v in 1..Max (Max for anything larger), so that inner
// loops over v rows are unrolled at compile time.
template <int Max, int N = 1, class F>
inline void with_count(int64_t v, const F& f) {
  if constexpr (N >= Max)
    f(std::integral_constant<int, Max>{});
  else if (v <= N)
    f(std::integral_constant<int, N>{});
  else
    with_count<Max, N + 1>(v, f);
}
template <class F>
inline void with_rows(int R, const F& f) { with_count<kRowGroup>(R, f); }

#if defined(SF_ISA_avx2)
// For each 8-bit mask: the pshufb control that moves packed 16-bit values to their lanes
// (0x80 zeroes a lane) and the lane mask for 32-bit values.
struct ExpandTables {
  alignas(16) uint8_t shuffle16[256][16];
  alignas(32) int32_t perm32[256][8];
  alignas(32) int32_t keep32[256][8];
  ExpandTables() {
    for (int m = 0; m < 256; ++m) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool on = (m >> lane) & 1;
        shuffle16[m][2 * lane] = on ? static_cast<uint8_t>(2 * next) : 0x80;
        shuffle16[m][2 * lane + 1] = on ? static_cast<uint8_t>(2 * next + 1) : 0x80;
        perm32[m][lane] = on ? next : 0;
        keep32[m][lane] = on ? -1 : 0;
        next += on;
      }
    }
  }
};
inline const ExpandTables kExpand;
#endif

// ---- decompression (dense rows of a compressed weight; bits are moved, never converted) ----

// Runs row_fn(n, out_row) for every row n in [d.row0, d.row1), split across threads; out_row is
// the start of row n of the output (element type T: uint16_t or uint32_t, by the dtype's width).
template <class T, class RowFn>
void run_decompress(const DecompressIO& d, int64_t cols, const RowFn& row_fn) {
  const int64_t rows = d.row1 - d.row0;
  if (rows <= 0 || cols <= 0) return;
  const int threads = threads_for(d.threads, rows * cols);
  const int64_t want_tasks = static_cast<int64_t>(threads) * 4;  // a few tasks per thread balance uneven rows
  const int64_t per_task = std::max<int64_t>(1, (rows + want_tasks - 1) / want_tasks);
  const int64_t tasks = (rows + per_task - 1) / per_task;
  parallel_for_torch_threads(tasks, threads, [&](int64_t t) {
    const int64_t n0 = d.row0 + t * per_task, n1 = std::min(d.row1, n0 + per_task);
    for (int64_t n = n0; n < n1; ++n) row_fn(n, static_cast<T*>(d.out) + (n - d.row0) * d.ld);
  });
}

// Calls f(T{}) with T the unsigned integer as wide as the dtype's elements.
template <class F>
inline void with_element(DType t, const F& f) {
  if (t == DType::f32)
    f(uint32_t{});
  else
    f(uint16_t{});
}

#if defined(SF_ISA_avx512)
// A bitmask row of 16-bit values expanded 32 columns at a time: f(k, lanes, live) for k = 0, 32,
// ... below cols, with lanes the columns k to k + 31 (0 where the mask is clear) and live the
// lanes before cols. Masked loads take only the values used. Returns the number of values taken.
template <class F>
int64_t expand_row_chunks(const uint16_t* v, const uint8_t* mask, int64_t stride, int64_t cols, const F& f) {
  const uint16_t* const v0 = v;
  for (int64_t k = 0; k < cols; k += 32) {
    uint32_t bits;
    __mmask32 live = ~0u;
    if (k + 32 <= cols) {
      std::memcpy(&bits, mask + k / 8, 4);
    } else {  // the last chunk: mask bytes past the row's end are not read
      bits = mask_bits(mask, stride, k, 32);
      live = _bzhi_u32(~0u, static_cast<unsigned>(cols - k));
    }
    const int cnt = popcount32(bits);
    f(k, _mm512_maskz_expand_epi16(bits, _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, static_cast<unsigned>(cnt)), v)), live);
    v += cnt;
  }
  return v - v0;
}

// The next 32 expanded bf16 weights of a bitmask row whose values continue at v.
inline __m512i expand_next(const uint8_t* mask, int64_t stride, int64_t n, const uint16_t*& v) {
  const uint32_t bits = mask_bits(mask, stride, n, 32);
  const int cnt = popcount32(bits);
  const __m512i wv = _mm512_maskz_expand_epi16(bits, _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, cnt), v));
  v += cnt;
  return wv;
}
#endif

// One dense row from a bitmask row: out[k] = the next value of v where bit k of `mask` is set, 0
// elsewhere, for k < cols (bits at and past cols are zero). `avail` values exist from v on: vector
// loads read past the row's last value only while they stay inside that buffer. Returns the number
// of values taken.
template <class T>
int64_t expand_row(const T* v, int64_t avail, const uint8_t* mask, int64_t stride, int64_t cols, T* out) {
  const T* const v0 = v;
#if defined(SF_ISA_avx512)
  int64_t k = 0;
  (void)avail;  // masked loads never touch memory past the values they take
  if constexpr (sizeof(T) == 2) {
    return expand_row_chunks(reinterpret_cast<const uint16_t*>(v), mask, stride, cols, [&](int64_t at, __m512i lanes, __mmask32 live) {
      if (live == ~0u)
        _mm512_storeu_si512(out + at, lanes);
      else
        _mm512_mask_storeu_epi16(out + at, live, lanes);
    });
  } else {
    for (; k + 16 <= cols; k += 16) {
      uint16_t bits;
      std::memcpy(&bits, mask + k / 8, 2);
      const int cnt = popcount32(bits);
      _mm512_storeu_si512(out + k, _mm512_maskz_expand_epi32(bits, _mm512_maskz_loadu_epi32(
                                                                    static_cast<__mmask16>(_bzhi_u32(~0u, cnt)), v)));
      v += cnt;
    }
    if (k < cols) {
      const uint32_t bits = mask_bits(mask, stride, k, 16);
      const __m512i wv = _mm512_maskz_expand_epi32(static_cast<__mmask16>(bits), _mm512_maskz_loadu_epi32(
                                                       static_cast<__mmask16>(_bzhi_u32(~0u, popcount32(bits))), v));
      _mm512_mask_storeu_epi32(out + k, static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(cols - k))), wv);
    }
  }
#elif defined(SF_ISA_avx2)
  (void)stride;  // bytes past cols are never read: k < cols
  const T* const v_end = v + avail;
  alignas(32) T tail[8];
  for (int64_t k = 0; k < cols; k += 8) {
    const uint32_t bits = mask[k / 8];
    const T* src = v;
    if (v_end - v < 8) {  // near the end of the buffer: copy what exists
      std::memset(tail, 0, sizeof tail);
      std::memcpy(tail, v, static_cast<size_t>(std::min<int64_t>(8, v_end - v)) * sizeof(T));
      src = tail;
    }
    T* dst = k + 8 <= cols ? out + k : tail;  // the last partial chunk goes through tail
    if constexpr (sizeof(T) == 2) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                       _mm_shuffle_epi8(packed, _mm_load_si128(reinterpret_cast<const __m128i*>(kExpand.shuffle16[bits]))));
    } else {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.perm32[bits]));
      const __m256i keep = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.keep32[bits]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_and_si256(_mm256_permutevar8x32_epi32(packed, perm), keep));
    }
    if (dst == tail) std::memcpy(out + k, tail, static_cast<size_t>(cols - k) * sizeof(T));
    v += popcount32(bits);
  }
#else
  (void)avail;
  std::memset(out, 0, static_cast<size_t>(cols) * sizeof(T));
  for (int64_t byte = 0; byte < stride; ++byte)
    for (uint32_t bits = mask[byte]; bits; bits &= bits - 1) out[byte * 8 + __builtin_ctz(bits)] = *v++;
#endif
  return v - v0;
}

#if defined(SF_ISA_avx512)
// 16 bf16 / f16 / f32 values at p (already in registers as 16-bit lanes for the 16-bit types).
inline __m512 cvt16_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 cvt16_f16(__m256i h) { return _mm512_cvtph_ps(h); }
// acc += pairwise bf16 products of a and b (vdpbf16ps: exact products, float32 accumulation)
inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
// Floats accumulated against vpunpcklwd/hwd pairs of two bf16 rows hold each 32 columns in the
// unpacks' lane order (0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31): back in order, in place.
inline void unpermute_chunks(float* acc, int64_t len32) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t n = 0; n < len32; n += 32) {
    const __m512 lo = _mm512_loadu_ps(acc + n), hi = _mm512_loadu_ps(acc + n + 16);
    _mm512_storeu_ps(acc + n, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(acc + n + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
}

// Rounds 16 floats to bf16 as f32_to_bf16 does (nearest even, NaN kept quiet).
inline __m256i round_bf16x16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// The batch GEMMs' bf16 output: y[m, n0 + j] = c[m * ldc + j] + bias[n0 + j] for every row m and
// j < cols (cols <= MaxCols), rounded as f32_to_bf16.
template <int MaxCols>
inline void store_y_bf16(const LinearIO& io, int64_t n0, int64_t cols, const float* c, int64_t ldc) {
  const auto live = [&](int j) {
    return static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(std::clamp<int64_t>(cols - 16 * j, 0, 16))));
  };
  __m512 bias[MaxCols / 16];
  for (int j = 0; j < MaxCols / 16; ++j)
    bias[j] = io.bias ? cvt16_bf16(_mm256_maskz_loadu_epi16(live(j), static_cast<const uint16_t*>(io.bias) + n0 + 16 * j))
                      : _mm512_setzero_ps();
  for (int64_t m = 0; m < io.M; ++m) {
    uint16_t* y = static_cast<uint16_t*>(io.y) + m * io.ldy + n0;
    for (int j = 0; j < MaxCols / 16 && 16 * j < cols; ++j)
      _mm256_mask_storeu_epi16(y + 16 * j, live(j), round_bf16x16(_mm512_add_ps(_mm512_loadu_ps(c + m * ldc + 16 * j), bias[j])));
  }
}

// Whether a row of K elements holds a NaN or inf (all exponent bits set), 64 bytes at a time.
template <class T>
inline bool row_nonfinite(const T* row, int64_t K) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "bf16 or float32");
  constexpr int64_t lanes = 64 / sizeof(T);
  uint64_t bad = 0;
  for (int64_t k = 0; k < K; k += lanes) {
    const uint64_t live = _bzhi_u64(~0ull, static_cast<unsigned>(std::min(lanes, K - k)));
    if constexpr (sizeof(T) == 2) {
      const __m512i e = _mm512_set1_epi16(0x7f80);
      const __m512i v = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(live), row + k);
      bad |= _mm512_mask_cmpeq_epi16_mask(static_cast<__mmask32>(live), _mm512_and_si512(v, e), e);
    } else {
      const __m512i e = _mm512_set1_epi32(0x7f800000);
      const __m512i v = _mm512_maskz_loadu_epi32(static_cast<__mmask16>(live), row + k);
      bad |= _mm512_mask_cmpeq_epi32_mask(static_cast<__mmask16>(live), _mm512_and_si512(v, e), e);
    }
  }
  return bad != 0;
}

inline __m512 load16_f32(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::f32: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    case DType::bf16: return cvt16_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
    default: return cvt16_f16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
  }
}
inline __m512 maskz_load16_f32(__mmask16 k, const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::f32: return _mm512_maskz_loadu_ps(k, static_cast<const float*>(p) + i);
    case DType::bf16: return cvt16_bf16(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i));
    default: return cvt16_f16(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i));
  }
}
#elif defined(SF_ISA_avx2)
inline __m256 cvt8_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline __m256 load8_f32(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::f32: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    case DType::bf16: return cvt8_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    default: return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace sparseflow::cpu::SF_ISA
