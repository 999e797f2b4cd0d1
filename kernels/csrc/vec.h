// SIMD helpers shared by the CPU kernels: one float vector type `vf` as wide as the build's
// instruction set (AVX-512: 16 lanes, AVX/AVX2: 8, otherwise 4), written with GCC vector
// extensions so the arithmetic is portable, and intrinsics only where the extensions have no
// spelling (horizontal sum, half-precision loads). Every intrinsic has a scalar fallback
// under the same name, chosen at compile time (the build is -march=native, cpu_ext.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace tvec {

// the bits of `from` read as a `To` of the same size (vectors or scalars; compiles to nothing)
template <typename To, typename From> inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}

#if defined(__AVX512F__)
constexpr int kW = 16;
#elif defined(__AVX__)
constexpr int kW = 8;
#else
constexpr int kW = 4;
#endif

typedef float vf __attribute__((vector_size(kW * 4)));
typedef int32_t vi __attribute__((vector_size(kW * 4)));
typedef uint32_t vu __attribute__((vector_size(kW * 4)));

inline vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }
inline vi splati(int32_t x) { return vi{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf select(vi mask, vf a, vf b) { return mask ? a : b; }   // lane-wise mask ? a : b

// lane indices 0..kW-1
inline vi iota() {
  vi v;
  for (int i = 0; i < kW; ++i) v[i] = i;
  return v;
}

inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#elif defined(__AVX__)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
#endif
}

// the horizontal sums of four vectors, into out[0..3]
inline void hsum4(vf a, vf b, vf c, vf d, float* out) {
#if defined(__AVX__) && !defined(__AVX512F__)
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);   // per 128-bit half: partial sums of a, b, c, d
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#else
  out[0] = hsum(a); out[1] = hsum(b); out[2] = hsum(c); out[3] = hsum(d);
#endif
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// scalar loads of one cache element as float32
inline float load(const float* p) { return *p; }
inline float load(const at::BFloat16* p) {
  return bit_cast<float>(static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) << 16);
}
// fp16 -> fp32 with integer ops only (exact for normals and subnormals: the exponent and
// mantissa shifted into place and rescaled by 2^112); infinities and NaNs keep an all-ones
// exponent.
inline float load(const at::Half* p) {
  const uint32_t h = *reinterpret_cast<const uint16_t*>(p);
  const uint32_t em = h & 0x7fffu;
  uint32_t bits = bit_cast<uint32_t>(bit_cast<float>(em << 13) * 0x1p112f);
  bits = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : bits;
  return bit_cast<float>(bits | ((h & 0x8000u) << 16));
}

// fp8 -> fp32, exactly. e4m3fn (vLLM's `fp8`): a normal's exponent and mantissa shifted into
// float32's places and the exponent rebiased (+120) with integer ops; a subnormal (m / 8 *
// 2^-6) as m * 2^-9; 0x7f / 0xff NaN (the format has no infinities). No float arithmetic
// on subnormal floats: 1-2% of N(0, 1) values are e4m3 subnormals, and every such multiply
// took a microcode assist (the fp16-style trick made a decode 3-4x slower).
// e5m2: the top byte of an fp16.
inline float load(const c10::Float8_e4m3fn* p) {
  const uint32_t b = *reinterpret_cast<const uint8_t*>(p);
  const uint32_t em = b & 0x7fu;
  float f = static_cast<float>(em) * 0x1p-9f;   // subnormal (and zero)
  if (em >= 8u) f = bit_cast<float>((em << 20) + (120u << 23));
  f = (b & 0x80u) ? -f : f;
  return em == 0x7fu ? __builtin_nanf("") : f;
}
inline float load(const c10::Float8_e5m2* p) {
  const uint16_t h = static_cast<uint16_t>(*reinterpret_cast<const uint8_t*>(p) << 8);
  return load(reinterpret_cast<const at::Half*>(&h));
}

// kW consecutive cache elements as a float32 vector
inline vf loadv(const float* p) { return loadu(p); }
inline vf loadv(const at::BFloat16* p) {
#if defined(__AVX512F__)
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
#elif defined(__AVX2__)
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
#else
  vf v;
  for (int i = 0; i < kW; ++i) v[i] = load(p + i);
  return v;
#endif
}
inline vf loadv(const at::Half* p) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX__) && defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < kW; ++i) v[i] = load(p + i);
  return v;
#endif
}

// kW bytes zero-extended into 32-bit lanes
inline vu widen_bytes(const void* p) {
  vu v;
#if defined(__AVX512F__)
  v = bit_cast<vu>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  v = bit_cast<vu>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  for (int i = 0; i < kW; ++i) v[i] = static_cast<const uint8_t*>(p)[i];
#endif
  return v;
}

