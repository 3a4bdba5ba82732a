"""Where vitexp's configs live, what they may hold, and what a mistyped key probably meant.

In a source checkout (and an editable install) the configs are the repository's top-level
`conf/` and `experiments/`; a wheel carries the same files as `vitexp/_conf` and
`vitexp/_experiments`. Presets in `experiments/` are registered in Hydra's ConfigStore as
the `experiment` group, so `experiment=NAME` works from any working directory without
copying or linking them under `conf/`.

`trainer` has a schema (`TrainerConfig`): a value of the wrong type or an unknown key fails
when Hydra composes the config. `validate(cfg)` checks every setting against its domain
before anything is built. Nothing here imports torch: the command line checks a config
before the heavy imports.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from vitexp.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent


def _first_dir(*candidates: Path) -> Path:
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"vitexp's config folder is missing; looked in {', '.join(map(str, candidates))}")


def conf_dir() -> Path:
    """The folder holding `config.yaml` and one subfolder per config group."""
    return _first_dir(_PACKAGE / "_conf", _PACKAGE.parent / "conf")


def experiments_dir() -> Path:
    """The folder of named presets (`experiment=NAME`)."""
    return _first_dir(_PACKAGE / "_experiments", _PACKAGE.parent / "experiments")


def register_experiments() -> list[str]:
    """Store every `experiments/*.yaml` as option NAME of the `experiment` group, merged at
    the global package (as their `# @package _global_` header says). Returns the names."""
    store = ConfigStore.instance()
    names = []
    for path in sorted(experiments_dir().glob("*.yaml")):
        store.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


_launch_time: datetime.datetime | None = None


def set_launch_time(when: datetime.datetime | None) -> None:
    """Fix the time that `${launch_time:...}` formats: every process of a distributed launch
    sets rank 0's, so their run directories are one and the same. None: the current time."""
    global _launch_time
    _launch_time = when


def register_resolvers() -> None:
    """`${launch_time:PATTERN}`: Hydra's `${now:PATTERN}`, but the same in every process of a
    torchrun launch (Hydra re-registers `now` itself, so it cannot be pinned). Cached per
    config like `now`, and copied into sweep jobs (submitit's too) with Hydra's resolver cache."""
    OmegaConf.register_new_resolver(
        "launch_time",
        lambda pattern: (_launch_time or datetime.datetime.now()).strftime(pattern),
        use_cache=True,
        replace=True,
    )


# --------------------------------------------------------------------------- config groups


def group_options(group: str) -> list[str]:
    """The options of a config group: YAML files in conf/GROUP, or ConfigStore entries (the
    `experiment` group). Shared bases (conf/model_vit.yaml, ...) sit outside the groups and
    are never an option."""
    files = [p.stem for p in (conf_dir() / group).glob("*.yaml")]
    stored = ConfigStore.instance().repo.get(group, {})
    return sorted({*files, *(name.removesuffix(".yaml") for name in stored if name.endswith(".yaml"))})


def is_group(name: str) -> bool:
    """Whether `name` (e.g. `model`, `hydra/launcher`) is a config group one can choose an option of."""
    return (conf_dir() / name).is_dir() or isinstance(ConfigStore.instance().repo.get(name), dict)


# --------------------------------------------------------------------------- the trainer schema


@dataclasses.dataclass
class TrainerConfig:
    """The keys and types of `trainer` (values: conf/trainer/default.yaml). Hydra checks every
    value against its type when it composes the config, and refuses keys not listed here;
    `validate` then checks the ranges."""

    max_epochs: int = MISSING
    max_steps: int | None = MISSING
    batch_size: int = MISSING
    grad_accum_steps: int = MISSING
    eval_batch_size: int = MISSING
    precision: str = MISSING
    device: str = MISSING
    compile: bool = MISSING
    deterministic: bool = MISSING
    grad_clip: float | None = MISSING
    label_smoothing: float = MISSING
    log_every_steps: int = MISSING
    progress: bool = MISSING
    save_every_epoch: bool = MISSING
    monitor: str = MISSING
    resume: str | None = MISSING
    resume_allow_changes: bool = MISSING
    overwrite: bool = MISSING
    checkpoint_every_steps: int | None = MISSING
    keep_last_k: int | None = MISSING
    on_nonfinite: str = MISSING
    sample_figures: bool = MISSING
    max_time: float | None = MISSING
    mixup_alpha: float = MISSING
    cutmix_alpha: float = MISSING
    ema_decay: float | None = MISSING
    eval_hflip: bool = MISSING
    num_threads: Any = MISSING  # auto or a positive integer (OmegaConf has no int | str)


