"""JPEG decoding throughput: Pillow against `torchvision.io.decode_jpeg` (the fast path of
vitexp's one decoder, `vitexp.data.images`), in 1, 2 and 4 worker processes, measured side by
side in one run.

    python benchmarks/decode.py                          # JPEGs made from the CIFAR-10 subset at 224 px
    python benchmarks/decode.py --folder /data/imagenet/val --limit 2000
    python benchmarks/decode.py --quick

The images are real: the CIFAR subset beside the repository resized to 224×224 (bicubic) and
saved as JPEG (quality 90, 4:2:0), or the JPEG files of any folder given. Each worker process
holds the encoded bytes and decodes its share of them to uint8 RGB tensors, with one torch
thread (as a DataLoader worker); a repeat is one pass over all images by every worker. The
candidates: `pil` (Pillow's decoder, as vitexp used for every file before the fast path:
`Image.open`, EXIF transpose, convert to RGB, to a tensor), `torchvision` (`decode_image`:
`decode_jpeg` with its EXIF orientation, the same pixels) and `torchvision-batch` (one
`decode_jpegs` call per 64 images). Both decoders go through libjpeg-turbo; what differs is the
work around it (Pillow's image objects and mode conversion, the copy to numpy and to a tensor).
Candidates and worker counts are timed in turns (benchmarks/common.py), so read the ratios.
"""

from __future__ import annotations

import io
import multiprocessing
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (
    DEFAULT_CIFAR_ROOT,
    finish,
    interleaved,
    machine,
    median,
    parser,
    setup,
    spread,
    table,
)

_JPEGS: list[bytes] = []


def cifar_jpegs(root: Path, count: int, size: int = 224) -> list[bytes]:
    from PIL import Image

    from vitexp.data import load_cifar10

    images = load_cifar10(root, download=False).train.images[:count]
    out = []
    for x in images:
        img = Image.fromarray(x.permute(1, 2, 0).numpy()).resize((size, size), Image.BICUBIC)
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def folder_jpegs(folder: Path, limit: int) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())
    if not paths:
        raise SystemExit(f"--folder {folder}: no .jpg/.jpeg files found")
    return [p.read_bytes() for p in paths[:limit]]


def _init(jpegs: list[bytes]) -> None:
    global _JPEGS
    _JPEGS = jpegs
    torch.set_num_threads(1)


def _decode(args: tuple[str, int, int]) -> int:
    """Decode images [start, stop) with `method`; returns how many pixels came out (so the
    work cannot be skipped)."""
    from vitexp.data.images import _decode_pil, decode_image, decode_jpegs

    method, start, stop = args
    total = 0
    if method == "torchvision-batch":
        for lo in range(start, stop, 64):
            chunk = [
                torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in _JPEGS[lo : min(stop, lo + 64)]
            ]
            total += sum(int(img.numel()) for img in decode_jpegs(chunk, 3) if img is not None)
        return total
    for data in _JPEGS[start:stop]:
        if method == "pil":
            image = _decode_pil(io.BytesIO(data), "benchmark", 3)
        else:
            image = decode_image(data, 3, "benchmark")
        total += int(image.numel())
    return total


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=DEFAULT_CIFAR_ROOT, help="the CIFAR-10 subset's folder")
    p.add_argument("--folder", type=Path, default=None, help="decode this folder's JPEGs instead")
    p.add_argument("--limit", type=int, default=1024, help="images to decode per pass (default 1024)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = setup("cpu", args.threads)
    limit, repeats = (128, 2) if args.quick else (args.limit, args.repeats)
    jpegs = folder_jpegs(args.folder, limit) if args.folder else cifar_jpegs(args.root, limit)
    source = str(args.folder) if args.folder else f"CIFAR-10 subset at 224 px ({args.root})"
    context = multiprocessing.get_context("fork")
    pools = {w: context.Pool(w, initializer=_init, initargs=(jpegs,)) for w in args.workers}
    methods = ("pil", "torchvision", "torchvision-batch")

    def candidate(method: str, workers: int) -> Any:
        n = len(jpegs)
        shares = [(method, n * i // workers, n * (i + 1) // workers) for i in range(workers)]
        return lambda: pools[workers].map(_decode, shares)

    try:
        candidates = {f"{m}/{w}": candidate(m, w) for w in args.workers for m in methods}
        times = interleaved(candidates, repeats=repeats, warmup=1, device=device)
    finally:
        for pool in pools.values():
            pool.close()
            pool.join()
    rows, results = [], {}
    for w in args.workers:
        base = len(jpegs) / median(times[f"pil/{w}"])
        for m in methods:
            rate = len(jpegs) / median(times[f"{m}/{w}"])
            results[f"{m}/{w}"] = {"images_per_s": rate, "spread": spread(times[f"{m}/{w}"])}
            rows.append([w, m, f"{rate:,.0f}", f"±{spread(times[f'{m}/{w}']):.0%}", f"{rate / base:.2f}"])
    print(f"JPEG decoding of {len(jpegs)} images ({source}), {repeats} repeats, median per candidate:\n")
    print(table(["workers", "decoder", "images/s", "spread", "vs pil"], rows))
    finish(
        {"machine": machine(device), "images": len(jpegs), "source": source, "results": results}, args.json
    )


if __name__ == "__main__":
    main()
