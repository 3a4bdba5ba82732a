"""`python -m tests.signal_at_step STEP SIGNAL [overrides]`: `python -m vitexp [overrides]`
whose process sends itself SIGNAL (KILL, TERM, ...) while it computes the loss of training
step STEP (1-based), through the loop's `loss_fn` seam (tests.helpers.SignalAtStep).

The run is interrupted at a known step instead of whenever a test polling its metrics.jsonl
notices the step, so the tests that kill a run are deterministic and wait for no file.
Everything else is the command's: the check of the command line, Hydra's job and run dir,
the error handler, the exit status and the "Resume with:" line.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from omegaconf import DictConfig

from tests.helpers import SignalAtStep


def main() -> None:
    import vitexp.__main__ as command
    import vitexp.training

    step, name, *overrides = sys.argv[1:]
    train = vitexp.training.train  # the command looks it up when it runs the job

    def train_signalled(cfg: DictConfig, *args: Any, **kwargs: Any) -> float:
        loss = SignalAtStep(int(step), signal.Signals[f"SIG{name}"], cfg.trainer.label_smoothing)
        return train(cfg, *args, loss_fn=loss, **kwargs)

    vitexp.training.train = train_signalled
    sys.argv = [command.__file__, *overrides]
    command.main()


if __name__ == "__main__":
    main()
