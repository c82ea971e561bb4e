"""The FLUX autoencoder of BAGEL's generation path, run through diffusers' `AutoencoderKL`.

Notable choices:
- The network is diffusers' `AutoencoderKL` in the FLUX layout (no quant / post-quant convs,
  `latent_channels = z_channels`, one-head mid-block attention). Its encoder and decoder compute
  exactly what BFL's `AutoEncoder` computes (downsampling pads right/bottom by one pixel,
  upsampling is nearest x2), so only parameter names differ. The one numerical difference is
  `F.silu` (diffusers) versus BFL's `x * sigmoid(x)`: on the tiny official fixture that costs
  <= 2.6e-6 max abs (outputs of magnitude ~2); with `x * sigmoid(x)` swapped in the outputs are
  bit-identical. We keep the fused SiLU.
- Weights are stored in BFL's `ae.safetensors` layout; the renaming lives with the other key maps
  in bagel/checkpoint/vae.py.
- The posterior sample is computed here from the raw encoder moments rather than with diffusers'
  `DiagonalGaussianDistribution`, because that class clamps logvar to [-30, 20] and BFL's
  `DiagonalGaussian` does not.
- BAGEL's latent convention: z = scale * (x - shift) after encoding, x = z / scale + shift before
  decoding (FLUX: scale 0.3611, shift 0.1159).
- diffusers is imported inside functions: its cold import costs 4-7 s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from bagel.config import ConfigError, VAEConfig

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def build_autoencoder(cfg: VAEConfig) -> "AutoencoderKL":
    """A diffusers `AutoencoderKL` with the FLUX layout for `cfg` (randomly initialised; build it
    under `torch.device("meta")` to skip the initialisation)."""
    from diffusers import AutoencoderKL

    channels = tuple(cfg.ch * m for m in cfg.ch_mult)
    if any(c % cfg.norm_groups for c in channels):
        raise ConfigError(f"vae: channels {channels} (ch * ch_mult) must be multiples of "
                          f"norm_groups={cfg.norm_groups} (GroupNorm)")
    n = len(cfg.ch_mult)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels,
        layers_per_block=cfg.num_res_blocks,  # the decoder gets num_res_blocks + 1, as in BFL
        act_fn="silu",
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.resolution,  # only used by diffusers' tiling, which we never enable
        scaling_factor=cfg.scale_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


class VAE(nn.Module):
    """`AutoencoderKL` with BAGEL's latent convention (scale/shift, posterior sampling)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.ae = build_autoencoder(cfg)
        self.scale_factor = cfg.scale_factor
        self.shift_factor = cfg.shift_factor

    def encoder_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Raw encoder output (N, 2*z, H/8, W/8); channels are [mean, logvar]."""
        return self.ae.encoder(images)

    def encode(
        self,
        images: torch.Tensor,
        eps: torch.Tensor | None = None,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> latents z (N, z, H/8, W/8).

        z = scale * ((mean + exp(0.5 * logvar) * eps) - shift), eps ~ N(0, 1) drawn with
        `generator` unless given; `sample=False` uses the mean (eps must then be None). Sampling is
        on in the official training and inference paths.
        """
        mean, logvar = self.encoder_moments(images).chunk(2, dim=1)  # (N, z, h, w) each
        if not sample:
            if eps is not None:
                raise ValueError("VAE.encode: eps was given but sample=False (the mean ignores it)")
            x = mean
        else:
            if eps is None:
                # drawn on the CPU (where the callers' generators live), so a seed gives the same
                # noise on every device
                eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            elif eps.shape != mean.shape:
                raise ValueError(f"VAE.encode: eps has shape {list(eps.shape)}, expected {list(mean.shape)}")
            # No logvar clamp, as in BFL's DiagonalGaussian (diffusers clamps to [-30, 20]).
            x = mean + torch.exp(0.5 * logvar) * eps
        return self.scale_factor * (x - self.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, z, h, w) -> images (N, 3, 8h, 8w), nominally in [-1, 1] but not clamped."""
        return self.ae.decoder(z / self.scale_factor + self.shift_factor)
