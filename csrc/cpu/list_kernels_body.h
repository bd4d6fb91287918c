// The per-list kernels of scored_decode_attention and score_rows, for one instruction set.
//
// No include guard: each ISA file (list_kernels_avx512.cpp, _avx2.cpp, _generic.cpp)
// includes this inside its own namespace, under its own `#pragma GCC target`, after
// defining ADAPTIVE_KV_LANES (floats per register: 16, 8 or 4) and ADAPTIVE_KV_ISA_NAME,
// and including
// list_kernels.h and the standard headers used here (<algorithm>, <cmath>, <cstring>,
// <limits>, <vector>). It ends with `kListKernels`, the file's table.
//
// What the kernels compute, and the layout (see scored_decode_attention.cpp):
//
//     q      [T, Hq, D]        list n: rows token[n], heads head[n] * G .. + G
//     table  [R, H, W] int32   page j of list (row, head)               (a layer view)
//     lens   [R, H]    int32   slots held                               (a layer view)
//     kv     [P, 2, bs, D]     K block of a page stored [D, bs] (k_transposed), V [bs, D]
//     slot_pos [P, bs] int32   original position; slot s is visible iff s < len and
//                              slot_pos <= q_pos[token]
//     out    [T, Hq, D]        written for the list's G heads
//     slot_score [P, bs] fp32  += softmax probability summed over the G heads
//
// The op has checked every shape, index and page id before a kernel runs.

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// A float32 logit as the pool's dtype rounds it (round to nearest even), back in float32.
// bfloat16 by bit arithmetic (c10::BFloat16's rule, in a form the compiler vectorizes).
template <typename T>
inline float round_to_pool(float x) {
  return static_cast<float>(static_cast<T>(x));
}
template <>
inline float round_to_pool<float>(float x) {
  return x;
}
template <>
inline float round_to_pool<c10::BFloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  float y;
  std::memcpy(&y, &u, sizeof(y));
  return x != x ? x : y;  // NaN stays NaN
}

// exp(x) for x <= 0 (a logit minus a max), 0 for x < -87 and -inf. Cephes' expf: 2^n * e^r
// with |r| <= ln(2) / 2 and a degree-6 polynomial, about 1 ulp; written without calls
// so that loops over it vectorize (std::exp does not, without -ffast-math).
// e^r for the reduced argument, |r| <= ln(2) / 2: the polynomial, shared by the scalar
// and the vector form (V = float or Lanes; scalars broadcast in vector arithmetic).
template <typename V>
__attribute__((always_inline)) inline V exp_reduced(V r) {
  V p = V{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  return p * r * r + r + 1.0f;
}

inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  const float e = exp_reduced(r);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : e * scale;
}

// Per-thread scratch, grown on demand and kept: no allocation once warm.
struct Scratch {
  std::vector<float> q;        // [G, D]      the list's queries in float32
  std::vector<float> logits;   // [G, S]      logits, then exp(logit - the block's reference max)
  std::vector<float> ref_max;  // [G, pages]  the running max each block's exps are relative to
  std::vector<float> acc;      // [G, D]      output accumulator (online softmax)

  void reserve(int64_t group, int64_t head_dim, int64_t slots, int64_t pages) {
    q.resize(group * head_dim);
    logits.resize(std::max<int64_t>(1, group * slots));
    ref_max.resize(std::max<int64_t>(1, group * pages));
    acc.resize(group * head_dim);
  }
};

Scratch& thread_scratch() {
  static thread_local Scratch scratch;
  return scratch;
}

constexpr int64_t LANES = ADAPTIVE_KV_LANES;  // floats of a register-sized chunk (set by the ISA file)
constexpr int MAX_GROUP = 8;   // query heads per kv head handled together (more: one at a time)

// Pages are scattered over the pool: fetch the next one while this one is computed.
inline void prefetch_page(const void* block, int64_t bytes) {
  const char* p = static_cast<const char*>(block);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 1);
}

