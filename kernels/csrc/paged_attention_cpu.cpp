// Paged attention on the CPU: decodes and prompt chunks in one call, K/V read in place.
//
// Each work item is a sequence's tile of query rows (tokens x the query heads of a KV head)
// over some of its KV heads. It walks the sequence's keys in spans of a few cache blocks
// through its block-table row and keeps a running (max, sum, accumulator) per query row: the
// flash-attention recurrence, so no score matrix over the whole context and no gathered copy
// of the cache ever exists. Two paths, by the number of rows of an item:
// - prompt chunks (many rows, compute-bound): scores are computed transposed, S^T = K Q^T,
//   so each SIMD vector holds one key's scores for kW query rows: the query tile is
//   transposed once per item, K is read as stored (broadcast element by element), the
//   softmax runs down the columns with no horizontal reductions, and O += P V broadcasts
//   P^T's entries against V's rows. Both products are register-blocked micro-kernels.
// - decodes (a few rows, bound by reading K/V once): one dot product per key and row over K
//   as stored (four KV heads' at once when each has one query row: independent sums, one
//   reduction), all KV heads of a block in one pass front to back; then O += P V per span with
//   a few heads' accumulators held in registers over its keys (each V row loaded once for the
//   rows of its head). K rows are prefetched a few keys ahead, V rows during the K pass.
// Half-precision caches (fp16/bf16) are converted to float32 as they are loaded (the prompt
// path converts each span once into a scratch copy). Masking is by index ranges (causal
// within the chunk, full over the prefix, sliding window) and lane selects, so no -inf is
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
#include <cstdint>
#include <type_traits>
#include <vector>

#include "attention_chunk.h"
#include "vec.h"

