// The input side of the batched activation-sparse path: x with its skipped inputs (|x| <= threshold)
// set to zero, so that one dense GEMM computes the thresholded product. The comparison runs on the
// bits: for IEEE formats |x| <= t (t >= 0, x not NaN) holds exactly when (bits(x) & ~sign) <=
// bits(t), and a NaN's magnitude bits exceed every threshold's, so NaN stays active as in the
// reference. Plain integer loops that the compiler vectorizes for each ISA level.
#include "cpu/kernels/kernels.h"

namespace sparseflow::cpu::SF_ISA {

void zero_inactive(const ThresholdIO& a) {
  const int64_t work = a.M * a.K;
  const int threads = threads_for(a.threads, work / 4);  // a compare per element: cheaper than a multiply-add
  const int64_t tasks = std::min<int64_t>(a.M, static_cast<int64_t>(threads) * 4);
  const int64_t per_task = tasks ? (a.M + tasks - 1) / tasks : 0;
  with_element(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T magnitude = static_cast<T>(sizeof(T) == 2 ? 0x7fffu : 0x7fffffffu);
    const T limit = static_cast<T>(a.threshold_bits & magnitude);  // -0.0 compares as +0.0
    parallel_for_torch_threads(tasks, threads, [&](int64_t t) {
      for (int64_t m = t * per_task; m < std::min(a.M, (t + 1) * per_task); ++m) {
        const T* x = static_cast<const T*>(a.x) + m * a.ldx;
        T* out = static_cast<T*>(a.out) + m * a.ldo;
        for (int64_t k = 0; k < a.K; ++k) out[k] = static_cast<T>((x[k] & magnitude) <= limit ? 0 : x[k]);
      }
    });
  });
}

}  // namespace sparseflow::cpu::SF_ISA
