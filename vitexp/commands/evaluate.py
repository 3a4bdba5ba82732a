"""Evaluate a trained checkpoint: loss, top-1, top-5, per-class accuracy, confusion matrix.

    python -m vitexp.evaluate checkpoint=PATH                       (its own dataset, test split)
    python -m vitexp.evaluate checkpoint=PATH split=train
    python -m vitexp.evaluate checkpoint=PATH dataset=cifar10 dataset.root=../shared/data

The model is rebuilt from the config stored in the checkpoint and scored with the training
loop's own `vitexp.training.metrics.score` (the same definitions as the per-epoch metrics), on the
CPU if no GPU is present whatever device trained it. Any dataset with the same number of
classes and channels works; images are resized to the model's input size and normalised
with the training run's mean and std.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor, nn

from vitexp.cli import default_output, require_settings, run_command, run_job
from vitexp.config import conf_dir
from vitexp.data import FileSplit, ImageData, Split, carve_validation, make_loader
from vitexp.errors import ConfigError
from vitexp.inference import TrainedModel, as_trained, dataset_from_cfg, split_channels
from vitexp.runtime import autocast_context, configure_backends
from vitexp.training.metrics import logits_of, score
from vitexp.viz import save_confusion_png

log = logging.getLogger("vitexp.evaluate")

SPLITS = ("test", "train", "val")


class _KeepPredictions(nn.Module):
    """Passes the logits through and keeps each batch's top class, so that the training
    loop's `score` gives the metrics and the confusion matrix comes from the same pass.
    With `hflip` the logits are the mean over each image and its mirror image (the flip is
    done here, not by `score`, so that one prediction is kept per image)."""

    def __init__(self, model: nn.Module, hflip: bool = False) -> None:
        super().__init__()
        self.model = model
        self.hflip = hflip
        self.predictions: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        logits = logits_of(self.model, x, self.hflip)
        self.predictions.append(logits.argmax(dim=1))
        return logits


class _KeepLabels:
    """Passes a loader's batches through and keeps their labels: an image folder read with
    `on_error=skip` scores fewer images than its split lists, and the confusion matrix must
    pair each prediction with its own label."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.device = loader.device
        self.labels: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            self.labels.append(y)
            yield x, y


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """Counts (num_classes, num_classes): row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def select_split(data: ImageData, split: str, val_split: float, seed: int) -> Split | FileSplit:
    """`train`, `test`, or `val`: the images a run with `dataset.val_split` held out of the
    training set (the same seeded choice as `vitexp.training`)."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if split == "val":
        if not val_split:
            raise ConfigError(
                "split=val needs dataset.val_split > 0 (the checkpoint's run held out no validation "
                "images); use split=test, or give dataset.val_split"
            )
        return carve_validation(data.train, float(val_split), seed=seed)[1]
    return getattr(data, split)


