"""Pictures of a model: attention rollout and last-layer attention per head as a PNG grid,
and the confusion matrix. Pure drawing on tensors; used by training (the run's
`attention.png`) and by the inspection commands alike.

Two views of the same forward pass (`VisionTransformer.attention_pass`, or for timm's ViTs
`timm_attention_pass`), which also gives the probabilities the figure prints:

- Attention rollout (Abnar & Zuidema 2020): per layer, average the heads, add the residual
  connection as an identity (A' = 0.5·A + 0.5·I), renormalise the rows, and multiply the
  layers (R = A'_L ⋯ A'_1), so R[i, j] estimates how much of input token j reaches output
  token i. The class token's row over the patch tokens is the map.
- The last layer's attention of each head, the class token's row over the patch tokens.

Models pooled by average or by sequence pooling (`classifier=gap` or `seqpool`) have no class
token: their logits read (a weighting of) all output tokens, so both views use the mean over
query tokens (rows) instead of one row.
Maps are shown min-max scaled each; the values are fractions of attention (for the class
token, its attention to itself is left out, so a row over the patches sums to less than 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from vitexp.data import BatchTransform, FileSplit, Split
from vitexp.data.streams import StreamSplit
from vitexp.data.transforms import eval_batches
from vitexp.errors import ConfigError
from vitexp.models import VisionTransformer
from vitexp.models.timm_models import readable_timm_attention, timm_attention_pass
from vitexp.runtime import unwrap

PANEL_INCHES = 1.6  # one map
DPI = 100


# --------------------------------------------------------------------------- the maps


def rollout(maps: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout over layers: (B, heads, T, T) per layer → (B, T, T), rows summing to 1.

    `residual` is the weight of the identity that stands for the skip connection.
    """
    if not maps:
        raise ValueError("rollout needs the attention of at least one layer")
    joint: Tensor | None = None
    for attn in maps:
        a = attn.float().mean(dim=1)  # heads averaged
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = (1.0 - residual) * a + residual * eye
        a = a / a.sum(dim=-1, keepdim=True)
        # A later layer mixes what the earlier ones already mixed: multiply on the left.
        joint = a if joint is None else a @ joint
    assert joint is not None
    return joint


def patch_scores(matrix: Tensor, num_prefix_tokens: int) -> Tensor:
    """(..., T, T) attention → (..., patches): the class token's row over the patch tokens, or
    for models without a class token (`num_prefix_tokens=0`, average pooling) the mean row."""
    if num_prefix_tokens > 0:
        return matrix[..., 0, num_prefix_tokens:]
    return matrix.mean(dim=-2)


