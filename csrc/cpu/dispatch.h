// Picks the kernel table of the ISA level in use (cpuid, lowered by SPARSEFLOW_ISA).
#pragma once
#include "cpu/kernels/table.h"

namespace sparseflow::cpu {
const KernelTable& kernels();  // re-reads SPARSEFLOW_ISA on each call, so tests can switch levels
const KernelTable& kernels_for(const char* isa);
}  // namespace sparseflow::cpu
