"""The one image decoder: every image file vitexp reads (image-folder training and
evaluation, `predict`, `attention`) becomes a uint8 tensor here, so the same file always
gives the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from vitexp.errors import ConfigError


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent images onto white, as an image viewer shows them: the alpha
    channel alone says nothing about the colour of a transparent pixel."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float grayscale (modes I;16, I, F) to 8-bit L by scaling, not clipping:
    PIL's own convert("L") clips, turning most 16-bit images white."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
    elif img.mode.startswith("I;16"):
        top = 65535.0
    else:  # "I": 32-bit integers, which is how PIL opens some 16-bit PNGs
        top = 65535.0 if arr.max(initial=0.0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str | Path, channels: int) -> Tensor:
    """An image file of any size and mode as a uint8 tensor (channels, H, W).

    Grayscale, palette, 16-bit and CMYK images are converted; transparent ones are put on
    white; the EXIF orientation of photos is applied. `channels` is 1 (L) or 3 (RGB).
    """
    path = Path(path)
    if channels not in (1, 3):
        raise ConfigError(
            f"the model takes {channels}-channel input; only 1- or 3-channel images can be read"
        )
    if not path.is_file():
        raise ConfigError(f"image {path} does not exist; check the path")
    try:
        with Image.open(path) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ConfigError(
            f"image {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"use a PNG, JPEG or other image file"
        ) from e
    img = _flatten_alpha(_high_depth_to_8bit(img))
    img = img.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


def crop_to_aspect(image: Tensor, size: Sequence[int]) -> Tensor:
    """The centre of a (C, H, W) image at the aspect ratio of `size` (H, W), so that the
    resize to the model's input keeps shapes undistorted, as training on image folders does
    (shorter side fitted, centre cropped). Images of the model's aspect ratio pass unchanged."""
    height, width = image.shape[-2:]
    target = size[1] / size[0]  # width / height
    if width > round(height * target):
        new = max(1, round(height * target))
        left = (width - new) // 2
        return image[..., :, left : left + new]
    if height > round(width / target):
        new = max(1, round(width / target))
        top = (height - new) // 2
        return image[..., top : top + new, :]
    return image
