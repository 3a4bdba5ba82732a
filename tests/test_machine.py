"""What a run takes from the machine it lands on: the precision its device computes natively
(`trainer.precision=auto`) and the CPUs it may use (`trainer.num_threads=auto`). Every
capability and limit is faked, so the tests mean the same on any CPU."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, TINY_MODEL, compose_cfg
from vitexp.config import validate
from vitexp.errors import ConfigError
from vitexp.runtime import cgroup_cpu_max, cpu_bf16, cpu_share, pick_threads, resolve_precision, set_threads

AVX2 = {"cpu_name": "AMD EPYC", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
SAPPHIRE_RAPIDS = {**AVX2, "cpu_name": "Intel Xeon", "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}
COOPER_LAKE = {**AVX2, "cpu_name": "Intel Xeon", "avx512_f": True, "avx512_bf16": True}
CPU = torch.device("cpu")
FAST = ["dataset=fake", *TINY_MODEL, "model.img_size=16", "trainer.batch_size=64", "trainer.progress=false"]


@contextlib.contextmanager
def torch_threads_kept():
    """The test process's torch thread count, as it was before the test."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- precision


def test_only_amx_or_avx512_bf16_count_as_native_bf16():
    assert cpu_bf16(SAPPHIRE_RAPIDS) == "AMX-BF16"
    assert cpu_bf16(COOPER_LAKE) == "AVX-512-BF16"
    assert cpu_bf16({**AVX2, "avx512_f": True}) is None  # AVX-512 alone still converts every op
    assert cpu_bf16(AVX2) is None


@pytest.mark.parametrize(("capabilities", "chosen"), [(AVX2, "fp32"), (COOPER_LAKE, "bf16")])
def test_auto_precision_on_the_cpu_follows_its_bf16_and_says_so(monkeypatch, caplog, capabilities, chosen):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    with caplog.at_level(logging.INFO, logger="vitexp.runtime"):
        assert resolve_precision(CPU, "auto", "trainer.precision") == chosen
    (record,) = [r for r in caplog.records if "trainer.precision=auto" in r.getMessage()]
    says = "has no native bf16" if chosen == "fp32" else "computes bf16 with AVX-512-BF16"
    assert f"trainer.precision=auto: {chosen}, as this CPU ({capabilities['cpu_name']}" in record.getMessage()
    assert says in record.getMessage()


def test_explicit_bf16_on_a_cpu_that_emulates_it_warns_once_and_runs(monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: AVX2)
    with caplog.at_level(logging.INFO, logger="vitexp.runtime"):
        assert resolve_precision(CPU, "bf16", "trainer.precision") == "bf16"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1
        and "no native bf16" in warnings[0]
        and "trainer.precision=auto or fp32" in warnings[0]
    )
    caplog.clear()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: SAPPHIRE_RAPIDS)
    with caplog.at_level(logging.INFO, logger="vitexp.runtime"):
        assert resolve_precision(CPU, "bf16", "trainer.precision") == "bf16"
    assert not caplog.records  # native: nothing to say


@pytest.mark.parametrize(
    ("tensor_cores", "name", "chosen"), [(True, "NVIDIA A100", "bf16"), (False, "Tesla T4", "fp32")]
)
def test_auto_precision_on_a_gpu_is_bf16_from_ampere_on(monkeypatch, caplog, tensor_cores, name, chosen):
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: tensor_cores or including_emulation
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    with caplog.at_level(logging.INFO, logger="vitexp.runtime"):
        assert resolve_precision(torch.device("cuda"), "auto", "trainer.precision") == chosen
    assert f"trainer.precision=auto: {chosen}, as {name} has" in caplog.text


def test_a_precision_that_is_no_choice_is_one_line():
    with pytest.raises(
        ConfigError,
        match=r"^trainer.precision='bf32' is not one of auto, fp32, bf16, fp16; did you mean fp32\?$",
    ):
        resolve_precision(CPU, "bf32", "trainer.precision")
    with pytest.raises(ConfigError, match=r"^trainer.precision='bf32' is not one of auto, fp32, bf16, fp16"):
        validate(compose_cfg(["trainer.precision=bf32"]))


def test_the_cpu_preset_trains_in_fp32_on_a_cpu_without_native_bf16(monkeypatch, caplog, cfg_factory):
    """experiment=cifar10_subset_cpu asks for auto; a run built on an AVX2 CPU autocasts to nothing."""
    from vitexp.training.distributed import SINGLE_PROCESS
    from vitexp.training.setup import build

    assert compose_cfg(["experiment=cifar10_subset_cpu"]).trainer.precision == "auto"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: AVX2)
    with torch_threads_kept(), caplog.at_level(logging.INFO):
        run = build(cfg_factory(*FAST, "trainer.precision=auto", "trainer.num_threads=1"), SINGLE_PROCESS)
        assert torch.get_num_threads() == 1
    assert isinstance(run.step.autocast, contextlib.nullcontext)  # fp32: no autocast
    assert "trainer.precision=auto: fp32, as this CPU (AMD EPYC" in caplog.text
    assert "torch threads: 1 (trainer.num_threads)" in caplog.text


# --------------------------------------------------------------------------- threads


