"""The ViT paper's hybrid (Dosovitskiy et al. 2021, section 3.1): a ResNet's feature map, not the
raw image, is cut into patches. R50+ViT-B/16 is ResNet-50's stem and first three stages (3, 4
and 9 bottleneck units, total stride 16), a 1×1 "patch" projection of its 1024-channel map, and
the ViT-B encoder.

The ResNet is the one of the official code (google-research/vision_transformer,
`models_resnet.py`), which timm builds as `ResNetV2(preact=False, stem_type='same')`: post-
activation bottleneck units, weight-standardised convolutions (Qiao et al. 2019) followed by
GroupNorm with 32 groups instead of BatchNorm (as in BiT, Kolesnikov et al. 2020), and
TensorFlow's "SAME" padding. Module names follow the official checkpoints (`root/conv`,
`root/gn`, `block1/unit1/conv1`, `gn1`, `conv_proj`, `gn_proj`), so the `.npz` keys map onto them
one to one. Numerics follow timm (standardisation eps 1e-8 inside the square root, GroupNorm eps
1e-5), so that imported timm weights give timm's logits.

The transformer is `vitexp.models.VisionTransformer` itself, with this module's `HybridEmbeddings`
as its `embed_layer`: state-dict keys are ours (`embeddings.backbone.*`,
`embeddings.patch_embeddings.*`, `encoder.layer.N.*`, `head.*`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from vitexp.errors import ConfigError
from vitexp.models.checks import image_size
from vitexp.models.vit import VisionTransformer, VisionTransformerArguments

__all__ = ["HybridEmbeddings", "HybridVisionTransformer", "ResNetBackbone", "ResidualUnit", "StdConv2d"]


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one spatial dimension: the output has ceil(size / stride)
    positions, and an odd total padding puts the extra row/column after (bottom/right)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> Tensor:
    top, bottom = _same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = _same_padding(x.shape[-1], kernel[1], stride[1])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


class StdConv2d(nn.Conv2d):
    """Convolution whose kernel is standardised (zero mean, unit variance over each output
    channel's fan-in) on every forward, with TensorFlow 'SAME' padding and no bias.

    Weight standardisation is what makes GroupNorm work as well as BatchNorm in BiT-style
    ResNets; it is applied to the stored weight each time, so the parameter stays the raw kernel
    (as in the checkpoints)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, eps: float = 1e-8
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        var = weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        weight = (weight - mean) * torch.rsqrt(var + self.eps)
        x = _pad_same(x, self.kernel_size, self.stride)  # type: ignore[arg-type]
        return F.conv2d(x, weight, None, self.stride)


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling with TensorFlow 'SAME' padding (padded with -inf, so padding never wins)."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__(kernel_size, stride)

    def forward(self, x: Tensor) -> Tensor:
        kernel, stride = int(self.kernel_size), int(self.stride)  # type: ignore[arg-type]
        x = _pad_same(x, (kernel, kernel), (stride, stride), value=-math.inf)
        return F.max_pool2d(x, self.kernel_size, self.stride)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5)


