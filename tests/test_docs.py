"""Every vitexp command in the README, docs/ and experiments/README.md is one that parses:
each `python -m vitexp…`, `torchrun … -m vitexp` and `vitexp …` line of a fenced block, and
each such inline code span, is composed through the command-line check the command itself
runs first (in-process, no training), so a documented command with an unknown key or option, a
value of the wrong type, a missing required setting or an override Hydra's grammar rejects
fails here. An example of an error (`$ command` followed by `error: ...` in a console block)
must fail with that line.

Placeholders such as `RUN/best.pt` or `/data/pets` are fine: the check is about the command
line, not about the files it names."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

import vitexp.commands
import vitexp.config.command_line
from tests.helpers import REPO
from vitexp.cli import check_command_line, require_settings
from vitexp.config import conf_dir
from vitexp.config.command_line import hydra_args
from vitexp.errors import ConfigError
from vitexp.models.weights.sources import find_named

PAGES = sorted((REPO / "docs").glob("*.md"))
DOCS = [REPO / "README.md", *PAGES, REPO / "experiments" / "README.md"]

# The commands that run through Hydra, by the module users type (`vitexp`, `vitexp.evaluate`,
# ...): their config (conf/NAME.yaml) and the check of the composed config that the command
# makes before (training) or as it starts (the others: their own required settings).
HYDRA_COMMANDS: dict[str, tuple[str, Callable[[DictConfig], Any]]] = {
    vitexp.commands.typed(name): (config_name, check or require_settings)
    for name, (config_name, check) in vitexp.commands.HYDRA_COMMANDS.items()
}
# The commands with their own argparse command line: the module whose `main(argv)` reads it.
ARGPARSE_COMMANDS = {
    vitexp.commands.typed(name): f"vitexp.commands.{name}" for name in vitexp.commands.ARGPARSE_COMMANDS
}

FENCE = re.compile(r"^\s*```(\w*)")
# A line that starts a command: an optional prompt, environment assignments, `time`, then the program.
COMMAND_START = re.compile(
    r"^\s*(\$\s+)?([A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(time\s+)?(\S*python3?|torchrun|vitexp)(\s|$)"
)
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str  # as written (continuations joined)
    module: str  # vitexp, vitexp.evaluate, ...
    args: tuple[str, ...]
    error: str | None = None  # the `error: ...` line a console example shows right after it


def parse_command(text: str, where: str) -> Command | None:
    """The vitexp command a shell line runs, or None when it runs something else."""
    words = shlex.split(text.lstrip().removeprefix("$ "), comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words.pop(0)  # VAR=value before the command
    if words and words[0] == "time":
        words.pop(0)
    if words and words[-1] == "&":
        words.pop()
    if not words:
        return None
    program = Path(words[0]).name
    if program == "vitexp":
        return Command(where, text, "vitexp", tuple(words[1:]))
    if program in ("python", "python3", "torchrun") and "-m" in words:
        i = words.index("-m")
        if i + 1 < len(words) and re.fullmatch(r"vitexp(\.\w+)*", words[i + 1]):
            module = words[i + 1].removesuffix(".__main__")
            rest = words[i + 2 :]
            if program == "torchrun" or words[1:i] == []:
                return Command(where, text, module, tuple(rest))
    if any(w == "-m" and n.startswith("vitexp") for w, n in itertools.pairwise(words)):
        raise AssertionError(f"{where}: a vitexp command this test cannot read: {text}")
    return None


def fenced_commands(path: Path) -> Iterator[Command]:
    """The commands of the fenced shell blocks of a Markdown file; `\\` continues a line."""
    lines = path.read_text().splitlines()
    lang: str | None = None  # None: outside a fence
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            lang = fence[1] if lang is None else None
            i += 1
            continue
        start = i
        i += 1
        if lang not in SHELL_BLOCKS or not COMMAND_START.match(line):
            if lang in SHELL_BLOCKS and "-m vitexp" in line and not line.lstrip().startswith("#"):
                where = f"{path.relative_to(REPO)}:{start + 1}"
                raise AssertionError(f"{where}: a vitexp command this test cannot read: {line}")
            continue
        text = line
        while text.rstrip().endswith("\\") and i < len(lines):
            text = text.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        command = parse_command(text, f"{path.relative_to(REPO)}:{start + 1}")
        if command is None:
            continue
        shown = lines[i] if i < len(lines) else ""
        if lang == "console" and shown.startswith("error: "):
            command = dataclasses.replace(command, error=shown.removeprefix("error: "))
        yield command


INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def inline_commands(path: Path) -> Iterator[Command]:
    """Inline code spans that are whole commands (`python -m vitexp model=vit_b16 ...` is a
    fragment: a word ending in `...` or `…`, or no arguments, means the span only names or
    abbreviates a command)."""
    lines = path.read_text().splitlines()
    outside: list[tuple[int, str]] = []
    inside = False
    for n, line in enumerate(lines, 1):
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            outside.append((n, line))
    text = "\n".join(line for _, line in outside)
    for match in INLINE.finditer(text):
        span = " ".join(match[1].split())
        if not COMMAND_START.match(span) or span.startswith("$"):
            continue
        line_no = outside[text.count("\n", 0, match.start())][0]
        if any(word.endswith(("...", "…")) for word in span.split()):
            continue  # a fragment: `python -m vitexp model=vit_b16 ...`
        try:
            command = parse_command(span, f"{path.relative_to(REPO)}:{line_no}")
        except ValueError:  # a span the shell could not read either
            raise AssertionError(f"{path.relative_to(REPO)}:{line_no}: not a shell command: {span}") from None
        if command is None or not command.args:
            continue  # `python -m vitexp.attention` names the command
        yield command


def documented_commands() -> list[Command]:
    """Each command once (the first place it is shown), in the order of the docs."""
    unique: dict[tuple[str, tuple[str, ...], str | None], Command] = {}
    for path in DOCS:
        for c in (*fenced_commands(path), *inline_commands(path)):
            unique.setdefault((c.module, c.args, c.error), c)
    return list(unique.values())


COMMANDS = documented_commands()


def check_pretrained_names(values: list[str]) -> None:
    """A weights source that is neither a URL, a Hub id, nor a file path must be a name
    vitexp knows (`python -m vitexp.weights` lists them)."""
    for value in values:
        looks_like_file = "/" in value or value.endswith((".pt", ".pth", ".bin", ".npz", ".safetensors"))
        timm_own = value in ("True", "False")  # model=timm: the weights timm names for model.name, or none
        if value.startswith("hf-hub:") or "://" in value or looks_like_file or timm_own:
            continue
        assert find_named(value) is not None, f"model.pretrained={value} is not a known weights name"


def check_hydra_command(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    config_name, check = HYDRA_COMMANDS[command.module]
    args = list(command.args)
    composed: list[DictConfig] = []

    def recording_compose(*a: Any, **kw: Any) -> DictConfig:
        cfg = compose(*a, **kw)
        composed.append(cfg)
        return cfg

    monkeypatch.setattr(vitexp.config.command_line, "compose", recording_compose)
    check_command_line(config_name, args, check)
    parsed_args = hydra_args(args)
    assert parsed_args is not None, f"Hydra itself would have to read {command.text}"
    overrides = OverridesParser.create().parse_overrides(parsed_args.overrides)
    weights = [o for o in overrides if o.key_or_group == "model.pretrained" and not o.is_sweep_override()]
    check_pretrained_names([str(o.value()) for o in weights])
    # A single run: check_command_line judged it (and took `hydra` off the config it checked).
    # A sweep: -m, or a preset that sets hydra.mode (hparams_search=...).
    preset_sweep = bool(composed) and "hydra" in composed[0] and composed[0].hydra.mode == RunMode.MULTIRUN
    if parsed_args.multirun or preset_sweep:
        # The check leaves the values of a sweep's jobs to each job: judge them here as each
        # job will, on the configs the check composed (every value of every swept key).
        for cfg in composed:
            with open_dict(cfg):
                del cfg["hydra"]
            check(cfg)


class _Parsed(Exception):
    """Raised instead of running a command once its argparse command line has been read."""


def check_argparse_command(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    module = importlib.import_module(ARGPARSE_COMMANDS[command.module])
    with pytest.raises(_Parsed) as parsed:
        try:
            module.main(list(command.args))
        except SystemExit as e:
            raise AssertionError(f"{command.where}: {command.text} does not parse (exit {e.code})") from e
    if command.module == "vitexp.weights":
        check_pretrained_names(list(parsed.value.args[0].sources))


def expected(message: str) -> re.Pattern[str]:
    """An error line as the docs show it; `…` stands for text left out."""
    return re.compile(".*?".join(re.escape(part) for part in message.split("…")))


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_composes(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    known = (*HYDRA_COMMANDS, *ARGPARSE_COMMANDS)
    assert command.module in known, f"{command.where}: python -m {command.module} is not a vitexp command"
    if command.error is not None:
        with pytest.raises(ConfigError) as error:
            check_hydra_command(command, monkeypatch)
        assert expected(command.error).fullmatch(str(error.value)), str(error.value)
    elif command.module in HYDRA_COMMANDS:
        check_hydra_command(command, monkeypatch)
    else:
        check_argparse_command(command, monkeypatch)


def test_every_command_module_is_known_to_this_test() -> None:
    """A new command (a module run with `python -m`) needs its entry in vitexp.commands, else
    its documented commands would not be checked."""
    modules = {
        "vitexp." + p.stem
        for p in (REPO / "vitexp").glob("*.py")
        if 'if __name__ == "__main__":' in p.read_text() and p.stem != "__main__"
    }
    assert modules | {"vitexp"} == set(HYDRA_COMMANDS) | set(ARGPARSE_COMMANDS)
    for config_name, _ in HYDRA_COMMANDS.values():
        assert (conf_dir() / f"{config_name}.yaml").is_file()


def test_the_docs_show_each_command_and_each_page() -> None:
    """The reader finds every command in the docs, and the extraction finds them (so that a
    change to the Markdown cannot silently leave the commands unchecked)."""
    shown = {c.module for c in COMMANDS}
    assert shown == set(HYDRA_COMMANDS) | set(ARGPARSE_COMMANDS)
    assert any(c.text.lstrip().startswith("torchrun") for c in COMMANDS)
    assert any(c.error is not None for c in COMMANDS)
    readme = [c for c in COMMANDS if c.where.startswith("README.md:")]
    assert len(readme) >= 20
    for page in PAGES:
        assert f"(docs/{page.name}" in (REPO / "README.md").read_text(), f"README does not link {page.name}"


def test_links_between_the_docs_resolve() -> None:
    """Relative links and their #anchors (GitHub's: lower case, punctuation dropped, spaces to
    hyphens) point at files and headings that exist."""

    def anchors(path: Path) -> set[str]:
        headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M)
        return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}

    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if "://" in target:
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.relative_to(REPO)}: link to {target}: no such file"
            if anchor:
                assert anchor in anchors(linked), (
                    f"{path.relative_to(REPO)}: link to {target}: no such heading"
                )
