"""Each setting declared once: its type, default, one-line doc, domain and resume policy.

A trainer setting is one field of `TrainerConfig`:

    max_epochs: int = setting(10, "epochs to train", domain=POSITIVE, on_resume="same_run")

The type is the annotation; `setting` records the default, the doc, the domain (a `Range` of
numbers, `Choices` of names, or a `Pattern` of strings) and how the setting may change when a
run is resumed (`ON_RESUME`). Hydra composes the `trainer` group from this dataclass (it is
stored as the option `trainer=default`; no YAML repeats it), checks types and refuses unknown
keys; `vitexp.config.validate` checks every declared domain; `--help` prints them all
(`settings_help`). Settings of the other groups whose values have a domain are declared in
`GROUP_SETTINGS`: their defaults differ per option (optimizer=sgd or adamw) and stay in the
group's YAML files.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

# How a setting may change when a run is resumed (`trainer.resume`):
#   free      may differ from the interrupted run (device, logging, checkpoint intervals, ...);
#   same_run  defines the run: a change is refused, unless trainer.resume_allow_changes=true,
#             which applies the new value and warns;
#   fixed     cannot change mid-run at all: a change is refused even with resume_allow_changes.
ON_RESUME = ("free", "same_run", "fixed")


@dataclasses.dataclass(frozen=True)
class Range:
    """Numbers in an interval such as `[0, 1)` or `(0, inf)`; `says` completes the one-line
    error `KEY=VALUE says` (what the value must be, and what null or 0 means)."""

    interval: str
    says: str

    def bounds(self) -> tuple[float, float]:
        low, high = (float(bound) for bound in self.interval[1:-1].split(","))
        return low, high

    def holds(self, value: Any) -> bool:
        low, high = self.bounds()
        above = value >= low if self.interval[0] == "[" else value > low
        below = value <= high if self.interval[-1] == "]" else value < high
        return bool(above and below)


@dataclasses.dataclass(frozen=True)
class Choices:
    """One of a few names."""

    options: tuple[str, ...]

    def holds(self, value: Any) -> bool:
        return value in self.options

    @property
    def says(self) -> str:
        return f"is not one of {', '.join(self.options)}"

    @property
    def shows(self) -> str:
        return " | ".join(self.options)


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A string, or an integer, whose text matches `regex` (whole): a name with a number in it
    (`cuda:1`), or a word or a number (`auto | N`, for a setting typed `Any`). `shows` is the
    domain in words for `--help`."""

    regex: str
    shows: str
    says: str

    def holds(self, value: Any) -> bool:
        written = isinstance(value, str | int) and not isinstance(value, bool)
        return written and re.fullmatch(self.regex, str(value)) is not None


@dataclasses.dataclass(frozen=True)
class Globs(Pattern):
    """A word that `regex` matches, or a non-empty list of non-empty strings (glob patterns of
    names, such as `trainer.freeze=[patch_embed.*,blocks.0.*]`)."""

    def holds(self, value: Any) -> bool:
        if OmegaConf.is_list(value) or isinstance(value, list | tuple):
            return len(value) > 0 and all(isinstance(item, str) and item for item in value)
        return isinstance(value, str) and super().holds(value)


Domain = Range | Choices | Pattern

POSITIVE = Range("[1, inf)", "must be positive")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = Pattern(
    r"auto|cpu|cuda(:\d+)?",
    "auto | cpu | cuda | cuda:N",
    "is not a device name; use auto, cpu, cuda or cuda:N",
)


def setting(default: Any, doc: str, *, domain: Domain | None = None, on_resume: str = "free") -> Any:
    """One trainer setting: a dataclass field whose metadata holds the rest of its declaration."""
    assert on_resume in ON_RESUME, on_resume
    return dataclasses.field(default=default, metadata={"doc": doc, "domain": domain, "on_resume": on_resume})


