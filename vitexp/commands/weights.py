"""Pretrained weights by name: `python -m vitexp.weights` lists them, `python -m vitexp.weights
SOURCE...` fetches each into its cache and prints the local file (to fill a cache on a machine
with a network before running where there is none).

A SOURCE is what `model.pretrained` takes: a name below (e.g. `ViT-B_16`), `hf-hub:ORG/NAME`,
an http(s) URL or a local path. Names and URLs are cached under torch hub's cache
(`$TORCH_HOME/hub/checkpoints/`); Hub repos in huggingface_hub's (`$HF_HOME/hub`).
"""

from __future__ import annotations

import argparse

from vitexp.cli import exit_on_error
from vitexp.models.weights.sources import (
    HUB_PREFIX,
    HUB_WEIGHTS,
    NAMED_WEIGHTS,
    VIT_MODELS_URL_ENV,
    cache_dir,
    named_url,
    resolve_weights,
)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def listing() -> str:
    """The named weights (name, model= config, what they were trained on, URL) and the Hub
    repos of the same checkpoints, as printed by `python -m vitexp.weights`."""
    named = [["name", "model=", "trained on", "downloaded from"]]
    named += [[e.name, e.model, e.trained, named_url(e)] for e in NAMED_WEIGHTS]
    hub = [["model.pretrained=", "model=", "trained on", "note"]]
    hub += [[HUB_PREFIX + h.repo, h.model, h.trained, h.note] for h in HUB_WEIGHTS]
    return "\n".join(
        [
            "Named weights (model.pretrained=NAME; its file name works too), original checkpoints of "
            "google-research/vision_transformer:",
            *_table(named),
            f"cached in {cache_dir() / 'vit_models'}; ${VIT_MODELS_URL_ENV} replaces the bucket (a mirror)",
            "",
            "On the Hugging Face Hub (any other hf-hub:ORG/NAME[@REVISION] of timm or transformers ViT "
            "weights works too):",
            *_table(hub),
            "",
            "Example: python -m vitexp model=vit_s16 dataset=cifar10 model.pretrained=S_16",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitexp.weights",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Without SOURCE: list the named weights and the model= config each fits.",
    )
    parser.add_argument(
        "sources", nargs="*", metavar="SOURCE", help="a name, hf-hub:ORG/NAME[@REVISION], a URL or a path"
    )
    args = parser.parse_args(argv)
    if not args.sources:
        print(listing())
        return 0
    with exit_on_error():
        for source in args.sources:
            print(f"{source}: {resolve_weights(source)}", flush=True)
    return 0
