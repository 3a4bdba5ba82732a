"""Compact Convolutional Transformer (Hassani et al. 2021, "Escaping the Big Data Paradigm with
Compact Transformers"): a small convolutional tokenizer instead of patches, a transformer encoder,
and sequence pooling (an attention-weighted average of the output tokens) instead of a class
token. Trained from scratch it is the strongest small-data recipe of its kind (CCT-7/3x1: 3.76M
parameters, 94.78% on CIFAR-10 after 200 epochs and 96.53% after 300 in the authors' runs).

Names follow the official code (SHI-Labs/Compact-Transformers): CCT-L/KxC has L transformer
layers and C convolutions of size K×K in the tokenizer. Sizes: CCT-2 and -4 are 128 wide with 2
heads and MLP ratio 1; CCT-6 and -7 are 256 wide with 4 heads and MLP ratio 2; CCT-14 is 384 wide
with 6 heads and MLP ratio 3. Parameter counts equal the official models' (3,760,139 for
CCT-7/3x1 with 10 classes).

The encoder is ours (`vitexp.models.vit.Encoder`: pre-norm `Block`s and a final LayerNorm) with
the official code's choices: no qkv bias, LayerNorm eps 1e-5, attention dropout 0.1 and
stochastic depth 0.1 by default. One difference: the official layer also normalises the residual
stream after attention (`src = norm1(src)` before the MLP's residual), a mix of pre- and
post-norm; here both sublayers are plain pre-norm, the form of ViT and of every other model in
this package. The parameters are the same, so the counts match, but official checkpoints would not
compute the same function and are not imported.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from vitexp.errors import ConfigError
from vitexp.models.checks import check_choice, check_non_negative, check_positive, check_rate, image_size
from vitexp.models.vit import Block, Encoder, EncoderArguments, stacked_layers

__all__ = ["CCT", "CCT_ENCODER", "CCTEmbeddings", "ConvTokenizer", "sinusoidal_position_embeddings"]

PositionEmbedding = Literal["learnable", "sine", "none"]

# CCT's defaults for the encoder settings it passes on to `Encoder` where they differ from the
# ViT's: CCT-7's sizes and the official code's choices (no qkv bias, LayerNorm eps 1e-5, attention
# dropout and stochastic depth 0.1).
CCT_ENCODER = EncoderArguments(
    mlp_dim=512,
    num_heads=4,
    num_layers=7,
    qkv_bias=False,
    attention_dropout_rate=0.1,
    drop_path_rate=0.1,
    norm_eps=1e-5,
)


def sinusoidal_position_embeddings(num_positions: int, dim: int) -> Tensor:
    """The fixed sine/cosine table of the official 'sine' option, (1, num_positions, dim): position
    p, channel i gets sin (even i) or cos (odd i) of p / 10000^(2⌊i/2⌋/dim)."""
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float32) / dim
    angles = position / torch.pow(10000.0, exponent)[None, :]
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table[None]


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ConvTokenizer(nn.Sequential):
    """`num_layers` blocks of k×k convolution (no bias) → ReLU → max pool; the last block has
    `out_channels` (the transformer width), the others `hidden_channels` (64 in the paper)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        num_layers: int = 1,
        hidden_channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        pool_kernel_size: int = 3,
        pool_stride: int = 2,
        pool_padding: int = 1,
    ) -> None:
        channels = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
        super().__init__(
            *(
                nn.Sequential(
                    OrderedDict(
                        conv=nn.Conv2d(
                            channels[i], channels[i + 1], kernel_size, stride, padding, bias=False
                        ),
                        act=nn.ReLU(),
                        pool=nn.MaxPool2d(pool_kernel_size, pool_stride, pool_padding),
                    )
                )
                for i in range(num_layers)
            )
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.geometry = (kernel_size, stride, padding, pool_kernel_size, pool_stride, pool_padding)
        self.stride = (stride * pool_stride) ** num_layers

    def output_size(self, size: int) -> int:
        """Tokens along one side for `size` input pixels (PyTorch's convolution arithmetic)."""
        kernel, stride, padding, pool_kernel, pool_stride, pool_padding = self.geometry
        for _ in range(len(self)):
            size = _conv_out(_conv_out(size, kernel, stride, padding), pool_kernel, pool_stride, pool_padding)
        return size


class CCTEmbeddings(nn.Module):
    """Convolutional tokenizer → token sequence (+ position embeddings unless 'none') → dropout.
    No class token: CCT pools its output tokens instead."""

    def __init__(
        self,
        tokenizer: ConvTokenizer,
        *,
        img_size: int | tuple[int, int] = 32,
        position_embedding: PositionEmbedding = "learnable",
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice("position_embedding", position_embedding, ("learnable", "sine", "none"))
        self.tokenizer = tokenizer
        height, width = image_size(img_size)
        stride, hidden_size = tokenizer.stride, tokenizer.out_channels
        grid = (tokenizer.output_size(height), tokenizer.output_size(width))
        # With the image a multiple of the tokenizer's stride every token sees a full window and
        # none of the image is dropped at the border by the floor of the convolution arithmetic.
        if height % stride or width % stride or min(grid) < 1:
            shown = height if height == width else (height, width)
            _, conv_stride, _, _, pool_stride, _ = tokenizer.geometry
            raise ConfigError(
                f"img_size={shown} is not divisible by {stride}, the stride of the convolutional tokenizer "
                f"({len(tokenizer)} × conv stride {conv_stride} × pool stride {pool_stride}): use an image "
                f"size that is a multiple of {stride} (e.g. {max(stride, height // stride * stride)})"
            )
        self.img_size = (height, width)
        self.patch_size = stride  # pixels per token along each side, as a ViT patch
        self.grid_size = grid
        self.num_patches = grid[0] * grid[1]
        self.num_prefix_tokens = 0
        self.position_embedding = position_embedding
        self.position_embeddings: Tensor | None
        if position_embedding == "learnable":
            self.position_embeddings = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size))
        elif position_embedding == "sine":
            # A fixed function of the grid: a buffer, recomputed rather than stored in checkpoints.
            self.register_buffer(
                "position_embeddings",
                sinusoidal_position_embeddings(self.num_patches, hidden_size),
                persistent=False,
            )
        else:
            self.position_embeddings = None
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        if self.position_embeddings is not None and tuple(x.shape[-2:]) != self.img_size:
            # The caller's to get right (the data pipeline resizes to model.img_size), not a setting.
            raise ValueError(
                f"input images are {tuple(x.shape[-2:])} but the model was built for {self.img_size}: "
                f"resize the inputs or set img_size"
            )
        x = self.tokenizer(x).flatten(2).transpose(1, 2)  # (B, tokens, hidden)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings
        return self.dropout(x)


