// The product instructions' own peaks, for benchmark.py's limits. fused_moe.cpp includes it.
#pragma once
#include "products.h"

namespace {

// ---------------------------------------------------------------- the product instructions' own peaks
// Multiply-adds per second of loops of nothing but the path's product instructions on registers, on
// this thread for about `seconds` each: what no kernel on the path can beat. {instruction: rate}
inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

inline std::map<std::string, double> instruction_peaks(double seconds) {
  std::map<std::string, double> peaks;
  long rounds = 0;
  double elapsed = 0.0;
  auto start = std::chrono::steady_clock::now();
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // written in assembly: in C++ the compiler merges sums it can prove equal, or keeps them in memory,
  // and either way the loop is no longer the instruction alone. Twelve independent sums hide its latency.
  const __m512i x = _mm512_set1_epi32(0x01010101), w = _mm512_set1_epi32(0x01020304);
  do {
    long n = 4096;
    asm volatile(
        "1:\n\t"
        "vpdpbusd %[w], %[x], %%zmm0\n\t" "vpdpbusd %[w], %[x], %%zmm1\n\t" "vpdpbusd %[w], %[x], %%zmm2\n\t"
        "vpdpbusd %[w], %[x], %%zmm3\n\t" "vpdpbusd %[w], %[x], %%zmm4\n\t" "vpdpbusd %[w], %[x], %%zmm5\n\t"
        "vpdpbusd %[w], %[x], %%zmm6\n\t" "vpdpbusd %[w], %[x], %%zmm7\n\t" "vpdpbusd %[w], %[x], %%zmm8\n\t"
        "vpdpbusd %[w], %[x], %%zmm9\n\t" "vpdpbusd %[w], %[x], %%zmm10\n\t" "vpdpbusd %[w], %[x], %%zmm11\n\t"
        "dec %[n]\n\t"
        "jnz 1b"
        : [n] "+r"(n)
        : [x] "v"(x), [w] "v"(w)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "cc");
    rounds += 4096;
  } while ((elapsed = seconds_since(start)) < seconds);
  peaks["vpdpbusd"] = rounds * 12.0 * 64 / elapsed;
#elif defined(__AVX2__)
  // the same in assembly, for the same reason: six products and six sums a round, twelve registers
  const __m256i x = _mm256_set1_epi32(0x00010001), w = _mm256_set1_epi32(0x00020003);
  do {
    long n = 4096;
    asm volatile(
        "1:\n\t"
        "vpmaddwd %[w], %[x], %%ymm0\n\t" "vpmaddwd %[w], %[x], %%ymm1\n\t" "vpmaddwd %[w], %[x], %%ymm2\n\t"
        "vpmaddwd %[w], %[x], %%ymm3\n\t" "vpmaddwd %[w], %[x], %%ymm4\n\t" "vpmaddwd %[w], %[x], %%ymm5\n\t"
        "vpaddd %%ymm0, %%ymm6, %%ymm6\n\t" "vpaddd %%ymm1, %%ymm7, %%ymm7\n\t" "vpaddd %%ymm2, %%ymm8, %%ymm8\n\t"
        "vpaddd %%ymm3, %%ymm9, %%ymm9\n\t" "vpaddd %%ymm4, %%ymm10, %%ymm10\n\t" "vpaddd %%ymm5, %%ymm11, %%ymm11\n\t"
        "dec %[n]\n\t"
        "jnz 1b"
        : [n] "+r"(n)
        : [x] "x"(x), [w] "x"(w)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "cc");
    rounds += 4096;
  } while ((elapsed = seconds_since(start)) < seconds);
  peaks["vpmaddwd + vpaddd"] = rounds * 6.0 * 16 / elapsed;
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
  (void)rounds, (void)elapsed, (void)start;
  return peaks;
}

}  // namespace
