// The whole model in one PyTorch custom operator: the embedding, the chosen experts' first layers and
// their second layers (the head folded in) as uint8 x int8 products with exact int32 sums, the gate,
// top-k and softmax in float32. Only the chosen experts run: rows are grouped by expert with a counting
// sort, so no capacity and nothing dropped; a single image skips the grouping. The arithmetic is in
// arithmetic.h, products.h and peaks.h, one source for four builds (moebench/fused.py picks one at run
// time); the entries Python calls are in binding.h.
//
// Quantization (prepared in moebench/fused.py): pixels are uint8 / 255 by the input contract, so
// round(255 * pixel) is exact; weights are int8 values with one scale per output column; the embedding
// and each expert's hidden row are re-quantized to uint8 with one scale per row (>= 0 after ReLU).
// Threads come from at::parallel_for (compiled with -fopenmp against PyTorch's own OpenMP runtime, which
// the module links no copy of), so torch.set_num_threads() limits them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <vector>
#if defined(__AMX_INT8__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "peaks.h"
#include "profile.h"

namespace {

constexpr int ROWS_PER_TASK = 64;  // rows one thread takes at a time
constexpr int MAX_EXPERTS = 256;  // the gate's logits and the grouping's counts live on the stack
constexpr int RELEASE_GIL_FROM_ROWS = 16;  // smaller calls keep the GIL (see Prepared::run)
constexpr int CACHED_ROWS = 1024;  // calls up to this many rows reuse their thread's buffers (no allocation)
// The gate's float32 sums: GROUP_ROWS rows share each load of its weights, GATE_CHAINS independent sums
// per row (a row alone sums in the same order, so its gate is the same in any batch)
#if defined(__AVX512F__)
constexpr int GROUP_ROWS = 4, GATE_CHAINS = 4;  // 16 sums and 4 weights of 32 registers, 16 floats each
#elif defined(__AVX2__)
constexpr int GROUP_ROWS = 4, GATE_CHAINS = 1;  // 16 floats are 2 of AVX2's 16 registers
#else
constexpr int GROUP_ROWS = 1, GATE_CHAINS = 1;  // plain C++: a row at a time is fastest
#endif

// The weights as the kernel reads them; the tensors that hold them outlive it.
struct Weights {
  const Weight *embed_q, *fc1_q, *fc2_q;
  const float *embed_scale, *embed_bias, *gate_w, *fc1_scale, *fc1_bias, *fc2_scale, *fc2_b, *head_bias;
  int emb, experts, hidden, classes, top;
};

#if defined(__AMX_INT8__)
// Linux hands a process AMX's tile state only when asked, once
void require_amx() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  TORCH_CHECK(granted, "moe_fused: Linux refused this process AMX's tile state (arch_prctl); "
                       "MOE_FUSED_KERNEL=vnni runs without it");
}
#else
void require_amx() {}
#endif

