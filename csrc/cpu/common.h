// Constants and macros shared by the files of the CPU mask (self_guided_mask.cpp and the headers it
// names). Everything internal to the kernel lives in sma_kernels::cpu::detail, opened in each file as
// `namespace detail SMA_HIDDEN`.
#pragma once

#include <cstdint>
#include <limits>

// The hot helpers are forced inline so that each loop is compiled inside its caller, and in
// particular inside the AVX2 + FMA copies of steps 1 and 2 (mask_scores.cpp).
#if defined(__GNUC__) || defined(__clang__)
#define SMA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SMA_ALWAYS_INLINE inline
#endif

// The internal symbols stay out of the library's exported ones (only the op is exported), which also
// makes the calls between the files direct calls rather than calls through the PLT. The attribute
// covers the declarations of the namespace block that it is written on, so every block carries it.
#if defined(__GNUC__) || defined(__clang__)
#define SMA_HIDDEN __attribute__((visibility("hidden")))
#else
#define SMA_HIDDEN
#endif

// On x86-64 the hot loops are also compiled for AVX2 + FMA with __attribute__((target)) and chosen
// at run time, so the build itself needs no -mavx2 and runs on any x86-64 CPU.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SMA_X86_DISPATCH 1
#endif

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

constexpr int64_t kTile = 64;  // tokens per tile: 8 AVX2 accumulators for the dot products
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace detail
}  // namespace sma_kernels::cpu
