#include "cpu/kernels/kernels.h"

#define SF_STR2(x) #x
#define SF_STR(x) SF_STR2(x)

namespace sparseflow::cpu::SF_ISA {
extern const KernelTable table = {
    SF_STR(SF_ISA), bitmask_linear, csr_linear, bsr_linear, nm_linear, act_sparse_dense, act_sparse_bitmask,
    bitmask_decompress, csr_decompress, bsr_decompress, nm_decompress, zero_inactive, act_sparse_batch_rows,
};
}  // namespace sparseflow::cpu::SF_ISA
