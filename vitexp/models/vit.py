"""The Vision Transformer of Dosovitskiy et al. (2021), in the article's vocabulary.

Module and argument names follow the article (`Embeddings`, `Attention`, `Mlp`, `Block`,
`Encoder`, `VisionTransformer`; `hidden_size`, `mlp_dim`, `num_heads`, `num_layers`) so its
readers recognise every piece. Unlike the article, every module takes plain keyword
arguments, attention runs through one fused qkv projection and
`F.scaled_dot_product_attention`, and attention weights come from a separate method
(`VisionTransformer.attention_maps`) instead of a return type that changes with a flag.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Literal, Protocol, TypedDict, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from vitexp.errors import ConfigError
from vitexp.models.checks import (
    check_choice,
    check_layer_scale,
    check_non_negative,
    check_norm_eps,
    check_positive,
    check_positive_or_none,
    check_rate,
    head_dim,
    image_size,
)

# The ViT paper's model sizes (Dosovitskiy et al. 2021, table 1; Ti and S from DeiT), each trained
# at the patch sizes its named configs `vit_{size}{patch}` use.
PAPER_SIZES: dict[str, dict[str, int]] = {
    "ti": {"hidden_size": 192, "num_layers": 12, "mlp_dim": 768, "num_heads": 3},
    "s": {"hidden_size": 384, "num_layers": 12, "mlp_dim": 1536, "num_heads": 6},
    "b": {"hidden_size": 768, "num_layers": 12, "mlp_dim": 3072, "num_heads": 12},
    "l": {"hidden_size": 1024, "num_layers": 24, "mlp_dim": 4096, "num_heads": 16},
    "h": {"hidden_size": 1280, "num_layers": 32, "mlp_dim": 5120, "num_heads": 16},
}
PAPER_PATCH_SIZES: dict[str, tuple[int, ...]] = {
    "ti": (4, 8, 16),
    "s": (4, 8, 16, 32),
    "b": (4, 8, 16, 32),
    "l": (14, 16, 32),
    "h": (14,),
}


def paper_model_name(hidden_size: int, num_layers: int, mlp_dim: int, patch_size: int) -> str | None:
    """The named config of a paper-sized ViT (`vit_b16`), or None when these sizes have none."""
    for size, dims in PAPER_SIZES.items():
        same = (dims["hidden_size"], dims["num_layers"], dims["mlp_dim"]) == (
            hidden_size,
            num_layers,
            mlp_dim,
        )
        if same and patch_size in PAPER_PATCH_SIZES[size]:
            return f"vit_{size}{patch_size}"
    return None


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Embeddings(nn.Module):
    """Cut the image into patches with a strided convolution, prepend a class token, add
    learnable position embeddings."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 768,
        dropout_rate: float = 0.0,
        class_token: bool = True,
        shifted_patches: bool = False,
    ) -> None:
        super().__init__()
        height, width = image_size(img_size)
        check_positive("patch_size", patch_size)
        if height % patch_size or width % patch_size:
            raise ConfigError(
                f"img_size={height if height == width else (height, width)} is not divisible by "
                f"patch_size={patch_size}: use an image size that is a multiple of the patch size "
                f"(e.g. {max(patch_size, height // patch_size * patch_size)})"
            )
        self.img_size = (height, width)
        self.patch_size = patch_size
        self.grid_size = (height // patch_size, width // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = 1 if class_token else 0
        # Shifted patch tokenization (Lee et al. 2021, "Vision Transformer for Small-Size
        # Datasets"): each patch also sees the image shifted by half a patch in the four diagonal
        # directions (5× the channels), and its flattened pixels are layer-normalised before the
        # linear projection. The projection stays a Conv2d so initialisation and shapes read as
        # for plain patches; its weight, flattened, is the linear map of the paper.
        self.shifted_patches = shifted_patches
        channels = in_channels * 5 if shifted_patches else in_channels
        self.patch_norm = nn.LayerNorm(channels * patch_size**2) if shifted_patches else None
        self.patch_embeddings = nn.Conv2d(channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if class_token else None
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.num_patches + self.num_prefix_tokens, hidden_size)
        )
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            # The caller's to get right (the data pipeline resizes to model.img_size), not a setting.
            raise ValueError(
                f"input images are {tuple(x.shape[-2:])} but the model was built for {self.img_size}: "
                f"resize the inputs or set img_size"
            )
        if self.shifted_patches:
            x = self._shifted_patch_tokens(x)
        else:
            x = self.patch_embeddings(x).flatten(2).transpose(1, 2)  # (B, num_patches, hidden)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.position_embeddings)

    def _shifted_patch_tokens(self, x: Tensor) -> Tensor:
        shift = max(1, self.patch_size // 2)
        height, width = self.img_size
        padded = F.pad(x, (shift, shift, shift, shift))  # zeros enter where the image moved away
        views = [x] + [
            padded[..., shift + dy : shift + dy + height, shift + dx : shift + dx + width]
            for dy, dx in ((-shift, -shift), (-shift, shift), (shift, -shift), (shift, shift))
        ]
        # unfold orders each patch as (channel, row, column), the order of a flattened conv weight.
        patches = F.unfold(torch.cat(views, dim=1), self.patch_size, stride=self.patch_size).transpose(1, 2)
        conv = self.patch_embeddings
        assert self.patch_norm is not None  # built whenever shifted_patches is set
        return F.linear(self.patch_norm(patches), conv.weight.flatten(1), conv.bias)


class EmbedLayer(Protocol):
    """What `VisionTransformer` reads from the module its `embed_layer` builds (`Embeddings`, or
    `HybridEmbeddings` in vitexp.models.hybrid): images in, tokens (B, prefix + patches, hidden) out."""

    patch_embeddings: nn.Conv2d
    cls_token: nn.Parameter | None
    position_embeddings: nn.Parameter
    img_size: tuple[int, int]
    patch_size: int
    grid_size: tuple[int, int]
    num_prefix_tokens: int

    def __call__(self, x: Tensor) -> Tensor: ...


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(
        self,
        *,
        hidden_size: int = 768,
        num_heads: int = 12,
        qkv_bias: bool = True,
        attention_dropout_rate: float = 0.0,
        dropout_rate: float = 0.0,
        locality: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim(hidden_size, num_heads)
        self.attention_dropout_rate = attention_dropout_rate
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.out = nn.Linear(hidden_size, hidden_size)
        # The article's projection dropout read the attention-dropout rate; it is the
        # ordinary dropout rate here, as in the ViT paper.
        self.proj_dropout = nn.Dropout(dropout_rate)
        # Locality self-attention (Lee et al. 2021): a learnable softmax temperature per head
        # (starting at the usual 1/sqrt(head_dim)) and no token attending to itself, which
        # sharpens attention towards other tokens on small datasets.
        self.locality = locality
        self.scale = nn.Parameter(torch.full((num_heads,), self.head_dim**-0.5)) if locality else None

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, tokens, head_dim)
        if self.scale is not None:
            # The fused kernel divides by sqrt(head_dim) itself; fold the learned scale into q.
            q = q * (self.scale * math.sqrt(self.head_dim)).view(1, -1, 1, 1).to(q.dtype)
        return q, k, v

    def _mask(self, tokens: int, device: torch.device) -> Tensor | None:
        """Where attention may look (True), or None for everywhere: LSA hides the diagonal."""
        if not self.locality:
            return None
        return ~torch.eye(tokens, dtype=torch.bool, device=device)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._qkv(x)
        dropout = self.attention_dropout_rate if self.training else 0.0
        mask = self._mask(x.shape[1], x.device)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, self.num_heads * self.head_dim)
        return self.proj_dropout(self.out(x))

    def attention_weights(self, x: Tensor) -> Tensor:
        """Softmax attention probabilities, (B, heads, tokens, tokens); rows sum to 1.

        The explicit path that the fused kernel cannot give; used only for inspection.
        """
        q, k, _ = self._qkv(x)
        scores = ((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)).float()
        mask = self._mask(x.shape[1], x.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        return scores.softmax(dim=-1)


class Mlp(nn.Module):
    """Two linear layers with GELU between them."""

    def __init__(self, *, hidden_size: int = 768, mlp_dim: int = 3072, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, hidden_size)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    No defaults: a block is built by its stack (`Encoder`, CvT's stages), which holds the
    settings' defaults and checks them."""

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
        layer_scale_init: float | None,
        norm_eps: float,
        locality_attention: bool,
    ) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.attn = Attention(
            hidden_size=hidden_size,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            attention_dropout_rate=attention_dropout_rate,
            dropout_rate=dropout_rate,
            locality=locality_attention,
        )
        self.ls1 = LayerScale(hidden_size, layer_scale_init) if layer_scale_init else nn.Identity()
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.ffn = Mlp(hidden_size=hidden_size, mlp_dim=mlp_dim, dropout_rate=dropout_rate)
        self.ls2 = LayerScale(hidden_size, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.attention_norm(x))))
        return x + self.drop_path(self.ls2(self.ffn(self.ffn_norm(x))))

    def attention_weights(self, x: Tensor) -> Tensor:
        """This block's attention probabilities for its input `x`, (B, heads, tokens, tokens)."""
        return self.attn.attention_weights(self.attention_norm(x))


