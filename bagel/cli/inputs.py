"""Reading the files a user names on the command line or uploads: images, with clear errors."""

from __future__ import annotations

import stat
import warnings
from pathlib import Path

from PIL import Image


def open_image(path: str | Path) -> Image.Image:
    """An RGB image from `path`; a missing file, a non-regular file (a FIFO would block), an
    unreadable or truncated image and a decompression bomb are each a ValueError naming the path."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"cannot read image {path}: not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for damaged or foreign files
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
