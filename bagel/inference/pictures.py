"""Pictures a person can look at: nearest-neighbour upscaling for tiny models, grids, and PNGs that
carry how they were made (prompt, seed, settings, model) in their text chunks.

    from bagel.inference.pictures import read_png_info
    read_png_info("fox.png")   # {'prompt': 'a red fox in snow', 'seed': '0', 'settings': '{...}', ...}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from bagel import __version__

DISPLAY_MIN_SIDE = 256  # the app shows images at least this large


def upscale(image: Image.Image, factor: int) -> Image.Image:
    """Each pixel becomes a `factor` x `factor` block (nearest neighbour: no invented detail)."""
    if factor < 1:
        raise ValueError(f"upscale factor {factor}: must be an integer >= 1")
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def display_factor(width: int, height: int, min_side: int = DISPLAY_MIN_SIDE) -> int:
    """The smallest whole factor that shows a `width` x `height` image at least `min_side` px."""
    return max(1, math.ceil(min_side / max(1, min(width, height))))


def grid(rows: list[list[Image.Image]], pad: int = 2, background=(96, 96, 96)) -> Image.Image:
    """Rows of equal-size images -> one image, cells separated by `pad` px of `background`."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), background)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            canvas.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def square_rows(images: list[Image.Image]) -> list[list[Image.Image]]:
    """Images laid out in rows of ceil(sqrt(n)), for a batch's grid."""
    cols = math.ceil(math.sqrt(len(images)))
    return [images[i:i + cols] for i in range(0, len(images), cols)]


def generation_info(prompt: str | None = None, seed: int | None = None, settings=None, model: str | None = None,
                    **extra) -> dict[str, str]:
    """The text chunks of a generated PNG. `settings` is a dataclass or dict (stored as JSON)."""
    import dataclasses

    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    info = {"prompt": prompt, "seed": seed, "settings": json.dumps(settings) if settings is not None else None,
            "model": model, **extra, "software": f"bagel {__version__}"}
    return {k: str(v) for k, v in info.items() if v is not None}


def save_png(image: Image.Image, path: str | Path, info: dict[str, str] | None = None) -> Path:
    """Write `image` as PNG with `info` as text chunks, atomically (no half-written file)."""
    path = Path(path)
    chunks = PngImagePlugin.PngInfo()
    for key, value in (info or {}).items():
        chunks.add_itxt(key, value)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        image.save(tmp, format="PNG", pnginfo=chunks)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_png_info(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (what `save_png` wrote)."""
    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}))
