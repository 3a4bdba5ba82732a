"""Batched augmentation (vitexp.data.augment): each op against torchvision's per-image definition,
the policies' per-sample randomness and reproducibility, and mixup/cutmix targets."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode

from vitexp.data import BatchTransform
from vitexp.data import augment as A
from vitexp.errors import ConfigError


def _natural(n: int = 6, size: int = 16, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Images on the 8-bit grid with smooth structure and full range, like decoded photos."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.rand(n, channels, size, size, generator=g)
    x = (x - x.amin()) / (x.amax() - x.amin())
    return torch.round(x * 255) / 255


# --------------------------------------------------------------------------- colour ops vs torchvision


@pytest.mark.parametrize(
    ("ours", "theirs", "params"),
    [
        (A.brightness, TF.adjust_brightness, [0.1, 0.7, 1.0, 1.6]),
        (A.saturation, TF.adjust_saturation, [0.0, 0.5, 1.0, 1.9]),
        (A.contrast, TF.adjust_contrast, [0.05, 0.6, 1.0, 1.8]),
        (A.sharpness, TF.adjust_sharpness, [0.1, 0.5, 1.0, 1.9]),
        (A.solarize, TF.solarize, [0.0, 0.3, 0.7, 1.0]),
    ],
)
def test_colour_op_equals_torchvision_per_sample(ours, theirs, params):
    x = _natural(n=len(params))
    out = ours(x, torch.tensor(params))
    for i, p in enumerate(params):
        torch.testing.assert_close(out[i], theirs(x[i], p), atol=2e-6, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_posterize_and_equalize_equal_torchvision_on_uint8_images():
    x = _natural(n=4)
    as_uint8 = torch.round(x * 255).to(torch.uint8)
    bits = [1, 4, 6, 8]
    out = A.posterize(x, torch.tensor(bits))
    for i, b in enumerate(bits):
        assert torch.equal(torch.round(out[i] * 255).to(torch.uint8), TF.posterize(as_uint8[i], b))
    assert torch.equal(out[3], x[3])  # 8 bits: the image as it was
    off_grid = torch.rand(2, 3, 4, 4)  # after a bilinear crop, values are not on the 8-bit grid
    assert torch.equal(A.posterize(off_grid, torch.tensor([8, 8])), off_grid)
    eq = A.equalize(x)
    assert torch.equal(torch.round(eq * 255).to(torch.uint8), TF.equalize(as_uint8))


def test_autocontrast_equals_torchvision_and_leaves_flat_channels():
    x = _natural(n=3) * 0.5 + 0.2
    x[1, 2] = 0.4  # a flat channel
    out = A.autocontrast(x)
    torch.testing.assert_close(out, TF.autocontrast(x), atol=1e-6, rtol=0)
    assert torch.equal(out[1, 2], x[1, 2])
    assert out[0].amin() == 0 and out[0].amax() == 1


def test_equalize_leaves_single_valued_channels():
    x = torch.full((2, 3, 8, 8), 0.25)
    assert torch.equal(A.equalize(x), x)


def test_colour_ops_pass_grayscale_images():
    x = _natural(n=2, channels=1)
    assert torch.equal(A.saturation(x, torch.tensor([0.0, 2.0])), x)
    torch.testing.assert_close(A.contrast(x, torch.tensor([0.5, 0.5]))[0], TF.adjust_contrast(x[0], 0.5))


# --------------------------------------------------------------------------- geometry


def test_rotation_and_translation_equal_torchvision_on_non_square_images():
    x = torch.rand(3, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    angles = [30.0, -45.0, 90.0]
    rotated = A.affine(x, angle=torch.tensor(angles))
    for i, angle in enumerate(angles):
        expected = TF.rotate(x[i], angle, interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(rotated[i], expected, atol=1e-5, rtol=0)
    moved = A.affine(x, translate_x=torch.full((3,), 2.0), translate_y=torch.full((3,), -3.0))
    expected = TF.affine(
        x, angle=0.0, translate=[2, -3], scale=1.0, shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR
    )
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=0)


def test_shear_is_torchvisions_with_the_opposite_angle_about_the_centre():
    x = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    for factor in (0.3, -0.5):
        angle = -math.degrees(math.atan(factor))
        sx = A.affine(x, shear_x=torch.full((2,), factor))
        sy = A.affine(x, shear_y=torch.full((2,), factor))
        bilinear = InterpolationMode.BILINEAR
        tv_x = TF.affine(
            x, angle=0.0, translate=[0, 0], scale=1.0, shear=[angle, 0.0], interpolation=bilinear
        )
        tv_y = TF.affine(
            x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, angle], interpolation=bilinear
        )
        torch.testing.assert_close(sx, tv_x, atol=1e-5, rtol=0)
        torch.testing.assert_close(sy, tv_y, atol=1e-5, rtol=0)


def test_nearest_geometry_is_exact():
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    quarter = A.affine(x, angle=torch.tensor([90.0, -90.0]), interpolation="nearest")
    assert torch.equal(quarter[0], torch.rot90(x[0], 1, (-2, -1)))
    assert torch.equal(quarter[1], torch.rot90(x[1], -1, (-2, -1)))
    shifted = A.affine(
        x,
        translate_x=torch.tensor([3.0, 0.0]),
        translate_y=torch.tensor([0.0, -2.0]),
        interpolation="nearest",
    )
    assert torch.equal(shifted[0, :, :, 3:], x[0, :, :, :-3]) and shifted[0, :, :, :3].eq(0).all()
    assert torch.equal(shifted[1, :, :-2], x[1, :, 2:]) and shifted[1, :, -2:].eq(0).all()
    # A point 2 rows above the centre row of a 9-row image moves 2 columns left under x += 1·y.
    dot = torch.zeros(1, 1, 9, 9)
    dot[0, 0, 2, 5] = 1.0
    sheared = A.affine(dot, shear_x=torch.tensor([1.0]), interpolation="nearest")
    assert sheared[0, 0].nonzero().tolist() == [[2, 3]]


def test_affine_identity_and_fill():
    x = torch.rand(4, 3, 10, 10)
    torch.testing.assert_close(A.affine(x, angle=torch.zeros(4)), x, atol=1e-6, rtol=0)
    gone = A.affine(x, translate_x=torch.full((4,), 10.0), fill=0.5)
    torch.testing.assert_close(gone, torch.full_like(x, 0.5))


# --------------------------------------------------------------------------- crop and flip


@pytest.mark.parametrize(("padding", "hflip"), [(4, True), (2, False), (0, True)])
def test_shift_crop_flip_equals_batch_transform_with_the_same_draws(padding, hflip):
    images = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8)
    transform = BatchTransform(img_size=12, mean=[0.0] * 3, std=[1.0] * 3, crop_padding=padding, hflip=hflip)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    expected = transform.train(images, g1)
    out = A.shift_crop_flip(images, padding=padding, hflip=hflip, generator=g2)
    assert out.dtype == torch.uint8
    torch.testing.assert_close(out.float() / 255, expected, atol=1e-6, rtol=0)
    assert torch.equal(g1.get_state(), g2.get_state())  # the same numbers were drawn


def test_shift_crop_flip_is_a_torchvision_style_crop():
    images = torch.randint(1, 256, (64, 1, 6, 6), dtype=torch.uint8)  # no zeros: padding shows
    out = A.shift_crop_flip(images, padding=2, hflip=True, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(len(images)):
        crops = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], c) for c in crops)
        flipped = any(torch.equal(out[i].flip(-1), c) for c in crops)
        assert plain or flipped, f"sample {i} is neither a padded crop nor its mirror image"
        flips += not plain
    assert 10 < flips < 54


# --------------------------------------------------------------------------- policies


def test_policies_keep_shape_range_and_dtype():
    x = _natural(n=32)
    for policy in (A.RandAugment(), A.TrivialAugment(), A.RandAugment(num_ops=3, magnitude=30, fill=0.5)):
        out = policy(x, torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
    as_uint8 = torch.round(x * 255).to(torch.uint8)
    out = A.RandAugment()(as_uint8, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == as_uint8.shape


IDENTITY_AT_ZERO = (
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
)


def test_magnitude_zero_leaves_images_unchanged():
    x = _natural(n=64)
    out = A.RandAugment(num_ops=2, magnitude=0, ops=IDENTITY_AT_ZERO)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("op", [op for op in A.OPS if op != "identity"])
def test_every_op_changes_images_at_full_magnitude(op):
    x = _natural(n=8) * 0.8 + 0.1  # room for autocontrast and equalize to stretch
    out = A.RandAugment(num_ops=1, magnitude=30, ops=[op])(x, torch.Generator().manual_seed(0))
    changed = (out - x).abs().flatten(1).amax(1) > 1e-3
    assert changed.all(), f"{op} left {int((~changed).sum())} of 8 images unchanged"


def test_op_choice_is_per_sample():
    # Solarize at full magnitude inverts everything; identity keeps it: about half of each.
    x = _natural(n=200, size=8)
    out = A.RandAugment(num_ops=1, magnitude=30, ops=["identity", "solarize"])(
        x, torch.Generator().manual_seed(0)
    )
    kept = (out == x).flatten(1).all(1)
    inverted = (out == 1 - x).flatten(1).all(1)
    assert (kept | inverted).all()
    assert 70 < int(inverted.sum()) < 130


def test_trivialaugment_draws_a_magnitude_per_sample():
    x = torch.full((300, 3, 4, 4), 0.5)
    out = A.TrivialAugment(ops=["brightness"])(x, torch.Generator().manual_seed(0))
    factors = out[:, 0, 0, 0] / 0.5
    # factor = 1 ± m·0.99/30 for a bin m of 0..30: many distinct values, all on that grid.
    steps = (factors - 1).abs() / (0.99 / 30)
    torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
    assert len(steps.round().unique()) > 20
    assert (factors < 1).any() and (factors > 1).any()


def test_policies_are_reproducible_from_the_generator_and_differ_across_samples():
    x = _natural(n=1).expand(64, -1, -1, -1).contiguous()  # one image, 64 times
    for policy in (A.RandAugment(), A.TrivialAugment()):
        a = policy(x, torch.Generator().manual_seed(3))
        b = policy(x, torch.Generator().manual_seed(3))
        c = policy(x, torch.Generator().manual_seed(4))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        distinct = {tuple(img.flatten().tolist()) for img in a}
        assert len(distinct) > 20, f"{policy} gave only {len(distinct)} different images"


@pytest.mark.parametrize("policy", [A.RandAugment, A.TrivialAugment])
def test_running_ops_on_subsets_or_under_masks_gives_the_same_images(policy):
    # The CPU default (each op on the samples that chose it) and the accelerator default
    # (each op on the whole batch, kept where chosen) must be interchangeable.
    x = _natural(n=96)
    on_subsets = policy(subsets=True)(x, torch.Generator().manual_seed(0))
    under_masks = policy(subsets=False)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(on_subsets, under_masks, atol=1e-6, rtol=0)
    assert not torch.equal(on_subsets, x)


def test_policy_arguments_are_checked():
    with pytest.raises(ConfigError, match="not a non-empty subset"):
        A.RandAugment(ops=["invert"])
    with pytest.raises(ConfigError, match="magnitude=31"):
        A.RandAugment(magnitude=31)
    with pytest.raises(ConfigError, match="interpolation"):
        A.TrivialAugment(interpolation="bicubic")


def test_batch_transform_applies_the_policy_before_normalising():
    calls = []

    def policy(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        calls.append((x.min().item(), x.max().item(), generator))
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(0)
    transform = BatchTransform(img_size=8, mean=[0.5] * 3, std=[0.25] * 3, policy=policy)
    assert transform.random
    out = transform.train(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), g)
    torch.testing.assert_close(out, torch.full_like(out, -2.0))  # (0 - 0.5) / 0.25
    low, high, generator = calls[0]
    assert low >= 0 and high <= 1 and generator is g
    evaluated = transform.eval(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8))
    torch.testing.assert_close(evaluated, torch.full_like(evaluated, 2.0))  # no policy at evaluation


# --------------------------------------------------------------------------- mixup / cutmix


def _labelled_constants(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with (i + 1) / 10 and has label i, so mixed pixels say their sources."""
    values = (torch.arange(n, dtype=torch.float32) + 1) / 10
    return values.view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous(), torch.arange(n)


