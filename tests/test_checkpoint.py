"""Checkpoint files: unwrapped keys, atomic writes, safe and clear loading, the format and
its upgrade from format 1, random streams across devices, and the EMA."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.overrides import TorchFunctionMode

from vitexp.errors import DataError
from vitexp.runtime import unwrap
from vitexp.training.checkpoint import (
    FORMAT_VERSION,
    capture_rng,
    load_checkpoint,
    read_training_checkpoint,
    remove_partial_writes,
    require_resumable,
    restore_rng,
    save_checkpoint,
    upgrade,
)
from vitexp.training.ema import Ema

FIXTURE = Path(__file__).parent / "fixtures" / "format1_digits_step15.pt"
CPU = torch.device("cpu")


def test_round_trip_with_config_and_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    g = torch.Generator().manual_seed(3)
    state = {"model": model.state_dict(), "config": {"a": [1, 2.5, None, "x"]}, "rng": capture_rng(g, CPU)}
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["config"] == state["config"] and loaded["format_version"] == FORMAT_VERSION == 2
    torch.testing.assert_close(loaded["model"]["weight"], model.weight.detach())
    expected_g, expected_global = torch.rand(3, generator=g), torch.rand(3)
    assert restore_rng(loaded["rng"], g, CPU)
    assert torch.equal(torch.rand(3, generator=g), expected_g)
    assert torch.equal(torch.rand(3), expected_global)


def test_unwrap_strips_compile_wrapper():
    model = torch.nn.Linear(3, 2)
    compiled = torch.compile(model)
    assert unwrap(compiled) is model
    assert set(unwrap(compiled).state_dict()) == {"weight", "bias"}


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"v": torch.tensor(1)}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):  # fails mid-write
        save_checkpoint({"v": torch.tensor(2), "bad": lambda: None}, path)
    assert load_checkpoint(path)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_leftovers_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "last.pt").write_bytes(b"kept")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert [p.name for p in remove_partial_writes(tmp_path)] == [".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_needs_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit(marker)}, path)
    with pytest.raises(DataError, match=r"refused to load .*evil\.pt.*never runs"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_empty_and_missing_checkpoints(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.randn(100, 100)}}, path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(DataError, match="truncated or corrupt") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    path.write_bytes(b"")  # what a full disk leaves
    with pytest.raises(DataError, match=r"is empty \(0 bytes"):
        load_checkpoint(path)
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"weight": torch.zeros(2)}, "not a vitexp training checkpoint"),  # a bare state dict
        ([1, 2, 3], "not a vitexp training checkpoint"),
        (
            {"model": {"w": torch.zeros(1)}, "format_version": 9},
            "format 9; this vitexp reads formats 1 and 2",
        ),
    ],
)
def test_files_of_the_wrong_kind_are_named(tmp_path, content, message):
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(DataError, match=message) as e:
        read_training_checkpoint(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("version", [1, 2])
def test_weights_only_checkpoints_open_for_inspection_but_do_not_resume(tmp_path, version):
    path = tmp_path / "x.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "format_version": version, "config": {}}, path)
    ckpt = read_training_checkpoint(path)  # the inspection commands need only weights and config
    with pytest.raises(DataError, match="cannot be resumed: it lacks optimizer, scaler, rng, progress") as e:
        require_resumable(ckpt, str(path))
    assert "model.pretrained=" in str(e.value)


def test_format_1_upgrades_to_format_2():
    old = torch.load(FIXTURE, weights_only=True)
    assert old["format_version"] == 1 and "scheduler" in old and "epoch" in old
    new = upgrade(copy.deepcopy(old), str(FIXTURE))
    assert new["format_version"] == 2 and "scheduler" not in new and "epoch" not in new
    assert new["progress"]["global_step"] == 15 and not new["progress"]["epoch_complete"]
    assert torch.equal(new["progress"]["order"], old["order"])
    assert new["rng"]["generator"]["device"] == "cpu"
    assert torch.equal(new["rng"]["generator"]["state"], old["rng"]["data"])
    assert new["rng"]["cuda"] is None  # written on a CPU-only machine: no GPU streams
    # Moved modules are renamed in the stored config; the model's target never moved.
    assert old["config"]["scheduler"]["_target_"] == "vitexp.optim.warmup_cosine"
    assert new["config"]["scheduler"]["_target_"] == "vitexp.training.optim.warmup_cosine"
    assert new["config"]["model"] == old["config"]["model"]


def test_format_1_from_a_node_with_eight_gpus_resumes_on_one():
    """Format 1 kept the stream of every visible GPU; restoring eight on a machine with fewer
    raised IndexError. The upgrade keeps one, and restoring on the CPU does not touch CUDA."""
    old = torch.load(FIXTURE, weights_only=True)
    old["rng"]["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    new = upgrade(old, "eight.pt")
    assert torch.equal(new["rng"]["cuda"], torch.zeros(16, dtype=torch.uint8))
    assert restore_rng(new["rng"], torch.Generator(), CPU)


def test_a_gpu_generator_state_is_not_forced_into_a_cpu_generator():
    """A CUDA generator's state is 16 bytes, a CPU one's 5,056: loading one into the other
    raises inside torch. restore_rng reports the mismatch instead, and the global streams
    are still restored."""
    state = capture_rng(torch.Generator(), CPU)
    state["generator"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}
    g = torch.Generator().manual_seed(5)
    before = g.get_state()
    expected = torch.rand(4)
    assert restore_rng(state, g, CPU) is False
    assert torch.equal(g.get_state(), before)
    assert torch.equal(torch.rand(4), expected)


def test_ema_equals_torch_averaged_model_bitwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ours = Ema(model, 0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):
        model(torch.randn(8, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        reference.update_parameters(model)
        ours.update(model)
    ref, got = reference.module.state_dict(), ours.module.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # BatchNorm's integer count included
    assert ours.updates == int(reference.n_averaged) == 6
    assert not torch.equal(got["3.weight"], model[3].weight)  # an average, not a copy


class _CountTransfers(TorchFunctionMode):
    """Counts tensor transfers and reads to the host (`.to`, `.cpu`, `.item`) without patching
    torch: a torch function mode sees every tensor operation inside its `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("to", "cpu", "item", "tolist", "__bool__"):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_ema_update_does_not_transfer_or_read_back():
    """AveragedModel copies its CPU update counter to the device on every update (a blocking
    copy on a GPU) and reads it back (`bool(n_averaged == 0)`); Ema keeps a Python int."""
    model = torch.nn.Linear(4, 2)
    ema = Ema(model, 0.5)
    ema.update(model)
    with _CountTransfers() as ours:
        ema.update(model)
    assert ours.calls == []
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    averaged.update_parameters(model)
    with _CountTransfers() as theirs:
        averaged.update_parameters(model)
    assert "to" in theirs.calls  # what the counter costs there: the mode does see transfers
