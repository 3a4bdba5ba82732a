"""Every setting against its declaration, before anything is built: `validate(cfg)`.

The declarations (`vitexp.config.settings`) say each setting's type and domain; here they are
checked, each in one place, with one-line messages naming the key, its value and what it may
be. Checks that involve several settings, and warnings for legal values that are probably not
meant, follow.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from vitexp.config.command_line import closest, suggest_key, unknown_key_line
from vitexp.config.nodes import missing_keys
from vitexp.config.settings import Choices, Declared, Domain, TrainerConfig, declared
from vitexp.config.tracking import wandb_mode
from vitexp.errors import ConfigError

_ABSENT = object()


def _show(value: Any) -> str:
    """A value as the message shows it: strings quoted (as Python writes them), null as null."""
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def check_value(key: str, value: Any, domain: Domain) -> None:
    """`value` of setting `key` is in `domain`; else a ConfigError (one line: the key, the
    value, what it may be, and for a name the closest choice). The runtime checks the same
    domains for the commands' own settings (`device=`, `precision=`)."""
    if domain.holds(value):
        return
    hint = closest(str(value), domain.options) if isinstance(domain, Choices) else None
    raise ConfigError(f"{key}={_show(value)} {domain.says}" + (f"; did you mean {hint}?" if hint else ""))


def check_setting(setting: Declared, value: Any) -> None:
    """A declared setting's value: its type (a finite number where it is one), then its domain."""
    problem = setting.type_error(value)
    if problem is None and isinstance(value, float) and not math.isfinite(value):
        problem = "must be a finite number"
    if problem is not None:
        raise ConfigError(f"{setting.key}={_show(value)} {problem}")
    if value is not None and setting.domain is not None:
        check_value(setting.key, value, setting.domain)


def check_batch_split(batch_size: int, grad_accum_steps: int, processes: int = 1) -> None:
    """The global batch splits evenly into `processes` × `grad_accum_steps` micro-batches."""
    if batch_size % (processes * grad_accum_steps) == 0:
        return
    if processes == 1:
        raise ConfigError(
            f"trainer.batch_size={batch_size} is not divisible by trainer.grad_accum_steps="
            f"{grad_accum_steps}; the global batch is split evenly into micro-batches"
        )
    raise ConfigError(
        f"trainer.batch_size={batch_size} does not split evenly over {processes} processes × "
        f"{grad_accum_steps} accumulation steps; use a multiple of {processes * grad_accum_steps}"
    )


def validate(cfg: DictConfig) -> list[str]:
    """Check every setting of a composed training config against its declaration, before
    anything is built. Raises ConfigError (one line: the key, its value, the domain) for the
    first bad value; returns warnings for values that are legal but probably not meant."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(f"{missing[0]} is required here (marked ???): add {missing[0]}=... to the command")
    _check_interpolations(cfg)
    if cfg.get("model") is not None and cfg.model.get("pretrained") == "required":
        raise ConfigError(
            "this preset fine-tunes pretrained weights: add model.pretrained=NAME (e.g. ViT-B_16; "
            "python -m vitexp.weights lists them), a path, hf-hub:ORG/NAME or a URL"
        )
    # Hydra refuses an unknown trainer key, but `+trainer.KEY=...` adds one past the schema.
    fields = dict.fromkeys(TrainerConfig.__dataclass_fields__)
    for key in cfg.get("trainer") or {}:
        if key not in fields:
            dotted = f"trainer.{key}"
            raise ConfigError(
                unknown_key_line(dotted, suggest_key(dotted, {"trainer": fields}), addable=False)
            )

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=_ABSENT)

    for key, setting in declared().items():
        value = get(key)
        if value is not _ABSENT:
            check_setting(setting, value)
    batch, accum = get("trainer.batch_size"), get("trainer.grad_accum_steps")
    if batch is not _ABSENT and accum is not _ABSENT:
        check_batch_split(batch, accum)
    _check_streams(get)
    mode = get("logger.wandb.mode")
    if mode not in (_ABSENT, "auto") or (mode is not _ABSENT and os.environ.get("WANDB_MODE")):
        wandb_mode(str(mode))  # online without credentials: one line now, not once the run is built
    return _warnings(get)


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
