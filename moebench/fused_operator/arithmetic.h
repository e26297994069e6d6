// The fused operator's arithmetic, one source for four builds: 16 floats at a time, exact uint8 x int8
// (or int16) products into int32 sums, and float -> uint8 values. fused_moe.cpp includes it.
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
inline void store16(float* p, F16 a) { std::copy_n(a.x, 16, p); }
inline F16 splat16(float v) { F16 r; std::fill_n(r.x, 16, v); return r; }
inline F16 fma16(F16 a, F16 b, F16 c) { for (int i = 0; i < 16; ++i) c.x[i] += a.x[i] * b.x[i]; return c; }
inline F16 add16(F16 a, F16 b) { for (int i = 0; i < 16; ++i) a.x[i] += b.x[i]; return a; }
inline F16 mul16(F16 a, F16 b) { for (int i = 0; i < 16; ++i) a.x[i] *= b.x[i]; return a; }
inline F16 max16(F16 a, F16 b) { for (int i = 0; i < 16; ++i) a.x[i] = std::max(a.x[i], b.x[i]); return a; }
inline F16 from_int32x16(const int32_t* p) { F16 r; for (int i = 0; i < 16; ++i) r.x[i] = (float)p[i]; return r; }
inline float reduce_max16(F16 a) { return *std::max_element(a.x, a.x + 16); }
#endif

// ---------------------------------------------------------------- exact integer products
// c[r][0..N) = sum_k a[r][k] * b[k][n] for `rows` rows, N a multiple of 64. Activations are uint8
// values (0..255), weights int8 values (-127..127); each path stores them as it multiplies them:
// b is packed [K/KPACK][N][KPACK] (moebench/fused.py's pack()).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
using Act = uint8_t;
using Weight = int8_t;
constexpr int KPACK = 4;  // one 64-byte load holds 4 k of 16 columns, what vpdpbusd multiplies with 4 uint8
// R rows x 16T columns from n0, over the groups of 4 k listed in ks (those not zero in every row)
template <int R, int T = 4>
inline void tile(const Act* a, int lda, const Weight* b, const int* ks, int groups, int n_size, int n0, int32_t* c,
                 int ldc) {
  __m512i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int g = 0; g < groups; ++g) {
    const int k = ks[g];
    const Weight* row = b + (size_t)(k / 4) * n_size * 4 + (size_t)n0 * 4;
    __m512i w[T];
    for (int t = 0; t < T; ++t) w[t] = _mm512_loadu_si512(row + 64 * t);
    for (int r = 0; r < R; ++r) {
      const __m512i xr = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + (size_t)r * lda + k));
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], xr, w[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) _mm512_storeu_si512(c + (size_t)r * ldc + n0 + 16 * t, acc[r][t]);
}
constexpr int TILE_ROWS = 4, TILE_COLS = 64;  // 16 accumulators; six rows spill registers and run slower
// one row alone: 8 independent sums of 128 columns, so the chain of products is not waited on
inline void row_tile(const Act* a, const Weight* b, const int* ks, int groups, int n_size, int32_t* c) {
  int n0 = 0;
  for (; n0 + 128 <= n_size; n0 += 128) tile<1, 8>(a, 0, b, ks, groups, n_size, n0, c, 0);
  for (; n0 < n_size; n0 += 64) tile<1, 4>(a, 0, b, ks, groups, n_size, n0, c, 0);
}
#elif defined(__AVX2__)
using Act = uint8_t;
using Weight = int16_t;
constexpr int KPACK = 2;  // int16 pairs (k, k+1) of 8 columns per 32 bytes, what vpmaddwd multiplies
// vpmaddwd: a * w + a' * w' into int32, at most 2 * 255 * 127: exact (vpmaddubsw would saturate int16).
// The activations stay bytes in memory (half the traffic); a pair becomes two int16 when broadcast.
inline int32_t pair_of(const Act* p) { return (int32_t)p[0] | (int32_t)p[1] << 16; }
constexpr int G = 8;  // 8-column groups per tile: 8 accumulators, the weights read from memory
template <int R>
inline void tile(const Act* a, int lda, const Weight* b, const int* ks, int groups, int n_size, int n0, int32_t* c,
                 int ldc) {
  __m256i acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < G; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int g = 0; g < groups; ++g) {
    const int k = ks[g];
    const Weight* row = b + (size_t)(k / 2) * n_size * 2 + (size_t)n0 * 2;
    __m256i w[G];
    for (int t = 0; t < G; ++t) w[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * t));
    for (int r = 0; r < R; ++r) {
      const __m256i xr = _mm256_set1_epi32(pair_of(a + (size_t)r * lda + k));
      for (int t = 0; t < G; ++t) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(xr, w[t]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < G; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + (size_t)r * ldc + n0 + 8 * t), acc[r][t]);
}
constexpr int TILE_ROWS = 1, TILE_COLS = 8 * G;  // one row: only its own nonzero pairs are multiplied
inline void row_tile(const Act* a, const Weight* b, const int* ks, int groups, int n_size, int32_t* c) {
  for (int n0 = 0; n0 < n_size; n0 += TILE_COLS) tile<1>(a, 0, b, ks, groups, n_size, n0, c, 0);
}
#else
using Act = uint8_t;
using Weight = int8_t;
constexpr int KPACK = 1;  // plain rows of b: the loop over columns is what compilers vectorize
// GCC's unroll-and-jam (-O3) would fuse two groups into one scalar loop over the columns: kept off
template <int R>
__attribute__((optimize("no-loop-unroll-and-jam")))
inline void tile(const Act* a, int lda, const Weight* b, const int* ks, int groups, int n_size, int n0, int32_t* c,
                 int ldc) {
  for (int r = 0; r < R; ++r) {
    int32_t acc[64] = {0};
    for (int g = 0; g < groups; ++g) {
      const int32_t x = a[(size_t)r * lda + ks[g]];
      const Weight* row = b + (size_t)ks[g] * n_size + n0;
      for (int n = 0; n < 64; ++n) acc[n] += x * row[n];
    }
    std::copy_n(acc, 64, c + (size_t)r * ldc + n0);
  }
}
constexpr int TILE_ROWS = 1, TILE_COLS = 64;
inline void row_tile(const Act* a, const Weight* b, const int* ks, int groups, int n_size, int32_t* c) {
  for (int n0 = 0; n0 < n_size; n0 += TILE_COLS) tile<1>(a, 0, b, ks, groups, n_size, n0, c, 0);
}
#endif

