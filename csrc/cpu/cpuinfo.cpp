#include "cpu/cpuinfo.h"

#include <atomic>

#include <cpuid.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace sparseflow::cpu {
namespace {

unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & bit_OSXSAVE;
  const unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;             // XMM and YMM state saved by the OS
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask and ZMM state
  f.fma = os_avx && (c & bit_FMA);
  f.f16c = os_avx && (c & bit_F16C);
  f.popcnt = c & bit_POPCNT;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = os_avx && (b & bit_AVX2);
  f.bmi2 = b & bit_BMI2;
  f.avx512f = os_avx512 && (b & bit_AVX512F);
  f.avx512bw = os_avx512 && (b & bit_AVX512BW);
  f.avx512vl = os_avx512 && (b & bit_AVX512VL);
  f.avx512dq = os_avx512 && (b & bit_AVX512DQ);
  f.avx512vbmi = os_avx512 && (c & bit_AVX512VBMI);
  f.avx512vbmi2 = os_avx512 && (c & bit_AVX512VBMI2);
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512bf16 = os_avx512 && (a & bit_AVX512BF16);

  unsigned brand[12] = {};
  if (__get_cpuid_max(0x80000000, nullptr) >= 0x80000004) {
    for (unsigned i = 0; i < 3; ++i)
      __get_cpuid(0x80000002 + i, &brand[4 * i], &brand[4 * i + 1], &brand[4 * i + 2], &brand[4 * i + 3]);
    char text[49] = {};
    std::memcpy(text, brand, 48);
    f.model = text;
    const auto first = f.model.find_first_not_of(' ');
    f.model = first == std::string::npos ? "" : f.model.substr(first);
  }
  return f;
}

bool supports(const CpuFeatures& f, Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2: return f.avx2 && f.fma && f.f16c && f.bmi2 && f.popcnt;
    // VBMI2 (16-bit expand) and VBMI (multishift) are what the bitmask and N:M kernels are built
    // around; BF16 dot products are used only where the CPU also has them (use_bf16_dot).
    case Isa::avx512:
      return supports(f, Isa::avx2) && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vbmi &&
             f.avx512vbmi2;
  }
  return false;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::scalar;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  throw std::invalid_argument("SPARSEFLOW_ISA='" + name + "' is not one of scalar, avx2, avx512");
}

Isa best_isa() {
  static const Isa best = [] {
    const auto& f = cpu_features();
    if (supports(f, Isa::avx512)) return Isa::avx512;
    if (supports(f, Isa::avx2)) return Isa::avx2;
    return Isa::scalar;
  }();
  return best;
}

bool use_bf16_dot() {
  const char* off = std::getenv("SPARSEFLOW_NO_BF16_DOT");
  return cpu_features().avx512bf16 && (off == nullptr || *off == '\0' || *off == '0');
}

namespace {
std::atomic<int> g_act_batch_gemm{0};
}
ActBatchGemm act_batch_gemm() { return static_cast<ActBatchGemm>(g_act_batch_gemm.load(std::memory_order_relaxed)); }
void set_act_batch_gemm(ActBatchGemm mode) { g_act_batch_gemm.store(static_cast<int>(mode), std::memory_order_relaxed); }

Isa active_isa() {
  const char* env = std::getenv("SPARSEFLOW_ISA");
  if (env == nullptr || *env == '\0') return best_isa();
  const Isa wanted = parse_isa(env);
  if (!supports(cpu_features(), wanted))
    throw std::invalid_argument(std::string("SPARSEFLOW_ISA=") + env + " but this CPU only supports up to " +
                                isa_name(best_isa()));
  return wanted;
}

}  // namespace sparseflow::cpu
