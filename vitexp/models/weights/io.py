"""Reading weights files without running code from them.

`.npz` through numpy with `allow_pickle=False`, `.safetensors` through safetensors, anything else
through `torch.load(weights_only=True)`; a Hugging Face `save_pretrained` directory through its
weights file. What comes back is a flat name → tensor dict: a training checkpoint is unwrapped to
the weights under `model` (or `state_dict`), and the `module.` / `_orig_mod.` prefixes that
DataParallel/DDP and torch.compile add are stripped. A file that is missing, damaged, truncated,
carries code or holds no state dict raises a one-line DataError naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitexp.errors import DataError
from vitexp.models.weights.keys import first_keys

__all__ = ["HF_WEIGHT_FILES", "read_weights", "strip_wrappers", "unwrap_state_dict"]

# Keys under which training scripts nest the model's state dict (ours uses "model").
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
# Wrappers that prefix every key: DataParallel/DistributedDataParallel and torch.compile.
_MODULE_PREFIX = "module."
_COMPILE_INFIX = "_orig_mod."
# Files a Hugging Face `save_pretrained` directory holds, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def strip_wrappers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the key prefixes that DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`,
    also in the middle of a key when only a submodule was compiled) add."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.replace(_COMPILE_INFIX, "")
        while key.startswith(_MODULE_PREFIX):
            key = key[len(_MODULE_PREFIX) :]
        out[key] = value
    return out


def unwrap_state_dict(obj: Any, source: str = "the state dict") -> dict[str, Tensor]:
    """The flat name → tensor mapping inside `obj`: a bare state dict or a training checkpoint
    that nests it under `model` (or `state_dict`), with wrapper prefixes stripped. Anything else
    raises DataError naming `source`."""
    while isinstance(obj, Mapping) and not all(isinstance(value, Tensor) for value in obj.values()):
        nested = next((obj[key] for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        found = type(obj).__name__ if not isinstance(obj, Mapping) else f"a dict with keys {first_keys(obj)}"
        raise DataError(
            f"{source} holds no state dict ({found}): point model.pretrained at a file of model weights "
            f"(a state dict, or a training checkpoint with the weights under 'model')"
        )
    return strip_wrappers(obj)


def _weights_in_directory(directory: Path) -> Path:
    """The weights file of a Hugging Face `save_pretrained` directory."""
    for name in HF_WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"pretrained weights directory {directory} holds neither {' nor '.join(HF_WEIGHT_FILES)}: "
        f"set model.pretrained to the weights file itself"
    )


def _read_npz(file: Path) -> dict[str, Tensor]:
    with np.load(file, allow_pickle=False) as arrays:
        return {key: torch.from_numpy(np.array(arrays[key])) for key in arrays.files}


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file), device="cpu")


# What torch's weights-only unpickler says when a pickle asks for a function or class; garbage
# bytes fail it too, with other messages ("Unsupported operand ...").
_CODE_REQUEST = re.compile(r"GLOBAL (\S+)|allowlisted|unrecognized function")


def _refusal(error: BaseException) -> str | None:
    """Why a loader refused to run code from the file, or None when the error is not a refusal."""
    text = str(error)
    if "Weights only load failed" in text:
        request = _CODE_REQUEST.search(text.split("WeightsUnpickler error:", 1)[-1])
        if request is None:
            return None
        return (
            f"unpickling it would call {request.group(1)}"
            if request.group(1)
            else "it pickles Python objects"
        )
    if "allow_pickle" in text:
        return "it holds pickled Python objects"
    return None


def _load(file: Path) -> Any:
    suffix = file.suffix.lower()
    if suffix == ".npz":
        return _read_npz(file)
    if suffix == ".safetensors":
        return _read_safetensors(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def read_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a weights file (or a `save_pretrained` directory) into a flat name → tensor dict
    without running code from it; see the module's docstring. Raises DataError naming the file."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = _weights_in_directory(file)
    if not file.is_file():
        raise DataError(
            f"pretrained weights file {file} does not exist: set model.pretrained to an existing "
            f".npz, .safetensors, .pth or .bin file"
        )
    try:
        obj = _load(file)
    # The loaders raise a zoo of types for damaged files (OSError, RuntimeError, EOFError,
    # KeyError, zipfile.BadZipFile, SafetensorError...); any failure to parse means the file is
    # unusable, and the refusals are told apart by their message.
    except Exception as error:
        reason = _refusal(error)
        if reason is not None:
            raise DataError(
                f"refused to load {file}: {reason}, and code from a weights file is never executed; "
                f"re-save only the weights, e.g. torch.save(model.state_dict(), path) or as .safetensors"
            ) from None
        detail = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise DataError(
            f"cannot read pretrained weights {file} ({type(error).__name__}: {detail}): the file is damaged "
            f"or truncated, download or copy it again"
        ) from error
    return unwrap_state_dict(obj, source=str(file))
