"""Training: build what a config names once, then run the loop (`train`)."""

from vitexp.training.loop import train

__all__ = ["train"]
