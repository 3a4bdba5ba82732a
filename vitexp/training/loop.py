"""The training loop, read top to bottom like nanoGPT's and torchtitan's `train()`:

train(cfg, ctx)  check the settings; settle the run directory (`Checkpoints`); build once
                 (`setup.build`); restore the `TrainState`; fit; figures and summary.json
Loop.fit         while step < total: a new epoch draws its order; every step sets the
                 learning rate, runs `train_step`, and hands logging, checkpointing and
                 stopping to named decisions; every epoch ends with evaluation and last.pt
train_step       one optimizer step: micro-batches (no DDP sync until the last), clip,
                 step, zero the gradients, update the EMA
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm import tqdm

from vitexp.config import TrainerConfig, trainer_settings, validate
from vitexp.errors import ConfigError, TrainingDiverged
from vitexp.training import distributed
from vitexp.training.checkpoint import save_checkpoint
from vitexp.training.checkpointing import Checkpoints, CheckpointWriter
from vitexp.training.context import RunContext
from vitexp.training.loggers import Loggers
from vitexp.training.metrics import LossWindow, score
from vitexp.training.optim import set_lr
from vitexp.training.preemption import Preempted, PreemptionGuard
from vitexp.training.records import Fitted, open_records, write_records
from vitexp.training.setup import LossFn, Run, Step, build, max_epochs
from vitexp.training.state import TrainState
from vitexp.training.trial import trial_report

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- one step


class StepResult(NamedTuple):
    loss: Tensor  # the step's mean loss, on the device
    finite: Tensor  # whether the loss (and the clipped gradient norm) were finite, on the device
    skipped: bool  # the update was skipped (skip_nonfinite and not finite)


def train_step(step: Step, batches: Iterator[tuple[Tensor, Tensor]]) -> StepResult:
    """One optimizer step over `step.grad_accum_steps` micro-batches drawn from `batches`.

    Nothing here waits for the device, except skipping a non-finite step (`skip_nonfinite`),
    which must know now: one host sync per step, as fp16's GradScaler (which skips by itself)
    does. Stopping on a non-finite loss need not know now: the loop reads a device-side flag at
    its next log point."""
    step_loss = torch.zeros((), device=_device_of(step.model))
    for micro in range(step.grad_accum_steps):
        x, y = next(batches)
        if step.mix is not None:  # soft targets; CrossEntropyLoss takes them as they are
            x, y = step.mix(x, y)
        # DDP averages gradients over the ranks once per step, on the last micro-batch.
        last = micro == step.grad_accum_steps - 1
        no_sync = step.world.distributed and not last
        with step.forward.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
            with step.autocast:
                loss = step.loss_fn(step.forward(x), y) / step.grad_accum_steps
            step.scaler.scale(loss).backward()
        step_loss += loss.detach()
    finite = torch.isfinite(step_loss)
    if step.grad_clip:
        step.scaler.unscale_(step.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(step.model.parameters(), step.grad_clip)
        if not step.scaler.is_enabled():  # fp16's scaler skips overflowing steps itself
            finite = finite & torch.isfinite(grad_norm)
    # fp16's GradScaler skips overflowing steps itself (and agrees over the ranks): skipping
    # here is for the other precisions only.
    skip = step.skip_nonfinite and not step.scaler.is_enabled()
    if skip and step.world.distributed:  # skip on every rank or on none
        finite = distributed.all_true(finite, step.world)
    skipped = skip and not bool(finite)
    if not skipped:
        step.scaler.step(step.optimizer)
        step.scaler.update()
        if step.ema is not None:
            step.ema.update(step.model)
    step.optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, finite, skipped)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- the run's length


class TimeBudget:
    """Fits a run into `trainer.max_time` seconds: from the pace so far (training and
    evaluation together) it re-estimates how many optimizer steps still fit, so that the
    schedule, which knows the total, ends when the time does."""

    def __init__(self, seconds: float, start_step: int, limit_steps: int) -> None:
        self.started = time.time()
        self.deadline = self.started + seconds
        self.start_step = start_step
        self.limit_steps = limit_steps

    def total_steps(self, global_step: int) -> int:
        done = global_step - self.start_step
        if done <= 0:
            return self.limit_steps
        now = time.time()
        pace = (now - self.started) / done
        fits = global_step + int(max(0.0, self.deadline - now) / pace)
        return max(global_step, min(self.limit_steps, fits))

    @property
    def spent(self) -> bool:
        return time.time() >= self.deadline


# --------------------------------------------------------------------------- the loop


@dataclass
class Loop:
    """The loop over steps and epochs, and the decisions it takes at each step."""

    run: Run
    ctx: RunContext
    state: TrainState
    loggers: Loggers
    checkpoints: Checkpoints
    budget: TimeBudget | None = None
    # Called after each evaluation with (epoch, monitored value, whether it is the last one);
    # True stops the run there (an Optuna trial whose pruner says so: vitexp.training.trial).
    after_eval: Callable[[int, float, bool], bool] | None = None
    stopped_early: bool = False
    window: LossWindow = field(init=False)
    guard: PreemptionGuard = field(default_factory=PreemptionGuard)

    def __post_init__(self) -> None:
        self.window = LossWindow(self.run.device, self.run.world)

    def fit(self) -> dict[str, float]:
        """Train until the last step (or the time budget); returns the final eval metrics."""
        p, final = self.state.progress, {}
        with self.guard:
            while p.global_step < p.total_steps and not self.out_of_time() and not self.stopped_early:
                if p.order is None:  # a new epoch; its order is saved with mid-epoch checkpoints
                    p.epoch, p.step_in_epoch = p.epoch + 1, 0
                    p.order = self.run.train_loader.new_order()
                self.run_epoch()
                final = self.end_epoch()
        return final or self.val_metrics()  # a resumed finished run is only evaluated again

    def run_epoch(self) -> None:
        run, p, t = self.run, self.state.progress, self.run.trainer
        assert p.order is not None
        steps = self.steps_this_epoch()
        batches = run.train_loader.iter_from(p.order, p.step_in_epoch * run.step.grad_accum_steps)
        run.step.forward.train()
        epoch_start, seconds_before = time.time(), p.train_seconds
        bar = tqdm(
            desc=f"epoch {p.epoch}/{max_epochs(run, p.total_steps)}", initial=p.step_in_epoch, total=steps,
            leave=False, disable=None if t.progress and run.world.is_main else True,
        )  # fmt: skip
        while p.step_in_epoch < steps and p.global_step < p.total_steps:
            set_lr(run.step.optimizer, run.base_lrs, run.schedule(p.global_step, p.total_steps))
            result = train_step(run.step, batches)
            p.global_step, p.step_in_epoch = p.global_step + 1, p.step_in_epoch + 1
            self.window.add(result.loss, result.finite, p.global_step)
            if result.skipped:
                log.warning("step %d: non-finite loss or gradient; step skipped", p.global_step)
            bar.update()
            at_log = p.global_step % t.log_every_steps == 0
            preempted = self.preemption_requested(at_log)
            at_checkpoint = preempted or (self.checkpoints.due(p.global_step) and p.step_in_epoch < steps)
            if at_log or at_checkpoint:
                self.log_window(bar)
                self.refit_budget()
                # A budget that grew lets this epoch run to its end rather than stop short and
                # start another one; one that shrank ends it where the run ends.
                steps = bar.total = self.steps_this_epoch()
            if at_checkpoint:
                # Mid-epoch: the epoch's order and the step within it let a resumed run replay
                # exactly the batches this one had left.
                p.train_seconds = seconds_before + time.time() - epoch_start
                self.checkpoints.save(self.state)  # collective
                if preempted:
                    self.stop_preempted()
        bar.close()
        if self.window.count:
            self.log_window(bar)
        p.train_seconds = seconds_before + time.time() - epoch_start

    def steps_this_epoch(self) -> int:
        """An epoch ends after steps_per_epoch steps, or earlier where the run does."""
        p = self.state.progress
        return min(self.run.steps_per_epoch, p.step_in_epoch + p.total_steps - p.global_step)

    def end_epoch(self) -> dict[str, float]:
        """Evaluate, keep the best, write last.pt (and best.pt, epoch<N>.pt)."""
        run, p = self.run, self.state.progress
        metrics = self.val_metrics()
        raw = {}
        if run.step.ema is not None:  # the raw weights too, to see what the averaging gives
            scores = score(run.model, run.eval_loader, run.step.autocast, run.world)
            raw = {f"val_raw/{k}": v for k, v in scores.items()}
        self.loggers.log({**metrics, **raw, "epoch": p.epoch}, step=p.global_step)
        current = metrics[run.monitor]
        improved = current > p.best_value if run.maximize else current < p.best_value
        if improved:
            p.best_value, p.best_epoch = current, p.epoch
        log.info(
            "epoch %d/%d | train loss %.4f | %s loss %.4f acc1 %.4f acc5 %.4f | %s",
            p.epoch, max_epochs(run, p.total_steps), self.window.end_epoch(), run.eval_name,
            metrics["val/loss"], metrics["val/acc1"], metrics["val/acc5"],
            "new best" if improved else f"best {p.best_value:.4f} (epoch {p.best_epoch})",
        )  # fmt: skip
        p.order = None  # the epoch is complete
        self.checkpoints.save(self.state, epoch_end=True, best=improved)  # collective
        if self.after_eval is not None or self.run.world.distributed:
            last = p.global_step >= p.total_steps
            stop = self.after_eval is not None and self.after_eval(p.epoch, current, last)
            self.stopped_early = bool(distributed.agree(stop, self.run.world))  # rank 0 reports
        return metrics

    def val_metrics(self) -> dict[str, float]:
        run = self.run
        scores = score(run.eval_model, run.eval_loader, run.step.autocast, run.world)
        metrics = {f"val/{k}": v for k, v in scores.items()}
        if run.trainer.eval_hflip:  # reported beside the plain figures, which still pick best.pt
            flipped = score(run.eval_model, run.eval_loader, run.step.autocast, run.world, hflip=True)
            metrics.update({f"val_hflip/{k}": v for k, v in flipped.items()})
        return metrics

    # ------------------------------------------------------------------- decisions

    def preemption_requested(self, at_log: bool) -> bool:
        if not self.run.world.distributed:
            return self.guard.requested
        # Signals reach the ranks at different moments; they agree at log points (collective).
        return at_log and distributed.any_rank(self.guard.requested, self.run.world)

    def out_of_time(self) -> bool:
        # Rank 0's clock decides, so every rank stops after the same step.
        return self.budget is not None and bool(distributed.agree(self.budget.spent, self.run.world))

    def refit_budget(self) -> None:
        if self.budget is not None:
            p = self.state.progress
            p.total_steps = distributed.agree(self.budget.total_steps(p.global_step), self.run.world)

    def log_window(self, bar: tqdm) -> None:
        """Log the training loss since the last log point, after checking it stayed finite
        (collective when data-parallel: every rank reads the same global figures)."""
        run, p = self.run, self.state.progress
        if not run.step.skip_nonfinite:
            self.stop_if_nonfinite()
        mean_loss, steps, seconds = self.window.flush()
        if steps:
            lr = run.step.optimizer.param_groups[0]["lr"]  # the rate the last step used
            images_per_sec = steps * run.trainer.batch_size / seconds
            loss = {} if mean_loss is None else {"train/loss": mean_loss}  # None: every step was skipped
            metrics = {**loss, "train/lr": lr, "train/images_per_sec": images_per_sec, "epoch": p.epoch}
            self.loggers.log(metrics, step=p.global_step)
            bar.set_postfix(loss="skipped" if mean_loss is None else f"{mean_loss:.4f}", lr=f"{lr:.2e}")

    def stop_if_nonfinite(self) -> None:
        bad = self.window.first_nonfinite_step()
        if bad is not None:
            raise TrainingDiverged(
                f"the training loss or gradient became non-finite at step {bad}; stopped without saving. "
                f"Last good checkpoint: {self.checkpoints.last_good or 'none yet'}. Lower optimizer.lr, "
                f"keep trainer.grad_clip on, use trainer.precision=fp32, or set trainer.on_nonfinite=skip",
                step=bad,
            )

    def stop_preempted(self) -> None:
        distributed.barrier(self.run.world)  # no rank leaves before rank 0 has saved
        raise Preempted(
            self.guard.signal_name or "a signal to another rank",
            self.state.progress.global_step,
            str(self.ctx.run_dir / "last.pt"),
            self.ctx.resume_command or f"the same command with trainer.resume={self.ctx.run_dir / 'last.pt'}",
        )


# --------------------------------------------------------------------------- the run


def quiet_rank() -> None:
    """Data-parallel ranks other than 0 log warnings and errors only, and to the console only:
    rank 0 reports the run, and Hydra's log file in the shared run dir is rank 0's."""
    logging.getLogger("vitexp").setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def log_start(run: Run, ctx: RunContext, total_steps: int) -> None:
    n_params = sum(p.numel() for p in run.model.parameters())
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    t = run.trainer
    where = f"{run.world.size} processes × {run.device.type}" if run.world.distributed else str(run.device)
    log.info(
        "%.2fM params, %.2fM trainable | %d train / %d %s images | %d epochs × %d steps × %d images | "
        "%s, %s | %s",
        n_params / 1e6, trainable / 1e6, len(run.train_split), len(run.eval_split), run.eval_name,
        max_epochs(run, total_steps), run.steps_per_epoch, t.batch_size, where, t.precision, ctx.run_dir,
    )  # fmt: skip


def begin(
    cfg: DictConfig, ctx: RunContext | None, run_dir: str | Path | None
) -> tuple[TrainerConfig, RunContext]:
    """Check the settings and type the trainer's once; join the process group (data-parallel
    when launched as a group: torchrun, or a SLURM job of several tasks); agree on rank 0's run
    directory. A call from Python with no logging set up logs to the console."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in validate(cfg):
        log.warning("%s", warning)
    settings = trainer_settings(cfg)
    if ctx is not None and run_dir is not None:
        raise TypeError("train(): give a RunContext or run_dir=, not both")
    ctx = ctx or RunContext(run_dir=_run_dir_of(cfg, run_dir), world=distributed.launch_world())
    distributed.init(ctx.world)
    if not ctx.world.is_main:
        quiet_rank()
    shared = Path(distributed.agree(str(ctx.run_dir), ctx.world))  # rank 0's, should the ranks differ
    return settings, dataclasses.replace(ctx, run_dir=shared)


