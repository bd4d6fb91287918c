// Decode attention over per-head page lists that also adds each slot's attention to
// its score, in one pass over K and V (CPU).
//
// Why: vLLM's CPU attention kernel returns no probabilities, so FastGen's frequent-
// token heads (and H2O, SnapKV) used to gather every scored list's K pages a second
// time in torch, each decode step. This kernel does the attention of those lists
// itself and keeps the probabilities in a per-thread scratch row, so K and V are
// read once and the scores cost a few adds per slot.
//
// One *list* n is one (request row, kv head) of one layer with ONE query token
// (decode): its G query heads attend the list's first len slots
//
//     q      [T, Hq, D]        rows token[n], heads head[n] * G .. + G   (Hq = H * G)
//     table  [R, H, W] int32   page j of list (row, head)               (a layer view)
//     lens   [R, H]    int32   slots held                               (a layer view)
//     kv     [P, 2, bs, D]     K block of a page stored [D, bs] (k_transposed), V [bs, D]
//     slot_pos [P, bs] int32   original position; slot s is visible iff s < len and
//                              slot_pos <= q_pos[token]
//     out    [T, Hq, D]        written for the list's G heads
//     slot_score [P, bs] fp32  += softmax probability summed over the G heads
//
// Numerics follow the torch reference (triton_kernels/paged_attention.py list_probs
// with decode_logits_in_pool_dtype): each logit is a float32 dot product rounded to
// the pool's dtype, then scaled in float32; the softmax and the output are float32.
// Only the order of the float32 additions differs.
//
// Each list is written by one thread and appears once per call (one query token per
// request), so the score adds need no atomics.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace adaptive_kv {
namespace {

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// A float32 logit as the pool's dtype rounds it (round to nearest even), back in float32.
template <typename T>
inline float round_to_pool(float x) {
  return static_cast<float>(static_cast<T>(x));
}
template <>
inline float round_to_pool<float>(float x) {
  return x;
}

// Per-thread scratch, grown on demand and kept: no allocation once warm.
struct Scratch {
  std::vector<float> q;       // [G, D]   the list's queries in float32
  std::vector<float> page;    // [D, bs] or [bs, D] one K or V block in float32
  std::vector<float> logits;  // [G, S]   logits, then probabilities
  std::vector<float> acc;     // [G, D]   output accumulator

  void reserve(int64_t group, int64_t head_dim, int64_t block_size, int64_t slots) {
    q.resize(group * head_dim);
    page.resize(head_dim * block_size);
    logits.resize(std::max<int64_t>(1, group * slots));
    acc.resize(group * head_dim);
  }
};

Scratch& thread_scratch() {
  static thread_local Scratch scratch;
  return scratch;
}

struct Args {
  int64_t group, head_dim, block_size, width, num_pages;
  int64_t q_st, q_sh, out_st, out_sh;  // token / head strides of q and out
  int64_t table_sr, table_sh, table_sw, lens_sr, lens_sh;
  int64_t kv_sp, kv_sk;  // page and kind (K / V) strides of kv_pages
  int64_t pos_sp, score_sp;
  float scale;
};

// Hot loops are compiled for AVX-512, AVX2 and the baseline, picked at load time
// (GCC function multi-versioning), so one build runs well on every x86-64 machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ADAPTIVE_KV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADAPTIVE_KV_CLONES
#endif

constexpr int64_t LANES = 16;  // slots per register-sized chunk of a block

// dst[i] = float(src[i]), i < n
template <typename T>
ADAPTIVE_KV_CLONES void widen(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// out[s] = sum_d q[d] * k[d * bs + s], s < bs: one query against a K block stored [D, bs]
ADAPTIVE_KV_CLONES void block_dots(const float* q, const float* k, int64_t head_dim, int64_t bs, float* out) {
  int64_t s0 = 0;
  for (; s0 + LANES <= bs; s0 += LANES) {  // a chunk of slots stays in one register
    float acc[LANES] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const float qd = q[d];
      const float* krow = k + d * bs + s0;
#pragma omp simd
      for (int64_t i = 0; i < LANES; ++i) acc[i] += qd * krow[i];
    }
    for (int64_t i = 0; i < LANES; ++i) out[s0 + i] = acc[i];
  }
  for (int64_t s = s0; s < bs; ++s) {
    float acc = 0.f;
    for (int64_t d = 0; d < head_dim; ++d) acc += q[d] * k[d * bs + s];
    out[s] = acc;
  }
}

// acc[d] += p * v[d], d < n
ADAPTIVE_KV_CLONES void axpy(float p, const float* v, float* acc, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) acc[d] += p * v[d];
}

