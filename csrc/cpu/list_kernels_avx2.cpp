// The list kernels for AVX2 with FMA (x86-64-v3): 8 floats a register.
// Built with GCC on x86-64 only; scored_decode_attention.cpp runs them only on a CPU that
// has every feature named in the pragma (see list_kernels.h).

#include "list_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ADAPTIVE_KV_ISA_NAME "avx2"
#define ADAPTIVE_KV_LANES 8

namespace adaptive_kv {
namespace isa_avx2 {
namespace {
#include "list_kernels_body.h"
}  // namespace
}  // namespace isa_avx2
}  // namespace adaptive_kv

#pragma GCC pop_options

namespace adaptive_kv {
const ListKernels* list_kernels_avx2() {
  return &isa_avx2::kListKernels;
}
}  // namespace adaptive_kv

#else

namespace adaptive_kv {
const ListKernels* list_kernels_avx2() { return nullptr; }
}  // namespace adaptive_kv

#endif
