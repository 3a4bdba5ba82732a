"""The one image decoder: every image file vitexp reads (image-folder training and
evaluation in DataLoader workers, `predict`, `attention`, the train-end attention grid)
becomes a uint8 tensor here, so the same file always gives the same pixels, and so the same
model input.

`read_image(path, channels)` decodes a file of any mode at its own size; `load_image(path,
channels, size)` is what the model is fed: the decoded image, its centre at the target aspect
ratio, and one resize to `size` (antialiased bilinear, the filter `BatchTransform.eval` uses),
rounded back to uint8. Images that come as bytes (a WebDataset shard's `jpg`, a Hugging Face
dataset's image column) take the same path through `decode_image` / `load_image_bytes`.

JPEGs take a fast path: `torchvision.io.decode_jpeg`, which decodes with libjpeg-turbo's
defaults (accurate integer IDCT, smooth chroma upsampling) as Pillow does, gives the same
pixels on the CPU (`tests/test_streams.py` compares them bit for bit, baseline and progressive,
4:4:4 / 4:2:2 / 4:2:0, grayscale, every EXIF orientation) at about twice the speed
(`benchmarks/decode.py`). `decode_jpegs` decodes a batch at once, on the CPU or on a CUDA
device (nvJPEG, whose pixels may differ from libjpeg-turbo's by a few levels). Anything the
fast path does not take (CMYK JPEGs, other formats, a file it rejects) goes to Pillow, which
also names a corrupt file.

Every path reads the image's size from its header first and refuses an image of more than
Pillow's `PIL.Image.MAX_IMAGE_PIXELS` pixels (89.5 Mpixel unless a program lowers or raises it)
before decoding it: the JPEG fast path from the frame header (`jpeg_size`), Pillow from what
`Image.open` reads. libjpeg prints the warnings of files it decodes anyway (an unknown JFIF
revision, extraneous bytes) straight to stderr; the fast path turns them into one warning
naming the file (`_libjpeg_messages`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from vitexp.errors import ConfigError, DataError, first_line

log = logging.getLogger(__name__)

# What PIL raises for a file that is not an image, is truncated or corrupt, or is too large.
_BROKEN = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_SHRINK = "downscale it"


class UnreadableImage(DataError):
    """An image file that exists but cannot be decoded (or is refused before decoding);
    `reason` says why in a few words, `fix` what to do."""

    def __init__(
        self, path: str | Path, reason: str, fix: str = "use a PNG, JPEG or other image file"
    ) -> None:
        super().__init__(f"image {path} cannot be read ({reason}); {fix}")
        self.path = str(path)
        self.reason = reason


def _reason(error: BaseException) -> str:
    # Pillow names bytes it cannot identify by their object's repr (<_io.BytesIO object at 0x...>),
    # which first_line leaves out: the message names the image already.
    text = first_line(error)
    return type(error).__name__ if text == type(error).__name__ else f"{type(error).__name__}: {text}"


def _check_pixels(width: int, height: int, name: str | Path) -> None:
    """UnreadableImage for an image of more than `PIL.Image.MAX_IMAGE_PIXELS` pixels (read at
    the call, so a program that changes Pillow's limit changes vitexp's)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        pixels = f"{width}×{height} = {width * height:,} pixels"
        limit_is = f"the {limit:,} of PIL.Image.MAX_IMAGE_PIXELS, the decompression-bomb limit"
        raise UnreadableImage(name, f"it is {pixels}, more than {limit_is}", _SHRINK)