// logits[g, first_slot + s] of one page for the G queries, masked, and their running max.
template <typename T>
void page_logits(const Args& a, Scratch& w, const T* k_block, const int32_t* pos, int64_t first_slot,
                 int64_t len, int32_t q_pos, int64_t stride_logits, float* logits, float* row_max) {
  const int64_t bs = a.block_size, D = a.head_dim;
  widen(k_block, w.page.data(), D * bs);
  for (int64_t g = 0; g < a.group; ++g) {
    float* out = logits + g * stride_logits + first_slot;
    block_dots(w.q.data() + g * D, w.page.data(), D, bs, out);
    for (int64_t s = 0; s < bs; ++s) {
      const bool visible = first_slot + s < len && pos[s] <= q_pos;
      out[s] = visible ? round_to_pool<T>(out[s]) * a.scale : -std::numeric_limits<float>::infinity();
      row_max[g] = std::max(row_max[g], out[s]);
    }
  }
}

// Attention and scores of list n.
template <typename T>
void attend_list(const Args& a, int64_t n, const T* q, const int64_t* token, const int64_t* row,
                 const int64_t* head, const int32_t* table, const int32_t* lens, const int32_t* q_pos,
                 const T* kv, const int32_t* slot_pos, T* out, float* slot_score) {
  const int64_t G = a.group, D = a.head_dim, bs = a.block_size;
  const int64_t t = token[n], r = row[n], h = head[n];
  int64_t len = lens[r * a.lens_sr + h * a.lens_sh];
  len = std::max<int64_t>(0, std::min(len, a.width * bs));
  const int64_t pages = (len + bs - 1) / bs;
  const int32_t qp = q_pos[t];
  const int32_t* page_ids = table + r * a.table_sr + h * a.table_sh;

  Scratch& w = thread_scratch();
  w.reserve(G, D, bs, pages * bs);
  const int64_t S = pages * bs;  // stride of a head's logits row
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) w.q[g * D + d] = to_float(q[t * a.q_st + (h * G + g) * a.q_sh + d]);

  std::vector<float> row_max_buf;  // G is small: keep it on the stack when it fits
  float row_max_stack[16];
  float* row_max = row_max_stack;
  if (G > 16) {
    row_max_buf.resize(G);
    row_max = row_max_buf.data();
  }
  for (int64_t g = 0; g < G; ++g) row_max[g] = -std::numeric_limits<float>::infinity();

  auto page_of = [&](int64_t j) {
    const int64_t p = page_ids[j * a.table_sw];
    TORCH_CHECK(p >= 0 && p < a.num_pages, "scored_decode_attention: list (row ", r, ", head ", h,
                ") holds ", len, " slots but its page ", j, " is ", p, " (pool of ", a.num_pages, " pages)");
    return p;
  };
  for (int64_t j = 0; j < pages; ++j) {
    const int64_t p = page_of(j);
    page_logits<T>(a, w, kv + p * a.kv_sp, slot_pos + p * a.pos_sp, j * bs, len, qp, S, w.logits.data(),
                   row_max);
  }
  // softmax over the visible slots; a row that sees nothing stays all zeros
  for (int64_t g = 0; g < G; ++g) {
    float* l = w.logits.data() + g * S;
    if (row_max[g] == -std::numeric_limits<float>::infinity()) {
      std::fill(l, l + S, 0.f);
      continue;
    }
    float sum = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      l[s] = std::exp(l[s] - row_max[g]);
      sum += l[s];
    }
    for (int64_t s = 0; s < S; ++s) l[s] /= sum;
  }
  // output (V read once) and scores
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  for (int64_t j = 0; j < pages; ++j) {
    const int64_t p = page_ids[j * a.table_sw];
    const T* v_block = kv + p * a.kv_sp + a.kv_sk;
    float* vf = w.page.data();
    const int64_t valid = std::min(bs, len - j * bs);
    widen(v_block, vf, valid * D);
    float* score = slot_score + p * a.score_sp;
    for (int64_t s = 0; s < valid; ++s) {
      float col = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const float prob = w.logits[g * S + j * bs + s];
        col += prob;
        if (prob == 0.f) continue;  // invisible slots may hold NaN / Inf
        axpy(prob, vf + s * D, w.acc.data() + g * D, D);
      }
      score[s] += col;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    T* o = out + t * a.out_st + (h * G + g) * a.out_sh;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(w.acc[g * D + d]);
  }
}

void check_index(const at::Tensor& x, const char* name, int64_t n) {
  TORCH_CHECK(x.dim() == 1 && x.numel() == n && x.scalar_type() == at::kLong && x.is_contiguous(),
              "scored_decode_attention: ", name, " must be a contiguous [", n, "] int64 tensor, got ",
              x.sizes(), " ", x.scalar_type());
}

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "scored_decode_attention: ", name, " must be on the CPU, got ", x.device());
}

}  // namespace

