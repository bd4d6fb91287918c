// The per-list attention kernels of scored_decode_attention and score_rows, built once per
// instruction set and picked at run time.
//
// Why one build per ISA: GCC's target_clones on the hot loops gave the AVX2 clone neither
// FMA (avx2 does not imply it) nor a register-sized vector (16-float chunks were split
// into halves through the stack): 2.9x vLLM's kernel per KV token on an AVX2-only EPYC.
// Each ISA file (list_kernels_avx512.cpp, _avx2.cpp, _generic.cpp) includes
// list_kernels_body.h under its own `#pragma GCC target` with its own vector width and
// exports a ListKernels table; scored_decode_attention.cpp checks the arguments, picks a
// table once (the best the CPU runs, or VLLM_ADAPTIVE_KV_CPU_ISA) and runs the lists.
//
// Nothing here includes ATen: a header compiled under an ISA pragma must not define
// inline functions that other files also define (the linker would keep one of them).

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace adaptive_kv {

// Shapes and strides of one call, checked by the op before any kernel runs.
struct ListArgs {
  int64_t group, head_dim, block_size, width, num_pages;
  int64_t q_st, q_sh, out_st, out_sh;  // token / head strides of q and out
  int64_t table_sr, table_sh, table_sw, lens_sr, lens_sh;
  int64_t kv_sp, kv_sk;  // page and kind (K / V) strides of kv_pages
  int64_t pos_sp, score_sp;
  float scale;
};

// List n of a call: attention of its decode query and its slots' scores (scored_decode_attention).
template <typename T>
using AttendListFn = void (*)(const ListArgs& a, int64_t n, const T* q, const int64_t* token, const int64_t* row,
                              const int64_t* head, const int32_t* table, const int32_t* lens, const int32_t* q_pos,
                              const T* kv, const int32_t* slot_pos, T* out, float* slot_score);

// List n of a call: the scores of its observation rows (score_rows).
template <typename T>
using ScoreListRowsFn = void (*)(const ListArgs& a, int64_t n, const T* q, const int64_t* first,
                                 const int64_t* count, const int64_t* row, const int64_t* head, const int32_t* table,
                                 const int32_t* lens, const int32_t* q_pos, const T* kv, const int32_t* slot_pos,
                                 float* slot_score);

template <typename T>
struct ListKernelsOf {
  AttendListFn<T> attend_list;
  ScoreListRowsFn<T> score_list_rows;
};

struct ListKernels {
  const char* isa;  // "avx512", "avx2" or "generic"
  ListKernelsOf<float> f32;
  ListKernelsOf<c10::BFloat16> bf16;
  ListKernelsOf<c10::Half> f16;

  template <typename T>
  const ListKernelsOf<T>& of() const;
};

template <>
inline const ListKernelsOf<float>& ListKernels::of<float>() const {
  return f32;
}
template <>
inline const ListKernelsOf<c10::BFloat16>& ListKernels::of<c10::BFloat16>() const {
  return bf16;
}
template <>
inline const ListKernelsOf<c10::Half>& ListKernels::of<c10::Half>() const {
  return f16;
}

// Each ISA's table; nullptr where that build is absent (not GCC on x86-64).
const ListKernels* list_kernels_avx512();
const ListKernels* list_kernels_avx2();
const ListKernels* list_kernels_generic();

}  // namespace adaptive_kv
