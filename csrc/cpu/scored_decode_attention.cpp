// Decode attention over per-head page lists that also adds each slot's attention to
// its score, in one pass over K and V (CPU).
//
// Why: vLLM's CPU attention kernel returns no probabilities, so FastGen's frequent-
// token heads (and H2O, SnapKV) used to gather every scored list's K pages a second
// time in torch, each decode step (the largest cost in the profile, docs/performance.md
// "Profile"). This kernel attends those lists itself: it walks each list's pages once,
// K block then V block (8 contiguous KiB a page at bs 32, D 64, bf16), keeping the
// output with an online softmax and every logit in a per-thread scratch row; at the
// end the logits become probabilities for the scores, which touch only slot_score.
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
// the pool's dtype, then scaled in float32; the softmax is float32 and the scores use
// the list's exact max and sum. Only the order of float32 additions differs (and the
// output's online rescaling), which the tests bound against the reference.
//
// Each list is written by one thread and appears once per call (one query token per
// request), so the score adds need no atomics.
//
// The per-list kernels themselves are in list_kernels_body.h, built once per ISA
// (list_kernels.h says why); this file checks the arguments, picks the ISA once, and
// hands the lists to the threads, longest first, each thread taking the next list as
// it finishes one (a static split of ragged lists leaves one thread idle while the other
// finishes its long ones).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "list_kernels.h"

// The pool dtypes the list kernels are built for (ListKernels' tables).
#define ADAPTIVE_KV_CASE_POOL_DTYPES(...)             \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)           \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)        \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)

namespace adaptive_kv {
namespace {

// --- which ISA's kernels run ------------------------------------------------------------

// The tables this build holds that this CPU can run, best first.
std::vector<const ListKernels*> runnable_kernels() {
  std::vector<const ListKernels*> tables;
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (list_kernels_avx512() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    tables.push_back(list_kernels_avx512());
  if (list_kernels_avx2() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    tables.push_back(list_kernels_avx2());
#endif
  tables.push_back(list_kernels_generic());
  return tables;
}

std::string isa_names(const std::vector<const ListKernels*>& tables) {
  std::string names;
  for (const ListKernels* t : tables) names += (names.empty() ? "" : ", ") + std::string(t->isa);
  return names;
}

const ListKernels* runnable_by_name(const std::string& name, const char* source) {
  for (const ListKernels* t : runnable_kernels())
    if (name == t->isa) return t;
  TORCH_CHECK(false, "adaptive_kv: ", source, " is '", name, "', which this CPU and build cannot run; allowed: ",
              isa_names(runnable_kernels()));
  return nullptr;
}

std::mutex isa_mutex;
std::atomic<const ListKernels*> current_kernels{nullptr};

// The table in use: VLLM_ADAPTIVE_KV_CPU_ISA when set, else the best one runnable.
const ListKernels& kernels() {
  const ListKernels* k = current_kernels.load(std::memory_order_acquire);
  if (k) return *k;
  std::lock_guard<std::mutex> lock(isa_mutex);
  k = current_kernels.load();
  if (!k) {
    const char* env = std::getenv("VLLM_ADAPTIVE_KV_CPU_ISA");
    k = env && *env ? runnable_by_name(env, "VLLM_ADAPTIVE_KV_CPU_ISA") : runnable_kernels().front();
    current_kernels.store(k, std::memory_order_release);
  }
  return *k;
}

// --- lists to threads -------------------------------------------------------------------

// fn(i) for every list i < n, on all threads: longest list first (pages = work), each
// thread taking the next as it finishes one. Per-thread buffers: no allocation once warm.
template <typename Fn>
void for_each_list(int64_t n, const int64_t* pages, const Fn& fn) {
  static thread_local std::vector<int64_t> order;
  order.resize(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return pages[x] > pages[y]; });
  std::atomic<int64_t> next{0};
  const int64_t* ids = order.data();
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(ids[i]);
  });
}

// Each list's page count, every page id checked against the pool before a kernel runs.
const int64_t* checked_pages(const char* op, const ListArgs& a, int64_t n, const int64_t* row, const int64_t* head,
                             const int32_t* table, const int32_t* lens) {
  static thread_local std::vector<int64_t> pages;
  pages.resize(n);
  const int64_t bs = a.block_size;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = row[i], h = head[i];
    const int64_t len = std::max<int64_t>(0, std::min<int64_t>(lens[r * a.lens_sr + h * a.lens_sh], a.width * bs));
    pages[i] = (len + bs - 1) / bs;
    const int32_t* ids = table + r * a.table_sr + h * a.table_sh;
    for (int64_t j = 0; j < pages[i]; ++j) {
      const int64_t p = ids[j * a.table_sw];
      TORCH_CHECK(p >= 0 && p < a.num_pages, op, ": list (row ", r, ", head ", h, ") holds ", len,
                  " slots but its page ", j, " is ", p, " (pool of ", a.num_pages, " pages)");
    }
  }
  return pages.data();
}

