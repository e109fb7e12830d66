// Run-time CPU feature detection and the ISA level the kernels use.
#pragma once
#include <string>

namespace sparseflow::cpu {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, bmi2 = false, popcnt = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vbmi = false, avx512vbmi2 = false, avx512bf16 = false;
  std::string model;
};

const CpuFeatures& cpu_features();
const char* isa_name(Isa isa);
Isa best_isa();  // the highest level this CPU supports
// The level in use: best_isa(), or SPARSEFLOW_ISA when set (it may only lower the level; asking
// for a level this CPU lacks or an unknown name throws std::invalid_argument).
Isa active_isa();
Isa parse_isa(const std::string& name);
// Whether AVX-512 kernels may use BF16 dot products (vdpbf16ps): the CPU has them and
// SPARSEFLOW_NO_BF16_DOT is unset (tests set it to cover the conversion path too).
bool use_bf16_dot();

// Which GEMM runs an activation-sparse bf16 batch: the one that skips the inactive inputs
// (csrc/cpu/kernels/gemm_skip.h), or, forced for benchmarks, the one that multiplies their zeros.
enum class ActBatchGemm : int { automatic = 0, zeros = 1 };
ActBatchGemm act_batch_gemm();
void set_act_batch_gemm(ActBatchGemm mode);

}  // namespace sparseflow::cpu