# A root-level entry, not an option of the trainer group: conf/trainer/default.yaml names it
# in its defaults list (`/trainer_schema@_here_`), and it never shows up as a choice.
ConfigStore.instance().store(name="trainer_schema", node=TrainerConfig)


def describe_type(schema: type, key: str) -> str | None:
    """What `schema.key` holds, in words ("an integer", "a number or null"); None when the
    schema has no such field."""
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    if key not in hints:
        return None
    hint = hints[key]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] if union else [hint]
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    text = " or ".join(words.get(t, getattr(t, "__name__", str(t))) for t in kinds)
    return f"{text} or null" if union and type(None) in typing.get_args(hint) else text


# --------------------------------------------------------------------------- did you mean


def flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (mappings only; lists are values), unresolved."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if not isinstance(node, dict):
        return []
    keys = []
    for key, value in node.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        keys.append(full)
        keys += flat_keys(value, full)
    return keys


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate `word` is most likely a typo of, or None when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return match[0] if match else None


def _likeness(key: str, candidate: str) -> float:
    """How likely `candidate` is the key meant by `key`, 0..1 (0.75 and up: close). Within one
    section only what follows it counts (`trainer.foo` is not close to `trainer.monitor`); a
    key with the same last part scores at least 0.9: the setting is one level up or down
    (`logger.mode` -> `logger.wandb.mode`)."""
    if key.split(".")[0] == candidate.split(".")[0] and "." in key and "." in candidate:
        ratio = difflib.SequenceMatcher(None, key.split(".", 1)[1], candidate.split(".", 1)[1]).ratio()
    else:
        ratio = difflib.SequenceMatcher(None, key, candidate).ratio()
    return max(ratio, 0.9) if key.rsplit(".", 1)[-1] == candidate.rsplit(".", 1)[-1] else ratio


def _best_key(key: str, candidates: Iterable[str]) -> tuple[float, str] | None:
    # Never a section the key is in: `trainer.foo` is not a typo of `trainer`.
    scored = [(_likeness(key, c), c) for c in candidates if not key.startswith(c + ".")]
    best = max(scored, default=None)
    return best if best is not None and best[0] >= 0.75 else None


def suggest_key(
    key: str, cfg: Any, option_config: Callable[[str, str], Any] | None = None
) -> tuple[str, list[str]] | None:
    """What the user probably meant by the unknown dotted `key`: `(key meant, options)`.

    The key meant is one of the composed `cfg` in the same section (`model.hiden_size` ->
    `model.hidden_size`, options `[]`), or, when the section is a config group, a key of its
    other options, with the options (`group=option`) that have it (`logger.mode` ->
    `logger.wandb.mode`, `["logger=wandb"]`). `option_config(group, option)` gives an option's
    config (composed with Hydra); None: the composed config alone. None when nothing is close.
    """
    section = key.split(".")[0]
    keys = flat_keys(cfg)
    if section in keys:
        keys = [k for k in keys if k.split(".")[0] == section]
    here = _best_key(key, keys)
    if (here and here[0] >= 0.85) or option_config is None or "." not in key or not is_group(section):
        return (here[1], []) if here else None
    found: dict[str, tuple[float, list[str]]] = {}
    for option in group_options(section):
        best = _best_key(key, flat_keys(option_config(section, option)))
        if best:
            score, other = best
            found.setdefault(other, (score, []))[1].append(f"{section}={option}")
    elsewhere = max(((score, other, options) for other, (score, options) in found.items()), default=None)
    # The chosen option's own keys win a tie: a typo there is likelier than a change of option.
    if elsewhere and (here is None or elsewhere[0] - 0.05 > here[0]):
        return elsewhere[1], elsewhere[2]
    return (here[1], []) if here else None


