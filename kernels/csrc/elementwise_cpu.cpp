// Fused float32 elementwise ops for the CPU path, one pass over memory each (torch runs each
// as two to five passes with temporaries): silu_and_mul, rms_norm with the residual add
// fused, and rotary embedding in place. Rows are split over torch's intra-op threads.
// The torch references in kernels/activation.py, norm.py and rotary.py are the oracle.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec.h"

namespace {

// Elements per task: a decode step's call (64 rows of 512-1536) stays on one thread, where
// waking the second one costs more than it saves (and, on a loaded machine, may wait for a
// core); prompt-sized calls split over the threads.
constexpr int64_t kGrainElems = 1 << 19;  // elements read + written

inline int64_t grain(int64_t row_elems) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_elems));
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.stride(1) == 1,
              name, " must be a [T, N] float32 tensor with dense rows");
}

// out[t, i] = silu(x[t, i]) * x[t, I + i]
void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  check_rows(x, "x");
  check_rows(out, "out");
  const int64_t rows = x.size(0), inter = x.size(1) / 2;
  TORCH_CHECK(out.size(0) == rows && out.size(1) == inter && x.size(1) == 2 * inter, "shapes");
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  at::parallel_for(0, rows, grain(3 * inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = xp + r * xs;
      const float* u = g + inter;
      float* o = op + r * os;
      int64_t i = 0;
      // glibc's expf is not vectorized by the compiler: the polynomial exp of vec.h is
      for (; i + tvec::kW <= inter; i += tvec::kW) {
        const tvec::vf gv = tvec::loadu(g + i);
        tvec::storeu(o + i, gv / (1.f + tvec::vexp(-gv)) * tvec::loadu(u + i));
      }
      for (; i < inter; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
}

// With a residual: residual_out = x + residual, out = rms_norm(residual_out) * weight.
// Without one (residual undefined): out = rms_norm(x) * weight.
void rms_norm(at::Tensor out, at::Tensor residual_out, const at::Tensor& x,
              const c10::optional<at::Tensor>& residual, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(out, "out");
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat &&
              weight.numel() == hidden && out.size(0) == rows && out.size(1) == hidden, "shapes");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_rows(*residual, "residual");
    check_rows(residual_out, "residual_out");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual_out.sizes() == x.sizes(), "shapes");
  }
  const float* xp = x.data_ptr<float>();
  const float* rp = has_res ? residual->data_ptr<float>() : nullptr;
  float* rop = has_res ? residual_out.data_ptr<float>() : nullptr;
  const float* w = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  const int64_t rs = has_res ? residual->stride(0) : 0, ros = has_res ? residual_out.stride(0) : 0;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, grain(3 * hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* src = xp + r * xs;
      if (has_res) {
        float* sum = rop + r * ros;
        const float* res = rp + r * rs;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) sum[i] = src[i] + res[i];
        src = sum;
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < hidden; ++i) ss += src[i] * src[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(hidden) + feps);
      float* o = op + r * os;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) o[i] = w[i] * (src[i] * inv);
    }
  });
}

// Rotate-half rotary embedding, in place: x is [T, H, D] (row stride any, heads dense),
// cos_sin [max_pos, D] holds cos in its first D/2 columns, sin in the rest.
void rotate(at::Tensor& x, const int64_t* pos, const float* cs, int64_t cs_stride) {
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  float* xp = x.data_ptr<float>();
  const int64_t ts = x.stride(0), hs = x.stride(1);
  at::parallel_for(0, tokens, grain(2 * heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cs + pos[t] * cs_stride;
      const float* s = c + half;
      for (int64_t h = 0; h < heads; ++h) {
        float* a = xp + t * ts + h * hs;
        float* b = a + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = a[i], x2 = b[i];
          a[i] = x1 * c[i] - x2 * s[i];
          b[i] = x2 * c[i] + x1 * s[i];
        }
      }
    }
  });
}

void rotary(at::Tensor query, at::Tensor key, const at::Tensor& positions,
            const at::Tensor& cos_sin) {
  for (const at::Tensor* t : {&query, &key})
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && t->stride(2) == 1 &&
                t->stride(1) == t->size(2) && t->size(2) % 2 == 0 && t->size(0) == positions.size(0),
                "query and key must be [T, H, D] float32 with dense heads, D even");
  TORCH_CHECK(positions.is_contiguous() && positions.scalar_type() == at::kLong, "positions: int64");
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.scalar_type() == at::kFloat && cos_sin.stride(1) == 1 &&
              cos_sin.size(1) == query.size(2), "cos_sin must be [max_positions, D] float32");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < positions.size(0); ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < cos_sin.size(0), "position ", pos[i], " out of range");
  rotate(query, pos, cos_sin.data_ptr<float>(), cos_sin.stride(0));
  rotate(key, pos, cos_sin.data_ptr<float>(), cos_sin.stride(0));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera_cpu, m) {
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor(b!) residual_out, Tensor x, Tensor? residual, "
        "Tensor weight, float eps) -> ()");
  m.def("rotary(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor cos_sin) -> ()");
}

TORCH_LIBRARY_IMPL(tessera_cpu, CPU, m) {
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
}
