// Fused elementwise ops for the CPU path, one pass over memory each (torch runs each as two
// to five passes with temporaries): silu_and_mul, rms_norm with the residual add fused, and
// rotary embedding in place, on float32, bfloat16 or float16 activations. Rows are split over
// torch's intra-op threads. The torch references in kernels/activation.py, norm.py and
// rotary.py are the oracle.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "vec.h"

namespace {

// Elements per task: a decode step's call (64 rows of 512-1536) stays on one thread, where
// waking the second one costs more than it saves (and, on a loaded machine, may wait for a
// core); prompt-sized calls split over the threads.
constexpr int64_t kGrainElems = 1 << 19;  // elements read + written

inline int64_t grain(int64_t row_elems) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_elems));
}

bool half_or_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_rows(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == dtype && t.stride(1) == 1, name,
              " must be a [T, N] tensor with dense rows, of the activations' dtype");
}

// Each op runs in float32 between loads and stores of the activations' dtype T, rounding to T
// where the torch reference does (a no-op for float32): bf16/fp16 models on CPUs with native
// half-precision matmuls (AMX) compute in their dtype, like transformers.
#define TESSERA_DISPATCH(dtype, ...)                                           \
  switch (dtype) {                                                             \
    case at::kFloat: { using T = float; __VA_ARGS__(); break; }                \
    case at::kBFloat16: { using T = at::BFloat16; __VA_ARGS__(); break; }      \
    case at::kHalf: { using T = at::Half; __VA_ARGS__(); break; }              \
    default: TORCH_CHECK(false, "float32, bfloat16 or float16 activations only"); \
  }

// out[t, i] = silu(x[t, i]) * x[t, I + i]   (silu rounded to T, then the product)
template <typename T>
void silu_and_mul_impl(at::Tensor& out, const at::Tensor& x) {
  const int64_t rows = x.size(0), inter = x.size(1) / 2;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  at::parallel_for(0, rows, grain(3 * inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = xp + r * xs;
      const T* u = g + inter;
      T* o = op + r * os;
      int64_t i = 0;
      // glibc's expf is not vectorized by the compiler: the polynomial exp of vec.h is
      for (; i + tvec::kW <= inter; i += tvec::kW) {
        const tvec::vf gv = tvec::loadv(g + i);
        const tvec::vf act = tvec::round_to<T>(gv / (1.f + tvec::vexp(-gv)));
        tvec::storev(o + i, act * tvec::loadv(u + i));
      }
      for (; i < inter; ++i) {
        const float gi = tvec::load(g + i);
        tvec::store(o + i, tvec::round_to<T>(gi / (1.f + std::exp(-gi))) * tvec::load(u + i));
      }
    }
  });
}

void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(half_or_float(x.scalar_type()), "x: float32, bfloat16 or float16");
  check_rows(x, x.scalar_type(), "x");
  check_rows(out, x.scalar_type(), "out");
  TORCH_CHECK(out.size(0) == x.size(0) && x.size(1) % 2 == 0 && out.size(1) == x.size(1) / 2,
              "shapes");
  TESSERA_DISPATCH(x.scalar_type(), [&] { silu_and_mul_impl<T>(out, x); });
}

// With a residual: residual_out = x + residual (rounded to T), out = rms_norm(residual_out) *
// weight, the normalised value rounded to T before the weight multiplies it (HF's order).
template <typename T>
void rms_norm_impl(at::Tensor& out, at::Tensor& residual_out, const at::Tensor& x,
                   const at::Tensor* residual, const at::Tensor& weight, float eps) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  T* rop = residual ? residual_out.data_ptr<T>() : nullptr;
  const T* w = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  const int64_t rs = residual ? residual->stride(0) : 0, ros = residual ? residual_out.stride(0) : 0;
  at::parallel_for(0, rows, grain(3 * hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = xp + r * xs;
      if constexpr (std::is_same_v<T, float>) {   // float32: the loops (and sums) of before
        if (rp) {
          float* sum = rop + r * ros;
          const float* res = rp + r * rs;
#pragma omp simd
          for (int64_t i = 0; i < hidden; ++i) sum[i] = src[i] + res[i];
          src = sum;
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < hidden; ++i) ss += src[i] * src[i];
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(hidden) + eps);
        float* o = op + r * os;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) o[i] = w[i] * (src[i] * inv);
        continue;
      }
      if (rp) {
        T* sum = rop + r * ros;
        const T* res = rp + r * rs;
        int64_t i = 0;
        for (; i + tvec::kW <= hidden; i += tvec::kW)
          tvec::storev(sum + i, tvec::loadv(src + i) + tvec::loadv(res + i));
        for (; i < hidden; ++i) tvec::store(sum + i, tvec::load(src + i) + tvec::load(res + i));
        src = sum;
      }
      tvec::vf acc{};
      int64_t i = 0;
      for (; i + tvec::kW <= hidden; i += tvec::kW) {
        const tvec::vf v = tvec::loadv(src + i);
        acc += v * v;
      }
      float ss = tvec::hsum(acc);
      for (; i < hidden; ++i) ss += tvec::load(src + i) * tvec::load(src + i);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(hidden) + eps);
      T* o = op + r * os;
      i = 0;
      for (; i + tvec::kW <= hidden; i += tvec::kW)
        tvec::storev(o + i, tvec::loadv(w + i) * tvec::round_to<T>(tvec::loadv(src + i) * inv));
      for (; i < hidden; ++i)
        tvec::store(o + i, tvec::load(w + i) * tvec::round_to<T>(tvec::load(src + i) * inv));
    }
  });
}

