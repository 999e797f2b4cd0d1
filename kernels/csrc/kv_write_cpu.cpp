// The KV-cache write on the CPU: this step's key and value rows into their cache slots, both
// in one pass, converted to the cache's dtype on the way (float32, bfloat16, float16 or fp8).
// torch's path (kernels/kv_write.py, the oracle) converts into a temporary and then scatters it
// with index_copy_, which ran at ~5 GB/s here (a 2048-token prompt step: 1.5 ms a layer for
// an fp32 cache, 3.5 ms for fp8). Conversions round as torch's own do (to nearest even; NaN
// stays NaN), so the two paths write the same bits. A negative slot is a padding token: skipped.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec.h"

namespace {

// Rows per task: a decode step's few rows stay on one thread.
constexpr int64_t kGrainBytes = 1 << 18;

// n elements of src as dst's type, rounded as at::BFloat16 / at::Half / c10's fp8 types round
template <typename S, typename C>
void convert_row(C* dst, const S* src, int64_t n) {
  if constexpr (std::is_same_v<S, C>) {
    std::memcpy(dst, src, n * sizeof(C));
  } else {
    // float32 stores as is; the half store is the F16C conversion, IEEE round to nearest even
    // with subnormals; fp8 is c10's conversion in vector lanes (vec.h); bf16 by storev_exact
    // (storev's AVX512-BF16 instruction flushes subnormals)
    int64_t i = 0;
    for (; i + tvec::kW <= n; i += tvec::kW) {
      if constexpr (std::is_same_v<C, at::BFloat16>)
        tvec::storev_exact(dst + i, tvec::loadv(src + i));
      else
        tvec::storev(dst + i, tvec::loadv(src + i));
    }
    for (; i < n; ++i) tvec::store(dst + i, tvec::load(src + i));
  }
}

template <typename S, typename C>
void write_impl(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                at::Tensor& v_cache, const int64_t* slots) {
  const int64_t t = key.size(0), row = key.size(1) * key.size(2);
  const S* kp = reinterpret_cast<const S*>(key.data_ptr());
  const S* vp = reinterpret_cast<const S*>(value.data_ptr());
  C* kc = reinterpret_cast<C*>(k_cache.data_ptr());
  C* vc = reinterpret_cast<C*>(v_cache.data_ptr());
  const int64_t ks = key.stride(0), vs = value.stride(0);
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / (2 * row * (int64_t)sizeof(S)));
  at::parallel_for(0, t, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = slots[i];
      if (s < 0) continue;
      convert_row(kc + s * row, kp + i * ks, row);
      convert_row(vc + s * row, vp + i * vs, row);
    }
  });
}

template <typename S>
void write_from(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                at::Tensor& v_cache, const int64_t* slots) {
  switch (k_cache.scalar_type()) {
    case at::kFloat: write_impl<S, float>(key, value, k_cache, v_cache, slots); break;
    case at::kBFloat16: write_impl<S, at::BFloat16>(key, value, k_cache, v_cache, slots); break;
    case at::kHalf: write_impl<S, at::Half>(key, value, k_cache, v_cache, slots); break;
    case at::kFloat8_e4m3fn:
      write_impl<S, c10::Float8_e4m3fn>(key, value, k_cache, v_cache, slots); break;
    case at::kFloat8_e5m2:
      write_impl<S, c10::Float8_e5m2>(key, value, k_cache, v_cache, slots); break;
    default: TORCH_CHECK(false, "write_kv_cache: a float32, bfloat16, float16 or fp8 cache only");
  }
}

// key, value: [T, Hkv, D] (rows may be strided, heads dense); caches: contiguous
// [num_blocks, block_size, Hkv, D] of one dtype; slot_mapping: [T] int64
void write_kv_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache,
                    at::Tensor v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv_cache: k_cache and v_cache must be contiguous, of one shape and dtype");
  const int64_t hkv = k_cache.size(2), d = k_cache.size(3);
  for (const at::Tensor* x : {&key, &value})
    TORCH_CHECK(x->dim() == 3 && x->size(1) == hkv && x->size(2) == d && x->stride(2) == 1 &&
                x->stride(1) == d && x->size(0) == slot_mapping.size(0) &&
                x->scalar_type() == key.scalar_type(),
                "write_kv_cache: key and value must be [T, Hkv, D] with dense heads, of one dtype");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
              slot_mapping.scalar_type() == at::kLong, "write_kv_cache: slot_mapping: [T] int64");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t i = 0; i < slot_mapping.size(0); ++i)
    TORCH_CHECK(slots[i] < num_slots, "write_kv_cache: slot ", slots[i], " out of range");
  switch (key.scalar_type()) {
    case at::kFloat: write_from<float>(key, value, k_cache, v_cache, slots); break;
    case at::kBFloat16: write_from<at::BFloat16>(key, value, k_cache, v_cache, slots); break;
    case at::kHalf: write_from<at::Half>(key, value, k_cache, v_cache, slots); break;
    default: TORCH_CHECK(false, "write_kv_cache: float32, bfloat16 or float16 keys only");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera_cpu, m) {
  m.def("write_kv_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(tessera_cpu, CPU, m) { m.impl("write_kv_cache", &write_kv_cache); }
