"""The FLUX autoencoder of BAGEL's generation path, run through diffusers' `AutoencoderKL`.

Notable choices:
- The network is diffusers' `AutoencoderKL` in the FLUX layout (no quant / post-quant convs,
  `latent_channels = z_channels`, one-head mid-block attention). Its encoder and decoder compute
  exactly what BFL's `AutoEncoder` computes (downsampling pads right/bottom by one pixel,
  upsampling is nearest x2), so only parameter names differ. The one numerical difference is
  `F.silu` (diffusers) versus BFL's `x * sigmoid(x)`: on the tiny official fixture that costs
  <= 2.6e-6 max abs (outputs of magnitude ~2); with `x * sigmoid(x)` swapped in the outputs are
  bit-identical. We keep the fused SiLU.
- Weights are stored in BFL's `ae.safetensors` layout. The renaming is data: one table of name
  templates read in both directions, plus two structural rules: BFL's decoder `up[i]` is diffusers'
  `up_blocks[L-1-i]` (BFL runs `up` from the last index, diffusers from the first), and the
  attention q/k/v/proj_out are 1x1 convs ([C, C, 1, 1]) in BFL but Linear layers ([C, C]) in
  diffusers.
- The posterior sample is computed here from the raw encoder moments rather than with diffusers'
  `DiagonalGaussianDistribution`, because that class clamps logvar to [-30, 20] and BFL's
  `DiagonalGaussian` does not.
- BAGEL's latent convention: z = scale * (x - shift) after encoding, x = z / scale + shift before
  decoding (FLUX: scale 0.3611, shift 0.1159).
- diffusers is imported inside functions: its cold import costs 4-7 s, and most users of this
  module (patchify helpers, image conversion) never build the network.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from bagel.checkpoint.errors import CheckpointError
from bagel.config import ConfigError, VAEConfig

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


# ------------------------------------------------------------------------------------------------
# Checkpoint key map: BFL `ae.safetensors` <-> diffusers `AutoencoderKL.state_dict()`
# ------------------------------------------------------------------------------------------------
# One row per tensor family: (BFL template, diffusers template), read in both directions.
# Placeholders: {io} encoder|decoder, {i}/{j} level and block numbers, {r} a resnet parameter,
# {wb} weight|bias. Decoder levels keep BFL's index here; `_flip_decoder_level` then reverses it.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("{io}.conv_in.{wb}", "{io}.conv_in.{wb}"),
    ("{io}.conv_out.{wb}", "{io}.conv_out.{wb}"),
    ("{io}.norm_out.{wb}", "{io}.conv_norm_out.{wb}"),
    ("encoder.down.{i}.block.{j}.{r}.{wb}", "encoder.down_blocks.{i}.resnets.{j}.{r}.{wb}"),
    ("encoder.down.{i}.block.{j}.nin_shortcut.{wb}", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{wb}"),
    ("encoder.down.{i}.downsample.conv.{wb}", "encoder.down_blocks.{i}.downsamplers.0.conv.{wb}"),
    ("decoder.up.{i}.block.{j}.{r}.{wb}", "decoder.up_blocks.{i}.resnets.{j}.{r}.{wb}"),
    ("decoder.up.{i}.block.{j}.nin_shortcut.{wb}", "decoder.up_blocks.{i}.resnets.{j}.conv_shortcut.{wb}"),
    ("decoder.up.{i}.upsample.conv.{wb}", "decoder.up_blocks.{i}.upsamplers.0.conv.{wb}"),
    ("{io}.mid.block_1.{r}.{wb}", "{io}.mid_block.resnets.0.{r}.{wb}"),
    ("{io}.mid.block_2.{r}.{wb}", "{io}.mid_block.resnets.1.{r}.{wb}"),
    ("{io}.mid.attn_1.norm.{wb}", "{io}.mid_block.attentions.0.group_norm.{wb}"),
    ("{io}.mid.attn_1.q.{wb}", "{io}.mid_block.attentions.0.to_q.{wb}"),
    ("{io}.mid.attn_1.k.{wb}", "{io}.mid_block.attentions.0.to_k.{wb}"),
    ("{io}.mid.attn_1.v.{wb}", "{io}.mid_block.attentions.0.to_v.{wb}"),
    ("{io}.mid.attn_1.proj_out.{wb}", "{io}.mid_block.attentions.0.to_out.0.{wb}"),
)
_PLACEHOLDERS = {"io": "encoder|decoder", "i": r"\d+", "j": r"\d+", "r": "norm1|conv1|norm2|conv2",
                 "wb": "weight|bias"}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    body = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p]})" for k, p in enumerate(parts))
    return re.compile(body)


_BFL_TO_DIFFUSERS = [(_compile(bfl), ours) for bfl, ours in KEY_MAP]
_DIFFUSERS_TO_BFL = [(_compile(ours), bfl) for bfl, ours in KEY_MAP]

# Weights that are [C, C, 1, 1] convs in BFL and [C, C] Linear layers in diffusers (diffusers names).
ATTN_LINEAR_WEIGHT = r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight"

_ATTN_LINEAR_WEIGHT = re.compile(ATTN_LINEAR_WEIGHT)
_BFL_DECODER_LEVEL = re.compile(r"decoder\.up\.(\d+)\.")
_DIFFUSERS_DECODER_LEVEL = re.compile(r"decoder\.up_blocks\.(\d+)\.")


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    """`key` renamed by the first matching row of `table`, or None if no row matches."""
    for pattern, template in table:
        m = pattern.fullmatch(key)
        if m:
            return template.format(**m.groupdict())
    return None


def _flip_decoder_level(key: str, num_levels: int) -> str:
    """Map diffusers-style `decoder.up_blocks.i.` to `decoder.up_blocks.{L-1-i}.` (an involution)."""
    return _DIFFUSERS_DECODER_LEVEL.sub(
        lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.", key, count=1
    )


def _infer_num_levels(keys, level_pattern: re.Pattern) -> int:
    """Number of decoder resolution levels = 1 + the largest decoder level index among `keys`."""
    levels = [int(m.group(1)) for k in keys if (m := level_pattern.match(k))]
    return 1 + max(levels) if levels else 0


def bfl_to_diffusers(
    state_dict: dict[str, torch.Tensor], num_levels: int | None = None
) -> dict[str, torch.Tensor]:
    """Rename a BFL `ae.safetensors` state dict to diffusers `AutoencoderKL` names.

    `num_levels` (= len(ch_mult)) is needed to reverse the decoder level index; by default it is
    inferred from the `decoder.up.{i}` keys. Raises CheckpointError for a key no rule maps.
    """
    if num_levels is None:
        num_levels = _infer_num_levels(state_dict, _BFL_DECODER_LEVEL)
    out = {}
    for key, tensor in state_dict.items():
        new = _rename(key, _BFL_TO_DIFFUSERS)
        if new is None:
            raise CheckpointError(
                f"no BFL -> diffusers rule maps VAE key {key!r} (shape {list(tensor.shape)})"
            )
        new = _flip_decoder_level(new, num_levels)
        if _ATTN_LINEAR_WEIGHT.fullmatch(new):
            if tensor.ndim != 4 or tuple(tensor.shape[2:]) != (1, 1):
                raise CheckpointError(
                    f"VAE key {key!r}: expected a 1x1 conv weight [C_out, C_in, 1, 1], "
                    f"got {list(tensor.shape)}"
                )
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # (C_out, C_in)
        out[new] = tensor
    return out


def diffusers_to_bfl(
    state_dict: dict[str, torch.Tensor], num_levels: int | None = None
) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to BFL `ae.safetensors` names (inverse of
    `bfl_to_diffusers`). Raises CheckpointError for a key no rule maps."""
    if num_levels is None:
        num_levels = _infer_num_levels(state_dict, _DIFFUSERS_DECODER_LEVEL)
    out = {}
    for key, tensor in state_dict.items():
        if _ATTN_LINEAR_WEIGHT.fullmatch(key):
            if tensor.ndim != 2:
                raise CheckpointError(
                    f"VAE key {key!r}: expected a Linear weight [C_out, C_in], got {list(tensor.shape)}"
                )
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # (C_out, C_in, 1, 1)
        new = _rename(_flip_decoder_level(key, num_levels), _DIFFUSERS_TO_BFL)
        if new is None:
            raise CheckpointError(
                f"no diffusers -> BFL rule maps VAE key {key!r} (shape {list(tensor.shape)})"
            )
        out[new] = tensor
    return out


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------
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
                eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            elif eps.shape != mean.shape:
                raise ValueError(f"VAE.encode: eps has shape {list(eps.shape)}, expected {list(mean.shape)}")
            # No logvar clamp, as in BFL's DiagonalGaussian (diffusers clamps to [-30, 20]).
            x = mean + torch.exp(0.5 * logvar) * eps
        return self.scale_factor * (x - self.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, z, h, w) -> images (N, 3, 8h, 8w), nominally in [-1, 1] but not clamped."""
        return self.ae.decoder(z / self.scale_factor + self.shift_factor)


# ------------------------------------------------------------------------------------------------
# Loading and saving the BFL layout
# ------------------------------------------------------------------------------------------------
_MAX_LISTED_PROBLEMS = 20


def _check_against_model(path: Path, found: dict[str, list[int]], expected: dict[str, list[int]],
                         cfg: VAEConfig) -> None:
    """Raise CheckpointError listing every missing / unexpected key and shape mismatch."""
    problems = [f"missing key {k!r} (expected shape {expected[k]})" for k in expected if k not in found]
    problems += [f"unexpected key {k!r} (shape {found[k]})" for k in found if k not in expected]
    problems += [
        f"key {k!r} has shape {found[k]} in the file, the model expects {expected[k]}"
        for k in found if k in expected and found[k] != expected[k]
    ]
    if problems:
        shown = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise CheckpointError(
            f"{path}: VAE checkpoint (BFL ae.safetensors layout) does not match {cfg}:\n  "
            + "\n  ".join(shown)
        )


def load_vae(path: str | Path, cfg: VAEConfig, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> VAE:
    """Read a BFL-layout `ae.safetensors` into a VAE (eval mode), strictly: any missing or
    unexpected key or wrong shape raises CheckpointError naming the file, key and shapes."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VAE checkpoint not found (expected a BFL ae.safetensors file)")
    num_levels = len(cfg.ch_mult)
    with torch.device("meta"):
        vae = VAE(cfg)
    expected = {k: list(v.shape) for k, v in diffusers_to_bfl(vae.ae.state_dict(), num_levels).items()}
    with safe_open(str(path), framework="pt") as f:
        found = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        _check_against_model(path, found, expected, cfg)
        bfl = {k: f.get_tensor(k) for k in found}
    state = {k: v.to(device=device, dtype=dtype) for k, v in bfl_to_diffusers(bfl, num_levels).items()}
    vae.ae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()