def stacked_layers(names: Iterable[str], num_blocks: int) -> dict[str, int]:
    """Each parameter's layer in the stack of a model with `embeddings`, an `encoder` of
    `num_blocks` blocks and a head, numbered as timm's `group_matcher` numbers its ViT (so
    `optimizer.layer_decay` scales them as timm does): 0 the embeddings, i + 1 block i (the
    final norm joins the last block), num_blocks + 1 the rest (pre-logits, pooling, classifier)."""

    def layer(name: str) -> int:
        if name.startswith("embeddings."):
            return 0
        block = re.match(r"encoder\.layer\.(\d+)\.", name)
        if block:
            return int(block[1]) + 1
        return num_blocks if name.startswith("encoder.encoder_norm.") else num_blocks + 1

    return {name: layer(name) for name in names}


def drop_path_rates(drop_path_rate: float, num_layers: int) -> list[float]:
    """Each layer's stochastic-depth rate, growing linearly from 0 to `drop_path_rate` (Huang et al.
    2016; as in DeiT, timm and microsoft/CvT). Plain Python, not torch.linspace(...).tolist(), so
    the model can be built on the meta device."""
    return [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]


class EncoderArguments(TypedDict, total=False):
    """The transformer encoder's settings that only `Encoder` reads, as keyword arguments:
    `VisionTransformer`, the R50 hybrid and `CCT` take them as `**encoder` and pass them on.
    Their defaults are Encoder's (the ViT paper's), and Encoder checks them. `hidden_size` and
    `dropout_rate` are settings of the encoder too, but each family also reads them itself (its
    embeddings' width and dropout), so takes them by name."""

    mlp_dim: int
    num_heads: int
    num_layers: int
    qkv_bias: bool
    attention_dropout_rate: float
    drop_path_rate: float
    layer_scale_init: float | None
    norm_eps: float
    locality_attention: bool


