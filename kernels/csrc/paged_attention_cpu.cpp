// Paged attention on the CPU: decodes and prompt chunks in one call, K/V read in place.
//
// Each work item is (sequence, KV head, tile of query tokens). It walks the sequence's cache
// blocks through its block-table row, converts one block of K (transposed) and V to float32
// in a thread-local scratch (the cache may be fp32, fp16 or bf16), and keeps a running
// (max, sum, accumulator) per query row: the flash-attention recurrence, so no score matrix
// over the whole context and no gathered copy of the cache ever exists. Masking is by index
// ranges (causal within the chunk, full over the prefix, sliding window), so no -inf is
// produced and -ffast-math is safe. Items are pulled from an atomic counter by torch's
// intra-op threads: sequences of unequal length still keep both cores busy.
//
// Contract (the torch references in kernels/paged_attention.py are the oracle):
//   out, query: [T, Hq, D] float32 (query's row stride may be anything, inner dims dense)
//   k_cache, v_cache: [num_blocks, block_size, Hkv, D], contiguous, float32/float16/bfloat16
//   block_tables: [S, max_blocks] int64 (row stride any); seq_lens: [S] int64, tokens in the
//   cache after this step; query_start_loc: [S + 1] int64 offsets of each sequence's queries.
//   Query j of sequence i sits at position seq_lens[i] - q_len + j; window w > 0 lets a query
//   at p see keys p - w + 1 .. p.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kVec = 16;       // floats per inner chunk: one zmm, or two ymm on AVX2
constexpr int64_t kRowsTile = 16;  // query rows (tokens x group heads) per work item

