// Everything the kernel reads is checked here, so a wrong call is one error and never a wild read.
// binding.h includes it inside its anonymous namespace (fused_moe.cpp defines Weights before it).
#pragma once

void check_pixels(const at::Tensor& pixels) {
  TORCH_CHECK(pixels.device().is_cpu(), "moe_fused.int8_forward: pixels must be a CPU tensor, got ", pixels.device());
  TORCH_CHECK(pixels.scalar_type() == at::kFloat, "moe_fused.int8_forward: pixels must be float32, got ",
              pixels.scalar_type());
  TORCH_CHECK(pixels.dim() >= 2 && pixels.numel() == pixels.size(0) * 784,
              "moe_fused.int8_forward: pixels must be (N, 1, 28, 28) or (N, 784), got ", pixels.sizes());
}

void check_weight(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "moe_fused.int8_forward: weight ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "moe_fused.int8_forward: weight ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "moe_fused.int8_forward: weight ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "moe_fused.int8_forward: weight ", name, " must be contiguous");
}

// weights: embed_q, embed_scale, embed_bias, gate_w, fc1_q, fc1_scale, fc1_bias, fc2_q, fc2_scale, fc2_b, head_bias,
// checked, as the kernel reads them
Weights checked_weights(at::TensorList weights, int64_t top) {
  TORCH_CHECK(weights.size() == 11, "moe_fused.int8_forward: expected 11 weight tensors, got ", weights.size());
  TORCH_CHECK(weights[2].dim() == 1 && weights[6].dim() == 2 && weights[10].dim() == 1,
              "moe_fused.int8_forward: embed_bias, fc1_bias and head_bias must be 1-, 2- and 1-dimensional");
  const int64_t emb = weights[2].size(0), experts = weights[6].size(0), hidden = weights[6].size(1);
  const int64_t classes = weights[10].size(0);
  TORCH_CHECK(emb > 0 && emb % 64 == 0 && hidden > 0 && hidden % 64 == 0,
              "moe_fused.int8_forward: EMB_SIZE and HIDDEN_SIZE must be positive multiples of 64, got ", emb,
              " and ", hidden);
  TORCH_CHECK(1 <= top && top <= experts && experts <= MAX_EXPERTS, "moe_fused.int8_forward: needs 1 <= TOP <= EXPERTS <= ",
              MAX_EXPERTS, ", got TOP ", top, ", EXPERTS ", experts);
  TORCH_CHECK(1 <= classes && classes <= 16, "moe_fused.int8_forward: needs 1 to 16 classes, got ", classes);
  const auto weight_type = sizeof(Weight) == 1 ? at::kChar : at::kShort;
  check_weight(weights[0], "embed_q", weight_type, {K_IN_PADDED / KPACK, emb, KPACK});
  check_weight(weights[1], "embed_scale", at::kFloat, {emb});
  check_weight(weights[2], "embed_bias", at::kFloat, {emb});
  check_weight(weights[3], "gate_w", at::kFloat, {emb, experts});
  check_weight(weights[4], "fc1_q", weight_type, {experts, emb / KPACK, hidden, KPACK});
  check_weight(weights[5], "fc1_scale", at::kFloat, {experts, hidden});
  check_weight(weights[6], "fc1_bias", at::kFloat, {experts, hidden});
  check_weight(weights[7], "fc2_q", weight_type, {experts, hidden / KPACK, 16, KPACK});
  check_weight(weights[8], "fc2_scale", at::kFloat, {experts, 16});
  check_weight(weights[9], "fc2_b", at::kFloat, {experts, classes});
  check_weight(weights[10], "head_bias", at::kFloat, {classes});
  auto floats = [&](int i) { return weights[i].data_ptr<float>(); };
  auto ints = [&](int i) { return static_cast<const Weight*>(weights[i].data_ptr()); };
  return Weights{ints(0), ints(4), ints(7), floats(1), floats(2), floats(3), floats(5), floats(6), floats(8), floats(9), floats(10),
                 (int)emb, (int)experts, (int)hidden, (int)classes, (int)top};
}