@dataclasses.dataclass
class TrainerConfig:
    """`trainer`: the training loop. Sizes count images; steps count optimizer steps."""

    max_epochs: int = setting(10, "epochs to train", domain=POSITIVE, on_resume="same_run")
    max_steps: int | None = setting(
        None,
        "if set, train exactly this many optimizer steps instead of max_epochs",
        domain=Range("[1, inf)", "must be positive, or null to train for max_epochs"),
        on_resume="same_run",
    )
    batch_size: int = setting(128, "global batch per optimizer step", domain=POSITIVE, on_resume="same_run")
    grad_accum_steps: int = setting(
        1,
        "micro-batches per step: each holds batch_size / grad_accum_steps images",
        domain=POSITIVE,
        on_resume="same_run",
    )
    eval_batch_size: int = setting(512, "batch size of evaluation", domain=POSITIVE)
    precision: str = setting(
        "fp32",
        "auto: bf16 where the device computes it natively, else fp32; bf16: autocast (CPU or GPU); "
        "fp16: GPU only, with a GradScaler",
        domain=Choices(PRECISIONS),
    )
    device: str = setting("auto", "auto: cuda if present, else cpu", domain=DEVICES)
    compile: bool = setting(False, "torch.compile the model")
    deterministic: bool = setting(
        False, "torch's deterministic algorithms: GPU runs resume bitwise, somewhat slower"
    )
    grad_clip: float | None = setting(
        1.0,
        "largest global gradient norm; null turns clipping off",
        domain=Range(
            "(0, inf)", "must be positive (the largest gradient norm), or null to turn clipping off"
        ),
        on_resume="same_run",
    )
    label_smoothing: float = setting(
        0.0,
        "label smoothing of the cross-entropy",
        domain=Range("[0, 1)", "must be in [0, 1) (0 turns it off; 0.1 is usual)"),
        on_resume="same_run",
    )
    log_every_steps: int = setting(10, "log the training loss every N optimizer steps", domain=POSITIVE)
    progress: bool = setting(True, "tqdm progress bar (only on a terminal)")
    save_every_epoch: bool = setting(False, "also keep epoch{N}.pt, like the article's script")
    monitor: str = setting(
        "val/acc1",
        "the metric that picks best.pt and is returned to sweepers",
        domain=Choices(("val/acc1", "val/acc5", "val/loss")),
    )
    resume: str | None = setting(
        None,
        "null: a fresh run; auto: this run dir's last.pt, if any; or the path of a checkpoint",
        # Any string but true/false: the schema turns `trainer.resume=false` into 'False', a path.
        domain=Pattern(
            r"(?i)(?!true$|false$).*",
            "null | auto | PATH",
            "is not a checkpoint: give null (a fresh run), auto (this run dir's last.pt, if any) or "
            "the path of a checkpoint",
        ),
    )
    resume_allow_changes: bool = setting(
        False, "resume even if the model, data, batch, schedule or seed changed (warns per change)"
    )
    overwrite: bool = setting(False, "a fresh run may replace the records of a finished run in its run dir")
    checkpoint_every_steps: int | None = setting(
        None,
        "also write last.pt every N optimizer steps (mid-epoch)",
        domain=Range("[1, inf)", "must be positive, or null to write last.pt at epoch ends only"),
    )
    keep_last_k: int | None = setting(
        None,
        "with save_every_epoch: keep only the newest k epoch{N}.pt",
        domain=Range("[1, inf)", "must be positive, or null to keep every epoch{N}.pt"),
    )
    on_nonfinite: str = setting(
        "stop",
        "a non-finite loss or gradient: stop (naming the step) or skip the step",
        domain=Choices(("stop", "skip")),
    )
    sample_figures: bool = setting(
        True, "at the end: sample predictions (and attention.png for ViTs) to the run dir and loggers"
    )
    max_time: float | None = setting(
        None,
        "seconds of training and evaluation; the schedule is fitted to end on time",
        domain=Range("(0, inf)", "must be positive (seconds), or null for no time limit"),
        on_resume="same_run",
    )
    mixup_alpha: float = setting(
        0.0,
        "mixup (Zhang et al. 2018) Beta(α, α); 0 turns it off",
        domain=Range("[0, inf)", "must not be negative (0 turns mixup off)"),
        on_resume="same_run",
    )
    cutmix_alpha: float = setting(
        0.0,
        "cutmix (Yun et al. 2019) Beta(α, α); with mixup too, each sample picks one",
        domain=Range("[0, inf)", "must not be negative (0 turns cutmix off)"),
        on_resume="same_run",
    )
    ema_decay: float | None = setting(
        None,
        "EMA of the weights (e.g. 0.999): evaluated, checkpointed and used for inference",
        domain=Range("(0, 1)", "must be between 0 and 1 (e.g. 0.999), or null for no EMA"),
        on_resume="same_run",
    )
    eval_hflip: bool = setting(
        False, "also evaluate with left-right flip averaging (val_hflip/*); val/* still picks best.pt"
    )
    # Any: a word or a list of patterns (OmegaConf has no str | list[str]); the default is None.
    freeze: Any = setting(  # noqa: RUF009
        None,
        "backbone: only the classifier trains (a linear probe); or glob patterns of the parameter names "
        "to freeze, e.g. [embeddings.*,encoder.layer.0.*]; frozen ones get no gradient, optimizer state "
        "or weight decay",
        domain=Globs(
            r"backbone",
            "null | backbone | [PATTERN,...]",
            "must be backbone, a list of glob patterns of parameter names ([PATTERN,...]), or null to "
            "train every parameter",
        ),
        on_resume="fixed",
    )
    train_last_blocks: int | None = setting(
        None,
        "train only the last N transformer blocks and what follows them (final norm, head); 0: the head",
        domain=Range(
            "[0, inf)", "must not be negative (0 trains the head alone), or null to train every block"
        ),
        on_resume="fixed",
    )
    # Any: auto or an integer (OmegaConf has no int | str); ruff cannot tell the default is immutable.
    num_threads: Any = setting(  # noqa: RUF009
        "auto",
        "torch CPU threads: auto (OMP_NUM_THREADS if set, else the CPUs this process may use: affinity, "
        "cgroup quota, SLURM_CPUS_PER_TASK, shared among local ranks) or N",
        domain=Pattern(r"auto|[1-9]\d*", "auto | N", "must be auto or a positive integer"),
    )