def save_vae_bfl(vae: VAE, path: str | Path) -> None:
    """Write `vae`'s weights in the BFL `ae.safetensors` layout, atomically (temp file + rename)."""
    from bagel.checkpoint.io import save_safetensors

    state = diffusers_to_bfl(vae.ae.state_dict(), len(vae.cfg.ch_mult))
    save_safetensors({k: state[k] for k in sorted(state)}, path, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------
# Latent tokens (official `Bagel` patchify of VAE latents)
# ------------------------------------------------------------------------------------------------
def patchify_latent(latent: torch.Tensor, p: int) -> torch.Tensor:
    """One latent (C, h*p, w*p) -> tokens (h*w, p*p*C), raster order over the (h, w) grid, token
    features ordered (row-in-patch, column-in-patch, channel)."""
    C, H, W = latent.shape
    if H % p or W % p:
        raise ValueError(
            f"patchify_latent: latent shape {list(latent.shape)} is not divisible by patch size {p}"
        )
    h, w = H // p, W // p
    x = latent.reshape(C, h, p, w, p)  # (C, h, p, w, p)
    x = x.permute(1, 3, 2, 4, 0)  # (h, w, p, p, C)
    return x.reshape(h * w, p * p * C)  # (h*w, p*p*C)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int, C: int) -> torch.Tensor:
    """Tokens (h*w, p*p*C) -> one latent (C, h*p, w*p); the inverse of `patchify_latent`."""
    if tuple(tokens.shape) != (h * w, p * p * C):
        raise ValueError(
            f"unpatchify_latent: tokens have shape {list(tokens.shape)}, expected {[h * w, p * p * C]}"
        )
    x = tokens.reshape(h, w, p, p, C)  # (h, w, p, p, C)
    x = x.permute(4, 0, 2, 1, 3)  # (C, h, p, w, p)
    return x.reshape(C, h * p, w * p)  # (C, h*p, w*p)


def crop_latent(padded_latent: torch.Tensor, h_tokens: int, w_tokens: int, p: int) -> torch.Tensor:
    """Crop a latent of a zero-padded image batch (C, H', W') to its own (C, h*p, w*p)."""
    C, H, W = padded_latent.shape
    if h_tokens * p > H or w_tokens * p > W:
        raise ValueError(
            f"crop_latent: {h_tokens}x{w_tokens} tokens of patch {p} need {[C, h_tokens * p, w_tokens * p]}, "
            f"latent is {list(padded_latent.shape)}"
        )
    return padded_latent[:, : h_tokens * p, : w_tokens * p]


# ------------------------------------------------------------------------------------------------
# Images <-> tensors (official `ImageTransform` normalisation and decode-to-uint8 convention)
# ------------------------------------------------------------------------------------------------
