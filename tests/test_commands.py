"""The commands' room: every command is a module of vitexp/commands/, run by what users type
(`python -m vitexp`, `python -m vitexp.NAME`, the `vitexp` console script) through an entry file
that only hands over to it, and every Hydra command checks its command line before torch loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import vitexp.commands
from tests.helpers import REPO
from vitexp.config import conf_dir

COMMANDS = [*vitexp.commands.HYDRA_COMMANDS, *vitexp.commands.ARGPARSE_COMMANDS]
# Settings given beside the typo: the inspection commands' required ones, so that the typo alone
# is wrong; for training a preset, which the check must know before the training module (which
# used to register the presets as it was imported) is loaded.
GIVEN = {"train": ["experiment=digits"], "shards": ["out=nowhere"]}


def entry_file(command: str) -> str:
    """The file `python -m` runs for the command."""
    return "vitexp/__main__.py" if command == "train" else f"vitexp/{command}.py"


def test_each_command_module_has_its_entry_and_its_config() -> None:
    modules = {p.stem for p in (REPO / "vitexp" / "commands").glob("*.py") if p.stem != "__init__"}
    assert modules == set(COMMANDS)
    for command in COMMANDS:
        entry = (REPO / entry_file(command)).read_text()
        assert f'run("{command}")' in entry, entry_file(command)
        # An entry file hands over and nothing more: importing the command module (and torch
        # with it) before `run` has checked the command line would undo the check below.
        assert not re.search(r"^\s*(from|import) vitexp\.commands\.", entry, re.M), entry_file(command)
    for config_name, _ in vitexp.commands.HYDRA_COMMANDS.values():
        assert (conf_dir() / f"{config_name}.yaml").is_file()
    with pytest.raises(ValueError, match="no command 'evaluat'"):
        vitexp.commands.run("evaluat")


def test_the_console_script_and_the_packages_include_the_commands() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"vitexp": "vitexp.__main__:main"}
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vitexp").rglob("__init__.py")}
    assert "vitexp.commands" in packages
    assert packages <= set(project["tool"]["setuptools"]["packages"])  # else a wheel lacks them


@pytest.mark.parametrize("command", vitexp.commands.HYDRA_COMMANDS)
def test_the_command_line_is_checked_before_torch_loads(command: str) -> None:
    """As tests/test_command_line.py does for `python -m vitexp`: a typo costs one line, not
    torch's start-up, and the command's module (which imports torch) is not even imported."""
    args = [*GIVEN.get(command, ["checkpoint=nope.pt"]), "bogus_key=1"]
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", vitexp.commands.typed(command), *args],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k not in ("VITEXP_DEBUG", "HYDRA_FULL_ERROR")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    timings = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert len(timings) > 100  # -X importtime did report the imports
    modules = {line.rsplit("|", 1)[1].strip() for line in timings}
    heavy = {
        m
        for m in modules
        if re.match(
            r"(torch|torchvision|matplotlib|PIL|vitexp\.(training|models|data|inference|commands\.))", m
        )
    }
    assert not heavy, sorted(heavy)
    messages = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert messages == [
        "error: unknown key bogus_key: there is no such setting "
        "(--cfg job lists them; +bogus_key=VALUE adds a new one)"
    ]
    assert result.returncode == 2
