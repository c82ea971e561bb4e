"""Image transforms for the ViT and VAE paths: resize to a stride multiple, then [-1, 1].

The size rule follows the official `ImageTransform` (the release's data/data_utils.py):
1. scale = min(max_size / long side, 1), raised so the short side reaches min_size;
2. each side -> round(side * scale), snapped to the nearest stride multiple (at least one stride);
3. if the area exceeds max_pixels / num_images, shrink;
4. if the long side still exceeds max_size, shrink to it.

Step 3 of the release multiplies *each side* by (cap / area), so the area shrinks by the square
of the intended factor: a 980x980 ViT image with three images in the sample (cap 1,806,336 / 3 =
602,112 pixels) comes out 616x616 (379,456 pixels, 63% of the cap) instead of 770x770. We scale each side by sqrt(cap / area) and snap *down*,
so the result is the largest stride grid under the cap. `official_pixel_cap=True` reproduces
the release (for matching its training transforms bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from bagel.packing import image_num_tokens


@dataclass(frozen=True)
class ResizeSpec:
    max_size: int
    min_size: int
    stride: int
    max_pixels: int | None = None
    official_pixel_cap: bool = False

    def __post_init__(self):
        if not 0 < self.stride <= self.min_size <= self.max_size:
            raise ValueError(f"ResizeSpec needs 0 < stride <= min_size <= max_size, got {self}")
        if self.max_pixels is not None and self.max_pixels < self.stride**2:
            raise ValueError(f"ResizeSpec max_pixels={self.max_pixels} is below one stride cell")

    @classmethod
    def from_dict(cls, data: dict, where: str = "transform") -> "ResizeSpec":
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**data)


# The official defaults. Training (example.yaml): VAE 1024/512/16, ViT 980/378/14 with a pixel
# cap. Inference (app, notebook): VAE 1024/512/16, ViT 980/224/14.
VAE_DEFAULT = ResizeSpec(max_size=1024, min_size=512, stride=16)
VIT_DEFAULT = ResizeSpec(max_size=980, min_size=378, stride=14, max_pixels=14 * 14 * 9 * 1024)
VAE_INFERENCE = ResizeSpec(max_size=1024, min_size=512, stride=16)
VIT_INFERENCE = ResizeSpec(max_size=980, min_size=224, stride=14)


def _snap(side: float, stride: int) -> int:
    return max(stride, int(round(side / stride)) * stride)


def _floor(side: float, stride: int) -> int:
    return max(stride, int(side // stride) * stride)


def resize_size(width: int, height: int, spec: ResizeSpec, num_images: int = 1) -> tuple[int, int]:
    """Target (width, height) for an image, both multiples of `spec.stride`."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = min(spec.max_size / max(width, height), 1.0)
    scale = max(scale, spec.min_size / min(width, height))
    w, h = _snap(width * scale, spec.stride), _snap(height * scale, spec.stride)
    if spec.max_pixels is not None:
        cap = spec.max_pixels / num_images
        if w * h > cap:
            if spec.official_pixel_cap:  # the release: linear factor on each side (over-shrinks)
                factor = cap / (w * h)
                w, h = _snap(w * factor, spec.stride), _snap(h * factor, spec.stride)
            else:
                factor = math.sqrt(cap / (w * h))
                w, h = _floor(w * factor, spec.stride), _floor(h * factor, spec.stride)
                if w * h > cap:  # a side was clamped to one stride (extreme aspect): trim the other
                    if h == spec.stride:
                        w = _floor(cap / h, spec.stride)
                    else:
                        h = _floor(cap / w, spec.stride)
    if max(w, h) > spec.max_size:
        factor = spec.max_size / max(w, h)
        w, h = _floor(w * factor, spec.stride), _floor(h * factor, spec.stride)
    return w, h


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 in [-1, 1], computed as (x / 255 - 0.5) / 0.5 in that
    order, like the official ToTensor + Normalize (x / 127.5 - 1 differs in the last bit)."""
    if image.mode != "RGB":  # convert() copies even when there is nothing to convert
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3), read-only
    # transposed while still uint8 (a quarter of the bytes), so the float tensor is contiguous
    x = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()  # (3, H, W)
    return x.div_(255).sub_(0.5).div_(0.5)  # in place: the same operations, one buffer


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8: clamp(x * 0.5 + 0.5, 0, 1) * 255, truncated (the
    release's decode convention, so 63 of 256 levels come back one lower after a round trip)."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"to_uint8: expected a (3, H, W) image, got shape {list(x.shape)}")
    x = (x.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1)  # (3, H, W) in [0, 1]
    return (x.permute(1, 2, 0) * 255).to(torch.uint8)  # (H, W, 3)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(x).numpy())


def transform_image(image: Image.Image, spec: ResizeSpec, num_images: int = 1) -> torch.Tensor:
    """Resize (bicubic; PIL antialiases when shrinking) and normalise to a (3, H, W) tensor."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = resize_size(image.width, image.height, spec, num_images)
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    return to_tensor(image)


def num_image_tokens(width: int, height: int, spec: ResizeSpec, num_images: int = 1) -> int:
    """Tokens of one image after the transform, markers included (grid cells + 2)."""
    w, h = resize_size(width, height, spec, num_images)
    return image_num_tokens(h, w, spec.stride)


TRANSFORMS_FILE = "transforms.json"


def load_model_transforms(model_dir) -> tuple[ResizeSpec, ResizeSpec]:
    """The (VAE, ViT) inference transforms a model directory asks for.

    Read from `transforms.json` ({"vae": [max, min, stride], "vit": [...]}, written by
    `save_model_transforms`) or from the official fixtures' `bagel_config.json`
    (`vae_transform`, `vit_transform`); otherwise the release's inference defaults.
    """
    import json
    from pathlib import Path

    model_dir = Path(model_dir)
    data = {}
    if (model_dir / TRANSFORMS_FILE).is_file():
        data = json.loads((model_dir / TRANSFORMS_FILE).read_text())
    elif (model_dir / "bagel_config.json").is_file():
        extra = json.loads((model_dir / "bagel_config.json").read_text())
        data = {k: extra[f"{k}_transform"] for k in ("vae", "vit") if f"{k}_transform" in extra}
    vae = ResizeSpec(*data["vae"]) if "vae" in data else VAE_INFERENCE
    vit = ResizeSpec(*data["vit"]) if "vit" in data else VIT_INFERENCE
    return vae, vit


def save_model_transforms(model_dir, vae: ResizeSpec, vit: ResizeSpec) -> None:
    import json
    from pathlib import Path

    spec = lambda s: [s.max_size, s.min_size, s.stride]  # noqa: E731
    (Path(model_dir) / TRANSFORMS_FILE).write_text(json.dumps({"vae": spec(vae), "vit": spec(vit)}, indent=2) + "\n")