// A register-sized chunk of LANES floats as a GCC vector: one zmm, ymm or xmm in the
// AVX-512, AVX2 and baseline builds. Loads convert from the pool's dtype; explicit vectors
// keep the conversion in registers (auto-vectorized, it went through the stack and
// stalled on store forwarding).
typedef float Lanes __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t LanesU32 __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t LanesU16 __attribute__((vector_size(LANES * sizeof(uint16_t))));

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Lanes load_lanes(const c10::BFloat16* p) {  // bfloat16 -> float32: the bits, shifted up
  LanesU16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  const LanesU32 bits = __builtin_convertvector(raw, LanesU32) << 16;
  Lanes v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
template <typename T>
inline Lanes load_lanes(const T* p) {  // other dtypes (float16): element by element
  float tmp[LANES];
  for (int64_t i = 0; i < LANES; ++i) tmp[i] = to_float(p[i]);
  return load_lanes(tmp);
}
inline void store_lanes(float* p, Lanes v) {
  std::memcpy(p, &v, sizeof(v));
}
inline float sum_lanes(Lanes v) {  // lane 0 first, as a loop over the lanes would
  float sum = 0.f;
  for (int64_t i = 0; i < LANES; ++i) sum += v[i];
  return sum;
}

typedef int32_t LanesI32 __attribute__((vector_size(LANES * sizeof(int32_t))));

// exp_nonpositive on a register-sized chunk, step for step (floor included: truncate,
// then step down where truncation rounded up), so each lane equals the scalar result
// (up to FMA contraction, which the ISA may apply to either).
// Written with vector types because GCC left the scalar form unvectorized (the
// profile showed exp_shifted's scalar loop as a quarter of score_rows' time).
__attribute__((always_inline)) inline Lanes exp_nonpositive(Lanes x) {
  const Lanes zero = {}, lowest = zero - 87.0f;
  const Lanes clamped = x < lowest ? lowest : x;
  const Lanes t = clamped * 1.44269504088896341f + 0.5f;
  Lanes n = __builtin_convertvector(__builtin_convertvector(t, LanesI32), Lanes);
  n = n > t ? n - 1.0f : n;
  const Lanes r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  const Lanes e = exp_reduced(r);
  const LanesI32 bits = (__builtin_convertvector(n, LanesI32) + 127) << 23;
  Lanes scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lowest ? zero : e * scale;
}

// logits[g * stride + s] = sum_d q[g * D + d] * k[d * bs + s] for the G queries and the
// bs slots of a K block stored [D, bs]: each K element is converted once and used G times,
// LANES slots per register.
template <typename T, int G>
void block_dots(const float* q, const T* k, int64_t head_dim, int64_t bs, float* logits,
                                   int64_t stride) {
  int64_t s0 = 0;
  for (; s0 + LANES <= bs; s0 += LANES) {
    Lanes acc[G] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const Lanes kd = load_lanes(k + d * bs + s0);
      for (int g = 0; g < G; ++g) acc[g] += q[g * head_dim + d] * kd;
    }
    for (int g = 0; g < G; ++g) store_lanes(logits + g * stride + s0, acc[g]);
  }
  for (int64_t s = s0; s < bs; ++s)
    for (int g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) acc += q[g * head_dim + d] * to_float(k[d * bs + s]);
      logits[g * stride + s] = acc;
    }
}

