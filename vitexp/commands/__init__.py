"""The commands users type, on top of the library: one module each.

    train      python -m vitexp [key=value ...]                  (and the `vitexp` console script)
    evaluate   python -m vitexp.evaluate checkpoint=PATH         loss, accuracy, confusion matrix
    attention  python -m vitexp.attention checkpoint=PATH        attention maps of an image
    predict    python -m vitexp.predict checkpoint=PATH images=  the top classes of image files
    export     python -m vitexp.export checkpoint=PATH           TorchScript or ONNX
    shards     python -m vitexp.shards dataset=NAME out=DIR      a dataset as WebDataset shards
    report     python -m vitexp.report FOLDER...                 a table and plots of runs and sweeps
    weights    python -m vitexp.weights [SOURCE...]              list or fetch pretrained weights

`python -m` needs a module path, so `vitexp/__main__.py`, `vitexp/evaluate.py`, ... remain as a
few lines that hand over to `run(NAME)` here. `run` checks a Hydra command's command line
(composition, did-you-mean, one-line errors: `vitexp.cli`, which imports no torch) before it
imports the command's module, which imports torch: a typo costs no more than composing the
config. The commands import the library and never each other (import-linter, pyproject.toml).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from vitexp.cli import check_command_line_or_exit
from vitexp.config import validate

# The commands that run through Hydra: their config (conf/NAME.yaml) and the check of the
# composed config that comes with the command-line check (training validates every setting
# there; an inspection command checks its own settings as it starts).
HYDRA_COMMANDS: dict[str, tuple[str, Callable[[DictConfig], Any] | None]] = {
    "train": ("config", validate),
    "evaluate": ("evaluate", None),
    "attention": ("attention", None),
    "predict": ("predict", None),
    "export": ("export", None),
    "shards": ("shards", None),
}
# The commands with their own argparse command line: `main(argv)` returns the exit status.
ARGPARSE_COMMANDS = ("report", "weights")


def typed(command: str) -> str:
    """The module users run with `python -m`: `vitexp` for training, `vitexp.NAME` otherwise."""
    return "vitexp" if command == "train" else f"vitexp.{command}"


def run(command: str) -> None:
    """Run `command` on `sys.argv` and exit with its status: a Hydra command's command line is
    checked (one line and status 2 when it fails) before its module is imported."""
    if command in HYDRA_COMMANDS:
        config_name, check = HYDRA_COMMANDS[command]
        check_command_line_or_exit(config_name, check)
    elif command not in ARGPARSE_COMMANDS:
        raise ValueError(f"no command {command!r}")  # a bug in an entry file, not a user's typo
    sys.exit(importlib.import_module(f"vitexp.commands.{command}").main())
