"""First-stage training of a small FLUX-layout autoencoder (diffusers' AutoencoderKL).

BAGEL freezes its VAE; to train the whole stack from scratch on a new domain (the digits demo)
the autoencoder is trained first, on its own: L1 + MSE reconstruction of the posterior sample
plus a small KL term, AdamW, a fixed number of steps. Afterwards `fit_latent_scaling` sets the
`shift_factor` / `scale_factor` so that the scaled latents z = scale * (x - shift) have zero mean
and unit variance, which is what the flow-matching noise schedule assumes (the FLUX values
0.1159 / 0.3611 were fitted the same way on its own data).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bagel.config import VAEConfig
from bagel.model.vae import VAE
from bagel.train.optim import fit_one_cycle


@dataclass
class AutoencoderTrainConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0


def train_autoencoder(images: torch.Tensor, cfg: VAEConfig, train: AutoencoderTrainConfig = AutoencoderTrainConfig(),
                      progress: bool = True) -> tuple[VAE, list[float]]:
    """images: (N, 3, H, W) in [-1, 1]. Returns the trained VAE (eval mode, scaling fitted) and
    the per-step reconstruction losses."""
    g = torch.Generator().manual_seed(train.seed)
    torch.manual_seed(train.seed)
    vae = VAE(dataclasses.replace(cfg, scale_factor=1.0, shift_factor=0.0))

    def step_loss():
        x = images[torch.randint(0, images.shape[0], (train.batch_size,), generator=g)]
        mean, logvar = vae.encoder_moments(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        recon = vae.ae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        return rec + train.kl_weight * kl, rec.item()

    losses = fit_one_cycle(vae, step_loss, train.steps, train.lr, desc="autoencoder", progress=progress)
    fit_latent_scaling(vae, images)
    return vae, losses


@torch.no_grad()
def fit_latent_scaling(vae: VAE, images: torch.Tensor, batch_size: int = 256) -> None:
    """Set shift/scale so the scaled posterior means of `images` have mean 0 and std 1."""
    means = torch.cat([vae.encoder_moments(images[i:i + batch_size]).chunk(2, dim=1)[0]
                       for i in range(0, images.shape[0], batch_size)])
    shift, std = float(means.mean()), float(means.std())
    vae.cfg = dataclasses.replace(vae.cfg, shift_factor=shift, scale_factor=1.0 / std)
    vae.shift_factor, vae.scale_factor = vae.cfg.shift_factor, vae.cfg.scale_factor


@torch.no_grad()
def reconstruction_error(vae: VAE, images: torch.Tensor) -> float:
    """Mean absolute error of decode(encode(mean)) in [-1, 1] pixel units."""
    return float((vae.decode(vae.encode(images, sample=False)) - images).abs().mean())
