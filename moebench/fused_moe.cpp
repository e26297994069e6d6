// The whole model in one PyTorch custom operator: the embedding and the chosen experts' first layers
// as uint8 x int8 products with exact int32 sums, the gate, top-k, softmax and each expert's second
// layer (the head folded into it) in float32. Only the chosen experts run: rows are grouped by expert
// with a counting sort, so no capacity and nothing dropped.
//
// One source, three builds (common/fused.py picks one at run time): compiled with AVX-512 VNNI
// (vpdpbusd), with AVX2 (the same values held as int16, vpmaddwd: exact, no saturation) or as plain
// C++ that compiles anywhere (ARM included). The integer sums are the same in all three; only the
// order of float operations differs.
//
// Quantization (prepared in common/fused.py): pixels are uint8 / 255 by the input contract, so
// round(255 * pixel) is exact; weights are int8 values with one scale per output column;
// the embedding's outputs are re-quantized to uint8 with one scale per row (they are >= 0 after ReLU).
// Threads come from at::parallel_for (compiled with -fopenmp against PyTorch's own OpenMP runtime, which
// the module links no copy of), so torch.set_num_threads() limits them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512VNNI__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
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
// b is packed [K/KPACK][N][KPACK] (common/fused.py's pack()).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
using Act = uint8_t;
using Weight = int8_t;
constexpr int KPACK = 4;  // one 64-byte load holds 4 k of 16 columns, what vpdpbusd multiplies with 4 uint8
template <int R>
inline void tile(const Act* a, int lda, const Weight* b, int k_size, int n_size, int n0, int32_t* c, int ldc) {
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int k = 0; k < k_size; k += 4) {
    const Weight* row = b + (size_t)(k / 4) * n_size * 4 + (size_t)n0 * 4;
    __m512i w0 = _mm512_loadu_si512(row), w1 = _mm512_loadu_si512(row + 64);
    __m512i w2 = _mm512_loadu_si512(row + 128), w3 = _mm512_loadu_si512(row + 192);
    for (int r = 0; r < R; ++r) {
      __m512i x = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + (size_t)r * lda + k));
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x, w0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x, w1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], x, w2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], x, w3);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) _mm512_storeu_si512(c + (size_t)r * ldc + n0 + 16 * t, acc[r][t]);
}
constexpr int TILE_ROWS = 4, TILE_COLS = 64;  // 16 accumulators; six rows spill registers and run slower
#elif defined(__AVX2__)
using Act = int16_t;
using Weight = int16_t;
constexpr int KPACK = 2;  // int16 pairs (k, k+1) of 8 columns per 32 bytes, what vpmaddwd multiplies
// vpmaddwd: a * w + a' * w' into int32, at most 2 * 255 * 127: exact (vpmaddubsw would saturate int16)
constexpr int G = 4;  // 8-column groups per tile: 2 rows x 4 groups = 8 accumulators, 4 weight registers
template <int R>
inline void tile(const Act* a, int lda, const Weight* b, int k_size, int n_size, int n0, int32_t* c, int ldc) {
  __m256i acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < G; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int k = 0; k < k_size; k += 2) {
    int32_t x[R], any = 0;  // most pixels are 0: a pair of k that is 0 in every row adds nothing
    for (int r = 0; r < R; ++r) any |= x[r] = *reinterpret_cast<const int32_t*>(a + (size_t)r * lda + k);
    if (any == 0) continue;
    const Weight* row = b + (size_t)(k / 2) * n_size * 2 + (size_t)n0 * 2;
    __m256i w[G];
    for (int t = 0; t < G; ++t) w[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * t));
    for (int r = 0; r < R; ++r) {
      const __m256i xr = _mm256_set1_epi32(x[r]);
      for (int t = 0; t < G; ++t) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(xr, w[t]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < G; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + (size_t)r * ldc + n0 + 8 * t), acc[r][t]);
}
constexpr int TILE_ROWS = 2, TILE_COLS = 8 * G;  // 2 rows x 32 columns: the fastest of 9 shapes tried here
#else
using Act = uint8_t;
using Weight = int8_t;
constexpr int KPACK = 1;  // plain rows of b: the loop over columns is what compilers vectorize
template <int R>
inline void tile(const Act* a, int lda, const Weight* b, int k_size, int n_size, int n0, int32_t* c, int ldc) {
  for (int r = 0; r < R; ++r) {
    int32_t acc[64] = {0};
    for (int k = 0; k < k_size; ++k) {
      const int32_t x = a[(size_t)r * lda + k];
      if (x == 0) continue;  // most pixels are 0
      const Weight* row = b + (size_t)k * n_size + n0;
      for (int n = 0; n < 64; ++n) acc[n] += x * row[n];
    }
    std::copy_n(acc, 64, c + (size_t)r * ldc + n0);
  }
}
constexpr int TILE_ROWS = 1, TILE_COLS = 64;
#endif

