// compact_slots on the CPU: a compaction plan's slot moves (K row, V row, position,
// flags, score), one head list per task.
//
// Why: the torch reference (triton_kernels/compaction.py compact_slots_reference)
// gathers every source and scatters with advanced indexing into strided views of the
// whole pool; in the engine one decode re-eviction of 24 requests took seconds there
// (docs/performance.md, "Profile"). Here it is a loop over the moves.
//
//     src_slot, dst_slot [M, N] int64   physical slot ids page * bs + offset, moves j < num_moves[m]
//     num_moves          [M] int32
//     kv_pages           [P, 2, bs, D] contiguous blocks; K stored [D, bs] when k_transposed
//
// The planner's contract (compaction.py): a row's moves ascend, each destination lies
// before its source and is never a later move's source, rows touch disjoint slots. So
// moving one by one in order equals gathering every source first, and rows run in
// parallel.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace adaptive_kv {
namespace {

template <typename T>
void move_rows(const at::Tensor& src_slot, const at::Tensor& dst_slot, const at::Tensor& num_moves,
               at::Tensor& kv_pages, at::Tensor& slot_pos, at::Tensor& slot_flags, at::Tensor& slot_score,
               bool k_transposed) {
  const int64_t rows = src_slot.size(0), width = src_slot.size(1);
  const int64_t num_pages = kv_pages.size(0), bs = kv_pages.size(2), head_dim = kv_pages.size(3);
  const int64_t* src = src_slot.data_ptr<int64_t>();
  const int64_t* dst = dst_slot.data_ptr<int64_t>();
  const int32_t* count = num_moves.data_ptr<int32_t>();
  T* kv = kv_pages.data_ptr<T>();
  int32_t* pos = slot_pos.data_ptr<int32_t>();
  uint8_t* flags = slot_flags.data_ptr<uint8_t>();
  float* score = slot_score.data_ptr<float>();
  const int64_t kv_sp = kv_pages.stride(0), kv_sk = kv_pages.stride(1);
  const int64_t src_sr = src_slot.stride(0), src_sc = src_slot.stride(1);
  const int64_t dst_sr = dst_slot.stride(0), dst_sc = dst_slot.stride(1);
  const int64_t pos_sp = slot_pos.stride(0), flags_sp = slot_flags.stride(0), score_sp = slot_score.stride(0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t moves = std::min<int64_t>(count[m], width);
      for (int64_t j = 0; j < moves; ++j) {
        const int64_t from = src[m * src_sr + j * src_sc], to = dst[m * dst_sr + j * dst_sc];
        const int64_t from_page = from / bs, from_off = from % bs, to_page = to / bs, to_off = to % bs;
        TORCH_CHECK(from >= 0 && to >= 0 && from_page < num_pages && to_page < num_pages, "compact_slots: row ", m,
                    " move ", j, " is slot ", from, " -> ", to, ", outside the pool's ", num_pages, " pages of ", bs);
        T* from_k = kv + from_page * kv_sp;
        T* to_k = kv + to_page * kv_sp;
        if (k_transposed) {
          for (int64_t d = 0; d < head_dim; ++d) to_k[d * bs + to_off] = from_k[d * bs + from_off];
        } else {
          std::memmove(to_k + to_off * head_dim, from_k + from_off * head_dim, head_dim * sizeof(T));
        }
        std::memmove(to_k + kv_sk + to_off * head_dim, from_k + kv_sk + from_off * head_dim, head_dim * sizeof(T));
        pos[to_page * pos_sp + to_off] = pos[from_page * pos_sp + from_off];
        flags[to_page * flags_sp + to_off] = flags[from_page * flags_sp + from_off];
        score[to_page * score_sp + to_off] = score[from_page * score_sp + from_off];
      }
    }
  });
}

}  // namespace

void compact_slots(at::Tensor& kv_pages, at::Tensor& slot_pos, at::Tensor& slot_flags, at::Tensor& slot_score,
                   const at::Tensor& src_slot, const at::Tensor& dst_slot, const at::Tensor& num_moves,
                   bool k_transposed) {
  for (const at::Tensor* x : {static_cast<const at::Tensor*>(&kv_pages), static_cast<const at::Tensor*>(&slot_pos),
                              static_cast<const at::Tensor*>(&slot_flags), static_cast<const at::Tensor*>(&slot_score),
                              &src_slot, &dst_slot, &num_moves})
    TORCH_CHECK(x->device().is_cpu(), "compact_slots: every tensor must be on the CPU, got one on ", x->device());
  TORCH_CHECK(kv_pages.dim() == 4 && kv_pages.size(1) == 2 && kv_pages.stride(3) == 1 &&
                  kv_pages.stride(2) == kv_pages.size(3),
              "compact_slots: kv_pages must be [P, 2, bs, D] with contiguous blocks, got ", kv_pages.sizes());
  const int64_t num_pages = kv_pages.size(0), bs = kv_pages.size(2);
  const at::Tensor* meta[] = {&slot_pos, &slot_flags, &slot_score};
  const at::ScalarType types[] = {at::kInt, at::kByte, at::kFloat};
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK(meta[i]->dim() == 2 && meta[i]->size(0) == num_pages && meta[i]->size(1) == bs &&
                    meta[i]->stride(1) == 1 && meta[i]->scalar_type() == types[i],
                "compact_slots: slot_pos / slot_flags / slot_score must be [", num_pages, ", ", bs,
                "] int32 / uint8 / float32 with contiguous rows, got ", meta[i]->sizes(), " ", meta[i]->scalar_type());
  TORCH_CHECK(src_slot.dim() == 2 && src_slot.scalar_type() == at::kLong && dst_slot.sizes() == src_slot.sizes() &&
                  dst_slot.scalar_type() == at::kLong,
              "compact_slots: src_slot / dst_slot must be [M, N] int64 of one shape, got ", src_slot.sizes(), " and ",
              dst_slot.sizes());
  TORCH_CHECK(num_moves.dim() == 1 && num_moves.numel() == src_slot.size(0) && num_moves.is_contiguous() &&
                  num_moves.scalar_type() == at::kInt,
              "compact_slots: num_moves must be a contiguous [", src_slot.size(0), "] int32 tensor");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_pages.scalar_type(), "compact_slots", [&] {
    move_rows<scalar_t>(src_slot, dst_slot, num_moves, kv_pages, slot_pos, slot_flags, slot_score, k_transposed);
  });
}

TORCH_LIBRARY_IMPL(adaptive_kv, CPU, m) {
  m.impl("compact_slots", &compact_slots);
}

}  // namespace adaptive_kv
