"""Datasets held in memory as uint8 tensors or streamed from image files, and batched
augmentation on the training device.

Every in-memory dataset (CIFAR-10/100 are 150 MB as uint8) is one uint8 tensor
`(N, C, H, W)` per split plus int64 labels, moved once to the training device. Batches are
cut from a shuffled index and augmented there, all samples at once, with one affine
`grid_sample` that does crop (with padding or random-resized), flip and resize to the
model's resolution in a single pass: no PIL, no worker processes, no per-image Python.
Image folders decode in DataLoader workers through the one image decoder
(`vitexp.data.images.load_image`, which `predict` and `attention` use too), then take the
same device-side path.

The names below are the public ones (and the `_target_`s of `conf/dataset/`).
"""

from vitexp.data.cifar import load_cifar10, load_cifar100
from vitexp.data.datasets import (
    DatasetNotFound,
    FileSplit,
    ImageData,
    Split,
    carve_validation,
    load_digits,
    load_fake,
)
from vitexp.data.folders import load_imagefolder
from vitexp.data.images import (
    UnreadableImage,
    crop_to_aspect,
    load_image,
    load_images,
    read_image,
    resize_image,
)
from vitexp.data.loaders import DeviceLoader, FolderLoader, make_loader
from vitexp.data.stored import build_stored_dataset
from vitexp.data.transforms import BatchTransform

__all__ = [
    "BatchTransform",
    "DatasetNotFound",
    "DeviceLoader",
    "FileSplit",
    "FolderLoader",
    "ImageData",
    "Split",
    "UnreadableImage",
    "build_stored_dataset",
    "carve_validation",
    "crop_to_aspect",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_fake",
    "load_image",
    "load_imagefolder",
    "load_images",
    "make_loader",
    "read_image",
    "resize_image",
]