# --------------------------------------------------------------------------- validation

MONITORS = ("val/acc1", "val/acc5", "val/loss")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclasses.dataclass(frozen=True)
class Domain:
    """The numbers a setting accepts: an interval such as `[0, 1)` or `(0, inf)`, integers
    only or not, null allowed or not; `says` is the domain in words, for the message."""

    interval: str
    says: str
    integer: bool = False
    nullable: bool = False

    def holds(self, value: float) -> bool:
        low, high = (float(bound) for bound in self.interval[1:-1].split(","))
        above = value >= low if self.interval[0] == "[" else value > low
        below = value <= high if self.interval[-1] == "]" else value < high
        return above and below


_POSITIVE_INT = Domain("[1, inf)", "must be positive", integer=True)

# Every numeric setting and its domain, checked in this order (absent keys are skipped:
# optimizer.momentum exists for SGD only). Model arguments are checked by the models.
RANGES: dict[str, Domain] = {
    "trainer.batch_size": _POSITIVE_INT,
    "trainer.eval_batch_size": _POSITIVE_INT,
    "trainer.grad_accum_steps": _POSITIVE_INT,
    "trainer.log_every_steps": _POSITIVE_INT,
    "optimizer.lr": Domain("(0, inf)", "must be positive"),
    "trainer.max_epochs": _POSITIVE_INT,
    "trainer.max_steps": Domain("[1, inf)", "must be positive, or null to train for max_epochs", True, True),
    "optimizer.weight_decay": Domain("[0, inf)", "must not be negative"),
    "trainer.ema_decay": Domain(
        "(0, 1)", "must be between 0 and 1 (e.g. 0.999), or null for no EMA", nullable=True
    ),
    "trainer.grad_clip": Domain(
        "(0, inf)",
        "must be positive (the largest gradient norm), or null to turn clipping off",
        nullable=True,
    ),
    "trainer.label_smoothing": Domain("[0, 1)", "must be in [0, 1) (0 turns it off; 0.1 is usual)"),
    "trainer.mixup_alpha": Domain("[0, inf)", "must not be negative (0 turns mixup off)"),
    "trainer.cutmix_alpha": Domain("[0, inf)", "must not be negative (0 turns cutmix off)"),
    "trainer.max_time": Domain(
        "(0, inf)", "must be positive (seconds), or null for no time limit", nullable=True
    ),
    "trainer.checkpoint_every_steps": Domain(
        "[1, inf)", "must be positive, or null to write last.pt at epoch ends only", True, True
    ),
    "trainer.keep_last_k": Domain(
        "[1, inf)", "must be positive, or null to keep every epoch{N}.pt", True, True
    ),
    "optimizer.momentum": Domain("[0, 1)", "must be in [0, 1) (0.9 is usual)"),
    "scheduler.warmup_steps": Domain(
        "[0, inf)", "must not be negative, or null to count the warmup in epochs", True, True
    ),
    "scheduler.warmup_epochs": Domain("[0, inf)", "must not be negative"),
    "scheduler.min_lr_ratio": Domain(
        "[0, 1]", "must be in [0, 1] (the final learning rate over optimizer.lr)"
    ),
    "dataset.val_split": Domain(
        "[0, 1)", "must be in [0, 1) (the share of training images held out for evaluation)"
    ),
    "dataset.num_workers": Domain(
        "[0, inf)", "must not be negative, or null for this process's share of the cores", True, True
    ),
    "dataset.shuffle_buffer": Domain(
        "[0, inf)", "must not be negative (training samples shuffled in windows of this many; 0: none)", True
    ),
    "seed": Domain("[0, inf)", "must not be negative", integer=True),
}

# Settings that name one of a few choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "trainer.monitor": MONITORS,
    "trainer.on_nonfinite": ("stop", "skip"),
    "trainer.precision": PRECISIONS,
    "dataset.on_error": ("fail", "skip"),
}

_ABSENT = object()


