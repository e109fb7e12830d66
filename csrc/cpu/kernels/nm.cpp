// N:M linear: each group of m weights keeps n values and their positions in the group (2-bit
// indices for m = 4, 4-bit otherwise). The vector paths decode the positions of a chunk of
// values at once and fetch the matching x elements: AVX-512 by a two-register permute when the
// chunk spans 32 x elements (2:4, 4:8, 8:16), by a gather otherwise; AVX2 by a gather.
#include "cpu/kernels/kernels.h"
#include "cpu/kernels/gemm_nm24.h"
#include "cpu/kernels/gemm_sparse.h"
#include "cpu/kernels/tiled.h"

namespace sparseflow::cpu::SF_ISA {
namespace {

inline int index_bits(const NMView& w) { return w.m == 4 ? 2 : 4; }

inline int64_t nm_index(const NMView& w, int64_t n, int64_t v) {
  const int b = index_bits(w);
  const int64_t bit = v * b;
  return (w.index[n * w.index_stride + (bit >> 3)] >> (bit & 7)) & ((1 << b) - 1);
}

#if defined(SF_ISA_avx512)
constexpr int kLanes = 16;
#elif defined(SF_ISA_avx2)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 1;
#endif

#if defined(SF_ISA_avx512)
// bf16, n / m = 1/2 (2:4, 4:8, 8:16), BF16 dot products: 32 values cover 64 x elements, which
// two registers of bf16 hold, so one 16-bit permute fetches the x element of every value. The
// positions come out of the packed index with one multishift (VBMI).
template <int R>
void nm_dot_bf16_half(const NMView& w, int64_t n, const XRows& x, float* out) {
  const int b = index_bits(w);
  const int64_t groups = (w.cols + w.m - 1) / w.m, per_row = groups * w.n;
  const uint16_t* vals = static_cast<const uint16_t*>(w.values) + n * per_row;
  const uint8_t* idx_row = w.index + n * w.index_stride;
  alignas(64) uint8_t ctrl[64];
  alignas(64) uint16_t base[32];
  for (int j = 0; j < 32; ++j) {
    ctrl[2 * j] = static_cast<uint8_t>((j * b) % 64);  // bit offset of lane j's field in its qword
    ctrl[2 * j + 1] = 0;
    base[j] = static_cast<uint16_t>(j / w.n * w.m);
  }
  const __m512i vctrl = _mm512_load_si512(ctrl), vbase = _mm512_load_si512(base);
  const __m512i low = _mm512_set1_epi16(static_cast<short>((1 << b) - 1));
  __m512 acc0[R], acc1[R];  // two accumulators per row hide the dot-product latency
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  const auto step = [&](int64_t v, int64_t k, __m512* acc) {
    uint64_t words[2] = {0, 0};
    if (b == 2)  // constant sizes: a variable-size memcpy becomes a library call in the hot loop
      std::memcpy(words, idx_row + v / 4, 8);
    else
      std::memcpy(words, idx_row + v / 2, 16);
    // qwords 0-3 carry lanes 0-15, qwords 4-7 lanes 16-31 (the same word when b == 2)
    const __m512i data = _mm512_inserti64x4(_mm512_set1_epi64(static_cast<long long>(words[0])),
                                            _mm256_set1_epi64x(static_cast<long long>(b == 2 ? words[0] : words[1])), 1);
    const __m512i pos = _mm512_add_epi16(_mm512_and_si512(_mm512_multishift_epi64_epi8(vctrl, data), low), vbase);
    prefetch_stream<kToL2>(vals + v, 4096);
    prefetch_stream<kToL2>(idx_row + v * b / 8, 512);
    const __m512i wv = _mm512_loadu_si512(vals + v);
    for (int r = 0; r < R; ++r) {
      const uint16_t* xr = x.bf16[r] + k;
      const __m512i xv = _mm512_permutex2var_epi16(_mm512_loadu_si512(xr), pos, _mm512_loadu_si512(xr + 32));
      acc[r] = dot_bf16(acc[r], wv, xv);
    }
  };
  int64_t v = 0, k = 0;
  for (; v + 64 <= per_row; v += 64, k += 128) {
    step(v, k, acc0);
    step(v + 32, k + 64, acc1);
  }
  for (; v + 32 <= per_row; v += 32, k += 64) step(v, k, acc0);
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
  for (; v < per_row; ++v) {  // tail
    const float wv = bf16_to_f32(vals[v]);
    const int64_t kk = v / w.n * w.m + nm_index(w, n, v);
    for (int r = 0; r < R; ++r) out[r] += wv * x[r][kk];
  }
}
#endif

template <int R>
void nm_dot(const NMView& w, DType t, int64_t n, const XRows& x, float* out) {
  const int64_t groups = (w.cols + w.m - 1) / w.m, per_row = groups * w.n;
  const int64_t vbase = n * per_row;
  float acc[R] = {};
  int64_t v = 0;
#if !defined(SF_ISA_scalar)
  if (kLanes % w.n == 0) {
    const int b = index_bits(w);
    const int64_t span = kLanes / w.n * w.m;  // x elements one chunk of values covers
    const uint8_t* idx_row = w.index + n * w.index_stride;
#if defined(SF_ISA_avx512)
    alignas(64) int32_t sel[16], shift[16], base[16];
    for (int j = 0; j < 16; ++j) {
      sel[j] = j * b / 32;
      shift[j] = j * b % 32;
      base[j] = static_cast<int32_t>(j / w.n * w.m);
    }
    const __m512i vsel = _mm512_load_si512(sel), vshift = _mm512_load_si512(shift), vbase16 = _mm512_load_si512(base);
    const __m512i low = _mm512_set1_epi32((1 << b) - 1);
    __m512 vacc[R];
    for (int r = 0; r < R; ++r) vacc[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; v + 16 <= per_row; v += 16, k += span) {
      uint64_t word = 0;
      if (b == 2)  // constant sizes: a variable-size memcpy becomes a library call in the hot loop
        std::memcpy(&word, idx_row + v / 4, 4);
      else
        std::memcpy(&word, idx_row + v / 2, 8);
      const __m512i words = _mm512_permutexvar_epi32(vsel, _mm512_castsi128_si512(_mm_cvtsi64_si128(static_cast<long long>(word))));
      const __m512i pos = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(words, vshift), low), vbase16);
      prefetch_stream<kToL2>(static_cast<const char*>(w.values) + (vbase + v) * element_size(t), 4096);
      prefetch_stream<kToL2>(idx_row + v * b / 8, 512);
      const __m512 wv = load16_f32(w.values, vbase + v, t);
      for (int r = 0; r < R; ++r) {
        const float* xr = x[r] + k;
        const __m512 xv = span == 32 ? _mm512_permutex2var_ps(_mm512_loadu_ps(xr), pos, _mm512_loadu_ps(xr + 16))
                                     : _mm512_i32gather_ps(pos, xr, 4);
        vacc[r] = _mm512_fmadd_ps(wv, xv, vacc[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_ps(vacc[r]);
#else
    alignas(32) int32_t shift[8], base[8];
    for (int j = 0; j < 8; ++j) {
      shift[j] = j * b;
      base[j] = static_cast<int32_t>(j / w.n * w.m);
    }
    const __m256i vshift = _mm256_load_si256(reinterpret_cast<const __m256i*>(shift));
    const __m256i vbase8 = _mm256_load_si256(reinterpret_cast<const __m256i*>(base));
    const __m256i low = _mm256_set1_epi32((1 << b) - 1);
    __m256 vacc[R];
    for (int r = 0; r < R; ++r) vacc[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; v + 8 <= per_row; v += 8, k += span) {
      uint32_t word = 0;
      if (b == 2)
        std::memcpy(&word, idx_row + v / 4, 2);
      else
        std::memcpy(&word, idx_row + v / 2, 4);
      const __m256i pos = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), vshift), low), vbase8);
      if (v % 16 == 0) {
        prefetch_stream<kToL2>(static_cast<const char*>(w.values) + (vbase + v) * element_size(t), 4096);
        prefetch_stream<kToL2>(idx_row + v * b / 8, 512);
      }
      const __m256 wv = load8_f32(w.values, vbase + v, t);
      for (int r = 0; r < R; ++r) vacc[r] = _mm256_fmadd_ps(wv, _mm256_i32gather_ps(x[r] + k, pos, 4), vacc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r] = hsum8(vacc[r]);
#endif
  }
#endif
  while (v < per_row) {  // scalar path and vector tails: summed by blocks (common.h)
    float part[R] = {};
    for (const int64_t stop = std::min(per_row, v + kScalarBlock); v < stop; ++v) {
      const float wv = load_as_f32(w.values, vbase + v, t);
      const int64_t k = v / w.n * w.m + nm_index(w, n, v);
      for (int r = 0; r < R; ++r) part[r] += wv * x[r][k];
    }
    for (int r = 0; r < R; ++r) acc[r] += part[r];
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

#if defined(SF_ISA_avx512)
void nm_tiled_linear(const NMView& w, const LinearIO& io);
#endif

}  // namespace

void nm_linear(const NMView& w, const LinearIO& io) {
#if defined(SF_ISA_avx512)
  if (nm_gemm_applies(w, io)) {  // many rows: the GEMM that skips the zeros of any weight
    nm_gemm(w, io);
    return;
  }
  if (nm24_gemm_applies(w, io)) {  // 2:4, bf16: a GEMM that skips the zeros
    nm24_gemm_bf16(w, io);
    return;
  }
  if (nm24_gemm_f32_applies(w, io)) {  // 2:4, float32, larger batches: the same idea
    nm24_gemm_f32(w, io);
    return;
  }
  // Decompress 4 rows at a time into a tile, register-blocked GEMM. Half-dense ratios (2:4, 4:8,
  // 8:16) have fast row kernels (a permute fetches x), which win at a few rows of x.
  const bool half = 2 * w.n == w.m;
  if (tiled_applies(io, half ? TiledFrom{8, 4} : TiledFrom{2, 2})) {
    nm_tiled_linear(w, io);
    return;
  }
#endif
  run_rowwise(io, 1, [&](int64_t n0, int64_t n1, const XRows& x, int R, float* acc) {
    with_rows(R, [&](auto rows) {
      constexpr int RR = decltype(rows)::value;
      float out[RR];
#if defined(SF_ISA_avx512)
      if (io.dtype == DType::bf16 && 2 * w.n == w.m && use_bf16_dot()) {
        for (int64_t n = n0; n < n1; ++n) {
          nm_dot_bf16_half<RR>(w, n, x, out);
          for (int r = 0; r < RR; ++r) acc[r * (n1 - n0) + (n - n0)] = out[r];
        }
        return;
      }
#endif
      for (int64_t n = n0; n < n1; ++n) {
        nm_dot<RR>(w, io.dtype, n, x, out);
        for (int r = 0; r < RR; ++r) acc[r * (n1 - n0) + (n - n0)] = out[r];
      }
    });
  });
}

}  // namespace sparseflow::cpu::SF_ISA

namespace sparseflow::cpu::SF_ISA {
namespace {

// Turns a row's packed positions into a bitmask row (bit g * m + pos for each stored value), so
// that the bitmask expansion can place the values. One index byte holds f = 8 / bits fields; the
// groups they fall in depend only on the byte's phase (index of its first field mod n), so one
// table per phase gives the bits of a whole byte relative to the group of its first field.
struct NMMaskTable {
  int64_t n, m;
  std::vector<uint32_t> bits;       // [n phases][256]

