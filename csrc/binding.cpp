// sparseflow._C: a thin pybind11 layer. Takes raw pointers, shapes and strides from the Python
// wrappers (which own all tensors), releases the GIL, and calls the kernel table of the ISA in
// use. Errors become Python exceptions (std::invalid_argument -> ValueError).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/cpuinfo.h"
#include "cpu/dispatch.h"
#include "cpu/thread_pool.h"
#include "cpu/validate.h"
#include "cuda/register.h"

namespace py = pybind11;
using namespace sparseflow::cpu;

namespace {

// Rows of x that held NaN or inf: the caller recomputes them with the reference.
std::vector<int64_t> flagged_rows(const LinearIO& io) {
  std::vector<int64_t> rows;
  for (int64_t m = 0; m < io.M; ++m)
    if (io.nonfinite[m]) rows.push_back(m);
  return rows;
}

template <class T>
const T* ptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }

LinearIO make_io(int dtype, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t y, int64_t N, int64_t ldy,
                 uintptr_t bias, uint8_t* nonfinite, int threads) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
  if (M < 0 || K < 0 || N < 0) throw std::invalid_argument("negative size");
  if (ldx < K || ldy < N) throw std::invalid_argument("row stride smaller than the row");
  if ((M > 0 && K > 0 && !x) || (M > 0 && N > 0 && !y)) throw std::invalid_argument("null data pointer");
  return LinearIO{static_cast<DType>(dtype), ptr<void>(x), M, K, ldx, reinterpret_cast<void*>(y), N, ldy,
                  ptr<void>(bias), nonfinite, threads < 1 ? 1 : threads};
}

const KernelTable& table(const std::string& isa) { return isa.empty() ? kernels() : kernels_for(isa.c_str()); }

DecompressIO make_decompress(int dtype, int64_t rows, int64_t cols, int64_t row0, int64_t row1, uintptr_t out,
                             int64_t ld, int threads, const char* what, int64_t col0 = 0, int64_t col1 = -1,
                             uintptr_t cursor = 0) {
  if (col1 < 0) col1 = cols;
  if (col0 < 0 || col0 > col1 || col1 > cols || col0 % 8 || (col1 % 8 && col1 != cols))
    throw std::invalid_argument(std::string(what) + ": columns [" + std::to_string(col0) + ", " + std::to_string(col1) +
                                ") must lie in [0, " + std::to_string(cols) + ") and start and end at multiples of 8");
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
  if (row0 < 0 || row0 > row1 || row1 > rows)
    throw std::invalid_argument(std::string(what) + ": rows [" + std::to_string(row0) + ", " + std::to_string(row1) +
                                ") are not inside [0, " + std::to_string(rows) + ")");
  if (ld < col1 - col0) throw std::invalid_argument(std::string(what) + ": output row stride smaller than the row");
  if (row1 > row0 && col1 > col0 && !out) throw std::invalid_argument("null data pointer");
  return DecompressIO{static_cast<DType>(dtype), row0, row1, col0, col1, reinterpret_cast<int64_t*>(cursor),
                      reinterpret_cast<void*>(out), ld, threads < 1 ? 1 : threads};
}

void check_cols(int64_t w_cols, int64_t K, const char* what) {
  if (w_cols != K)
    throw std::invalid_argument(std::string(what) + ": weight has " + std::to_string(w_cols) + " input features, x has " +
                                std::to_string(K));
}

void check_rows(int64_t w_rows, int64_t N, const char* what) {
  if (w_rows != N)
    throw std::invalid_argument(std::string(what) + ": weight has " + std::to_string(w_rows) + " output features, y has " +
                                std::to_string(N));
}

}  // namespace

#define SF_IO_ARGS int dtype, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t y, int64_t N, int64_t ldy, \
                   uintptr_t bias, int threads, const std::string& isa
// Each call owns its NaN/inf row flags (a kernel may run in several Python threads at once).
#define SF_IO std::vector<uint8_t> flags(static_cast<size_t>(M > 0 ? M : 0)); \
              const LinearIO io = make_io(dtype, x, M, K, ldx, y, N, ldy, bias, flags.data(), threads)
