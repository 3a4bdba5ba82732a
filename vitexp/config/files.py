"""Where vitexp's configs live, the resolvers they use, and the options of each config group.

In a source checkout (and an editable install) the configs are the repository's top-level
`conf/` and `experiments/`; a wheel carries the same files as `vitexp/_conf` and
`vitexp/_experiments`. Presets in `experiments/` are registered in Hydra's ConfigStore as
the `experiment` group, so `experiment=NAME` works from any working directory without
copying or linking them under `conf/`.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from vitexp.config.settings import settings_help

_PACKAGE = Path(__file__).resolve().parent.parent  # vitexp/


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


_registered: tuple[tuple[str, int, int], ...] = ()  # the preset files as last stored


def register_experiments() -> list[str]:
    """Store every `experiments/*.yaml` as option NAME of the `experiment` group, merged at
    the global package (as their `# @package _global_` header says). Returns the names.

    Every composition calls this; the files are read again only when one changed (or the store
    lost them), which was a third of the time of checking a command line."""
    global _registered
    paths = sorted(experiments_dir().glob("*.yaml"))
    stamp = tuple((str(path), stat.st_mtime_ns, stat.st_size) for path in paths for stat in [path.stat()])
    store = ConfigStore.instance()
    stored = store.repo.get("experiment", {})
    if stamp != _registered or any(f"{path.stem}.yaml" not in stored for path in paths):
        for path in paths:
            store.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")
        _registered = stamp
    return [path.stem for path in paths]


_launch_time: datetime.datetime | None = None


def set_launch_time(when: datetime.datetime | None) -> None:
    """Fix the time that `${launch_time:...}` formats: every process of a distributed launch
    sets rank 0's, so their run directories are one and the same. None: the current time."""
    global _launch_time
    _launch_time = when


def register_resolvers() -> None:
    """`${launch_time:PATTERN}`: Hydra's `${now:PATTERN}`, but the same in every process of a
    torchrun launch (Hydra re-registers `now` itself, so it cannot be pinned). Cached per
    config like `now`, and copied into sweep jobs (submitit's too) with Hydra's resolver cache.

    `${settings_help:}`: the trainer settings with their defaults, domains and docs, for the
    `--help` template of conf/config.yaml."""
    OmegaConf.register_new_resolver(
        "launch_time",
        lambda pattern: (_launch_time or datetime.datetime.now()).strftime(pattern),
        use_cache=True,
        replace=True,
    )
    # Hydra fills its help template with string.Template, where `$` starts a placeholder.
    OmegaConf.register_new_resolver("settings_help", lambda: settings_help().replace("$", "$$"), replace=True)


def group_options(group: str) -> list[str]:
    """The options of a config group: YAML files in conf/GROUP, or ConfigStore entries (the
    `experiment` group, `trainer`). Shared bases (conf/model_vit.yaml, ...) sit outside the
    groups and are never an option."""
    files = [p.stem for p in (conf_dir() / group).glob("*.yaml")]
    stored = ConfigStore.instance().repo.get(group, {})
    return sorted({*files, *(name.removesuffix(".yaml") for name in stored if name.endswith(".yaml"))})


def is_group(name: str) -> bool:
    """Whether `name` (e.g. `model`, `hydra/launcher`) is a config group one can choose an option of."""
    return (conf_dir() / name).is_dir() or isinstance(ConfigStore.instance().repo.get(name), dict)
