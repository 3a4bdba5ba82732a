"""Batched, device-side augmentation with per-sample randomness: mixup/cutmix with soft
targets, and RandAugment / TrivialAugment policies.

Every function takes a whole batch `(B, C, H, W)` and per-sample parameters as `(B,)`
tensors, so a batch is augmented by a fixed number of tensor operations whatever its size:
no PIL, no Python loop over images, and on accelerators no host-device synchronisation
(the policies use data-dependent subsets on the CPU only, where that costs nothing; see
`RandAugment.apply`). All randomness comes
from the `generator` argument (a `torch.Generator` on the images' device), so a run that
restores that generator's state (as a resumed vitexp run does) replays the same draws.

Float images are in [0, 1] (before normalisation); the policies also accept uint8 batches
and return uint8. The colour ops follow torchvision's definitions (`transforms.v2.functional`)
with per-sample instead of per-call parameters; the tests compare them image by image.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vitexp.errors import ConfigError

# --------------------------------------------------------------------------- mixup / cutmix


def _gamma(alpha: float, n: int, *, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """`n` draws from Gamma(alpha, 1) using only `generator`.

    torch's own Gamma/Beta samplers cannot take a generator, so this is Marsaglia & Tsang's
    method (2000), vectorised: a fixed number of candidate draws per sample, keeping the first
    accepted one. Its acceptance rate is above 95% for every alpha, so with 16 candidates all
    are rejected with probability below 1e-20; such a sample falls back to the distribution's
    mode region (d) rather than looping until accepted, which would need a host sync.
    alpha < 1 uses Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha).
    """
    tries = 16
    boost = alpha < 1.0
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    z = torch.randn(tries, n, generator=generator, device=device)
    u = torch.rand(tries, n, generator=generator, device=device)
    v = (1.0 + c * z) ** 3
    accepted = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-30)))
    first = accepted.to(torch.uint8).argmax(dim=0, keepdim=True)  # index of the first accepted try
    sample = d * v.gather(0, first)[0]
    sample = torch.where(accepted.any(dim=0), sample, torch.full_like(sample, d))
    boost_u = torch.rand(n, generator=generator, device=device)  # drawn always: a fixed stream
    if boost:
        sample = sample * boost_u.pow(1.0 / alpha)
    return sample


def sample_beta(
    alpha: float, n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """`n` draws from the symmetric Beta(alpha, alpha), from `generator` only."""
    if alpha <= 0:
        raise ConfigError(f"Beta parameter alpha={alpha} must be positive")
    device = torch.device(device)
    x = _gamma(alpha, n, generator=generator, device=device)
    y = _gamma(alpha, n, generator=generator, device=device)
    total = x + y
    # Both gammas can underflow to 0 for tiny alpha; the symmetric answer is then 1/2.
    return torch.where(total > 0, x / total.clamp_min(1e-30), torch.full_like(total, 0.5))


def one_hot_smoothed(labels: Tensor, num_classes: int, label_smoothing: float = 0.0) -> Tensor:
    """(B,) class indices → (B, num_classes) targets: 1 - ε + ε/K on the class, ε/K elsewhere
    (the same targets as `nn.CrossEntropyLoss(label_smoothing=ε)` builds)."""
    off = label_smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - label_smoothing + off)


def mixup_cutmix(
    images: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mix every sample with a partner and return (mixed images, soft targets (B, num_classes)).

    timm's `Mixup` semantics in its per-sample ("elem") mode: sample i is mixed with sample
    B-1-i of the (already shuffled) batch, with its own lambda ~ Beta(alpha, alpha), and, when
    both alphas are positive, with cutmix with probability `switch_prob` and mixup otherwise.
    Mixup blends the pixels, lam·x_i + (1-lam)·x_partner. Cutmix pastes the partner's pixels
    inside a box of area ≈ (1-lam)·H·W centred at a uniform random pixel and clipped to the
    image; lam is then corrected to the fraction of the image left unpasted, so the targets
    weigh each label by the area it really has. Targets are lam·y_i + (1-lam)·y_partner of
    the smoothed one-hot labels. With both alphas 0 the images are returned unchanged with
    their smoothed one-hot targets.

    Lambdas are per sample because then every cutmix box is a mask computed on the device; one
    lambda per batch would have to reach the host to size one box (a sync per step). The
    same random numbers are drawn whatever the outcome, so the generator advances by a fixed
    amount per batch. timm's `mix_prob` (mixing only some batches) is not offered: with
    alphas of 0 nothing is mixed.

    `nn.CrossEntropyLoss` accepts the soft targets directly. Smoothing here with ε and a loss
    without smoothing equals smoothing 0 here and `CrossEntropyLoss(label_smoothing=ε)`.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ConfigError(
            f"mixup_cutmix needs a float (B, C, H, W) batch, got {tuple(images.shape)} {images.dtype}"
        )
    if labels.shape != images.shape[:1]:
        raise ConfigError(f"labels {tuple(labels.shape)} do not match a batch of {images.shape[0]} images")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ConfigError(f"mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must not be negative")
    if not 0.0 <= switch_prob <= 1.0:
        raise ConfigError(f"switch_prob={switch_prob} must be between 0 and 1")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing={label_smoothing} must be in [0, 1)")

    targets = one_hot_smoothed(labels, num_classes, label_smoothing)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return images, targets
    batch, _, height, width = images.shape
    dev = images.device

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = torch.rand(batch, device=dev, generator=generator) < switch_prob
    else:
        use_cutmix = torch.full((batch,), cutmix_alpha > 0, device=dev)
    ones = torch.ones(batch, device=dev)
    lam_mixup = sample_beta(mixup_alpha, batch, generator=generator, device=dev) if mixup_alpha > 0 else ones
    lam_cutmix = (
        sample_beta(cutmix_alpha, batch, generator=generator, device=dev) if cutmix_alpha > 0 else ones
    )

    # The cutmix box, as timm's rand_bbox: side fractions sqrt(1 - lam), uniform centre, clipped.
    cut = torch.sqrt(1.0 - lam_cutmix)
    half_h = torch.floor(height * cut).long() // 2
    half_w = torch.floor(width * cut).long() // 2
    cy = torch.randint(0, height, (batch,), device=dev, generator=generator)
    cx = torch.randint(0, width, (batch,), device=dev, generator=generator)
    y0, y1 = (cy - half_h).clamp(0, height), (cy + half_h).clamp(0, height)
    x0, x1 = (cx - half_w).clamp(0, width), (cx + half_w).clamp(0, width)
    rows = torch.arange(height, device=dev).view(1, height, 1)
    cols = torch.arange(width, device=dev).view(1, 1, width)
    box = (
        (rows >= y0.view(-1, 1, 1))
        & (rows < y1.view(-1, 1, 1))
        & (cols >= x0.view(-1, 1, 1))
        & (cols < x1.view(-1, 1, 1))
    )[:, None]  # (B, 1, H, W)
    lam_box = 1.0 - ((y1 - y0) * (x1 - x0)).float() / (height * width)

    lam = torch.where(use_cutmix, lam_box, lam_mixup)
    partner = images.flip(0)
    lam_img = lam.to(images.dtype).view(-1, 1, 1, 1)
    blended = images * lam_img + partner * (1.0 - lam_img)
    pasted = torch.where(box, partner, images)
    mixed = torch.where(use_cutmix.view(-1, 1, 1, 1), pasted, blended)
    targets = targets * lam[:, None] + targets.flip(0) * (1.0 - lam[:, None])
    return mixed, targets


# --------------------------------------------------------------------------- crop and flip


def shift_crop_flip(
    images: Tensor, *, padding: int, hflip: bool, generator: torch.Generator | None = None
) -> Tensor:
    """Per-sample random crop from the zero-padded image (torchvision's
    `RandomCrop(size, padding)`) and random horizontal flip, by one `gather`, in any dtype.

    This is the special case of `vitexp.data.BatchTransform.train` without random-resized
    crop and without resizing, where every sample's affine map is a whole-pixel shift and a
    flip: it draws the same numbers from `generator` in the same order (the shifts
    `randint(-p, p + 1, (2, B))`, x then y, then the flips `rand(B) < 0.5`) and gives the
    same pixels, but works on the uint8 batch and costs a fraction of an affine grid plus a
    bilinear `grid_sample` (see benchmarks/data_path.py).
    """
    batch, channels, height, width = images.shape
    dev = images.device
    shift_x = shift_y = torch.zeros(batch, dtype=torch.long, device=dev)
    if padding > 0:
        shift_x, shift_y = torch.randint(-padding, padding + 1, (2, batch), device=dev, generator=generator)
    cols = torch.arange(width, device=dev).expand(batch, width)
    if hflip:
        flip = torch.rand(batch, device=dev, generator=generator) < 0.5
        cols = torch.where(flip[:, None], width - 1 - cols, cols)
    # Output pixel (i, j) reads input pixel (i + dy, flip(j) + dx), i.e. (i + dy + p, flip(j) + dx + p)
    # of the padded image, whose border reads as black, as torchvision's zero padding.
    cols = cols + (shift_x + padding)[:, None]
    rows = torch.arange(height, device=dev) + (shift_y + padding)[:, None]
    if padding > 0:
        images = F.pad(images, (padding, padding, padding, padding))
    index = rows[:, :, None] * images.shape[-1] + cols[:, None, :]  # (B, H, W) into the flat image
    flat = images.reshape(batch, channels, -1)
    return flat.gather(2, index.view(batch, 1, -1).expand(batch, channels, -1)).view(
        batch, channels, height, width
    )


# --------------------------------------------------------------------------- colour ops


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    """(B,) parameters → (B, 1, 1, 1), in the images' float dtype."""
    return value.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """torchvision's blend, per sample: factor·x + (1-factor)·degenerate, clamped to [0, 1].
    factor 1 returns x exactly, which is what makes unselected samples pass through."""
    f = _per_sample(factor, x)
    return (x * f + degenerate * (1.0 - f)).clamp_(0.0, 1.0)


