"""Datasets held in memory as uint8 tensors or streamed from image files, and batched
augmentation on the training device.

Every in-memory dataset (CIFAR-10/100 are 150 MB as uint8) is one uint8 tensor
`(N, C, H, W)` per split plus int64 labels, moved once to the training device. Batches are
cut from a shuffled index and augmented there, all samples at once, with one affine
`grid_sample` that does crop (with padding or random-resized), flip and resize to the
model's resolution in a single pass: no PIL, no worker processes, no per-image Python.
Image folders decode in DataLoader workers through the one image decoder
(`vitexp.data.images.load_image`, which `predict` and `attention` use too), then take the
same device-side path. Hugging Face datasets (`load_hf`) are held in memory when they fit and
read by index or streamed otherwise; WebDataset shards (`load_wds`) are streamed, planned over
ranks and workers so that every sample of an epoch is read once (`vitexp.data.streams`).

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
from vitexp.data.hf import HFSplit, load_hf
from vitexp.data.images import (
    UnreadableImage,
    crop_to_aspect,
    decode_image,
    decode_jpegs,
    load_image,
    load_image_bytes,
    load_images,
    read_image,
    resize_image,
)
from vitexp.data.loaders import DeviceLoader, FolderLoader, StreamLoader, make_loader
from vitexp.data.stored import build_stored_dataset
from vitexp.data.streams import Shard, StreamSplit
from vitexp.data.transforms import BatchTransform
from vitexp.data.wds import load_wds

__all__ = [
    "BatchTransform",
    "DatasetNotFound",
    "DeviceLoader",
    "FileSplit",
    "FolderLoader",
    "HFSplit",
    "ImageData",
    "Shard",
    "Split",
    "StreamLoader",
    "StreamSplit",
    "UnreadableImage",
    "build_stored_dataset",
    "carve_validation",
    "crop_to_aspect",
    "decode_image",
    "decode_jpegs",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_fake",
    "load_hf",
    "load_image",
    "load_image_bytes",
    "load_imagefolder",
    "load_images",
    "load_wds",
    "make_loader",
    "read_image",
    "resize_image",
]