// The groups of KPACK k (their offsets, into ks) that are not zero in every one of R rows: most pixels
// are 0 (the borders of every image), and a group of zeros adds nothing. Branch-free, so that the
// pattern of strokes costs no mispredicted branch per group.
template <int R>
inline int nonzero_groups(const Act* a, int lda, int k_size, int* ks) {
  int groups = 0;
  for (int k = 0; k < k_size; k += KPACK) {
    uint32_t any = 0;
    for (int r = 0; r < R; ++r) {
      uint32_t bits = 0;
      std::memcpy(&bits, a + (size_t)r * lda + k, sizeof(Act) * KPACK);
      any |= bits;
    }
    ks[groups] = k;
    groups += any != 0;
  }
  return groups;
}

// Each row tile once over all columns: its nonzero groups are found once, and the weights (the
// embedding's 100 KB does not fit L1 in column tiles either) stream from L2
inline void register_gemm(const Act* a, int lda, int rows, const Weight* b, int k_size, int n_size, int32_t* c,
                          int ldc) {
  thread_local std::vector<int> ks;
  if ((int)ks.size() < k_size) ks.resize(k_size);
  const int whole = rows - rows % TILE_ROWS;
  for (int r = 0; r < whole; r += TILE_ROWS) {
    const int groups = nonzero_groups<TILE_ROWS>(a + (size_t)r * lda, lda, k_size, ks.data());
    for (int n0 = 0; n0 < n_size; n0 += TILE_COLS)
      tile<TILE_ROWS>(a + (size_t)r * lda, lda, b, ks.data(), groups, n_size, n0, c + (size_t)r * ldc, ldc);
  }
  for (int r = whole; r < rows; ++r) {
    const int groups = nonzero_groups<1>(a + (size_t)r * lda, lda, k_size, ks.data());
    row_tile(a + (size_t)r * lda, b, ks.data(), groups, n_size, c + (size_t)r * ldc);
  }
}