// Without a residual (undefined): out = rms_norm(x) * weight.
void rms_norm(at::Tensor out, at::Tensor residual_out, const at::Tensor& x,
              const c10::optional<at::Tensor>& residual, const at::Tensor& weight, double eps) {
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(half_or_float(dt), "x: float32, bfloat16 or float16");
  check_rows(x, dt, "x");
  check_rows(out, dt, "out");
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == dt &&
              weight.numel() == hidden && out.size(0) == rows && out.size(1) == hidden, "shapes");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_rows(*residual, dt, "residual");
    check_rows(residual_out, dt, "residual_out");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual_out.sizes() == x.sizes(), "shapes");
  }
  const at::Tensor* res = has_res ? &*residual : nullptr;
  TESSERA_DISPATCH(dt, [&] {
    rms_norm_impl<T>(out, residual_out, x, res, weight, static_cast<float>(eps));
  });
}

// Rotate-half rotary embedding, in place: x is [T, H, D] (row stride any, heads dense),
// cos_sin [max_pos, D] float32 holds cos in its first D/2 columns, sin in the rest. As the
// reference: cos and sin rounded to T, each product rounded to T, then their sum.
template <typename T>
void rotate(at::Tensor& x, const int64_t* pos, const float* cs, int64_t cs_stride) {
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  T* xp = x.data_ptr<T>();
  const int64_t ts = x.stride(0), hs = x.stride(1);
  at::parallel_for(0, tokens, grain(2 * heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cs + pos[t] * cs_stride;
      const float* s = c + half;
      for (int64_t h = 0; h < heads; ++h) {
        T* a = xp + t * ts + h * hs;
        T* b = a + half;
        int64_t i = 0;
        for (; i + tvec::kW <= half; i += tvec::kW) {
          const tvec::vf x1 = tvec::loadv(a + i), x2 = tvec::loadv(b + i);
          const tvec::vf ci = tvec::round_to<T>(tvec::loadu(c + i));
          const tvec::vf si = tvec::round_to<T>(tvec::loadu(s + i));
          tvec::storev(a + i, tvec::round_to<T>(x1 * ci) - tvec::round_to<T>(x2 * si));
          tvec::storev(b + i, tvec::round_to<T>(x2 * ci) + tvec::round_to<T>(x1 * si));
        }
        for (; i < half; ++i) {
          const float x1 = tvec::load(a + i), x2 = tvec::load(b + i);
          const float ci = tvec::round_to<T>(c[i]), si = tvec::round_to<T>(s[i]);
          tvec::store(a + i, tvec::round_to<T>(x1 * ci) - tvec::round_to<T>(x2 * si));
          tvec::store(b + i, tvec::round_to<T>(x2 * ci) + tvec::round_to<T>(x1 * si));
        }
      }
    }
  });
}

void rotary(at::Tensor query, at::Tensor key, const at::Tensor& positions,
            const at::Tensor& cos_sin) {
  const at::ScalarType dt = query.scalar_type();
  TORCH_CHECK(half_or_float(dt) && key.scalar_type() == dt, "query and key: one dtype of "
              "float32, bfloat16 or float16");
  for (const at::Tensor* t : {&query, &key})
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->stride(1) == t->size(2) &&
                t->size(2) % 2 == 0 && t->size(0) == positions.size(0),
                "query and key must be [T, H, D] with dense heads, D even");
  TORCH_CHECK(positions.is_contiguous() && positions.scalar_type() == at::kLong, "positions: int64");
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.scalar_type() == at::kFloat && cos_sin.stride(1) == 1 &&
              cos_sin.size(1) == query.size(2), "cos_sin must be [max_positions, D] float32");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < positions.size(0); ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < cos_sin.size(0), "position ", pos[i], " out of range");
  TESSERA_DISPATCH(dt, [&] {
    rotate<T>(query, pos, cos_sin.data_ptr<float>(), cos_sin.stride(0));
    rotate<T>(key, pos, cos_sin.data_ptr<float>(), cos_sin.stride(0));
  });
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
