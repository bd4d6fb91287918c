// The list kernels for AVX-512 (with FMA): 16 floats a register.
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#define ADAPTIVE_KV_ISA_NAME "avx512"
#define ADAPTIVE_KV_LANES 16

namespace adaptive_kv {
namespace isa_avx512 {
namespace {
#include "list_kernels_body.h"
}  // namespace
}  // namespace isa_avx512
}  // namespace adaptive_kv

#pragma GCC pop_options

namespace adaptive_kv {
const ListKernels* list_kernels_avx512() {
  return &isa_avx512::kListKernels;
}
}  // namespace adaptive_kv

#else

namespace adaptive_kv {
const ListKernels* list_kernels_avx512() { return nullptr; }
}  // namespace adaptive_kv

#endif
