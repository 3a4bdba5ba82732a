"""Stop at the next step boundary when the scheduler says so.

SLURM sends SIGUSR1 (with `--signal`) or SIGTERM before it kills a job; so do most cluster
schedulers and `kill`; submitit (Hydra's SLURM launcher) asks for SIGUSR2. The first such
signal only sets a flag: the training loop finishes the step in flight, writes a checkpoint
and raises `Preempted`. A second signal means the caller will not wait, so the process exits
at once (checkpoints are written atomically, so the last complete one survives).

When someone else had a handler for the signal (submitit's requeues the job), `pass_on`
delivers the signal to it once the checkpoint is written.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

SIGNALS = tuple(
    s for s in (getattr(signal, name, None) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2")) if s is not None
)

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry" — a requeue.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """The run stopped on a signal after writing `checkpoint`."""

    def __init__(self, signal_name: str, step: int, checkpoint: str, resume_command: str) -> None:
        super().__init__(
            f"stopped by {signal_name} at step {step}; checkpoint saved to {checkpoint}. "
            f"Resume with: {resume_command}"
        )
        self.checkpoint = checkpoint
        self.signal_name = signal_name


def pass_on(signal_name: str) -> None:
    """Deliver the signal to the handler that was installed before ours, when that is Python
    code (submitit's, which requeues the SLURM job); the default actions are not repeated."""
    signum = getattr(signal, signal_name, None)
    if signum is not None and callable(signal.getsignal(signum)):
        log.info("passing %s on to the handler installed before vitexp's (submitit's requeues)", signal_name)
        signal.raise_signal(signum)


class PreemptionGuard:
    """Context manager that turns SIGTERM/SIGUSR1 into a flag (`requested`) for its duration,
    restoring the previous handlers on exit. Outside the main thread (where Python cannot
    install signal handlers) it does nothing."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, signal._HANDLER] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            log.error("second signal (%s): exiting now, without a new checkpoint", name)
            logging.shutdown()
            os._exit(128 + signum)
        self.signal_name = name
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping", name)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