# The frame headers (SOF0-SOF15 but DHT, JPG and DAC, which share their range) hold the size.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) of a JPEG from its frame header, stepping over the segments before it
    by their lengths (nothing is decoded); None when `data` is not a JPEG whose header can be
    read so (the decoder then decides)."""
    if bytes(data[:3]) != b"\xff\xd8\xff":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in (0xD9, 0xDA):  # the end, or a scan, before any frame header
            return None
        elif marker in _SOF:
            if i + 9 > n:
                return None
            return (data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6]
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def _check_jpeg(data: bytes | memoryview, name: str | Path) -> None:
    size = jpeg_size(data)
    if size is not None:
        _check_pixels(*size, name)


_scratch: dict[int, IO[bytes]] = {}  # per process: a forked worker must not share its parent's
_told: set[str] = set()  # images whose libjpeg warning this process has logged


@contextlib.contextmanager
def _libjpeg_messages(name: str | Path) -> Iterator[None]:
    """libjpeg prints the warnings of a file it decodes anyway ("unknown JFIF revision number",
    "Corrupt JPEG data: 2 extraneous bytes") to the process's stderr, and torchvision gives no
    way to route them: while the fast path decodes, file descriptor 2 points at a scratch file,
    and what lands there becomes one warning naming the image (once per image and process)."""
    pid = os.getpid()
    if pid not in _scratch:
        _scratch[pid] = tempfile.TemporaryFile()  # noqa: SIM115 (kept open while the process lives)
    fd = _scratch[pid].fileno()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to redirect (a closed descriptor)
        yield
        return
    os.dup2(fd, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        written = os.lseek(fd, 0, os.SEEK_CUR)
        if written:
            os.lseek(fd, 0, os.SEEK_SET)
            said = os.read(fd, min(written, 4096)).decode("utf-8", "replace").strip()
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            if str(name) not in _told:
                _told.add(str(name))
                log.warning("image %s: libjpeg: %s", name, " ".join(said.split()))


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent images onto white, as an image viewer shows them: the alpha
    channel alone says nothing about the colour of a transparent pixel. Covers alpha modes,
    palettes with transparent entries and the colour key of RGB/L images (PNG tRNS)."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
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
    else:  # "I": 32-bit integers, which is how PIL opens some 16-bit PNGs and TIFFs
        top = 65535.0 if arr.max(initial=0.0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ConfigError(
            f"the model takes {channels}-channel input; only 1- or 3-channel images can be read"
        )


def _decode_pil(source: IO[bytes], name: str | Path, channels: int) -> Tensor:
    """The pixels of an image file (or its bytes) by Pillow, or UnreadableImage."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; vitexp refuses
            # above it (`_check_pixels`), before decoding, with one line.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
        with opened:
            _check_pixels(*opened.size, name)
            opened.load()
            # Photos are often stored sideways with an EXIF tag saying how to turn them.
            img = ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError as e:
        raise UnreadableImage(name, _reason(e), _SHRINK) from e
    except _BROKEN as e:
        raise UnreadableImage(name, _reason(e)) from e
    img = _flatten_alpha(_high_depth_to_8bit(img))
    try:
        # Palette, CMYK, YCbCr, LAB, bilevel: through RGB, so that a 1-channel model sees the
        # same luma whatever mode the file was saved in.
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        img = img.convert("RGB" if channels == 3 else "L")
    except ValueError as e:  # PIL: "conversion from X to RGB not supported"
        raise UnreadableImage(name, f"its mode {img.mode} cannot be converted: {_reason(e)}") from e
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


def is_jpeg(data: bytes | Tensor) -> bool:
    """Whether `data` starts like a JPEG file (SOI marker then another marker)."""
    head = bytes(data[:3].tolist()) if isinstance(data, Tensor) else bytes(data[:3])
    return head == b"\xff\xd8\xff"


def _to_channels(image: Tensor, channels: int) -> Tensor | None:
    """A decoded 1- or 3-channel image in the model's channels, as Pillow converts: gray to RGB
    by copying, RGB to gray by ITU-R 601-2 luma in Pillow's fixed-point arithmetic. None for
    other channel counts (CMYK), which Pillow converts instead."""
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1 and channels == 3:
        return image.expand(3, -1, -1).contiguous()
    if image.shape[0] == 3 and channels == 1:
        r, g, b = image.to(torch.int32).unbind(0)
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[None]
    return None