// --- argument checks --------------------------------------------------------------------

void check_index(const at::Tensor& x, const char* name, int64_t n) {
  TORCH_CHECK(x.dim() == 1 && x.numel() == n && x.scalar_type() == at::kLong && x.is_contiguous(),
              "adaptive_kv: ", name, " must be a contiguous [", n, "] int64 tensor, got ",
              x.sizes(), " ", x.scalar_type());
}

// Checks shared by the ops; the Args of a call. `op` names the op in the errors.
ListArgs checked_args(const char* op, const at::Tensor& q, const at::Tensor& table, const at::Tensor& lens,
                  const at::Tensor& q_pos, const at::Tensor& kv_pages, const at::Tensor& slot_pos,
                  const at::Tensor& slot_score, const at::Tensor& out, double scale) {
  const at::Tensor* all[] = {&q, &table, &lens, &q_pos, &kv_pages, &slot_pos, &slot_score, &out};
  const char* names[] = {"q", "table", "lens", "q_pos", "kv_pages", "slot_pos", "slot_score", "out"};
  for (int i = 0; i < 8; ++i)
    TORCH_CHECK(all[i]->device().is_cpu(), op, ": ", names[i], " must be on the CPU, got ", all[i]->device());
  TORCH_CHECK(kv_pages.dim() == 4 && kv_pages.size(1) == 2 && kv_pages.stride(3) == 1 &&
                  kv_pages.stride(2) == kv_pages.size(3),
              op, ": kv_pages must be [P, 2, bs, D] with contiguous blocks, got ", kv_pages.sizes(), " strides ",
              kv_pages.strides());
  const int64_t num_pages = kv_pages.size(0), bs = kv_pages.size(2), D = kv_pages.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == D && q.stride(2) == 1 && q.scalar_type() == kv_pages.scalar_type(), op,
              ": q must be [T, Hq, ", D, "] ", kv_pages.scalar_type(), " with a contiguous last dim, got ", q.sizes(),
              " ", q.scalar_type());
  const at::ScalarType dtype = kv_pages.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": kv_pages must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(out.sizes() == q.sizes() && out.stride(2) == 1 && out.scalar_type() == q.scalar_type(), op,
              ": out must match q (", q.sizes(), "), got ", out.sizes());
  TORCH_CHECK(table.dim() == 3 && table.scalar_type() == at::kInt, op, ": table must be [R, H, W] int32, got ",
              table.sizes(), " ", table.scalar_type());
  const int64_t num_heads = table.size(1);
  TORCH_CHECK(lens.dim() == 2 && lens.size(0) == table.size(0) && lens.size(1) == num_heads &&
                  lens.scalar_type() == at::kInt,
              op, ": lens must be [R, H] int32 like table, got ", lens.sizes());
  TORCH_CHECK(num_heads > 0 && q.size(1) % num_heads == 0, op, ": q has ", q.size(1),
              " query heads, not a multiple of the table's ", num_heads, " kv heads");
  TORCH_CHECK(q_pos.dim() == 1 && q_pos.numel() == q.size(0) && q_pos.scalar_type() == at::kInt &&
                  q_pos.is_contiguous(),
              op, ": q_pos must be a contiguous [T] int32 tensor, got ", q_pos.sizes());
  for (const at::Tensor* x : {&slot_pos, &slot_score})
    TORCH_CHECK(x->dim() == 2 && x->size(0) == num_pages && x->size(1) == bs && x->stride(1) == 1, op,
                ": slot_pos / slot_score must be [", num_pages, ", ", bs, "] with contiguous rows, got ", x->sizes());
  TORCH_CHECK(slot_pos.scalar_type() == at::kInt && slot_score.scalar_type() == at::kFloat, op,
              ": slot_pos must be int32 and slot_score float32");
  ListArgs a;
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
  return a;
}

// Each list's (row, head) in range, checked once here so the kernels can trust them.
void check_lists(const char* op, const at::Tensor& row, const at::Tensor& head, const at::Tensor& table, int64_t n) {
  check_index(row, "row", n);
  check_index(head, "head", n);
  const int64_t* rows = row.data_ptr<int64_t>();
  const int64_t* heads = head.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(rows[i] >= 0 && rows[i] < table.size(0) && heads[i] >= 0 && heads[i] < table.size(1), op, ": list ", i,
                " = (row ", rows[i], ", head ", heads[i], ") is out of range (R=", table.size(0), ", H=",
                table.size(1), ")");
}

}  // namespace

