// The whole model in one PyTorch custom operator, for x86 CPUs with AVX-512 VNNI: the embedding and
// the chosen experts' first layers as uint8 x int8 products (vpdpbusd), the gate, top-k, softmax
// and each expert's second layer (the head folded into it) in float32. Only the chosen experts run:
// rows are grouped by expert with a counting sort, so no capacity and nothing dropped.
//
// Quantization (prepared in common/fused.py): pixels are uint8 / 255 by the input contract, so
// round(255 * pixel) is exact; weights are int8 with one scale per output column; the embedding's
// outputs are re-quantized to uint8 with one scale per row (they are >= 0 after ReLU).
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

namespace {

constexpr int TILE = 64;  // output columns per micro-kernel call: four zmm registers of int32

// C[r][n0..n0+64) = sum_k A[r][k] * B[k][n] for R rows; B packed as [K/4][N][4] int8, so one
// 64-byte load holds 4 k-values for 16 columns, what vpdpbusd multiplies with 4 uint8 of A.
template <int R>
inline void tile_u8s8(const uint8_t* a, int lda, const int8_t* b, int k_size, int n_size, int n0,
                      int32_t* c, int ldc) {
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int k = 0; k < k_size; k += 4) {
    const int8_t* row = b + (size_t)(k / 4) * n_size * 4 + (size_t)n0 * 4;
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

// rows x N int32 products of rows x K uint8 and packed K x N int8 (N a multiple of 64), four rows at
// a time (16 accumulators; six rows spill registers and run slower here).
inline void gemm_u8s8(const uint8_t* a, int lda, int rows, const int8_t* b, int k_size, int n_size,
                      int32_t* c, int ldc) {
  int r = 0;
  for (; r + 4 <= rows; r += 4)
    for (int n0 = 0; n0 < n_size; n0 += TILE) tile_u8s8<4>(a + (size_t)r * lda, lda, b, k_size, n_size, n0, c + (size_t)r * ldc, ldc);
  for (; r < rows; ++r)
    for (int n0 = 0; n0 < n_size; n0 += TILE) tile_u8s8<1>(a + (size_t)r * lda, lda, b, k_size, n_size, n0, c + (size_t)r * ldc, ldc);
}

inline uint8_t to_u8(float v) { return (uint8_t)std::min(255.0f, std::max(0.0f, std::nearbyint(v))); }

// out[i] = to_u8(in[i] * factor) for count values, 16 at a time (round to nearest even, saturating).
inline void quantize_u8(const float* in, int count, float factor, uint8_t* out) {
  const __m512 f = _mm512_set1_ps(factor), zero = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= count; i += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_max_ps(zero, _mm512_mul_ps(_mm512_loadu_ps(in + i), f)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtusepi32_epi8(v));
  }
  for (; i < count; ++i) out[i] = to_u8(in[i] * factor);
}

constexpr int ROWS_PER_TASK = 64;  // rows one thread takes at a time

}  // namespace

