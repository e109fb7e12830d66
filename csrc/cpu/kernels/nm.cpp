// N:M linear: each group of m weights keeps n values and their positions in the group (2-bit
// indices for m = 4, 4-bit otherwise). The vector paths decode the positions of a chunk of
// values at once and fetch the matching x elements: AVX-512 by a two-register permute when the
// chunk spans 32 x elements (2:4, 4:8, 8:16), by a gather otherwise; AVX2 by a gather.
#include "cpu/kernels/kernels.h"

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
      const __m256 wv = load8_f32(w.values, vbase + v, t);
      for (int r = 0; r < R; ++r) vacc[r] = _mm256_fmadd_ps(wv, _mm256_i32gather_ps(x[r] + k, pos, 4), vacc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r] = hsum8(vacc[r]);
#endif
  }
#endif
  for (; v < per_row; ++v) {  // scalar path and vector tails
    const float wv = load_as_f32(w.values, vbase + v, t);
    const int64_t k = v / w.n * w.m + nm_index(w, n, v);
    for (int r = 0; r < R; ++r) acc[r] += wv * x[r][k];
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

}  // namespace

void nm_linear(const NMView& w, const LinearIO& io) {
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
  std::vector<int> next_phase;      // [n]: phase of the following byte
  std::vector<int64_t> advance;     // [n]: columns from this byte's first group to the next byte's

  explicit NMMaskTable(const NMView& w) : n(w.n), m(w.m), bits(static_cast<size_t>(w.n) * 256),
                                           next_phase(w.n), advance(w.n) {
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
      next_phase[p] = static_cast<int>((p + f) % n);
      advance[p] = (p + f) / n * m;
    }
  }

  // mask: room for round_up(cols, 64) + 128 bits; bits at and past cols come out cleared.
  void row(const uint8_t* index, int64_t index_stride, int64_t cols, uint8_t* mask) const {
    const int f = m == 4 ? 4 : 2;  // fields per index byte
    const uint32_t* lut = bits.data();
    if (f % n == 0) {
      // Each byte holds whole groups (2:4, 1:4, 2:8, 1:8, 2:16, 1:16): its bits are one mask word.
      const int64_t width = f / n * m;  // 8, 16 or 32 bits
      const int64_t used = std::min(index_stride, (cols + width - 1) / width);
      for (int64_t i = 0; i < used; ++i) {
        const uint32_t word = lut[index[i]];
        if (width == 8) mask[i] = static_cast<uint8_t>(word);
        else std::memcpy(mask + i * (width / 8), &word, static_cast<size_t>(width / 8));
      }
    } else if (n % f == 0 && m >= 8) {
      // A group spans n / f whole bytes (4:8, 6:8, 4:16, 8:16, ...): OR their one-hot positions.
      const int64_t span = n / f, groups = (cols + m - 1) / m;
      for (int64_t g = 0; g < groups; ++g) {
        uint32_t word = 0;
        for (int64_t j = 0; j < span; ++j) word |= lut[index[g * span + j]];
        if (m == 8) mask[g] = static_cast<uint8_t>(word);
        else std::memcpy(mask + 2 * g, &word, 2);
      }
    } else {
      general_row(index, index_stride, cols, mask);
    }
    if (cols % 8) mask[cols / 8] &= static_cast<uint8_t>((1u << (cols % 8)) - 1);
  }

  // Any n:m (3:4, 3:8, 5:16, ...): bytes straddle groups, so the phase walks along.
  void general_row(const uint8_t* index, int64_t index_stride, int64_t cols, uint8_t* mask) const {
    uint64_t acc = 0;
    int64_t acc_bit = 0, base = 0;  // acc holds mask bits [acc_bit, acc_bit + 64); acc_bit % 32 == 0
    int p = 0;
    const auto flush32 = [&] {
      const uint32_t low = static_cast<uint32_t>(acc);
      std::memcpy(mask + acc_bit / 8, &low, 4);
      acc >>= 32;
      acc_bit += 32;
    };
    const int64_t limit = round_up(cols, 32);
    for (int64_t i = 0; i < index_stride && base < limit; ++i) {
      while (base - acc_bit >= 32) flush32();
      acc |= static_cast<uint64_t>(bits[p * 256 + index[i]]) << (base - acc_bit);
      base += advance[p];
      p = next_phase[p];
    }
    while (acc_bit < limit) flush32();
  }
};

}  // namespace

void nm_decompress(const NMView& w, const DecompressIO& d) {
  const NMMaskTable table(w);
  const int64_t per_row = (w.cols + w.m - 1) / w.m * w.n, stride = (w.cols + 7) / 8;
  with_element(d.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* values = static_cast<const T*>(w.values);
    run_decompress<T>(d, w.cols, [&](int64_t n, T* out) {
      thread_local std::vector<uint8_t> mask;
      mask.resize(static_cast<size_t>(round_up(w.cols, 64) / 8 + 16));
      table.row(w.index + n * w.index_stride, w.index_stride, w.cols, mask.data());
      // Values past the last column (in a partial last group) come last in the row: never taken.
      expand_row(values + n * per_row, (w.rows - n) * per_row, mask.data(), stride, w.cols, out);
    });
  });
}

}  // namespace sparseflow::cpu::SF_ISA