class ResidualUnit(nn.Module):
    """Bottleneck unit: 1×1 → 3×3 (strided) → 1×1 convolutions, each followed by GroupNorm, ReLU
    after the first two and after the residual sum (post-activation, as the official code). The
    shortcut is projected (`conv_proj`, `gn_proj`) when the shape changes."""

    def __init__(self, in_channels: int, features: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = 4 * features
        self.conv1 = StdConv2d(in_channels, features, 1)
        self.gn1 = _group_norm(features)
        self.conv2 = StdConv2d(features, features, 3, stride=stride)
        self.gn2 = _group_norm(features)
        self.conv3 = StdConv2d(features, out_channels, 1)
        self.gn3 = _group_norm(out_channels)
        self.conv_proj: StdConv2d | None = None
        self.gn_proj: nn.GroupNorm | None = None
        if in_channels != out_channels or stride != 1:
            self.conv_proj = StdConv2d(in_channels, out_channels, 1, stride=stride)
            self.gn_proj = _group_norm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        if self.conv_proj is not None and self.gn_proj is not None:
            residual = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetBackbone(nn.Module):
    """The hybrid's ResNet: root (7×7/2 StdConv, GroupNorm, ReLU, 3×3/2 max pool) and stages of
    bottleneck units (`layers`, e.g. (3, 4, 9)); the first stage keeps the resolution, each later
    one halves it. Total stride: 4 × 2^(stages − 1); output channels 256 × 2^(stages − 1) × width
    factor (1024 and stride 16 for R50's first three stages)."""

    def __init__(
        self, *, in_channels: int = 3, layers: Sequence[int] = (3, 4, 9), width_factor: int = 1
    ) -> None:
        super().__init__()
        layers = [int(depth) for depth in layers]
        if any(depth < 1 for depth in layers) or width_factor < 1:
            raise ConfigError(
                f"resnet_layers={layers} and resnet_width_factor={width_factor} must be positive: "
                f"use e.g. resnet_layers=[3, 4, 9] (R50) and resnet_width_factor=1"
            )
        width = 64 * width_factor
        self.in_channels = in_channels
        self.root = nn.Sequential(
            OrderedDict(
                conv=StdConv2d(in_channels, width, 7, stride=2),
                gn=_group_norm(width),
                relu=nn.ReLU(),
                pool=MaxPool2dSame(3, 2),
            )
        )
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        channels = width
        for index, depth in enumerate(layers):
            features = width * 2**index
            units: OrderedDict[str, nn.Module] = OrderedDict()
            for unit in range(depth):
                stride = 2 if index > 0 and unit == 0 else 1
                units[f"unit{unit + 1}"] = ResidualUnit(channels, features, stride=stride)
                channels = 4 * features
            stages[f"block{index + 1}"] = nn.Sequential(units)
        self.body = nn.Sequential(stages)
        self.out_channels = channels
        self.stride = self.stride_of(layers)

    @staticmethod
    def stride_of(layers: Sequence[int]) -> int:
        """Total stride of a backbone with these stages: 4 from the root, ×2 per stage after the first."""
        return 4 * 2 ** max(len(layers) - 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.root(x))


class HybridEmbeddings(nn.Module):
    """Tokens from a ResNet feature map: backbone → `patch_size`×`patch_size` projection of the map
    (1×1 in R50+ViT-B/16) → class token and learnable position embeddings, as `Embeddings` does
    for pixels. Each token covers `stride` = backbone stride × patch_size pixels of the image."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 1,
        in_channels: int = 3,
        hidden_size: int = 768,
        dropout_rate: float = 0.0,
        class_token: bool = True,
        resnet_layers: Sequence[int] = (3, 4, 9),
        resnet_width_factor: int = 1,
    ) -> None:
        super().__init__()
        height, width = image_size(img_size)
        backbone_stride = ResNetBackbone.stride_of(resnet_layers)
        stride = backbone_stride * patch_size
        if height % stride or width % stride:
            shown = height if height == width else (height, width)
            raise ConfigError(
                f"img_size={shown} is not divisible by {stride}, the stride of the ResNet stem "
                f"({backbone_stride}) times patch_size={patch_size}: use an image size that is a "
                f"multiple of {stride} (e.g. {max(stride, height // stride * stride)})"
            )
        self.backbone = ResNetBackbone(
            in_channels=in_channels, layers=resnet_layers, width_factor=resnet_width_factor
        )
        self.img_size = (height, width)
        self.patch_size = patch_size
        self.stride = stride
        self.grid_size = (height // stride, width // stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = 1 if class_token else 0
        self.patch_embeddings = nn.Conv2d(
            self.backbone.out_channels, hidden_size, kernel_size=patch_size, stride=patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if class_token else None
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.num_patches + self.num_prefix_tokens, hidden_size)
        )
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input images are {tuple(x.shape[-2:])} but the model was built for {self.img_size}: "
                f"resize the inputs or set img_size"
            )
        x = self.patch_embeddings(self.backbone(x)).flatten(2).transpose(1, 2)  # (B, num_patches, hidden)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.position_embeddings)


class HybridVisionTransformer(VisionTransformer):
    """R50+ViT (the ViT paper's hybrid): `VisionTransformer` whose patches come from a ResNet.

    The defaults are R50+ViT-B/16 (timm's `vit_base_r50_s16_224`; 97,890,112 parameters without a
    head, 98,659,112 with 1000 classes). `patch_size` is the projection's kernel on the feature
    map (1, as in the official configs); the image size must be a multiple of the backbone's
    stride (16) times `patch_size`. Every other argument (`VisionTransformerArguments`: sizes,
    `classifier`, `representation_size`, dropout, stochastic depth) and method
    (`attention_maps`, `no_weight_decay`) is the plain ViT's."""

    embeddings: HybridEmbeddings  # what the embed_layer passed to VisionTransformer builds

    def __init__(
        self,
        *,
        patch_size: int = 1,
        resnet_layers: Sequence[int] = (3, 4, 9),
        resnet_width_factor: int = 1,
        **kwargs: Unpack[VisionTransformerArguments],
    ) -> None:
        embed_layer = partial(
            HybridEmbeddings, resnet_layers=tuple(resnet_layers), resnet_width_factor=resnet_width_factor
        )
        super().__init__(patch_size=patch_size, embed_layer=embed_layer, **kwargs)

    @property
    def in_channels(self) -> int:
        """Image channels (the patch projection's input is the ResNet's 1024 feature channels)."""
        return self.embeddings.backbone.in_channels

    @property
    def stride(self) -> int:
        """Image pixels per token along each side (16 for R50+ViT-B/16)."""
        return self.embeddings.stride

    @torch.no_grad()
    def init_weights(self, zero_head: bool = False) -> None:
        """The ViT's JAX initialisation for the transformer; for the ResNet, He-normal convolutions
        and GroupNorm at identity except the last GroupNorm of each unit, which starts at zero as
        in the official code, so every unit starts as its shortcut."""
        super().init_weights(zero_head=zero_head)
        for module in self.embeddings.backbone.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.embeddings.backbone.modules():
            if isinstance(module, ResidualUnit):
                nn.init.zeros_(module.gn3.weight)
