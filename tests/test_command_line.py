"""`vitexp.config.command_line`: each Hydra message it reads, pinned with Hydra's real exception;
values Hydra's grammar reads as syntax, answered with the quoted form to type; and the check of
a command line runs before torch loads."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from tests.helpers import REPO, compose_cfg
from vitexp.cli import check_command_line
from vitexp.config import conf_dir, validate
from vitexp.config.command_line import (
    ALREADY_SET,
    DELETE_OVERRIDE,
    IN_FILE,
    NAMED_IN,
    NO_DELETION,
    hydra_format,
    translate,
)
from vitexp.errors import ConfigError

# --------------------------------------------------------------------------- Hydra's messages

# (overrides, the format hydra_format must find, the pattern Hydra's first line must still
# match (None: read from the exception's attributes), the one line it becomes)
HYDRA_CASES = [
    (["trainer.max_epoch=3"], "unknown key", None,
     "unknown key trainer.max_epoch: did you mean trainer.max_epochs?"),
    (["logger.mode=offline"], "unknown key", None,
     "unknown key logger.mode: did you mean logger.wandb.mode (with logger=wandb)?"),
    (["trainer.batch_size=abc"], "wrong type", None,
     "trainer.batch_size=abc must be an integer"),
    (["+trainer.max_epochs=3"], "already set", ALREADY_SET,
     "+trainer.max_epochs: trainer.max_epochs is set already; drop the + to change it"),
    (["~trainer.compile"], "fixed section", DELETE_OVERRIDE,
     "~trainer.compile: trainer has a fixed set of settings; set trainer.compile=... instead"),
    (["experiment=_broken"], "wrong type", IN_FILE,
     "trainer.batch_size=abc must be an integer (in experiment/_broken)"),
    (["hydra/sweeper=optuna_x"], "unknown option", NAMED_IN,
     "unknown hydra/sweeper 'optuna_x': choose one of basic, optuna_resumable, vitexp_optuna; "
     "is its Hydra plugin installed? (pip install -e '.[sweep]')"),
]  # fmt: skip


@pytest.fixture
def broken_preset():
    store = ConfigStore.instance()
    store.store(
        group="experiment", name="_broken", node={"trainer": {"batch_size": "abc"}}, package="_global_"
    )
    yield
    del store.repo["experiment"]["_broken.yaml"]


@pytest.mark.parametrize(("overrides", "kind", "pattern", "line"), HYDRA_CASES, ids=lambda c: str(c))
def test_each_hydra_message_read_is_pinned_with_hydras_own_exception(
    broken_preset, overrides, kind, pattern, line
):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        with pytest.raises(Exception) as caught:
            compose("config", overrides, return_hydra_config=True)
        error = caught.value
        assert hydra_format(error) == kind, f"Hydra's message changed: {error!r} (cause {error.__cause__!r})"
        if pattern is not None:
            assert pattern.match(str(error).splitlines()[0]), str(error)
        if kind == "fixed section":
            assert NO_DELETION in str(error.__cause__)
        assert translate(error, "config", overrides) == line


def test_an_override_hydra_cannot_parse_names_itself_and_its_reason():
    with pytest.raises(OverrideParseException) as caught:
        OverridesParser.create().parse_overrides(["model.hidden_size=[1,"])
    assert caught.value.override == "model.hidden_size=[1,"
    assert caught.value.message.splitlines()[0] == "no viable alternative at input '[1,'"


def test_a_message_hydra_has_not_written_before_is_shown_as_it_is():
    error = RuntimeError("something new\nand more")
    assert hydra_format(error) == ""
    assert translate(error, "config", []) == "something new"


# --------------------------------------------------------------------------- quoting

SHARDS = "/data/train-{000000..000146}.tar"
URL = "https://example.org/w.pth#sha256=abc"
QUOTING = [
    (
        ["dataset=wds", f"dataset.train_shards={SHARDS}", "dataset.test_shards=/data/test.json",
         "dataset.num_classes=10"],
        f"dataset.train_shards={SHARDS}: Hydra's override grammar takes no {{ or }} in an unquoted value; "
        f"quote it: 'dataset.train_shards=\"{SHARDS}\"'",
        ("dataset.train_shards", SHARDS),
    ),
    (
        [f"model.pretrained={URL}"],
        f"model.pretrained={URL}: Hydra's override grammar takes no # or = in an unquoted value; "
        f"quote it: 'model.pretrained=\"{URL}\"'",
        ("model.pretrained", URL),
    ),
    (
        ["dataset=imagefolder", "dataset.num_classes=2", "dataset.root=/data/a,b"],
        "dataset.root=/data/a,b gives several values: add -m to run one job for each, write "
        "dataset.root=[...] for a list, or quote it: 'dataset.root=\"/data/a,b\"'",
        ("dataset.root", "/data/a,b"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("args", "line", "setting"), QUOTING, ids=["braces", "fragment", "comma"])
def test_a_value_hydra_reads_as_syntax_gets_the_quoted_form_to_type(args, line, setting):
    with pytest.raises(ConfigError) as err:
        check_command_line("config", args, validate)
    assert str(err.value) == line
    # The form shown is what to type: through a shell it passes, and holds the value meant.
    typed = shlex.split(line.rsplit(": ", 1)[1])
    fixed = [typed[0] if a.startswith(setting[0] + "=") else a for a in args]
    check_command_line("config", fixed, validate)
    key, value = setting
    group, name = key.split(".")
    assert compose_cfg(fixed)[group][name] == value


def test_the_shard_patterns_documented_in_the_wds_config_pass_the_check():
    """conf/dataset/wds.yaml shows the commands; each must be one a shell passes to Hydra as is."""
    lines = [
        line.split("#", 1)[1].strip()
        for line in (conf_dir() / "dataset" / "wds.yaml").read_text().splitlines()
        if line.startswith("#   python -m vitexp ")
    ]
    assert any("{" in line for line in lines), lines
    for line in lines:
        check_command_line("config", shlex.split(line)[3:], validate)


# --------------------------------------------------------------------------- before torch


def test_the_command_line_is_checked_before_torch_or_vitexps_library_loads():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vitexp", "trainer.max_epoch=3"],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k not in ("VITEXP_DEBUG", "HYDRA_FULL_ERROR")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    timings = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert len(timings) > 100  # -X importtime did report the imports
    modules = {line.rsplit("|", 1)[1].strip() for line in timings}
    heavy = {
        m for m in modules if re.match(r"(torch|torchvision|matplotlib|vitexp\.(training|models|data))\b", m)
    }
    assert not heavy, sorted(heavy)
    messages = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert messages == ["error: unknown key trainer.max_epoch: did you mean trainer.max_epochs?"]
