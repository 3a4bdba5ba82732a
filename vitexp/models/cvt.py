"""Convolutional vision Transformer (Wu et al. 2021, "CvT: Introducing Convolutions to Vision
Transformers").

Three stages, each opened by a convolutional token embedding (a strided, overlapping convolution
followed by LayerNorm) that shrinks the token grid and widens the tokens, like a CNN's stages.
Inside the blocks, queries, keys and values are computed from the token grid by a depthwise 3×3
convolution + BatchNorm (stride 1 for queries, 2 for keys and values: 4× fewer keys) followed by
the usual linear projection. The convolutions carry the position information, so there are no
position embeddings, and the model runs at any image size. A class token joins only in the last
stage; it bypasses the convolutional projections and is what the head reads.

Faithful to the released code (microsoft/CvT) and to Hugging Face's `CvtForImageClassification`,
whose weights import (`vitexp.models.weights.conv`): attention scores are scaled by
hidden_size^-0.5 of the stage, not head_dim^-0.5; LayerNorm and BatchNorm use eps 1e-5.

The blocks are our pre-norm `Block` (LayerNorm, attention, residual; LayerNorm, MLP, residual)
with this module's `ConvAttention` in place of the fused-qkv attention. State-dict keys:
`stages.S.embeddings.{projection,norm}`, `stages.2.cls_token`,
`stages.S.layer.L.{attention_norm,attn,ffn_norm,ffn}` with
`attn.{conv_q,conv_k,conv_v}.{conv,bn}` and `attn.{query,key,value,out}`, then `norm` and `head`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, TypedDict, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from vitexp.errors import ConfigError
from vitexp.models.checks import (
    check_non_negative,
    check_norm_eps,
    check_positive,
    check_positive_number,
    check_rate,
    head_dim,
    image_size,
)
from vitexp.models.vit import Block, drop_path_rates

__all__ = ["ConvAttention", "ConvEmbeddings", "ConvProjection", "CvT", "CvTBlock", "CvTStage"]


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ConvEmbeddings(nn.Module):
    """Convolutional token embedding: an overlapping strided convolution, then LayerNorm over
    the channels of each position. Returns the tokens (B, H·W, C) and the grid (H, W)."""

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_size: int,
        kernel_size: int,
        stride: int,
        padding: int,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.projection = nn.Conv2d(in_channels, hidden_size, kernel_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.projection(x)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class ConvProjection(nn.Module):
    """Depthwise convolution + BatchNorm of a token grid, returned as tokens (B, H'·W', C)."""

    def __init__(
        self, hidden_size: int, kernel_size: int, stride: int, padding: int, norm_eps: float
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            hidden_size,
            hidden_size,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=hidden_size,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(hidden_size, eps=norm_eps)

    def forward(self, grid: Tensor) -> Tensor:
        return self.bn(self.conv(grid)).flatten(2).transpose(1, 2)


class ConvProjectionArguments(TypedDict, total=False):
    """The geometry of `ConvAttention`'s convolutional projections, as keyword arguments: what
    `CvTStage` and `CvTBlock` take as `**projection` and pass on from `CvT`'s arguments."""

    kernel_size: int
    stride_q: int
    stride_kv: int
    padding_q: int
    padding_kv: int


class ConvAttention(nn.Module):
    """Multi-head attention whose q, k and v come from a convolutional projection of the token
    grid (`conv_q/k/v`) and then a linear one (`query/key/value`); a class token, when present,
    skips the convolutions. Keys and values are computed at `stride_kv` (2: a quarter of the
    positions), which is where CvT saves most of its attention cost."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        stride_q: int = 1,
        stride_kv: int = 2,
        padding_q: int = 1,
        padding_kv: int = 1,
        attention_dropout_rate: float = 0.0,
        dropout_rate: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim(hidden_size, num_heads)
        # CvT's released code scales by the stage width, not the head width.
        self.scale = hidden_size**-0.5
        self.attention_dropout_rate = attention_dropout_rate
        self.conv_q = ConvProjection(hidden_size, kernel_size, stride_q, padding_q, norm_eps)
        self.conv_k = ConvProjection(hidden_size, kernel_size, stride_kv, padding_kv, norm_eps)
        self.conv_v = ConvProjection(hidden_size, kernel_size, stride_kv, padding_kv, norm_eps)
        self.query = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.proj_dropout = nn.Dropout(dropout_rate)

    def _heads(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def _qkv(self, x: Tensor, grid: tuple[int, int], prefix: int) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (B, heads, tokens, head_dim); the `prefix` class tokens lead each."""
        cls, tokens = x[:, :prefix], x[:, prefix:]
        image = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
        q, k, v = (torch.cat([cls, conv(image)], dim=1) for conv in (self.conv_q, self.conv_k, self.conv_v))
        return self._heads(self.query(q)), self._heads(self.key(k)), self._heads(self.value(v))

    def forward(self, x: Tensor, grid: tuple[int, int], prefix: int = 0) -> Tensor:
        q, k, v = self._qkv(x, grid, prefix)
        dropout = self.attention_dropout_rate if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, self.num_heads * self.head_dim)
        return self.proj_dropout(self.out(x))

    def attention_weights(self, x: Tensor, grid: tuple[int, int], prefix: int = 0) -> Tensor:
        """Softmax attention probabilities, (B, heads, query tokens, key tokens); rows sum to 1.
        Not square: keys are the strided grid (plus the class token)."""
        q, k, _ = self._qkv(x, grid, prefix)
        return ((q @ k.transpose(-2, -1)) * self.scale).float().softmax(dim=-1)