def test_mixup_blends_pixels_with_the_weights_of_the_targets():
    images, labels = _labelled_constants()
    out, targets = A.mixup_cutmix(
        images,
        labels,
        num_classes=8,
        mixup_alpha=0.4,
        cutmix_alpha=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert targets.shape == (8, 8)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    for i in range(8):
        j = 7 - i
        lam = targets[i, i].item()
        assert torch.allclose(out[i], lam * images[i] + (1 - lam) * images[j], atol=1e-6)
        assert math.isclose(targets[i, j].item(), 1 - lam, abs_tol=1e-6)
    lams = targets[torch.arange(8), torch.arange(8)]
    assert len(lams.unique()) == 8  # one lambda per sample


def test_cutmix_pastes_a_box_whose_area_sets_the_targets():
    images, labels = _labelled_constants(n=16)
    out, targets = A.mixup_cutmix(
        images,
        labels,
        num_classes=16,
        mixup_alpha=0.0,
        cutmix_alpha=1.0,
        generator=torch.Generator().manual_seed(1),
    )
    pasted_somewhere = False
    for i in range(16):
        j = 15 - i
        from_partner = out[i, 0] == images[j, 0, 0, 0]
        assert ((out[i, 0] == images[i, 0, 0, 0]) | from_partner).all()  # only the two sources
        share = from_partner.float().mean().item()
        assert math.isclose(targets[i, j].item(), share, abs_tol=1e-6)
        assert math.isclose(targets[i, i].item(), 1 - share, abs_tol=1e-6)
        if share > 0:
            rows, cols = from_partner.nonzero().unbind(1)
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box == from_partner.sum(), "the pasted region is not a rectangle"
            pasted_somewhere = True
    assert pasted_somewhere


def test_switch_prob_chooses_cutmix_or_mixup_per_sample():
    images, labels = _labelled_constants(n=64)
    images = images + torch.zeros(64, 3, 16, 16)
    out, _ = A.mixup_cutmix(
        images, labels, num_classes=64, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    values_per_image = torch.tensor([len(img[0].unique()) for img in out])
    # Mixup gives one blended value per image; cutmix the two sources (or one, if the box fell outside).
    assert (values_per_image == 1).sum() > 10 and (values_per_image == 2).sum() > 10
    only_cut, _ = A.mixup_cutmix(
        images, labels, num_classes=64, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    for i, img in enumerate(only_cut):
        assert set(img[0].unique().tolist()) <= {images[i, 0, 0, 0].item(), images[63 - i, 0, 0, 0].item()}


def test_label_smoothing_inside_or_in_the_loss_is_the_same():
    images = torch.rand(16, 3, 8, 8)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(16, 10)
    kwargs = {"num_classes": 10, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}
    _, plain = A.mixup_cutmix(images, labels, **kwargs, generator=torch.Generator().manual_seed(5))
    _, smooth = A.mixup_cutmix(
        images, labels, **kwargs, label_smoothing=0.1, generator=torch.Generator().manual_seed(5)
    )
    assert smooth.min() >= 0.1 / 10 - 1e-7
    torch.testing.assert_close(smooth.sum(1), torch.ones(16))
    in_loss = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, plain)
    in_targets = nn.CrossEntropyLoss()(logits, smooth)
    torch.testing.assert_close(in_loss, in_targets)


def test_mixup_is_reproducible_and_off_when_both_alphas_are_zero():
    images, labels = torch.rand(8, 3, 8, 8), torch.arange(8)
    kwargs = {"num_classes": 8, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}
    a = A.mixup_cutmix(images, labels, **kwargs, generator=torch.Generator().manual_seed(9))
    b = A.mixup_cutmix(images, labels, **kwargs, generator=torch.Generator().manual_seed(9))
    c = A.mixup_cutmix(images, labels, **kwargs, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    same, one_hot = A.mixup_cutmix(images, labels, num_classes=8, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert same is images
    assert torch.equal(one_hot, torch.eye(8))


def test_mixup_arguments_are_checked():
    images, labels = torch.rand(4, 3, 8, 8), torch.arange(4)
    with pytest.raises(ConfigError, match="must not be negative"):
        A.mixup_cutmix(images, labels, num_classes=4, mixup_alpha=-1.0, cutmix_alpha=0.0)
    with pytest.raises(ConfigError, match="switch_prob"):
        A.mixup_cutmix(images, labels, num_classes=4, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=2.0)
    with pytest.raises(ConfigError, match="float"):
        A.mixup_cutmix(images.to(torch.uint8), labels, num_classes=4, mixup_alpha=1.0, cutmix_alpha=0.0)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_beta_sampler_has_the_right_moments(alpha):
    x = A.sample_beta(alpha, 200_000, generator=torch.Generator().manual_seed(0))
    assert x.min() >= 0 and x.max() <= 1
    assert abs(x.mean().item() - 0.5) < 0.005
    variance = 1 / (4 * (2 * alpha + 1))
    assert abs(x.var().item() - variance) < 0.03 * variance