def to_grid(scores: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """(..., patches) → (..., grid_h, grid_w), in the row-major order the patch embedding uses."""
    return scores.reshape(*scores.shape[:-1], *grid_size)


@dataclass
class AttentionResult:
    rollout: Tensor  # (B, grid_h, grid_w)
    heads: Tensor  # (B, heads, grid_h, grid_w): last layer
    probs: Tensor  # (B, num_classes): softmax of the logits
    query: str  # "class token" or "mean query": which row the maps read
    layers: int  # how many layers the rollout multiplies


@dataclass(frozen=True)
class AttentionReader:
    """How to read one model's attention: the maps and logits of its images, and the token layout."""

    # normalised images → ((B, heads, T, T) per layer, logits), from one forward pass
    forward: Callable[[Tensor], tuple[list[Tensor], Tensor]]
    num_prefix_tokens: int  # class (and register) tokens before the patch tokens
    grid_size: tuple[int, int]  # the patch tokens' rows and columns


def attention_reader(model: nn.Module) -> AttentionReader | None:
    """The reader of a model `save_attention_grid` can draw, else None: vitexp's ViTs (the R50
    hybrid included) and timm's ViT family (`model=timm`), whose layers all attend over the
    same tokens. CvT's stages change the token count and CCT pools by learned weights rather
    than a class token or a mean, so rollout as defined here does not apply to them."""
    net = unwrap(model)
    if isinstance(net, VisionTransformer):
        return AttentionReader(net.attention_pass, net.embeddings.num_prefix_tokens, net.embeddings.grid_size)
    if readable_timm_attention(net):
        timm_vit: Any = net  # timm's VisionTransformer: its attributes are not typed here
        rows, cols = timm_vit.patch_embed.grid_size
        return AttentionReader(
            partial(timm_attention_pass, net), int(timm_vit.num_prefix_tokens), (int(rows), int(cols))
        )
    return None


def has_attention_maps(model: nn.Module) -> bool:
    """Whether `save_attention_grid` can draw this model (see `attention_reader`)."""
    return attention_reader(model) is not None


def no_attention_maps(model: nn.Module) -> str:
    """The refusal for a model `has_attention_maps` rejects, naming its library and class."""
    net = unwrap(model)
    kind = f"{type(net).__module__.split('.')[0]}'s {type(net).__name__}"
    return f"attention maps are drawn for vitexp's ViTs and timm's ViT family, not {kind}"


@torch.no_grad()
def compute_attention(model: nn.Module, x: Tensor) -> AttentionResult:
    """Rollout and last-layer per-head maps for a normalised input batch `x`."""
    reader = attention_reader(model)
    if reader is None:
        raise ConfigError(no_attention_maps(model))
    maps, logits = reader.forward(x)
    prefix = reader.num_prefix_tokens
    return AttentionResult(
        rollout=to_grid(patch_scores(rollout(maps), prefix), reader.grid_size),
        heads=to_grid(patch_scores(maps[-1], prefix), reader.grid_size),
        probs=logits.float().softmax(dim=-1),
        query="class token" if prefix else "mean query",
        layers=len(maps),
    )


# --------------------------------------------------------------------------- the picture


def _display(image: Tensor) -> tuple[Tensor, str | None]:
    """uint8 (C, H, W) → what imshow takes (H, W[, 3]) and a colour map for grayscale."""
    image = image.detach().cpu()
    if image.shape[0] == 1:
        return image[0], "gray"
    return image.permute(1, 2, 0), None


def _scaled(m: Tensor) -> Tensor:
    """Min-max scale a map to [0, 1] for display; a constant map shows as zeros."""
    m = m.detach().float().cpu()
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else torch.zeros_like(m)


def save_attention_grid(
    model: nn.Module,
    images: Tensor | Sequence[Tensor],
    transform: BatchTransform,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    labels: Sequence[int] | Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG with one row per image: the image (titled with the top prediction), the
    rollout over it, and the last layer's attention of every head.

    `images` are uint8, a batch (N, C, H, W) or a list of (C, H, W) of any sizes, as stored
    in `vitexp.data.Split`; `transform` is the run's `BatchTransform` (only its evaluation
    path is used). `labels`, when given, add the true class (red title when it is missed).
    The model may be wrapped (compiled, DDP) and on any device; its train/eval mode is
    restored afterwards.
    """
    path = Path(path)
    net = unwrap(model)
    if len(images) == 0:
        raise ConfigError("no images to show")
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        x = torch.cat(list(eval_batches(transform, images, device, batch_size=64)))
        result = compute_attention(net, x)
    finally:
        net.train(was_training)

    rows, heads = len(images), result.heads.shape[1]
    cols = 2 + heads
    names = list(class_names) if class_names is not None else [str(i) for i in range(result.probs.shape[1])]
    truth = [int(t) for t in labels] if labels is not None else None
    layers = result.layers
    # A Figure of its own (no pyplot): no global state, no GUI backend, safe inside training.
    fig = Figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES + 0.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.suptitle(
        title
        or f"attention rollout over {layers} layers, and layer {layers} attention per head ({result.query})",
        fontsize=9,
    )
    for r in range(rows):
        image, cmap = _display(images[r])
        height, width = image.shape[0], image.shape[1]
        extent = (0, width, height, 0)
        prob, pred = result.probs[r].max(dim=0)
        caption = f"{names[int(pred)]} {prob.item():.0%}"
        colour = "black"
        if truth is not None:
            caption = f"true {names[truth[r]]}\npred {caption}"
            colour = "black" if truth[r] == int(pred) else "tab:red"
        ax = axes[r, 0]
        ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=255, extent=extent, interpolation="nearest")
        ax.set_title(caption, fontsize=7, color=colour)
        ax = axes[r, 1]
        ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=255, extent=extent, interpolation="nearest")
        ax.imshow(
            _scaled(result.rollout[r]).numpy(),
            cmap="jet",
            alpha=0.5,
            extent=extent,
            interpolation="bilinear",
            vmin=0,
            vmax=1,
        )
        for h in range(heads):
            axes[r, 2 + h].imshow(
                _scaled(result.heads[r, h]).numpy(), cmap="viridis", extent=extent, interpolation="nearest"
            )
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and c > 0:
                ax.set_title("rollout" if c == 1 else f"head {c - 1}", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def sample_images(split: Split | FileSplit, count: int = 8) -> tuple[Tensor | list[Tensor], Tensor]:
    """A fixed, label-diverse set of images for a train-end grid: the first image of each
    class in index order, then the next unused images, up to `count`. Returns uint8 images
    (a batch; for an image folder, its files read by `load_image` at the split's size, as
    training reads them) and their labels; for a streamed split, its first `count` samples."""
    if isinstance(split, StreamSplit):
        return split.head(count)
    labels = split.labels.cpu()
    chosen: list[int] = []
    for cls in labels.unique(sorted=True).tolist():
        if len(chosen) == count:
            break
        chosen.append(int((labels == cls).nonzero()[0]))
    taken = set(chosen)
    chosen += [i for i in range(len(split)) if i not in taken][: count - len(chosen)]
    chosen.sort()
    idx = torch.tensor(chosen, dtype=torch.long)
    if isinstance(split, FileSplit):
        return split.load_many(chosen), labels[idx]
    return split.images[idx.to(split.images.device)], split.labels[idx.to(split.labels.device)]


# --------------------------------------------------------------------------- confusion matrix


def save_confusion_png(matrix: Tensor, classes: list[str], path: Path, title: str) -> Path:
    """The confusion matrix as a PNG, each row scaled to the fraction of its true class
    (counts written in the cells when there are at most 20 classes)."""
    k = len(classes)
    counts = matrix.double()
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    side = min(20.0, max(5.0, 0.4 * k + 2.5))
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fractions.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if fractions[i, j] > 0.5 else "black")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
