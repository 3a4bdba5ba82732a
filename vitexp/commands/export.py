"""Export a trained checkpoint's model for inference outside vitexp: ONNX or TorchScript.

    python -m vitexp.export checkpoint=PATH format=onnx
    python -m vitexp.export checkpoint=PATH format=torchscript

The exported model takes normalised images `(batch, channels, img_size, img_size)` (input
`images`, any batch size) and returns logits `(batch, num_classes)` (output `logits`). How to
prepare its inputs (image size, mean, std) and the class names travel inside the file as
JSON under the key `vitexp`: ONNX metadata (`onnxruntime`: `session.get_modelmeta()
.custom_metadata_map["vitexp"]`), a TorchScript extra file (`torch.jit.load(path,
_extra_files={"vitexp": ""})`). After writing, the file is run on batches of 1 and 3 images
and compared with PyTorch (max difference 1e-4); for ONNX this needs `onnxruntime`.

ONNX uses PyTorch's `torch.export`-based exporter, which needs the `onnxscript` package.
TorchScript is deprecated by PyTorch (2.x warns on every use); it stays available for
consumers that still load it (libtorch, older serving stacks).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from vitexp.cli import require_settings, run_command, run_job
from vitexp.config import conf_dir
from vitexp.errors import ConfigError
from vitexp.inference import TrainedModel, load_trained

log = logging.getLogger("vitexp.export")

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
# Protobuf files cannot exceed 2 GB: larger models (ViT-H) keep weights in a .data file beside.
ONNX_SINGLE_FILE_LIMIT = 1_800_000_000


class ExportMismatchError(RuntimeError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance."""


def export_metadata(trained: TrainedModel) -> dict[str, Any]:
    """What a consumer of the exported file needs to feed it and read its output."""
    return {
        "input": "images",
        "output": "logits",
        "input_shape": ["batch", trained.in_channels, *trained.img_size],
        "mean": trained.inputs["mean"],
        "std": trained.inputs["std"],
        "interpolation": trained.inputs["interpolation"],
        "pixel_scale": "divide 0..255 pixels by 255, then subtract mean and divide by std per channel",
        "classes": trained.classes,
        "checkpoint": str(trained.path),
        **{k: v for k, v in trained.info.items() if k in ("epoch", "global_step")},
    }


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The ONNX exporter's optimiser logs every rewrite at INFO; show only its warnings."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export_onnx(model: torch.nn.Module, example: Tensor, path: Path, meta: str, opset: int | None) -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"format=onnx needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)}"
        )
    with _quiet("onnxscript", "onnx_ir", "torch.onnx"):
        program = torch.onnx.export(
            model,
            (example,),
            None,
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns one; None is the TorchScript exporter's
    program.model.metadata_props["vitexp"] = meta
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(str(path), external_data=size > ONNX_SINGLE_FILE_LIMIT)


def _export_torchscript(model: torch.nn.Module, example: Tensor, path: Path, meta: str) -> None:
    with warnings.catch_warnings():
        # Tracing records the shape check of the input as a constant, which is what we want,
        # and PyTorch warns that TorchScript is deprecated: the user asked for it.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"vitexp": meta})


def _runner(fmt: str, path: Path) -> Callable[[Tensor], Tensor] | None:
    """The exported file loaded for a check, or None when its runtime is not installed."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.")
            loaded = torch.jit.load(str(path), map_location="cpu")
        return lambda x: loaded(x)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def check_export(
    trained: TrainedModel, fmt: str, path: Path, atol: float = 1e-4, batch_sizes: tuple[int, ...] = (1, 3)
) -> float | None:
    """Run the exported file on image batches of several sizes (the batch is dynamic) and
    return the largest absolute difference from PyTorch's logits; None when the runtime to
    run it is missing. Raises ExportMismatchError above `atol`."""
    run = _runner(fmt, path)
    if run is None:
        return None
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in batch_sizes:
        images = torch.randint(
            0,
            256,
            (batch, trained.in_channels, *trained.img_size),
            dtype=torch.uint8,
            generator=generator,
        )
        x = trained.transform.eval(images)
        with torch.no_grad():
            expected = trained.model(x).float()
        got = run(x).float()
        if got.shape != expected.shape:
            raise ExportMismatchError(
                f"{path}: output shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
            )
        worst = max(worst, (got - expected).abs().max().item())
    if worst > atol:
        raise ExportMismatchError(f"{path}: logits differ from PyTorch's by up to {worst:.2e} (> {atol:g})")
    return worst


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str = "onnx",
    output: str | Path | None = None,
    *,
    opset: int | None = None,
    verify: bool = True,
) -> Path:
    """Export the model of `checkpoint` as `fmt` (onnx or torchscript) to `output` (default:
    next to the checkpoint, `<stem>.onnx` / `<stem>.torchscript.pt`); returns the path.
    With `verify`, the written file is checked against PyTorch (see `check_export`)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint)
    # On the CPU and in fp32: a portable graph whatever device trained the model.
    trained = load_trained(checkpoint, "cpu")
    path = Path(output) if output is not None else checkpoint.with_suffix(FORMATS[fmt])
    path.parent.mkdir(parents=True, exist_ok=True)
    # Batch 2 for tracing: a batch of 1 could be specialised into the graph as a constant.
    example = trained.transform.eval(
        torch.randint(0, 256, (2, trained.in_channels, *trained.img_size), dtype=torch.uint8)
    )
    meta = json.dumps(export_metadata(trained))
    if fmt == "onnx":
        _export_onnx(trained.model, example, path, meta, opset)
    else:
        _export_torchscript(trained.model, example, path, meta)
    if verify:
        worst = check_export(trained, fmt, path)
        if worst is None:
            log.warning("onnxruntime is not installed: %s was not checked (pip install onnxruntime)", path)
        else:
            log.info("checked %s against PyTorch: max logit difference %.1e", path.name, worst)
    return path


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    run_job(_export, cfg)


def _export(cfg: DictConfig) -> None:
    require_settings(cfg)
    path = export_checkpoint(
        cfg.checkpoint,
        str(cfg.format),
        cfg.output,
        opset=None if cfg.opset is None else int(cfg.opset),
        verify=bool(cfg.verify),
    )
    log.info("wrote %s", path)


def main() -> None:
    """`python -m vitexp.export [overrides]` (see conf/export.yaml)."""
    run_command(_hydra_main)