// Scaled, masked logits of one block in place: slot s is visible iff s < valid and
// pos[s] <= q_pos. Returns the block's largest logit (-inf when none is visible).
// Register-sized chunks with a fixed trip count: a loop over bs itself gets peeled for
// alignment, and at bs = 32 the scalar peel is most of the work.
template <typename T>
float mask_logits(float* logits, const int32_t* pos, int64_t bs, int64_t valid, int32_t q_pos,
                                     float scale) {
  float best[LANES];
  for (int64_t i = 0; i < LANES; ++i) best[i] = NEG_INF;
  int64_t s0 = 0;
  for (; s0 + LANES <= bs; s0 += LANES) {
#pragma omp simd
    for (int64_t i = 0; i < LANES; ++i) {
      const int64_t s = s0 + i;
      const bool visible = s < valid && pos[s] <= q_pos;
      const float logit = visible ? round_to_pool<T>(logits[s]) * scale : NEG_INF;
      logits[s] = logit;
      best[i] = std::max(best[i], logit);
    }
  }
  float result = NEG_INF;
  for (int64_t i = 0; i < LANES; ++i) result = std::max(result, best[i]);
  for (int64_t s = s0; s < bs; ++s) {
    const bool visible = s < valid && pos[s] <= q_pos;
    logits[s] = visible ? round_to_pool<T>(logits[s]) * scale : NEG_INF;
    result = std::max(result, logits[s]);
  }
  return result;
}

// x[s] = exp(x[s] - max), s < n, in place; returns their sum (invisible slots: exact 0).
// Register-sized chunks, as in mask_logits.
float exp_shifted(float* x, int64_t n, float max) {
  Lanes sums = {};
  int64_t s0 = 0;
  for (; s0 + LANES <= n; s0 += LANES) {
    const Lanes e = exp_nonpositive(load_lanes(x + s0) - max);
    store_lanes(x + s0, e);
    sums += e;
  }
  float sum = sum_lanes(sums);
  for (int64_t s = s0; s < n; ++s) {
    x[s] = exp_nonpositive(x[s] - max);
    sum += x[s];
  }
  return sum;
}

// acc[g * D + d] += sum_s p[g * stride + s] * v[s * D + d], s < valid: the block's
// probabilities times its V rows ([bs, D]) for the G heads; each V element is converted
// once and used G times. A slot no head sees is skipped: a slot past the list may hold
// anything (NaN included).
template <typename T, int G>
void block_weighted_sum(const float* p, int64_t stride, const T* v, int64_t valid,
                                           int64_t head_dim, float* acc) {
  int64_t d0 = 0;
  for (; d0 + LANES <= head_dim; d0 += LANES) {
    Lanes sum[G];
    for (int g = 0; g < G; ++g) sum[g] = load_lanes(acc + g * head_dim + d0);
    for (int64_t s = 0; s < valid; ++s) {
      bool seen = false;
      for (int g = 0; g < G; ++g) seen |= p[g * stride + s] != 0.f;
      if (!seen) continue;
      const Lanes vs = load_lanes(v + s * head_dim + d0);
      for (int g = 0; g < G; ++g) sum[g] += p[g * stride + s] * vs;
    }
    for (int g = 0; g < G; ++g) store_lanes(acc + g * head_dim + d0, sum[g]);
  }
  for (int64_t d = d0; d < head_dim; ++d)
    for (int64_t s = 0; s < valid; ++s)
      for (int g = 0; g < G; ++g)
        if (p[g * stride + s] != 0.f) acc[g * head_dim + d] += p[g * stride + s] * to_float(v[s * head_dim + d]);
}