inline void gemm(const Act* a, int lda, int rows, const Weight* b, int k_size, int n_size, int32_t* c, int ldc) {
  const int whole = rows - rows % TILE_ROWS;
  for (int n0 = 0; n0 < n_size; n0 += TILE_COLS)  // a column tile's weights stay in L1 across the rows
    for (int r = 0; r < whole; r += TILE_ROWS)
      tile<TILE_ROWS>(a + (size_t)r * lda, lda, b, k_size, n_size, n0, c + (size_t)r * ldc, ldc);
  for (int r = whole; r < rows; ++r)
    for (int n0 = 0; n0 < n_size; n0 += TILE_COLS)
      tile<1>(a + (size_t)r * lda, lda, b, k_size, n_size, n0, c + (size_t)r * ldc, ldc);
}

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
  const __m256 f = _mm256_set1_ps(factor), zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.0f);
  for (; i + 16 <= count; i += 16) {
    __m256 lo = _mm256_min_ps(top, _mm256_max_ps(zero, _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(in + i), f),
                                                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    __m256 hi = _mm256_min_ps(top, _mm256_max_ps(zero, _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(in + i + 8), f),
                                                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(lo), _mm256_cvtps_epi32(hi)), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), words);  // 16 int16, in order
  }
#endif
  for (; i < count; ++i) out[i] = (Act)round_u8(in[i] * factor);
}

constexpr int ROWS_PER_TASK = 64;  // rows one thread takes at a time

void check_weight(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "moe_fused.int8_forward: weight ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "moe_fused.int8_forward: weight ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "moe_fused.int8_forward: weight ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "moe_fused.int8_forward: weight ", name, " must be contiguous");
}

// Everything the kernel reads is checked here, so a wrong call is one error and never a wild read.
void check_inputs(const at::Tensor& pixels, at::TensorList weights, int64_t top) {
  TORCH_CHECK(weights.size() == 10, "moe_fused.int8_forward: expected 10 weight tensors, got ", weights.size());
  TORCH_CHECK(pixels.device().is_cpu(), "moe_fused.int8_forward: pixels must be a CPU tensor, got ", pixels.device());
  TORCH_CHECK(pixels.scalar_type() == at::kFloat, "moe_fused.int8_forward: pixels must be float32, got ",
              pixels.scalar_type());
  TORCH_CHECK(pixels.dim() >= 2 && pixels.numel() == pixels.size(0) * 784,
              "moe_fused.int8_forward: pixels must be (N, 1, 28, 28) or (N, 784), got ", pixels.sizes());
  TORCH_CHECK(weights[2].dim() == 1 && weights[6].dim() == 2 && weights[9].dim() == 1,
              "moe_fused.int8_forward: embed_bias, fc1_bias and head_bias must be 1-, 2- and 1-dimensional");
  const int64_t emb = weights[2].size(0), experts = weights[6].size(0), hidden = weights[6].size(1);
  const int64_t classes = weights[9].size(0);
  TORCH_CHECK(emb > 0 && emb % 64 == 0 && hidden > 0 && hidden % 64 == 0,
              "moe_fused.int8_forward: EMB_SIZE and HIDDEN_SIZE must be positive multiples of 64, got ", emb,
              " and ", hidden);
  TORCH_CHECK(1 <= top && top <= experts && experts <= 16,
              "moe_fused.int8_forward: needs 1 <= TOP <= EXPERTS <= 16, got TOP ", top, ", EXPERTS ", experts);
  TORCH_CHECK(1 <= classes && classes <= 16, "moe_fused.int8_forward: needs 1 to 16 classes, got ", classes);
  const auto weight_type = sizeof(Weight) == 1 ? at::kChar : at::kShort;
  check_weight(weights[0], "embed_q", weight_type, {784 / KPACK, emb, KPACK});
  check_weight(weights[1], "embed_scale", at::kFloat, {emb});
  check_weight(weights[2], "embed_bias", at::kFloat, {emb});
  check_weight(weights[3], "gate_w", at::kFloat, {emb, 16});
  check_weight(weights[4], "fc1_q", weight_type, {experts, emb / KPACK, hidden, KPACK});
  check_weight(weights[5], "fc1_scale", at::kFloat, {experts, hidden});
  check_weight(weights[6], "fc1_bias", at::kFloat, {experts, hidden});
  check_weight(weights[7], "fc2_w", at::kFloat, {experts, hidden, 16});
  check_weight(weights[8], "fc2_b", at::kFloat, {experts, 16});
  check_weight(weights[9], "head_bias", at::kFloat, {classes});
}

}  // namespace

