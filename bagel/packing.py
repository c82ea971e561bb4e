"""Sample plans -> one PackedBatch, following the official packing conventions.

A *sample* is an ordered list of plan items (`Text`, `VitImage`, `VaeImage`); a batch is a list
of samples packed into one flat sequence (no batch dimension). Layout per item (see the fixture
contract in tests/assets/README.md):

* Text:     [<|im_start|>] + ids + [<|im_end|>], mode `causal`, consecutive RoPE ids. With loss,
            CE sits on <|im_start|> and the text tokens, labels = ids + [<|im_end|>], weight
            1/sqrt(len(ids)+1) each. The closing <|im_end|> carries CE only with
            `special_token_loss` (label = `special_token_label`).
* VitImage: [<|vision_start|>] + patches + [<|vision_end|>], mode `full`, one shared RoPE id,
            counter += 1. With `next_label`, the closing <|vision_end|> carries CE (weight 1) with
            that label: what follows the image (our interleaved-output protocol, see
            bagel.inference.engine; the release has no loss on image markers).
* VaeImage: clean (loss=False): same layout, mode `full`, shared RoPE id, counter += 1, timestep
            logit -inf (t = 0), optional `next_label` as for VitImage. Noisy target (loss=True):
            mode `noise`, shared RoPE id, counter does NOT advance (the clean copy that may follow
            reuses the id); MSE on its latents.

RoPE ids restart at 0 for each sample. CFG dropout (training; `apply_cfg_dropout`, decided by the
data pipeline before packing) drops `enable_cfg` items: a dropped text does not advance the RoPE
counter, a dropped image does (official behaviour).

This module also holds the two layout rules every other part uses: how many packed tokens an item
takes (`item_num_tokens`) and how an image or latent becomes tokens (`patchify`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
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
    next_label: int | None = None  # CE label of the closing <|vision_end|> (what follows the image)


@dataclass
class VaeImage:
    image: torch.Tensor  # (3, H, W) in [-1, 1]; H, W multiples of latent_downsample (16)
    loss: bool = False  # True: noisy generation target (MSE); False: clean condition
    enable_cfg: bool = False
    timestep_logit: float | None = None  # noisy targets: None draws N(0, 1) at pack time
    next_label: int | None = None  # clean images: CE label of the closing <|vision_end|>


@dataclass
class DroppedImage:
    """An image condition removed by CFG dropout: no tokens, but it keeps its RoPE slot."""


PlanItem = Text | VitImage | VaeImage | DroppedImage
Sample = list[PlanItem]


@dataclass
class CfgDropout:
    """Probabilities of dropping an `enable_cfg` condition (training CFG)."""

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


# Layout rules ----------------------------------------------------------------------------------------
def item_num_tokens(item: PlanItem, vit_stride: int, vae_stride: int) -> int:
    """Packed tokens of one plan item, markers included: text + 2, image grid cells + 2, 0 dropped.
    Strides: the ViT patch size and the pixels per latent token (`BagelConfig.latent_downsample`)."""
    if isinstance(item, DroppedImage):
        return 0
    if isinstance(item, Text):
        return len(item.ids) + 2
    stride = vit_stride if isinstance(item, VitImage) else vae_stride
    return image_num_tokens(item.image.shape[1], item.image.shape[2], stride)


def image_num_tokens(height: int, width: int, stride: int) -> int:
    """Packed tokens of one image of that size: its grid cells plus the two markers."""
    return (height // stride) * (width // stride) + 2


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(C, h*p, w*p) -> (h*w, p*p*C): raster order over the (h, w) grid, features ordered
    (row-in-patch, column-in-patch, channel). ViT pixels and VAE latents use the same layout."""
    c, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"patchify: shape {list(x.shape)} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(c, h, p, w, p)  # (C, h, p, w, p)
    x = x.permute(1, 3, 2, 4, 0)  # (h, w, p, p, C)
    return x.reshape(h * w, p * p * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """(h*w, p*p*C) -> (C, h*p, w*p); the inverse of `patchify`."""
    if tuple(tokens.shape) != (h * w, p * p * c):
        raise ValueError(f"unpatchify: tokens have shape {list(tokens.shape)}, expected {[h * w, p * p * c]}")
    x = tokens.reshape(h, w, p, p, c)  # (h, w, p, p, C)
    x = x.permute(4, 0, 2, 1, 3)  # (C, h, p, w, p)
    return x.reshape(c, h * p, w * p)


def latent_tokens(latents: torch.Tensor, shapes: list[tuple[int, int]], p: int) -> torch.Tensor:
    """Padded latents of a batch's VAE images (I, C, H', W') -> the packed latent tokens of every
    image, (N_lat, p*p*C), each image cropped to its own (h*p, w*p) grid first."""
    out = []
    for z, (h, w) in zip(latents, shapes):
        if h * p > z.shape[1] or w * p > z.shape[2]:
            raise ValueError(f"{h}x{w} latent tokens of patch {p} need {[z.shape[0], h * p, w * p]}, the latent "
                             f"is {list(z.shape)}")
        out.append(patchify(z[:, : h * p, : w * p], p))
    return torch.cat(out)


def latent_grid(cfg, size: tuple[int, int]) -> tuple[int, int]:
    """The size rule for generated images, everywhere: (H, W) pixels -> the (h, w) latent token
    grid of a BagelConfig, or a ValueError naming the rule (positive multiples of
    `latent_downsample`, at most `max_latent_size` tokens per side)."""
    h, w = size
    d, m = cfg.latent_downsample, cfg.max_latent_size
    if h % d or w % d or h <= 0 or w <= 0:
        raise ValueError(f"image size {w}x{h} (WxH) must be positive multiples of {d} px for this model")
    if h // d > m or w // d > m:
        raise ValueError(f"image size {w}x{h} exceeds the model's largest, {m * d}x{m * d} px (max_latent_size={m})")
    return h // d, w // d


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


# Packing --------------------------------------------------------------------------------------------
@dataclass
class _Lists:
    """The growing per-field lists of `pack_samples` (tensors once every sample is in)."""

    text_ids: list = field(default_factory=list)
    text_idx: list = field(default_factory=list)
    pos_ids: list = field(default_factory=list)
    vit_tokens: list = field(default_factory=list)
    vit_pos: list = field(default_factory=list)
    vit_idx: list = field(default_factory=list)
    vit_lens: list = field(default_factory=list)
    vae_images: list = field(default_factory=list)
    vae_shapes: list = field(default_factory=list)
    lat_pos: list = field(default_factory=list)
    vae_idx: list = field(default_factory=list)
    logits: list = field(default_factory=list)
    mse_idx: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    ce_idx: list = field(default_factory=list)
    ce_w: list = field(default_factory=list)
    sample_lens: list = field(default_factory=list)
    split_lens: list = field(default_factory=list)
    attn_modes: list = field(default_factory=list)


def _add_text(out: _Lists, item: Text, tokens, at: int, rope: int, sample_no: int) -> int:
    """Append a text split at flat position `at`; returns the RoPE counter after it."""
    ids = list(item.ids)
    n = len(ids) + 2
    out.text_ids += [tokens.bos, *ids, tokens.eos]
    out.text_idx += range(at, at + n)
    out.pos_ids += range(rope, rope + n)
    if item.loss:
        out.ce_idx += range(at, at + n - 1)
        out.labels += [*ids, tokens.eos]
        out.ce_w += [1.0 / math.sqrt(len(ids) + 1)] * (n - 1)
    if item.special_token_loss:
        if item.special_token_label is None:
            raise ValueError(f"sample {sample_no}: special_token_loss needs special_token_label")
        out.ce_idx.append(at + n - 1)
        out.labels.append(item.special_token_label)
        out.ce_w.append(1.0)
    out.split_lens.append(n)
    out.attn_modes.append("causal")
    return rope + n


def _add_image_markers(out: _Lists, tokens, at: int, n_img: int, rope: int, next_label: int | None) -> range:
    """<|vision_start|> + n_img inner tokens + <|vision_end|>, all at one RoPE id (CE on the
    closing marker with `next_label`); returns the flat positions of the inner tokens."""
    out.text_ids += [tokens.start_of_image, tokens.end_of_image]
    out.text_idx += [at, at + n_img + 1]
    out.pos_ids += [rope] * (n_img + 2)
    out.split_lens.append(n_img + 2)
    if next_label is not None:
        out.ce_idx.append(at + n_img + 1)
        out.labels.append(next_label)
        out.ce_w.append(1.0)
    return range(at + 1, at + 1 + n_img)


def _add_vit(out: _Lists, item: VitImage, cfg, tokens, at: int, rope: int) -> int:
    p = cfg.vit.patch_size
    gh, gw = _check_image(item, p, cfg.vit_max_num_patch_per_side, "ViT", "vit_max_num_patch_per_side")
    out.vit_idx += _add_image_markers(out, tokens, at, gh * gw, rope, item.next_label)
    out.vit_tokens.append(patchify(item.image, p))
    out.vit_pos.append(grid_position_ids(gh, gw, cfg.vit_max_num_patch_per_side))
    out.vit_lens.append(gh * gw)
    out.attn_modes.append("full")
    return rope + 1


def _add_vae(out: _Lists, item: VaeImage, cfg, tokens, at: int, rope: int, generator) -> int:
    gh, gw = _check_image(item, cfg.latent_downsample, cfg.max_latent_size, "VAE", "max_latent_size")
    if item.loss and item.next_label is not None:
        raise ValueError("a noisy VAE target cannot carry next_label (later blocks do not see it); "
                         "put the label on the clean copy that follows")
    inner = _add_image_markers(out, tokens, at, gh * gw, rope, item.next_label)
    out.vae_idx += inner
    out.vae_images.append(item.image)
    out.vae_shapes.append((gh, gw))
    out.lat_pos.append(grid_position_ids(gh, gw, cfg.max_latent_size))
    if not item.loss:
        out.logits += [float("-inf")] * (gh * gw)
        out.attn_modes.append("full")
        return rope + 1
    logit = item.timestep_logit
    if logit is None:
        logit = float(torch.randn((), generator=generator))
    out.logits += [logit] * (gh * gw)
    out.mse_idx += inner
    out.attn_modes.append("noise")
    return rope  # the counter stays: a clean copy may reuse the id


def pack_samples(samples: list[Sample], cfg, tokens, generator: torch.Generator | None = None,
                 shared_memory: bool = False) -> PackedBatch:
    """Pack `samples` into one PackedBatch (see the module docstring for the layout).

    `cfg` is a BagelConfig (geometry), `tokens` a SpecialTokens. `generator` draws the timestep
    logits of noisy targets that carry none. `shared_memory`: stack the images straight into
    shared memory (a DataLoader worker: sending the pack then copies nothing, as torch's
    default_collate does).
    """
    out = _Lists()
    at = 0
    for sample_no, sample in enumerate(samples):
        if not sample:
            raise ValueError(f"sample {sample_no} has an empty plan")
        start, rope = at, 0
        for item in sample:
            if isinstance(item, DroppedImage):
                rope += 1  # a dropped image still takes its RoPE slot (official behaviour)
                continue
            if isinstance(item, Text):
                rope = _add_text(out, item, tokens, at, rope, sample_no)
            elif isinstance(item, VitImage):
                rope = _add_vit(out, item, cfg, tokens, at, rope)
            elif isinstance(item, VaeImage):
                rope = _add_vae(out, item, cfg, tokens, at, rope, generator)
            else:
                raise TypeError(f"sample {sample_no}: unknown plan item {type(item).__name__}")
            at += out.split_lens[-1]
        if at == start:
            raise ValueError(f"sample {sample_no}: every item was dropped, nothing left to pack")
        out.sample_lens.append(at - start)
    return _to_batch(out, at, shared_memory)


def _stack_images(images: list[torch.Tensor], shared_memory: bool) -> torch.Tensor:
    """(I, 3, Hmax, Wmax): the images, zero-padded at the bottom/right when their sizes differ."""
    h_max = max(im.shape[1] for im in images)
    w_max = max(im.shape[2] for im in images)
    shape = (len(images), 3, h_max, w_max)
    if shared_memory:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * images[0].element_size())
        padded = images[0].new_empty(0).set_(storage).view(shape)
    else:
        padded = images[0].new_empty(shape)
    if any(im.shape[1:] != (h_max, w_max) for im in images):
        padded.zero_()
    for i, im in enumerate(images):
        padded[i, :, : im.shape[1], : im.shape[2]] = im
    return padded