class CvTBlock(Block):
    """Our pre-norm `Block` with `ConvAttention`, which needs the token grid."""

    # Not a stub problem: swapping in an attention that takes the grid departs from Block's
    # interface on purpose, as forward's signature does; Block's norms, MLP and drop path are kept.
    attn: ConvAttention  # type: ignore[assignment]

    def __init__(
        self,
        *,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        qkv_bias: bool,
        dropout_rate: float,
        attention_dropout_rate: float,
        drop_path_rate: float,
        norm_eps: float,
        **projection: Unpack[ConvProjectionArguments],
    ) -> None:
        super().__init__(
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            drop_path_rate=drop_path_rate,
            layer_scale_init=None,  # neither LayerScale nor locality attention in CvT
            norm_eps=norm_eps,
            locality_attention=False,
        )
        # Replaces the Block's fused-qkv attention; norms, MLP and stochastic depth are kept.
        self.attn = ConvAttention(
            hidden_size=hidden_size,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            attention_dropout_rate=attention_dropout_rate,
            dropout_rate=dropout_rate,
            norm_eps=norm_eps,
            **projection,
        )

    def forward(self, x: Tensor, grid: tuple[int, int], prefix: int = 0) -> Tensor:  # type: ignore[override]
        x = x + self.drop_path(self.ls1(self.attn(self.attention_norm(x), grid, prefix)))
        return x + self.drop_path(self.ls2(self.ffn(self.ffn_norm(x))))


class CvTStage(nn.Module):
    """Convolutional token embedding, optional class token, `num_layers` CvT blocks. Takes and
    returns an image-shaped map (B, C, H, W); the class token is returned separately."""

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_size: int,
        num_heads: int,
        num_layers: int,
        mlp_ratio: float,
        patch_size: int,
        patch_stride: int,
        patch_padding: int,
        class_token: bool,
        qkv_bias: bool,
        dropout_rate: float,
        attention_dropout_rate: float,
        drop_path_rate: float,
        norm_eps: float,
        **projection: Unpack[ConvProjectionArguments],
    ) -> None:
        super().__init__()
        self.embeddings = ConvEmbeddings(
            in_channels=in_channels,
            hidden_size=hidden_size,
            kernel_size=patch_size,
            stride=patch_stride,
            padding=patch_padding,
            norm_eps=norm_eps,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if class_token else None
        self.dropout = nn.Dropout(dropout_rate)
        self.layer = nn.ModuleList(
            CvTBlock(
                hidden_size=hidden_size,
                mlp_dim=int(hidden_size * mlp_ratio),
                num_heads=num_heads,
                qkv_bias=qkv_bias,
                dropout_rate=dropout_rate,
                attention_dropout_rate=attention_dropout_rate,
                drop_path_rate=rate,
                norm_eps=norm_eps,
                **projection,
            )
            for rate in drop_path_rates(drop_path_rate, num_layers)  # within the stage, as microsoft/CvT
        )

    @property
    def blocks(self) -> list[CvTBlock]:
        """The blocks in order, typed (a ModuleList yields plain Modules to the type checker)."""
        return cast("list[CvTBlock]", list(self.layer))

    def tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int], int]:
        """The stage's input tokens (class token first, when present), grid and prefix length."""
        tokens, grid = self.embeddings(x)
        prefix = 0
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            prefix = 1
        return self.dropout(tokens), grid, prefix

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        tokens, grid, prefix = self.tokens(x)
        for block in self.layer:
            tokens = block(tokens, grid, prefix)
        cls, tokens = tokens[:, :prefix], tokens[:, prefix:]
        image = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        return image, (cls if prefix else None)


