// Hook for the CUDA entry points of sparseflow._C. csrc/binding.cpp includes this header and calls
// register_cuda(m) unconditionally: with SPARSEFLOW_WITH_CUDA (CMake option SPARSEFLOW_CUDA) the
// definition lives in csrc/cuda/binding_cuda.cpp; without it this no-op keeps the CPU build as is.
#pragma once

#include <pybind11/pybind11.h>

#ifdef SPARSEFLOW_WITH_CUDA
void register_cuda(pybind11::module_& m);
#else
inline void register_cuda(pybind11::module_&) {}
#endif