inline float load(const float* p) { return *p; }
inline float load(const at::BFloat16* p) {
  uint32_t bits = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
// fp16 -> fp32 with integer ops only, so the conversion loops vectorize on any AVX2 CPU:
// shift exponent and mantissa into place and rescale by 2^112 (exact for normals and
// subnormals); infinities and NaNs keep an all-ones exponent.
inline float load(const at::Half* p) {
  const uint32_t h = *reinterpret_cast<const uint16_t*>(p);
  const uint32_t em = h & 0x7fffu;
  uint32_t bits = em << 13;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  f *= 0x1p112f;
  std::memcpy(&bits, &f, sizeof(f));
  bits = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : bits;
  bits |= (h & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Item {
  int64_t seq, h_begin, h_end, q_begin, q_end;  // KV heads; q_* index the sequence's queries
};

struct Scratch {
  std::vector<float> q, kt, v, s, p, acc, m, l;
  void reserve(int64_t heads, int64_t rows, int64_t bsp, int64_t d) {
    q.resize(heads * rows * d); kt.resize(d * bsp); v.resize(bsp * d); s.resize(rows * bsp);
    p.resize(bsp); acc.resize(heads * rows * d); m.resize(heads * rows); l.resize(heads * rows);
  }
};

// scores s[r][0:bsp] = q[r] . K[0:bsp] from the transposed block kt[d][bsp]; four rows share
// each load of kt.
inline void scores(const float* q, const float* kt, float* s, int64_t rows, int64_t d, int64_t bsp) {
  for (int64_t c = 0; c < bsp; c += kVec) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      float a0[kVec] = {}, a1[kVec] = {}, a2[kVec] = {}, a3[kVec] = {};
      const float *q0 = q + r * d, *q1 = q0 + d, *q2 = q1 + d, *q3 = q2 + d;
      for (int64_t i = 0; i < d; ++i) {
        const float* k = kt + i * bsp + c;
#pragma omp simd
        for (int64_t j = 0; j < kVec; ++j) {
          a0[j] += q0[i] * k[j]; a1[j] += q1[i] * k[j];
          a2[j] += q2[i] * k[j]; a3[j] += q3[i] * k[j];
        }
      }
      std::memcpy(s + r * bsp + c, a0, sizeof(a0));
      std::memcpy(s + (r + 1) * bsp + c, a1, sizeof(a1));
      std::memcpy(s + (r + 2) * bsp + c, a2, sizeof(a2));
      std::memcpy(s + (r + 3) * bsp + c, a3, sizeof(a3));
    }
    for (; r < rows; ++r) {
      float a[kVec] = {};
      const float* qr = q + r * d;
      for (int64_t i = 0; i < d; ++i) {
        const float* k = kt + i * bsp + c;
#pragma omp simd
        for (int64_t j = 0; j < kVec; ++j) a[j] += qr[i] * k[j];
      }
      std::memcpy(s + r * bsp + c, a, sizeof(a));
    }
  }
}

// acc[0:d] = acc * corr + sum_k p[k] V[k] over keys lo..hi of the block (v is [bsp][d]).
inline void accumulate(float* acc, const float* p, const float* v, int64_t lo, int64_t hi,
                       int64_t d, float corr) {
  int64_t c = 0;
  for (; c + kVec <= d; c += kVec) {
    float a[kVec];
#pragma omp simd
    for (int64_t j = 0; j < kVec; ++j) a[j] = acc[c + j] * corr;
    for (int64_t k = lo; k < hi; ++k) {
      const float* vk = v + k * d + c;
      const float pk = p[k];
#pragma omp simd
      for (int64_t j = 0; j < kVec; ++j) a[j] += pk * vk[j];
    }
    std::memcpy(acc + c, a, sizeof(a));
  }
  for (; c < d; ++c) {  // head sizes that are not a multiple of kVec
    float a = acc[c] * corr;
    for (int64_t k = lo; k < hi; ++k) a += p[k] * v[k * d + c];
    acc[c] = a;
  }
}

template <typename cache_t>
void run_item(const Item& it, Scratch& sc, const float* query, int64_t q_stride_t,
              int64_t q_stride_h, float* out, const cache_t* kc, const cache_t* vc,
              const int64_t* tables, int64_t table_stride, const int64_t* seq_lens,
              const int64_t* qsl, int64_t hq, int64_t hkv, int64_t d, int64_t bs,
              float scale, int64_t window) {
  const int64_t group = hq / hkv;
  const int64_t bsp = (bs + kVec - 1) / kVec * kVec;
  const int64_t seq_len = seq_lens[it.seq];
  const int64_t q_len = qsl[it.seq + 1] - qsl[it.seq];
  const int64_t first_pos = seq_len - q_len;  // position of the sequence's first query
  const int64_t ntok = it.q_end - it.q_begin;
  const int64_t rows = ntok * group;          // per KV head
  const int64_t nheads = it.h_end - it.h_begin;
  float *kt = sc.kt.data(), *v = sc.v.data(), *s = sc.s.data(), *p = sc.p.data();
  // per KV head h of the item: rows (token, head in group); the scale is folded into q once
  for (int64_t h = 0; h < nheads; ++h)
    for (int64_t t = 0; t < ntok; ++t) {
      const int64_t tok = qsl[it.seq] + it.q_begin + t;
      for (int64_t g = 0; g < group; ++g) {
        const float* src = query + tok * q_stride_t + ((it.h_begin + h) * group + g) * q_stride_h;
        float* dst = sc.q.data() + ((h * rows) + t * group + g) * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = src[i] * scale;
      }
    }
  std::fill(sc.acc.begin(), sc.acc.begin() + nheads * rows * d, 0.f);
  std::fill(sc.m.begin(), sc.m.begin() + nheads * rows, -FLT_MAX);
  std::fill(sc.l.begin(), sc.l.begin() + nheads * rows, 0.f);
  const int64_t last_pos = first_pos + it.q_end - 1;
  const int64_t key_lo = window > 0 ? std::max<int64_t>(0, first_pos + it.q_begin - window + 1) : 0;
  const int64_t key_hi = last_pos + 1;  // exclusive
  const int64_t* row_table = tables + it.seq * table_stride;
  const int64_t row_elems = hkv * d;
  const int64_t block_elems = bs * row_elems;
  for (int64_t b = key_lo / bs; b * bs < key_hi; ++b) {
    const int64_t base = b * bs;
    const int64_t n = std::min(bs, key_hi - base);
    const int64_t block = row_table[b];
    if ((b + 1) * bs < key_hi) {  // the next block is elsewhere in memory: ask for it early
      const char* nk = reinterpret_cast<const char*>(kc + row_table[b + 1] * block_elems);
      const char* nv = reinterpret_cast<const char*>(vc + row_table[b + 1] * block_elems);
      const int64_t bytes = block_elems * static_cast<int64_t>(sizeof(cache_t));
      for (int64_t off = 0; off < bytes; off += 64) {
        __builtin_prefetch(nk + off);
        __builtin_prefetch(nv + off);
      }
    }
    for (int64_t h = 0; h < nheads; ++h) {
      const cache_t* kb = kc + block * block_elems + (it.h_begin + h) * d;
      const cache_t* vb = vc + block * block_elems + (it.h_begin + h) * d;
      float* q = sc.q.data() + h * rows * d;
      // Few rows (decodes): one dot product per key over K as stored. Many rows (prompt
      // chunks): K transposed once per block, then every row's scores are outer-product FMAs.
      const bool transpose = rows >= 4;
      for (int64_t k = 0; k < n; ++k) {
        const cache_t* kr = kb + k * row_elems;
        const cache_t* vr = vb + k * row_elems;
        if (transpose) {
          for (int64_t i = 0; i < d; ++i) kt[i * bsp + k] = load(kr + i);
        } else {
          for (int64_t i = 0; i < d; ++i) kt[k * d + i] = load(kr + i);
        }
        for (int64_t i = 0; i < d; ++i) v[k * d + i] = load(vr + i);
      }
      if (transpose) {
        for (int64_t k = n; k < bsp; ++k)  // padding keys: finite, never inside a row's range
          for (int64_t i = 0; i < d; ++i) kt[i * bsp + k] = 0.f;
        scores(q, kt, s, rows, d, bsp);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < n; ++k) {
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; ++i) dot += q[r * d + i] * kt[k * d + i];
            s[r * bsp + k] = dot;
          }
      }
      float* acc = sc.acc.data() + h * rows * d;
      float* m = sc.m.data() + h * rows;
      float* l = sc.l.data() + h * rows;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t pos = first_pos + it.q_begin + r / group;
        const int64_t lo = std::max<int64_t>(window > 0 ? pos - window + 1 : 0, base) - base;
        const int64_t hi = std::min<int64_t>(pos + 1, base + n) - base;
        if (lo >= hi) continue;
        const float* sr = s + r * bsp;
        float mx = m[r];
        for (int64_t k = lo; k < hi; ++k) mx = std::max(mx, sr[k]);
        const float corr = l[r] == 0.f ? 0.f : std::exp(m[r] - mx);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = lo; k < hi; ++k) {
          p[k] = std::exp(sr[k] - mx);
          sum += p[k];
        }
        l[r] = l[r] * corr + sum;
        m[r] = mx;
        accumulate(acc + r * d, p, v, lo, hi, d, corr);
      }
    }
  }
  for (int64_t h = 0; h < nheads; ++h)
    for (int64_t t = 0; t < ntok; ++t) {
      const int64_t tok = qsl[it.seq] + it.q_begin + t;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = h * rows + t * group + g;
        const float inv = 1.f / sc.l[r];  // every query sees at least itself: l > 0
        float* dst = out + (tok * hq + (it.h_begin + h) * group + g) * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = sc.acc[r * d + i] * inv;
      }
    }
}

