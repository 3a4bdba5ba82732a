"""Training: build what a config names once, then run the loop (`train`).

`train` (and with it the loop, the models, the data code) is imported on first use, not with
the package: a module that needs one light part of it (`preemption`, `distributed`) does not
load the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitexp.training.loop import train

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from vitexp.training.loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