def _run_dir_of(cfg: DictConfig, run_dir: str | Path | None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    if "run_dir" in cfg:  # a config composed with a run_dir key of its own (the tests' helper)
        return Path(cfg.run_dir)
    raise ConfigError("no run directory: pass train(cfg, run_dir=...), or a RunContext")


def fit(run: Run, ctx: RunContext, state: TrainState, loggers: Loggers, checkpoints: Checkpoints) -> Fitted:
    """Train from where `state` is to the last step (or the time budget, or until the run's
    Optuna trial is pruned)."""
    budget = None
    if run.trainer.max_time is not None:
        # The budget covers training and per-epoch evaluation; a resumed run gets what is left.
        p = state.progress
        budget = TimeBudget(run.trainer.max_time - p.train_seconds, p.global_step, run.total_steps)
        log.info(
            "time budget: %.0f s (trainer.max_time); the schedule adapts to the pace", run.trainer.max_time
        )
    log_start(run, ctx, run.total_steps)
    after_eval = trial_report(run.cfg) if run.world.is_main else None
    loop = Loop(run, ctx, state, loggers, checkpoints, budget, after_eval)
    final = loop.fit()
    if loop.stopped_early:
        loggers.tag("pruned")
        return Fitted(final, "pruned")
    # The budget ends the run by fitting its length to the time left: it ends on time, before
    # the steps max_epochs/max_steps would give.
    on_time = budget is not None and (budget.spent or state.progress.global_step < run.total_steps)
    return Fitted(final, "max_time" if on_time else "max_epochs/max_steps")


def train(
    cfg: DictConfig,
    ctx: RunContext | None = None,
    *,
    run_dir: str | Path | None = None,
    loss_fn: LossFn | None = None,
    write_checkpoint: CheckpointWriter = save_checkpoint,
) -> float:
    """Train the configured model; return the best value of `trainer.monitor` (for sweepers).

    `ctx` says where the run writes and how it is named (the command line builds it); from
    Python, `run_dir=` is enough. `loss_fn` and `write_checkpoint` replace the loss and the
    checkpoint writer (tests use them to inject faults)."""
    started = time.time()
    settings, ctx = begin(cfg, ctx, run_dir)
    with Checkpoints(cfg, settings, ctx, write=write_checkpoint) as checkpoints:  # settle the run directory
        run = build(cfg, ctx.world, settings=settings, resuming=checkpoints.resuming, loss_fn=loss_fn)
        with contextlib.closing(run):
            state = checkpoints.restore(run)
            with open_records(run, ctx, state) as loggers:
                fitted = fit(run, ctx, state, loggers, checkpoints)
                write_records(
                    run, ctx, state, loggers, fitted, started=started, resumed_from=checkpoints.source
                )
    return state.progress.best_value
