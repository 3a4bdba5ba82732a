"""vitexp from Python, as a notebook uses it: a fresh interpreter, no command line, no
registration step (`vitexp.compose` + `vitexp.train`, README and docs/configuration.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vitexp
from tests.helpers import REPO
from vitexp.errors import ConfigError


def documented_snippet() -> str:
    """The Python block of docs/configuration.md's "From Python" section, as written."""
    text = (REPO / "docs" / "configuration.md").read_text().split("## From Python", 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


NOTEBOOK = (
    textwrap.dedent(
        """
    import sys
    import vitexp

    assert "torch" not in sys.modules and "hydra" not in sys.modules, "import vitexp stays light"
    print("version", vitexp.__version__)
    """
    )
    + documented_snippet()
    + 'print("best", best)\n'
)


@pytest.mark.slow
def test_compose_and_train_from_a_fresh_interpreter(tmp_path: Path) -> None:
    """What a notebook does: the documented snippet, as written, in a folder that is not the
    checkout; the run logs its progress to the console without any logging set up."""
    result = subprocess.run(
        [sys.executable, "-c", NOTEBOOK], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"version {vitexp.__version__}" in result.stdout
    best = float(result.stdout.split("best ")[1].split()[0])
    run_dir = tmp_path / "outputs" / "notebook"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["val/acc1"] == pytest.approx(best) and 0 < best <= 1
    assert (run_dir / "last.pt").is_file() and (run_dir / "curves.png").is_file()
    assert "epoch 3/3" in result.stderr  # the console logging train() sets up when none is


def test_compose_checks_the_overrides_as_the_command_line_does() -> None:
    with pytest.raises(ConfigError, match=r"^unknown key trainer\.max_epoch\b.*trainer\.max_epochs"):
        vitexp.compose(["trainer.max_epoch=3"])
    with pytest.raises(ConfigError, match=r"^trainer\.batch_size=0 must be positive"):
        vitexp.compose(["trainer.batch_size=0"])
    cfg = vitexp.compose(["experiment=digits", "model.num_layers=2"])
    assert cfg.model.num_layers == 2 and "hydra" not in cfg


def test_a_preset_changed_between_two_compositions_is_read_again(tmp_path: Path, monkeypatch) -> None:
    """Presets are read once, not at every composition, but a changed file is read again."""
    import os

    import vitexp.config.files as files

    preset = tmp_path / "mine.yaml"
    preset.write_text("# @package _global_\nseed: 1\n")
    monkeypatch.setattr(files, "experiments_dir", lambda: tmp_path)
    assert vitexp.compose(["experiment=mine"]).seed == 1
    assert vitexp.compose(["experiment=mine"]).seed == 1
    preset.write_text("# @package _global_\nseed: 2\n")
    stat = preset.stat()
    os.utime(preset, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a coarse clock's write
    assert vitexp.compose(["experiment=mine"]).seed == 2