// pixels (N, 1, 28, 28) float32 -> (logits (N, C), gates (N, E)).
// weights: embed_q, embed_scale, embed_bias, gate_w, fc1_q, fc1_scale, fc1_bias, fc2_w, fc2_b, head_bias
std::vector<at::Tensor> moe_int8_forward(const at::Tensor& pixels, at::TensorList weights, int64_t top) {
  const at::Tensor &embed_q = weights[0], &embed_scale = weights[1], &embed_bias = weights[2],
                   &gate_w = weights[3], &fc1_q = weights[4], &fc1_scale = weights[5], &fc1_bias = weights[6],
                   &fc2_w = weights[7], &fc2_b = weights[8], &head_bias = weights[9];
  const int n = pixels.size(0), k_in = 784;
  const int emb = embed_bias.size(0), experts = fc1_bias.size(0), hidden = fc1_bias.size(1);
  const int classes = head_bias.size(0), c_pad = fc2_w.size(2);  // classes padded to 16 floats
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor logits = at::empty({n, classes}, f32), gates = at::zeros({n, experts}, f32);
  const float* px = pixels.contiguous().data_ptr<float>();
  const int8_t* eq = embed_q.data_ptr<int8_t>();
  const float *es = embed_scale.data_ptr<float>(), *eb = embed_bias.data_ptr<float>();
  const float* gw = gate_w.data_ptr<float>();
  const int8_t* f1 = fc1_q.data_ptr<int8_t>();
  const float *f1s = fc1_scale.data_ptr<float>(), *f1b = fc1_bias.data_ptr<float>();
  const float *f2 = fc2_w.data_ptr<float>(), *f2b = fc2_b.data_ptr<float>(), *hb = head_bias.data_ptr<float>();
  float* out = logits.data_ptr<float>();
  float* g = gates.data_ptr<float>();

  std::vector<uint8_t> quantized((size_t)n * emb);  // the embedding, uint8 per row
  std::vector<float> row_scale(n);
  std::vector<int32_t> chosen((size_t)n * top);
  const bool parallel = n >= 2 * ROWS_PER_TASK;

  // 1. embedding (uint8 pixels x int8 weights), gate, top-k, softmax, re-quantized embedding
#pragma omp parallel if (parallel)
  {
    const int task = std::min(ROWS_PER_TASK, n);  // buffers sized to the batch, left uninitialised
    std::unique_ptr<uint8_t[]> a(new uint8_t[(size_t)task * k_in]);
    std::unique_ptr<int32_t[]> acc(new int32_t[(size_t)task * emb]);
    std::vector<float> e(emb), logit(16);
    std::vector<char> taken(experts);
#pragma omp for schedule(static)
    for (int start = 0; start < n; start += ROWS_PER_TASK) {
      const int rows = std::min(ROWS_PER_TASK, n - start);
      quantize_u8(px + (size_t)start * k_in, rows * k_in, 255.0f, a.get());
      gemm_u8s8(a.get(), k_in, rows, eq, k_in, emb, acc.get(), emb);
      for (int r = 0; r < rows; ++r) {
        const int row = start + r;
        __m512 peak16 = _mm512_setzero_ps(), logit16 = _mm512_setzero_ps();
        for (int j = 0; j < emb; j += 16) {
          __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(acc.get() + (size_t)r * emb + j)),
                                     _mm512_loadu_ps(es + j), _mm512_loadu_ps(eb + j));
          v = _mm512_max_ps(v, _mm512_setzero_ps());
          _mm512_storeu_ps(e.data() + j, v);
          peak16 = _mm512_max_ps(peak16, v);
        }
        for (int j = 0; j < emb; ++j)  // the gate, its columns padded to 16
          logit16 = _mm512_fmadd_ps(_mm512_set1_ps(e[j]), _mm512_loadu_ps(gw + (size_t)j * 16), logit16);
        _mm512_storeu_ps(logit.data(), logit16);
        const float peak = _mm512_reduce_max_ps(peak16);
        float* gate_row = g + (size_t)row * experts;
        float norm = 0.0f, best = -INFINITY;
        std::fill(taken.begin(), taken.end(), 0);
        for (int t = 0; t < top; ++t) {  // top-k, the lowest index first among equals
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
        quantize_u8(e.data(), emb, 1.0f / scale, quantized.data() + (size_t)row * emb);
      }
    }
  }

  // 2. rows grouped by expert (a counting sort), then each expert on its rows only
  std::vector<int> count(experts + 1, 0), order((size_t)n * top);
  for (size_t s = 0; s < (size_t)n * top; ++s) ++count[chosen[s] + 1];
  for (int x = 0; x < experts; ++x) count[x + 1] += count[x];
  {
    std::vector<int> fill(count.begin(), count.end() - 1);
    for (size_t s = 0; s < (size_t)n * top; ++s) order[fill[chosen[s]]++] = (int)(s / top);
  }
  // every (expert, block of its rows) is one task of one parallel loop; each slot's weighted output
  // goes to its own place in `part`, so two experts of one row never write the same memory
  std::vector<std::pair<int, int>> tasks;  // (expert, first position in order)
  for (int x = 0; x < experts; ++x)
    for (int start = count[x]; start < count[x + 1]; start += ROWS_PER_TASK) tasks.emplace_back(x, start);
  std::vector<float> part((size_t)n * top * 16);
  const int task_rows = std::min(ROWS_PER_TASK, n * (int)top);
