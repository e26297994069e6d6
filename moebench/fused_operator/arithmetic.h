// The fused operator's arithmetic, one source for four builds: which path this build is, and 16 floats at
// a time on it. products.h adds the integer products, peaks.h the instructions' own peaks.
#pragma once
#if defined(__AVX512VNNI__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <map>
#include <string>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#if defined(__AMX_INT8__) && defined(__AVX512VNNI__)
constexpr const char* KERNEL = "amx";
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr const char* KERNEL = "vnni";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* KERNEL = "avx2";
#else
constexpr const char* KERNEL = "portable";
#endif

// ---------------------------------------------------------------- 16 floats at a time
#if defined(__AVX512F__)
struct F16 { __m512 v; };
inline F16 load16(const float* p) { return {_mm512_loadu_ps(p)}; }
// the first `count` (1..16) floats at p, zeros after them; nothing past them is read
inline F16 load_first(const float* p, int count) { return {_mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), p)}; }
inline void store16(float* p, F16 a) { _mm512_storeu_ps(p, a.v); }
inline F16 splat16(float x) { return {_mm512_set1_ps(x)}; }
inline F16 fma16(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F16 add16(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 mul16(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 max16(F16 a, F16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F16 from_int32x16(const int32_t* p) { return {_mm512_cvtepi32_ps(_mm512_loadu_si512(p))}; }
inline float reduce_max16(F16 a) { return _mm512_reduce_max_ps(a.v); }
#elif defined(__AVX2__) && defined(__FMA__)
struct F16 { __m256 lo, hi; };
inline F16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256i first_lanes(int count) {  // lane i all ones where i < count
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline F16 load_first(const float* p, int count) {
  return {_mm256_maskload_ps(p, first_lanes(count)), _mm256_maskload_ps(p + 8, first_lanes(count - 8))};
}
inline void store16(float* p, F16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline F16 splat16(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline F16 fma16(F16 a, F16 b, F16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline F16 add16(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F16 mul16(F16 a, F16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F16 max16(F16 a, F16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline F16 from_int32x16(const int32_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
          _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8)))};
}
inline float reduce_max16(F16 a) {
  alignas(32) float x[8];
  _mm256_store_ps(x, _mm256_max_ps(a.lo, a.hi));
  return *std::max_element(x, x + 8);
}
#else
struct F16 { float x[16]; };
inline F16 load16(const float* p) { F16 r; std::copy_n(p, 16, r.x); return r; }
inline F16 load_first(const float* p, int count) { F16 r{}; std::copy_n(p, count, r.x); return r; }
inline void store16(float* p, F16 a) { std::copy_n(a.x, 16, p); }
inline F16 splat16(float v) { F16 r; std::fill_n(r.x, 16, v); return r; }
// a fused multiply-add as the SIMD paths round it, without an FMA instruction: the product of two floats
// is exact in double, so one rounding (but for a double rounding about once in 2^29) to float, not two.
// Values re-quantized to uint8 downstream would otherwise cross a rounding boundary now and then.
inline F16 fma16(F16 a, F16 b, F16 c) {
  for (int i = 0; i < 16; ++i) c.x[i] = (float)((double)a.x[i] * b.x[i] + c.x[i]);
  return c;
}
inline F16 add16(F16 a, F16 b) { for (int i = 0; i < 16; ++i) a.x[i] += b.x[i]; return a; }
inline F16 mul16(F16 a, F16 b) { for (int i = 0; i < 16; ++i) a.x[i] *= b.x[i]; return a; }
inline F16 max16(F16 a, F16 b) { for (int i = 0; i < 16; ++i) a.x[i] = std::max(a.x[i], b.x[i]); return a; }
inline F16 from_int32x16(const int32_t* p) { F16 r; for (int i = 0; i < 16; ++i) r.x[i] = (float)p[i]; return r; }
inline float reduce_max16(F16 a) { return *std::max_element(a.x, a.x + 16); }
#endif

}  // namespace
