// The operator's entries: the registered torch op, the prepared operator for numpy arrays (pybind11),
// and its logits as a plain CPython function. fused_moe.cpp includes it after the kernel.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

namespace {

#include "checks.h"

// pixels (N, 1, 28, 28) float32 -> (logits (N, C), gates (N, E)).
// weights: embed_q, embed_scale, embed_bias, gate_w, fc1_q, fc1_scale, fc1_bias, fc2_q, fc2_scale, fc2_b, head_bias
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
    run(pixels.data(), n, logits.mutable_data(), gates.mutable_data());
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
 public:
  // a few rows take a few microseconds, and handing the GIL over and back would cost a share of that
  void run(const float* px, int n, float* logits, float* gates) const {
    if (n < RELEASE_GIL_FROM_ROWS) return forward(w_, px, n, logits, gates, nullptr);
    pybind11::gil_scoped_release unlocked;
    forward(w_, px, n, logits, gates, nullptr);
  }
  static int rows_of(const pybind11::array_t<float, pybind11::array::c_style>& pixels) {
    TORCH_CHECK(pixels.ndim() >= 2 && pixels.size() == pixels.shape(0) * 784,
                "moe_fused: pixels must be (N, 1, 28, 28) or (N, 784) float32");
    return (int)pixels.shape(0);
  }
  std::vector<at::Tensor> held_;
  Weights w_;

 public:
  int classes() const { return w_.classes; }
  int experts() const { return w_.experts; }
};

// The logits alone, as a plain CPython function bound to one Prepared: what a benchmark or a server
// calls per batch. pybind11's argument and result conversions are a large share of a single image's time;
// this reads the numpy array's own fields (through pybind11's table of numpy's C API) instead.
constexpr const char* PREPARED_CAPSULE = "moe_fused.Prepared";

PyObject* raw_logits(PyObject* capsule, PyObject* pixels) {
  const auto* prepared = static_cast<const Prepared*>(PyCapsule_GetPointer(capsule, PREPARED_CAPSULE));
  if (!prepared) return nullptr;
  auto& api = pybind11::detail::npy_api::get();
  static PyObject* const float32 = api.PyArray_DescrFromType_(pybind11::detail::npy_api::NPY_FLOAT_);  // kept
  const auto* array = pybind11::detail::array_proxy(pixels);
  if (!api.PyArray_Check_(pixels) || (array->descr != float32 && !api.PyArray_EquivTypes_(array->descr, float32)) ||
      !(array->flags & pybind11::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_)) {
    PyErr_SetString(PyExc_TypeError, "moe_fused: pixels must be a C-contiguous float32 numpy array");
    return nullptr;
  }
  Py_ssize_t count = 1;
  for (int d = 0; d < array->nd; ++d) count *= array->dimensions[d];
  if (array->nd < 2 || count != array->dimensions[0] * 784) {
    PyErr_SetString(PyExc_RuntimeError, "moe_fused: pixels must be (N, 1, 28, 28) or (N, 784) float32");
    return nullptr;
  }
  const int n = (int)array->dimensions[0];
  const Py_intptr_t shape[2] = {n, prepared->classes()};
  Py_INCREF(float32);  // the new array takes a reference to its type
  PyObject* logits = api.PyArray_NewFromDescr_(api.PyArray_Type_, float32, 2, shape, nullptr, nullptr, 0, nullptr);
  if (!logits) return nullptr;
  thread_local std::vector<float> gates;  // not returned
  try {
    prepared->run(reinterpret_cast<const float*>(array->data), n,
                  reinterpret_cast<float*>(pybind11::detail::array_proxy(logits)->data),
                  sized(gates, (size_t)n * prepared->experts()));
  } catch (const std::exception& error) {
    Py_DECREF(logits);
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  return logits;
}

PyMethodDef RAW_LOGITS = {"logits", raw_logits, METH_O, "pixels (N, 1, 28, 28) float32 -> logits (N, classes)"};

// logits(pixels) for this Prepared; the function holds the Python object, so the Prepared outlives it
pybind11::object logits_function(pybind11::object prepared) {
  PyObject* capsule = PyCapsule_New(&prepared.cast<Prepared&>(), PREPARED_CAPSULE, [](PyObject* self) {
    Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(self)));
  });
  if (!capsule) throw pybind11::error_already_set();
  PyCapsule_SetContext(capsule, prepared.inc_ref().ptr());
  PyObject* function = PyCFunction_New(&RAW_LOGITS, capsule);
  Py_DECREF(capsule);
  if (!function) throw pybind11::error_already_set();
  return pybind11::reinterpret_steal<pybind11::object>(function);
}

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
      .def("logits_function", &logits_function)
      .def("profile", &Prepared::profile);
}

// torch.ops.<module name>.int8_forward: each build registers under its own name (moe_fused_vnni, ...)
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("int8_forward(Tensor pixels, Tensor[] weights, int top) -> Tensor[]");
  m.impl("int8_forward", torch::kCPU, &moe_int8_forward);
}