def per_class_accuracy(matrix: Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """Count, correct and accuracy (None for a class with no images) per true class."""
    rows = []
    for i, name in enumerate(classes):
        count, correct = int(matrix[i].sum()), int(matrix[i, i])
        rows.append(
            {
                "class": name,
                "count": count,
                "correct": correct,
                "accuracy": correct / count if count else None,
            }
        )
    return rows


def _class_names(trained: TrainedModel, data: ImageData) -> list[str]:
    """The checkpoint's names define the model's outputs; the dataset's fill in when it has none."""
    classes = trained.classes
    if classes == [str(i) for i in range(trained.num_classes)]:
        return list(data.classes)
    if list(data.classes) != classes and data.classes != [str(i) for i in range(data.num_classes)]:
        log.warning("the dataset's class names differ from the checkpoint's; reporting the checkpoint's")
    return classes


def evaluate_checkpoint(
    checkpoint: str | Path | TrainedModel,
    data: ImageData | None = None,
    *,
    split: str = "test",
    val_split: float | None = None,
    output: str | Path | None = None,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "fp32",
    num_workers: int | None = None,
    hflip: bool = False,
) -> dict[str, Any]:
    """Evaluate `checkpoint` on a split of `data` (None: the dataset stored in the checkpoint).

    Writes the report as JSON to `output` (default: next to the checkpoint,
    `<stem>_eval_<split>.json`) and the confusion matrix beside it (`..._confusion.png`), and
    returns the report. `val_split` (for split=val) and `num_workers` (decoding image folders)
    default to the checkpoint's dataset config. `hflip` scores the mean of the logits of each
    image and its mirror image (test-time flip averaging).
    """

    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be positive")
    trained = as_trained(checkpoint, device)
    configure_backends(trained.device)  # TF32 and cuDNN autotuning, as training runs
    checkpoint = trained.path
    config = trained.config
    if data is None:
        data = trained.load_dataset()
    if data.num_classes != trained.num_classes:
        raise ConfigError(
            f"{checkpoint.name} predicts {trained.num_classes} classes but the dataset has "
            f"{data.num_classes}; evaluate on a dataset with the same classes"
        )
    if val_split is None:
        val_split = float(config["dataset"].get("val_split") or 0.0)
    chosen = select_split(data, split, val_split, seed=int(config.get("seed", 0)))
    if len(chosen) == 0:
        raise ConfigError(f"the {split} split is empty")
    if split_channels(chosen) != trained.in_channels:
        raise ConfigError(
            f"the dataset's images have {split_channels(chosen)} channels but {checkpoint.name}'s model "
            f"takes {trained.in_channels}; evaluate on a dataset like the one it was trained on"
        )
    classes = _class_names(trained, data)
    if num_workers is None:
        num_workers = int(config["dataset"].get("num_workers") or 0)
    loader = make_loader(
        chosen,
        batch_size=batch_size,
        transform=trained.transform,
        train=False,
        device=trained.device,
        num_workers=num_workers,
    )
    recorder, batches = _KeepPredictions(trained.model, hflip), _KeepLabels(loader)
    metrics = score(recorder, batches, autocast_context(trained.device, precision))
    predictions = torch.cat(recorder.predictions).cpu()
    labels = torch.cat(batches.labels).cpu()
    matrix = confusion_matrix(labels, predictions, trained.num_classes)
    per_class = per_class_accuracy(matrix, classes)
    seen = [c["accuracy"] for c in per_class if c["accuracy"] is not None]

    report_path = Path(output) if output is not None else default_output(checkpoint, f"eval_{split}.json")
    png_path = report_path.with_name(f"{report_path.stem}_confusion.png")
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        **{k: v for k, v in trained.info.items() if k in ("epoch", "global_step")},
        "split": split,
        "num_samples": len(labels),
        "loss": metrics["loss"],
        "acc1": metrics["acc1"],
        "acc5": metrics["acc5"],
        "mean_class_accuracy": sum(seen) / len(seen) if seen else None,
        "per_class": per_class,
        "classes": classes,
        "confusion_matrix": matrix.tolist(),  # rows: true class, columns: predicted class
        "report": str(report_path),
        "confusion_png": str(png_path),
        "device": str(trained.device),
        "precision": precision,
        "hflip": hflip,
    }
    save_confusion_png(
        matrix,
        classes,
        png_path,
        f"{checkpoint.name} on {split} ({len(labels)} images): acc@1 {metrics['acc1']:.2%}",
    )
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> None:
    run_job(_evaluate, cfg)


def _evaluate(cfg: DictConfig) -> None:
    require_settings(cfg)
    if not isinstance(cfg.hflip, bool):
        raise ConfigError(f"hflip={cfg.hflip!r} must be true or false")
    trained = as_trained(cfg.checkpoint, str(cfg.device))
    data = dataset_from_cfg(cfg, trained)
    val_split, num_workers, output = None, None, cfg.output
    if data is not None:
        val_split = float(cfg.dataset.get("val_split") or 0.0)
        num_workers = int(cfg.dataset.get("num_workers") or 0)
        if output is None:
            # Named after the dataset too, so it does not overwrite the report on the run's own.
            name = HydraConfig.get().runtime.choices.get("dataset")
            output = default_output(trained.path, f"eval_{name}_{cfg.split}.json")
    report = evaluate_checkpoint(
        trained,
        data,
        split=str(cfg.split),
        val_split=val_split,
        output=output,
        batch_size=int(cfg.batch_size),
        device=str(cfg.device),
        precision=str(cfg.precision),
        num_workers=num_workers,
        hflip=bool(cfg.hflip),
    )
    log.info(
        "%s on %d %s images: loss %.4f acc1 %.4f acc5 %.4f mean class acc %.4f | wrote %s, %s",
        Path(cfg.checkpoint).name, report["num_samples"], report["split"], report["loss"],
        report["acc1"], report["acc5"], report["mean_class_accuracy"], report["report"],
        report["confusion_png"],
    )  # fmt: skip


def main() -> None:
    """`python -m vitexp.evaluate [overrides]` (see conf/evaluate.yaml)."""
    run_command(_hydra_main)
