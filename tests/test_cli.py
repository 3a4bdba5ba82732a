"""The command line: one check before Hydra runs (did-you-mean, types, sweeps), and one error
handler for every command (exit codes, one line, tracebacks only for bugs)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra.core.config_store import ConfigStore

from tests.helpers import REPO, TINY_MODEL, compose_cfg, run_cli
from vitexp.cli import check_command_line, run_job
from vitexp.config import TrainerConfig, validate
from vitexp.errors import ConfigError, DataError, TrainingDiverged
from vitexp.training import train

RUN = ["dataset=fake", "model.img_size=16", *TINY_MODEL, "trainer.batch_size=32", "trainer.max_steps=1",
       "trainer.progress=false", "trainer.sample_figures=false"]  # fmt: skip
# A run whose learning-rate schedule raises (see failing_schedule) before the first step.
FAILING = ["scheduler._target_=tests.test_cli.failing_schedule"]


def failing_schedule(step: int, *, error: str, **settings: Any) -> float:
    """A test-only schedule (`scheduler._target_=tests.test_cli.failing_schedule
    +scheduler.error=KIND`): raises when the run first calls it, outside any config builder,
    so the error reaches the command line as it is. `none`: a constant schedule."""
    errors = {
        "data": DataError(MESSAGES["data"]),
        "diverged": TrainingDiverged(MESSAGES["diverged"], step=0),
        "bug": RuntimeError("simulated bug in a schedule"),
    }
    if error == "none":
        return 1.0
    raise errors[error]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "error:" in line]


# --------------------------------------------------------------------------- the check before Hydra

# (command, arguments, the one line; CHOICES stands for the list of choices)
MISTAKES = [
    ("config", "logger.mode=offline",
     "unknown key logger.mode: did you mean logger.wandb.mode (with logger=wandb)?"),
    ("config", "logger=wandb logger.mode=offline",
     "unknown key logger.mode: did you mean logger.wandb.mode?"),
    ("config", "model.hiden_size=8",
     "unknown key model.hiden_size: did you mean model.hidden_size?"),
    ("config", "trainer.max_epoch=3",
     "unknown key trainer.max_epoch: did you mean trainer.max_epochs?"),
    ("config", "trainr.max_epochs=3",
     "unknown key trainr.max_epochs: did you mean trainer.max_epochs?"),
    ("config", "experiments=digits",
     "unknown key experiments: did you mean experiment?"),
    ("config", "dataset.roott=x",
     "unknown key dataset.roott: did you mean dataset.root (with dataset=cifar10)?"),
    ("config", "model=cct_7_3x1 model.conv_layer=2",
     "unknown key model.conv_layer: did you mean model.conv_layers?"),
    ("config", "logger.wandb.mode=offline",
     "logger.wandb.mode is a setting of logger=wandb: add logger=wandb to the command"),
    ("config", "experiment=digits trainer.max_epoch=1",
     "unknown key trainer.max_epoch: did you mean trainer.max_epochs?"),
    ("config", "trainer.foo=1",
     "unknown key trainer.foo: there is no such setting (--cfg job lists them)"),
    ("config", "model.foo=1",
     "unknown key model.foo: there is no such setting (--cfg job lists them; "
     "+model.foo=VALUE adds a new one)"),
    ("config", "model=vit_b61",
     "unknown model 'vit_b61': choose one of CHOICES; did you mean vit_b16?"),
    ("config", "experiment=digit",
     "unknown experiment 'digit': choose one of CHOICES; did you mean digits?"),
    ("config", "-m model=vit_ti4,vit_q",
     "unknown model 'vit_q': choose one of CHOICES"),
    ("config", "trainer.batch_size=abc",
     "trainer.batch_size=abc must be an integer"),
    ("config", "trainer.compile=maybe",
     "trainer.compile=maybe must be true or false"),
    ("config", "trainer.compile=null",
     "trainer.compile=null must be true or false"),
    ("config", "trainer.max_epochs=2.5",
     "trainer.max_epochs=2.5 must be an integer"),
    ("config", "trainer.grad_clip=abc",
     "trainer.grad_clip=abc must be a number or null"),
    ("config", "-m trainer.batch_size=32,abc",
     "trainer.batch_size=abc must be an integer"),
    ("config", "+trainer.max_epochs=3",
     "+trainer.max_epochs: trainer.max_epochs is set already; drop the + to change it"),
    ("config", "~trainer.compile",
     "~trainer.compile: trainer has a fixed set of settings; set trainer.compile=... instead"),
    ("config", "optimizer.lr=1e-3,2e-3",
     "optimizer.lr=1e-3,2e-3 gives several values: add -m to run one job for each, or write "
     "optimizer.lr=[...] for a list"),
    ("config", "model.hidden_size=[1,",
     "cannot read 'model.hidden_size=[1,': no viable alternative at input '[1,'; write "
     "key=value (see https://hydra.cc/docs/advanced/override_grammar/basic/)"),
    ("evaluate", "checkpint=last.pt",
     "unknown key checkpint: did you mean checkpoint?"),
    ("evaluate", "dataset.roott=x",
     "unknown key dataset.roott: did you mean dataset.root (with dataset=cifar10)?"),
    ("evaluate", "dataset=cifar10 dataset.roott=x",
     "unknown key dataset.roott: did you mean dataset.root?"),
    ("predict", "top_kk=3",
     "unknown key top_kk: did you mean top_k?"),
    ("export", "format=onnx opsett=17",
     "unknown key opsett: did you mean opset?"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "args", "message"), MISTAKES, ids=[a for _, a, _ in MISTAKES])
def test_a_mistake_on_the_command_line_is_one_line_with_what_was_meant(command, args, message):
    with pytest.raises(ConfigError) as err:
        check_command_line(command, args.split())
    got = str(err.value)
    assert "\n" not in got
    if "CHOICES" in message:
        start, end = message.split("CHOICES")
        assert got.startswith(start) and got.endswith(end), got
        assert "vit_b16" in got.split("choose one of ")[1] or "digits" in got
    else:
        assert got == message


def test_an_unknown_option_never_suggests_a_shared_base():
    with pytest.raises(ConfigError) as err:
        check_command_line("config", ["model=model_vi"])
    choices = str(err.value).split("choose one of ")[1]
    assert "vit_b16" in choices and "model_" not in choices


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {"trainer": {"batch_size": "abc"}},
            "trainer.batch_size=abc must be an integer (in experiment/_broken)",
        ),
        (
            {"trainer": {"max_epoch": 3}},
            "unknown key trainer.max_epoch: did you mean trainer.max_epochs? (in experiment/_broken)",
        ),
    ],
)
def test_a_preset_with_a_mistake_is_named(node, message):
    store = ConfigStore.instance()
    store.store(group="experiment", name="_broken", node=node, package="_global_")
    try:
        with pytest.raises(ConfigError) as err:
            check_command_line("config", ["experiment=_broken"])
        assert str(err.value) == message
    finally:
        del store.repo["experiment"]["_broken.yaml"]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["experiment=digits", "model.hidden_size=96"],
        ["-m", "seed=0,1,2", "model=vit_ti4,vit_s4"],
        ["-m", "seed=range(0,3)"],
        ["model=vit_b16", "dataset=cifar10", "trainer.resume=auto"],
        ["+optimizer.momentum=0.9"],  # adds a key where there is no schema (the optimizer refuses it later)
        ["--help"],
        ["hydra.run.dir=/tmp/x", "hydra.job.chdir=false"],
    ],
)
def test_a_good_command_line_passes(args):
    check_command_line("config", args, validate)


def test_values_are_validated_before_a_single_run_but_by_each_job_of_a_sweep():
    with pytest.raises(ConfigError, match=r"^trainer\.grad_clip=-1\.0 must be positive"):
        check_command_line("config", ["trainer.grad_clip=-1"], validate)
    # a sweep: each job judges its values, so one bad value fails only its own job
    check_command_line("config", ["-m", "optimizer.lr=1e-3,-1"], validate)
    # printing the config needs no valid values
    check_command_line("config", ["dataset=imagefolder", "--cfg", "job"], validate)


# --------------------------------------------------------------------------- through the real CLI


def test_cli_bad_value_exits_2_with_one_line_before_making_a_run_dir(tmp_path):
    result = run_cli("trainer.grad_clip=-1", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: trainer.grad_clip=-1.0 must be positive (the largest gradient norm), or null to turn "
        "clipping off"
    ]
    assert "Traceback" not in result.stdout + result.stderr and not (tmp_path / "run").exists()


def test_cli_unknown_key_is_one_line_with_a_suggestion(tmp_path):
    result = run_cli("logger.mode=offline", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: unknown key logger.mode: did you mean logger.wandb.mode (with logger=wandb)?"
    ]


def run_module(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` with this checkout's vitexp, from `cwd`."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.slow
def test_inspection_command_mistakes_are_one_line(tmp_path):
    typo = run_module("vitexp.evaluate", "checkpint=last.pt", cwd=tmp_path)
    assert typo.returncode == 2
    assert typo.stderr.splitlines() == ["error: unknown key checkpint: did you mean checkpoint?"]
    nothing = run_module("vitexp.predict", cwd=tmp_path)
    assert nothing.returncode == 2
    assert nothing.stderr.splitlines() == ["error: checkpoint is required: add checkpoint=... to the command"]


@pytest.mark.slow
def test_inspection_multirun_reports_each_failed_job_and_exits_1(tmp_path):
    result = run_module("vitexp.predict", "-m", "checkpoint=a.pt,b.pt", "images=x.png", cwd=tmp_path)
    assert result.returncode == 1
    assert error_lines(result) == [
        "error: checkpoint a.pt does not exist; check the path",
        "error: checkpoint b.pt does not exist; check the path",
        "error: 2 job(s) failed",
    ]
    assert "Traceback" not in result.stderr and not (tmp_path / "error.txt").exists()


@pytest.mark.slow
def test_help_lists_no_base_and_every_trainer_setting_from_its_declaration():
    result = run_cli("--help")
    assert result.returncode == 0
    groups, rest = result.stdout.split("== Trainer settings ==")
    model_line = next(line for line in groups.splitlines() if line.startswith("model: "))
    assert "vit_b16" in model_line and "cct_7_3x1" in model_line and "cvt_13" in model_line
    assert "model_" not in groups and "schema" not in groups and "base" not in groups
    assert "trainer: default\n" in groups
    # one line per declared setting: KEY=DEFAULT, its domain, its doc (vitexp.config.settings)
    settings = rest.split("== Config ==")[0]
    for field in dataclasses.fields(TrainerConfig):
        line = next(line for line in settings.splitlines() if line.startswith(f"trainer.{field.name}="))
        assert field.metadata["doc"] in line, line
    assert re.search(r"^trainer\.batch_size=128 +integer in \[1, inf\) +global batch", settings, re.M)
    assert re.search(r"^trainer\.precision=fp32 +auto \| fp32 \| bf16 \| fp16 ", settings, re.M)
    assert "== Config ==" in rest and "Use --hydra-help" in rest  # Hydra's own help stays


MESSAGES = {
    "data": "dataset file broken.bin is truncated; download it again",
    "diverged": "the training loss became non-finite at step 0",
}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "code"), [("data", 3), ("diverged", 4)])
def test_cli_vitexp_errors_end_in_one_line_and_their_exit_code(kind, code, tmp_path):
    result = run_cli(*RUN, *FAILING, f"+scheduler.error={kind}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = error_lines(result)
    assert line.endswith(f"error: {MESSAGES[kind]}")


@pytest.mark.parametrize(("kind", "code"), [("data", 3), ("diverged", 4)])
def test_vitexp_errors_inside_a_job_are_one_line_and_their_exit_code(
    kind, code, tmp_path, caplog, monkeypatch
):
    """What the command does with an error its run raises (`cli.run_job`, the handler
    `python -m vitexp` runs the job under), in this process; the tests above go through the
    command line (test-all)."""
    monkeypatch.delenv("VITEXP_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose_cfg([*RUN, *FAILING, f"+scheduler.error={kind}"], run_dir=tmp_path / "run")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        run_job(train, cfg)
    assert stop.value.code == code
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == f"error: {MESSAGES[kind]}" and record.exc_info is None


def test_a_bug_inside_a_job_keeps_its_traceback(tmp_path, monkeypatch):
    """In this process, as test_cli_a_bug_keeps_its_traceback through the command line: the
    handler lets a bug propagate as it is (Python prints its traceback), not as a user error."""
    monkeypatch.delenv("VITEXP_DEBUG", raising=False)
    cfg = compose_cfg([*RUN, *FAILING, "+scheduler.error=bug"], run_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"^simulated bug in a schedule$"):
        run_job(train, cfg)


@pytest.mark.slow
def test_cli_debug_shows_the_traceback_of_user_errors_too(tmp_path):
    before = run_cli("trainer.grad_clip=-1", env={"VITEXP_DEBUG": "1"})
    assert before.returncode == 2 and "Traceback" in before.stderr
    assert before.stderr.splitlines()[-1].startswith("error: trainer.grad_clip=-1.0 must be positive")
    during = run_cli(
        *RUN, *FAILING, "+scheduler.error=data", f"hydra.run.dir={tmp_path}", env={"VITEXP_DEBUG": "1"}
    )
    assert during.returncode == 3
    assert (
        "Traceback" in during.stdout + during.stderr and "failing_schedule" in during.stdout + during.stderr
    )


@pytest.mark.slow
def test_cli_a_bug_keeps_its_traceback(tmp_path):
    result = run_cli(*RUN, *FAILING, "+scheduler.error=bug", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: simulated bug in a schedule" in result.stderr
    assert not error_lines(result)  # not dressed up as a user error


@pytest.mark.sweep
def test_cli_multirun_records_a_bug_and_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", *RUN, *FAILING, "+scheduler.error=bug,none", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1  # the sweep summary: a job failed
    assert (sweep / "0" / "error.txt").read_text() == "RuntimeError: simulated bug in a schedule\n"
    assert (sweep / "1" / "summary.json").is_file() and not (sweep / "1" / "error.txt").exists()
    job_log = (sweep / "0" / "__main__.log").read_text()
    assert "job failed" in job_log and "Traceback" in job_log and "failing_schedule" in job_log
    assert "error: 1 of 2 jobs failed (0)" in result.stderr


@pytest.mark.sweep
def test_cli_multirun_records_a_user_error_in_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", *RUN, *FAILING, "+scheduler.error=none,data", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1
    assert (sweep / "1" / "error.txt").read_text() == (
        "error: dataset file broken.bin is truncated; download it again\n"
    )
    assert (sweep / "0" / "summary.json").is_file()
    assert "Traceback" not in result.stdout + result.stderr


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def test_report_command_errors_are_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vitexp.report", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {tmp_path} is neither a run folder (it has no .hydra, metrics.jsonl, summary.json, "
        "error.txt) nor a sweep folder (no subfolder has .hydra/); give a run folder or a multirun folder"
    ]


def test_group_options_from_a_hydra_searchpath_folder_are_accepted(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("_target_: vitexp.models.VisionTransformer\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    check_command_line("config", [searchpath, "model=mine"])  # no error: the added folder offers it
    with pytest.raises(ConfigError, match=r"unknown model 'mien'.*\bmine\b.*did you mean mine\?"):
        check_command_line("config", [searchpath, "model=mien"])
    with pytest.raises(ConfigError, match="unknown model 'mine'"):
        check_command_line("config", ["model=mine"])
