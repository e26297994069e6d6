// Exact uint8 x int8 (or int16) products into int32 sums on each path, the AMX tiles where the build has
// them, and float -> uint8 values. fused_moe.cpp includes it.
#pragma once
#include "arithmetic.h"

namespace {

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
// 16 columns (b packed [K/4][16][4]) for R rows, the groups split between C sums per row that are
// added at the end: a single row's chain of products would otherwise wait on itself
template <int R, int C>
inline void narrow_tile(const Act* a, int lda, const Weight* b, const int* ks, int groups, int32_t* c) {
  __m512i acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) acc[r][i] = _mm512_setzero_si512();
  int g = 0;
  for (; g + C <= groups; g += C)
    for (int i = 0; i < C; ++i) {
      const int k = ks[g + i];
      const __m512i w = _mm512_loadu_si512(b + (size_t)k * 16);
      for (int r = 0; r < R; ++r)
        acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + (size_t)r * lda + k)), w);
    }
  for (; g < groups; ++g) {
    const __m512i w = _mm512_loadu_si512(b + (size_t)ks[g] * 16);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + (size_t)r * lda + ks[g])), w);
  }
  for (int r = 0; r < R; ++r) {
    for (int i = 1; i < C; ++i) acc[r][0] = _mm512_add_epi32(acc[r][0], acc[r][i]);
    _mm512_storeu_si512(c + (size_t)r * 16, acc[r][0]);
  }
}
constexpr int NARROW_ROWS = 4, NARROW_CHAINS = 2, ROW_NARROW_CHAINS = 4;
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
// 16 columns (b packed [K/2][16][2]) for R rows; C sums per row (see the AVX-512 path)
template <int R, int C>
inline void narrow_tile(const Act* a, int lda, const Weight* b, const int* ks, int groups, int32_t* c) {
  __m256i acc[R][C][2];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) acc[r][i][0] = acc[r][i][1] = _mm256_setzero_si256();
  for (int g = 0; g < groups; ++g) {
    const int k = ks[g], i = g % C;
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (size_t)k * 16));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (size_t)k * 16 + 16));
    for (int r = 0; r < R; ++r) {
      const __m256i x = _mm256_set1_epi32(pair_of(a + (size_t)r * lda + k));
      acc[r][i][0] = _mm256_add_epi32(acc[r][i][0], _mm256_madd_epi16(x, w0));
      acc[r][i][1] = _mm256_add_epi32(acc[r][i][1], _mm256_madd_epi16(x, w1));
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int i = 1; i < C; ++i)
      for (int h = 0; h < 2; ++h) acc[r][0][h] = _mm256_add_epi32(acc[r][0][h], acc[r][i][h]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + (size_t)r * 16), acc[r][0][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + (size_t)r * 16 + 8), acc[r][0][1]);
  }
}
constexpr int NARROW_ROWS = 4, NARROW_CHAINS = 1, ROW_NARROW_CHAINS = 2;
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
template <int R, int C>
inline void narrow_tile(const Act* a, int lda, const Weight* b, const int* ks, int groups, int32_t* c) {
  for (int r = 0; r < R; ++r) {
    int32_t acc[16] = {0};
    for (int g = 0; g < groups; ++g) {
      const int32_t x = a[(size_t)r * lda + ks[g]];
      for (int n = 0; n < 16; ++n) acc[n] += x * b[(size_t)ks[g] * 16 + n];
    }
    std::copy_n(acc, 16, c + (size_t)r * 16);
  }
}
constexpr int NARROW_ROWS = 1, NARROW_CHAINS = 1, ROW_NARROW_CHAINS = 1;
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

// Column slices outside, row tiles inside: a slice's weights are read from memory once per call and
// then from cache for every row tile (a large expert's weights do not fit any cache whole). Each row
// tile's nonzero groups are found once and kept for every slice.
inline void register_gemm(const Act* a, int lda, int rows, const Weight* b, int k_size, int n_size, int32_t* c,
                          int ldc) {
  thread_local std::vector<int> ks, counts;
  const int tiles = rows / TILE_ROWS, groups_per_row = (k_size + KPACK - 1) / KPACK;
  if ((int)ks.size() < (tiles + 1) * groups_per_row) ks.resize((size_t)(tiles + 1) * groups_per_row);
  if ((int)counts.size() < tiles) counts.resize(tiles);
  for (int t = 0; t < tiles; ++t)
    counts[t] = nonzero_groups<TILE_ROWS>(a + (size_t)t * TILE_ROWS * lda, lda, k_size, ks.data() + (size_t)t * groups_per_row);
  for (int n0 = 0; n0 < n_size; n0 += TILE_COLS)
    for (int t = 0; t < tiles; ++t)
      tile<TILE_ROWS>(a + (size_t)t * TILE_ROWS * lda, lda, b, ks.data() + (size_t)t * groups_per_row, counts[t], n_size, n0,
                      c + (size_t)t * TILE_ROWS * ldc, ldc);
  int* row_ks = ks.data() + (size_t)tiles * groups_per_row;
  for (int r = tiles * TILE_ROWS; r < rows; ++r) {
    const int groups = nonzero_groups<1>(a + (size_t)r * lda, lda, k_size, row_ks);
    row_tile(a + (size_t)r * lda, b, row_ks, groups, n_size, c + (size_t)r * ldc);
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
  // 64 at a time: two saturating packs and one permute back into order, cheaper than four
  // down-conversions (vpmovusdb), and the same values
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (; i + 64 <= count; i += 64) {
    __m512i v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm512_cvtps_epi32(_mm512_max_ps(zero, _mm512_mul_ps(_mm512_loadu_ps(in + i + 16 * j), f)));
    const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(v[0], v[1]), _mm512_packus_epi32(v[2], v[3]));
    _mm512_storeu_si512(out + i, _mm512_permutexvar_epi32(order, bytes));
  }
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

}  // namespace
