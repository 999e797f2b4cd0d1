// The CPU paged attention's shared pieces and its prompt-chunk path (scores transposed,
// register-blocked QK^T and PV micro-kernels); paged_attention_cpu.cpp has the decode path,
// the work split and the contract, and the header comment describing both paths.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace tattn {

using tvec::kW;
using tvec::vf;
using tvec::vi;

constexpr int64_t kTileRows = 64;  // query rows (tokens x group heads) per prompt-chunk item
constexpr int64_t kSpanKeys = 64;  // keys per span (rounded to whole cache blocks)
// micro-kernel shapes: MK keys x NR vectors of rows (scores), MR rows x NR vectors of D (PV)
#if defined(__AVX512F__)
constexpr int kNR = 4;
#else
constexpr int kNR = 2;  // 16 vector registers: 12 accumulators + operands
#endif
constexpr int kMK = 6;
constexpr int kMR = 4;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Item {
  int64_t seq, h_begin, h_end, q_begin, q_end;  // KV heads; q_* index the sequence's queries
};

struct Shape {
  int64_t hq, hkv, group, d, dp, bs, span, row_elems, block_elems, window;
  float scale;
};

struct Scratch {
  std::vector<float> q, kc, vc, s, o, m, l, corr, zero;
  std::vector<int32_t> qpos;
  std::vector<const float*> kp, vp;
  std::vector<int64_t> off;   // a decode span's row offsets into the cache
};

// Where the keys base .. base + n - 1 of head h live as float32 rows: straight into the cache
// when it is float32 (and, if `padded`, d a whole number of vectors: readers then go to dp),
// else converted into `conv` (n x dp, zero padded past d).
template <typename cache_t>
void span_rows(const cache_t* cache, const int64_t* table, int64_t base, int64_t n, int64_t h,
               const Shape& sh, bool padded, float* conv, const float** rows) {
  for (int64_t k = 0; k < n; ++k) {
    const int64_t pos = base + k;
    const cache_t* src = cache + table[pos / sh.bs] * sh.block_elems + (pos % sh.bs) * sh.row_elems
                         + h * sh.d;
    if (std::is_same_v<cache_t, float> && (!padded || sh.d == sh.dp)) {
      rows[k] = reinterpret_cast<const float*>(src);
    } else {
      float* dst = conv + k * sh.dp;
      int64_t i = 0;
      for (; i + kW <= sh.d; i += kW) tvec::storeu(dst + i, tvec::loadv(src + i));
      for (; i < sh.d; ++i) dst[i] = tvec::load(src + i);
      for (; i < sh.dp; ++i) dst[i] = 0.f;
      rows[k] = dst;
    }
  }
}

// S^T[k0 .. k0 + MK) x rows [r0, r0 + NR kW) = K Q^T; qt is [d][rp], st is [span][rp]
template <int MK, int NR>
inline void qk_tile(const float* const* kp, const float* qt, float* st, int64_t rp, int64_t d,
                    int64_t k0, int64_t r0) {
  vf acc[MK][NR];
  const float* k[MK];
#pragma GCC unroll 8
  for (int m = 0; m < MK; ++m) {
    k[m] = kp[k0 + m];
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) acc[m][v] = vf{};
  }
  for (int64_t i = 0; i < d; ++i) {
    vf b[NR];
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) b[v] = tvec::loadu(qt + i * rp + r0 + v * kW);
#pragma GCC unroll 8
    for (int m = 0; m < MK; ++m) {
      const vf a = tvec::splat(k[m][i]);
#pragma GCC unroll 4
      for (int v = 0; v < NR; ++v) acc[m][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MK; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) tvec::storeu(st + (k0 + m) * rp + r0 + v * kW, acc[m][v]);
}

// qk_tile over nv (1 .. 4) vectors of rows from r0
template <int MK>
inline void qk_rows(int nv, const float* const* kp, const float* qt, float* st, int64_t rp,
                    int64_t d, int64_t k0, int64_t r0) {
  switch (nv) {
    case 4: qk_tile<MK, 4>(kp, qt, st, rp, d, k0, r0); break;
    case 3: qk_tile<MK, 3>(kp, qt, st, rp, d, k0, r0); break;
    case 2: qk_tile<MK, 2>(kp, qt, st, rp, d, k0, r0); break;
    default: qk_tile<MK, 1>(kp, qt, st, rp, d, k0, r0); break;
  }
}