  explicit NMMaskTable(const NMView& w) : n(w.n), m(w.m), bits(static_cast<size_t>(w.n) * 256) {
    const int b = index_bits(w), f = 8 / b;
    for (int p = 0; p < n; ++p) {
      for (int byte = 0; byte < 256; ++byte) {
        uint32_t out = 0;
        for (int i = 0; i < f; ++i) {
          const int64_t group = (p + i) / n, pos = (byte >> (i * b)) & ((1 << b) - 1);
          out |= 1u << (group * m + pos);  // at most 31: validated positions are below m
        }
        bits[p * 256 + byte] = out;
      }
    }
  }

  // mask: room for round_up(cols, 64) + 128 bits; bits at and past cols come out cleared.
  void row(const uint8_t* index, int64_t index_stride, int64_t cols, uint8_t* mask) const {
    // Locals, not members: stores through uint8_t* may alias anything, members would be reloaded.
    const int64_t n = this->n, m = this->m;
    const int f = m == 4 ? 4 : 2;  // fields per index byte
    const uint32_t* lut = bits.data();
    if (f % n == 0) {
      // Each byte holds whole groups (2:4, 1:4, 2:8, 1:8, 2:16, 1:16): its bits are one mask word.
      const int64_t width = f / n * m;  // 8, 16 or 32 bits
      const int64_t used = std::min(index_stride, (cols + width - 1) / width);
      if (width == 8) {
        byte_row(index, used, mask);
      } else if (width == 16) {  // constant memcpy sizes: a variable one is a library call
        for (int64_t i = 0; i < used; ++i) {
          const uint16_t word = static_cast<uint16_t>(lut[index[i]]);
          std::memcpy(mask + 2 * i, &word, 2);
        }
      } else {
        for (int64_t i = 0; i < used; ++i) std::memcpy(mask + 4 * i, lut + index[i], 4);
      }
    } else if (n % f == 0) {
      // A group spans n / f whole bytes (4:8, 6:8, 4:16, 8:16, ...): OR their one-hot positions.
      with_span(n / f, [&](auto span) { groups_row<decltype(span)::value>(index, (cols + m - 1) / m, m, mask); });
    } else {
      general_row(index, index_stride, cols, mask);
    }
    if (cols % 8) mask[cols / 8] &= static_cast<uint8_t>((1u << (cols % 8)) - 1);
  }