void scored_decode_attention(const at::Tensor& q, const at::Tensor& token, const at::Tensor& row,
                             const at::Tensor& head, const at::Tensor& table, const at::Tensor& lens,
                             const at::Tensor& q_pos, const at::Tensor& kv_pages, const at::Tensor& slot_pos,
                             at::Tensor& out, at::Tensor& slot_score, double scale) {
  const ListArgs a = checked_args("scored_decode_attention", q, table, lens, q_pos, kv_pages, slot_pos, slot_score, out,
                              scale);
  const int64_t n = token.numel();
  check_index(token, "token", n);
  check_lists("scored_decode_attention", row, head, table, n);
  const int64_t* tok = token.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(tok[i] >= 0 && tok[i] < q.size(0), "scored_decode_attention: list ", i, " = (token ", tok[i],
                ") is out of range (T=", q.size(0), ")");
  if (n == 0) return;
  const int64_t* rows = row.data_ptr<int64_t>();
  const int64_t* heads = head.data_ptr<int64_t>();
  AT_DISPATCH_SWITCH(q.scalar_type(), "scored_decode_attention", ADAPTIVE_KV_CASE_POOL_DTYPES([&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kv = kv_pages.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int32_t* tab = table.data_ptr<int32_t>();
    const int32_t* ln = lens.data_ptr<int32_t>();
    const int32_t* qpos = q_pos.data_ptr<int32_t>();
    const int32_t* spos = slot_pos.data_ptr<int32_t>();
    float* score = slot_score.data_ptr<float>();
    const int64_t* pages = checked_pages("scored_decode_attention", a, n, rows, heads, tab, ln);
    const AttendListFn<scalar_t> attend = kernels().of<scalar_t>().attend_list;
    for_each_list(n, pages, [&](int64_t i) { attend(a, i, qp, tok, rows, heads, tab, ln, qpos, kv, spos, o, score); });
  }));
}

void score_rows(const at::Tensor& q, const at::Tensor& first, const at::Tensor& count, const at::Tensor& row,
                const at::Tensor& head, const at::Tensor& table, const at::Tensor& lens, const at::Tensor& q_pos,
                const at::Tensor& kv_pages, const at::Tensor& slot_pos, at::Tensor& slot_score, double scale) {
  const ListArgs a = checked_args("score_rows", q, table, lens, q_pos, kv_pages, slot_pos, slot_score, q, scale);
  const int64_t n = first.numel();
  check_index(first, "first", n);
  check_index(count, "count", n);
  check_lists("score_rows", row, head, table, n);
  const int64_t* firsts = first.data_ptr<int64_t>();
  const int64_t* counts = count.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(firsts[i] >= 0 && counts[i] >= 0 && firsts[i] + counts[i] <= q.size(0), "score_rows: list ", i,
                " = tokens ", firsts[i], " .. ", firsts[i] + counts[i], " is out of range (T=", q.size(0), ")");
  if (n == 0) return;
  const int64_t* rows = row.data_ptr<int64_t>();
  const int64_t* heads = head.data_ptr<int64_t>();
  AT_DISPATCH_SWITCH(q.scalar_type(), "score_rows", ADAPTIVE_KV_CASE_POOL_DTYPES([&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kv = kv_pages.data_ptr<scalar_t>();
    const int32_t* tab = table.data_ptr<int32_t>();
    const int32_t* ln = lens.data_ptr<int32_t>();
    const int32_t* qpos = q_pos.data_ptr<int32_t>();
    const int32_t* spos = slot_pos.data_ptr<int32_t>();
    float* score = slot_score.data_ptr<float>();
    const int64_t* pages = checked_pages("score_rows", a, n, rows, heads, tab, ln);
    static thread_local std::vector<int64_t> work;  // pages x rows: what a list costs
    work.resize(n);
    for (int64_t i = 0; i < n; ++i) work[i] = pages[i] * counts[i];
    const ScoreListRowsFn<scalar_t> score_list = kernels().of<scalar_t>().score_list_rows;
    for_each_list(n, work.data(), [&](int64_t i) {
      score_list(a, i, qp, firsts, counts, rows, heads, tab, ln, qpos, kv, spos, score);
    });
  }));
}

// The ISA whose kernels run; `name` non-empty switches to it first (one this CPU and build
// can run: "avx512", "avx2" or "generic"). For tests and benchmarks of each build.
std::string cpu_isa(const std::string& name) {
  if (!name.empty()) {
    const ListKernels* k = runnable_by_name(name, "cpu_isa");
    std::lock_guard<std::mutex> lock(isa_mutex);
    current_kernels.store(k, std::memory_order_release);
  }
  return kernels().isa;
}

// The ISAs this CPU and build can run, best first, comma-separated.
std::string cpu_isas() {
  return isa_names(runnable_kernels());
}

TORCH_LIBRARY_FRAGMENT(adaptive_kv, m) {
  m.def("cpu_isa(str name=\"\") -> str", &cpu_isa);
  m.def("cpu_isas() -> str", &cpu_isas);
}

TORCH_LIBRARY_IMPL(adaptive_kv, CPU, m) {
  m.impl("scored_decode_attention", &scored_decode_attention);
  m.impl("score_rows", &score_rows);
}

}  // namespace adaptive_kv