def _show(value: Any) -> str:
    """A value as the message shows it: strings quoted (as Python writes them), null as null."""
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def missing_keys(cfg: DictConfig) -> list[str]:
    """The dotted keys whose value is `???`, sorted (`hydra` aside). Read unresolved:
    OmegaConf.missing_keys raises on an interpolation that points at a missing value."""
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)  # a DictConfig converts to a dict
    container.pop("hydra", None)

    def walk(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [
                k for key, value in node.items() for k in walk(value, f"{prefix}.{key}" if prefix else key)
            ]
        return [prefix] if node == "???" else []

    return sorted(walk(container, ""))


def _check_interpolations(cfg: DictConfig) -> None:
    """Resolve every `${...}`: one that names a key that does not exist (or a resolver that
    fails) is a setting to fix, named with what it refers to."""
    for section in cfg:
        if section == "hydra":
            continue
        try:
            value = cfg[section]
            if OmegaConf.is_config(value):
                OmegaConf.to_container(value, resolve=True)
        except InterpolationResolutionError as e:
            key = e.full_key or str(section)
            raw: Any = OmegaConf.to_container(cfg, resolve=False)
            for part in key.split("."):
                raw = raw.get(part) if isinstance(raw, dict) else None
            target = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", str(raw))
            if target and OmegaConf.select(cfg, target[1], default=_ABSENT) is _ABSENT:
                hint = suggest_key(target[1], cfg)
                also = f" (did you mean {hint[0]}?)" if hint else ""
                raise ConfigError(f"{key}={raw} refers to {target[1]}, which does not exist{also}") from e
            detail = (e.msg or str(e)).splitlines()[0]
            raise ConfigError(f"{key}={raw} cannot be resolved: {detail}") from e


def _number(key: str, value: Any, rule: Domain) -> None:
    """A config value that must be a finite number (an integer when the rule says so)."""
    kind = "an integer" if rule.integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (rule.integer and not isinstance(value, int))
    ):
        raise ConfigError(f"{key}={_show(value)} must be {kind}" + (", or null" if rule.nullable else ""))
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number")