namespace {

using namespace tattn;

#if defined(__AVX512F__)
constexpr int kAccRegs = 16;   // accumulator vectors P V keeps in registers (of 32)
#else
constexpr int kAccRegs = 8;    // of 16
#endif

// O += P V over a span's keys 0 .. n - 1 for HP consecutive KV heads of R rows each, d = VPH
// vectors (o: their rows, contiguous; s: their scores, row stride sp; V rows at off[k] + h0):
// the accumulators stay in registers across the keys and each V row is loaded once for its R
// rows. The caller has asked for the V rows during the K pass.
template <int VPH, int HP, int R, typename cache_t>
inline void pv_heads(float* o, const float* s, int64_t sp, const cache_t* vc, const int64_t* off,
                     int64_t h0, int64_t n) {
  constexpr int NV = VPH * HP * R;
  vf acc[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) acc[v] = tvec::loadu(o + v * kW);
  for (int64_t k = 0; k < n; ++k) {
    const cache_t* vr = vc + off[k] + h0;
#pragma GCC unroll 4
    for (int h = 0; h < HP; ++h) {
      vf p[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) p[r] = tvec::splat(s[(h * R + r) * sp + k]);
#pragma GCC unroll 16
      for (int v = 0; v < VPH; ++v) {
        const vf x = tvec::loadv(vr + (h * VPH + v) * kW);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[(h * R + r) * VPH + v] += p[r] * x;
      }
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) tvec::storeu(o + v * kW, acc[v]);
}

// pv_heads over an item's heads, as many at a time as kAccRegs holds; false when R rows of d
// do not fit (the caller's loop runs)
template <int VPH, int R, typename cache_t>
bool pv_rows(float* o, const float* s, int64_t sp, const cache_t* vc, const int64_t* off,
             int64_t h_begin, int64_t nheads, int64_t n) {
  if constexpr (VPH * R > kAccRegs) {
    return false;
  } else {
    constexpr int HP = kAccRegs / (VPH * R), d = VPH * kW;
    int64_t hh = 0;
    for (; hh + HP <= nheads; hh += HP)
      pv_heads<VPH, HP, R>(o + hh * R * d, s + hh * R * sp, sp, vc, off, (h_begin + hh) * d, n);
    for (; hh < nheads; ++hh)
      pv_heads<VPH, 1, R>(o + hh * R * d, s + hh * R * sp, sp, vc, off, (h_begin + hh) * d, n);
    return true;
  }
}

template <int VPH, typename cache_t>
bool pv_rows_any(int64_t rows_h, float* o, const float* s, int64_t sp, const cache_t* vc,
                 const int64_t* off, int64_t h_begin, int64_t nheads, int64_t n) {
  switch (rows_h) {
    case 1: return pv_rows<VPH, 1>(o, s, sp, vc, off, h_begin, nheads, n);
    case 2: return pv_rows<VPH, 2>(o, s, sp, vc, off, h_begin, nheads, n);
    case 3: return pv_rows<VPH, 3>(o, s, sp, vc, off, h_begin, nheads, n);
    case 4: return pv_rows<VPH, 4>(o, s, sp, vc, off, h_begin, nheads, n);
    default: return false;
  }
}

// the register-blocked P V when d is 4, 5 or 8 vectors; false: the caller's loop runs
template <typename cache_t>
bool pv_blocked(int64_t rows_h, float* o, const float* s, int64_t sp, const cache_t* vc,
                const int64_t* off, int64_t h_begin, int64_t nheads, int64_t d, int64_t n) {
  if (d % kW != 0) return false;
  switch (d / kW) {
    case 4: return pv_rows_any<4>(rows_h, o, s, sp, vc, off, h_begin, nheads, n);
    case 5: return pv_rows_any<5>(rows_h, o, s, sp, vc, off, h_begin, nheads, n);
    case 8: return pv_rows_any<8>(rows_h, o, s, sp, vc, off, h_begin, nheads, n);
    default: return false;
  }
}

// A decode item (or a short chunk): all its KV heads per block, one dot product per key and row.
template <typename cache_t>
void decode_item(const Item& it, Scratch& sc, const float* query, int64_t q_stride_t,
                 int64_t q_stride_h, float* out, const cache_t* kc, const cache_t* vc,
                 const int64_t* table, int64_t seq_len, int64_t q_start, int64_t q_len,
                 const Shape& sh) {
  const int64_t ntok = it.q_end - it.q_begin;
  const int64_t rows_h = ntok * sh.group;              // rows per KV head
  const int64_t nheads = it.h_end - it.h_begin;
  const int64_t rows = nheads * rows_h;
  const int64_t d = sh.d, dp = sh.dp;
  const int64_t sp = round_up(sh.span, kW);
  const int64_t first_pos = seq_len - q_len + it.q_begin;
  float *q = sc.q.data(), *s = sc.s.data(), *o = sc.o.data(), *m = sc.m.data(), *l = sc.l.data();
  for (int64_t r = 0; r < rows; ++r) {   // row r: head r / rows_h, token (r % rows_h) / group
    const int64_t hh = it.h_begin + r / rows_h, t = (r % rows_h) / sh.group, g = r % sh.group;
    const float* src = query + (q_start + it.q_begin + t) * q_stride_t
                       + (hh * sh.group + g) * q_stride_h;
    for (int64_t i = 0; i < d; ++i) q[r * dp + i] = src[i] * sh.scale;
    for (int64_t i = d; i < dp; ++i) q[r * dp + i] = 0.f;
    m[r] = -FLT_MAX;
    l[r] = 0.f;
  }
  std::fill(o, o + rows * dp, 0.f);
  const int64_t key_lo = sh.window > 0 ? std::max<int64_t>(0, first_pos - sh.window + 1) : 0;
  const int64_t key_hi = first_pos + ntok;
  // while the K pass reads a key's row it asks for the K row kAhead keys on and the key's V
  // row (the P V pass, after the softmax, finds the span's V in cache). Against a hint for the
  // whole next span, with P V in registers: 1.15-1.25x (fp32 cache), 1.2-1.36x (fp16) at 64 x
  // 296..1024 on a Xeon; 4 keys ahead beat 2, 8 and 16. The hints go to L2 (prefetcht1), not
  // L1: on an AMD EPYC (Zen 4, 2 cores) at 64 x 512 over 8 layers' caches, 3.7-4.7 ms a layer
  // against 5.1-5.2 with prefetcht0 (fp32), 2.2-2.6 against 3.1-3.2 (fp16): hints into L1 hold
  // its few miss buffers, and a span's V (128 KiB in fp32) does not fit there anyway
  constexpr int64_t kAhead = 4;
  const int64_t row_bytes = nheads * d * static_cast<int64_t>(sizeof(cache_t));
  auto prefetch_row = [row_bytes, h0 = it.h_begin * d](const cache_t* cache, int64_t row_off) {
    const char* p = reinterpret_cast<const char*>(cache + row_off + h0);
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
  };
  const vi lanes = tvec::iota();
  for (int64_t base = key_lo / sh.bs * sh.bs; base < key_hi; base += sh.span) {
    const int64_t n = std::min(sh.span, key_hi - base);
    // the span's rows: one division per key
    int64_t* off = sc.off.data();
    for (int64_t k = 0; k < n; ++k) {
      const int64_t pos = base + k;
      off[k] = table[pos / sh.bs] * sh.block_elems + (pos % sh.bs) * sh.row_elems;
    }
    // scores s[r][k]: K read front to back as stored, one key's row (all its heads) at a
    // time; with one row per KV head, four heads' dot products at once (independent sums,
    // one reduction)
    for (int64_t k = 0; k < n; ++k) {
      const cache_t* krow = kc + off[k] + it.h_begin * d;
      if (k + kAhead < n) prefetch_row(kc, off[k + kAhead]);
      prefetch_row(vc, off[k]);   // for the P V pass below
      int64_t hh = 0;
      if (rows_h == 1 && d % kW == 0) {
        for (; hh + 4 <= nheads; hh += 4) {
          const cache_t *k0 = krow + hh * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
          const float *q0 = q + hh * dp, *q1 = q0 + dp, *q2 = q1 + dp, *q3 = q2 + dp;
          vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
          for (int64_t i = 0; i < d; i += kW) {
            a0 += tvec::loadu(q0 + i) * tvec::loadv(k0 + i);
            a1 += tvec::loadu(q1 + i) * tvec::loadv(k1 + i);
            a2 += tvec::loadu(q2 + i) * tvec::loadv(k2 + i);
            a3 += tvec::loadu(q3 + i) * tvec::loadv(k3 + i);
          }
          float dots[4];
          tvec::hsum4(a0, a1, a2, a3, dots);
          for (int j = 0; j < 4; ++j) s[(hh + j) * sp + k] = dots[j];
        }
      }
      for (; hh < nheads; ++hh) {
        const cache_t* kr = krow + hh * d;
        for (int64_t rr = 0; rr < rows_h; ++rr) {
          const int64_t r = hh * rows_h + rr;
          const float* qr = q + r * dp;
          vf acc = vf{};
          int64_t i = 0;
          for (; i + kW <= d; i += kW) acc += tvec::loadu(qr + i) * tvec::loadv(kr + i);
          float dot = tvec::hsum(acc);
          for (; i < d; ++i) dot += qr[i] * tvec::load(kr + i);
          s[r * sp + k] = dot;
        }
      }
    }
    // online softmax along each row's keys
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = first_pos + (r % rows_h) / sh.group;
      const int64_t lo = std::max<int64_t>(sh.window > 0 ? pos - sh.window + 1 : 0, base) - base;
      const int64_t hi = std::min<int64_t>(pos + 1, base + n) - base;
      float* sr = s + r * sp;
      if (lo >= hi) {   // nothing visible in this span: p = 0 everywhere
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      vf mxv = tvec::splat(m[r]);
      for (int64_t k0 = 0; k0 < n; k0 += kW) {
        const vi kk = lanes + static_cast<int32_t>(k0);
        const vi vis = (kk >= static_cast<int32_t>(lo)) & (kk < static_cast<int32_t>(hi));
        mxv = tvec::vmax(mxv, tvec::select(vis, tvec::loadu(sr + k0), tvec::splat(-FLT_MAX)));
      }
      const float mx = tvec::hmax(mxv);
      const float c = l[r] == 0.f ? 0.f : tvec::vexp(tvec::splat(m[r] - mx))[0];
      vf sum = vf{};
      for (int64_t k0 = 0; k0 < n; k0 += kW) {
        const vi kk = lanes + static_cast<int32_t>(k0);
        const vi vis = (kk >= static_cast<int32_t>(lo)) & (kk < static_cast<int32_t>(hi));
        const vf p = tvec::select(vis, tvec::vexp(tvec::loadu(sr + k0) - mx), tvec::splat(0.f));
        tvec::storeu(sr + k0, p);
        sum += p;
      }
      l[r] = l[r] * c + tvec::hsum(sum);
      m[r] = mx;
      float* orow = o + r * dp;
      const vf cv = tvec::splat(c);
      for (int64_t i = 0; i < dp; i += kW) tvec::storeu(orow + i, tvec::loadu(orow + i) * cv);
    }
    // O += P V: a few heads' accumulators in registers over the span's keys; else (d does
    // not fit) V rows read once per key for all heads, front to back
    if (pv_blocked(rows_h, o, s, sp, vc, off, it.h_begin, nheads, d, n)) continue;
    for (int64_t k = 0; k < n; ++k) {
      const cache_t* vrow = vc + off[k] + it.h_begin * d;
      for (int64_t hh = 0; hh < nheads; ++hh) {
        const cache_t* vr = vrow + hh * d;
        for (int64_t rr = 0; rr < rows_h; ++rr) {
          const int64_t r = hh * rows_h + rr;
          const vf p = tvec::splat(s[r * sp + k]);
          float* orow = o + r * dp;
          int64_t i = 0;
          for (; i + kW <= d; i += kW) tvec::storeu(orow + i, tvec::loadu(orow + i) + p * tvec::loadv(vr + i));
          for (; i < d; ++i) orow[i] += p[0] * tvec::load(vr + i);
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t hh = it.h_begin + r / rows_h, t = (r % rows_h) / sh.group, g = r % sh.group;
    const float inv = 1.f / l[r];  // every query sees at least itself: l > 0
    float* dst = out + ((q_start + it.q_begin + t) * sh.hq + hh * sh.group + g) * d;
    for (int64_t i = 0; i < d; ++i) dst[i] = o[r * dp + i] * inv;
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
  TORCH_CHECK(bs > 0 && d > 0, "empty blocks or heads");
  const int64_t group = hq / hkv;
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* qsl = query_start_loc.data_ptr<int64_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[num_seqs] == query.size(0), "query_start_loc must span the queries");
  const int64_t max_blocks = block_tables.size(1);
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t q_len = qsl[i + 1] - qsl[i];
    TORCH_CHECK(q_len >= 0 && lens[i] >= q_len, "sequence ", i, ": seq_len < query length");
    TORCH_CHECK((lens[i] + bs - 1) / bs <= max_blocks, "sequence ", i, ": block table too short");
    TORCH_CHECK(lens[i] < INT32_MAX, "sequence ", i, ": too long");
  }
  Shape sh{hq, hkv, group, d, round_up(d, kW), bs, std::max(bs, kSpanKeys / bs * bs), hkv * d,
           bs * hkv * d, sliding_window, static_cast<float>(scale)};
  // Prompt chunks with at least a vector's worth of rows per KV head take the transposed path,
  // one KV head per item; decodes and short chunks keep all KV heads of a tile in one item (a
  // block's K/V are then read front to back), split only when too few items would leave a
  // thread idle.
  const int64_t threads = at::get_num_threads();
  const int64_t chunk_tile = std::max<int64_t>(1, kTileRows / group);
  const int64_t decode_tile = std::max<int64_t>(1, kW / group);
  auto is_chunk = [&](int64_t q_len) { return q_len * group >= kW; };
  int64_t decode_tiles = 0;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t q_len = qsl[i + 1] - qsl[i];
    if (!is_chunk(q_len)) decode_tiles += (q_len + decode_tile - 1) / decode_tile;
  }
  int64_t head_split = 1;
  while (head_split < hkv && decode_tiles * head_split < 4 * threads) head_split *= 2;
  const int64_t heads_per_item = (hkv + head_split - 1) / head_split;
  std::vector<Item> items;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t q_len = qsl[i + 1] - qsl[i];
    const bool chunk = is_chunk(q_len);
    const int64_t tile = chunk ? chunk_tile : decode_tile;
    const int64_t hstep = chunk ? 1 : heads_per_item;
    for (int64_t qb = 0; qb < q_len; qb += tile)
      for (int64_t h = 0; h < hkv; h += hstep)
        items.push_back({i, h, std::min(hkv, h + hstep), qb, std::min(q_len, qb + tile)});
  }
  // most work first (keys x rows): the tail of the schedule is made of short items
  auto cost = [&](const Item& a) {
    const int64_t q_len = qsl[a.seq + 1] - qsl[a.seq];
    return (lens[a.seq] - q_len + a.q_end) * (a.q_end - a.q_begin) * (a.h_end - a.h_begin);
  };
  std::stable_sort(items.begin(), items.end(),
                   [&](const Item& a, const Item& b) { return cost(a) > cost(b); });
  const int64_t rows_max = std::max(round_up(chunk_tile * group, kNR * kW),
                                    heads_per_item * decode_tile * group);
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(threads, items.size()));
  auto launch = [&](auto* kc, auto* vc) {
    using cache_t = std::remove_const_t<std::remove_pointer_t<decltype(kc)>>;
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
      const tvec::FlushToZero ftz;
      Scratch sc;
      const int64_t sp = round_up(sh.span, kW);
      sc.q.resize(std::max(d * rows_max, rows_max * sh.dp));
      sc.s.resize(std::max(round_up(sh.span, kMK) * rows_max, rows_max * sp));
      sc.o.resize(rows_max * sh.dp);
      sc.m.resize(rows_max); sc.l.resize(rows_max); sc.corr.resize(rows_max);
      sc.qpos.resize(rows_max);
      sc.kc.resize(sh.span * sh.dp); sc.vc.resize(sh.span * sh.dp);
      sc.zero.assign(sh.dp, 0.f);
      sc.kp.resize(round_up(sh.span, kMK)); sc.vp.resize(sh.span); sc.off.resize(sh.span);
      for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++) {
        const Item& it = items[i];
        const int64_t q_len = qsl[it.seq + 1] - qsl[it.seq];
        const int64_t* table = block_tables.data_ptr<int64_t>() + it.seq * block_tables.stride(0);
        auto fn = is_chunk(q_len) ? chunk_item<cache_t> : decode_item<cache_t>;
        fn(it, sc, query.data_ptr<float>(), query.stride(0), query.stride(1),
           out.data_ptr<float>(), kc, vc, table, lens[it.seq], qsl[it.seq], q_len, sh);
      }
    });
  };
  switch (k_cache.scalar_type()) {
    case at::kFloat: launch(k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>()); break;
    case at::kHalf: launch(k_cache.const_data_ptr<at::Half>(), v_cache.const_data_ptr<at::Half>()); break;
    case at::kBFloat16:
      launch(k_cache.const_data_ptr<at::BFloat16>(), v_cache.const_data_ptr<at::BFloat16>()); break;
    case at::kFloat8_e4m3fn:
      launch(k_cache.const_data_ptr<c10::Float8_e4m3fn>(), v_cache.const_data_ptr<c10::Float8_e4m3fn>());
      break;
    case at::kFloat8_e5m2:
      launch(k_cache.const_data_ptr<c10::Float8_e5m2>(), v_cache.const_data_ptr<c10::Float8_e5m2>());
      break;
    default: TORCH_CHECK(false, "the KV cache must be float32, float16, bfloat16 or fp8 (e4m3fn, e5m2)");
  }
}

}  // namespace

TORCH_LIBRARY(tessera_cpu, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
        "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, float scale, "
        "int sliding_window) -> ()");
}

TORCH_LIBRARY_IMPL(tessera_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