// pixels (N, 1, 28, 28) float32 -> (logits (N, C), gates (N, E)).
// weights: embed_q, embed_scale, embed_bias, gate_w, fc1_q, fc1_scale, fc1_bias, fc2_w, fc2_b, head_bias
std::vector<at::Tensor> moe_int8_forward(const at::Tensor& pixels_in, at::TensorList weights, int64_t top) {
  check_inputs(pixels_in, weights, top);
  const at::Tensor pixels = pixels_in.contiguous();  // held for the whole call: the kernel reads its memory
  const int n = pixels.size(0), k_in = 784;
  const int emb = weights[2].size(0), experts = weights[6].size(0), hidden = weights[6].size(1);
  const int classes = weights[9].size(0), c_pad = 16;  // class scores padded to 16 floats
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor logits = at::empty({n, classes}, f32), gates = at::zeros({n, experts}, f32);
  const float* px = pixels.data_ptr<float>();
  const Weight* eq = static_cast<const Weight*>(weights[0].data_ptr());
  const float *es = weights[1].data_ptr<float>(), *eb = weights[2].data_ptr<float>();
  const float* gw = weights[3].data_ptr<float>();
  const Weight* f1 = static_cast<const Weight*>(weights[4].data_ptr());
  const float *f1s = weights[5].data_ptr<float>(), *f1b = weights[6].data_ptr<float>();
  const float *f2 = weights[7].data_ptr<float>(), *f2b = weights[8].data_ptr<float>();
  const float* hb = weights[9].data_ptr<float>();
  float* out = logits.data_ptr<float>();
  float* g = gates.data_ptr<float>();

  std::vector<Act> quantized((size_t)n * emb);  // the embedding, uint8 values per row
  std::vector<float> row_scale(n);
  std::vector<int32_t> chosen((size_t)n * top);

  // 1. embedding (uint8 pixels x int8 weights), gate, top-k, softmax, re-quantized embedding
  const int64_t blocks = (n + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  at::parallel_for(0, blocks, 2, [&](int64_t first, int64_t last) {
    const int task = std::min(ROWS_PER_TASK, n);  // buffers sized to the batch, left uninitialised
    std::unique_ptr<Act[]> a(new Act[(size_t)task * k_in]);
    std::unique_ptr<int32_t[]> acc(new int32_t[(size_t)task * emb]);
    std::vector<float> e(emb);
    alignas(64) float logit[16];
    char taken[16];
    for (int64_t block = first; block < last; ++block) {
      const int start = (int)block * ROWS_PER_TASK, rows = std::min(ROWS_PER_TASK, n - start);
      quantize(px + (size_t)start * k_in, rows * k_in, 255.0f, a.get());
      gemm(a.get(), k_in, rows, eq, k_in, emb, acc.get(), emb);
      for (int r = 0; r < rows; ++r) {
        const int row = start + r;
        F16 peak16 = splat16(0.0f), logit16 = splat16(0.0f);
        for (int j = 0; j < emb; j += 16) {
          F16 v = fma16(from_int32x16(acc.get() + (size_t)r * emb + j), load16(es + j), load16(eb + j));
          v = max16(v, splat16(0.0f));
          store16(e.data() + j, v);
          peak16 = max16(peak16, v);
        }
        for (int j = 0; j < emb; ++j)  // the gate, its columns padded to 16
          logit16 = fma16(splat16(e[j]), load16(gw + (size_t)j * 16), logit16);
        store16(logit, logit16);
        const float peak = reduce_max16(peak16);
        float* gate_row = g + (size_t)row * experts;
        float norm = 0.0f, best = -INFINITY;
        std::fill_n(taken, 16, 0);
        for (int t = 0; t < top; ++t) {  // top-k, the lowest index first among equals (as ONNX TopK)
          int pick = -1;
          for (int x = 0; x < experts; ++x)
            if (!taken[x] && (pick < 0 || logit[x] > logit[pick])) pick = x;
          taken[pick] = 1;
          chosen[(size_t)row * top + t] = pick;
          best = std::max(best, logit[pick]);
        }
        for (int t = 0; t < top; ++t) {
          const int x = chosen[(size_t)row * top + t];
          gate_row[x] = std::exp(logit[x] - best);
          norm += gate_row[x];
        }
        for (int t = 0; t < top; ++t) gate_row[chosen[(size_t)row * top + t]] /= norm;
        const float scale = peak > 0.0f ? peak / 255.0f : 1.0f;
        row_scale[row] = scale;
        quantize(e.data(), emb, 1.0f / scale, quantized.data() + (size_t)row * emb);
      }
    }
  });

  // 2. rows grouped by expert (a counting sort), then each expert on its rows only
  std::vector<int> count(experts + 1, 0), order((size_t)n * top);
  for (size_t s = 0; s < (size_t)n * top; ++s) ++count[chosen[s] + 1];
  for (int x = 0; x < experts; ++x) count[x + 1] += count[x];
  {
    std::vector<int> fill(count.begin(), count.end() - 1);
    for (size_t s = 0; s < (size_t)n * top; ++s) order[fill[chosen[s]]++] = (int)(s / top);
  }
  // every (expert, block of its rows) is one task; each slot's weighted output goes to its own place
  // in `part`, so two experts of one row never write the same memory
  std::vector<std::pair<int, int>> tasks;  // (expert, first position in order)
  for (int x = 0; x < experts; ++x)
    for (int start = count[x]; start < count[x + 1]; start += ROWS_PER_TASK) tasks.emplace_back(x, start);
  std::vector<float> part((size_t)n * top * 16);
  const int task_rows = std::min(ROWS_PER_TASK, n * (int)top);
  auto run_tasks = [&](int64_t first, int64_t last) {
    std::unique_ptr<Act[]> a(new Act[(size_t)task_rows * emb]);
    std::unique_ptr<int32_t[]> acc(new int32_t[(size_t)task_rows * hidden]);
    std::unique_ptr<float[]> h(new float[(size_t)task_rows * hidden]);
    for (int64_t t = first; t < last; ++t) {
      const int x = tasks[t].first, start = tasks[t].second;
      const int rows = std::min(ROWS_PER_TASK, count[x + 1] - start);
      const Weight* w1 = f1 + (size_t)x * emb * hidden;
      const float *s1 = f1s + (size_t)x * hidden, *b1 = f1b + (size_t)x * hidden;
      const float *w2 = f2 + (size_t)x * hidden * c_pad, *b2 = f2b + (size_t)x * c_pad;
      for (int r = 0; r < rows; ++r)
        std::copy_n(quantized.data() + (size_t)order[start + r] * emb, emb, a.get() + (size_t)r * emb);
      gemm(a.get(), emb, rows, w1, emb, hidden, acc.get(), hidden);
      for (int r = 0; r < rows; ++r) {  // hidden = ReLU(dequantised products + bias)
        const F16 scale = splat16(row_scale[order[start + r]]);
        for (int j = 0; j < hidden; j += 16) {
          F16 v = mul16(from_int32x16(acc.get() + (size_t)r * hidden + j), scale);
          store16(h.get() + (size_t)r * hidden + j, max16(fma16(v, load16(s1 + j), load16(b1 + j)), splat16(0.0f)));
        }
      }
      for (int r0 = 0; r0 < rows; r0 += 4) {  // second layer, four rows sharing each weight row
        const int group = std::min(4, rows - r0);
        F16 y[4][2];
        for (int r = 0; r < 4; ++r) y[r][0] = load16(b2), y[r][1] = splat16(0.0f);
        for (int j = 0; j < hidden; ++j) {
          const F16 w = load16(w2 + (size_t)j * c_pad);
          for (int r = 0; r < group; ++r)
            y[r][j & 1] = fma16(splat16(h[(size_t)(r0 + r) * hidden + j]), w, y[r][j & 1]);
        }
        for (int r = 0; r < group; ++r) {
          const float weight = g[(size_t)order[start + r0 + r] * experts + x];
          store16(part.data() + (size_t)(start + r0 + r) * 16, mul16(splat16(weight), add16(y[r][0], y[r][1])));
        }
      }
    }
  };
  if (tasks.size() >= 4) {
    at::parallel_for(0, (int64_t)tasks.size(), 1, run_tasks);
  } else {
    run_tasks(0, (int64_t)tasks.size());
  }
  std::vector<int> slot_of((size_t)n * top);  // where each row's slots landed in order
  {
    std::vector<int> seen(n, 0);
    for (int position = 0; position < n * (int)top; ++position) {
      const int row = order[position];
      slot_of[(size_t)row * top + seen[row]++] = position;
    }
  }
  for (int row = 0; row < n; ++row) {
    F16 sum = splat16(0.0f);
    for (int t = 0; t < top; ++t) sum = add16(sum, load16(part.data() + (size_t)slot_of[(size_t)row * top + t] * 16));
    alignas(64) float result[16];
    store16(result, sum);
    for (int c = 0; c < classes; ++c) out[(size_t)row * classes + c] = result[c] + hb[c];
  }
  return {logits, gates};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("kernel") = KERNEL;
  // the GIL is released while the kernel computes, so other Python threads (a server's event loop) run
  m.def("int8_forward", [](const at::Tensor& pixels, std::vector<at::Tensor> weights, int64_t top) {
    return moe_int8_forward(pixels, weights, top);
  }, pybind11::call_guard<pybind11::gil_scoped_release>());
}

// torch.ops.<module name>.int8_forward: each build registers under its own name (moe_fused_vnni, ...)
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("int8_forward(Tensor pixels, Tensor[] weights, int top) -> Tensor[]");
  m.impl("int8_forward", torch::kCPU, &moe_int8_forward);
}
