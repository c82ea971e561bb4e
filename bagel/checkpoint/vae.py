"""The FLUX VAE's files: BFL `ae.safetensors` <-> diffusers `AutoencoderKL`, and its config.

The renaming is data: one table of name templates read in both directions, plus two structural
rules: BFL's decoder `up[i]` is diffusers' `up_blocks[L-1-i]` (BFL runs `up` from the last index,
diffusers from the first), and the attention q/k/v/proj_out are 1x1 convs ([C, C, 1, 1]) in BFL
but Linear layers ([C, C]) in diffusers. `ae_config.json` beside the weights holds the VAEConfig
(a first-stage VAE's fitted latent scale and shift travel in it).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from bagel.checkpoint.files import SafetensorsFile, save_safetensors, write_text
from bagel.checkpoint.strict import CheckpointError, check_shapes
from bagel.config import VAEConfig
from bagel.model.vae import VAE

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


def load_vae(path: str | Path, cfg: VAEConfig, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> VAE:
    """Read a BFL-layout `ae.safetensors` into a VAE (eval mode), strictly: any missing or
    unexpected key or wrong shape raises CheckpointError naming the file, key and shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VAE checkpoint not found (expected a BFL ae.safetensors file)")
    num_levels = len(cfg.ch_mult)
    with torch.device("meta"):
        vae = VAE(cfg)
    expected = {k: list(v.shape) for k, v in diffusers_to_bfl(vae.ae.state_dict(), num_levels).items()}
    file = SafetensorsFile(path, "VAE checkpoint")
    check_shapes(str(path), file.shapes(), expected, f"the VAE config {cfg} (BFL ae.safetensors layout)")
    bfl = {k: file.get(k) for k in file.names()}
    state = {k: v.to(device=device, dtype=dtype) for k, v in bfl_to_diffusers(bfl, num_levels).items()}
    vae.ae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()


def save_vae(vae: VAE, path: str | Path) -> None:
    """Write `vae`'s weights in the BFL `ae.safetensors` layout, atomically, and its config as
    `ae_config.json` beside it."""
    path = Path(path)
    state = diffusers_to_bfl(vae.ae.state_dict(), len(vae.cfg.ch_mult))
    save_safetensors({k: state[k] for k in sorted(state)}, path)
    write_vae_config(vae.cfg, path.with_name(VAE_CONFIG_NAME))


VAE_CONFIG_NAME = "ae_config.json"


def write_vae_config(cfg: VAEConfig, path: str | Path) -> None:
    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    write_text(path, json.dumps(data, indent=2) + "\n")
