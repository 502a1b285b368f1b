// Which copy of a CPU kernel runs. Hot loops are compiled twice, for the baseline ISA (setup.py builds for
// x86-64-v2, without AVX2 or FMA) and with __attribute__((target("avx2,fma"))), and picked at run time.
#pragma once

#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__)
#define NFK_X86_DISPATCH 1
#endif

namespace nfk {

// The AVX2+FMA copy where the CPU has both; NFKERNELS_NO_AVX2=1 forces the baseline copy (read on every call,
// so tests run both copies on an AVX2 machine).
inline bool use_avx2() {
#ifdef NFK_X86_DISPATCH
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok && std::getenv("NFKERNELS_NO_AVX2") == nullptr;
#else
  return false;
#endif
}

}  // namespace nfk
