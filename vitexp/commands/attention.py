"""Where the model looks: attention rollout and last-layer attention per head, as a PNG grid.

    python -m vitexp.attention checkpoint=PATH image=cat.png
    python -m vitexp.attention checkpoint=PATH index=[0,1,2]                  (the checkpoint's dataset)
    python -m vitexp.attention checkpoint=PATH dataset=cifar10 dataset.root=DIR index=7 split=test

The grid shows, per image, the attention rollout over every layer and the last layer's attention
of each head (`vitexp.viz` says how each is computed). It is drawn for vitexp's ViTs (the R50
hybrid included) and for timm's ViT family (`model=timm`); other models are refused in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from vitexp.cli import default_output, require_settings, run_command, run_job
from vitexp.config import conf_dir
from vitexp.data import FileSplit, ImageData, load_images
from vitexp.errors import ConfigError
from vitexp.inference import TrainedModel, as_trained, dataset_from_cfg, split_channels
from vitexp.viz import has_attention_maps, no_attention_maps, save_attention_grid

log = logging.getLogger("vitexp.attention")


# --------------------------------------------------------------------------- the command


def attention_figure(
    checkpoint: str | Path | TrainedModel,
    *,
    images: Sequence[str | Path] = (),
    data: ImageData | None = None,
    indices: Sequence[int] = (),
    split: str = "test",
    output: str | Path | None = None,
    device: str = "cpu",
) -> Path:
    """Attention grid of a checkpoint, for image files or for images `indices` of a dataset
    split (`data`, or the checkpoint's own dataset when None). Returns the PNG's path
    (default: next to the checkpoint, `<stem>_attention_<what>.png`).

    Image files are centre-cropped to the model's aspect ratio before the resize (see
    `vitexp.predict`); the grid shows them as the model saw them.
    """
    if bool(images) == bool(indices):
        raise ConfigError("give either image=FILE (or a list) or index=N (or a list), not both or neither")
    trained = as_trained(checkpoint, device)
    if not has_attention_maps(trained.model):
        raise ConfigError(f"{trained.path.name}: {no_attention_maps(trained.model)}")
    labels = None
    if images:
        pictures = load_images(images, trained.in_channels, trained.img_size)
        what = Path(images[0]).stem if len(images) == 1 else f"{Path(images[0]).stem}_and_{len(images) - 1}"
    else:
        if split not in ("train", "test"):
            raise ConfigError(f"split={split!r} is not one of train, test")
        data = data if data is not None else trained.load_dataset()
        chosen = getattr(data, split)
        if split_channels(chosen) != trained.in_channels:
            raise ConfigError(
                f"the dataset's images have {split_channels(chosen)} channels but the checkpoint's model "
                f"takes {trained.in_channels}; use a dataset like the one it was trained on"
            )
        bad = [i for i in indices if not 0 <= i < len(chosen)]
        if bad:
            raise ConfigError(f"index={bad[0]} is out of range: the {split} split has {len(chosen)} images")
        if isinstance(chosen, FileSplit):
            pictures = chosen.load_many(list(indices))
        else:
            pictures = chosen.images[torch.tensor(list(indices), dtype=torch.long)]
        labels = chosen.labels[torch.tensor(list(indices), dtype=torch.long)]
        if data.num_classes != trained.num_classes:
            labels = None  # another label set: the true class would be misleading
        what = f"{split}{'-'.join(str(i) for i in indices[:8])}"
    out = Path(output) if output is not None else default_output(trained.path, f"attention_{what}.png")
    save_attention_grid(
        trained.model,
        pictures,
        trained.transform,
        out,
        class_names=trained.classes,
        labels=labels,
        title=f"{trained.path.name}: attention rollout and last-layer attention per head",
    )
    return out


def _as_list(value: object) -> list:
    if value is None:
        return []
    if isinstance(value, ListConfig | list | tuple):
        return list(value)
    return [value]


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="attention")
def _hydra_main(cfg: DictConfig) -> None:
    run_job(_attention, cfg)


def _attention(cfg: DictConfig) -> None:
    require_settings(cfg)
    try:
        indices = [int(i) for i in _as_list(cfg.index)]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"index={cfg.index} must be an integer or a list of integers") from e
    trained = as_trained(cfg.checkpoint, str(cfg.device))
    data = dataset_from_cfg(cfg, trained)
    path = attention_figure(
        trained,
        images=[str(p) for p in _as_list(cfg.image)],
        data=data,
        indices=indices,
        split=str(cfg.split),
        output=cfg.output,
        device=str(cfg.device),
    )
    log.info("wrote %s", path)


def main() -> None:
    """`python -m vitexp.attention [overrides]` (see conf/attention.yaml)."""
    run_command(_hydra_main)