// score[s] += sum_g factor[g] * e[g * stride + s], s < valid: one block's probabilities
// (its exps times exp(reference max - final max) / sum) summed over the group
void add_block_scores(float* score, const float* e, int64_t stride, const float* factor,
                                         int64_t group, int64_t valid) {
  int64_t s0 = 0;
  for (; s0 + LANES <= valid; s0 += LANES) {
    float col[LANES] = {};
    for (int64_t g = 0; g < group; ++g) {
      const float f = factor[g];
      const float* eg = e + g * stride + s0;
#pragma omp simd
      for (int64_t i = 0; i < LANES; ++i) col[i] += f * eg[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < LANES; ++i) score[s0 + i] += col[i];
  }
  for (int64_t s = s0; s < valid; ++s) {
    float col = 0.f;
    for (int64_t g = 0; g < group; ++g) col += factor[g] * e[g * stride + s];
    score[s] += col;
  }
}

// Heads g0 .. g0 + G of one list: logits (kept), online softmax of the output, scores.
// The list's pages are walked once, K block then V block (adjacent in a page).
template <typename T, int G>
void attend_heads(const ListArgs& a, Scratch& w, int64_t g0, const T* kv, const int32_t* slot_pos,
                  const int32_t* page_ids, int64_t pages, int64_t len, int32_t q_pos, float* slot_score) {
  const int64_t D = a.head_dim, bs = a.block_size, S = pages * bs;
  const float* q = w.q.data() + g0 * D;
  float* logits = w.logits.data() + g0 * S;
  float* ref_max = w.ref_max.data() + g0 * pages;
  float* acc = w.acc.data() + g0 * D;
  float running_max[G], running_sum[G];
  for (int g = 0; g < G; ++g) running_max[g] = NEG_INF, running_sum[g] = 0.f;
  const int64_t block_bytes = bs * D * static_cast<int64_t>(sizeof(T));  // a K or a V block
  for (int64_t j = 0; j < pages; ++j) {
    const int64_t p = page_ids[j * a.table_sw];
    const T* block = kv + p * a.kv_sp;
    const T* next = j + 1 < pages ? kv + page_ids[(j + 1) * a.table_sw] * a.kv_sp : nullptr;
    // the next page's K block now, its V block before this page's V: all 128 lines of a
    // page at once filled the miss buffers and stalled the loop (27% of it on AVX2)
    if (next) prefetch_page(next, block_bytes);
    const int64_t first = j * bs, valid = std::min(bs, len - first);
    block_dots<T, G>(q, block, D, bs, logits + first, S);
    for (int g = 0; g < G; ++g) {
      float* row = logits + g * S + first;
      const float block_max = mask_logits<T>(row, slot_pos + p * a.pos_sp, bs, valid, q_pos, a.scale);
      if (block_max == NEG_INF) {  // nothing visible to this head here
        std::fill(row, row + bs, 0.f);
        ref_max[g * pages + j] = NEG_INF;
        continue;
      }
      const float new_max = std::max(running_max[g], block_max);
      if (new_max > running_max[g] && running_max[g] != NEG_INF) {  // rescale what came before
        const float alpha = exp_nonpositive(running_max[g] - new_max);
        for (int64_t d = 0; d < D; ++d) acc[g * D + d] *= alpha;
        running_sum[g] *= alpha;
      }
      running_max[g] = new_max;
      ref_max[g * pages + j] = new_max;
      running_sum[g] += exp_shifted(row, valid, new_max);
      std::fill(row + valid, row + bs, 0.f);
    }
    if (next) prefetch_page(next + a.kv_sk, block_bytes);
    block_weighted_sum<T, G>(logits + first, S, block + a.kv_sk, valid, D, acc);
  }
  // scores: the block's exps times exp(its reference max - the final max) / the sum
  float factor[G];
  for (int64_t j = 0; j < pages; ++j) {
    for (int g = 0; g < G; ++g)
      factor[g] = ref_max[g * pages + j] == NEG_INF
                      ? 0.f
                      : exp_nonpositive(ref_max[g * pages + j] - running_max[g]) / running_sum[g];
    add_block_scores(slot_score + page_ids[j * a.table_sw] * a.score_sp, logits + j * bs, S, factor, G,
                     std::min(bs, len - j * bs));
  }
  for (int g = 0; g < G; ++g) {  // a head that saw nothing keeps zeros, like the reference
    const float inv = running_sum[g] > 0.f ? 1.f / running_sum[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) acc[g * D + d] *= inv;
  }
}

template <typename T>
void attend_heads_dispatch(int group, const ListArgs& a, Scratch& w, int64_t g0, const T* kv, const int32_t* slot_pos,
                           const int32_t* page_ids, int64_t pages, int64_t len, int32_t q_pos, float* slot_score) {
  switch (group) {
#define ADAPTIVE_KV_GROUP(N) \
  case N:                    \
    return attend_heads<T, N>(a, w, g0, kv, slot_pos, page_ids, pages, len, q_pos, slot_score);
    ADAPTIVE_KV_GROUP(1)
    ADAPTIVE_KV_GROUP(2)
    ADAPTIVE_KV_GROUP(3)
    ADAPTIVE_KV_GROUP(4)
    ADAPTIVE_KV_GROUP(5)
    ADAPTIVE_KV_GROUP(6)
    ADAPTIVE_KV_GROUP(7)
    ADAPTIVE_KV_GROUP(8)
#undef ADAPTIVE_KV_GROUP
    default:  // unreachable: callers pass 1 .. MAX_GROUP
      return;
  }
}

// Attention and scores of list n.
template <typename T>
void attend_list(const ListArgs& a, int64_t n, const T* q, const int64_t* token, const int64_t* row,
                 const int64_t* head, const int32_t* table, const int32_t* lens, const int32_t* q_pos,
                 const T* kv, const int32_t* slot_pos, T* out, float* slot_score) {
  const int64_t G = a.group, D = a.head_dim, bs = a.block_size;
  const int64_t t = token[n], r = row[n], h = head[n];
  int64_t len = lens[r * a.lens_sr + h * a.lens_sh];
  len = std::max<int64_t>(0, std::min(len, a.width * bs));
  const int64_t pages = (len + bs - 1) / bs;
  const int32_t* page_ids = table + r * a.table_sr + h * a.table_sh;
  Scratch& w = thread_scratch();
  w.reserve(G, D, pages * bs, pages);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) w.q[g * D + d] = to_float(q[t * a.q_st + (h * G + g) * a.q_sh + d]);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  for (int64_t g0 = 0; g0 < G; g0 += MAX_GROUP)  // one pass for up to MAX_GROUP heads
    attend_heads_dispatch<T>(static_cast<int>(std::min<int64_t>(MAX_GROUP, G - g0)), a, w, g0, kv, slot_pos,
                             page_ids, pages, len, q_pos[t], slot_score);
  for (int64_t g = 0; g < G; ++g) {
    T* o = out + t * a.out_st + (h * G + g) * a.out_sh;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(w.acc[g * D + d]);
  }
}