# The trainer group's one option, `trainer=default` (conf/config.yaml's defaults list).
ConfigStore.instance().store(group="trainer", name="default", node=TrainerConfig)


def trainer_keys(on_resume: str) -> tuple[str, ...]:
    """The `trainer` settings whose resume policy is `on_resume` (see ON_RESUME)."""
    return tuple(f.name for f in dataclasses.fields(TrainerConfig) if f.metadata["on_resume"] == on_resume)


def trainer_settings(cfg: DictConfig) -> TrainerConfig:
    """The composed `trainer` section as a typed object: the library reads its fields."""
    settings = OmegaConf.to_object(cfg.trainer)
    assert isinstance(settings, TrainerConfig)
    return settings


@dataclasses.dataclass(frozen=True)
class Declared:
    """A declared setting as validation and `--help` read it: its dotted key, type (`int`,
    `float | None`, ...), domain, and for trainer settings the doc, default and resume policy.
    The other groups' settings are declared as such directly (`GROUP_SETTINGS`)."""

    key: str
    hint: Any
    domain: Domain | None
    doc: str = ""
    default: Any = None
    on_resume: str | None = None

    @property
    def kinds(self) -> tuple[type, ...]:
        """The types a value may have, null aside."""
        union = typing.get_origin(self.hint) in (typing.Union, types.UnionType)
        return tuple(t for t in typing.get_args(self.hint) if t is not type(None)) if union else (self.hint,)

    @property
    def nullable(self) -> bool:
        return type(None) in typing.get_args(self.hint)

    def type_error(self, value: Any) -> str | None:
        """What is wrong with the type of `value` (`must be an integer`), or None."""
        if value is None and self.nullable:
            return None
        fits = {
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            bool: lambda v: isinstance(v, bool),
            str: lambda v: isinstance(v, str),
        }
        if any(fits.get(kind, lambda v: True)(value) for kind in self.kinds):  # Any: not checked here
            return None
        return f"must be {describe_hint(self.hint)}"

    @property
    def shows(self) -> str:
        """The values it may take, in words (`integer in [1, inf) or null`), for `--help`."""
        if isinstance(self.domain, Range):
            kind = "integer" if int in self.kinds else "number"
            return f"{kind} in {self.domain.interval}" + (" or null" if self.nullable else "")
        return self.domain.shows if self.domain is not None else describe_hint(self.hint)


