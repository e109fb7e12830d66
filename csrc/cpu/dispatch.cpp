#include "cpu/dispatch.h"

#include <stdexcept>
#include <string>

#include "cpu/cpuinfo.h"

namespace sparseflow::cpu {

static const KernelTable& table_of(Isa isa) {
  switch (isa) {
    case Isa::avx512: return avx512::table;
    case Isa::avx2: return avx2::table;
    default: return scalar::table;
  }
}

const KernelTable& kernels() { return table_of(active_isa()); }

const KernelTable& kernels_for(const char* isa) {
  const Isa wanted = parse_isa(isa);
  if (static_cast<int>(wanted) > static_cast<int>(best_isa()))
    throw std::invalid_argument(std::string("ISA ") + isa + " is not supported by this CPU");
  return table_of(wanted);
}

}  // namespace sparseflow::cpu
