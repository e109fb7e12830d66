// pybind11 glue of the CUDA kernels (compiled only when CMake's SPARSEFLOW_CUDA is on). Like the CPU
// binding it takes raw device pointers, sizes, strides and the stream (an integer, torch's
// `torch.cuda.current_stream().cuda_stream`), never allocates, and releases the GIL while launching.
// The caller allocates the zeroed split-K workspace of `cuda_*_workspace_bytes` bytes.
#ifdef SPARSEFLOW_WITH_CUDA

#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda/launch.h"
#include "cuda/register.h"

namespace py = pybind11;
namespace sfc = sparseflow::cuda;

void register_cuda(py::module_& m) {
  m.def("cuda_act_sparse_gemv_workspace_bytes", &sfc::act_sparse_gemv_workspace_bytes, py::arg("M"), py::arg("N"),
        py::arg("K"));
  m.def(
      "cuda_act_sparse_gemv",
      [](int dtype, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t w_t, int64_t N, int64_t ldw,
         float threshold, uintptr_t bias, uintptr_t y, int64_t ldy, uintptr_t workspace, int64_t workspace_bytes,
         uintptr_t stream) {
        const sfc::ActSparseArgs a{dtype, reinterpret_cast<const void*>(x), M, K, ldx,
                                   reinterpret_cast<const void*>(w_t), N, ldw, threshold,
                                   reinterpret_cast<const void*>(bias), reinterpret_cast<void*>(y), ldy,
                                   reinterpret_cast<void*>(workspace), workspace_bytes, stream};
        py::gil_scoped_release release;
        sfc::act_sparse_gemv(a);
      },
      "y = x_active @ w_t (+ bias) on `stream` (decode, M <= 16)", py::arg("dtype"), py::arg("x"), py::arg("M"),
      py::arg("K"), py::arg("ldx"), py::arg("w_t"), py::arg("N"), py::arg("ldw"), py::arg("threshold"),
      py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("stream"));

  m.def("cuda_nm24_gemv_workspace_bytes", &sfc::nm24_gemv_workspace_bytes, py::arg("M"), py::arg("N"), py::arg("K"));
  m.def(
      "cuda_nm24_gemv",
      [](int dtype, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t values, int64_t ldv, uintptr_t index,
         int64_t ldi, int64_t N, uintptr_t bias, uintptr_t y, int64_t ldy, uintptr_t workspace,
         int64_t workspace_bytes, uintptr_t stream) {
        const sfc::Nm24Args a{dtype, reinterpret_cast<const void*>(x), M, K, ldx,
                              reinterpret_cast<const void*>(values), ldv, reinterpret_cast<const uint8_t*>(index),
                              ldi, N, reinterpret_cast<const void*>(bias), reinterpret_cast<void*>(y), ldy,
                              reinterpret_cast<void*>(workspace), workspace_bytes, stream};
        py::gil_scoped_release release;
        sfc::nm24_gemv(a);
      },
      "y = x @ W^T (+ bias) for a 2:4 sf.NM weight on `stream` (decode, M <= 16)", py::arg("dtype"), py::arg("x"),
      py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("values"), py::arg("ldv"), py::arg("index"),
      py::arg("ldi"), py::arg("N"), py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"));
}

#endif  // SPARSEFLOW_WITH_CUDA