#define SF_IO_NAMES py::arg("dtype"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("y"), \
                    py::arg("N"), py::arg("ldy"), py::arg("bias"), py::arg("threads"), \
                    py::arg("isa") = ""

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparseflow compiled kernels (raw-pointer interface; use sparseflow.ops)";

  m.def("cpu_features", [] {
    const auto& f = cpu_features();
    py::dict d;
    d["model"] = f.model;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c; d["bmi2"] = f.bmi2;
    d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl; d["avx512dq"] = f.avx512dq;
    d["avx512vbmi"] = f.avx512vbmi; d["avx512vbmi2"] = f.avx512vbmi2; d["avx512bf16"] = f.avx512bf16;
    return d;
  });
  m.def("best_isa", [] { return std::string(isa_name(best_isa())); });
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); }, "the level in use (SPARSEFLOW_ISA may lower it)");
  m.def("built_isas", [] { return std::vector<std::string>{"scalar", "avx2", "avx512"}; });
  m.def("shares_torch_threads", [] { return shares_torch_threads(); },
        "whether decompression runs on torch's OpenMP threads (else on the kernels' own pool)");
  m.def("set_shares_torch_threads", [](bool on) { set_shares_torch_threads(on); }, py::arg("on"));
  m.def("cuda_built", [] {
#ifdef SPARSEFLOW_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  // ---- validation (once per weight, O(stored entries)) ----
  m.def("validate_bitmask", [](uintptr_t mask, uintptr_t row_offsets, int64_t rows, int64_t cols, int64_t stride, int64_t nnz) {
    validate_bitmask(BitmaskView{nullptr, ptr<uint8_t>(mask), ptr<int64_t>(row_offsets), rows, cols, stride, nnz});
  });
  m.def("validate_csr", [](uintptr_t col, int bits, uintptr_t row_ptr, int64_t rows, int64_t cols, int64_t nnz) {
    validate_csr(CsrView{nullptr, ptr<void>(col), ptr<int64_t>(row_ptr), rows, cols, nnz, bits});
  });
  m.def("validate_bsr", [](uintptr_t col, uintptr_t row_ptr, int64_t rows, int64_t cols, int64_t bm, int64_t bk, int64_t nblocks) {
    validate_bsr(BsrView{nullptr, ptr<int32_t>(col), ptr<int64_t>(row_ptr), rows, cols, bm, bk, nblocks});
  });
  m.def("validate_nm", [](uintptr_t index, int64_t rows, int64_t cols, int64_t n, int64_t mm, int64_t stride) {
    validate_nm(NMView{nullptr, ptr<uint8_t>(index), rows, cols, n, mm, stride});
  });

  // ---- kernels (the caller validated the weight and sized every buffer) ----
  m.def("bitmask_linear",
        [](uintptr_t values, uintptr_t mask, uintptr_t row_offsets, int64_t rows, int64_t cols, int64_t stride, int64_t nnz, SF_IO_ARGS) {
          SF_IO;
          check_cols(cols, K, "bitmask_linear");
          check_rows(rows, N, "bitmask_linear");
          const BitmaskView w{ptr<void>(values), ptr<uint8_t>(mask), ptr<int64_t>(row_offsets), rows, cols, stride, nnz};
          const KernelTable& t = table(isa);
          {
            py::gil_scoped_release release;
            t.bitmask_linear(w, io);
          }
          return flagged_rows(io);
        },
        py::arg("values"), py::arg("mask"), py::arg("row_offsets"), py::arg("rows"), py::arg("cols"), py::arg("stride"),
        py::arg("nnz"), SF_IO_NAMES);
  m.def("csr_linear",
        [](uintptr_t values, uintptr_t col, int bits, uintptr_t row_ptr, int64_t rows, int64_t cols, int64_t nnz, SF_IO_ARGS) {
          SF_IO;
          check_cols(cols, K, "csr_linear");
          check_rows(rows, N, "csr_linear");
          const CsrView w{ptr<void>(values), ptr<void>(col), ptr<int64_t>(row_ptr), rows, cols, nnz, bits};
          const KernelTable& t = table(isa);
          {
            py::gil_scoped_release release;
            t.csr_linear(w, io);
          }
          return flagged_rows(io);
        },
        py::arg("values"), py::arg("col"), py::arg("bits"), py::arg("row_ptr"), py::arg("rows"), py::arg("cols"),
        py::arg("nnz"), SF_IO_NAMES);
  m.def("bsr_linear",
        [](uintptr_t values, uintptr_t col, uintptr_t row_ptr, int64_t rows, int64_t cols, int64_t bm, int64_t bk,
           int64_t nblocks, SF_IO_ARGS) {
          SF_IO;
          check_cols(cols, K, "bsr_linear");
          check_rows(rows, N, "bsr_linear");
          const BsrView w{ptr<void>(values), ptr<int32_t>(col), ptr<int64_t>(row_ptr), rows, cols, bm, bk, nblocks};
          const KernelTable& t = table(isa);
          {
            py::gil_scoped_release release;
            t.bsr_linear(w, io);
          }
          return flagged_rows(io);
        },
        py::arg("values"), py::arg("col"), py::arg("row_ptr"), py::arg("rows"), py::arg("cols"), py::arg("bm"),
        py::arg("bk"), py::arg("nblocks"), SF_IO_NAMES);
  m.def("nm_linear",
        [](uintptr_t values, uintptr_t index, int64_t rows, int64_t cols, int64_t n, int64_t mm, int64_t stride, SF_IO_ARGS) {
          SF_IO;
          check_cols(cols, K, "nm_linear");
          check_rows(rows, N, "nm_linear");
          const NMView w{ptr<void>(values), ptr<uint8_t>(index), rows, cols, n, mm, stride};
          const KernelTable& t = table(isa);
          {
            py::gil_scoped_release release;
            t.nm_linear(w, io);
          }
          return flagged_rows(io);
        },
        py::arg("values"), py::arg("index"), py::arg("rows"), py::arg("cols"), py::arg("n"), py::arg("m"),
        py::arg("stride"), SF_IO_NAMES);
  m.def("act_sparse_dense",
        [](uintptr_t w_t, int64_t rows, int64_t cols, int64_t ld, float threshold, SF_IO_ARGS) {
          SF_IO;
          check_cols(rows, K, "act_sparse_dense");
          if (cols != N || ld < cols) throw std::invalid_argument("act_sparse_dense: w_t shape does not match y");
          const DenseView w{ptr<void>(w_t), rows, cols, ld};
          const KernelTable& t = table(isa);
          {
            py::gil_scoped_release release;
            t.act_sparse_dense(w, threshold, io);
          }
          return flagged_rows(io);
        },
        py::arg("w_t"), py::arg("rows"), py::arg("cols"), py::arg("ld"), py::arg("threshold"), SF_IO_NAMES);
  m.def("act_sparse_bitmask",
        [](uintptr_t values, uintptr_t mask, uintptr_t row_offsets, int64_t rows, int64_t cols, int64_t stride, int64_t nnz,
           float threshold, SF_IO_ARGS) {
          SF_IO;
          check_cols(rows, K, "act_sparse_bitmask");
          if (cols != N) throw std::invalid_argument("act_sparse_bitmask: w_t shape does not match y");
          const BitmaskView w{ptr<void>(values), ptr<uint8_t>(mask), ptr<int64_t>(row_offsets), rows, cols, stride, nnz};
          const KernelTable& t = table(isa);
          {
            py::gil_scoped_release release;
            t.act_sparse_bitmask(w, threshold, io);
          }
          return flagged_rows(io);
        },
        py::arg("values"), py::arg("mask"), py::arg("row_offsets"), py::arg("rows"), py::arg("cols"), py::arg("stride"),
        py::arg("nnz"), py::arg("threshold"), SF_IO_NAMES);

  // ---- decompression: rows [row0, row1) of a (validated) weight into out, row stride ld ----
#define SF_DEC_ARGS int dtype, int64_t row0, int64_t row1, uintptr_t out, int64_t ld, int threads, const std::string& isa
#define SF_DEC_NAMES py::arg("dtype"), py::arg("row0"), py::arg("row1"), py::arg("out"), py::arg("ld"), \
                     py::arg("threads"), py::arg("isa") = ""
  m.def("bitmask_decompress",
        [](uintptr_t values, uintptr_t mask, uintptr_t row_offsets, int64_t rows, int64_t cols, int64_t stride, int64_t nnz,
           SF_DEC_ARGS, int64_t col0, int64_t col1, uintptr_t cursor) {
          const DecompressIO d = make_decompress(dtype, rows, cols, row0, row1, out, ld, threads, "bitmask_decompress",
                                                 col0, col1, cursor);
          const BitmaskView w{ptr<void>(values), ptr<uint8_t>(mask), ptr<int64_t>(row_offsets), rows, cols, stride, nnz};
          const KernelTable& t = table(isa);
          py::gil_scoped_release release;
          t.bitmask_decompress(w, d);
        },
        py::arg("values"), py::arg("mask"), py::arg("row_offsets"), py::arg("rows"), py::arg("cols"), py::arg("stride"),
        py::arg("nnz"), SF_DEC_NAMES, py::arg("col0") = 0, py::arg("col1") = -1, py::arg("cursor") = 0);
  m.def("csr_decompress",
        [](uintptr_t values, uintptr_t col, int bits, uintptr_t row_ptr, int64_t rows, int64_t cols, int64_t nnz,
           SF_DEC_ARGS) {
          const DecompressIO d = make_decompress(dtype, rows, cols, row0, row1, out, ld, threads, "csr_decompress");
          const CsrView w{ptr<void>(values), ptr<void>(col), ptr<int64_t>(row_ptr), rows, cols, nnz, bits};
          const KernelTable& t = table(isa);
          py::gil_scoped_release release;
          t.csr_decompress(w, d);
        },
        py::arg("values"), py::arg("col"), py::arg("bits"), py::arg("row_ptr"), py::arg("rows"), py::arg("cols"),
        py::arg("nnz"), SF_DEC_NAMES);
  m.def("bsr_decompress",
        [](uintptr_t values, uintptr_t col, uintptr_t row_ptr, int64_t rows, int64_t cols, int64_t bm, int64_t bk,
           int64_t nblocks, SF_DEC_ARGS) {
          const DecompressIO d = make_decompress(dtype, rows, cols, row0, row1, out, ld, threads, "bsr_decompress");
          const BsrView w{ptr<void>(values), ptr<int32_t>(col), ptr<int64_t>(row_ptr), rows, cols, bm, bk, nblocks};
          const KernelTable& t = table(isa);
          py::gil_scoped_release release;
          t.bsr_decompress(w, d);
        },
        py::arg("values"), py::arg("col"), py::arg("row_ptr"), py::arg("rows"), py::arg("cols"), py::arg("bm"),
        py::arg("bk"), py::arg("nblocks"), SF_DEC_NAMES);
  m.def("nm_decompress",
        [](uintptr_t values, uintptr_t index, int64_t rows, int64_t cols, int64_t n, int64_t mm, int64_t stride,
           SF_DEC_ARGS) {
          const DecompressIO d = make_decompress(dtype, rows, cols, row0, row1, out, ld, threads, "nm_decompress");
          const NMView w{ptr<void>(values), ptr<uint8_t>(index), rows, cols, n, mm, stride};
          const KernelTable& t = table(isa);
          py::gil_scoped_release release;
          t.nm_decompress(w, d);
        },
        py::arg("values"), py::arg("index"), py::arg("rows"), py::arg("cols"), py::arg("n"), py::arg("m"),
        py::arg("stride"), SF_DEC_NAMES);

  m.def("act_sparse_batch_rows",
        [](int dtype, const std::string& isa) {
          if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
          return table(isa).act_sparse_batch_rows(static_cast<DType>(dtype));
        },
        py::arg("dtype"), py::arg("isa") = "",
        "rows of x from which act_sparse_* run one GEMM for the batch (0: never)");

  m.def("set_act_batch_gemm",
        [](const std::string& mode) {
          const char* names[] = {"auto", "zeros"};
          for (int i = 0; i < 2; ++i)
            if (mode == names[i]) return set_act_batch_gemm(static_cast<ActBatchGemm>(i));
          throw std::invalid_argument("act batch GEMM must be 'auto' or 'zeros', got '" + mode + "'");
        },
        py::arg("mode"),
        "which GEMM runs activation-sparse bf16 batches, process-wide: 'auto' (gemm_skip.h, which skips the "
        "inactive inputs) or 'zeros' (gemm_kn.h, which multiplies their zeros as dense does); for benchmarks");
  m.def("act_batch_gemm", [] {
    const char* names[] = {"auto", "zeros"};
    return std::string(names[static_cast<int>(act_batch_gemm())]);
  });

  m.def("zero_inactive",
        [](int dtype, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t out, int64_t ldo, uint32_t threshold_bits,
           int threads, const std::string& isa) {
          if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
          if (M < 0 || K < 0) throw std::invalid_argument("negative size");
          if ((M > 1 && (ldx < K || ldo < K)) || (M > 0 && K > 0 && (!x || !out)))
            throw std::invalid_argument("zero_inactive: bad row stride or null data pointer");
          const ThresholdIO a{static_cast<DType>(dtype), ptr<void>(x), reinterpret_cast<void*>(out), M, K, ldx, ldo,
                              threshold_bits, threads < 1 ? 1 : threads};
          const KernelTable& t = table(isa);
          py::gil_scoped_release release;
          t.zero_inactive(a);
        },
        py::arg("dtype"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("out"), py::arg("ldo"),
        py::arg("threshold_bits"), py::arg("threads"), py::arg("isa") = "");

  register_cuda(m);  // CUDA kernels when built with SPARSEFLOW_CUDA (a no-op otherwise)
}
