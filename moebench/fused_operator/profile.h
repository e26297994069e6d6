// Where a call's time goes: the phases a profiled call clocks, per thread. fused_moe.cpp includes it.
#pragma once
#include <ATen/Parallel.h>

#include <chrono>

namespace {

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

}  // namespace
