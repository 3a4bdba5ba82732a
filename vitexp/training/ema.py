"""An exponential moving average of the weights (Polyak averaging, as timm's ModelEma).

The same arithmetic as torch's `AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
use_buffers=True)` — the first update copies the weights, every later one is
`ema += (1 - decay) * (weights - ema)` by one `_foreach_lerp_` per device and dtype — but the
update count is a Python int: `AveragedModel` keeps it in a CPU tensor and copies it to the
device on every update, a blocking transfer (a host-device sync per step on a GPU).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn


class Ema:
    """EMA of `model`'s parameters and buffers; `module` is the averaged copy to evaluate."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = float(decay)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.updates == 0:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)
        else:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
            for a, c in zip(averaged, current, strict=True):
                pair = groups.setdefault((a.device, a.dtype), ([], []))
                pair[0].append(a)
                pair[1].append(c)
            for (_, dtype), (avg, cur) in groups.items():
                if dtype.is_floating_point or dtype.is_complex:
                    torch._foreach_lerp_(avg, cur, 1 - self.decay)
                else:  # integer buffers (BatchNorm's batch count): as AveragedModel, truncated
                    for a, c in zip(avg, cur, strict=True):
                        a.copy_(a * self.decay + c * (1 - self.decay))
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
