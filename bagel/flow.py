"""Rectified-flow matching as pure functions over tensors (BAGEL's convention).

Time runs from t = 0 (data) to t = 1 (noise):  x_t = (1 - t) * x0 + t * eps, and the network
predicts the velocity v = eps - x0 (pointing from data to noise). Sampling integrates from t = 1
down to 0 with Euler steps x <- x - v * dt.

Training draws t = sigmoid(u), u ~ N(0, 1) (logit-normal; the packer draws u per image), then
applies the resolution shift t <- s t / (1 + (s - 1) t); clean conditioning images carry u = -inf,
i.e. t = 0. `noise_latents` is the whole training-side recipe in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bagel.sampling import RENORM_TYPES


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """s*t / (1 + (s-1)*t): s > 1 spends more time near the noise end (t = 1)."""
    return shift * t / (1 + (shift - 1) * t)


def timesteps_from_logits(logits: torch.Tensor, shift: float) -> torch.Tensor:
    """Logit-normal draws (or -inf for clean images) -> shifted t in [0, 1]."""
    return shift_timesteps(torch.sigmoid(logits), shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps; t has one value per row of x0."""
    t = t[:, None]
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


@dataclass
class NoisedLatents:
    """The flow-matching inputs and targets of one packed batch's latent tokens, (N_lat, ...)."""

    x0: torch.Tensor  # (N_lat, p*p*C) the clean latent tokens
    x_t: torch.Tensor  # (N_lat, p*p*C) what the model sees: (1 - t) x0 + t eps (clean rows: x0)
    t: torch.Tensor  # (N_lat,) shifted t in [0, 1], 0 for clean conditioning latents
    target: torch.Tensor  # (N_lat, p*p*C) velocity target eps - x0 (meaningful where t > 0)

    @property
    def noisy(self) -> torch.Tensor:
        """(N_lat,) bool: the rows that are generation targets (in mse_loss_indexes order)."""
        return self.t > 0


def noise_latents(clean: torch.Tensor, timestep_logits: torch.Tensor, shift: float,
                  noise: torch.Tensor) -> NoisedLatents:
    """Training noising of packed latent tokens: t = shift(sigmoid(u)), x_t, and the target.

    clean (N_lat, p*p*C) latent tokens; timestep_logits (N_lat,) u per token (-inf: clean);
    noise (N_lat, p*p*C) eps (its rows at clean tokens are unused). All in float32.
    """
    if noise.shape != clean.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(clean.shape)} "
                         "(one row per latent token)")
    clean, noise = clean.float(), noise.float()
    t = timesteps_from_logits(timestep_logits.float().to(clean.device), shift)
    return NoisedLatents(x0=clean, x_t=add_noise(clean, noise, t), t=t, target=velocity_target(clean, noise))


def sampling_timesteps(num_timesteps: int, shift: float) -> torch.Tensor:
    """The shifted inference grid t_0 = 1 > ... > t_{T-1} = 0 (T points, T-1 model evaluations)."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2 (got {num_timesteps}): the grid needs both ends")
    return shift_timesteps(torch.linspace(1, 0, num_timesteps), shift)


def euler_step(x: torch.Tensor, velocity: torch.Tensor, t: float | torch.Tensor,
               t_next: float | torch.Tensor) -> torch.Tensor:
    """One Euler step from t to t_next < t along the predicted velocity."""
    return x - velocity * (t - t_next)


# The stochastic sampler (Flow-GRPO's SDE) ---------------------------------------------------------
#
# The reverse-time SDE with the same marginals as the flow ODE dx = v dt, for x_t = (1 - t) x0 + t eps:
#     dx = [v + sigma_t^2 / (2 t) * (x + (1 - t) v)] dt + sigma_t dW,   sigma_t = a * sqrt(t / (1 - t)),
# integrated from t = 1 down with Euler-Maruyama (dt = t_next - t < 0). `a` is the noise level;
# a = 0 is the ODE (euler_step). At t = 1, sigma is taken at the grid's second point (1 - t = 0).

@dataclass
class SdeStep:
    mean: torch.Tensor  # the Gaussian transition's mean, like x
    std: float  # its standard deviation (one value for the whole step)


def sde_transition(x: torch.Tensor, velocity: torch.Tensor, t: float, t_next: float, noise_level: float,
                   t_cap: float) -> SdeStep:
    """The Gaussian x_next ~ N(mean, std^2) of one SDE step from t to t_next < t. `t_cap` < 1 stands
    in for t in sigma_t where t = 1 (usually the grid's second point)."""
    dt = t_next - t
    sigma = noise_level * math.sqrt(min(t, t_cap) / (1 - min(t, t_cap))) if noise_level > 0 else 0.0
    drift = velocity + sigma ** 2 / (2 * t) * (x + (1 - t) * velocity)
    return SdeStep(mean=x + drift * dt, std=sigma * math.sqrt(-dt))


def sde_sample(step: SdeStep, generator: torch.Generator | None = None,
               eps: torch.Tensor | None = None) -> torch.Tensor:
    """A draw from the transition (std 0: its mean, the ODE step)."""
    if step.std == 0:
        return step.mean
    if eps is None:
        eps = torch.randn(step.mean.shape, generator=generator, dtype=torch.float32).to(step.mean.device)
    return step.mean + step.std * eps


def transition_logprob(x_next: torch.Tensor, step: SdeStep) -> torch.Tensor:
    """log N(x_next; mean, std^2), averaged over every dimension but the first (one value per
    image, a per-element average as Flow-GRPO keeps it, so the ratio does not scale with the image
    size). x_next, step.mean: (B, ...) -> (B,)."""
    if step.std <= 0:
        raise ValueError("the log-probability of a deterministic step (noise level 0) is undefined")
    z = (x_next - step.mean).float() / step.std
    per_element = -0.5 * z ** 2 - math.log(step.std) - 0.5 * math.log(2 * math.pi)
    return per_element.flatten(1).mean(1)




def _norm_ratio(ref: torch.Tensor, guided: torch.Tensor, per_token: bool, renorm_min: float) -> torch.Tensor:
    """clamp(||ref|| / (||guided|| + 1e-8), renorm_min, 1): shrink guidance, never amplify."""
    if per_token:
        ratio = ref.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)
    else:
        ratio = ref.norm(dim=(-2, -1), keepdim=True) / (guided.norm(dim=(-2, -1), keepdim=True) + 1e-8)
    return ratio.clamp(min=renorm_min, max=1.0)


def apply_cfg(v: torch.Tensor, v_text: torch.Tensor | None, v_img: torch.Tensor | None, scale_text: float,
              scale_img: float, renorm_type: str = "global", renorm_min: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance over text and image conditions, exactly as the release combines it.

    v: full-context velocity (N, C) of one image, or (B, N, C) of B images; v_text: without the
    last text; v_img: without images. Guidance applies only when scale_text > 1 (then image
    guidance too, if scale_img > 1).
    `global` renorms by the norm over the whole image, `channel` per token; `text_channel`
    renorms per token after the text step only (arXiv 2412.07730's rescale, per the release).
    """
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg renorm type {renorm_type!r} is unknown; expected one of {RENORM_TYPES}")
    if scale_text <= 1.0:
        return v
    u = v_text + scale_text * (v - v_text)
    if renorm_type == "text_channel":
        u = u * _norm_ratio(v, u, per_token=True, renorm_min=renorm_min)
        return v_img + scale_img * (u - v_img) if scale_img > 1.0 else u
    if scale_img > 1.0:
        u = v_img + scale_img * (u - v_img)
    return u * _norm_ratio(v, u, per_token=renorm_type == "channel", renorm_min=renorm_min)
