"""Sample plans -> one PackedBatch, following the official packing conventions.

A *sample* is an ordered list of plan items (`Text`, `VitImage`, `VaeImage`); a batch is a list
of samples packed into one flat sequence (no batch dimension). Layout per item (see the fixture
contract in tests/assets/README.md):

* Text:     [<|im_start|>] + ids + [<|im_end|>], mode `causal`, consecutive RoPE ids. With loss,
            CE sits on <|im_start|> and the text tokens, labels = ids + [<|im_end|>], weight
            1/sqrt(len(ids)+1) each. The closing <|im_end|> carries CE only with
            `special_token_loss` (label = `special_token_label`).
* VitImage: [<|vision_start|>] + patches + [<|vision_end|>], mode `full`, one shared RoPE id,
            counter += 1.
* VaeImage: clean (loss=False): same layout, mode `full`, shared RoPE id, counter += 1, timestep
            logit -inf (t = 0). Noisy target (loss=True): mode `noise`, shared RoPE id, counter
            does NOT advance (the clean copy that may follow reuses the id); MSE on its latents.

RoPE ids restart at 0 for each sample. CFG dropout (training) drops `enable_cfg` items: a dropped
text does not advance the RoPE counter, a dropped image does (official behaviour).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bagel.batch import PackedBatch


@dataclass
class Text:
    ids: list[int]  # token ids, no markers
    loss: bool = False
    enable_cfg: bool = False  # may be dropped for classifier-free guidance training
    special_token_loss: bool = False  # CE on the closing <|im_end|> too
    special_token_label: int | None = None  # its label (e.g. <|vision_start|>: "an image follows")


@dataclass
class VitImage:
    image: torch.Tensor  # (3, H, W) in [-1, 1]; H, W multiples of the ViT patch size
    enable_cfg: bool = False


@dataclass
class VaeImage:
    image: torch.Tensor  # (3, H, W) in [-1, 1]; H, W multiples of latent_downsample (16)
    loss: bool = False  # True: noisy generation target (MSE); False: clean condition
    enable_cfg: bool = False
    timestep_logit: float | None = None  # noisy targets: None draws N(0, 1) at pack time


@dataclass
class DroppedImage:
    """An image condition removed by CFG dropout: no tokens, but it keeps its RoPE slot."""


PlanItem = Text | VitImage | VaeImage | DroppedImage
Sample = list[PlanItem]


@dataclass
class CfgDropout:
    """Probabilities of dropping an `enable_cfg` condition at pack time (training CFG)."""

    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3


def apply_cfg_dropout(sample: Sample, dropout: CfgDropout, draw) -> Sample:
    """Drop `enable_cfg` conditions: a dropped text disappears (the RoPE counter does not move), a
    dropped image becomes a `DroppedImage` (the counter still advances by one), as the official
    packer does. `draw()` returns uniform [0, 1) numbers, one per droppable item, in plan order."""
    out: Sample = []
    for item in sample:
        if isinstance(item, Text) and item.enable_cfg and draw() < dropout.text:
            continue
        if isinstance(item, VitImage) and item.enable_cfg and draw() < dropout.vit:
            item = DroppedImage()
        elif isinstance(item, VaeImage) and item.enable_cfg and not item.loss and draw() < dropout.vae:
            item = DroppedImage()
        out.append(item)
    return out


def patchify_image(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(3, H, W) -> (H/p * W/p, p*p*3), raster patch order, features (row, col, channel)."""
    c, h, w = image.shape
    p = patch_size
    x = image.reshape(c, h // p, p, w // p, p)  # (C, gh, p, gw, p)
    x = x.permute(1, 3, 2, 4, 0)  # (gh, gw, p, p, C)
    return x.reshape((h // p) * (w // p), p * p * c)


def grid_position_ids(grid_h: int, grid_w: int, max_per_side: int) -> torch.Tensor:
    """Flattened 2-D ids `row * max_per_side + col` in raster order (the 'extrapolate' scheme)."""
    rows = torch.arange(grid_h).unsqueeze(1)
    cols = torch.arange(grid_w).unsqueeze(0)
    return (rows * max_per_side + cols).flatten()


def _check_image(item, stride: int, max_per_side: int, what: str, setting: str) -> tuple[int, int]:
    img = item.image
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"{what} image must have shape (3, H, W), got {tuple(img.shape)}")
    h, w = img.shape[1:]
    if h % stride or w % stride:
        raise ValueError(f"{what} image size {h}x{w} is not a multiple of {stride} pixels")
    gh, gw = h // stride, w // stride
    if gh > max_per_side or gw > max_per_side:
        raise ValueError(
            f"{what} image {h}x{w} gives a {gh}x{gw} token grid, larger than the position table "
            f"allows ({setting}={max_per_side} tokens per side, i.e. at most {max_per_side * stride} px)"
        )
    return gh, gw


def estimate_num_tokens(sample: Sample, cfg) -> int:
    """Exact sequence length of `sample` once packed (dropout already applied, or none)."""
    n = 0
    for item in sample:
        if isinstance(item, DroppedImage):
            continue
        if isinstance(item, Text):
            n += len(item.ids) + 2
        elif isinstance(item, VitImage):
            p = cfg.vit.patch_size
            n += (item.image.shape[1] // p) * (item.image.shape[2] // p) + 2
        else:
            d = cfg.latent_downsample
            n += (item.image.shape[1] // d) * (item.image.shape[2] // d) + 2
    return n


def pack_samples(samples: list[Sample], cfg, tokens, generator: torch.Generator | None = None,
                 dropout: CfgDropout | None = None) -> PackedBatch:
    """Pack `samples` into one PackedBatch (see the module docstring for the layout).

    `cfg` is a BagelConfig (geometry), `tokens` a SpecialTokens. `generator` drives timestep
    draws and CFG dropout; `dropout=None` keeps every condition.
    """
    def draw() -> float:
        return float(torch.rand((), generator=generator))

    text_ids, text_idx, pos_ids = [], [], []
    vit_tokens, vit_pos, vit_idx, vit_lens = [], [], [], []
    vae_images, vae_shapes, lat_pos, vae_idx, timesteps, mse_idx = [], [], [], [], [], []
    labels, ce_idx, ce_w = [], [], []
    sample_lens, split_lens, attn_modes = [], [], []
    curr = 0
    for sample_no, sample in enumerate(samples):
        if not sample:
            raise ValueError(f"sample {sample_no} has an empty plan")
        start, rope = curr, 0
        if dropout is not None:
            sample = apply_cfg_dropout(sample, dropout, draw)
        for item in sample:
            if isinstance(item, DroppedImage):
                rope += 1  # a dropped image still takes its RoPE slot (official behaviour)
                continue
            if isinstance(item, Text):
                ids = list(item.ids)
                n = len(ids) + 2
                text_ids += [tokens.bos, *ids, tokens.eos]
                text_idx += range(curr, curr + n)
                pos_ids += range(rope, rope + n)
                if item.loss:
                    ce_idx += range(curr, curr + n - 1)
                    labels += [*ids, tokens.eos]
                    ce_w += [1.0 / math.sqrt(len(ids) + 1)] * (n - 1)
                if item.special_token_loss:
                    if item.special_token_label is None:
                        raise ValueError(f"sample {sample_no}: special_token_loss needs special_token_label")
                    ce_idx.append(curr + n - 1)
                    labels.append(item.special_token_label)
                    ce_w.append(1.0)
                split_lens.append(n)
                attn_modes.append("causal")
                rope += n
            elif isinstance(item, VitImage):
                gh, gw = _check_image(item, cfg.vit.patch_size, cfg.vit_max_num_patch_per_side, "ViT",
                                     "vit_max_num_patch_per_side")
                n_img = gh * gw
                text_ids += [tokens.start_of_image, tokens.end_of_image]
                text_idx += [curr, curr + n_img + 1]
                vit_tokens.append(patchify_image(item.image, cfg.vit.patch_size))
                vit_pos.append(grid_position_ids(gh, gw, cfg.vit_max_num_patch_per_side))
                vit_idx += range(curr + 1, curr + 1 + n_img)
                vit_lens.append(n_img)
                pos_ids += [rope] * (n_img + 2)
                split_lens.append(n_img + 2)
                attn_modes.append("full")
                rope += 1
            elif isinstance(item, VaeImage):
                gh, gw = _check_image(item, cfg.latent_downsample, cfg.max_latent_size, "VAE", "max_latent_size")
                n_img = gh * gw
                text_ids += [tokens.start_of_image, tokens.end_of_image]
                text_idx += [curr, curr + n_img + 1]
                vae_images.append(item.image)
                vae_shapes.append((gh, gw))
                lat_pos.append(grid_position_ids(gh, gw, cfg.max_latent_size))
                token_range = range(curr + 1, curr + 1 + n_img)
                vae_idx += token_range
                pos_ids += [rope] * (n_img + 2)
                split_lens.append(n_img + 2)
                if item.loss:
                    logit = item.timestep_logit
                    if logit is None:
                        logit = float(torch.randn((), generator=generator))
                    timesteps += [logit] * n_img
                    mse_idx += token_range
                    attn_modes.append("noise")  # counter stays: a clean copy may reuse the id
                else:
                    timesteps += [float("-inf")] * n_img
                    attn_modes.append("full")
                    rope += 1
            else:
                raise TypeError(f"sample {sample_no}: unknown plan item {type(item).__name__}")
            curr += split_lens[-1]
        if curr == start:
            raise ValueError(f"sample {sample_no}: every item was dropped, nothing left to pack")
        sample_lens.append(curr - start)

    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    batch = dict(
        sequence_length=curr, sample_lens=sample_lens, split_lens=split_lens, attn_modes=attn_modes,
        position_ids=long(pos_ids), text_ids=long(text_ids), text_indexes=long(text_idx),
    )
    if vit_tokens:
        batch.update(
            vit_tokens=torch.cat(vit_tokens), vit_position_ids=torch.cat(vit_pos),
            vit_token_indexes=long(vit_idx), vit_token_seqlens=torch.tensor(vit_lens, dtype=torch.int32),
        )
    if vae_images:
        h_max = max(im.shape[1] for im in vae_images)
        w_max = max(im.shape[2] for im in vae_images)
        padded = vae_images[0].new_zeros(len(vae_images), 3, h_max, w_max)
        for i, im in enumerate(vae_images):
            padded[i, :, : im.shape[1], : im.shape[2]] = im
        batch.update(
            vae_images=padded, vae_latent_shapes=vae_shapes, latent_position_ids=torch.cat(lat_pos),
            vae_token_indexes=long(vae_idx), timesteps=torch.tensor(timesteps, dtype=torch.float32),
            mse_loss_indexes=long(mse_idx),
        )
    if ce_idx:
        batch.update(label_ids=long(labels), ce_loss_indexes=long(ce_idx),
                     ce_loss_weights=torch.tensor(ce_w, dtype=torch.float32))
    return PackedBatch(**batch)
