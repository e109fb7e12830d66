// The kernels one ISA level provides (each .cpp here is compiled once per level).
#pragma once
#include "cpu/kernels/common.h"
#include "cpu/kernels/table.h"

namespace sparseflow::cpu::SF_ISA {
void bitmask_linear(const BitmaskView& w, const LinearIO& io);
void csr_linear(const CsrView& w, const LinearIO& io);
void bsr_linear(const BsrView& w, const LinearIO& io);
void nm_linear(const NMView& w, const LinearIO& io);
void act_sparse_dense(const DenseView& w_t, float threshold, const LinearIO& io);
void act_sparse_bitmask(const BitmaskView& w_t, float threshold, const LinearIO& io);
void bitmask_decompress(const BitmaskView& w, const DecompressIO& d);
void csr_decompress(const CsrView& w, const DecompressIO& d);
void bsr_decompress(const BsrView& w, const DecompressIO& d);
void nm_decompress(const NMView& w, const DecompressIO& d);
void zero_inactive(const ThresholdIO& a);
int64_t act_sparse_batch_rows(DType t);
}  // namespace sparseflow::cpu::SF_ISA