def validate(cfg: DictConfig) -> list[str]:
    """Check every setting of a composed training config against its domain, before anything
    is built. Raises ConfigError (one line: the key, its value, the range) for the first bad
    value; returns warnings for values that are legal but probably not meant."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(f"{missing[0]} is required here (marked ???): add {missing[0]}=... to the command")
    _check_interpolations(cfg)
    if cfg.get("model") is not None and cfg.model.get("pretrained") == "required":
        raise ConfigError(
            "this preset fine-tunes pretrained weights: add model.pretrained=NAME (e.g. ViT-B_16; "
            "python -m vitexp.weights lists them), a path, hf-hub:ORG/NAME or a URL"
        )
    fields = [f.name for f in dataclasses.fields(TrainerConfig)]
    for key in cfg.get("trainer") or {}:
        if key not in fields:
            hint = closest(str(key), fields)
            raise ConfigError(
                f"unknown key trainer.{key}: "
                + (
                    f"did you mean trainer.{hint}?"
                    if hint
                    else "there is no such setting (--cfg job lists them)"
                )
            )

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=_ABSENT)

    for key, rule in RANGES.items():
        value = get(key)
        if value is _ABSENT or (value is None and rule.nullable):
            continue
        _number(key, value, rule)
        if not rule.holds(value):
            raise ConfigError(f"{key}={_show(value)} {rule.says}")
    batch, accum = get("trainer.batch_size"), get("trainer.grad_accum_steps")
    if batch is not _ABSENT and accum is not _ABSENT and batch % accum:
        raise ConfigError(
            f"trainer.batch_size={batch} is not divisible by trainer.grad_accum_steps={accum}; the global "
            f"batch is split evenly into micro-batches"
        )
    for key, choices in CHOICES.items():
        value = get(key)
        if value is not _ABSENT and value not in choices:
            hint = closest(str(value), choices)
            also = f"; did you mean {hint}?" if hint else ""
            raise ConfigError(f"{key}={_show(value)} is not one of {', '.join(choices)}{also}")
    _check_streams(get)
    device = get("trainer.device")
    if device is not _ABSENT and not (isinstance(device, str) and _DEVICE.fullmatch(device)):
        raise ConfigError(
            f"trainer.device={_show(device)} is not a device name; use auto, cpu, cuda or cuda:N"
        )
    threads = get("trainer.num_threads")
    if threads not in (_ABSENT, "auto") and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ConfigError(f"trainer.num_threads={_show(threads)} must be auto or a positive integer")
    resume = get("trainer.resume")
    # The schema turns `trainer.resume=false` into the string 'False', which would be a path.
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        raise ConfigError(
            f"trainer.resume={resume}: give null (a fresh run), auto (this run dir's last.pt, if any) or the "
            f"path of a checkpoint"
        )
    return _warnings(get)


STREAMED_LOADERS = ("vitexp.data.load_wds", "vitexp.data.wds.load_wds")


def _check_streams(get: Callable[[str], Any]) -> None:
    """Settings of the shard and Hugging Face sources that cannot work together."""
    for key in ("dataset.streaming", "dataset.in_memory"):
        value = get(key)
        if value is not _ABSENT and not (
            isinstance(value, bool) or (value is None and key.endswith("memory"))
        ):
            also = ", or null to decide by size" if key.endswith("memory") else ""
            raise ConfigError(f"{key}={_show(value)} must be true or false{also}")
    streamed = get("dataset.load._target_") in STREAMED_LOADERS or get("dataset.streaming") is True
    val_split = get("dataset.val_split")
    if streamed and val_split not in (None, 0, 0.0, _ABSENT):
        raise ConfigError(
            f"dataset.val_split={val_split}: a streamed dataset cannot hold out random training samples; "
            f"set dataset.val_split=0 (it is evaluated on its test split)"
        )
    for key in ("dataset.train_shards", "dataset.test_shards"):
        value = get(key)
        if value is not _ABSENT and not (isinstance(value, str) and value) and not OmegaConf.is_list(value):
            raise ConfigError(
                f"{key}={_show(value)} must be a brace pattern, a list of shards or a .json index"
            )


def _warnings(get: Callable[[str], Any]) -> list[str]:
    """Legal values that are probably not what was meant."""
    warnings = []
    keep, every_epoch = get("trainer.keep_last_k"), get("trainer.save_every_epoch")
    if keep not in (None, _ABSENT) and every_epoch is False:
        warnings.append(f"trainer.keep_last_k={keep} has no effect without trainer.save_every_epoch=true")
    ema = get("trainer.ema_decay")
    if ema not in (None, _ABSENT) and ema < 0.9:
        warnings.append(
            f"trainer.ema_decay={ema} averages over only the last ~{1 / (1 - ema):.0f} steps; "
            f"EMA usually uses 0.99 to 0.9999"
        )
    smoothing = get("trainer.label_smoothing")
    if smoothing is not _ABSENT and smoothing >= 0.5:
        warnings.append(f"trainer.label_smoothing={smoothing} is unusually large (0.1 is usual)")
    lr = get("optimizer.lr")
    if lr is not _ABSENT and lr >= 1:
        warnings.append(f"optimizer.lr={lr} is unusually large (ViTs train with about 1e-4 to 3e-2)")
    val_split = get("dataset.val_split")
    if val_split not in (None, _ABSENT) and val_split > 0.5:
        warnings.append(f"dataset.val_split={val_split} holds out most of the training images")
    max_steps, warmup_steps = get("trainer.max_steps"), get("scheduler.warmup_steps")
    if max_steps not in (None, _ABSENT) and warmup_steps not in (None, _ABSENT) and warmup_steps >= max_steps:
        warnings.append(
            f"scheduler.warmup_steps={warmup_steps} >= trainer.max_steps={max_steps}: the learning rate "
            f"never leaves the warmup"
        )
    epochs, warmup_epochs = get("trainer.max_epochs"), get("scheduler.warmup_epochs")
    if (
        max_steps is None
        and warmup_steps in (None, _ABSENT)
        and warmup_epochs is not _ABSENT
        and warmup_epochs >= epochs
    ):
        warnings.append(
            f"scheduler.warmup_epochs={warmup_epochs} >= trainer.max_epochs={epochs}: the learning rate "
            f"never leaves the warmup"
        )
    return warnings