def _to_batch(out: _Lists, length: int, shared_memory: bool = False) -> PackedBatch:
    # through numpy: 3x faster than torch.tensor on long Python int lists (same values)
    long = lambda xs: torch.from_numpy(np.array(xs, dtype=np.int64))  # noqa: E731
    batch = dict(
        sequence_length=length, sample_lens=out.sample_lens, split_lens=out.split_lens, attn_modes=out.attn_modes,
        position_ids=long(out.pos_ids), text_ids=long(out.text_ids), text_indexes=long(out.text_idx),
    )
    if out.vit_tokens:
        batch.update(
            vit_tokens=torch.cat(out.vit_tokens), vit_position_ids=torch.cat(out.vit_pos),
            vit_token_indexes=long(out.vit_idx), vit_token_seqlens=torch.tensor(out.vit_lens, dtype=torch.int32),
        )
    if out.vae_images:
        batch.update(
            vae_images=_stack_images(out.vae_images, shared_memory), vae_latent_shapes=out.vae_shapes, latent_position_ids=torch.cat(out.lat_pos),
            vae_token_indexes=long(out.vae_idx), timestep_logits=torch.tensor(out.logits, dtype=torch.float32),
            mse_loss_indexes=long(out.mse_idx),
        )
    if out.ce_idx:
        batch.update(label_ids=long(out.labels), ce_loss_indexes=long(out.ce_idx),
                     ce_loss_weights=torch.tensor(out.ce_w, dtype=torch.float32))
    return PackedBatch(**batch)
