// Checks every index and pointer of a compressed weight once, when it is built or loaded, so that
// the kernels (which trust them) can never read out of bounds. Throws std::invalid_argument.
#pragma once
#include "cpu/kernels/args.h"

namespace sparseflow::cpu {
void validate_bitmask(const BitmaskView& w);
void validate_csr(const CsrView& w);
void validate_bsr(const BsrView& w);
void validate_nm(const NMView& w);
}  // namespace sparseflow::cpu
