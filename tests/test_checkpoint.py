"""Checkpoints: unwrapped keys, atomic writes, safe and clear loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitexp.errors import ConfigError
from vitexp.runtime import unwrap
from vitexp.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_round_trip_with_config_and_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    g = torch.Generator().manual_seed(3)
    state = {"model": model.state_dict(), "config": {"a": [1, 2.5, None, "x"]}, "rng": rng_state(g)}
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["config"] == state["config"] and loaded["format_version"] == 1
    torch.testing.assert_close(loaded["model"]["weight"], model.weight.detach())
    expected = torch.rand(3, generator=g), torch.rand(3)
    set_rng_state(loaded["rng"], g)
    # (the global torch RNG advanced by one draw since rng_state(); restore replays from there)
    torch.testing.assert_close(torch.rand(3, generator=g), expected[0])


def test_unwrap_strips_compile_wrapper():
    model = torch.nn.Linear(3, 2)
    compiled = torch.compile(model)
    assert unwrap(compiled) is model
    assert set(unwrap(compiled).state_dict()) == {"weight", "bias"}


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"v": torch.tensor(1)}, path)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint({"v": torch.tensor(2)}, path)
    assert load_checkpoint(path)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_needs_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit(marker)}, path)
    with pytest.raises(ConfigError, match=r"refused to load .*evil\.pt.*never runs"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_missing_checkpoints(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.randn(100, 100)}}, path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ConfigError, match="truncated or corrupt") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