void paged_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                     double scale, int64_t sliding_window) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == at::kFloat, "query must be [T, Hq, D] float32");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2), "query inner dims must be dense");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == query.sizes() && out.scalar_type() == at::kFloat,
              "out must be a contiguous float32 tensor shaped like query");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "k_cache and v_cache must be matching contiguous [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong &&
              block_tables.stride(1) == 1, "block_tables must be [S, max_blocks] int64");
  TORCH_CHECK(seq_lens.is_contiguous() && seq_lens.scalar_type() == at::kLong &&
              query_start_loc.is_contiguous() && query_start_loc.scalar_type() == at::kLong,
              "seq_lens and query_start_loc must be contiguous int64");
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1 && block_tables.size(0) == num_seqs,
              "one block-table row and one query_start_loc offset per sequence");
  const int64_t hq = query.size(1), d = query.size(2);
  const int64_t bs = k_cache.size(1), hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && hkv > 0 && hq % hkv == 0, "head counts / sizes do not match");
  const int64_t group = hq / hkv;
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* qsl = query_start_loc.data_ptr<int64_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[num_seqs] == query.size(0), "query_start_loc must span the queries");
  const int64_t max_blocks = block_tables.size(1);
  std::vector<Item> items;
  const int64_t tile = std::max<int64_t>(1, kRowsTile / group);
  int64_t num_tiles = 0;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t q_len = qsl[i + 1] - qsl[i];
    TORCH_CHECK(q_len >= 0 && lens[i] >= q_len, "sequence ", i, ": seq_len < query length");
    TORCH_CHECK((lens[i] + bs - 1) / bs <= max_blocks, "sequence ", i, ": block table too short");
    num_tiles += (q_len + tile - 1) / tile;
  }
  // All KV heads of a tile in one item: a block's K/V are then read front to back. Heads are
  // split over items only when there would be too few items to keep every thread busy.
  const int64_t threads = at::get_num_threads();
  int64_t head_split = 1;
  while (head_split < hkv && num_tiles * head_split < 4 * threads) head_split *= 2;
  const int64_t heads_per_item = (hkv + head_split - 1) / head_split;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t q_len = qsl[i + 1] - qsl[i];
    for (int64_t qb = 0; qb < q_len; qb += tile)
      for (int64_t h = 0; h < hkv; h += heads_per_item)
        items.push_back({i, h, std::min(hkv, h + heads_per_item), qb, std::min(q_len, qb + tile)});
  }
  // longest context first: the tail of the schedule is made of short items
  std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
    return lens[a.seq] - (qsl[a.seq + 1] - qsl[a.seq]) + a.q_end >
           lens[b.seq] - (qsl[b.seq + 1] - qsl[b.seq]) + b.q_end;
  });
  const int64_t bsp = (bs + kVec - 1) / kVec * kVec;
  const int64_t rows = tile * group;
  const float fscale = static_cast<float>(scale);
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(threads, items.size()));
  auto launch = [&](auto* kc, auto* vc) {
    using cache_t = std::remove_const_t<std::remove_pointer_t<decltype(kc)>>;
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
      Scratch sc;
      sc.reserve(heads_per_item, rows, bsp, d);
      for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++)
        run_item<cache_t>(items[i], sc, query.data_ptr<float>(), query.stride(0), query.stride(1),
                          out.data_ptr<float>(), kc, vc, block_tables.data_ptr<int64_t>(),
                          block_tables.stride(0), lens, qsl, hq, hkv, d, bs, fscale,
                          sliding_window);
    });
  };
  switch (k_cache.scalar_type()) {
    case at::kFloat: launch(k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>()); break;
    case at::kHalf: launch(k_cache.const_data_ptr<at::Half>(), v_cache.const_data_ptr<at::Half>()); break;
    case at::kBFloat16:
      launch(k_cache.const_data_ptr<at::BFloat16>(), v_cache.const_data_ptr<at::BFloat16>()); break;
    default: TORCH_CHECK(false, "the KV cache must be float32, float16 or bfloat16");
  }
}

}  // namespace

TORCH_LIBRARY(tessera_cpu, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
        "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, float scale, "
        "int sliding_window) -> ()");
}

TORCH_LIBRARY_IMPL(tessera_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