  // 2:4 and 2:8: each index byte becomes one mask byte, and each of its nibbles gives its own bits,
  // so the vector paths look both nibbles up with one byte shuffle each.
  void byte_row(const uint8_t* index, int64_t used, uint8_t* mask) const {
    int64_t i = 0;
#if !defined(SF_ISA_scalar)
    alignas(16) uint8_t lo[16], hi[16];
    for (int x = 0; x < 16; ++x) {
      if (m == 4) {  // a nibble is one group's two 2-bit positions
        lo[x] = static_cast<uint8_t>((1u << (x & 3)) | (1u << (x >> 2)));
        hi[x] = static_cast<uint8_t>(lo[x] << 4);
      } else {  // m = 8: a nibble is one position of the byte's group
        lo[x] = hi[x] = static_cast<uint8_t>(x < 8 ? 1u << x : 0);
      }
    }
#if defined(SF_ISA_avx512)
    const __m512i tlo = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lo)));
    const __m512i thi = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)));
    const __m512i nib = _mm512_set1_epi8(0x0f);
    for (; i + 64 <= used; i += 64) {
      const __m512i v = _mm512_loadu_si512(index + i);
      const __m512i l = _mm512_shuffle_epi8(tlo, _mm512_and_si512(v, nib));
      const __m512i h = _mm512_shuffle_epi8(thi, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
      _mm512_storeu_si512(mask + i, _mm512_or_si512(l, h));
    }
#else
    const __m256i tlo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo)));
    const __m256i thi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)));
    const __m256i nib = _mm256_set1_epi8(0x0f);
    for (; i + 32 <= used; i += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index + i));
      const __m256i l = _mm256_shuffle_epi8(tlo, _mm256_and_si256(v, nib));
      const __m256i h = _mm256_shuffle_epi8(thi, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(mask + i), _mm256_or_si256(l, h));
    }