# Settings of the other groups with a domain (their defaults: the groups' YAML files). A key
# an option does not have is skipped (optimizer.momentum exists for SGD only). Model
# arguments are checked by the models themselves.
GROUP_SETTINGS = (
    Declared("optimizer.lr", float, Range("(0, inf)", "must be positive")),
    Declared("optimizer.weight_decay", float, Range("[0, inf)", "must not be negative")),
    Declared("optimizer.momentum", float, Range("[0, 1)", "must be in [0, 1) (0.9 is usual)")),
    Declared(
        "optimizer.layer_decay",
        float | None,
        Range("(0, 1]", "must be in (0, 1] (0.65 to 0.75 is usual), or null for one rate for all layers"),
    ),
    Declared(
        "scheduler.warmup_steps",
        int | None,
        Range("[0, inf)", "must not be negative, or null to count the warmup in epochs"),
    ),
    Declared("scheduler.warmup_epochs", float, Range("[0, inf)", "must not be negative")),
    Declared(
        "scheduler.min_lr_ratio",
        float,
        Range("[0, 1]", "must be in [0, 1] (the final learning rate over optimizer.lr)"),
    ),
    Declared(
        "dataset.val_split",
        float,
        Range("[0, 1)", "must be in [0, 1) (the share of training images held out for evaluation)"),
    ),
    Declared(
        "dataset.num_workers",
        int | None,
        Range("[0, inf)", "must not be negative, or null for this process's share of the cores"),
    ),
    Declared(
        "dataset.shuffle_buffer",
        int,
        Range(
            "[0, inf)", "must not be negative (training samples shuffled in windows of this many; 0: none)"
        ),
    ),
    Declared("dataset.on_error", str, Choices(("fail", "skip"))),
    Declared(
        "logger.wandb.init_timeout",
        float,
        Range("(0, inf)", "must be positive (seconds wandb.init may take before the run logs offline)"),
    ),
    Declared("seed", int, Range("[0, inf)", "must not be negative")),
)


@functools.cache
def declared() -> dict[str, Declared]:
    """Every declared setting by its dotted key: the trainer's fields, then GROUP_SETTINGS."""
    hints = typing.get_type_hints(TrainerConfig)
    trainer = {
        f"trainer.{f.name}": Declared(
            key=f"trainer.{f.name}",
            hint=hints[f.name],
            domain=f.metadata["domain"],
            doc=f.metadata["doc"],
            default=f.default,
            on_resume=f.metadata["on_resume"],
        )
        for f in dataclasses.fields(TrainerConfig)
    }
    return {**trainer, **{s.key: s for s in GROUP_SETTINGS}}


def describe_hint(hint: Any) -> str:
    """A type in words: `an integer`, `a number or null`, `true or false`."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] if union else [hint]
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    text = " or ".join(words.get(t, getattr(t, "__name__", str(t))) for t in kinds)
    return f"{text} or null" if union and type(None) in typing.get_args(hint) else text


def describe_type(schema: type, key: str) -> str | None:
    """What `schema.key` holds, in words ("an integer", "a number or null"); None when the
    schema has no such field."""
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    return describe_hint(hints[key]) if key in hints else None


def _yaml(value: Any) -> str:
    """A default as YAML (and the command line) writes it: null, true, false."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def settings_help() -> str:
    """One line per trainer setting: `name=default`, its domain and its doc, and whether it
    defines the run (a resumed run refuses a change to it unless trainer.resume_allow_changes)."""
    rows = []
    for s in declared().values():
        if s.on_resume is None:
            continue
        policy = {"free": "", "same_run": " [defines the run]", "fixed": " [fixed for the run]"}[s.on_resume]
        rows.append((f"{s.key}={_yaml(s.default)}", s.shows, s.doc + policy))
    width = [max(len(row[i]) for row in rows) for i in (0, 1)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows)