void scored_decode_attention(const at::Tensor& q, const at::Tensor& token, const at::Tensor& row,
                             const at::Tensor& head, const at::Tensor& table, const at::Tensor& lens,
                             const at::Tensor& q_pos, const at::Tensor& kv_pages, const at::Tensor& slot_pos,
                             at::Tensor& out, at::Tensor& slot_score, double scale) {
  const at::Tensor* all[] = {&q, &token, &row, &head, &table, &lens, &q_pos, &kv_pages, &slot_pos, &out,
                             &slot_score};
  const char* names[] = {"q", "token", "row", "head", "table", "lens", "q_pos", "kv_pages", "slot_pos", "out",
                         "slot_score"};
  for (int i = 0; i < 11; ++i) check_cpu(*all[i], names[i]);
  TORCH_CHECK(kv_pages.dim() == 4 && kv_pages.size(1) == 2 && kv_pages.stride(3) == 1 &&
                  kv_pages.stride(2) == kv_pages.size(3),
              "scored_decode_attention: kv_pages must be [P, 2, bs, D] with contiguous blocks, got ",
              kv_pages.sizes(), " strides ", kv_pages.strides());
  const int64_t num_pages = kv_pages.size(0), bs = kv_pages.size(2), D = kv_pages.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == D && q.stride(2) == 1 && q.scalar_type() == kv_pages.scalar_type(),
              "scored_decode_attention: q must be [T, Hq, ", D, "] ", kv_pages.scalar_type(),
              " with a contiguous last dim, got ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes() && out.stride(2) == 1 && out.scalar_type() == q.scalar_type(),
              "scored_decode_attention: out must match q (", q.sizes(), "), got ", out.sizes());
  TORCH_CHECK(table.dim() == 3 && table.scalar_type() == at::kInt,
              "scored_decode_attention: table must be [R, H, W] int32, got ", table.sizes(), " ", table.scalar_type());
  const int64_t num_heads = table.size(1);
  TORCH_CHECK(lens.dim() == 2 && lens.size(0) == table.size(0) && lens.size(1) == num_heads &&
                  lens.scalar_type() == at::kInt,
              "scored_decode_attention: lens must be [R, H] int32 like table, got ", lens.sizes());
  TORCH_CHECK(num_heads > 0 && q.size(1) % num_heads == 0, "scored_decode_attention: q has ", q.size(1),
              " query heads, not a multiple of the table's ", num_heads, " kv heads");
  TORCH_CHECK(q_pos.dim() == 1 && q_pos.numel() == q.size(0) && q_pos.scalar_type() == at::kInt &&
                  q_pos.is_contiguous(),
              "scored_decode_attention: q_pos must be a contiguous [T] int32 tensor, got ", q_pos.sizes());
  for (const at::Tensor* x : {&slot_pos, static_cast<const at::Tensor*>(&slot_score)})
    TORCH_CHECK(x->dim() == 2 && x->size(0) == num_pages && x->size(1) == bs && x->stride(1) == 1,
                "scored_decode_attention: slot_pos / slot_score must be [", num_pages, ", ", bs,
                "] with contiguous rows, got ", x->sizes());
  TORCH_CHECK(slot_pos.scalar_type() == at::kInt && slot_score.scalar_type() == at::kFloat,
              "scored_decode_attention: slot_pos must be int32 and slot_score float32");
  const int64_t n = token.numel();
  check_index(token, "token", n);
  check_index(row, "row", n);
  check_index(head, "head", n);
  if (n == 0) return;

  Args a;
  a.group = q.size(1) / num_heads;
  a.head_dim = D;
  a.block_size = bs;
  a.width = table.size(2);
  a.num_pages = num_pages;
  a.q_st = q.stride(0), a.q_sh = q.stride(1), a.out_st = out.stride(0), a.out_sh = out.stride(1);
  a.table_sr = table.stride(0), a.table_sh = table.stride(1), a.table_sw = table.stride(2);
  a.lens_sr = lens.stride(0), a.lens_sh = lens.stride(1);
  a.kv_sp = kv_pages.stride(0), a.kv_sk = kv_pages.stride(1);
  a.pos_sp = slot_pos.stride(0), a.score_sp = slot_score.stride(0);
  a.scale = static_cast<float>(scale);
  // Bounds of the per-list indices, checked once here so the kernel can trust them.
  const int64_t* tok = token.data_ptr<int64_t>();
  const int64_t* rows = row.data_ptr<int64_t>();
  const int64_t* heads = head.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(tok[i] >= 0 && tok[i] < q.size(0) && rows[i] >= 0 && rows[i] < table.size(0) && heads[i] >= 0 &&
                    heads[i] < num_heads,
                "scored_decode_attention: list ", i, " = (token ", tok[i], ", row ", rows[i], ", head ", heads[i],
                ") is out of range (T=", q.size(0), ", R=", table.size(0), ", H=", num_heads, ")");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "scored_decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kv = kv_pages.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int32_t* tab = table.data_ptr<int32_t>();
    const int32_t* ln = lens.data_ptr<int32_t>();
    const int32_t* qpos = q_pos.data_ptr<int32_t>();
    const int32_t* spos = slot_pos.data_ptr<int32_t>();
    float* score = slot_score.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        attend_list<scalar_t>(a, i, qp, tok, rows, heads, tab, ln, qpos, kv, spos, o, score);
    });
  });
}

TORCH_LIBRARY_IMPL(adaptive_kv, CPU, m) {
  m.impl("scored_decode_attention", &scored_decode_attention);
}

}  // namespace adaptive_kv