#pragma omp parallel if (tasks.size() >= 4)
  {
    std::unique_ptr<uint8_t[]> a(new uint8_t[(size_t)task_rows * emb]);
    std::unique_ptr<int32_t[]> acc(new int32_t[(size_t)task_rows * hidden]);
    std::unique_ptr<float[]> h(new float[(size_t)task_rows * hidden]);
#pragma omp for schedule(dynamic, 1)
    for (size_t t = 0; t < tasks.size(); ++t) {
      const int x = tasks[t].first, start = tasks[t].second;
      const int rows = std::min(ROWS_PER_TASK, count[x + 1] - start);
      const int8_t* w1 = f1 + (size_t)x * emb * hidden;
      const float *s1 = f1s + (size_t)x * hidden, *b1 = f1b + (size_t)x * hidden;
      const float *w2 = f2 + (size_t)x * hidden * c_pad, *b2 = f2b + (size_t)x * c_pad;
      for (int r = 0; r < rows; ++r)
        std::copy_n(quantized.data() + (size_t)order[start + r] * emb, emb, a.get() + (size_t)r * emb);
      gemm_u8s8(a.get(), emb, rows, w1, emb, hidden, acc.get(), hidden);
      for (int r = 0; r < rows; ++r) {  // hidden = ReLU(dequantised products + bias)
        const __m512 scale = _mm512_set1_ps(row_scale[order[start + r]]);
        for (int j = 0; j < hidden; j += 16) {
          __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(acc.get() + (size_t)r * hidden + j)), scale);
          v = _mm512_max_ps(_mm512_fmadd_ps(v, _mm512_loadu_ps(s1 + j), _mm512_loadu_ps(b1 + j)), _mm512_setzero_ps());
          _mm512_storeu_ps(h.get() + (size_t)r * hidden + j, v);
        }
      }
      for (int r0 = 0; r0 < rows; r0 += 4) {  // second layer, four rows sharing each weight row
        const int group = std::min(4, rows - r0);
        __m512 y[4][2];
        for (int r = 0; r < 4; ++r) y[r][0] = _mm512_loadu_ps(b2), y[r][1] = _mm512_setzero_ps();
        for (int j = 0; j < hidden; ++j) {
          const __m512 w = _mm512_loadu_ps(w2 + (size_t)j * c_pad);
          for (int r = 0; r < group; ++r)
            y[r][j & 1] = _mm512_fmadd_ps(_mm512_set1_ps(h[(size_t)(r0 + r) * hidden + j]), w, y[r][j & 1]);
        }
        for (int r = 0; r < group; ++r) {
          const float weight = g[(size_t)order[start + r0 + r] * experts + x];
          _mm512_storeu_ps(part.data() + (size_t)(start + r0 + r) * 16,
                           _mm512_mul_ps(_mm512_set1_ps(weight), _mm512_add_ps(y[r][0], y[r][1])));
        }
      }
    }
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
    __m512 sum = _mm512_setzero_ps();
    for (int t = 0; t < top; ++t) sum = _mm512_add_ps(sum, _mm512_loadu_ps(part.data() + (size_t)slot_of[(size_t)row * top + t] * 16));
    alignas(64) float result[16];
    _mm512_store_ps(result, sum);
    for (int c = 0; c < classes; ++c) out[(size_t)row * classes + c] = result[c] + hb[c];
  }
  return {logits, gates};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_forward", [](const at::Tensor& pixels, std::vector<at::Tensor> weights, int64_t top) {
    return moe_int8_forward(pixels, weights, top);
  });
}

TORCH_LIBRARY(moe_fused, m) {
  m.def("int8_forward(Tensor pixels, Tensor[] weights, int top) -> Tensor[]");
  m.impl("int8_forward", torch::kCPU, &moe_int8_forward);
}
