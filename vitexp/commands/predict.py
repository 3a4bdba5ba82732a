"""Classify image files with a trained checkpoint and print the top classes.

    python -m vitexp.predict checkpoint=PATH images=[a.png,b.jpg]
    python -m vitexp.predict checkpoint=PATH images=photos                  # a folder's images
    python -m vitexp.predict checkpoint=PATH 'images="photos/**/*.jpg"'     # a glob pattern

`images` is a file, a folder or a glob pattern, or a list of them (see `image_files`).

Files of any size and mode are read as the model's channel count (grayscale, palette,
16-bit, CMYK converted; transparency put on white; EXIF rotation applied), centre-cropped to
the model's aspect ratio (a no-op for square images and a square model), resized to its input
size as evaluation in training does, and normalised with the training run's mean and std.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from vitexp.cli import require_settings, run_command, run_job
from vitexp.config import conf_dir
from vitexp.data import load_images
from vitexp.data.folders import IMAGE_EXTENSIONS
from vitexp.errors import ConfigError
from vitexp.inference import TrainedModel, as_trained

log = logging.getLogger("vitexp.predict")


def image_files(entries: Sequence[str | Path]) -> list[Path]:
    """The files that `images=` names. Each entry is a file, taken as it is; a folder, for the
    image files directly in it (by extension, sorted by name; subfolders are not searched); or
    a glob pattern (`*`, `?`, `[...]`; `**` spans folders), for the image files it matches,
    sorted. A folder or pattern without images is a ConfigError."""
    kinds = ", ".join(IMAGE_EXTENSIONS)
    files: list[Path] = []
    for entry in entries:
        path, text = Path(entry), str(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise ConfigError(
                    f"image folder {path} holds no {kinds} files; its subfolders are not searched: "
                    f"for them give 'images=\"{path}/**/*.jpg\"'"
                )
        elif any(c in text for c in "*?[") and not path.exists():
            found = sorted(
                Path(p)
                for p in glob.glob(text, recursive=True)
                if Path(p).suffix.lower() in IMAGE_EXTENSIONS and Path(p).is_file()
            )
            if not found:
                raise ConfigError(f"images={text} matches no {kinds} files; check the pattern")
        else:
            found = [path]  # read when classified: a missing file is named there
        files += found
    return files


def predict_images(
    checkpoint: str | Path | TrainedModel,
    images: Sequence[str | Path],
    *,
    top_k: int = 5,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Top-`top_k` classes of each image: `[{"image": path, "top": [{"class", "index",
    "probability"}, ...]}]`, most probable first. `images` are files, folders or glob patterns
    (`image_files`). Every file is read before any is classified, so a bad one fails the call
    at once with a ConfigError naming it."""
    if not images:
        raise ConfigError("no images given: add images=[a.png,b.jpg], images=FOLDER or 'images=\"GLOB\"'")
    if top_k <= 0:
        raise ConfigError(f"top_k={top_k} must be positive")
    images = image_files(images)
    trained = as_trained(checkpoint, device)
    pictures = load_images(images, trained.in_channels, trained.img_size)
    probs = trained.logits(pictures).softmax(dim=-1).cpu()
    top = probs.topk(min(top_k, trained.num_classes), dim=-1)
    return [
        {
            "image": str(path),
            "top": [
                {"class": trained.classes[int(i)], "index": int(i), "probability": float(p)}
                for p, i in zip(top.values[n], top.indices[n], strict=True)
            ],
        }
        for n, path in enumerate(images)
    ]


def format_predictions(predictions: list[dict[str, Any]]) -> str:
    """One block per image: its path, then one line per class with its probability."""
    lines = []
    for item in predictions:
        lines.append(item["image"])
        lines += [f"  {t['probability']:8.2%}  {t['class']}" for t in item["top"]]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    run_job(_predict, cfg)


def _predict(cfg: DictConfig) -> None:
    require_settings(cfg)
    images = list(cfg.images) if isinstance(cfg.images, ListConfig) else [cfg.images]
    predictions = predict_images(
        cfg.checkpoint, [str(p) for p in images], top_k=int(cfg.top_k), device=str(cfg.device)
    )
    # The predictions are the command's output: stdout, apart from the log on stderr.
    print(format_predictions(predictions), flush=True)
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(predictions, indent=2) + "\n")
        log.info("wrote %s", cfg.output)


def main() -> None:
    """`python -m vitexp.predict [overrides]` (see conf/predict.yaml)."""
    run_command(_hydra_main)