Check = Callable[[str, Any], Any]


def _per_stage(name: str, value: object, stages: int, check: Check) -> list:
    """One checked value per stage: `value` is a list with one entry per stage, or one for all."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        listed, values = True, list(value)
    else:
        listed, values = False, [value] * stages
    if len(values) != stages:
        raise ConfigError(f"{name}={values} has {len(values)} entries but the model has {stages} stages")
    return [check(f"{name}[{index}]" if listed else name, v) for index, v in enumerate(values)]


def _stage_settings(num_layers: Sequence[int], **settings: tuple[Any, Check]) -> dict[str, list]:
    """Each per-stage setting (value, check) as its checked list, and `num_layers` too: the
    number of stages is its length."""
    if isinstance(num_layers, str) or not isinstance(num_layers, Sequence) or len(num_layers) < 1:
        raise ConfigError(
            f"num_layers={num_layers!r} must list the layers of each stage (at least one), e.g. [1, 2, 10]"
        )
    stages = len(num_layers)
    checked = {"num_layers": _per_stage("num_layers", num_layers, stages, check_positive)}
    return checked | {
        name: _per_stage(name, value, stages, check) for name, (value, check) in settings.items()
    }


def _token_grid(
    img_size: int | tuple[int, int], kernels: list[int], strides: list[int], paddings: list[int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The image size as (height, width) and the last stage's token grid; ConfigError unless the
    image is a multiple of the stages' total stride."""
    height, width = image_size(img_size)
    stride = math.prod(strides)
    grid = (height, width)
    for kernel, step, padding in zip(kernels, strides, paddings, strict=True):
        grid = (_conv_out(grid[0], kernel, step, padding), _conv_out(grid[1], kernel, step, padding))
    if height % stride or width % stride or min(grid) < 1:
        shown = height if height == width else (height, width)
        raise ConfigError(
            f"img_size={shown} is not divisible by {stride}, the total stride of the convolutional "
            f"token embeddings (patch_stride={strides}): use an image size that is a multiple of "
            f"{stride} (e.g. {max(stride, height // stride * stride)})"
        )
    return (height, width), grid


