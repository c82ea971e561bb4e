"""First-stage pretraining of the ViT: SigLIP's sigmoid image-text loss, on image-caption pairs.

BAGEL starts its understanding path from a pretrained SigLIP encoder, whose tokens already carry
what an image shows. A ViT trained from scratch inside the unified model only learns what the
understanding answers ask of it, and slowly; on the digits demo the generation expert then could
not read an input image's class from the ViT tokens (edit accuracy 34%; 93% from this encoder,
kept frozen, at the same 1,500 steps). This stage supplies the pretrained encoder in seconds.

The loss is SigLIP's (Zhai et al., 2023): image and text embeddings are L2-normalised, every
(image, text) pair in the batch gets the logit `exp(t) * <x, y> + b` and a binary label, and the
loss is the mean over images of the summed `-log sigmoid(label * logit)`. Captions repeat in a
small dataset, so pairs with identical captions count as positives, not only the diagonal. The
text tower is deliberately tiny (mean of token embeddings, then a linear map) and is thrown away;
only the ViT is kept, under the unified model's parameter names (`Bagel.vit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bagel.config import ViTConfig
from bagel.model.vit import VisionTransformer
from bagel.checkpoint.files import save_safetensors
from bagel.packing import grid_position_ids, patchify
from bagel.train.optim import fit_one_cycle

VIT_PREFIX = "vit."  # parameter names inside the unified model


@dataclass
class VisionPretrainConfig:
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    embed_dim: int = 64
    init_std: float = 0.05  # the unified model's scratch init (configs/train/digits_cpu.yaml)
    max_shift: int = 2  # random translation in pixels (augmentation); 0 disables
    seed: int = 0


class TextTower(nn.Module):
    """Mean of token embeddings -> linear map: enough to tell short captions apart."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids, offsets))


class SigLIP(nn.Module):
    """The ViT with a pooled projection head, a text tower, and SigLIP's temperature and bias."""

    def __init__(self, vit_cfg: ViTConfig, patch_grid: tuple[int, int], max_per_side: int,
                 vocab_size: int, embed_dim: int):
        super().__init__()
        self.vit = VisionTransformer(vit_cfg)
        self.image_proj = nn.Linear(vit_cfg.hidden_size, embed_dim)
        self.text = TextTower(vocab_size, embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))  # SigLIP's init
        self.bias = nn.Parameter(torch.tensor(-10.0))
        self.register_buffer("position_ids", grid_position_ids(*patch_grid, max_per_side), persistent=False)
        self.patch_size = vit_cfg.patch_size

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, embed_dim), unit norm; the ViT tokens are mean-pooled."""
        b = images.shape[0]
        patches = torch.stack([patchify(im, self.patch_size) for im in images])  # (B, n, p*p*3)
        n = patches.shape[1]
        feats = self.vit(patches.reshape(b * n, -1), self.position_ids.repeat(b), [n] * b)
        return F.normalize(self.image_proj(feats.reshape(b, n, -1).mean(1)), dim=-1)

    def embed_texts(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids, offsets), dim=-1)

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return image_emb @ text_emb.T * self.log_temperature.exp() + self.bias


def sigmoid_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: logits (B, B), positives (B, B) bool -> mean over images of the summed
    pairwise -log sigmoid(+-logit)."""
    labels = positives.to(logits.dtype) * 2.0 - 1.0
    return -F.logsigmoid(labels * logits).sum(dim=1).mean()


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels, filling with the background (-1)."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def _bag(token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0] + [len(t) for t in token_lists[:-1]]).cumsum(0)
    return torch.tensor([i for t in token_lists for i in t]), offsets


def pretrain_vision_encoder(images: torch.Tensor, captions: list[list[int]], vit_cfg: ViTConfig, vocab_size: int,
                            max_per_side: int, train: VisionPretrainConfig = VisionPretrainConfig(),
                            progress: bool = True) -> tuple[SigLIP, list[float]]:
    """images (N, 3, H, W) in [-1, 1], captions: token ids per image. Returns the trained model
    (eval mode) and the per-step losses."""
    if images.ndim != 4 or images.shape[0] != len(captions):
        raise ValueError(f"expected images (N, 3, H, W) and N captions, got {tuple(images.shape)} and {len(captions)}")
    h, w = images.shape[2:]
    p = vit_cfg.patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the ViT patch size {p}")
    if max(h, w) // p > max_per_side:
        raise ValueError(f"{h}x{w} images give {max(h, w) // p} patches per side; the model allows {max_per_side}")
    if any(not c for c in captions):
        raise ValueError("every image needs a non-empty caption")
    g = torch.Generator().manual_seed(train.seed)
    model = SigLIP(vit_cfg, (h // p, w // p), max_per_side, vocab_size, train.embed_dim)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, train.init_std, generator=g)
            elif name.endswith("bias") and param.ndim == 1:
                param.zero_()
    unique: dict[tuple[int, ...], int] = {}
    caption_ids = torch.tensor([unique.setdefault(tuple(c), len(unique)) for c in captions])  # equal captions, equal id

    def step_loss():
        idx = torch.randint(0, images.shape[0], (min(train.batch_size, images.shape[0]),), generator=g).tolist()
        x = random_shift(images[idx], train.max_shift, g)
        ids = caption_ids[idx]
        positives = ids[:, None] == ids[None, :]
        loss = sigmoid_loss(model.logits(model.embed_images(x), model.embed_texts(*_bag([captions[i] for i in idx]))),
                            positives)
        return loss, loss.item()

    losses = fit_one_cycle(model, step_loss, train.steps, train.lr, train.weight_decay, "vision encoder", progress)
    return model, losses


@torch.no_grad()
def zero_shot_accuracy(model: SigLIP, images: torch.Tensor, labels: list[int], class_captions: list[list[int]],
                       batch_size: int = 256) -> float:
    """Classify each image as the caption with the highest logit (CLIP-style zero-shot)."""
    text = model.embed_texts(*_bag(class_captions))
    preds = torch.cat([model.logits(model.embed_images(images[i:i + batch_size]), text).argmax(-1)
                       for i in range(0, images.shape[0], batch_size)])
    return float((preds == torch.tensor(labels)).float().mean())


def save_vision_encoder(model: SigLIP, path: str | Path) -> None:
    """The ViT alone, under the unified model's names (`vit.*`), as safetensors (atomically)."""
    save_safetensors({VIT_PREFIX + k: v for k, v in model.vit.state_dict().items()}, path)