inline vf loadv(const c10::Float8_e4m3fn* p) {
#if (defined(__AVX512F__) || defined(__AVX2__)) && defined(__F16C__)
  // as an fp16 of 2^-8 the value: s eeee mmm -> s 0eeee mmm0000000 (the byte in the high
  // half, an arithmetic shift by one, the sign's copy cleared), which the hardware converter
  // takes, subnormals included; e4m3's NaN (em 0x7f) becomes 1.875 * 2^8 = 480, a value no
  // finite e4m3 has (its largest is 448)
#if defined(__AVX512F__)
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(w, 8), 1),
                                     _mm256_set1_epi16(static_cast<short>(0xbfff)));
  const vf f = _mm512_cvtph_ps(h) * 256.f;
#else
  const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i h = _mm_and_si128(_mm_srai_epi16(_mm_slli_epi16(w, 8), 1),
                                  _mm_set1_epi16(static_cast<short>(0xbfff)));
  const vf f = _mm256_cvtph_ps(h) * 256.f;
#endif
  const vu mag = bit_cast<vu>(f) & 0x7fffffffu;
  return (mag == 0x43f00000u) ? splat(__builtin_nanf("")) : f;   // |f| == 480
#else
  const vu b = widen_bytes(p);
  const vu em = b & 0x7fu;
  const vf sub = __builtin_convertvector(em, vf) * 0x1p-9f;
  const vu mag = (em >= 8u) ? (em << 20) + (120u << 23) : bit_cast<vu>(sub);
  const vu bits = mag | ((b & 0x80u) << 24);
  return (em == 0x7fu) ? splat(__builtin_nanf("")) : bit_cast<vf>(bits);
#endif
}
inline vf loadv(const c10::Float8_e5m2* p) {
#if defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes), 8));
#elif defined(__AVX2__) && defined(__F16C__)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(bytes), 8));
#else
  const vu b = widen_bytes(p);
  const vu em = (b & 0x7fu) << 8;   // the fp16's exponent and mantissa
  vu bits = bit_cast<vu>(bit_cast<vf>(em << 13) * 0x1p112f);
  bits = (em >= 0x7c00u) ? ((em << 13) | 0x7f800000u) : bits;
  return bit_cast<vf>(bits | ((b & 0x80u) << 24));
#endif
}

// float32 -> T, rounded to nearest even (at::BFloat16's and at::Half's own conversions: NaN
// stays NaN), one element or kW consecutive ones; and `round_to<T>`: a float32 value rounded
// to T's precision and kept in float32 (the model dtype's rounding points, as torch's ops).
inline void store(float* p, float x) { *p = x; }
inline void store(at::BFloat16* p, float x) { *p = at::BFloat16(x); }
inline void store(c10::Float8_e4m3fn* p, float x) { *p = c10::Float8_e4m3fn(x); }   // c10's
inline void store(c10::Float8_e5m2* p, float x) { *p = c10::Float8_e5m2(x); }
// float32 -> fp16 bits with integer ops only, IEEE round to nearest even (subnormals, overflow
// to infinity, NaN stays NaN): c10's software conversion, used where the CPU has no F16C,
// relies on float arithmetic that the build's -ffast-math does not keep exact.
inline uint16_t half_bits(float f) {
  uint32_t x = bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: infinity
  if (x >= 0x38800000u) {                                              // a normal half
    x += 0xfffu + ((x >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((x - 0x38000000u) >> 13));
  }
  if (x < 0x33000000u) return static_cast<uint16_t>(sign);             // below half of 2^-24
  const uint32_t shift = 126u - (x >> 23);                             // 14 .. 24
  const uint32_t m = (x & 0x7fffffu) | 0x800000u;
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  r += (rem > half || (rem == half && (r & 1u))) ? 1u : 0u;            // may carry to 2^-14
  return static_cast<uint16_t>(sign | r);
}
inline void store(at::Half* p, float x) { *p = at::Half(half_bits(x), at::Half::from_bits()); }

typedef uint16_t vh __attribute__((vector_size(kW * 2)));

// the bf16 bits of each lane in the low half of a 32-bit lane
inline vu bf16_bits(vf v) {
  const vu b = bit_cast<vu>(v);
  const vu rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  return ((b & 0x7fffffffu) > 0x7f800000u) ? vu{} + 0x7fc0u : rounded;
}

inline void storev(float* p, vf v) { storeu(p, v); }
// bf16 as at::BFloat16 rounds: to nearest even, subnormals kept (the KV cache's store)
inline void storev_exact(at::BFloat16* p, vf v) {
  const vh h = __builtin_convertvector(bf16_bits(v), vh);
  std::memcpy(p, &h, sizeof(h));
}
// the same, except that with AVX512-BF16 one instruction does it and flushes subnormal
// inputs to zero (activations, whose subnormals do not matter)
inline void storev(at::BFloat16* p, vf v) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const __m256bh h = _mm512_cvtneps_pbh(v);
  std::memcpy(p, &h, sizeof(h));
#else
  storev_exact(p, v);
#endif
}
inline void storev(at::Half* p, vf v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__AVX__) && defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int i = 0; i < kW; ++i) store(p + i, v[i]);
#endif
}

