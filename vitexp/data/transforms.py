"""The batched transform from uint8 images to normalised model inputs, on the device."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vitexp.data.augment import shift_crop_flip
from vitexp.errors import ConfigError

# --------------------------------------------------------------------------- augmentation


class BatchTransform:
    """uint8 batch → normalised float batch at the model's resolution, with optional
    per-sample random crop (padded or random-resized) and horizontal flip.

    All geometry is one affine map per sample, applied by a single `grid_sample`: a padded
    crop is a translation by whole pixels (exact at the same resolution; the padding reads
    as black, like torchvision's `RandomCrop(padding=p)`), a random-resized crop is a scale
    plus translation, a flip negates the x axis, and the resize to `img_size` is the output
    grid's size.

    `interpolation` (bilinear, bicubic or nearest) resamples: bilinear for vitexp's models,
    a timm model's own (bicubic for most) for `model=timm`.

    `policy`, when given, is a batched per-sample augmentation such as
    `vitexp.data.augment.RandAugment` or `TrivialAugment`: called as `policy(images, generator)`
    on the cropped float batch in [0, 1], just before normalisation, drawing from the same
    generator.
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        hflip: bool = False,
        rrc_scale: Sequence[float] | None = None,
        rrc_ratio: Sequence[float] = (3 / 4, 4 / 3),
        policy: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ConfigError(f"interpolation={interpolation} is not one of bilinear, bicubic, nearest")
        self.interpolation = interpolation
        self.out_size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)
        self.rrc_scale = tuple(rrc_scale) if rrc_scale is not None else None
        if self.rrc_scale is not None and not (
            len(self.rrc_scale) == 2 and 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1
        ):
            raise ConfigError(
                f"rrc_scale={list(self.rrc_scale)} must be [low, high] with 0 < low <= high <= 1"
            )
        if not (len(rrc_ratio) == 2 and 0 < rrc_ratio[0] <= rrc_ratio[1]):
            raise ConfigError(f"rrc_ratio={list(rrc_ratio)} must be [low, high] with 0 < low <= high")
        self.log_ratio = (math.log(rrc_ratio[0]), math.log(rrc_ratio[1]))
        if self.crop_padding < 0:
            raise ConfigError(f"crop_padding={crop_padding} must not be negative")
        if self.mean.numel() != self.std.numel() or self.mean.numel() == 0:
            raise ConfigError(
                f"dataset.mean has {self.mean.numel()} values and dataset.std {self.std.numel()}; "
                f"give one of each per image channel"
            )
        if not bool((self.std > 0).all()):
            raise ConfigError(f"dataset.std={list(std)} must be positive (inputs are divided by it)")
        self.policy = policy

    @property
    def random(self) -> bool:
        return self.crop_padding > 0 or self.hflip or self.rrc_scale is not None or self.policy is not None

    def _normalize(self, x: Tensor) -> Tensor:
        # Moved once per device: a host-to-device copy per batch would wait for the GPU.
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        mean, std = self.mean, self.std
        if mean.shape[1] != x.shape[1]:
            raise ConfigError(
                f"dataset.mean/std have {mean.shape[1]} channels but the images have {x.shape[1]}; "
                f"give one value per channel"
            )
        return (x - mean) / std

    def eval(self, images: Tensor) -> Tensor:
        """Deterministic path: resize (if needed) and normalise."""
        x = images.float().div_(255)
        if tuple(x.shape[-2:]) != self.out_size:
            x = self._clamped(F.interpolate(x, size=self.out_size, **self._resize_options()))
        return self._normalize(x)

    def train(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Random path, one independent draw per sample."""
        if not self.random:
            return self.eval(images)
        if self.rrc_scale is None and tuple(images.shape[-2:]) == self.out_size:
            # Whole-pixel shifts and flips only: one uint8 gather instead of an affine grid and
            # a bilinear grid_sample, with the same draws and the same pixels (4x faster on the CPU).
            x = shift_crop_flip(images, padding=self.crop_padding, hflip=self.hflip, generator=generator)
            x = x.float().div_(255)
        else:
            x = self._affine(images.float().div_(255), generator)
        if self.policy is not None:
            x = self.policy(x, generator)
        return self._normalize(x)

    def _affine(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Crop (padded or random-resized), flip and resize as one affine grid_sample."""
        batch, _, height, width = x.shape
        dev = x.device

        def uniform(low: float, high: float) -> Tensor:
            return torch.rand(batch, device=dev, generator=generator) * (high - low) + low

        # Crop box in normalised coordinates: half-extent (w, h) and centre (cx, cy).
        if self.rrc_scale is not None:
            area = uniform(*self.rrc_scale)
            ratio = torch.exp(uniform(*self.log_ratio))
            w = torch.sqrt(area * ratio).clamp(max=1.0)
            h = torch.sqrt(area / ratio).clamp(max=1.0)
            cx = uniform(-1.0, 1.0) * (1 - w)
            cy = uniform(-1.0, 1.0) * (1 - h)
        else:
            w = h = torch.ones(batch, device=dev)
            cx = cy = torch.zeros(batch, device=dev)
        if self.crop_padding > 0:
            p = self.crop_padding
            shift = torch.randint(-p, p + 1, (2, batch), device=dev, generator=generator).float()
            cx = cx + shift[0] * 2 / width
            cy = cy + shift[1] * 2 / height
        sx = w
        if self.hflip:
            sx = torch.where(torch.rand(batch, device=dev, generator=generator) < 0.5, -w, w)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        grid = F.affine_grid(theta, [batch, x.shape[1], *self.out_size], align_corners=False)
        return self._clamped(
            F.grid_sample(x, grid, mode=self.interpolation, padding_mode="zeros", align_corners=False)
        )

    def _resize_options(self) -> dict[str, Any]:
        if self.interpolation == "nearest":
            return {"mode": "nearest"}
        return {"mode": self.interpolation, "antialias": True, "align_corners": False}

    def _clamped(self, x: Tensor) -> Tensor:
        """Bicubic overshoots [0, 1] at edges; PIL, whose resize timm's recipes use, clips it."""
        return x.clamp_(0.0, 1.0) if self.interpolation == "bicubic" else x


def eval_batches(
    transform: BatchTransform, images: Tensor | Sequence[Tensor], device: torch.device, batch_size: int = 256
) -> Iterator[Tensor]:
    """Normalised model inputs for uint8 images, `batch_size` at a time."""
    if isinstance(images, Tensor):
        for i in range(0, len(images), batch_size):
            yield transform.eval(images[i : i + batch_size].to(device))
        return
    # Images of different sizes cannot share a tensor before the resize.
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        yield torch.cat([transform.eval(img[None].to(device)) for img in chunk])
