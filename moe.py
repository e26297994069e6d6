"""Sparsely-gated Mixture-of-Experts (Shazeer et al. 2017) and the MNIST classifier built on it.

Everything here is scriptable with torch.jit.script: routing has data-dependent control flow.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# MNIST's pixel mean and std: normalisation lives inside the model, so a deployer feeds pixels/255.
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation: 0 when all entries are equal."""
    if x.numel() <= 1:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x.var() / (x.mean() ** 2 + 1e-10)


def normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class MoE(nn.Module):
    """Top-k gated experts. forward() returns (output, gates) where gates is (N, EXPERTS) with
    the renormalised top-k weights and zeros elsewhere; forward_with_loss() adds the balance loss."""

    def __init__(self, dim: int, hidden: int, experts: int, top: int, noisy_gating: bool = True,
                 balance_loss: str = "shazeer", w_importance: float = 0.1, w_load: float = 0.1,
                 w_switch: float = 0.01, routing: str = "loop"):
        super().__init__()
        self.routing = routing
        self.num_experts = experts
        self.dim = dim
        self.hidden = hidden
        self.top = top
        self.noisy_gating = noisy_gating
        self.balance_loss_kind = balance_loss
        self.w_importance = w_importance
        self.w_load = w_load
        self.w_switch = w_switch
        # Zero-initialised as in the paper: every expert starts equally likely.
        self.w_gate = nn.Parameter(torch.zeros(dim, experts))
        self.w_noise = nn.Parameter(torch.zeros(dim, experts))
        self.experts = nn.ModuleList([Expert(dim, hidden) for _ in range(experts)])
        # Training in several processes (moebench/parallel.py) sets this to a sum over every rank's rows,
        # so that the balance loss sees the global batch.
        self.sum_across_ranks = None
        # gates (N, EXPERTS) @ this = each expert's gate repeated over its HIDDEN + 1 units
        self.register_buffer("gate_to_units", torch.eye(experts).repeat_interleave(hidden + 1, dim=1),
                             persistent=False)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(mixture of the chosen experts' outputs, gates)."""
        gates, _ = self.gate(x)
        return self.mix(x, gates, None, None), gates

    @torch.jit.export
    def forward_with_loss(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        gates, loss = self.gate(x)
        return self.mix(x, gates, None, None), gates, loss

    def gate(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(gates, balance loss); the loss is computed while training only."""
        clean = x @ self.w_gate
        logits, noise_std = self.noisy_logits(x, clean)
        gates, top_logits = self.top_k_gates(logits)
        if self.training:
            return gates, self.balance_loss(clean, logits, noise_std, top_logits, gates)
        return gates, torch.zeros((), dtype=x.dtype, device=x.device)

    def noisy_logits(self, x: Tensor, clean: Tensor) -> Tuple[Tensor, Tensor]:
        """Gate logits, with Gaussian noise of std softplus(x W_noise) while training."""
        if self.training and self.noisy_gating:
            noise_std = F.softplus(x @ self.w_noise) + 1e-2
            return clean + torch.randn_like(clean) * noise_std, noise_std
        return clean, torch.ones_like(clean)

    def top_k_gates(self, logits: Tensor) -> Tuple[Tensor, Tensor]:
        """Softmax over the top-k logits scattered into (N, EXPERTS). While training also the
        (k+1)-th logit, which the load estimator needs."""
        if not self.training or self.top == self.num_experts:
            top_logits, top_indices = logits.topk(self.top, dim=1)
            return torch.zeros_like(logits).scatter(1, top_indices, F.softmax(top_logits, dim=1)), top_logits
        top_logits, top_indices = logits.topk(self.top + 1, dim=1)
        weights = F.softmax(top_logits[:, :self.top], dim=1)
        gates = torch.zeros_like(logits).scatter(1, top_indices[:, :self.top], weights)
        return gates, top_logits

    def mix(self, x: Tensor, gates: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        """sum_e gates[:, e] * expert_e(x), then the linear layer (weight, bias) if one is given."""
        if self.routing == "dense":
            return self.mix_dense(x, gates, weight, bias)
        return self.dispatch_loop(x, gates, weight, bias)

    def mix_dense(self, x: Tensor, gates: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        """Static shapes: every expert on every row as two wide matrix products, the hidden units
        of unchosen experts zeroed by their gate weight; no NonZero, no data-dependent shape.
        Exact rewrites that make the exported graph small (export_onnx.py folds the weight products):
        a following linear layer is folded into each expert's output layer (nothing nonlinear lies
        between them), and each expert gets one extra hidden unit that is always 1 and carries the
        expert's output bias, so the gated sum needs no product of its own."""
        w1: List[Tensor] = []
        b1: List[Tensor] = []
        w2: List[Tensor] = []
        for expert in self.experts:
            out_weight, out_bias = expert.fc2.weight, expert.fc2.bias
            if weight is not None:
                out_weight, out_bias = weight @ out_weight, weight @ out_bias
            w1.append(torch.cat([expert.fc1.weight, torch.zeros(1, self.dim, dtype=x.dtype, device=x.device)]))
            b1.append(torch.cat([expert.fc1.bias, torch.ones(1, dtype=x.dtype, device=x.device)]))
            w2.append(torch.cat([out_weight, out_bias.unsqueeze(1)], 1))
        hidden = F.relu(F.linear(x, torch.cat(w1), torch.cat(b1)))  # (N, EXPERTS * (HIDDEN + 1))
        return F.linear(hidden * (gates @ self.gate_to_units), torch.cat(w2, 1), bias)

    def dispatch_loop(self, x: Tensor, gates: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        """Classic per-expert dispatch: each expert sees only the rows routed to it. A following
        linear layer (weight, bias) is folded into each expert's output layer, as in mix_dense, so
        the rows scattered back are already that layer's outputs."""
        width = self.dim if weight is None else weight.shape[0]
        out = torch.zeros(x.shape[0], width, dtype=x.dtype, device=x.device)
        for i, expert in enumerate(self.experts):
            rows = torch.nonzero(gates[:, i] > 0).squeeze(1)
            out_weight, out_bias = expert.fc2.weight, expert.fc2.bias
            if weight is not None:
                out_weight, out_bias = weight @ out_weight, weight @ out_bias
            hidden = F.relu(expert.fc1(x.index_select(0, rows)))
            weighted = F.linear(hidden, out_weight, out_bias) * gates[:, i].index_select(0, rows).unsqueeze(1)
            out = out.index_put((rows,), weighted, accumulate=True)
        return out if bias is None else out + bias

    @torch.jit.unused
    def global_sum(self, x: Tensor) -> Tensor:
        """x summed over the rows of every rank (x itself in one process)."""
        return x if self.sum_across_ranks is None else self.sum_across_ranks(x)

    def balance_loss(self, clean: Tensor, logits: Tensor, noise_std: Tensor, top_logits: Tensor,
                     gates: Tensor) -> Tensor:
        """Computed from per-expert sums over the whole (global) batch."""
        if self.balance_loss_kind == "switch":
            return self.w_switch * self.switch_loss(logits, gates)
        if self.balance_loss_kind == "shazeer":
            importance = self.global_sum(gates.sum(0))
            load = self.global_sum(self.smooth_load(clean, logits, noise_std, top_logits, gates))
            return self.w_importance * cv_squared(importance) + self.w_load * cv_squared(load)
        return torch.zeros((), dtype=clean.dtype, device=clean.device)

    def smooth_load(self, clean: Tensor, logits: Tensor, noise_std: Tensor, top_logits: Tensor,
                    gates: Tensor) -> Tensor:
        """Expected tokens per expert under fresh noise (Shazeer et al. 2017, appendix A): the
        probability that expert i stays in the top k if only its own noise were resampled.
        Differentiable through the normal CDF; without noise (or k = EXPERTS) the hard count."""
        noisy = self.training and self.noisy_gating and self.top < self.num_experts
        if not noisy:
            return (gates > 0).to(clean.dtype).sum(0)
        threshold_if_in = top_logits[:, self.top:self.top + 1]  # the (k+1)-th logit to beat
        threshold_if_out = top_logits[:, self.top - 1:self.top]  # the k-th logit to beat
        is_in = logits > threshold_if_in
        prob_if_in = normal_cdf((clean - threshold_if_in) / noise_std)
        prob_if_out = normal_cdf((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out).sum(0)

    def switch_loss(self, logits: Tensor, gates: Tensor) -> Tensor:
        """Switch Transformer auxiliary loss: E * sum_i (share of routed slots to i) * (mean prob of i)."""
        rows = self.global_sum(torch.full((1,), float(logits.shape[0]), dtype=logits.dtype, device=logits.device))
        share = self.global_sum((gates > 0).to(logits.dtype).sum(0)) / (rows * self.top)
        mean_prob = self.global_sum(F.softmax(logits, dim=1).sum(0)) / rows
        return self.num_experts * (share * mean_prob).sum()


class MoEClassifier(nn.Module):
    """pixels (N, 1, 28, 28) in [0, 1] -> embedding -> MoE -> class logits."""

    def __init__(self, structure: dict):
        super().__init__()
        self.pixel_mean = PIXEL_MEAN
        self.pixel_std = PIXEL_STD
        self.embed = nn.Linear(structure["INPUT_SIZE"], structure["EMB_SIZE"])
        self.moe = MoE(structure["EMB_SIZE"], structure["HIDDEN_SIZE"], structure["EXPERTS"],
                       structure["TOP"], structure["NOISY_GATING"], structure["BALANCE_LOSS"],
                       structure["W_IMPORTANCE"], structure["W_LOAD"], structure["W_SWITCH"],
                       structure["ROUTING"])
        self.head = nn.Linear(structure["EMB_SIZE"], structure["CLASSES"])

    def embedding(self, images: Tensor) -> Tensor:
        """ReLU(embed((pixels - mean) / std)), with the normalisation folded into the weights so
        the exported graph spends no pass over the pixels on it."""
        weight = self.embed.weight / self.pixel_std
        bias = self.embed.bias - (self.pixel_mean / self.pixel_std) * self.embed.weight.sum(1)
        return F.relu(F.linear(images.flatten(1), weight, bias))

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """(class logits (N, CLASSES), gates (N, EXPERTS))."""
        x = self.embedding(images)
        gates, _ = self.moe.gate(x)
        return self.moe.mix(x, gates, self.head.weight, self.head.bias), gates

    @torch.jit.export
    def forward_with_loss(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """forward() plus the balance loss, for training."""
        x = self.embedding(images)
        gates, loss = self.moe.gate(x)
        return self.moe.mix(x, gates, self.head.weight, self.head.bias), gates, loss


def build_model(structure: dict) -> MoEClassifier:
    return MoEClassifier(structure)
