// write_kv on the CPU: each (token, kv head)'s K and V rows and its slot metadata into
// the slot the step allocated for it, one call per layer.
//
// Why: the torch reference (triton_kernels/write_kv.py write_kv_reference) is a dozen
// indexing ops per layer with boolean masks, and showed at 10-23% of a decode step in
// the profile (docs/performance.md, "Profile"). Here it is one loop over T x H rows.
//
//     key, value    [T, H, D]    pool dtype, last dim contiguous
//     slot_mapping  [T, H] int64 physical slot page * bs + offset; -1 = skip
//     positions     [T] int32 -> slot_pos,  flags [T] uint8 -> slot_flags,  slot_score <- 0
//     kv_pages      [P, 2, bs, D] contiguous blocks; K stored [D, bs] when k_transposed

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace adaptive_kv {
namespace {

template <typename T>
void write_rows(const at::Tensor& key, const at::Tensor& value, const at::Tensor& slot_mapping,
                const at::Tensor& positions, const at::Tensor& flags, at::Tensor& kv_pages, at::Tensor& slot_pos,
                at::Tensor& slot_flags, at::Tensor& slot_score, bool k_transposed) {
  const int64_t num_tokens = key.size(0), num_heads = key.size(1), head_dim = key.size(2);
  const int64_t num_pages = kv_pages.size(0), bs = kv_pages.size(2);
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  const int64_t* map = slot_mapping.data_ptr<int64_t>();
  const int32_t* pos = positions.data_ptr<int32_t>();
  const uint8_t* flag = flags.data_ptr<uint8_t>();
  T* kv = kv_pages.data_ptr<T>();
  int32_t* spos = slot_pos.data_ptr<int32_t>();
  uint8_t* sflags = slot_flags.data_ptr<uint8_t>();
  float* score = slot_score.data_ptr<float>();
  const int64_t kv_sp = kv_pages.stride(0), kv_sk = kv_pages.stride(1);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t slot = map[t * slot_mapping.stride(0) + h * slot_mapping.stride(1)];
      if (slot < 0) continue;
      const int64_t page = slot / bs, offset = slot % bs;
      TORCH_CHECK(page < num_pages, "write_kv: token ", t, ", head ", h, " maps to slot ", slot, ", past the pool's ",
                  num_pages, " pages of ", bs);
      const T* krow = k + t * key.stride(0) + h * key.stride(1);
      const T* vrow = v + t * value.stride(0) + h * value.stride(1);
      T* k_block = kv + page * kv_sp;
      if (k_transposed) {
        for (int64_t d = 0; d < head_dim; ++d) k_block[d * bs + offset] = krow[d];
      } else {
        std::memcpy(k_block + offset * head_dim, krow, head_dim * sizeof(T));
      }
      std::memcpy(k_block + kv_sk + offset * head_dim, vrow, head_dim * sizeof(T));
      spos[page * slot_pos.stride(0) + offset] = pos[t];
      sflags[page * slot_flags.stride(0) + offset] = flag[t];
      score[page * slot_score.stride(0) + offset] = 0.f;
    }
  }
}

}  // namespace

void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& slot_mapping,
              const at::Tensor& positions, const at::Tensor& flags, at::Tensor& kv_pages, at::Tensor& slot_pos,
              at::Tensor& slot_flags, at::Tensor& slot_score, bool k_transposed) {
  for (const at::Tensor* x : {&key, &value, &slot_mapping, &positions, &flags, static_cast<const at::Tensor*>(&kv_pages),
                              static_cast<const at::Tensor*>(&slot_pos), static_cast<const at::Tensor*>(&slot_flags),
                              static_cast<const at::Tensor*>(&slot_score)})
    TORCH_CHECK(x->device().is_cpu(), "write_kv: every tensor must be on the CPU, got one on ", x->device());
  TORCH_CHECK(kv_pages.dim() == 4 && kv_pages.size(1) == 2 && kv_pages.stride(3) == 1 &&
                  kv_pages.stride(2) == kv_pages.size(3),
              "write_kv: kv_pages must be [P, 2, bs, D] with contiguous blocks, got ", kv_pages.sizes());
  const int64_t num_pages = kv_pages.size(0), bs = kv_pages.size(2), D = kv_pages.size(3);
  TORCH_CHECK(key.dim() == 3 && key.size(2) == D && key.stride(2) == 1 && key.scalar_type() == kv_pages.scalar_type(),
              "write_kv: key must be [T, H, ", D, "] ", kv_pages.scalar_type(), " with a contiguous last dim, got ",
              key.sizes(), " ", key.scalar_type());
  TORCH_CHECK(value.sizes() == key.sizes() && value.stride(2) == 1 && value.scalar_type() == key.scalar_type(),
              "write_kv: value must match key (", key.sizes(), "), got ", value.sizes());
  const int64_t T = key.size(0), H = key.size(1);
  TORCH_CHECK(slot_mapping.dim() == 2 && slot_mapping.size(0) == T && slot_mapping.size(1) == H &&
                  slot_mapping.scalar_type() == at::kLong,
              "write_kv: slot_mapping must be [", T, ", ", H, "] int64, got ", slot_mapping.sizes());
  TORCH_CHECK(positions.dim() == 1 && positions.numel() == T && positions.is_contiguous() &&
                  positions.scalar_type() == at::kInt,
              "write_kv: positions must be a contiguous [", T, "] int32 tensor");
  TORCH_CHECK(flags.dim() == 1 && flags.numel() == T && flags.is_contiguous() && flags.scalar_type() == at::kByte,
              "write_kv: flags must be a contiguous [", T, "] uint8 tensor");
  const at::Tensor* meta[] = {&slot_pos, &slot_flags, &slot_score};
  const at::ScalarType types[] = {at::kInt, at::kByte, at::kFloat};
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK(meta[i]->dim() == 2 && meta[i]->size(0) == num_pages && meta[i]->size(1) == bs &&
                    meta[i]->stride(1) == 1 && meta[i]->scalar_type() == types[i],
                "write_kv: slot_pos / slot_flags / slot_score must be [", num_pages, ", ", bs,
                "] int32 / uint8 / float32 with contiguous rows, got ", meta[i]->sizes(), " ", meta[i]->scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "write_kv", [&] {
    write_rows<scalar_t>(key, value, slot_mapping, positions, flags, kv_pages, slot_pos, slot_flags, slot_score,
                         k_transposed);
  });
}

TORCH_LIBRARY_IMPL(adaptive_kv, CPU, m) {
  m.impl("write_kv", &write_kv);
}

}  // namespace adaptive_kv
