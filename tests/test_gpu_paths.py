"""The GPU paths, checked on the CPU: what a GPU machine would do differently is either
simulated (the capability a GPU reports, how many GPUs a node has) or made visible on the CPU
(where a random draw happens, which collectives a step makes, what a resume carries over)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from tests.helpers import TINY_MODEL, rows
from vitexp.data import BatchTransform, DeviceLoader, FileSplit, FolderLoader, Split
from vitexp.errors import ConfigError
from vitexp.runtime import configure_backends, resolve_precision
from vitexp.training import train
from vitexp.training.checkpoint import load_checkpoint, save_checkpoint
from vitexp.training.distributed import World, device_for
from vitexp.training.loop import train_step
from vitexp.training.setup import Step

FAST = ["dataset=fake", *TINY_MODEL, "model.img_size=16", "trainer.batch_size=64", "trainer.progress=false",
        "trainer.sample_figures=false"]  # fmt: skip


class _Calls(TorchFunctionMode):
    """The names of the torch functions called inside the `with` block (no patching)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_epoch_order_is_drawn_on_the_cpu_and_moved_once():
    """A split on another device (the meta device stands in for a GPU) gets its order drawn by
    the CPU generator, then moved: a draw on a GPU could differ between GPU models. (A draw on
    the meta device would not advance the generator at all, so the last check tells them apart.)"""
    split = Split(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.zeros(10, dtype=torch.long)).to("meta")
    transform = BatchTransform(img_size=2, mean=[0.5], std=[0.5])
    generator = torch.Generator().manual_seed(3)
    loader = DeviceLoader(split, batch_size=2, transform=transform, train=True, generator=generator)
    order = loader.new_order()
    assert order.device.type == "meta" and order.shape == (10,)
    assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())  # it drew


def test_the_training_generators_live_where_they_should(cfg_factory):
    from vitexp.training.distributed import SINGLE_PROCESS
    from vitexp.training.setup import build

    run = build(cfg_factory(*FAST), SINGLE_PROCESS)
    assert run.data_generator.device.type == "cpu"
    assert run.augment_generator is run.data_generator  # on the CPU one generator does both


def test_an_image_folder_copies_its_order_to_the_host_once_per_epoch(tmp_path):
    split = FileSplit(
        [str(tmp_path / f"{i}.png") for i in range(12)], torch.zeros(12, dtype=torch.long), (4, 4)
    )
    transform = BatchTransform(img_size=4, mean=[0.5] * 3, std=[0.5] * 3)
    loader = FolderLoader(split, batch_size=2, transform=transform, train=False, device=torch.device("cpu"))
    order = torch.arange(12)
    with _Calls() as calls:
        batches = loader.iter_from(order)
        with pytest.raises(Exception):  # noqa: B017 (the files do not exist: only the copies matter)
            next(batches)
    assert calls.names.count("cpu") == 1 and "tolist" in calls.names


def test_bf16_on_a_gpu_without_bf16_tensor_cores_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(
        ConfigError, match=r"trainer.precision=bf16 but Tesla T4 has no bf16 tensor cores.*fp16"
    ):
        resolve_precision(torch.device("cuda"), "bf16", "trainer.precision")
    assert resolve_precision(torch.device("cuda"), "fp16", "trainer.precision") == "fp16"  # what it is for


def test_more_processes_on_a_node_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert device_for(World(rank=1, local_rank=1, size=4), "cuda") == torch.device("cuda", 1)
    with pytest.raises(
        ConfigError, match=r"4 processes on this node but 2 GPU\(s\) visible.*--nproc_per_node=2"
    ):
        device_for(World(rank=3, local_rank=3, size=4), "cuda")
    assert device_for(World(rank=3, local_rank=3, size=4), "cpu") == torch.device("cpu")


def test_fp16_skipping_makes_no_collective_of_its_own():
    """Under fp16 the GradScaler skips overflowing steps and agrees over the ranks itself; the
    loop's own all-reduce of the finite flag (for on_nonfinite=skip) would be one per step for
    nothing. A world of two without a process group: any collective would raise."""
    model = nn.Linear(4, 3)
    step = Step(
        forward=model, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(), autocast=torch.autocast("cpu", enabled=False),
        scaler=torch.amp.GradScaler("cpu", enabled=True), skip_nonfinite=True, world=World(0, 0, 2),
    )  # fmt: skip
    result = train_step(step, iter([(torch.randn(8, 4), torch.randint(0, 3, (8,)))]))
    assert bool(result.finite) and not result.skipped
    with pytest.raises((RuntimeError, ValueError)):  # the same step in fp32 does need to agree
        train_step(Step(**{**vars(step), "scaler": torch.amp.GradScaler("cpu", enabled=False)}),
                   iter([(torch.randn(8, 4), torch.randint(0, 3, (8,)))]))  # fmt: skip


@pytest.mark.slow
def test_deterministic_algorithms_on_request(cfg_factory, tmp_path):
    try:
        cfg = cfg_factory(*FAST, "trainer.max_steps=3", "trainer.deterministic=true")
        train(cfg)
        assert torch.are_deterministic_algorithms_enabled()
        first = load_checkpoint(Path(cfg.run_dir) / "last.pt")["model"]
        cfg.run_dir = str(tmp_path / "again")
        train(cfg)
        again = load_checkpoint(Path(cfg.run_dir) / "last.pt")["model"]
        assert all(torch.equal(first[k], again[k]) for k in first)
        cfg.trainer.deterministic = False
        cfg.run_dir = str(tmp_path / "off")
        train(cfg)
        assert not torch.are_deterministic_algorithms_enabled()  # each run sets it, none inherits it
    finally:
        configure_backends(torch.device("cpu"), deterministic=False)


@pytest.mark.slow
def test_a_gpu_checkpoint_resumes_on_the_cpu(cfg_factory, tmp_path, caplog):
    """A CUDA generator's 16-byte state cannot go into a CPU generator (torch raises). The run
    continues: the epoch in progress in its saved order, later draws from the seed and step."""

    def dies_at_step_19(logits, target, calls=[]):  # noqa: B006 (the counter is the point)
        calls.append(1)
        if len(calls) == 19:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(logits, target)

    overrides = [
        *FAST,
        "trainer.max_steps=20",
        "trainer.checkpoint_every_steps=2",
        "trainer.log_every_steps=1",
    ]
    cfg = cfg_factory(*overrides)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, loss_fn=dies_at_step_19)
    ckpt = load_checkpoint(Path(cfg.run_dir) / "last.pt")
    assert ckpt["progress"]["global_step"] == 18 and not ckpt["progress"]["epoch_complete"]
    ckpt["rng"]["generator"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}
    save_checkpoint(ckpt, tmp_path / "gpu.pt")
    resumed = cfg_factory(*overrides, f"trainer.resume={tmp_path / 'gpu.pt'}")
    resumed.run_dir = str(tmp_path / "resumed")
    with caplog.at_level(logging.WARNING, logger="vitexp.training"):
        train(resumed)
    assert "ran on another device type" in caplog.text
    assert [r["step"] for r in rows(tmp_path / "resumed") if "train/loss" in r] == [19, 20]
