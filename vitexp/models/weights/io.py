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

__all__ = [
    "HEAD_BYTES",
    "HF_WEIGHT_FILES",
    "check_finite",
    "format_problem",
    "read_weights",
    "strip_wrappers",
    "unwrap_state_dict",
]

# Keys under which training scripts nest the model's state dict (ours uses "model").
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
# Wrappers that prefix every key: DataParallel/DistributedDataParallel and torch.compile.
_MODULE_PREFIX = "module."
_COMPILE_INFIX = "_orig_mod."
# Files a Hugging Face `save_pretrained` directory holds, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# How much of a file `format_problem` needs to see.
HEAD_BYTES = 512
# What each format starts with: a zip's local header (torch >= 1.6 and .npz; an empty zip has
# only its end record), a pickle's PROTO opcode with protocols 2-5 (torch.save before 1.6 used 2).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
_TAR_MAGIC_AT = 257  # "ustar": torch.load reads the tar archives of torch before 0.4 too


def _fits(head: bytes, suffix: str) -> bool:
    """Whether a file starting with `head` can be a weights file read by its name's `suffix`."""
    if suffix == ".npz":
        return head.startswith(_ZIP_MAGIC)
    if suffix == ".safetensors":  # an 8-byte little-endian header length, then a JSON object
        return len(head) > 8 and int.from_bytes(head[:8], "little") > 0 and head[8:9] == b"{"
    return head.startswith(_ZIP_MAGIC + _PICKLE_MAGIC) or head[_TAR_MAGIC_AT : _TAR_MAGIC_AT + 5] == b"ustar"


def _expected(suffix: str) -> str:
    if suffix == ".npz":
        return "an .npz (zip) archive"
    if suffix == ".safetensors":
        return "a safetensors file"
    return "a torch file (a zip archive or a pickle)"


def _looks_like(head: bytes, content_type: str) -> str:
    """What a file starting with `head` (served as `content_type`, if it was) is, in words."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not head:
        return "an empty file"
    if "html" in content_type or text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        return "an HTML page (a sign-in or error page?)"
    if text.startswith(b"<") or "xml" in content_type:
        return "an XML document (an error page?)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive (unpack it first)"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"data of another format (it starts with {head[:4].hex()})"
    first = decoded.strip().splitlines()[0] if decoded.strip() else ""
    if not first.isprintable():
        return f"data of another format (it starts with {head[:4].hex()})"
    return f"text ({first[:40]!r}…)"


def format_problem(head: bytes, suffix: str, content_type: str = "") -> str | None:
    """What a file that starts with `head` (its first `HEAD_BYTES`) is instead of the weights
    its name's `suffix` promises, e.g. "an HTML page (a sign-in or error page?), not a torch
    file (...)"; None when its first bytes fit. `content_type`: what a server said it sent."""
    suffix = suffix.lower()
    if _fits(head, suffix):
        return None
    return f"{_looks_like(head, content_type.lower())}, not {_expected(suffix)}"


def check_finite(state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise a DataError naming `source` and the first tensor that holds NaN or inf: such weights
    would only show up later as a loss that diverges at the first step."""
    bad = [
        key
        for key, value in state_dict.items()
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all())
    ]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"pretrained weights {source} hold NaN or inf in {bad[0]}{more}: the file is damaged or comes "
            f"from a run that diverged; point model.pretrained at other weights"
        )


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


def _format_problem_of(file: Path) -> str | None:
    try:
        with file.open("rb") as f:
            return format_problem(f.read(HEAD_BYTES), file.suffix)
    except OSError:
        return None  # the loader's own error says why the file cannot be read


def _detail(error: BaseException) -> str:
    """The line of a loader's message that says what is wrong (torch's weights-only unpickler
    puts it after a paragraph about its defaults)."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1].strip()
    return text.splitlines()[0][:120] if text else type(error).__name__


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
        problem = _format_problem_of(file)
        if problem is not None:
            raise DataError(
                f"cannot read pretrained weights {file}: it is {problem}; the file is damaged or "
                f"truncated, or is not weights: download or copy it again"
            ) from None
        reason = _refusal(error)
        if reason is not None:
            raise DataError(
                f"refused to load {file}: {reason}, and code from a weights file is never executed; "
                f"re-save only the weights, e.g. torch.save(model.state_dict(), path) or as .safetensors"
            ) from None
        detail = _detail(error)
        raise DataError(
            f"cannot read pretrained weights {file} ({type(error).__name__}: {detail}): the file is damaged "
            f"or truncated, download or copy it again"
        ) from error
    state_dict = unwrap_state_dict(obj, source=str(file))
    check_finite(state_dict, str(file))
    return state_dict
