"""What the inspection commands share: a checkpoint turned back into a ready model, image
files read into the tensors the model expects, and the one-line error handling of their
command-line entries.

`load_trained(path)` rebuilds the model from the config stored in the checkpoint (never from
the current `conf/`, which may have changed since), with the evaluation transform of the run
(the model's image size, the dataset's mean and std) and the class names when the
checkpoint carries them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from vitexp.config import instantiate_group, leaves
from vitexp.data import BatchTransform, FileSplit, ImageData, Split, build_stored_dataset
from vitexp.data.transforms import eval_batches
from vitexp.errors import ConfigError
from vitexp.models import StoredModel, VisionTransformer, build_stored_model, class_count, input_size
from vitexp.runtime import pick_device
from vitexp.training.checkpoint import read_training_checkpoint

log = logging.getLogger("vitexp")


@dataclass
class TrainedModel:
    """A checkpoint's model in eval mode on `device`, with what is needed to feed it."""

    model: StoredModel  # a VisionTransformer, or another family of vitexp.models
    transform: BatchTransform  # evaluation path only: resize to the model's size, normalise
    classes: list[str]  # the checkpoint's class names, else "0", "1", ...
    in_channels: int
    config: dict[str, Any]  # the run's resolved config, as stored in the checkpoint
    path: Path
    device: torch.device
    info: dict[str, Any]  # epoch, global_step, best_metric: where in training it was saved
    inputs: dict[str, Any]  # mean, std (lists), interpolation: how `transform` prepares images

    @property
    def num_classes(self) -> int:
        return class_count(self.model)

    @property
    def img_size(self) -> tuple[int, int]:
        return input_size(self.model)

    def load_dataset(self) -> ImageData:
        """The dataset the checkpoint was trained on, from its stored `dataset.load` config."""
        return load_dataset(self.config["dataset"]["load"], f"the dataset of {self.path}")

    @torch.no_grad()
    def logits(self, images: Tensor | Sequence[Tensor], batch_size: int = 256) -> Tensor:
        """Float logits for uint8 images: a batch (N, C, H, W), or a list of (C, H, W) images
        of any sizes (each is resized to the model's input size on its own)."""
        self.model.eval()
        out = []
        for x in eval_batches(self.transform, images, self.device, batch_size):
            out.append(self.model(x).float())
        return torch.cat(out)


def load_dataset(load_cfg: Mapping[str, Any], what: str, *, stored: bool = True) -> ImageData:
    """Build a `dataset.load` config. `what` names where it came from.

    A config stored in a checkpoint (`stored`, the default) is built through the allow-list of
    `vitexp.data.build_stored_dataset`: never Hydra's `instantiate`, which would call any
    `_target_` the file names, and never a download. A config the user composed on the command
    line (`dataset=NAME`, `stored=False`) is theirs and is instantiated; a vitexp error raised
    while building it is reported in one line."""
    if stored:
        return build_stored_dataset(load_cfg, source=what)
    data = instantiate_group("dataset.load", dict(load_cfg), label="dataset", _convert_="all")
    if not isinstance(data, ImageData):
        raise ConfigError(f"{what}: dataset.load built a {type(data).__name__}, not vitexp.data.ImageData")
    return data


def dataset_from_cfg(cfg: DictConfig, trained: TrainedModel) -> ImageData | None:
    """The dataset a command line names with `dataset=NAME` (None when it names none).

    Its config may refer to the model (the image folder's `image_size: ${model.img_size}`);
    that resolves against the checkpoint's model config, which the command's config lacks.
    """
    if cfg.get("dataset") is None:
        return None
    root = OmegaConf.create({"model": trained.config["model"], "dataset": cfg.dataset})
    missing = [key for key, value in leaves(root.dataset, "dataset").items() if value == "???"]
    if missing:
        raise ConfigError(f"{missing[0]} is required here (marked ???): add {missing[0]}=...")
    try:
        load = root.dataset.load
        load_cfg = OmegaConf.to_container(load, resolve=True) if isinstance(load, DictConfig) else None
    except OmegaConfBaseException as e:
        raise ConfigError(f"dataset: {str(e).splitlines()[0]}") from e
    if not isinstance(load_cfg, dict):  # a name or null where the loader's _target_ belongs
        shown = "null" if load is None else repr(load)
        raise ConfigError(
            f"dataset.load={shown} is not a loader config: choose a dataset with dataset=NAME, or give "
            f"dataset.load a _target_ (e.g. vitexp.data.load_digits) and its arguments"
        )
    return load_dataset({str(key): value for key, value in load_cfg.items()}, "dataset", stored=False)