class CCT(nn.Module):
    """Compact Convolutional Transformer for image classification: `CCTEmbeddings` → `Encoder`
    → sequence pooling → linear head. `forward` returns logits.

    Sequence pooling: a linear layer scores every output token, the softmax of the scores over
    the tokens weights their average, and the head reads that average (no class token). The
    encoder's other settings (`EncoderArguments`: `mlp_dim`, `num_heads`, `num_layers`, ...) are
    keyword arguments too, passed on to `Encoder`; their defaults are `CCT_ENCODER`'s where it
    has one, else Encoder's.
    `attention_maps` returns every layer's attention probabilities, (B, heads, tokens, tokens)
    over the patch tokens only; `pooling_weights` the pooling's (B, tokens)."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        hidden_size: int = 256,
        dropout_rate: float = 0.0,
        conv_layers: int = 1,
        conv_channels: int = 64,
        conv_kernel_size: int = 3,
        conv_stride: int = 1,
        conv_padding: int = 1,
        pool_kernel_size: int = 3,
        pool_stride: int = 2,
        pool_padding: int = 1,
        position_embedding: PositionEmbedding = "learnable",
        **encoder: Unpack[EncoderArguments],
    ) -> None:
        super().__init__()
        image_size(img_size)
        check_non_negative("num_classes", num_classes)
        # The tokenizer is built before the Encoder checks its settings: these two first.
        check_positive("hidden_size", hidden_size)
        check_rate("dropout_rate", dropout_rate)
        for name, value in (
            ("in_channels", in_channels),
            ("conv_layers", conv_layers),
            ("conv_channels", conv_channels),
            ("conv_kernel_size", conv_kernel_size),
            ("conv_stride", conv_stride),
            ("pool_kernel_size", pool_kernel_size),
            ("pool_stride", pool_stride),
        ):
            check_positive(name, value)
        check_non_negative("conv_padding", conv_padding)
        check_non_negative("pool_padding", pool_padding)
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        tokenizer = ConvTokenizer(
            in_channels=in_channels,
            out_channels=hidden_size,
            num_layers=conv_layers,
            hidden_channels=conv_channels,
            kernel_size=conv_kernel_size,
            stride=conv_stride,
            padding=conv_padding,
            pool_kernel_size=pool_kernel_size,
            pool_stride=pool_stride,
            pool_padding=pool_padding,
        )
        self.embeddings = CCTEmbeddings(
            tokenizer, img_size=img_size, position_embedding=position_embedding, dropout_rate=dropout_rate
        )
        self.encoder = Encoder(hidden_size=hidden_size, dropout_rate=dropout_rate, **(CCT_ENCODER | encoder))
        self.attention_pool = nn.Linear(hidden_size, 1)
        self.head = nn.Linear(hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @property
    def img_size(self) -> tuple[int, int]:
        return self.embeddings.img_size

    @property
    def in_channels(self) -> int:
        return self.embeddings.tokenizer.in_channels

    @property
    def patch_size(self) -> int:
        """Pixels per token along each side (the tokenizer's total stride)."""
        return self.embeddings.patch_size

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation: He-normal tokenizer convolutions, truncated normal (std
        0.02) linear layers with zero biases, learnable position embeddings with std 0.2."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # self.modules() reaches LayerScale and LSA parameters too, but none of the branches above
        # touches them: they keep the values their modules were built with.
        if isinstance(self.embeddings.position_embeddings, nn.Parameter):
            nn.init.trunc_normal_(self.embeddings.position_embeddings, std=0.2)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be decayed (besides norms and biases)."""
        return (
            {"embeddings.position_embeddings"} if self.embeddings.position_embedding == "learnable" else set()
        )

    def parameter_layers(self) -> dict[str, int]:
        """Each parameter's layer, from the tokenizer (0) to the pooling and head (the top), for
        layer-wise learning-rate decay (`stacked_layers`, as for the ViT)."""
        return stacked_layers((name for name, _ in self.named_parameters()), len(self.encoder.layer))

    @property
    def blocks(self) -> list[Block]:
        """The transformer blocks, bottom to top (`trainer.train_last_blocks` counts them)."""
        return self.encoder.blocks

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised token sequence, (B, tokens, hidden_size)."""
        return self.encoder(self.embeddings(x))

    def pool(self, tokens: Tensor) -> Tensor:
        """Sequence pooling: the softmax-weighted average of the tokens, (B, hidden_size)."""
        weights = F.softmax(self.attention_pool(tokens), dim=1)  # (B, tokens, 1)
        return (weights.transpose(1, 2) @ tokens).squeeze(1)

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(tokens)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def pooling_weights(self, x: Tensor) -> Tensor:
        """How much each token contributes to the pooled representation, (B, tokens); rows sum to 1."""
        return F.softmax(self.attention_pool(self.forward_features(x)), dim=1).squeeze(-1)

    @torch.no_grad()
    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """Attention probabilities of every layer for input `x`: a list of `num_layers` tensors
        shaped (B, heads, tokens, tokens) whose rows sum to 1 (no class token: tokens are the
        tokenizer's grid, row-major)."""
        return self.encoder.attention_maps(self.embeddings(x))
