// The list kernels for the baseline of the build (SSE2 on x86-64, NEON on aarch64): 4 floats a register.
// Always built: the fallback where no faster table runs (see list_kernels.h).

#include "list_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#define ADAPTIVE_KV_ISA_NAME "generic"
#define ADAPTIVE_KV_LANES 4

namespace adaptive_kv {
namespace isa_generic {
namespace {
#include "list_kernels_body.h"
}  // namespace
}  // namespace isa_generic

const ListKernels* list_kernels_generic() {
  return &isa_generic::kListKernels;
}

}  // namespace adaptive_kv
