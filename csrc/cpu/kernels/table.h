// The per-ISA micro-kernel table: each ISA level compiles csrc/cpu/kernels/*.cpp once, in its own
// namespace, and exports one KernelTable. dispatch.cpp picks the table from cpuid.
#pragma once
#include "cpu/kernels/args.h"

namespace sparseflow::cpu {

struct KernelTable {
  const char* isa;
  void (*bitmask_linear)(const BitmaskView&, const LinearIO&);
  void (*csr_linear)(const CsrView&, const LinearIO&);
  void (*bsr_linear)(const BsrView&, const LinearIO&);
  void (*nm_linear)(const NMView&, const LinearIO&);
  // y = x @ w_t over the inputs with |x| > threshold (NaN and inf always count as active).
  void (*act_sparse_dense)(const DenseView& w_t, float threshold, const LinearIO&);
  void (*act_sparse_bitmask)(const BitmaskView& w_t, float threshold, const LinearIO&);
  // Dense rows of a compressed weight (the batched path decompresses into cache-sized chunks).
  void (*bitmask_decompress)(const BitmaskView&, const DecompressIO&);
  void (*csr_decompress)(const CsrView&, const DecompressIO&);
  void (*bsr_decompress)(const BsrView&, const DecompressIO&);
  void (*nm_decompress)(const NMView&, const DecompressIO&);
  // x with the inputs an activation-sparse product skips zeroed (its batched path's first step).
  void (*zero_inactive)(const ThresholdIO&);
  // Rows of x from which act_sparse_* run one GEMM for the whole batch in this dtype, instead of a
  // pass per row; 0 where they never do (the batched path then wins at prefill).
  int64_t (*act_sparse_batch_rows)(DType);
  // The largest share of active inputs at which such a batch of `rows` rows runs the GEMM that
  // skips the inactive ones (gemm_skip.h) instead of multiplying their zeros; 0: never.
};

namespace scalar { extern const KernelTable table; }
namespace avx2 { extern const KernelTable table; }
namespace avx512 { extern const KernelTable table; }

}  // namespace sparseflow::cpu