def _jpeg_fast(data: Tensor, channels: int, name: str | Path) -> Tensor | None:
    """`decode_jpeg` of one JPEG on the CPU, or None when it must go to Pillow."""
    try:
        from torchvision.io import decode_jpeg
    except ImportError:  # a torchvision without its image decoders (deprecated since 0.29)
        return None
    try:
        with _libjpeg_messages(name):
            image = decode_jpeg(data, apply_exif_orientation=True)
    except RuntimeError:  # libjpeg's refusal (truncated, corrupt, 12-bit): Pillow names it
        return None
    return _to_channels(image, channels)


def _as_tensor(data: bytes | bytearray | memoryview) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_image(data: bytes, channels: int, name: str | Path) -> Tensor:
    """An encoded image (the bytes of any image file) as a uint8 tensor (channels, H, W), at
    its own size: `read_image` for bytes. `name` says where the bytes came from (a shard and
    its sample key, a dataset row) in the UnreadableImage raised for bytes that cannot be
    decoded."""
    _check_channels(channels)
    if is_jpeg(data):
        _check_jpeg(data, name)
        image = _jpeg_fast(_as_tensor(data), channels, name)
        if image is not None:
            return image
    return _decode_pil(io.BytesIO(data), name, channels)


def _fits(data: Tensor) -> bool:
    """Whether an encoded JPEG's header allows decoding it (`_check_pixels`)."""
    try:
        _check_jpeg(data.cpu().numpy().data, "")
    except UnreadableImage:
        return False
    return True


def _decode_one(data: Tensor, device: torch.device | str, name: str) -> Tensor | None:
    from torchvision.io import decode_jpeg

    try:
        with _libjpeg_messages(name) if torch.device(device).type == "cpu" else contextlib.nullcontext():
            return decode_jpeg(data, device=device, apply_exif_orientation=True)
    except RuntimeError:
        return None


def decode_jpegs(
    datas: Sequence[Tensor],
    channels: int,
    device: torch.device | str = "cpu",
    names: Sequence[str] | None = None,
) -> list[Tensor | None]:
    """A batch of encoded JPEGs (uint8 tensors of their bytes) decoded by one
    `torchvision.io.decode_jpeg` call on `device` (nvJPEG on a CUDA device), with their EXIF
    orientation applied. An entry the batch call cannot take (CMYK, a file it rejects, or one
    whose header declares more than `PIL.Image.MAX_IMAGE_PIXELS` pixels) is None: decode it
    with `decode_image`, which goes to Pillow (or refuses it, naming it). `names` name the
    images in libjpeg's warnings."""
    from torchvision.io import decode_jpeg

    _check_channels(channels)
    names = list(names) if names is not None else [f"item {i} of a batch" for i in range(len(datas))]
    images: list[Tensor | None] = [None] * len(datas)
    todo = [i for i, data in enumerate(datas) if _fits(data)]
    if not todo:
        return images
    if torch.device(device).type == "cuda":
        try:
            decoded = decode_jpeg([datas[i] for i in todo], device=device, apply_exif_orientation=True)
            for i, image in zip(todo, decoded, strict=True):
                images[i] = image
            todo = []
        except RuntimeError:  # one bad file fails the whole call: decode one by one
            pass
    for i in todo:  # on the CPU, torchvision decodes one by one anyway
        images[i] = _decode_one(datas[i], device, names[i])
    return [None if image is None else _to_channels(image, channels) for image in images]


def read_image(path: str | Path, channels: int) -> Tensor:
    """An image file of any size and mode as a uint8 tensor (channels, H, W), at its own size.

    Grayscale, palette, 16-bit and float grayscale (scaled, not clipped) and CMYK images are
    converted; transparent ones are put on white; the EXIF orientation of photos is applied.
    `channels` is 1 (L) or 3 (RGB). A path that does not exist is a ConfigError (the argument
    is wrong); a file that cannot be decoded is an UnreadableImage (a DataError) naming it.
    """
    _check_channels(channels)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image {path} does not exist; check the path")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UnreadableImage(path, _reason(e)) from e
    return decode_image(data, channels, path)