#if defined(__AMX_INT8__)
// AMX: tiles of 16 rows x 64 bytes; tdpbusd multiplies 16 rows x 64 uint8 by 64 x 16 int8 (the same
// [K/4][N][4] packing as vpdpbusd) into 16 x 16 int32. A 32 x 32 block of sums is four tiles; its
// two row tiles and two weight tiles are the other four of the eight.
constexpr int ROW_PAD = 32;     // rows are computed in pairs of 16-row tiles: buffers hold a multiple of 32
constexpr int K_ALIGN = 64;     // k in chunks of 64: the embedding's 784 pixels are padded to 832 with zeros
constexpr int AMX_MIN_ROWS = 16;  // fewer rows run on the AVX-512 tiles, which waste no rows
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {0};
  uint16_t colsb[16] = {0};
  uint8_t rows[16] = {0};
};

// c (rows rounded up to 32, ldc) = a (rows rounded up to 32, k_size a multiple of 64) x b
inline void amx_gemm(const Act* a, int lda, int rows, const Weight* b, int k_size, int n_size, int32_t* c, int ldc) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  const size_t b_stride = (size_t)n_size * 4;
  for (int r0 = 0; r0 < rows; r0 += 32) {
    for (int n0 = 0; n0 < n_size; n0 += 32) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int k = 0; k < k_size; k += 64) {
        const Weight* w = b + (size_t)(k / 4) * b_stride + (size_t)n0 * 4;
        _tile_loadd(4, a + (size_t)r0 * lda + k, lda);
        _tile_loadd(5, a + (size_t)(r0 + 16) * lda + k, lda);
        _tile_loadd(6, w, b_stride);
        _tile_loadd(7, w + 64, b_stride);
        _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
      }
      int32_t* out = c + (size_t)r0 * ldc + n0;
      _tile_stored(0, out, ldc * 4);
      _tile_stored(1, out + 16, ldc * 4);
      _tile_stored(2, out + (size_t)16 * ldc, ldc * 4);
      _tile_stored(3, out + (size_t)16 * ldc + 16, ldc * 4);
    }
  }
  _tile_release();
}

inline void gemm(const Act* a, int lda, int rows, const Weight* b, int k_size, int n_size, int32_t* c, int ldc) {
  if (rows >= AMX_MIN_ROWS) {
    amx_gemm(a, lda, rows, b, k_size, n_size, c, ldc);
  } else {
    register_gemm(a, lda, rows, b, k_size, n_size, c, ldc);
  }
}
#else
constexpr int ROW_PAD = 1, K_ALIGN = 1;
inline void gemm(const Act* a, int lda, int rows, const Weight* b, int k_size, int n_size, int32_t* c, int ldc) {
  register_gemm(a, lda, rows, b, k_size, n_size, c, ldc);
}
#endif
constexpr int K_IN = 784, K_IN_PADDED = (K_IN + K_ALIGN - 1) / K_ALIGN * K_ALIGN;  // pixels, and as stored
inline int padded_rows(int rows) { return (rows + ROW_PAD - 1) / ROW_PAD * ROW_PAD; }

// ---------------------------------------------------------------- float -> uint8 values
inline float round_u8(float v) { return std::min(255.0f, std::max(0.0f, std::nearbyint(v))); }

// out[i] = round_u8(in[i] * factor): round to nearest even, saturating; the same values on every path
inline void quantize(const float* in, int count, float factor, Act* out) {
  int i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512 f = _mm512_set1_ps(factor), zero = _mm512_setzero_ps();
  for (; i + 16 <= count; i += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_max_ps(zero, _mm512_mul_ps(_mm512_loadu_ps(in + i), f)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtusepi32_epi8(v));
  }
#elif defined(__AVX2__)
  // the conversion rounds to nearest even (the default rounding mode, as nearbyint); packing saturates
  // to int16, then to 0..255
  const __m256 f = _mm256_set1_ps(factor);
  for (; i + 16 <= count; i += 16) {
    const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(in + i), f));
    const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(in + i + 8), f));
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);  // 16 int16, in order
    const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), bytes);
  }
