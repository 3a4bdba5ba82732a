"""W&B never stops training (#27): a server that cannot be reached (refused, or silent as on a
compute node without a network) makes the run log offline with one warning naming `wandb sync`;
when even offline fails the run goes on without W&B; `mode=online` without credentials is one
line; and a run that dies before its first metric leaves nothing that blocks its re-run.

No W&B server is involved: the online runs point `WANDB_BASE_URL` at a closed port, or at a
socket on 127.0.0.1 that accepts connections and never answers, with a fake key and a short
`logger.wandb.init_timeout`.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_cli
from tests.test_tracking import SMALL
from vitexp.errors import ConfigError
from vitexp.training import train
from vitexp.training.loggers import JsonlLogger, WandbLogger

FAKE_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters, as W&B's keys are


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings file
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A W&B base URL whose connections are accepted by the kernel and never answered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "W&B" in r.getMessage()
    ]


@pytest.mark.wandb
def test_unreachable_server_run_finishes_offline(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        *SMALL,
        "trainer.max_steps=2",
        "trainer.sample_figures=false",
        "logger=wandb",
        "logger.wandb.init_timeout=2",
        f"hydra.run.dir={run_dir}",
        env={
            "WANDB_MODE": "online",  # in the environment, as on a cluster; the fallback overrides it
            "WANDB_API_KEY": FAKE_KEY,
            "WANDB_BASE_URL": _closed_port_url(),
            "HOME": str(tmp_path / "home"),
        },
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert (run_dir / "summary.json").is_file()
    told = [line for line in output.splitlines() if "W&B: the online run could not start" in line]
    assert len(told) == 1, output[-3000:]
    sync = re.search(r"`wandb sync (\S+)`", told[0])
    assert sync and Path(sync[1]).parent == run_dir / "wandb", told[0]
    assert Path(sync[1]).name.startswith("offline-run-") and list(Path(sync[1]).glob("run-*.wandb"))


@pytest.mark.wandb
def test_silent_server_times_out_and_logs_offline(
    silent_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    logger = WandbLogger(run_dir=tmp_path, run_config={"a": 1}, mode="auto", init_timeout=1)
    try:
        assert logger.run.settings.mode == "offline" and logger.run_id
        logger.log({"train/loss": 1.0}, step=1)
    finally:
        logger.finish()
    (warning,) = _warnings(caplog)
    assert warning.startswith("W&B: the online run could not start (") and "`wandb sync " in warning


def test_when_offline_fails_too_training_goes_on_without_wandb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, no_credentials: None
) -> None:
    import wandb

    class Unwritable:
        def __repr__(self) -> str:
            return object.__repr__(self)

    def refuse(**kwargs: Any) -> None:
        raise OSError(f"cannot write {Unwritable()!r}")  # a message with an object's address in it

    monkeypatch.setattr(wandb, "init", refuse)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    logger = WandbLogger(run_dir=tmp_path, run_config={}, mode="online")
    logger.log({"train/loss": 1.0}, step=1)
    logger.summary({"best": 1.0})
    logger.images("val/predictions", [], step=1)
    logger.finish()
    assert logger.run is None and logger.run_id is None
    (warning,) = _warnings(caplog)
    assert warning.startswith("W&B could not start (online: cannot write <")
    assert warning.endswith("training goes on without W&B (metrics.jsonl has every metric)")
    assert " at 0x" not in warning, warning


@pytest.mark.usefixtures("no_credentials")
def test_online_without_credentials_is_one_line_and_the_rerun_is_not_refused(cfg_factory: Any) -> None:
    cfg = cfg_factory(*SMALL, "trainer.max_steps=1", "trainer.sample_figures=false", "logger=wandb")
    cfg.logger.wandb.mode = "online"
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert str(error.value) == (
        "logger.wandb.mode=online needs W&B credentials and none are set: run `wandb login`, "
        "set WANDB_API_KEY, or set logger.wandb.mode=offline (or auto) to log offline and `wandb sync` later"
    )
    run_dir = Path(cfg.run_dir)
    assert not (run_dir / "metrics.jsonl").exists()
    cfg.logger.wandb.mode = "disabled"
    train(cfg)  # the same folder, no trainer.overwrite: nothing of the dead run is in the way
    assert (run_dir / "metrics.jsonl").stat().st_size > 0


@pytest.mark.usefixtures("no_credentials")
def test_unknown_mode_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"^logger.wandb.mode=onlin is not a W&B mode: use one of auto, "):
        WandbLogger(run_dir=tmp_path, run_config={}, mode="onlin")
    with pytest.raises(ConfigError, match=r"init_timeout=0 must be a number of seconds > 0"):
        WandbLogger(run_dir=tmp_path, run_config={}, mode="disabled", init_timeout=0)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(
        ConfigError, match=r"^WANDB_MODE=online \(in the environment\) needs W&B .* unset WANDB_MODE"
    ):
        WandbLogger(run_dir=tmp_path, run_config={}, mode="offline")


def test_metrics_file_appears_with_its_first_row(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    unused = JsonlLogger(path)
    unused.finish()
    assert not path.exists()
    used = JsonlLogger(path)
    used.log({"train/loss": 1.0}, step=1)
    used.finish()
    assert path.read_text() == '{"step": 1, "train/loss": 1.0}\n'


def test_online_without_credentials_is_refused_by_the_command_line_check(tmp_path, monkeypatch) -> None:
    """Before anything is built (no model, no data): the check every command runs first."""
    from vitexp.cli import check_command_line
    from vitexp.config import validate

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no such file: no stored login
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"^logger\.wandb\.mode=online needs W&B credentials"):
        check_command_line("config", ["logger=wandb", "logger.wandb.mode=online"], validate)
    with pytest.raises(ConfigError, match=r"^logger\.wandb\.init_timeout=0 must be positive"):
        check_command_line("config", ["logger=wandb", "logger.wandb.init_timeout=0"], validate)