template <typename T>
T* sized(std::vector<T>& buffer, size_t count) {
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

struct Scratch {  // a thread's working memory for one task
  std::vector<Act> act;
  std::vector<int32_t> sums;
  std::vector<float> floats;
};

struct CallBuffers {  // what one call shares between its threads
  std::vector<Act> quantized;  // the embedding, uint8 values per row
  std::vector<float> row_scale, part;
  std::vector<int32_t> chosen, order, slot_of, count;
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// y[r] = h[r] x w for G rows of h (k wide) and the first `lanes` (<= 16) columns of w (k rows, `stride`
// floats apart), C independent sums per row: rows share each load of w, and the sums' chains do not
// wait on one another. The gate's logits, 16 experts at a time.
template <int G, int C>
inline void row_products(const float* h, int k, const float* w, int stride, int lanes, F16* y) {
  F16 sums[G][C];
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < C; ++c) sums[r][c] = splat16(0.0f);
  for (int j = 0; j < k; j += C)
    for (int c = 0; c < C; ++c) {
      const F16 weight = load_first(w + (size_t)(j + c) * stride, lanes);
      for (int r = 0; r < G; ++r) sums[r][c] = fma16(splat16(h[(size_t)r * k + j + c]), weight, sums[r][c]);
    }
  for (int r = 0; r < G; ++r) {
    for (int c = 1; c < C; ++c) sums[r][0] = add16(sums[r][0], sums[r][c]);
    y[r] = sums[r][0];
  }
}

inline int round_up16(int n) { return (n + 15) / 16 * 16; }

// Phase 1 for rows [start, start + rows): embedding, gate, top-k, softmax, re-quantized embedding.
void embed_and_route(const Weights& w, const float* px, int start, int rows, float* gates, CallBuffers& call,
                     Laps& laps) {
  constexpr int k_in = K_IN;
  const int emb = w.emb, experts = w.experts, top = w.top;
  Scratch& s = thread_scratch();
  Act* a = sized(s.act, (size_t)padded_rows(rows) * K_IN_PADDED);
  int32_t* acc = sized(s.sums, (size_t)padded_rows(rows) * emb);
  if (K_IN_PADDED == k_in) {
    quantize(px + (size_t)start * k_in, rows * k_in, 255.0f, a);
  } else {
    for (int r = 0; r < rows; ++r) {
      quantize(px + (size_t)(start + r) * k_in, k_in, 255.0f, a + (size_t)r * K_IN_PADDED);
      std::fill_n(a + (size_t)r * K_IN_PADDED + k_in, K_IN_PADDED - k_in, Act(0));
    }
  }
  laps.lap(QUANTIZE);
  gemm(a, K_IN_PADDED, rows, w.embed_q, K_IN_PADDED, emb, acc, emb);
  laps.lap(EMBED);
  float* e = sized(s.floats, (size_t)rows * emb + (size_t)rows * round_up16(experts));
  float* logits = e + (size_t)rows * emb;  // (rows, experts rounded up to 16)
  alignas(64) float peaks[ROWS_PER_TASK];
  for (int r = 0; r < rows; ++r) {  // the embedding: ReLU(dequantised sums + bias), and each row's peak
    F16 peak16 = splat16(0.0f);
    for (int j = 0; j < emb; j += 16) {
      F16 v = fma16(from_int32x16(acc + (size_t)r * emb + j), load16(w.embed_scale + j), load16(w.embed_bias + j));
      v = max16(v, splat16(0.0f));
      store16(e + (size_t)r * emb + j, v);
      peak16 = max16(peak16, v);
    }
    peaks[r] = reduce_max16(peak16);
  }
  // the gate, GROUP_ROWS rows at a time, 16 experts at a time
  const int stride = round_up16(experts);
  for (int x0 = 0; x0 < experts; x0 += 16) {
    const int lanes = std::min(16, experts - x0);
    F16 y[GROUP_ROWS];
    int r0 = 0;
    for (; r0 + GROUP_ROWS <= rows; r0 += GROUP_ROWS) {
      row_products<GROUP_ROWS, GATE_CHAINS>(e + (size_t)r0 * emb, emb, w.gate_w + x0, experts, lanes, y);
      for (int r = 0; r < GROUP_ROWS; ++r) store16(logits + (size_t)(r0 + r) * stride + x0, y[r]);
    }
    for (; r0 < rows; ++r0) {
      row_products<1, GATE_CHAINS>(e + (size_t)r0 * emb, emb, w.gate_w + x0, experts, lanes, y);
      store16(logits + (size_t)r0 * stride + x0, y[0]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const int row = start + r;
    const float* logit = logits + (size_t)r * stride;
    float* gate_row = gates + (size_t)row * experts;
    int32_t* picks = call.chosen.data() + (size_t)row * top;
    std::fill_n(gate_row, experts, 0.0f);
    char taken[MAX_EXPERTS] = {0};
    float best = -INFINITY, norm = 0.0f;
    for (int t = 0; t < top; ++t) {  // top-k, the lowest index first among equals (as ONNX TopK)
      int pick = -1;
      for (int x = 0; x < experts; ++x)
        if (!taken[x] && (pick < 0 || logit[x] > logit[pick])) pick = x;
      taken[pick] = 1;
      picks[t] = pick;
      best = std::max(best, logit[pick]);
    }
    for (int t = 0; t < top; ++t) norm += gate_row[picks[t]] = std::exp(logit[picks[t]] - best);
    for (int t = 0; t < top; ++t) gate_row[picks[t]] /= norm;
    const float scale = peaks[r] > 0.0f ? peaks[r] / 255.0f : 1.0f;
    call.row_scale[row] = scale;
    quantize(e + (size_t)r * emb, emb, 1.0f / scale, call.quantized.data() + (size_t)row * emb);
  }
  laps.lap(GATE);
}

// Phase 2: the rows grouped by expert with a counting sort; order[position] is a row, and the
// slot t of row r (its t-th expert) lands at position slot_of[r * top + t].
void group_by_expert(const Weights& w, int n, CallBuffers& call) {
  const int slots = n * w.top;
  int32_t* count = sized(call.count, w.experts + 1);
  std::fill_n(count, w.experts + 1, 0);
  for (int s = 0; s < slots; ++s) ++count[call.chosen[s] + 1];
  for (int x = 0; x < w.experts; ++x) count[x + 1] += count[x];
  int32_t fill[MAX_EXPERTS];
  std::copy_n(count, w.experts, fill);
  for (int s = 0; s < slots; ++s) {
    const int position = fill[call.chosen[s]]++;
    call.order[position] = s / w.top;
    call.slot_of[s] = position;
  }
}

// expert x's hidden row, re-quantized to uint8 for its second layer: ReLU(its integer sums dequantised
// + bias), in uint8 values with one scale per row (returned). Computed twice, for the row's peak and
// then for its values, rather than stored as floats in between: that is cheaper than the round trip.
inline F16 hidden_values(const Weights& w, int x, const int32_t* sums, F16 scale, int j) {
  const float *s1 = w.fc1_scale + (size_t)x * w.hidden, *b1 = w.fc1_bias + (size_t)x * w.hidden;
  return max16(fma16(mul16(from_int32x16(sums + j), scale), load16(s1 + j), load16(b1 + j)), splat16(0.0f));
}

inline float hidden_row(const Weights& w, int x, const int32_t* sums, float row_scale, Act* quantized) {
  const F16 scale = splat16(row_scale);
  F16 peak16 = splat16(0.0f);
  for (int j = 0; j < w.hidden; j += 16) peak16 = max16(peak16, hidden_values(w, x, sums, scale, j));
  const float peak = reduce_max16(peak16), hidden_scale = peak > 0.0f ? peak / 255.0f : 1.0f;
  alignas(64) float chunk[64];  // hidden is a multiple of 64
  for (int j = 0; j < w.hidden; j += 64) {
    for (int i = 0; i < 64; i += 16) store16(chunk + i, hidden_values(w, x, sums, scale, j + i));
    quantize(chunk, 64, 1.0f / hidden_scale, quantized + j);
  }
  return hidden_scale;
}

// expert x's second layer (the head folded in) from a row's integer sums: sums * hidden scale * column
// scale + bias; the same arithmetic for a row alone and in a group
inline F16 second_layer(const Weights& w, int x, const int32_t* sums, float hidden_scale) {
  const F16 v = mul16(from_int32x16(sums), splat16(hidden_scale));
  return fma16(v, load16(w.fc2_scale + (size_t)x * 16), load_first(w.fc2_b + (size_t)x * w.classes, w.classes));
}

inline const Weight* second_weights(const Weights& w, int x) { return w.fc2_q + (size_t)x * w.hidden * 16; }

// One row alone, its experts one after the other: no grouping, no tasks, no threads, which would cost a
// single image more than its arithmetic. The same arithmetic as the grouped path.
void forward_one_row(const Weights& w, const float* px, float* logits, float* gates, CallBuffers& call, Laps& laps) {
  embed_and_route(w, px, 0, 1, gates, call, laps);
  Scratch& s = thread_scratch();
  int32_t* sums = sized(s.sums, w.hidden + 16);
  Act* hidden = sized(s.act, w.hidden);
  thread_local std::vector<int> ks, hidden_ks;
  const Act* row = call.quantized.data();
  const int groups = nonzero_groups<1>(row, 0, w.emb, sized(ks, w.emb));
  F16 total = splat16(0.0f);
  for (int t = 0; t < w.top; ++t) {
    const int x = call.chosen[t];
    row_tile(row, w.fc1_q + (size_t)x * w.emb * w.hidden, ks.data(), groups, w.hidden, sums);
    const float hidden_scale = hidden_row(w, x, sums, call.row_scale[0], hidden);
    laps.lap(FIRST);
    const int hidden_groups = nonzero_groups<1>(hidden, 0, w.hidden, sized(hidden_ks, w.hidden));
    narrow_tile<1, ROW_NARROW_CHAINS>(hidden, 0, second_weights(w, x), hidden_ks.data(), hidden_groups, sums + w.hidden);
    total = add16(total, mul16(splat16(gates[x]), second_layer(w, x, sums + w.hidden, hidden_scale)));
    laps.lap(SECOND);
  }
  alignas(64) float result[16];
  store16(result, total);
  for (int c = 0; c < w.classes; ++c) logits[c] = result[c] + w.head_bias[c];
  laps.lap(COMBINE);
}

// Phase 3: one expert on `rows` of its rows from `start` in order: its first layer, its hidden rows
// re-quantized, its second layer (the head folded in), weighted by the gate, into `part`.
void run_expert(const Weights& w, int x, int start, int rows, const float* gates, CallBuffers& call, Laps& laps) {
  const int emb = w.emb, hidden = w.hidden;
  Scratch& s = thread_scratch();
  Act* a = sized(s.act, (size_t)padded_rows(rows) * std::max(emb, hidden));
  int32_t* acc = sized(s.sums, (size_t)padded_rows(rows) * hidden);
  float* hidden_scale = sized(s.floats, rows);
  const int32_t* order = call.order.data() + start;
  for (int r = 0; r < rows; ++r) std::copy_n(call.quantized.data() + (size_t)order[r] * emb, emb, a + (size_t)r * emb);
  gemm(a, emb, rows, w.fc1_q + (size_t)x * emb * hidden, emb, hidden, acc, hidden);
  Act* quantized = a;  // the hidden rows as uint8 values, over the first layer's inputs (no longer read)
  for (int r = 0; r < rows; ++r)
    hidden_scale[r] = hidden_row(w, x, acc + (size_t)r * hidden, call.row_scale[order[r]], quantized + (size_t)r * hidden);
  laps.lap(FIRST);
  thread_local std::vector<int> ks;
  int* groups_of = sized(ks, hidden);
  int32_t* sums = acc;  // (rows, 16), over the first layer's sums
  int r0 = 0;
  for (; r0 + NARROW_ROWS <= rows; r0 += NARROW_ROWS) {
    const int groups = nonzero_groups<NARROW_ROWS>(quantized + (size_t)r0 * hidden, hidden, hidden, groups_of);
    narrow_tile<NARROW_ROWS, NARROW_CHAINS>(quantized + (size_t)r0 * hidden, hidden, second_weights(w, x), groups_of, groups,
                                            sums + (size_t)r0 * 16);
  }
  for (; r0 < rows; ++r0) {
    const int groups = nonzero_groups<1>(quantized + (size_t)r0 * hidden, hidden, hidden, groups_of);
    narrow_tile<1, ROW_NARROW_CHAINS>(quantized + (size_t)r0 * hidden, hidden, second_weights(w, x), groups_of, groups,
                                      sums + (size_t)r0 * 16);
  }
  for (int r = 0; r < rows; ++r) {
    const float weight = gates[(size_t)order[r] * w.experts + x];
    store16(call.part.data() + (size_t)(start + r) * 16,
            mul16(splat16(weight), second_layer(w, x, sums + (size_t)r * 16, hidden_scale[r])));
  }
  laps.lap(SECOND);
}

// pixels (n, 784) float32 -> logits (n, classes), gates (n, experts); `profile`, where given, is a
// (threads, PHASES) table of seconds that the call adds to.
void forward(const Weights& w, const float* px, int n, float* logits, float* gates, double* profile) {
  require_amx();
  thread_local CallBuffers cached;
  CallBuffers fresh;
  CallBuffers& call = n <= CACHED_ROWS ? cached : fresh;  // a big batch's buffers are not kept
  const size_t slots = (size_t)n * w.top;
  sized(call.quantized, (size_t)n * w.emb), sized(call.row_scale, n), sized(call.chosen, slots);
  sized(call.order, slots), sized(call.slot_of, slots), sized(call.part, slots * 16);
  if (n == 1) {
    Laps laps(profile);
    return forward_one_row(w, px, logits, gates, call, laps);
  }

  const int64_t blocks = (n + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  at::parallel_for(0, blocks, 2, [&](int64_t first, int64_t last) {
    Laps laps(profile);
    for (int64_t block = first; block < last; ++block) {
      const int start = (int)block * ROWS_PER_TASK;
      embed_and_route(w, px, start, std::min(ROWS_PER_TASK, n - start), gates, call, laps);
    }
  });
  Laps laps(profile);
  group_by_expert(w, n, call);
  laps.lap(GROUP);
  // (expert, first position in order): a block of its rows each. Kept from call to call, and named by a
  // reference: the worker threads' lambda must reach this thread's list, not their own thread_local copy
  thread_local std::vector<std::pair<int, int>> kept_tasks;
  std::vector<std::pair<int, int>>& tasks = kept_tasks;
  tasks.clear();
  for (int x = 0; x < w.experts; ++x)
    for (int start = call.count[x]; start < call.count[x + 1]; start += ROWS_PER_TASK) tasks.emplace_back(x, start);
  auto run_tasks = [&](int64_t first, int64_t last) {
    Laps task_laps(profile);
    for (int64_t t = first; t < last; ++t) {
      const int x = tasks[t].first, start = tasks[t].second;
      run_expert(w, x, start, std::min(ROWS_PER_TASK, call.count[x + 1] - start), gates, call, task_laps);
    }
  };
  if (tasks.size() >= 4) {
    at::parallel_for(0, (int64_t)tasks.size(), 1, run_tasks);
  } else {
    run_tasks(0, (int64_t)tasks.size());
  }
  at::parallel_for(0, n, 256, [&](int64_t first, int64_t last) {
    Laps row_laps(profile);
    for (int64_t row = first; row < last; ++row) {
      F16 sum = splat16(0.0f);
      for (int t = 0; t < w.top; ++t) sum = add16(sum, load16(call.part.data() + (size_t)call.slot_of[row * w.top + t] * 16));
      alignas(64) float result[16];
      store16(result, sum);
      for (int c = 0; c < w.classes; ++c) logits[row * w.classes + c] = result[c] + w.head_bias[c];
    }
    row_laps.lap(COMBINE);
  });
}

}  // namespace

#include "binding.h"