// logits[i, :] for `rows` query rows (back to back, head_dim floats each) against one K
// block: block_dots for up to MAX_GROUP rows at a time.
template <typename T>
void token_block_dots(int64_t rows, const float* q, const T* block, int64_t head_dim, int64_t bs, float* logits,
                      int64_t stride) {
  for (int64_t g0 = 0; g0 < rows; g0 += MAX_GROUP) {
    const float* qg = q + g0 * head_dim;
    float* out = logits + g0 * stride;
    switch (std::min<int64_t>(MAX_GROUP, rows - g0)) {
#define ADAPTIVE_KV_DOTS(N) \
  case N:                   \
    block_dots<T, N>(qg, block, head_dim, bs, out, stride); \
    break;
      ADAPTIVE_KV_DOTS(1)
      ADAPTIVE_KV_DOTS(2)
      ADAPTIVE_KV_DOTS(3)
      ADAPTIVE_KV_DOTS(4)
      ADAPTIVE_KV_DOTS(5)
      ADAPTIVE_KV_DOTS(6)
      ADAPTIVE_KV_DOTS(7)
      ADAPTIVE_KV_DOTS(8)
#undef ADAPTIVE_KV_DOTS
    }
  }
}

// Scores of the observation rows of list n: tokens first[n] .. first[n] + count[n] - 1
// of one request, each with its G query heads, over the list (row[n], head[n]). Float32
// logits (the reference's rule for multi-token rows: no rounding to the pool's dtype),
// causal by position; every row's softmax summed into the slots' scores. The output is
// vLLM's kernel's business: this only scores.
template <typename T>
void score_list_rows(const ListArgs& a, int64_t n, const T* q, const int64_t* first, const int64_t* count,
                     const int64_t* row, const int64_t* head, const int32_t* table, const int32_t* lens,
                     const int32_t* q_pos, const T* kv, const int32_t* slot_pos, float* slot_score) {
  const int64_t G = a.group, D = a.head_dim, bs = a.block_size;
  const int64_t r = row[n], h = head[n], t0 = first[n], tokens = count[n];
  int64_t len = lens[r * a.lens_sr + h * a.lens_sh];
  len = std::max<int64_t>(0, std::min(len, a.width * bs));
  const int64_t pages = (len + bs - 1) / bs, S = pages * bs, rows = tokens * G;
  if (pages == 0 || tokens <= 0) return;
  const int32_t* page_ids = table + r * a.table_sr + h * a.table_sh;
  Scratch& w = thread_scratch();
  w.q.resize(rows * D);
  w.logits.resize(rows * S);
  w.ref_max.resize(2 * rows);  // per row: max, then the factor 1 / sum
  for (int64_t k = 0; k < tokens; ++k)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d)
        w.q[(k * G + g) * D + d] = to_float(q[(t0 + k) * a.q_st + (h * G + g) * a.q_sh + d]);
  float* row_max = w.ref_max.data();
  std::fill(row_max, row_max + rows, NEG_INF);
  for (int64_t j = 0; j < pages; ++j) {
    const int64_t p = page_ids[j * a.table_sw];
    if (j + 1 < pages) prefetch_page(kv + page_ids[(j + 1) * a.table_sw] * a.kv_sp, bs * D * sizeof(T));
    const T* block = kv + p * a.kv_sp;
    const int64_t valid = std::min(bs, len - j * bs);
    // Every row of every token against this block, MAX_GROUP rows per K load: the rows
    // are [tokens * G, D] back to back, so a tile may span tokens (3 heads a token made
    // each bf16 K conversion feed only 3 FMAs; a tile of 8 feeds 8).
    token_block_dots<T>(rows, w.q.data(), block, D, bs, w.logits.data() + j * bs, S);
    for (int64_t k = 0; k < tokens; ++k)
      for (int64_t g = 0; g < G; ++g) {
        float* logits = w.logits.data() + (k * G + g) * S + j * bs;
        row_max[k * G + g] = std::max(row_max[k * G + g], mask_logits<float>(logits, slot_pos + p * a.pos_sp, bs,
                                                                               valid, q_pos[t0 + k], a.scale));
      }
  }
  float* factor = w.ref_max.data() + rows;
  for (int64_t i = 0; i < rows; ++i) {  // a row that sees nothing adds nothing
    float* l = w.logits.data() + i * S;
    if (row_max[i] == NEG_INF) {
      std::fill(l, l + S, 0.f);
      factor[i] = 0.f;
      continue;
    }
    factor[i] = 1.f / exp_shifted(l, S, row_max[i]);
  }
  for (int64_t j = 0; j < pages; ++j)
    add_block_scores(slot_score + page_ids[j * a.table_sw] * a.score_sp, w.logits.data() + j * bs, S, factor, rows,
                     std::min(bs, len - j * bs));
}

// This ISA's table (scored_decode_attention.cpp picks one at run time): a constant, so
// that nothing compiled for this ISA runs before the op has checked the CPU.
constexpr ListKernels kListKernels = {
    ADAPTIVE_KV_ISA_NAME,
    {&attend_list<float>, &score_list_rows<float>},
    {&attend_list<c10::BFloat16>, &score_list_rows<c10::BFloat16>},
    {&attend_list<c10::Half>, &score_list_rows<c10::Half>},
};