#endif
  for (; i < count; ++i) out[i] = (Act)round_u8(in[i] * factor);
}

// ---------------------------------------------------------------- the product instructions' own peaks
// Multiply-adds per second of loops of nothing but the path's product instructions on registers, on
// this thread for about `seconds` each: what no kernel on the path can beat. {instruction: rate}
// Each loop is written out (no lambda), so that its sums stay in registers.
inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

inline std::map<std::string, double> instruction_peaks(double seconds) {
  std::map<std::string, double> peaks;
  long rounds = 0;
  double elapsed = 0.0;
  volatile int sink = 0;
  auto start = std::chrono::steady_clock::now();
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // ten sums in ten named registers (an array would live in memory): two instructions a cycle, 5 cycles each
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0;
  __m512i x = _mm512_set1_epi32(0x01010101);
  const __m512i w = _mm512_set1_epi32(0x01020304);
  do {
    for (int i = 0; i < 4096; ++i) {
      asm volatile("" : "+v"(x));  // a value the compiler cannot see through: the products really run
      a0 = _mm512_dpbusd_epi32(a0, x, w), a1 = _mm512_dpbusd_epi32(a1, x, w), a2 = _mm512_dpbusd_epi32(a2, x, w);
      a3 = _mm512_dpbusd_epi32(a3, x, w), a4 = _mm512_dpbusd_epi32(a4, x, w), a5 = _mm512_dpbusd_epi32(a5, x, w);
      a6 = _mm512_dpbusd_epi32(a6, x, w), a7 = _mm512_dpbusd_epi32(a7, x, w), a8 = _mm512_dpbusd_epi32(a8, x, w);
      a9 = _mm512_dpbusd_epi32(a9, x, w);
    }
    rounds += 4096;
  } while ((elapsed = seconds_since(start)) < seconds);
  peaks["vpdpbusd"] = rounds * 10.0 * 64 / elapsed;
  sink = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
         _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)), _mm512_add_epi32(a8, a9))));
#elif defined(__AVX2__)
  // six products a round on six opaque values (one value would be multiplied once), six named sums
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m256i x0 = _mm256_set1_epi32(0x00010001), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0;
  const __m256i w = _mm256_set1_epi32(0x00020003);
  do {
    for (int i = 0; i < 4096; ++i) {
      asm volatile("" : "+x"(x0), "+x"(x1), "+x"(x2), "+x"(x3), "+x"(x4), "+x"(x5));
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(x0, w)), a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(x1, w));
      a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(x2, w)), a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(x3, w));
      a4 = _mm256_add_epi32(a4, _mm256_madd_epi16(x4, w)), a5 = _mm256_add_epi32(a5, _mm256_madd_epi16(x5, w));
    }
    rounds += 4096;
  } while ((elapsed = seconds_since(start)) < seconds);
  peaks["vpmaddwd + vpaddd"] = rounds * 6.0 * 16 / elapsed;
  sink = _mm256_extract_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)),
                                               _mm256_add_epi32(a4, a5)), 0);
#endif
#if defined(__AMX_INT8__)
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  alignas(64) static const int8_t block[16 * 64] = {1, 2, 3, 4};
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, block, 64); _tile_loadd(5, block, 64); _tile_loadd(6, block, 64); _tile_loadd(7, block, 64);
  rounds = 0;
  start = std::chrono::steady_clock::now();
  do {
    for (int i = 0; i < 1024; ++i) {
      _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
    }
    rounds += 1024;
  } while ((elapsed = seconds_since(start)) < seconds);
  peaks["tdpbusd"] = rounds * 4.0 * 16 * 16 * 64 / elapsed;
  _tile_release();
#endif
  (void)rounds, (void)elapsed, (void)sink, (void)start;
  return peaks;
}

}  // namespace
