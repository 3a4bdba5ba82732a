"""What training measures: `score`, loss and accuracy over exactly the samples of a loader, and the
training loss kept on the device between two log points."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitexp.training import distributed


def logits_of(model: nn.Module, x: Tensor, hflip: bool = False) -> Tensor:
    """The model's fp32 logits for `x`; with `hflip`, the mean of the logits of each image and
    of its mirror image (left-right: test-time flip averaging, a second forward pass)."""
    logits = model(x).float()
    if hflip:
        logits = (logits + model(x.flip(-1)).float()) / 2
    return logits


@torch.no_grad()
def score(
    model: nn.Module,
    loader: Any,
    autocast: contextlib.AbstractContextManager,
    world: distributed.World = distributed.SINGLE_PROCESS,
    *,
    hflip: bool = False,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over exactly the samples of `loader`: sums over
    samples divided by the sample count, so a short last batch weighs what it holds. With
    data-parallel ranks each scores its shard and the sums are added over the ranks.

    `hflip`: test-time augmentation, the mean of the logits of each image and of its mirror
    image (left-right), which costs a second forward pass."""
    model.eval()
    loss_sum = torch.zeros((), device=loader.device, dtype=torch.float64)
    correct1 = torch.zeros((), device=loader.device, dtype=torch.long)
    correct5 = torch.zeros((), device=loader.device, dtype=torch.long)
    count = torch.zeros((), device=loader.device, dtype=torch.long)
    for x, y in loader:
        with autocast:
            logits = logits_of(model, x, hflip)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum()
        correct5 += (top == y[:, None]).any(dim=1).sum()
        count += len(y)
    for total in (loss_sum, correct1, correct5, count):
        distributed.sum_(total, world)
    n = count.item()
    return {"loss": loss_sum.item() / n, "acc1": correct1.item() / n, "acc5": correct5.item() / n}


class LossWindow:
    """Training losses summed on the device between two log points (no host sync per step),
    with a device-side record of the first non-finite step. Data-parallel ranks sum their
    windows at each read, so every rank reports (and acts on) the global figures."""

    def __init__(self, device: torch.device, world: distributed.World = distributed.SINGLE_PROCESS) -> None:
        self.world = world
        self.loss = torch.zeros((), device=device)
        self.steps = torch.zeros((), device=device, dtype=torch.long)
        self.epoch_loss = torch.zeros((), device=device)
        self.epoch_steps = 0
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.started = time.time()
        self.count = 0

    def add(self, loss: Tensor, finite: Tensor, step: int) -> None:
        self.loss += torch.where(finite, loss, 0.0)
        self.steps += finite.long()
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, step, self.first_bad)
        self.count += 1

    def first_nonfinite_step(self) -> int | None:
        """The first step with a non-finite loss on any rank (collective: every rank calls it)."""
        bad = self.first_bad.clone()
        if self.world.distributed:  # the earliest over the ranks; -1 (none) must not win
            bad = torch.where(bad < 0, torch.iinfo(torch.long).max, bad)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
            bad = torch.where(bad == torch.iinfo(torch.long).max, -1, bad)
        step = int(bad.item())
        return step if step >= 0 else None

    def flush(self) -> tuple[float | None, int, float]:
        """(mean loss of the finite steps, or None when every step was skipped as non-finite;
        steps; seconds) since the last flush; then reset. Collective when data-parallel: the
        loss is the mean over all ranks' samples."""
        distributed.sum_(self.loss, self.world)
        distributed.sum_(self.steps, self.world)
        steps, total = int(self.steps.item()), float(self.loss.item())
        seconds = max(time.time() - self.started, 1e-9)
        self.epoch_loss += self.loss
        self.epoch_steps += steps
        # Per-rank sums of per-rank means: steps counts rank-steps, so total / steps is the
        # mean over global batches.
        count = self.count
        self.loss.zero_()
        self.steps.zero_()
        self.started, self.count = time.time(), 0
        return (total / steps if steps else None), count, seconds

    def end_epoch(self) -> float:
        mean = float(self.epoch_loss.item()) / max(1, self.epoch_steps)
        self.epoch_loss.zero_()
        self.epoch_steps = 0
        return mean