#endif
#endif
    const uint32_t* lut = bits.data();
    for (; i < used; ++i) mask[i] = static_cast<uint8_t>(lut[index[i]]);
  }

  template <class F>
  static void with_span(int64_t span, const F& f) {
    switch (span) {  // n / 2 for m = 8 and 16 (n even): 2..7
      case 2: f(std::integral_constant<int, 2>{}); break;
      case 3: f(std::integral_constant<int, 3>{}); break;
      case 4: f(std::integral_constant<int, 4>{}); break;
      case 5: f(std::integral_constant<int, 5>{}); break;
      case 6: f(std::integral_constant<int, 6>{}); break;
      default: f(std::integral_constant<int, 7>{}); break;
    }
  }

  template <int Span>
  void groups_row(const uint8_t* index, int64_t groups, int64_t m, uint8_t* mask) const {
    const uint32_t* lut = bits.data();
    for (int64_t g = 0; g < groups; ++g) {
      uint32_t word = 0;
      for (int j = 0; j < Span; ++j) word |= lut[index[g * Span + j]];
      if (m == 8) {
        mask[g] = static_cast<uint8_t>(word);
      } else {
        const uint16_t half = static_cast<uint16_t>(word);
        std::memcpy(mask + 2 * g, &half, 2);
      }
    }
  }

  // Any n:m (3:4, 3:8, 5:16, ...): bytes straddle groups, so the phase walks along (in registers:
  // a phase read from a table would chain each byte's loads to the previous byte's).
  void general_row(const uint8_t* index, int64_t index_stride, int64_t cols, uint8_t* mask) const {
    const int64_t n = this->n, m = this->m, f = m == 4 ? 4 : 2;
    const uint32_t* lut = bits.data();
    uint64_t acc = 0;
    int64_t acc_bit = 0, base = 0, p = 0;  // acc holds mask bits [acc_bit, acc_bit + 64); acc_bit % 32 == 0
    const auto flush32 = [&] {
      const uint32_t low = static_cast<uint32_t>(acc);
      std::memcpy(mask + acc_bit / 8, &low, 4);
      acc >>= 32;
      acc_bit += 32;
    };
    const int64_t limit = round_up(cols, 32);
    for (int64_t i = 0; i < index_stride && base < limit; ++i) {
      while (base - acc_bit >= 32) flush32();
      acc |= static_cast<uint64_t>(lut[p * 256 + index[i]]) << (base - acc_bit);
      for (p += f; p >= n; p -= n) base += m;
    }
    while (acc_bit < limit) flush32();
  }
};

