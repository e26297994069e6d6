"""Sparsely-gated Mixture-of-Experts (Shazeer et al. 2017) and the MNIST classifier built on it.

Everything here is scriptable with torch.jit.script: routing has data-dependent control flow.
"""
import math
from typing import Tuple

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
                 w_switch: float = 0.01):
        super().__init__()
        self.num_experts = experts
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

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        clean = x @ self.w_gate
        logits, _ = self.noisy_logits(x, clean)
        gates, _ = self.top_k_gates(logits)
        return self.dispatch(x, gates), gates

    @torch.jit.export
    def forward_with_loss(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        clean = x @ self.w_gate
        logits, noise_std = self.noisy_logits(x, clean)
        gates, top_logits = self.top_k_gates(logits)
        loss = self.balance_loss(clean, logits, noise_std, top_logits, gates)
        return self.dispatch(x, gates), gates, loss

    def noisy_logits(self, x: Tensor, clean: Tensor) -> Tuple[Tensor, Tensor]:
        """Gate logits, with Gaussian noise of std softplus(x W_noise) while training."""
        if self.training and self.noisy_gating:
            noise_std = F.softplus(x @ self.w_noise) + 1e-2
            return clean + torch.randn_like(clean) * noise_std, noise_std
        return clean, torch.ones_like(clean)

    def top_k_gates(self, logits: Tensor) -> Tuple[Tensor, Tensor]:
        """Softmax over the top-k logits scattered into (N, EXPERTS); also the top k+1 logits,
        which the load estimator needs."""
        kept = min(self.top + 1, self.num_experts)
        top_logits, top_indices = logits.topk(kept, dim=1)
        weights = F.softmax(top_logits[:, :self.top], dim=1)
        gates = torch.zeros_like(logits).scatter(1, top_indices[:, :self.top], weights)
        return gates, top_logits

    def dispatch(self, x: Tensor, gates: Tensor) -> Tensor:
        """Classic per-expert dispatch: each expert sees only the rows routed to it."""
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            rows = torch.nonzero(gates[:, i] > 0).squeeze(1)
            weighted = expert(x.index_select(0, rows)) * gates.index_select(0, rows)[:, i:i + 1]
            out = out.index_add(0, rows, weighted)
        return out

    def balance_loss(self, clean: Tensor, logits: Tensor, noise_std: Tensor, top_logits: Tensor,
                     gates: Tensor) -> Tensor:
        if self.balance_loss_kind == "switch":
            return self.w_switch * self.switch_loss(logits, gates)
        if self.balance_loss_kind == "shazeer":
            importance = gates.sum(0)
            load = self.smooth_load(clean, logits, noise_std, top_logits, gates)
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
        share = (gates > 0).to(logits.dtype).mean(0) / self.top
        mean_prob = F.softmax(logits, dim=1).mean(0)
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
                       structure["W_IMPORTANCE"], structure["W_LOAD"], structure["W_SWITCH"])
        self.head = nn.Linear(structure["EMB_SIZE"], structure["CLASSES"])

    def embedding(self, images: Tensor) -> Tensor:
        x = (images.flatten(1) - self.pixel_mean) / self.pixel_std
        return F.relu(self.embed(x))

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """(class logits (N, CLASSES), gates (N, EXPERTS))."""
        mixed, gates = self.moe(self.embedding(images))
        return self.head(mixed), gates

    @torch.jit.export
    def forward_with_loss(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """forward() plus the balance loss, for training."""
        mixed, gates, loss = self.moe.forward_with_loss(self.embedding(images))
        return self.head(mixed), gates, loss


def build_model(structure: dict) -> MoEClassifier:
    return MoEClassifier(structure)
