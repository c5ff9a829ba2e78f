// Constants, macros and CPU feature checks shared by the CPU kernels: the mask (self_guided_mask.cpp)
// and the attention over kept keys (kept_attention.cpp), and the files they name. Everything internal
// to the kernels lives in sma_kernels::cpu::detail, opened in each file as `namespace detail SMA_HIDDEN`.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

// The hot helpers are forced inline so that each loop is compiled inside its caller, and in
// particular inside the copies built for AVX2 + FMA (mask_scores.cpp, attention_blocks.cpp) and
// AVX-512 (attention_blocks.cpp).
#if defined(__GNUC__) || defined(__clang__)
#define SMA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SMA_ALWAYS_INLINE inline
#endif

// The internal symbols stay out of the library's exported ones (only the ops are exported), which also
// makes the calls between the files direct calls rather than calls through the PLT. The attribute
// covers the declarations of the namespace block that it is written on, so every block carries it.
#if defined(__GNUC__) || defined(__clang__)
#define SMA_HIDDEN __attribute__((visibility("hidden")))
#else
#define SMA_HIDDEN
#endif

// On x86-64 the hot loops are also compiled for AVX2 + FMA (the attention's also for AVX-512) with
// __attribute__((target)) and chosen at run time, so the build itself needs no -mavx2 and runs on any
// x86-64 CPU.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SMA_X86_DISPATCH 1
#endif

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

constexpr int64_t kTile = 64;  // tokens per tile: 8 AVX2 accumulators for the dot products
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#ifdef SMA_X86_DISPATCH
// The widest instruction set that the kernels may use: what the CPU supports (checked once; libgcc
// also checks that the OS saves the registers), capped by the environment variable
// SMA_KERNELS_CPU_ISA = "avx2" or "baseline" if set (read once, at the first call), so that each
// copy of the kernels can be run and tested on any machine.
enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::kBaseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = CpuIsa::kAvx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
        best = CpuIsa::kAvx512;
      }
    }
    const char* cap = std::getenv("SMA_KERNELS_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "baseline") == 0) {
      return CpuIsa::kBaseline;
    }
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == CpuIsa::kAvx512) {
      return CpuIsa::kAvx2;
    }
    return best;
  }();
  return isa;
}

inline bool has_avx2_fma() { return cpu_isa() >= CpuIsa::kAvx2; }

inline bool has_avx512() { return cpu_isa() >= CpuIsa::kAvx512; }
#endif

}  // namespace detail
}  // namespace sma_kernels::cpu