def _grayscale(x: Tensor) -> Tensor:
    """(B, 1, H, W) luminance with torchvision's weights; the channel mean when not RGB."""
    if x.shape[1] == 3:
        r, g, b = x.unbind(dim=1)
        return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)
    return x.mean(dim=1, keepdim=True)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scale intensities by `factor` per sample (1: unchanged, 0: black)."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the sample's grayscale (RandAugment's "Color"; 1: unchanged, 0: gray).
    Images without 3 channels have no colour to change and pass through."""
    if x.shape[1] != 3:
        return x
    return _blend(x, _grayscale(x), factor)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the sample's mean gray level (1: unchanged, 0: flat gray)."""
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with a 3×3 smoothed copy (interior pixels only, as PIL/torchvision); factor > 1
    sharpens, < 1 blurs, 1 leaves the image unchanged."""
    height, width = x.shape[-2:]
    if height <= 2 or width <= 2:
        return x
    # The kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as a 3×3 box mean plus 4/13 of the
    # centre: avg_pool2d is far faster than a depthwise conv2d on the CPU.
    blurred = (F.avg_pool2d(x, 3, stride=1) * 9.0 + x[..., 1:-1, 1:-1] * 4.0) / 13.0
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = blurred
    return _blend(x, degenerate, factor)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top `bits` (0..8) of each 8-bit value, per sample; 8 leaves the image as is.

    Quantises to the 8-bit grid first, so on images that came from uint8 it equals
    torchvision's uint8 posterize (its float variant uses 2^bits levels instead).
    """
    bits = bits.to(device=x.device, dtype=torch.long).view(-1, 1, 1, 1)
    levels = torch.round(x * 255.0).to(torch.long)
    mask = (255 << (8 - bits.clamp(0, 8))) & 255
    out = (levels & mask).to(x.dtype) / 255.0
    return torch.where(bits >= 8, x, out)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert every value at or above `threshold` (in [0, 1]) per sample; a threshold above 1
    leaves the image as is."""
    return torch.where(x >= _per_sample(threshold, x), 1.0 - x, x)


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each sample to span [0, 1]; flat channels are left as they are."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high <= low
    scale = torch.where(flat, torch.ones_like(high), high - low)
    low = torch.where(flat, torch.zeros_like(low), low)
    return ((x - low) / scale).clamp_(0.0, 1.0)


def equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per channel of each sample, with PIL's lookup table (as
    torchvision), computed on the 8-bit grid; channels with a single value pass through."""
    batch, channels, height, width = x.shape
    levels = torch.round(x * 255.0).clamp_(0, 255).to(torch.long).view(batch * channels, height * width)
    hist = torch.zeros(batch * channels, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    cum = hist.cumsum(dim=1)
    last = cum.argmax(dim=1, keepdim=True)  # first index of the maximum: the last occupied bin
    step = (height * width - hist.gather(1, last)) // 255
    lut = (cum[:, :-1] + step // 2) // step.clamp(min=1)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut.clamp(0, 255)], dim=1)
    out = (lut.gather(1, levels).to(x.dtype) / 255.0).view_as(x)
    return torch.where((step > 0).view(batch, channels, 1, 1), out, x)


# --------------------------------------------------------------------------- geometric ops


def affine(
    x: Tensor,
    *,
    angle: Tensor | None = None,
    shear_x: Tensor | None = None,
    shear_y: Tensor | None = None,
    translate_x: Tensor | None = None,
    translate_y: Tensor | None = None,
    interpolation: str = "bilinear",
    fill: float = 0.0,
) -> Tensor:
    """Rotate (degrees, counter-clockwise as displayed), shear (x += shear_x·y, then y += shear_y·x)
    and translate (pixels) each sample about its centre, with one `grid_sample` for the batch.

    Each argument is a (B,) tensor or None (0). The forward map is translate ∘ rotate ∘ shear;
    `grid_sample` needs the inverse (output pixel → input pixel), built in centred pixel
    units and rescaled to the normalised grid, so non-square images rotate without
    stretching. Pixels that come from outside the image read as `fill`.
    """
    batch, channels, height, width = x.shape
    dev = x.device

    def arg(value: Tensor | None) -> Tensor:
        zero = torch.zeros(batch, device=dev)
        return zero if value is None else value.to(device=dev, dtype=torch.float32)

    theta = torch.deg2rad(arg(angle))
    cos, sin = torch.cos(theta), torch.sin(theta)
    a, b = arg(shear_x), arg(shear_y)
    tx, ty = arg(translate_x), arg(translate_y)
    # The inverse map L p + o, written out (no linalg.inv, whose singularity check would sync
    # with the device): L = shear⁻¹ · rotation⁻¹ with shear⁻¹ = [[1 + ab, -a], [-b, 1]] (the
    # shear x += a·y then y += b·x is [[1, a], [b, 1 + ab]], determinant 1) and rotation⁻¹ =
    # [[cos, -sin], [sin, cos]] (with y pointing down, counter-clockwise is [[cos, sin],
    # [-sin, cos]]); o = -L t.
    l00, l01 = (1.0 + a * b) * cos - a * sin, -(1.0 + a * b) * sin - a * cos
    l10, l11 = sin - b * cos, b * sin + cos
    o0, o1 = -(l00 * tx + l01 * ty), -(l10 * tx + l11 * ty)
    # Centred pixel coordinates p relate to grid coordinates n by p = D n, D = diag(W/2, H/2):
    # the grid's map is D⁻¹ L D and D⁻¹ o. Python scalars, so nothing is copied to the device.
    matrix = torch.stack(
        [
            torch.stack([l00, l01 * (height / width), o0 * (2.0 / width)], -1),
            torch.stack([l10 * (width / height), l11, o1 * (2.0 / height)], -1),
        ],
        -2,
    ).to(x.dtype)
    grid = F.affine_grid(matrix, [batch, channels, height, width], align_corners=False)
    if fill == 0.0:
        return F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    # A channel of ones, warped alongside, says how much of each output pixel was inside.
    warped = F.grid_sample(
        torch.cat([x, torch.ones_like(x[:, :1])], 1),
        grid,
        mode=interpolation,
        padding_mode="zeros",
        align_corners=False,
    )
    return warped[:, :channels] + (1.0 - warped[:, channels:]) * fill


# --------------------------------------------------------------------------- policies

OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
_GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


@dataclass(frozen=True)
class MagnitudeSpace:
    """What full magnitude means for each op; magnitude m of `num_bins` scales it by
    m / (num_bins - 1). Signed ops (geometry, enhancements) pick a random sign per sample."""

    shear: float  # shear factor (tan of the shear angle)
    translate: float  # fraction of the image side, or pixels when translate_pixels
    translate_pixels: bool
    rotate: float  # degrees
    enhance: float  # brightness/color/contrast/sharpness factor 1 ± this
    posterize_bits: int  # bits removed
    solarize: float  # threshold 1 - this


# torchvision's RandAugment and TrivialAugmentWide magnitude ranges.
RANDAUGMENT_SPACE = MagnitudeSpace(0.3, 150.0 / 331.0, False, 30.0, 0.9, 4, 1.0)
TRIVIALAUGMENT_SPACE = MagnitudeSpace(0.99, 32.0, True, 135.0, 0.99, 6, 1.0)


class _Policy(abc.ABC):
    """Shared machinery: one round applies one op per sample, chosen per sample."""

    def __init__(
        self,
        *,
        num_bins: int,
        ops: Sequence[str] | None,
        space: MagnitudeSpace,
        interpolation: str,
        fill: float,
        subsets: bool | None,
    ) -> None:
        self.ops = tuple(OPS if ops is None else ops)
        unknown = [op for op in self.ops if op not in OPS]
        if unknown or not self.ops:
            raise ConfigError(
                f"augmentation ops {unknown or '[]'} are not a non-empty subset of {', '.join(OPS)}"
            )
        if num_bins < 2:
            raise ConfigError(f"num_bins={num_bins} must be at least 2")
        if interpolation not in ("bilinear", "nearest"):
            raise ConfigError(f"interpolation={interpolation!r} must be bilinear or nearest")
        self.num_bins = int(num_bins)
        self.space = space
        self.interpolation = interpolation
        self.fill = float(fill)
        self.subsets = subsets

    def apply(self, x: Tensor, op: Tensor, strength: Tensor, sign: Tensor) -> Tensor:
        """One round: sample i gets op `self.ops[op[i]]` at `strength[i]` ∈ [0, 1] of full
        magnitude, signed by `sign[i]` ∈ {-1, 1} where the op is signed.

        A loop over op kinds, never over images; the geometric ops share one `grid_sample`.
        Every op treats each sample independently, so there are two equivalent ways to run it:
        on the samples that chose it (`index_select`, op, `index_copy`: each image is processed
        once) or on the whole batch, keeping the result where chosen (`torch.where`: no
        data-dependent shapes, so no host-device sync). `subsets=None` (the constructor's)
        picks the first on the CPU, where a sync costs nothing and the work saved is most of
        the round, and the second on accelerators. Both give the same images.
        """
        subsets = self.subsets if self.subsets is not None else x.device.type == "cpu"
        index = {name: k for k, name in enumerate(self.ops)}
        groups = [[name for name in _GEOMETRIC if name in index]]
        groups += [[name] for name in self.ops if name not in _GEOMETRIC and name != "identity"]
        for names in filter(None, groups):
            chosen = torch.stack([op == index[name] for name in names]).any(dim=0)
            if subsets:
                rows = chosen.nonzero().squeeze(1)
                if len(rows) == 0:
                    continue
                picked = self._run(names, x.index_select(0, rows), op[rows], strength[rows], sign[rows])
                x = x.index_copy(0, rows, picked)
            else:
                x = torch.where(chosen.view(-1, 1, 1, 1), self._run(names, x, op, strength, sign), x)
        return x

    def _run(self, names: list[str], x: Tensor, op: Tensor, strength: Tensor, sign: Tensor) -> Tensor:
        """Op `names[0]` on every sample of `x` at its strength and sign; for the geometric
        group, one affine warp whose per-sample parameters are those of the sample's op."""
        space, signed = self.space, strength * sign
        if names[0] in _GEOMETRIC:
            height, width = x.shape[-2:]
            shift = signed * space.translate
            values = {
                "shear_x": signed * space.shear,
                "shear_y": signed * space.shear,
                "translate_x": shift if space.translate_pixels else shift * width,
                "translate_y": shift if space.translate_pixels else shift * height,
                "rotate": signed * space.rotate,
            }
            zero = torch.zeros_like(signed)
            kwargs = {
                ("angle" if name == "rotate" else name): torch.where(
                    op == self.ops.index(name), values[name], zero
                )
                for name in names
            }
            return affine(x, interpolation=self.interpolation, fill=self.fill, **kwargs)
        name = names[0]
        enhance = 1.0 + signed * space.enhance
        if name == "brightness":
            return brightness(x, enhance)
        if name == "color":
            return saturation(x, enhance)
        if name == "contrast":
            return contrast(x, enhance)
        if name == "sharpness":
            return sharpness(x, enhance)
        if name == "posterize":
            return posterize(x, 8.0 - torch.round(strength * space.posterize_bits))
        if name == "solarize":
            return solarize(x, 1.0 - strength * space.solarize)
        if name == "autocontrast":
            return autocontrast(x)
        if name == "equalize":
            return equalize(x)
        raise ValueError(f"no op named {name!r}")

    def _draw(
        self, batch: int, device: torch.device, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        op = torch.randint(0, len(self.ops), (batch,), device=device, generator=generator)
        sign = torch.where(torch.rand(batch, device=device, generator=generator) < 0.5, -1.0, 1.0)
        return op, sign

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.ndim != 4:
            raise ConfigError(f"augmentation needs a (B, C, H, W) batch, got shape {tuple(images.shape)}")
        as_uint8 = images.dtype == torch.uint8
        x = images.float() / 255.0 if as_uint8 else images
        x = self._rounds(x, generator)
        return torch.round(x * 255.0).clamp_(0, 255).to(torch.uint8) if as_uint8 else x

    @abc.abstractmethod
    def _rounds(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The policy's rounds on a float batch in [0, 1]."""


class RandAugment(_Policy):
    """RandAugment (Cubuk et al. 2020), batched: `num_ops` rounds, each applying to every
    sample one op drawn uniformly per sample, at the fixed `magnitude` (of `num_bins`) with a
    random sign per sample. torchvision's op set and magnitudes (`RANDAUGMENT_SPACE`), except
    that shears are about the image centre (torchvision's are about the top-left corner) and
    geometry is bilinear by default (`interpolation="nearest"` is torchvision's default).
    `ops` restricts the op set (names from `OPS`); `subsets` chooses how ops are applied
    (see `apply`; None: by device).
    """

    def __init__(
        self,
        *,
        num_ops: int = 2,
        magnitude: int = 9,
        num_bins: int = 31,
        ops: Sequence[str] | None = None,
        space: MagnitudeSpace = RANDAUGMENT_SPACE,
        interpolation: str = "bilinear",
        fill: float = 0.0,
        subsets: bool | None = None,
    ) -> None:
        super().__init__(
            num_bins=num_bins, ops=ops, space=space, interpolation=interpolation, fill=fill, subsets=subsets
        )
        if num_ops < 0:
            raise ConfigError(f"num_ops={num_ops} must not be negative")
        if not 0 <= magnitude < num_bins:
            raise ConfigError(f"magnitude={magnitude} must be in [0, num_bins={num_bins})")
        self.num_ops = int(num_ops)
        self.magnitude = int(magnitude)

    def _rounds(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        strength = torch.full((x.shape[0],), self.magnitude / (self.num_bins - 1), device=x.device)
        for _ in range(self.num_ops):
            op, sign = self._draw(x.shape[0], x.device, generator)
            x = self.apply(x, op, strength, sign)
        return x

    def __repr__(self) -> str:
        return (
            f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"num_bins={self.num_bins}, ops={self.ops})"
        )


class TrivialAugment(_Policy):
    """TrivialAugment Wide (Müller & Hutter 2021), batched: one op per sample, drawn
    uniformly, at a magnitude drawn uniformly from the `num_bins` bins per sample, with a
    random sign; torchvision's TrivialAugmentWide ranges (`TRIVIALAUGMENT_SPACE`), with the
    same caveats as `RandAugment`."""

    def __init__(
        self,
        *,
        num_bins: int = 31,
        ops: Sequence[str] | None = None,
        space: MagnitudeSpace = TRIVIALAUGMENT_SPACE,
        interpolation: str = "bilinear",
        fill: float = 0.0,
        subsets: bool | None = None,
    ) -> None:
        super().__init__(
            num_bins=num_bins, ops=ops, space=space, interpolation=interpolation, fill=fill, subsets=subsets
        )

    def _rounds(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        op, sign = self._draw(x.shape[0], x.device, generator)
        bins = torch.randint(0, self.num_bins, (x.shape[0],), device=x.device, generator=generator)
        return self.apply(x, op, bins.float() / (self.num_bins - 1), sign)

    def __repr__(self) -> str:
        return f"TrivialAugment(num_bins={self.num_bins}, ops={self.ops})"
