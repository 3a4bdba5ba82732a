"""What the inspection commands share: a checkpoint turned back into a ready model, image
files read into the tensors the model expects, and the one-line error handling of their
command-line entries.

`load_trained(path)` rebuilds the model from the config stored in the checkpoint (never from
the current `conf/`, which may have changed since), with the evaluation transform of the run
(the model's image size, the dataset's mean and std) and the class names when the
checkpoint carries them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

from vitexp.checkpoint import load_checkpoint
from vitexp.data import BatchTransform, FileSplit, ImageData, Split
from vitexp.errors import ConfigError
from vitexp.models import build_model

log = logging.getLogger("vitexp")


@dataclass
class TrainedModel:
    """A checkpoint's model in eval mode on `device`, with what is needed to feed it."""

    model: nn.Module  # a VisionTransformer, or another family of vitexp.models
    transform: BatchTransform  # evaluation path only: resize to the model's size, normalise
    classes: list[str]  # the checkpoint's class names, else "0", "1", ...
    in_channels: int
    config: dict[str, Any]  # the run's resolved config, as stored in the checkpoint
    path: Path
    device: torch.device
    info: dict[str, Any]  # epoch, global_step, best_metric: where in training it was saved

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.model.img_size)

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


def load_dataset(load_cfg: Mapping[str, Any], what: str) -> ImageData:
    """Instantiate a `dataset.load` config, turning its failures into one ConfigError line."""
    from vitexp.train import build

    data = build("dataset", lambda: instantiate(dict(load_cfg), _convert_="all"))
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
    missing = _missing_keys(OmegaConf.to_container(root.dataset, resolve=False), "dataset")
    if missing:
        raise ConfigError(f"{missing[0]} is required here (marked ???): add {missing[0]}=...")
    try:
        load_cfg = OmegaConf.to_container(root.dataset.load, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"dataset: {str(e).splitlines()[0]}") from e
    return load_dataset(load_cfg, "dataset")


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is `???`, in an unresolved container (OmegaConf.missing_keys
    raises on an interpolation that points at a missing value instead of listing it)."""
    if isinstance(node, dict):
        return [
            k
            for key, value in node.items()
            for k in _missing_keys(value, f"{prefix}.{key}" if prefix else key)
        ]
    return [prefix] if node == "???" else []


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
    from vitexp.train import build, pick_device

    path = Path(checkpoint)
    ckpt = load_checkpoint(path, map_location="cpu")
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "model" not in ckpt:
        raise ConfigError(
            f"{path} is not a vitexp training checkpoint (it has no stored config and model weights); "
            f"use last.pt or best.pt from a run directory"
        )
    # The stored config may name the pretrained weights the run started from; the
    # checkpoint's own weights replace them, so that file is not read (and need not exist).
    model = build("model", lambda: build_model(config["model"], load_pretrained=False))
    if not (hasattr(model, "img_size") and hasattr(model, "num_classes")):
        raise ConfigError(f"{path}: its model config builds a {type(model).__name__}, not a vitexp model")
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
    dataset_cfg = config.get("dataset") or {}
    if "mean" not in dataset_cfg or "std" not in dataset_cfg:
        raise ConfigError(f"{path}: the stored config has no dataset.mean/std to normalise inputs with")
    transform = build(
        "dataset",
        lambda: BatchTransform(img_size=model.img_size, mean=dataset_cfg["mean"], std=dataset_cfg["std"]),
    )
    in_channels = getattr(model, "in_channels", None) or config["model"].get("in_channels")
    if in_channels is None:  # the plain ViT keeps it in its patch projection only
        in_channels = model.embeddings.patch_embeddings.in_channels
    classes = ckpt.get("classes")
    if not (isinstance(classes, list | tuple) and len(classes) == model.num_classes):
        classes = [str(i) for i in range(model.num_classes)]
    device = pick_device(str(device)) if not isinstance(device, torch.device) else device
    return TrainedModel(
        model=model.to(device).eval(),
        transform=transform,
        classes=[str(c) for c in classes],
        in_channels=int(in_channels),
        config=config,
        path=path,
        device=device,
        info={k: ckpt[k] for k in ("epoch", "global_step", "best_metric") if k in ckpt},
    )


# --------------------------------------------------------------------------- image files


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent images onto white, as an image viewer shows them: the alpha
    channel alone says nothing about the colour of a transparent pixel."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float grayscale (modes I;16, I, F) to 8-bit L by scaling, not clipping:
    PIL's own convert("L") clips, turning most 16-bit images white."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
    elif img.mode.startswith("I;16"):
        top = 65535.0
    else:  # "I": 32-bit integers, which is how PIL opens some 16-bit PNGs
        top = 65535.0 if arr.max(initial=0.0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str | Path, channels: int) -> Tensor:
    """An image file of any size and mode as a uint8 tensor (channels, H, W).

    Grayscale, palette, 16-bit and CMYK images are converted; transparent ones are put on
    white; the EXIF orientation of photos is applied. `channels` is 1 (L) or 3 (RGB).
    """
    path = Path(path)
    if channels not in (1, 3):
        raise ConfigError(
            f"the model takes {channels}-channel input; only 1- or 3-channel images can be read"
        )
    if not path.is_file():
        raise ConfigError(f"image {path} does not exist; check the path")
    try:
        with Image.open(path) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ConfigError(
            f"image {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"use a PNG, JPEG or other image file"
        ) from e
    img = _flatten_alpha(_high_depth_to_8bit(img))
    img = img.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


def crop_to_aspect(image: Tensor, size: Sequence[int]) -> Tensor:
    """The centre of a (C, H, W) image at the aspect ratio of `size` (H, W), so that the
    resize to the model's input keeps shapes undistorted, as training on image folders does
    (shorter side fitted, centre cropped). Images of the model's aspect ratio pass unchanged."""
    height, width = image.shape[-2:]
    target = size[1] / size[0]  # width / height
    if width > round(height * target):
        new = max(1, round(height * target))
        left = (width - new) // 2
        return image[..., :, left : left + new]
    if height > round(width / target):
        new = max(1, round(width / target))
        top = (height - new) // 2
        return image[..., top : top + new, :]
    return image


# --------------------------------------------------------------------------- command entries


@contextlib.contextmanager
def one_line_errors(cfg: DictConfig) -> Iterator[None]:
    """Turn a ConfigError into one `error: ...` log line and exit status 2, as `python -m
    vitexp` does; in a multirun the error propagates so Hydra records the failed job. A
    required setting left out (`???`, e.g. `checkpoint`) is such an error too."""
    try:
        # Only the command's own settings here; a dataset's are checked when it is built.
        missing = [k for k in _missing_keys(OmegaConf.to_container(cfg, resolve=False)) if "." not in k]
        if missing:
            raise ConfigError(f"{missing[0]} is required: add {missing[0]}=... to the command")
        yield
    except ConfigError as e:
        log.error("error: %s", e)
        if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
            raise
        sys.exit(2)


def default_output(checkpoint: Path, suffix: str) -> Path:
    """Where a command writes when no `output=` is given: next to the checkpoint, named
    after it, so inspecting a run adds files to that run's folder and nowhere else."""
    return checkpoint.parent / f"{checkpoint.stem}_{suffix}"