// Dense row n of w at out: the row's mask from the table, then the bitmask expansion.
template <class T>
void nm_dense_row(const NMView& w, const NMMaskTable& table, int64_t n, T* out) {
  const int64_t per_row = (w.cols + w.m - 1) / w.m * w.n, stride = (w.cols + 7) / 8;
  thread_local std::vector<uint8_t> mask;
  mask.resize(static_cast<size_t>(round_up(w.cols, 64) / 8 + 16));
  table.row(w.index + n * w.index_stride, w.index_stride, w.cols, mask.data());
  // Values past the last column (in a partial last group) come last in the row: never taken.
  expand_row(static_cast<const T*>(w.values) + n * per_row, (w.rows - n) * per_row, mask.data(), stride, w.cols, out);
}

#if defined(SF_ISA_avx512)
void nm_tiled_linear(const NMView& w, const LinearIO& io) {
  const NMMaskTable table(w);  // built once: building it per tile would cost more than the tile
  const int64_t row_bytes = (w.cols + w.m - 1) / w.m * w.n * element_size(io.dtype);
  tiled_linear(
      io,
      [&](int64_t n0, int64_t n1, void* out, int64_t ld) {
        with_element(io.dtype, [&](auto tag) {
          using T = decltype(tag);
          for (int64_t n = n0; n < n1; ++n) nm_dense_row<T>(w, table, n, static_cast<T*>(out) + (n - n0) * ld);
        });
      },
      [&](int64_t n0, int64_t n1) {
        prefetch_range(w.index + n0 * w.index_stride, (n1 - n0) * w.index_stride);
        prefetch_range(static_cast<const char*>(w.values) + n0 * row_bytes, (n1 - n0) * row_bytes);
      });
}
#endif

}  // namespace

void nm_decompress(const NMView& w, const DecompressIO& d) {
  const NMMaskTable table(w);
  with_element(d.dtype, [&](auto tag) {
    using T = decltype(tag);
    run_decompress<T>(d, w.cols, [&](int64_t n, T* out) { nm_dense_row<T>(w, table, n, out); });
  });
}

}  // namespace sparseflow::cpu::SF_ISA