class CvT(nn.Module):
    """CvT for image classification: stages → final LayerNorm → class token (or mean of the last
    stage's tokens without one) → linear head. `forward` returns logits.

    Per-stage settings are lists (one entry per stage; the number of stages is
    `len(num_layers)`); the defaults are CvT-13 (20.0M parameters with 1000 classes, as
    `transformers.CvtConfig()`). `img_size` is what the training loop resizes to; it must be a
    multiple of the stages' total stride (16 for CvT-13), so every stage's grid is the image size
    over its stride. `attention_maps` returns every layer's attention probabilities, which are not
    square: (B, heads, query tokens, key tokens), keys at the strided grid; the class token, in the
    last stage, comes first in both."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        in_channels: int = 3,
        num_classes: int = 1000,
        hidden_size: Sequence[int] = (64, 192, 384),
        num_heads: Sequence[int] = (1, 3, 6),
        num_layers: Sequence[int] = (1, 2, 10),
        mlp_ratio: float | Sequence[float] = 4.0,
        patch_size: Sequence[int] = (7, 3, 3),
        patch_stride: Sequence[int] = (4, 2, 2),
        patch_padding: Sequence[int] = (2, 1, 1),
        class_token: bool = True,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        stride_q: int = 1,
        stride_kv: int = 2,
        padding_q: int = 1,
        padding_kv: int = 1,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        drop_path_rate: float | Sequence[float] = (0.0, 0.0, 0.1),
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        stage = _stage_settings(
            num_layers,
            hidden_size=(hidden_size, check_positive),
            num_heads=(num_heads, check_positive),
            mlp_ratio=(mlp_ratio, check_positive_number),
            patch_size=(patch_size, check_positive),
            patch_stride=(patch_stride, check_positive),
            patch_padding=(patch_padding, check_non_negative),
            drop_path_rate=(drop_path_rate, check_rate),
        )
        for name, value in (
            ("in_channels", in_channels),
            ("kernel_size", kernel_size),
            ("stride_q", stride_q),
            ("stride_kv", stride_kv),
        ):
            check_positive(name, value)
        for name, value in (
            ("num_classes", num_classes),
            ("padding_q", padding_q),
            ("padding_kv", padding_kv),
        ):
            check_non_negative(name, value)
        check_rate("dropout_rate", dropout_rate)
        check_rate("attention_dropout_rate", attention_dropout_rate)
        check_norm_eps(norm_eps)
        (height, width), grid = _token_grid(
            img_size, stage["patch_size"], stage["patch_stride"], stage["patch_padding"]
        )
        stages, widths = len(stage["num_layers"]), stage["hidden_size"]
        self._img_size = (height, width)
        self.num_classes = num_classes
        self.hidden_size = widths[-1]
        self.grid_size = grid
        self.stages = nn.ModuleList(
            CvTStage(
                in_channels=in_channels if index == 0 else int(widths[index - 1]),
                hidden_size=widths[index],
                num_heads=stage["num_heads"][index],
                num_layers=stage["num_layers"][index],
                mlp_ratio=stage["mlp_ratio"][index],
                patch_size=stage["patch_size"][index],
                patch_stride=stage["patch_stride"][index],
                patch_padding=stage["patch_padding"][index],
                class_token=class_token and index == stages - 1,
                qkv_bias=qkv_bias,
                kernel_size=kernel_size,
                stride_q=stride_q,
                stride_kv=stride_kv,
                padding_q=padding_q,
                padding_kv=padding_kv,
                dropout_rate=dropout_rate,
                attention_dropout_rate=attention_dropout_rate,
                drop_path_rate=stage["drop_path_rate"][index],
                norm_eps=norm_eps,
            )
            for index in range(stages)
        )
        self.norm = nn.LayerNorm(self.hidden_size, eps=norm_eps)
        self.head = nn.Linear(self.hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @property
    def stage_list(self) -> list[CvTStage]:
        """The stages in order, typed (a ModuleList yields plain Modules to the type checker)."""
        return cast("list[CvTStage]", list(self.stages))

    @property
    def img_size(self) -> tuple[int, int]:
        return self._img_size

    @property
    def in_channels(self) -> int:
        return self.stage_list[0].embeddings.projection.in_channels

    @property
    def class_token(self) -> bool:
        return self.stages[-1].cls_token is not None

    @torch.no_grad()
    def init_weights(self) -> None:
        """microsoft/CvT's 'trunc_norm' initialisation: truncated normal (std 0.02) linear layers
        and class token, zero biases, norms at identity; convolutions keep PyTorch's default."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for stage in self.stage_list:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be decayed (besides norms and biases): the class token."""
        return {f"stages.{i}.cls_token" for i, stage in enumerate(self.stages) if stage.cls_token is not None}

    def parameter_layers(self) -> dict[str, int]:
        """Each parameter's layer for layer-wise learning-rate decay, numbered as timm numbers
        its hierarchical models (Swin): 0 the first stage's embedding, then one layer per block
        across the stages (a later stage's embedding and class token join its first block; the
        final norm joins the last block), then the head."""
        first_block, top = [], 1  # the layer of each stage's first block; of the head
        for stage in self.stage_list:
            first_block.append(top)
            top += len(stage.layer)

        def layer(name: str) -> int:
            found = re.match(r"stages\.(\d+)\.(?:layer\.(\d+)\.)?", name)
            if found is None:
                return top - 1 if name.startswith("norm.") else top
            stage, block = int(found[1]), found[2]
            if block is not None:
                return first_block[stage] + int(block)
            return 0 if stage == 0 else first_block[stage]

        return {name: layer(name) for name, _ in self.named_parameters()}

    @property
    def blocks(self) -> list[CvTBlock]:
        """Every stage's blocks, bottom to top (`trainer.train_last_blocks` counts them)."""
        return [block for stage in self.stage_list for block in stage.blocks]

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised tokens of the last stage, (B, tokens, hidden_size): the class token alone
        when the model has one (what the head reads), otherwise every position."""
        cls = None
        for stage in self.stages:
            x, cls = stage(x)
        tokens = cls if cls is not None else x.flatten(2).transpose(1, 2)
        return self.norm(tokens)

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        x = tokens.mean(dim=1)  # the class token itself when it is the only token
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """Attention probabilities of every layer of every stage for input `x`, in order: tensors
        shaped (B, heads, query tokens, key tokens) whose rows sum to 1."""
        maps = []
        for stage in self.stage_list:
            tokens, grid, prefix = stage.tokens(x)
            for block in stage.blocks:
                maps.append(block.attn.attention_weights(block.attention_norm(tokens), grid, prefix))
                tokens = block(tokens, grid, prefix)
            rest = tokens[:, prefix:]
            x = rest.transpose(1, 2).reshape(rest.shape[0], rest.shape[2], *grid)
        return maps
