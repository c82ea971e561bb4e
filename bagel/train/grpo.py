"""The GRPO objective for flow models (Flow-GRPO), as pure functions over tensors.

* Advantages are normalised within each group of G samples of one prompt:
  A = (r - mean_group(r)) / (std_group(r) + eps), std with Bessel's correction off (population),
  as Flow-GRPO computes it. A group whose rewards are all equal has A = 0 (it teaches nothing).
* The clipped surrogate per step and sample: -min(rho * A, clip(rho, 1 - c, 1 + c) * A), with
  rho = exp(logp_new - logp_old); averaged over steps and samples.
* KL to a reference policy: both transitions are Gaussians with the same std, so
  KL = ||mean - mean_ref||^2 / (2 std^2), averaged per element like the log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(P * G,) rewards, groups contiguous -> (P * G,) normalised advantages."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to compare samples of a prompt, got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar, differentiable
    ratio_mean: float
    clip_fraction: float  # share of (step, sample) terms where the clipped term was the minimum's choice
    kl: float


def clipped_objective(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                      clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ratio, clipped mask) of the clipped surrogate. logp_*: (S, B); advantages: (B,)."""
    ratio = torch.exp(logp_new - logp_old.to(logp_new.device))
    adv = advantages.to(logp_new.device)[None, :]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip, 1 + clip) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    return loss, ratio.detach(), (clipped < unclipped).detach()


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: float) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per image, averaged over elements: (B, ...) -> (B,)."""
    return ((mean - mean_ref.to(mean.device)) ** 2).flatten(1).mean(1) / (2 * std ** 2)


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip: float,
                kl: torch.Tensor | None = None, kl_weight: float = 0.0) -> PolicyLoss:
    """The clipped surrogate plus kl_weight * mean KL (kl: (S, B) or None)."""
    loss, ratio, clipped = clipped_objective(logp_new, logp_old, advantages, clip)
    kl_mean = torch.zeros((), device=loss.device) if kl is None else kl.mean()
    if kl is not None and kl_weight:
        loss = loss + kl_weight * kl_mean
    return PolicyLoss(loss, float(ratio.mean()), float(clipped.float().mean()), float(kl_mean.detach()))
