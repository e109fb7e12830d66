// CSR linear: for very high sparsity. Each stored value gathers its x element; AVX-512 and AVX2
// gather 16 / 8 x values per instruction from the float32 copy of x (which sits in L1/L2).
#include "cpu/kernels/kernels.h"

namespace sparseflow::cpu::SF_ISA {
namespace {

template <class Index, int R>
void csr_dot(const CsrView& w, DType t, int64_t n, const XRows& x, float* out) {
  const Index* col = static_cast<const Index*>(w.col);
  int64_t i = w.row_ptr[n];
  const int64_t end = w.row_ptr[n + 1];
  float acc[R] = {};
  // The gathers read x (float32) from L1 while it fits in half of it; then the streams go to L1
  // too. A larger x misses L1 anyway, and streams prefetched there would push it out further.
  const bool x_in_l1 = w.cols * 4 * R <= 16384;
  const auto prefetch = [&](int64_t at) {
    const char* v = static_cast<const char*>(w.values) + at * element_size(t);
    if (x_in_l1) {
      prefetch_stream(v);
      prefetch_stream(col + at);
    } else {
      prefetch_stream<_MM_HINT_T1>(v, 4096);
      prefetch_stream<_MM_HINT_T1>(col + at, 4096);
    }
  };
#if defined(SF_ISA_avx512)
  __m512 vacc[R], vacc2[R];  // two accumulators per row: gathers are long-latency
  for (int r = 0; r < R; ++r) vacc[r] = vacc2[r] = _mm512_setzero_ps();
  const auto indices = [&](int64_t at) {
    if constexpr (sizeof(Index) == 2)
      return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + at)));
    else
      return _mm512_loadu_si512(col + at);
  };
  for (; i + 32 <= end; i += 32) {  // whole chunks: no lane masks
    prefetch(i);
    const __m512i idx0 = indices(i), idx1 = indices(i + 16);
    const __m512 w0 = load16_f32(w.values, i, t), w1 = load16_f32(w.values, i + 16, t);
    for (int r = 0; r < R; ++r) {
      vacc[r] = _mm512_fmadd_ps(w0, _mm512_i32gather_ps(idx0, x[r], 4), vacc[r]);
      vacc2[r] = _mm512_fmadd_ps(w1, _mm512_i32gather_ps(idx1, x[r], 4), vacc2[r]);
    }
  }
  for (int r = 0; r < R; ++r) vacc[r] = _mm512_add_ps(vacc[r], vacc2[r]);
  for (; i < end; i += 16) {
    const __mmask16 live = static_cast<__mmask16>(_bzhi_u32(~0u, static_cast<unsigned>(std::min<int64_t>(16, end - i))));
    __m512i idx;
    if constexpr (sizeof(Index) == 2)
      idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, col + i));
    else
      idx = _mm512_maskz_loadu_epi32(live, col + i);
    const __m512 wv = maskz_load16_f32(live, w.values, i, t);
    for (int r = 0; r < R; ++r)
      vacc[r] = _mm512_fmadd_ps(wv, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, x[r], 4), vacc[r]);
  }
  for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_ps(vacc[r]);
#elif defined(SF_ISA_avx2)
  __m256 vacc[R];
  for (int r = 0; r < R; ++r) vacc[r] = _mm256_setzero_ps();
  for (; i + 8 <= end; i += 8) {
    if (i % 16 == 0) prefetch(i);
    __m256i idx;
    if constexpr (sizeof(Index) == 2)
      idx = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col + i)));
    else
      idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + i));
    const __m256 wv = load8_f32(w.values, i, t);
    for (int r = 0; r < R; ++r) vacc[r] = _mm256_fmadd_ps(wv, _mm256_i32gather_ps(x[r], idx, 4), vacc[r]);
  }
  for (int r = 0; r < R; ++r) acc[r] = hsum8(vacc[r]);
#endif
  for (; i < end; ++i) {  // scalar path, and the AVX2 tail
    const int64_t k = static_cast<std::make_unsigned_t<Index>>(col[i]);
    const float wv = load_as_f32(w.values, i, t);
    for (int r = 0; r < R; ++r) acc[r] += wv * x[r][k];
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

template <class Index>
void csr_run(const CsrView& w, const LinearIO& io) {
  run_rowwise(io, 1, [&](int64_t n0, int64_t n1, const XRows& x, int R, float* acc) {
    with_rows(R, [&](auto rows) {
      constexpr int RR = decltype(rows)::value;
      float out[RR];
      for (int64_t n = n0; n < n1; ++n) {
        csr_dot<Index, RR>(w, io.dtype, n, x, out);
        for (int r = 0; r < RR; ++r) acc[r * (n1 - n0) + (n - n0)] = out[r];
      }
    });
  });
}

}  // namespace

void csr_linear(const CsrView& w, const LinearIO& io) {
  if (w.index_bits == 16)
    csr_run<int16_t>(w, io);
  else
    csr_run<int32_t>(w, io);
}

}  // namespace sparseflow::cpu::SF_ISA

namespace sparseflow::cpu::SF_ISA {

// Zero the row, then put each stored value at its column (scalar: CSR rows are short).
void csr_decompress(const CsrView& w, const DecompressIO& d) {
  with_element(d.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* values = static_cast<const T*>(w.values);
    run_decompress<T>(d, w.cols, [&](int64_t n, T* out) {
      std::memset(out, 0, static_cast<size_t>(w.cols) * sizeof(T));
      const int64_t begin = w.row_ptr[n], end = w.row_ptr[n + 1];
      if (w.index_bits == 16) {
        const uint16_t* col = static_cast<const uint16_t*>(w.col);  // int16 storage read as unsigned
        for (int64_t i = begin; i < end; ++i) out[col[i]] = values[i];
      } else {
        const int32_t* col = static_cast<const int32_t*>(w.col);
        for (int64_t i = begin; i < end; ++i) out[col[i]] = values[i];
      }
    });
  });
}

}  // namespace sparseflow::cpu::SF_ISA
