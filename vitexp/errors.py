"""The errors vitexp raises for bad input, each with the exit status of the command line.

Every one of them is the user's to fix, and its message is one line that names the setting or
file to change; the command-line entries print that line without a traceback (the full one with
`VITEXP_DEBUG=1` or `HYDRA_FULL_ERROR=1`). Any other exception is a bug in vitexp and keeps its
traceback.

| error             | exit | meaning                                                           |
|-------------------|------|-------------------------------------------------------------------|
| ConfigError       | 2    | a setting, override or command-line argument cannot work          |
| DataError         | 3    | an input file (dataset, image, checkpoint, weights) is unusable   |
| TrainingDiverged  | 4    | the loss or gradient became non-finite; the run stopped unsaved   |
| (preempted)       | 75   | stopped on a signal after checkpointing (`training.preemption`)   |
"""

from __future__ import annotations

import re


class VitexpError(Exception):
    """Bad input of some kind; `exit_code` is the command line's exit status for it."""

    exit_code = 1


class ConfigError(VitexpError):
    """A setting, override or argument that cannot work; the message says what to change."""

    exit_code = 2


class DataError(VitexpError):
    """An input file that cannot be used as it is: a missing, corrupt, truncated or unsafe
    dataset file, image, checkpoint or weights file, or labels outside the classes."""

    exit_code = 3


class TrainingDiverged(VitexpError):
    """The training loss or gradient became non-finite (with `trainer.on_nonfinite=stop`)."""

    exit_code = 4

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def with_context(error: VitexpError, context: str) -> VitexpError:
    """A new error of `error`'s kind whose message is `context: message`, to be raised `from
    error`. The kind (ConfigError, DataError, ...) keeps the exit status; the class itself is
    never called (`type(error)(...)`), since a subclass may take other arguments."""
    message = f"{context}: {error}"
    for kind in (ConfigError, DataError):
        if isinstance(error, kind):
            return kind(message)
    wrapped = VitexpError(message)
    wrapped.exit_code = error.exit_code
    return wrapped


# An object's repr in a library's message (`<_io.BytesIO object at 0x7f...>`) says nothing to a
# user: the message around it names the file or setting already.
# A repr with `<...>` inside (`<locals>`) keeps its name, without the address.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>| at 0x[0-9a-fA-F]+")


def first_line(error: BaseException | str, limit: int = 160) -> str:
    """The first line of an exception's message (at most `limit` characters, object reprs left
    out), or its type when the message is empty: a third-party error quoted inside one of
    vitexp's one-line messages."""
    text = _OBJECT_REPR.sub("", str(error)).strip()
    if not text:
        return type(error).__name__
    return text.splitlines()[0][:limit]