def share(affinity=None, cpu_max=(), cpu_count=64, **env):
    return cpu_share(affinity=affinity, cpu_max=cpu_max, env=env, cpu_count=cpu_count)


def test_the_cpu_share_is_the_tightest_limit():
    assert share() == (64, "64 CPU(s): the CPU count")
    assert share(affinity={0}) == (1, "1 CPU(s): the affinity mask")
    assert share(affinity=set(range(16)), cpu_max=["max 100000\n"]) == (16, "16 CPU(s): the affinity mask")
    # A container's --cpus=2.5 under a 16-core mask: 2 (rounded down, not to be throttled).
    assert share(affinity=set(range(16)), cpu_max=["max 100000", "250000 100000\n"])[0] == 2
    assert share(affinity=set(range(16)), cpu_max=["50000 100000"])[0] == 1  # half a CPU: still 1
    assert share(affinity=set(range(16)), cpu_max=["-1 100000"])[0] == 16  # cgroup v1: no quota
    assert share(affinity=set(range(64)), SLURM_CPUS_PER_TASK="8") == (8, "8 CPU(s): SLURM_CPUS_PER_TASK=8")


def _cgroup(root, folder: str, **files: str) -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / folder / name.replace("_", ".", 1)).write_text(text + "\n")


def test_cgroup_quotas_are_read_at_every_level_of_v2_and_of_v1s_cpu_hierarchy(tmp_path):
    """v2: cpu.max of the process's cgroup and the levels above. v1: the quota and period of the
    cpu controller's hierarchy (mounted as cpu,cpuacct here), at the process's own cgroup (a
    nested one, as a Slurm job's) and above; a container whose cgroup path this mount lacks
    reads the mount's own."""
    root, proc = tmp_path / "sys", tmp_path / "cgroup"
    _cgroup(root, "job/step", cpu_max="150000 100000")
    _cgroup(root, "job", cpu_max="max 100000")
    proc.write_text("0::/job/step\n")
    assert cgroup_cpu_max(proc, root) == ["150000 100000\n", "max 100000\n"]
    root = tmp_path / "v1"
    _cgroup(root, "cpu,cpuacct/slurm/job", cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")
    _cgroup(root, "cpu,cpuacct", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    proc.write_text("4:memory:/slurm/job\n2:cpu,cpuacct:/slurm/job\n")
    assert cgroup_cpu_max(proc, root) == ["100000 100000", "-1 100000"]
    assert cpu_share(affinity={0, 1}, cpu_max=cgroup_cpu_max(proc, root), env={}, cpu_count=2) == (
        1,
        "1 CPU(s): the cgroup CPU quota (100000 100000)",
    )
    proc.write_text("2:cpu,cpuacct:/docker/0123abcd\n")  # a container: its cgroup is the mount
    assert cgroup_cpu_max(proc, root) == ["-1 100000"]
    assert cgroup_cpu_max(tmp_path / "absent", root) == []


def test_the_cpu_share_is_divided_among_the_local_ranks_that_share_it():
    assert share(affinity=set(range(16)), LOCAL_WORLD_SIZE="4") == (
        4,
        "16 CPUs (the affinity mask) shared by 4 processes",
    )
    assert share(affinity={0}, LOCAL_WORLD_SIZE="4")[0] == 1
    # The Slurm launcher's ranks are Slurm tasks, each with CPUs of its own.
    slurm_task = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "4", "LOCAL_WORLD_SIZE": "4"}
    assert share(affinity=set(range(8)), SLURM_CPUS_PER_TASK="8", **slurm_task)[0] == 8


def test_num_threads_auto_keeps_an_explicit_omp_num_threads_and_refuses_nonsense():
    assert pick_threads("auto", (4, "why"), {}) == (4, "why")
    assert pick_threads("auto", (4, "why"), {"OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS=1")
    assert pick_threads(3, (4, "why"), {"OMP_NUM_THREADS": "1"}) == (3, "trainer.num_threads")
    for bad in (0, -2, "many", True):
        with pytest.raises(ConfigError, match=r"^trainer.num_threads=.* must be auto or a positive integer$"):
            pick_threads(bad, (4, "why"), {})


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5"])
def test_a_bad_num_threads_is_one_line_before_the_run(value):
    with pytest.raises(ConfigError, match=r"^trainer.num_threads=.* must be auto or a positive integer$"):
        validate(compose_cfg([f"trainer.num_threads={value}"]))
    validate(compose_cfg(["trainer.num_threads=2"]))
    validate(compose_cfg(["trainer.num_threads=auto"]))


def test_set_threads_applies_the_share_to_torch(monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    torch.set_num_threads(2)
    with torch_threads_kept(), caplog.at_level(logging.INFO, logger="vitexp.runtime"):
        assert set_threads("auto") == 1
        assert torch.get_num_threads() == 1
    assert "torch threads: 1 (1 CPU(s): the affinity mask)" in caplog.text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_auto_threads_under_taskset_is_one():
    probe = (
        "import logging, torch; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
        "from vitexp.runtime import set_threads; set_threads('auto'); print(torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "1"
    assert "torch threads: 1 (1 CPU(s): the affinity mask)" in result.stderr
