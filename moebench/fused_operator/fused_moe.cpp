// The whole model in one PyTorch custom operator: the embedding and the chosen experts' first layers
// as uint8 x int8 products with exact int32 sums, the gate, top-k, softmax and each expert's second
// layer (the head folded into it) in float32. Only the chosen experts run: rows are grouped by expert
// with a counting sort, so no capacity and nothing dropped. The arithmetic is in arithmetic.h, one
// source for four builds (moebench/fused.py picks one at run time).
//
// Quantization (prepared in moebench/fused.py): pixels are uint8 / 255 by the input contract, so
// round(255 * pixel) is exact; weights are int8 values with one scale per output column;
// the embedding's outputs are re-quantized to uint8 with one scale per row (they are >= 0 after ReLU).
// Threads come from at::parallel_for (compiled with -fopenmp against PyTorch's own OpenMP runtime, which
// the module links no copy of), so torch.set_num_threads() limits them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <chrono>
#include <vector>
#if defined(__AMX_INT8__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "arithmetic.h"

namespace {

constexpr int ROWS_PER_TASK = 64;  // rows one thread takes at a time
constexpr int CACHED_ROWS = 1024;  // calls up to this many rows reuse their thread's buffers (no allocation)
// Independent sums per row in the float layers (the gate, a lone row's second layer), and the rows of
// the second layer that share each weight load with their sums per row: as many sums as registers hold
#if defined(__AVX512F__)
constexpr int CHAINS = 4, GROUP_ROWS = 4, GROUP_CHAINS = 2;  // 8 of 32 registers: 16 floats each
#elif defined(__AVX2__)
constexpr int CHAINS = 2, GROUP_ROWS = 4, GROUP_CHAINS = 1;  // 16 floats are 2 of AVX2's 16 registers
#else
constexpr int CHAINS = 1, GROUP_ROWS = 1, GROUP_CHAINS = 1;  // plain C++: a row at a time is fastest
#endif

// Where a call's time goes, per thread: what a profiled call adds up (seconds).
enum Phase { QUANTIZE, EMBED, GATE, GROUP, FIRST, SECOND, COMBINE, PHASES };
const char* const PHASE_NAMES[PHASES] = {"input quantization", "embedding", "gate, top-k, softmax, requantization",
                                         "grouping by expert", "experts' first layers", "experts' second layers",
                                         "combining the experts"};

class Laps {  // a thread's stopwatch; does nothing in a call that is not profiled
 public:
  explicit Laps(double* table) : row_(table ? table + (size_t)at::get_thread_num() * PHASES : nullptr) {
    if (row_) last_ = std::chrono::steady_clock::now();
  }
  void lap(Phase phase) {
    if (!row_) return;
    const auto now = std::chrono::steady_clock::now();
    row_[phase] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  double* row_;
  std::chrono::steady_clock::time_point last_;
};

// The weights as the kernel reads them; the tensors that hold them outlive it.
struct Weights {
  const Weight *embed_q, *fc1_q;
  const float *embed_scale, *embed_bias, *gate_w, *fc1_scale, *fc1_bias, *fc2_w, *fc2_b, *head_bias;
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

// Phase 1 for rows [start, start + rows): embedding, gate, top-k, softmax, re-quantized embedding.
void embed_and_route(const Weights& w, const float* px, int start, int rows, float* gates, CallBuffers& call,
                     Laps& laps) {
  constexpr int k_in = K_IN;
  const int emb = w.emb, experts = w.experts, top = w.top;
  Scratch& s = thread_scratch();
  Act* a = sized(s.act, (size_t)padded_rows(rows) * K_IN_PADDED);
  int32_t* acc = sized(s.sums, (size_t)padded_rows(rows) * emb);
  float* e = sized(s.floats, emb);
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
  alignas(64) float logit[16];
  for (int r = 0; r < rows; ++r) {
    const int row = start + r;
    F16 peak16 = splat16(0.0f), chain[CHAINS];
    for (int j = 0; j < emb; j += 16) {
      F16 v = fma16(from_int32x16(acc + (size_t)r * emb + j), load16(w.embed_scale + j), load16(w.embed_bias + j));
      v = max16(v, splat16(0.0f));
      store16(e + j, v);
      peak16 = max16(peak16, v);
    }
    for (int c = 0; c < CHAINS; ++c) chain[c] = splat16(0.0f);
    for (int j = 0; j < emb; j += CHAINS)  // the gate, its columns padded to 16
      for (int c = 0; c < CHAINS; ++c) chain[c] = fma16(splat16(e[j + c]), load16(w.gate_w + (size_t)(j + c) * 16), chain[c]);
    for (int c = 1; c < CHAINS; ++c) chain[0] = add16(chain[0], chain[c]);
    store16(logit, chain[0]);
    float* gate_row = gates + (size_t)row * experts;
    int32_t* picks = call.chosen.data() + (size_t)row * top;
    std::fill_n(gate_row, experts, 0.0f);
    char taken[16] = {0};
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
    const float peak = reduce_max16(peak16), scale = peak > 0.0f ? peak / 255.0f : 1.0f;
    call.row_scale[row] = scale;
    quantize(e, emb, 1.0f / scale, call.quantized.data() + (size_t)row * emb);
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
  int32_t fill[16];
  std::copy_n(count, w.experts, fill);
  for (int s = 0; s < slots; ++s) {
    const int position = fill[call.chosen[s]]++;
    call.order[position] = s / w.top;
    call.slot_of[s] = position;
  }
}

// y[r] = b2 + h[r] x w2 for G rows of h (hidden wide), C independent sums per row: rows share each
// weight row's load, and the sums' chains do not wait on one another
template <int G, int C>
inline void second_layer(const float* h, int hidden, const float* w2, const float* b2, F16* y) {
  F16 sums[G][C];
  for (int r = 0; r < G; ++r)
    for (int c = 0; c < C; ++c) sums[r][c] = c ? splat16(0.0f) : load16(b2);
  for (int j = 0; j < hidden; j += C)
    for (int c = 0; c < C; ++c) {
      const F16 weight = load16(w2 + (size_t)(j + c) * 16);
      for (int r = 0; r < G; ++r) sums[r][c] = fma16(splat16(h[(size_t)r * hidden + j + c]), weight, sums[r][c]);
    }
  for (int r = 0; r < G; ++r) {
    for (int c = 1; c < C; ++c) sums[r][0] = add16(sums[r][0], sums[r][c]);
    y[r] = sums[r][0];
  }
}

// Phase 3: one expert on `rows` of its rows from `start` in order: its first layer in integers, then
// its second layer (the head folded in) in float32, weighted by the gate, into `part`.
void run_expert(const Weights& w, int x, int start, int rows, const float* gates, CallBuffers& call, Laps& laps) {
  const int emb = w.emb, hidden = w.hidden;
  Scratch& s = thread_scratch();
  Act* a = sized(s.act, (size_t)padded_rows(rows) * emb);
  int32_t* acc = sized(s.sums, (size_t)padded_rows(rows) * hidden);
  float* h = sized(s.floats, (size_t)rows * hidden);
  const int32_t* order = call.order.data() + start;
  for (int r = 0; r < rows; ++r) std::copy_n(call.quantized.data() + (size_t)order[r] * emb, emb, a + (size_t)r * emb);
  gemm(a, emb, rows, w.fc1_q + (size_t)x * emb * hidden, emb, hidden, acc, hidden);
  const float *s1 = w.fc1_scale + (size_t)x * hidden, *b1 = w.fc1_bias + (size_t)x * hidden;
  for (int r = 0; r < rows; ++r) {  // hidden = ReLU(dequantised products + bias)
    const F16 scale = splat16(call.row_scale[order[r]]);
    for (int j = 0; j < hidden; j += 16) {
      F16 v = mul16(from_int32x16(acc + (size_t)r * hidden + j), scale);
      store16(h + (size_t)r * hidden + j, max16(fma16(v, load16(s1 + j), load16(b1 + j)), splat16(0.0f)));
    }
  }
  laps.lap(FIRST);
  const float *w2 = w.fc2_w + (size_t)x * hidden * 16, *b2 = w.fc2_b + (size_t)x * 16;
  F16 y[GROUP_ROWS];
  for (int r0 = 0; r0 < rows; r0 += GROUP_ROWS) {
    const int group = std::min(GROUP_ROWS, rows - r0);
    if (group == GROUP_ROWS) {
      second_layer<GROUP_ROWS, GROUP_CHAINS>(h + (size_t)r0 * hidden, hidden, w2, b2, y);
    } else {
      for (int r = 0; r < group; ++r) second_layer<1, CHAINS>(h + (size_t)(r0 + r) * hidden, hidden, w2, b2, y + r);
    }
    for (int r = 0; r < group; ++r) {
      const float weight = gates[(size_t)order[r0 + r] * w.experts + x];
      store16(call.part.data() + (size_t)(start + r0 + r) * 16, mul16(splat16(weight), y[r]));
    }
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
  std::vector<std::pair<int, int>> tasks;  // (expert, first position in order): a block of its rows each
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

#include "checks.h"

// pixels (N, 1, 28, 28) float32 -> (logits (N, C), gates (N, E)).
// weights: embed_q, embed_scale, embed_bias, gate_w, fc1_q, fc1_scale, fc1_bias, fc2_w, fc2_b, head_bias
std::vector<at::Tensor> moe_int8_forward(const at::Tensor& pixels_in, at::TensorList weights, int64_t top) {
  check_pixels(pixels_in);
  const Weights w = checked_weights(weights, top);
  const at::Tensor pixels = pixels_in.contiguous();  // held for the whole call: the kernel reads its memory
  const int n = pixels.size(0);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor logits = at::empty({n, w.classes}, f32), gates = at::empty({n, w.experts}, f32);
  forward(w, pixels.data_ptr<float>(), n, logits.data_ptr<float>(), gates.data_ptr<float>(), nullptr);
  return {logits, gates};
}

// The operator with its weights checked and held once: what a server or a benchmark calls per batch,
// from numpy arrays, without the per-call cost of ten tensors crossing the binding.
class Prepared {
 public:
  Prepared(std::vector<at::Tensor> weights, int64_t top) {
    for (const auto& t : weights) held_.push_back(t.clone());  // its own copies: nothing can resize them
    w_ = checked_weights(held_, top);
  }
  pybind11::tuple numpy(const pybind11::array_t<float, pybind11::array::c_style>& pixels) const {
    const int n = rows_of(pixels);
    pybind11::array_t<float> logits({n, w_.classes}), gates({n, w_.experts});
    const float* px = pixels.data();
    float *out = logits.mutable_data(), *g = gates.mutable_data();
    {
      pybind11::gil_scoped_release unlocked;
      forward(w_, px, n, out, g, nullptr);
    }
    return pybind11::make_tuple(logits, gates);
  }
  // (per thread, seconds per phase) of one call on the pixels, after it ran
  std::vector<std::vector<double>> profile(const pybind11::array_t<float, pybind11::array::c_style>& pixels) const {
    const int n = rows_of(pixels), threads = at::get_num_threads();
    std::vector<double> table((size_t)threads * PHASES, 0.0);
    std::vector<float> logits((size_t)n * w_.classes), gates((size_t)n * w_.experts);
    {
      pybind11::gil_scoped_release unlocked;
      forward(w_, pixels.data(), n, logits.data(), gates.data(), table.data());
    }
    std::vector<std::vector<double>> rows;
    for (int t = 0; t < threads; ++t) rows.emplace_back(table.begin() + t * PHASES, table.begin() + (t + 1) * PHASES);
    return rows;
  }

 private:
  static int rows_of(const pybind11::array_t<float, pybind11::array::c_style>& pixels) {
    TORCH_CHECK(pixels.ndim() >= 2 && pixels.size() == pixels.shape(0) * 784,
                "moe_fused: pixels must be (N, 1, 28, 28) or (N, 784) float32");
    return (int)pixels.shape(0);
  }
  std::vector<at::Tensor> held_;
  Weights w_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("kernel") = KERNEL;
  m.attr("phases") = std::vector<std::string>(PHASE_NAMES, PHASE_NAMES + PHASES);
  // the GIL is released while the kernel computes, so other Python threads (a server's event loop) run
  m.def("int8_forward", [](const at::Tensor& pixels, std::vector<at::Tensor> weights, int64_t top) {
    return moe_int8_forward(pixels, weights, top);
  }, pybind11::call_guard<pybind11::gil_scoped_release>());
  // {instruction: multiply-adds per second} of register-only loops of the path's products, summed over
  // PyTorch's threads, each running its loop at once for about `seconds`
  m.def("instruction_peaks", [](double seconds) {
    require_amx();
    std::vector<std::map<std::string, double>> each(at::get_num_threads());
    at::parallel_for(0, (int64_t)each.size(), 1, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) each[t] = instruction_peaks(seconds);
    });
    std::map<std::string, double> total;
    for (const auto& peaks : each)
      for (const auto& [name, rate] : peaks) total[name] += rate;
    return total;
  }, pybind11::arg("seconds") = 0.2, pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<Prepared>(m, "Prepared", pybind11::module_local())  // one per build
      .def(pybind11::init<std::vector<at::Tensor>, int64_t>())
      .def("numpy", &Prepared::numpy)
      .def("profile", &Prepared::profile);
}

// torch.ops.<module name>.int8_forward: each build registers under its own name (moe_fused_vnni, ...)
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("int8_forward(Tensor pixels, Tensor[] weights, int top) -> Tensor[]");
  m.impl("int8_forward", torch::kCPU, &moe_int8_forward);
}