def crop_to_aspect(image: Tensor, size: Sequence[int]) -> Tensor:
    """The centre of a (C, H, W) image at the aspect ratio of `size` (H, W), so that the
    resize to the model's input keeps shapes undistorted (shorter side fitted, centre
    cropped). Images of the target aspect ratio pass unchanged."""
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


def resize_image(image: Tensor, size: Sequence[int]) -> Tensor:
    """A uint8 (C, H, W) image resized to `size` (H, W): antialiased bilinear in float32 (the
    filter of `BatchTransform.eval`), rounded half to even and clamped back to uint8. An
    image already at `size` is returned as it is."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def load_image(path: str | Path, channels: int, size: Sequence[int]) -> Tensor:
    """What vitexp feeds a model from an image file: a uint8 tensor (channels, *size).

    `read_image`, then `crop_to_aspect` to the aspect ratio of `size`, then `resize_image` to
    `size`. Training and evaluation on image folders, `predict` and `attention` all read files
    through this one function, so a file gives the same model input everywhere."""
    return fit_image(read_image(path, channels), size)


def fit_image(image: Tensor, size: Sequence[int]) -> Tensor:
    """A decoded uint8 (C, H, W) image as the model is fed it: `crop_to_aspect`, then
    `resize_image` to `size` (H, W)."""
    return resize_image(crop_to_aspect(image, size), size)


def load_image_bytes(data: bytes, channels: int, size: Sequence[int], name: str | Path) -> Tensor:
    """`load_image` for an encoded image held as bytes: `decode_image`, then `fit_image`."""
    return fit_image(decode_image(data, channels, name), size)


class Encoded(NamedTuple):
    """A JPEG a loader worker read but left encoded, for the training process to decode on its
    device (`decode_deferred`); `where` names it in messages."""

    data: Tensor  # uint8, the file's bytes
    where: str


def defer_or_load(data: bytes, channels: int, size: Sequence[int], where: str) -> Tensor | Encoded:
    """A JPEG left encoded (`Encoded`), anything else decoded now by `load_image_bytes`. A JPEG
    whose header declares too many pixels is refused here (UnreadableImage), in the worker."""
    if is_jpeg(data):
        _check_jpeg(data, where)
        return Encoded(_as_tensor(data), where)
    return load_image_bytes(data, channels, size, where)


def decode_deferred(
    items: Sequence[Tensor | Encoded], channels: int, size: Sequence[int], device: torch.device
) -> tuple[list[Tensor | None], list[tuple[str, str]]]:
    """Finish a batch on `device`: its `Encoded` JPEGs by one `decode_jpegs` call there (nvJPEG
    on a CUDA device) and `fit_image`, the decoded items moved as they are. Returns the images
    (None where one cannot be read: Pillow decides, and names it) and the failures (where, why)."""
    encoded = [item for item in items if isinstance(item, Encoded)]
    decoded = iter(
        decode_jpegs([item.data for item in encoded], channels, device, [item.where for item in encoded])
    )
    out: list[Tensor | None] = []
    failures: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, Encoded):
            out.append(item.to(device))
            continue
        image = next(decoded)
        if image is None:  # CMYK, or a file nvJPEG/libjpeg rejects: Pillow on the CPU
            try:
                image = decode_image(bytes(item.data.cpu().numpy()), channels, item.where).to(device)
            except UnreadableImage as e:
                failures.append((item.where, e.reason))
                out.append(None)
                continue
        out.append(fit_image(image, size))
    return out, failures


def load_images(paths: Iterable[str | Path], channels: int, size: Sequence[int]) -> Tensor:
    """`load_image` of every path, as one uint8 batch (N, channels, *size)."""
    images = [load_image(path, channels, size) for path in paths]
    if not images:
        return torch.empty((0, channels, int(size[0]), int(size[1])), dtype=torch.uint8)
    return torch.stack(images)