class Encoder(nn.Module):
    """A stack of blocks followed by a final LayerNorm. Every setting is checked here, before
    anything is built (a one-line ConfigError naming it)."""

    def __init__(
        self,
        *,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        num_layers: int = 12,
        qkv_bias: bool = True,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init: float | None = None,
        norm_eps: float = 1e-6,
        locality_attention: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("mlp_dim", mlp_dim),
            ("num_heads", num_heads),
            ("num_layers", num_layers),
        ):
            check_positive(name, value)
        for name, rate in (
            ("dropout_rate", dropout_rate),
            ("attention_dropout_rate", attention_dropout_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            check_rate(name, rate)
        check_layer_scale(layer_scale_init)
        check_norm_eps(norm_eps)
        self.layer = nn.ModuleList(
            Block(
                hidden_size=hidden_size,
                mlp_dim=mlp_dim,
                num_heads=num_heads,
                qkv_bias=qkv_bias,
                dropout_rate=dropout_rate,
                attention_dropout_rate=attention_dropout_rate,
                drop_path_rate=rate,
                layer_scale_init=layer_scale_init,
                norm_eps=norm_eps,
                locality_attention=locality_attention,
            )
            for rate in drop_path_rates(drop_path_rate, num_layers)
        )
        self.encoder_norm = nn.LayerNorm(hidden_size, eps=norm_eps)

    @property
    def blocks(self) -> list[Block]:
        """The blocks in order, typed (a ModuleList yields plain Modules to the type checker)."""
        return cast("list[Block]", list(self.layer))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layer:
            x = block(x)
        return self.encoder_norm(x)

    @torch.no_grad()
    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """Every block's attention probabilities for input tokens `x`, in the same forward pass."""
        return self.attention_pass(x)[0]

    @torch.no_grad()
    def attention_pass(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """`attention_maps` and what `forward` returns, from one pass over the blocks."""
        maps = []
        for block in self.blocks:
            maps.append(block.attention_weights(x))
            x = block(x)
        return maps, self.encoder_norm(x)


class VisionTransformerArguments(EncoderArguments, total=False):
    """`VisionTransformer`'s arguments but those of its patch embedding (`patch_size`,
    `shifted_patches`, `embed_layer`), as keyword arguments: what a ViT with its own embedding
    (the R50 hybrid) takes as `**kwargs` and passes on. mypy checks each against
    VisionTransformer's signature where they are passed."""

    img_size: int | tuple[int, int]
    in_channels: int
    num_classes: int
    hidden_size: int
    dropout_rate: float
    classifier: Literal["token", "gap", "seqpool"]
    representation_size: int | None
    zero_head: bool


class VisionTransformer(nn.Module):
    """ViT for image classification: Embeddings → Encoder → pooled token → (pre-logits) → head.

    `forward` returns logits; the loss belongs to the training step. `attention_maps` gives
    the per-layer attention weights of the same forward pass. The rest of the encoder's
    settings (`mlp_dim`, `num_heads`, `num_layers`, ...: `EncoderArguments`) are keyword
    arguments too, passed on to `Encoder` with its defaults.
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        num_classes: int = 1000,
        hidden_size: int = 768,
        dropout_rate: float = 0.0,
        classifier: Literal["token", "gap", "seqpool"] = "token",
        representation_size: int | None = None,
        zero_head: bool = False,
        shifted_patches: bool = False,
        embed_layer: Callable[..., EmbedLayer] = Embeddings,
        **encoder: Unpack[EncoderArguments],
    ) -> None:
        super().__init__()
        image_size(img_size)
        for name, value in (("patch_size", patch_size), ("in_channels", in_channels)):
            check_positive(name, value)
        check_non_negative("num_classes", num_classes)
        # The embeddings are built before the Encoder checks its settings: these two first.
        check_positive("hidden_size", hidden_size)
        check_rate("dropout_rate", dropout_rate)
        check_positive_or_none("representation_size", representation_size)
        check_choice("classifier", classifier, ("token", "gap", "seqpool"))
        if not callable(embed_layer):
            raise ConfigError(f"embed_layer={embed_layer!r} must be a module class such as Embeddings")
        if shifted_patches and embed_layer is not Embeddings:
            raise ConfigError("shifted_patches=true needs the plain patch embedding; this model has its own")
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.classifier = classifier
        # `embed_layer` turns images into tokens (as timm's argument of that name): the plain patch
        # embedding here, a CNN feature map in the R50 hybrid (vitexp.models.hybrid). It must
        # provide what Embeddings provides (`EmbedLayer`): patch_embeddings, cls_token,
        # position_embeddings, img_size, patch_size, grid_size and num_prefix_tokens.
        self.embeddings = embed_layer(
            img_size=img_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            dropout_rate=dropout_rate,
            class_token=classifier == "token",
            **({"shifted_patches": True} if shifted_patches else {}),
        )
        self.encoder = Encoder(hidden_size=hidden_size, dropout_rate=dropout_rate, **encoder)
        # Sequence pooling (Hassani et al. 2021, CCT): a linear score per output token, and the
        # softmax of the scores weighs the tokens' average; no class token is needed.
        self.attention_pool = nn.Linear(hidden_size, 1) if classifier == "seqpool" else None
        # The paper's optional pre-logits layer (a tanh-activated projection) used when
        # pre-training on ImageNet-21k; dropped when fine-tuning.
        self.pre_logits: nn.Module
        if representation_size:
            self.pre_logits = nn.Sequential(nn.Linear(hidden_size, representation_size), nn.Tanh())
            head_in = representation_size
        else:
            self.pre_logits = nn.Identity()
            head_in = hidden_size
        self.head = nn.Linear(head_in, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(zero_head=zero_head)

    @property
    def img_size(self) -> tuple[int, int]:
        return self.embeddings.img_size

    @property
    def patch_size(self) -> int:
        return self.embeddings.patch_size

    @torch.no_grad()
    def init_weights(self, zero_head: bool = False) -> None:
        """The original JAX initialisation (as in timm's `init_weights_vit_jax`)."""
        emb = self.embeddings
        nn.init.normal_(emb.position_embeddings, std=0.02)
        if emb.cls_token is not None:
            nn.init.zeros_(emb.cls_token)
        # LeCun normal on the patch projection, treating the conv as a linear map of a patch.
        fan_in = emb.patch_embeddings.in_channels * emb.patch_size**2
        nn.init.trunc_normal_(emb.patch_embeddings.weight, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
        if emb.patch_embeddings.bias is not None:
            nn.init.zeros_(emb.patch_embeddings.bias)
        for block in self.encoder.blocks:
            # q, k and v are separate hidden→hidden maps in the paper: initialise each
            # third of the fused weight with its own fan, not the fused 3×hidden fan.
            for part in block.attn.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(part)
            nn.init.xavier_uniform_(block.attn.out.weight)
            for linear in (block.ffn.fc1, block.ffn.fc2):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=1e-6)
            for linear in (block.attn.qkv, block.attn.out):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        if self.attention_pool is not None:
            nn.init.trunc_normal_(self.attention_pool.weight, std=0.02)
            nn.init.zeros_(self.attention_pool.bias)
        if isinstance(self.pre_logits, nn.Sequential):
            projection = self.pre_logits[0]
            assert isinstance(projection, nn.Linear)  # built above as Linear → Tanh
            lecun = math.sqrt(1.0 / projection.in_features) / 0.87962566103423978
            nn.init.trunc_normal_(projection.weight, std=lecun)
            nn.init.zeros_(projection.bias)
        if isinstance(self.head, nn.Linear):
            if zero_head:
                nn.init.zeros_(self.head.weight)
            else:
                nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be decayed (besides norms and biases)."""
        return {"embeddings.position_embeddings", "embeddings.cls_token"}

    def parameter_layers(self) -> dict[str, int]:
        """Each parameter's layer, from the embeddings (0) to the head (the top), for
        layer-wise learning-rate decay (`stacked_layers`; the hybrid's ResNet is embeddings)."""
        return stacked_layers((name for name, _ in self.named_parameters()), len(self.encoder.layer))

    @property
    def blocks(self) -> list[Block]:
        """The transformer blocks, bottom to top (`trainer.train_last_blocks` counts them)."""
        return self.encoder.blocks

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised token sequence, (B, tokens, hidden_size)."""
        return self.encoder(self.embeddings(x))

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        if self.classifier == "token":
            x = tokens[:, 0]
        elif self.classifier == "seqpool":
            assert self.attention_pool is not None  # built whenever classifier is seqpool
            weights = F.softmax(self.attention_pool(tokens), dim=1)  # (B, tokens, 1)
            x = (weights.transpose(1, 2) @ tokens).squeeze(1)
        else:
            x = tokens.mean(dim=1)
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """Attention probabilities of every layer for input `x`: a list of `num_layers`
        tensors shaped (B, heads, tokens, tokens) whose rows sum to 1."""
        return self.encoder.attention_maps(self.embeddings(x))

    @torch.no_grad()
    def attention_pass(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """`attention_maps` and the logits `forward` gives, from one forward pass."""
        maps, tokens = self.encoder.attention_pass(self.embeddings(x))
        return maps, self.forward_head(tokens)