// O[r0 .. r0 + MR) x columns [c0, c0 + NR kW) = O corr + P V over keys 0 .. n - 1
template <int NR>
inline void pv_tile(float* o, const float* pt, const float* const* vp, const float* corr,
                    int64_t rp, int64_t dp, int64_t n, int64_t r0, int64_t c0) {
  vf acc[kMR][NR];
#pragma GCC unroll 4
  for (int m = 0; m < kMR; ++m) {
    const vf c = tvec::splat(corr[r0 + m]);
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) acc[m][v] = tvec::loadu(o + (r0 + m) * dp + c0 + v * kW) * c;
  }
  for (int64_t k = 0; k < n; ++k) {
    vf b[NR];
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) b[v] = tvec::loadu(vp[k] + c0 + v * kW);
    const float* p = pt + k * rp + r0;
#pragma GCC unroll 4
    for (int m = 0; m < kMR; ++m) {
      const vf a = tvec::splat(p[m]);
#pragma GCC unroll 4
      for (int v = 0; v < NR; ++v) acc[m][v] += a * b[v];
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < kMR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) tvec::storeu(o + (r0 + m) * dp + c0 + v * kW, acc[m][v]);
}

// A prompt-chunk item: one KV head, up to kTileRows rows, scores transposed.
template <typename cache_t>
void chunk_item(const Item& it, Scratch& sc, const float* query, int64_t q_stride_t,
                int64_t q_stride_h, float* out, const cache_t* kc, const cache_t* vc,
                const int64_t* table, int64_t seq_len, int64_t q_start, int64_t q_len,
                const Shape& sh) {
  const int64_t h = it.h_begin;
  const int64_t ntok = it.q_end - it.q_begin;
  const int64_t rows = ntok * sh.group;
  const int64_t rp = round_up(rows, kNR * kW);
  const int64_t d = sh.d, dp = sh.dp;
  const int64_t first_pos = seq_len - q_len + it.q_begin;  // position of the item's first query
  float *qt = sc.q.data(), *st = sc.s.data(), *o = sc.o.data();
  float *m = sc.m.data(), *l = sc.l.data(), *corr = sc.corr.data();
  int32_t* qpos = sc.qpos.data();
  // Q^T, scaled; rows past the tile are zero, and their position -1 hides every key from them
  for (int64_t r = 0; r < rp; ++r) {
    const bool real = r < rows;
    const float* src = real ? query + (q_start + it.q_begin + r / sh.group) * q_stride_t
                                  + (h * sh.group + r % sh.group) * q_stride_h : nullptr;
    for (int64_t i = 0; i < d; ++i) qt[i * rp + r] = real ? src[i] * sh.scale : 0.f;
    qpos[r] = real ? static_cast<int32_t>(first_pos + r / sh.group) : -1;
    m[r] = -FLT_MAX;
    l[r] = 0.f;
  }
  std::fill(o, o + rp * dp, 0.f);
  const int64_t last_pos = first_pos + ntok - 1;
  const int64_t key_lo = sh.window > 0 ? std::max<int64_t>(0, first_pos - sh.window + 1) : 0;
  const int64_t key_hi = last_pos + 1;
  for (int64_t base = key_lo / sh.bs * sh.bs; base < key_hi; base += sh.span) {
    const int64_t n = std::min(sh.span, key_hi - base);
    span_rows(kc, table, base, n, h, sh, false, sc.kc.data(), sc.kp.data());
    span_rows(vc, table, base, n, h, sh, true, sc.vc.data(), sc.vp.data());
    const int64_t np = round_up(n, kMK);
    for (int64_t k = n; k < np; ++k) sc.kp[k] = sc.zero.data();   // padding keys: finite zeros
    for (int64_t r0 = 0; r0 < rp; r0 += kNR * kW) {
      const int64_t v_end = std::min<int64_t>(kNR, (rows - r0 + kW - 1) / kW);  // past: padding
      for (int64_t k0 = 0; k0 < n; k0 += kMK) {
        // causal: the row vectors before the first row that sees key base + k0 see none of
        // these keys; their scores are left as they are (the softmax masks them)
        const int64_t from = (base + k0 - first_pos) * sh.group - r0;
        const int64_t skip = from <= 0 ? 0 : std::min<int64_t>(kNR, from / kW);
        if (skip >= v_end) continue;
        const int nv = static_cast<int>(v_end - skip);
        // a span's last 1-4 keys take a 4-key tile: fewer zero keys than kMK would pad
        if (n - k0 > 4) qk_rows<kMK>(nv, sc.kp.data(), qt, st, rp, d, k0, r0 + skip * kW);
        else qk_rows<4>(nv, sc.kp.data(), qt, st, rp, d, k0, r0 + skip * kW);
      }
    }
    // online softmax down each column of S^T, kW rows at a time, over the keys some row of
    // the vector sees (the rest of its scores are neither read nor written); no masks when
    // every row sees every key of the span
    for (int64_t r0 = 0; r0 < rows; r0 += kW) {
      const int64_t r_last = std::min(r0 + kW, rows) - 1;
      const int64_t p_min = first_pos + r0 / sh.group, p_max = first_pos + r_last / sh.group;
      const int64_t n_vis = std::min(n, p_max - base + 1);
      const bool all_visible = r_last == r0 + kW - 1 && p_min >= base + n - 1
                               && (sh.window <= 0 || p_max - sh.window < base);
      const vf m_old = tvec::loadu(m + r0);
      const vf l_old = tvec::loadu(l + r0);
      vf mx = m_old, sum = vf{};
      if (all_visible) {
        for (int64_t k = 0; k < n; ++k) mx = tvec::vmax(mx, tvec::loadu(st + k * rp + r0));
        for (int64_t k = 0; k < n; ++k) {
          float* sk = st + k * rp + r0;
          const vf p = tvec::vexp(tvec::loadu(sk) - mx);
          tvec::storeu(sk, p);
          sum += p;
        }
      } else {
        const vi qp = [&] { vi v; std::memcpy(&v, qpos + r0, sizeof(v)); return v; }();
        const vi lo = sh.window > 0 ? qp - static_cast<int32_t>(sh.window) : tvec::splati(-1);
        for (int64_t k = 0; k < n_vis; ++k) {
          const vi kpos = tvec::splati(static_cast<int32_t>(base + k));
          const vi vis = (kpos <= qp) & (kpos > lo);
          mx = tvec::vmax(mx, tvec::select(vis, tvec::loadu(st + k * rp + r0), tvec::splat(-FLT_MAX)));
        }
        for (int64_t k = 0; k < n_vis; ++k) {
          const vi kpos = tvec::splati(static_cast<int32_t>(base + k));
          const vi vis = (kpos <= qp) & (kpos > lo);
          float* sk = st + k * rp + r0;
          const vf p = tvec::select(vis, tvec::vexp(tvec::loadu(sk) - mx), tvec::splat(0.f));
          tvec::storeu(sk, p);
          sum += p;
        }
      }
      // a row that has seen no key yet has O = 0 and gets c = 0; one that sees none of this
      // span's keys keeps mx = m_old, so c = 1
      const vf c = tvec::select(l_old == 0.f, tvec::splat(0.f), tvec::vexp(m_old - mx));
      tvec::storeu(l + r0, l_old * c + sum);
      tvec::storeu(m + r0, mx);
      tvec::storeu(corr + r0, c);
    }
    // O = O corr + P V, each kMR rows over the keys the last of them sees (the others' P is
    // 0 there); rows that see none of the span keep O (their corr is 1, or O is 0)
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int64_t n_pv = std::min(n, first_pos + (std::min(r0 + kMR, rows) - 1) / sh.group - base + 1);
      if (n_pv <= 0) continue;
      int64_t c0 = 0;
      for (; c0 + kNR * kW <= dp; c0 += kNR * kW) pv_tile<kNR>(o, st, sc.vp.data(), corr, rp, dp, n_pv, r0, c0);
      switch ((dp - c0) / kW) {
        case 3: pv_tile<3>(o, st, sc.vp.data(), corr, rp, dp, n_pv, r0, c0); break;
        case 2: pv_tile<2>(o, st, sc.vp.data(), corr, rp, dp, n_pv, r0, c0); break;
        case 1: pv_tile<1>(o, st, sc.vp.data(), corr, rp, dp, n_pv, r0, c0); break;
        default: break;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / l[r];  // every query sees at least itself: l > 0
    float* dst = out + (q_start + it.q_begin + r / sh.group) * sh.hq * d
                 + (h * sh.group + r % sh.group) * d;
    for (int64_t i = 0; i < d; ++i) dst[i] = o[r * dp + i] * inv;
  }
}

}  // namespace tattn