// float32 -> fp8 with M mantissa bits and exponent bias B, kW lanes: c10's conversion (round
// to nearest even; below the smallest normal by one float add that rounds the subnormal into
// place; from `limit` up, and where rounding carries into 0x7f, `big`; NaN stays 0x7f) in
// integer lanes instead of its branches: 7-9x faster than the scalar one per element.
typedef uint8_t vb __attribute__((vector_size(kW)));
template <int M, int B>
inline void store_fp8(void* p, vf v, uint32_t limit, uint32_t big) {
  constexpr uint32_t denorm = static_cast<uint32_t>((127 - B) + (23 - M) + 1) << 23;
  constexpr uint32_t min_normal = static_cast<uint32_t>(127 - B + 1) << 23;
  constexpr uint32_t rebias = (static_cast<uint32_t>(B - 127) << 23) + (1u << (22 - M)) - 1u;
  vu b = bit_cast<vu>(v);
  const vu sign = b & 0x80000000u;
  b ^= sign;
  const vu over = (b > 0x7f800000u) ? vu{} + 0x7fu : vu{} + big;
  const vu den = bit_cast<vu>(bit_cast<vf>(b) + bit_cast<vf>(vu{} + denorm)) - denorm;
  vu nor = (b + rebias + ((b >> (23 - M)) & 1u)) >> (23 - M);
  nor = (nor == 0x7fu) ? vu{} + big : nor;
  const vu r = ((b >= limit) ? over : ((b < min_normal) ? den : nor)) | (sign >> 24);
  const vb bytes = __builtin_convertvector(r, vb);
  std::memcpy(p, &bytes, sizeof(bytes));
}
// e5m2: from 65536 up infinity (rounding never reaches 0x7f)
inline void storev(c10::Float8_e5m2* p, vf v) { store_fp8<2, 15>(p, v, 143u << 23, 0x7cu); }
// e4m3fn: from 464 up (480 and infinity included) c10's own result there: NaN in older torch
// versions, 448 in newer ones, read from the c10 this is built against once, at load
inline const uint32_t kE4m3Overflow = c10::Float8_e4m3fn(1e6f).x & 0x7fu;
inline void storev(c10::Float8_e4m3fn* p, vf v) {
  store_fp8<3, 7>(p, v, 1087u << 20, kE4m3Overflow);
}

template <typename T> inline float round_to(float x) {
  T t;
  store(&t, x);
  return load(&t);
}
template <> inline float round_to<float>(float x) { return x; }

template <typename T> inline vf round_to(vf v) {
  T t[kW];
  storev(t, v);
  return loadv(t);
}
template <> inline vf round_to<float>(vf v) { return v; }
template <> inline vf round_to<at::BFloat16>(vf v) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const __m256i h = bit_cast<__m256i>(_mm512_cvtneps_pbh(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  return bit_cast<vf>(bf16_bits(v) << 16);
#endif
}

// Flush-to-zero for this thread while in scope (MXCSR.FTZ; restored after): a result that
// would be subnormal is 0. In attention, a peaked softmax makes probabilities near 1e-38
// whose products with V are subnormal, and each such product took a microcode assist: a
// decode over K with scores spread ~100 wide ran 5-10x slower (any cache dtype). Those terms
// are below 1e-38 of a sum that is at least 1. Inputs are not flushed (no DAZ): the cache
// loads above stay exact.
struct FlushToZero {
#if defined(__SSE__)
  unsigned saved = _mm_getcsr();
  FlushToZero() { _mm_setcsr(saved | 0x8000u); }
  ~FlushToZero() { _mm_setcsr(saved); }
#endif
};

// exp(x) lane-wise, Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-7
// polynomial, 2^n put in the exponent bits (about 1 ulp over the clamped range; below -87.3
// the result is ~1e-38 rather than a subnormal, which softmax and silu never notice; above
// 88.38 it is +inf, as expf's). NaN stays NaN. glibc's expf is scalar here: the compiler does
// not vectorize calls to it.
inline vf vexp(vf x) {
  const vi overflow = x > 88.3762626647949f;
  x = overflow ? splat(88.3762626647949f) : x;
  x = x < -87.3365478515625f ? splat(-87.3365478515625f) : x;
  const vf fx = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);                      // truncates toward zero
  n += (__builtin_convertvector(n, vf) > fx);                  // floor: minus one where it rounded up
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  return overflow ? splat(__builtin_inff()) : y * bit_cast<vf>((n + 127) << 23);
}

}  // namespace tvec