def split_channels(split: Split | FileSplit) -> int:
    return split.in_channels if isinstance(split, FileSplit) else int(split.images.shape[1])


def as_trained(checkpoint: str | Path | TrainedModel, device: str | torch.device = "cpu") -> TrainedModel:
    """A loaded model as is, or `load_trained(checkpoint, device)`: the functions of the
    commands take either, so a caller that already holds the model does not read it twice."""
    return checkpoint if isinstance(checkpoint, TrainedModel) else load_trained(checkpoint, device)


def load_trained(checkpoint: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the model of a vitexp training checkpoint (`last.pt`, `best.pt`, `epoch{N}.pt`).

    The file is read onto the CPU first (so a GPU-trained checkpoint opens on a machine
    without one), then the model moves to `device` (`auto`: CUDA when present).
    """
    path = Path(checkpoint)
    ckpt = read_training_checkpoint(path, map_location="cpu")
    config = ckpt.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConfigError(
            f"{path} is not a vitexp training checkpoint (it has no stored config and model weights); "
            f"use last.pt or best.pt from a run directory"
        )
    # Whoever made the file chose its stored config: it is built only through the allow-list of
    # vitexp's model classes, never by Hydra's instantiate. Its `pretrained` weights are not read
    # (the checkpoint's own replace them; the file need not exist).
    model = build_stored_model(config["model"], source=str(path))
    # A run with trainer.ema_decay evaluated (and chose best.pt by) its weight average: use it.
    weights = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        # torch's message is a header line, then one line per kind of mismatch.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:160]
        raise ConfigError(
            f"{path}: the weights do not fit the model its stored config describes ({detail}); "
            f"the checkpoint is damaged or was edited"
        ) from e
    # What the run fed the model (its mean, std and interpolation: a timm model's own); a
    # checkpoint written before vitexp stored them normalised with its dataset's mean and std.
    inputs = ckpt.get("inputs") or config.get("dataset") or {}
    if "mean" not in inputs or "std" not in inputs:
        raise ConfigError(f"{path}: the stored config has no dataset.mean/std to normalise inputs with")
    inputs = {
        "mean": list(inputs["mean"]),
        "std": list(inputs["std"]),
        "interpolation": str(inputs.get("interpolation") or "bilinear"),
    }
    transform = BatchTransform(img_size=input_size(model), **inputs)
    in_channels = getattr(model, "in_channels", None) or config["model"].get("in_channels")
    if in_channels is None and isinstance(model, VisionTransformer):
        # the plain ViT keeps it in its patch projection only
        in_channels = model.embeddings.patch_embeddings.in_channels
    classes = ckpt.get("classes")
    if not (isinstance(classes, list | tuple) and len(classes) == class_count(model)):
        classes = [str(i) for i in range(class_count(model))]
    device = pick_device(str(device)) if not isinstance(device, torch.device) else device
    return TrainedModel(
        model=model.to(device).eval(),
        transform=transform,
        classes=[str(c) for c in classes],
        in_channels=int(in_channels),
        config=config,
        path=path,
        device=device,
        info={
            k: v for k, v in ckpt.get("progress", {}).items() if k in ("epoch", "global_step", "best_metric")
        },
        inputs=inputs,
    )
