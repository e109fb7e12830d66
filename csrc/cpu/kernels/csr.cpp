// CSR linear: for very high sparsity. Each stored value fetches its x element. For one row of x,
// AVX-512 loads them one by one into a vector; otherwise AVX-512 and AVX2 gather 16 / 8 x values
// per instruction from the float32 copy of x (which sits in L1/L2).
#include "cpu/kernels/gemm_sparse.h"
#include "cpu/kernels/kernels.h"

namespace sparseflow::cpu::SF_ISA {
namespace {

#if defined(SF_ISA_avx512)
// One row of x: on Zen 4, sixteen scalar loads inserted into a vector beat a 16-lane gather in
// isolation (0.56 against 0.88 cycles per value with x in L1). Where float32 x outgrows L1 and x
// is bf16, the bf16 copy (half the size) is read instead: 0.75 against 0.92 cycles. Inside the
// kernel (A/B, calls in random order, bf16 95%) that buys 0.92 -> 0.82 ms at 4096x14336 and
// nothing measurable at K = 4096 (memory-bound there); float32 x past L1 read this way was slower,
// so it gathers.
template <class Index>
inline __m512 x16_f32(const float* x, const Index* col) {
  using U = std::make_unsigned_t<Index>;
  const auto at = [&](int j) { return x[static_cast<U>(col[j])]; };
  const __m128 q0 = _mm_setr_ps(at(0), at(1), at(2), at(3)), q1 = _mm_setr_ps(at(4), at(5), at(6), at(7));
  const __m128 q2 = _mm_setr_ps(at(8), at(9), at(10), at(11)), q3 = _mm_setr_ps(at(12), at(13), at(14), at(15));
  return _mm512_insertf32x4(_mm512_insertf32x4(_mm512_insertf32x4(_mm512_castps128_ps512(q0), q1, 1), q2, 2), q3, 3);
}
template <class Index>
inline __m512 x16_bf16(const uint16_t* x, const Index* col) {
  using U = std::make_unsigned_t<Index>;
  const auto at = [&](int j) { return static_cast<short>(x[static_cast<U>(col[j])]); };
  const __m128i q0 = _mm_setr_epi16(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7));
  const __m128i q1 = _mm_setr_epi16(at(8), at(9), at(10), at(11), at(12), at(13), at(14), at(15));
  return cvt16_bf16(_mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1));
}

template <class Index, bool FromBf16>
float csr_dot_one(const CsrView& w, DType t, int64_t n, const XRows& x) {
  const Index* col = static_cast<const Index*>(w.col);
  int64_t i = w.row_ptr[n];
  const int64_t end = w.row_ptr[n + 1];
  const auto fetch = [&](int64_t at) { return FromBf16 ? x16_bf16(x.bf16[0], col + at) : x16_f32(x[0], col + at); };
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; i + 32 <= end; i += 32) {
    prefetch_stream(static_cast<const char*>(w.values) + i * element_size(t));  // 2 KiB ahead (2 to 16
    prefetch_stream(col + i);                                                   // measured alike)
    acc0 = _mm512_fmadd_ps(load16_f32(w.values, i, t), fetch(i), acc0);
    acc1 = _mm512_fmadd_ps(load16_f32(w.values, i + 16, t), fetch(i + 16), acc1);
  }
  if (i + 16 <= end) {
    acc0 = _mm512_fmadd_ps(load16_f32(w.values, i, t), fetch(i), acc0);
    i += 16;
  }
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < end; ++i) sum += load_as_f32(w.values, i, t) * x[0][static_cast<std::make_unsigned_t<Index>>(col[i])];
  return sum;
}
#endif

template <class Index, int R>
void csr_dot(const CsrView& w, DType t, int64_t n, const XRows& x, float* out) {
  const Index* col = static_cast<const Index*>(w.col);
  int64_t i = w.row_ptr[n];
  const int64_t end = w.row_ptr[n + 1];
  float acc[R] = {};
  const auto prefetch = [&](int64_t at) {
    prefetch_stream(static_cast<const char*>(w.values) + at * element_size(t));
    prefetch_stream(col + at);
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
  while (i < end) {  // scalar path, and the AVX2 tail: summed by blocks (common.h)
    float part[R] = {};
    for (const int64_t stop = std::min(end, i + kScalarBlock); i < stop; ++i) {
      const int64_t k = static_cast<std::make_unsigned_t<Index>>(col[i]);
      const float wv = load_as_f32(w.values, i, t);
      for (int r = 0; r < R; ++r) part[r] += wv * x[r][k];
    }
    for (int r = 0; r < R; ++r) acc[r] += part[r];
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

template <class Index>
void csr_run(const CsrView& w, const LinearIO& io) {
  run_rowwise(io, 1, [&](int64_t n0, int64_t n1, const XRows& x, int R, float* acc) {
#if defined(SF_ISA_avx512)
    const bool x_in_l1 = w.cols * 4 <= 16384, from_bf16 = !x_in_l1 && io.dtype == DType::bf16;
    if (R == 1 && (x_in_l1 || from_bf16)) {  // else (float32 x past L1) the gathers measured faster
      for (int64_t n = n0; n < n1; ++n)
        acc[n - n0] = from_bf16 ? csr_dot_one<Index, true>(w, io.dtype, n, x) : csr_dot_one<Index, false>(w, io.dtype, n, x);
      return;
    }
#endif
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
#if defined(SF_ISA_avx512)
  if (sparse_gemm_applies(w.nnz, w.rows, w.cols, io)) {  // many rows: a GEMM that skips the zeros
    if (w.index_bits == 16) csr_gemm<uint16_t>(w, io);  // int16 storage read as unsigned
    else csr_gemm<uint32_t>(w, io);
    return;
  }
#endif
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
