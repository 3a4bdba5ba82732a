"""The GPU check: what a first short slot on a GPU should find out, in one command.

    bash benchmarks/gpu_check.sh                        # on the GPU machine (installs what it lacks)
    python benchmarks/gpu_check.py --device cuda --out DIR
    python benchmarks/gpu_check.py --device cpu --quick  # seconds, on the CPU (the test suite runs it)

Correctness, each a row that passes or fails:
  precision   a ViT-Ti/4 at 32 px trained by `vitexp.training.train` on the digits (a few hundred
              steps) in fp32, bf16, fp16 (GradScaler) and bf16 + torch.compile: every logged
              loss finite, and the last tenth of them lower than the first tenth
  resume      SIGTERM mid-run, then trainer.resume=auto, in fp32 with trainer.deterministic=true:
              every per-step loss and the final weights bitwise equal to an uninterrupted run
  ddp         one process in an NCCL (gloo on the CPU) process group, the model in
              DistributedDataParallel, against the same steps without it: equal weights
  syncs       `torch.cuda.set_sync_debug_mode("error")` around training steps between log
              points: any host-device synchronisation raises (CUDA only)
Speed, vitexp and timm side by side in this process (`benchmarks.common.interleaved`):
  ViT-S/16 at 224 px, batch 256, bf16, eager and torch.compile'd: images/s and MFU (counted
  training FLOPs per second over the measured bf16 matmul peak); the CIFAR shape (vit_ti4 at
  32 px, batch 128); the in-memory data path's augmented batches/s.
Memory: peak GPU memory of one bf16 training step of ViT-B/16 and ViT-L/16 at batch 64.

Writes `gpu_check.json` and `gpu_check.md` (one table) into --out. On the CPU the CUDA-only
rows say so instead of passing or failing.
"""

from __future__ import annotations

import os

# Before torch starts CUDA: cuBLAS reads it when it creates its handle, and the deterministic
# resume check needs it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import contextlib
import json
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.common import (
    SHAPES,
    Shape,
    interleaved,
    machine,
    median,
    parser,
    setup,
    shape_dict,
    synchronize,
    table,
    timm_model,
    vitexp_model,
)

Row = dict[str, Any]


def _row(group: str, check: str, ok: bool | None, result: str) -> Row:
    return {"group": group, "check": check, "ok": ok, "result": result}


def _compose(overrides: list[str], run_dir: Path) -> Any:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from vitexp.config import conf_dir, register_experiments, register_resolvers

    register_experiments()
    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


# --------------------------------------------------------------------------- correctness


def _digits_run(device: torch.device, quick: bool) -> list[str]:
    steps = 30 if quick else 300
    size = (
        ["model.hidden_size=32", "model.mlp_dim=64", "model.num_heads=2", "model.num_layers=2"]
        if quick
        else []
    )
    return [
        "dataset=digits", "model=vit_ti4", "model.img_size=32", *size, f"trainer.max_steps={steps}",
        "trainer.batch_size=64", "trainer.log_every_steps=1", "trainer.progress=false",
        "trainer.sample_figures=false", f"trainer.device={device}", "scheduler.warmup_epochs=0.5",
    ]  # fmt: skip


def check_precisions(device: torch.device, quick: bool, work: Path) -> list[Row]:
    from vitexp.training import train

    cases: dict[str, list[str]] = {"fp32": [], "bf16": []}
    if device.type == "cuda":
        cases["fp16"] = []
    rows = []
    if quick:  # compiling takes longer than the rest of the quick check together
        rows.append(_row("correctness", "train bf16 + compile", None, "skipped (--quick)"))
    else:
        cases["bf16 + compile"] = ["trainer.compile=true"]
    for name, extra in cases.items():
        precision = name.split()[0]
        run_dir = work / f"precision_{name.replace(' + ', '_')}"
        started = time.perf_counter()
        train(_compose([*_digits_run(device, quick), f"trainer.precision={precision}", *extra], run_dir))
        losses = _losses(run_dir)
        tenth = max(1, len(losses) // 10)
        first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
        finite = all(torch.isfinite(torch.tensor(losses)).tolist())
        seconds = time.perf_counter() - started
        detail = f"{len(losses)} steps, loss {first:.3f} -> {last:.3f}, {seconds:.0f} s"
        rows.append(_row("correctness", f"train {name}", finite and last < first, detail))
    return rows


def check_resume(device: torch.device, quick: bool, work: Path) -> list[Row]:
    """SIGTERM at step 2/3 of the run, resume, and compare with an uninterrupted run."""
    from vitexp.runtime import configure_backends
    from vitexp.training import train
    from vitexp.training.checkpoint import load_checkpoint
    from vitexp.training.preemption import Preempted

    overrides = [
        *_digits_run(device, quick),
        "trainer.deterministic=true",
        "trainer.checkpoint_every_steps=5",
    ]
    steps = 30 if quick else 300
    reference = work / "resume_reference"
    train(_compose(overrides, reference))

    def stop_at(logits: torch.Tensor, target: torch.Tensor, calls: list[int] = []) -> torch.Tensor:  # noqa: B006
        calls.append(1)
        if len(calls) == 2 * steps // 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the guard turns it into a checkpoint at the step's end
        return nn.functional.cross_entropy(logits, target)

    interrupted = work / "resume_interrupted"
    with contextlib.suppress(Preempted):
        train(_compose(overrides, interrupted), loss_fn=stop_at)
    stopped_at = load_checkpoint(interrupted / "last.pt")["progress"]["global_step"]
    train(_compose([*overrides, "trainer.resume=auto"], interrupted))
    configure_backends(device, deterministic=False)  # what follows is timed: the fast kernels
    a, b = (load_checkpoint(d / "last.pt")["model"] for d in (reference, interrupted))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same_losses = _losses(reference) == _losses(interrupted)
    return [
        _row("correctness", "SIGTERM + resume, fp32, deterministic", same and same_losses,
             f"stopped at step {stopped_at}; losses {'equal' if same_losses else 'DIFFER'}, "
             f"weights {'bitwise equal' if same else 'DIFFER'}")
    ]  # fmt: skip


def check_ddp(device: torch.device) -> list[Row]:
    """One process in a real process group, the model in DDP, against the same steps without."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from vitexp.training.loop import train_step
    from vitexp.training.setup import Step

    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = vitexp_model(SHAPES["tiny"]).to(device)
        wrapped_model = vitexp_model(SHAPES["tiny"]).to(device)
        wrapped_model.load_state_dict(plain.state_dict())
        ids = [device.index or 0] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped_model, device_ids=ids)
        g = torch.Generator().manual_seed(0)
        batches = [
            (
                torch.randn(8, 3, 16, 16, generator=g).to(device),
                torch.randint(0, 10, (8,), generator=g).to(device),
            )
            for _ in range(5)
        ]
        for forward, model in ((plain, plain), (wrapped, wrapped_model)):
            step = Step(
                forward=forward, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                loss_fn=nn.CrossEntropyLoss(), autocast=contextlib.nullcontext(),
                scaler=torch.amp.GradScaler(device.type, enabled=False), grad_clip=1.0,
            )  # fmt: skip
            for batch in batches:
                train_step(step, iter([batch]))
        worst = max(
            (a - b).abs().max().item()
            for a, b in zip(plain.parameters(), wrapped_model.parameters(), strict=True)
        )
    finally:
        dist.destroy_process_group()
    return [
        _row(
            "correctness",
            f"1-process {backend} DDP = plain",
            worst == 0.0,
            f"max weight difference {worst:.1e}",
        )
    ]


def check_syncs(device: torch.device) -> list[Row]:
    if device.type != "cuda":
        return [_row("correctness", "no host sync inside a step", None, "CUDA only")]
    from vitexp.data import BatchTransform, DeviceLoader, Split
    from vitexp.training.ema import Ema
    from vitexp.training.loop import train_step
    from vitexp.training.metrics import LossWindow
    from vitexp.training.setup import Step

    torch.manual_seed(0)
    model = vitexp_model(SHAPES["vit_ti4"]).to(device)
    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.randint(0, 10, (512,))).to(device)
    transform = BatchTransform(img_size=32, mean=[0.5] * 3, std=[0.5] * 3, crop_padding=4, hflip=True)
    generator = torch.Generator(device=device).manual_seed(0)
    loader = DeviceLoader(split, batch_size=64, transform=transform, train=True, generator=generator)
    step = Step(
        forward=model, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        loss_fn=nn.CrossEntropyLoss(), autocast=torch.autocast("cuda", dtype=torch.bfloat16),
        scaler=torch.amp.GradScaler("cuda", enabled=False), grad_clip=1.0, ema=Ema(model, 0.99),
    )  # fmt: skip
    window = LossWindow(device)
    batches = loader.iter_from(loader.new_order())
    result = train_step(step, batches)  # warm-up: lazy state, allocations
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(4):
            result = train_step(step, batches)
            window.add(result.loss, result.finite, i + 1)
        ok, detail = True, "4 steps (data, bf16, clip, AdamW, EMA, loss window) without one"
    except RuntimeError as e:
        ok, detail = False, str(e).splitlines()[0][:150]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [_row("correctness", "no host sync inside a step", ok, detail)]


# --------------------------------------------------------------------------- speed and memory


def _step_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> Callable[[], object]:
    from benchmarks.step_vs_timm import train_step

    return train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=x.is_cuda), x, y, precision)


def check_speed(device: torch.device, quick: bool) -> list[Row]:
    from benchmarks.flops import count_flops, matmul

    n = 512 if quick else 8192
    peak_fn, peak_work = matmul(n, torch.bfloat16, device)
    peak = peak_work / median(interleaved({"mm": peak_fn}, repeats=3, calls=5, device=device)["mm"])
    rows = [_row("speed", f"bf16 matmul peak ({n}³)", None, f"{peak / 1e12:.1f} TFLOP/s")]
    shapes = {
        "ViT-S/16": Shape(**{**shape_dict(SHAPES["vit_s16"]), "batch_size": 256}),
        "vit_ti4": SHAPES["vit_ti4"],
    }
    if quick:
        shapes = {"tiny": SHAPES["tiny"]}
    for label, spec in shapes.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(spec.batch_size, 3, spec.img_size, spec.img_size, generator=g).to(device)
        y = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=g).to(device)
        candidates: dict[str, Callable[[], object]] = {}
        for name, build in (("vitexp", vitexp_model), ("timm", timm_model)):
            torch.manual_seed(0)
            candidates[name] = _step_closure(build(spec).to(device), x, y, "bf16")
            if not quick:
                torch.manual_seed(0)
                compiled = build(spec).to(device)
                candidates[f"{name} compiled"] = _step_closure(torch.compile(compiled), x, y, "bf16")
        _, train_flops = count_flops(vitexp_model(spec).to(device), x[:2])
        times = interleaved(
            candidates, repeats=2 if quick else 5, calls=1 if quick else 5, warmup=2, device=device
        )
        for name, t in times.items():
            images_per_s = spec.batch_size / median(t)
            mfu = train_flops * images_per_s / peak
            rows.append(_row("speed", f"{label} {name}, bf16, batch {spec.batch_size}", None,
                             f"{images_per_s:,.0f} images/s, MFU {mfu:.1%}"))  # fmt: skip
    rows.append(_data_path(device, quick))
    return rows


def _data_path(device: torch.device, quick: bool) -> Row:
    from vitexp.data import BatchTransform, DeviceLoader, Split

    count = 2048 if quick else 50_000
    split = Split(
        torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8), torch.zeros(count, dtype=torch.long)
    )
    transform = BatchTransform(img_size=32, mean=[0.5] * 3, std=[0.5] * 3, crop_padding=4, hflip=True)
    loader = DeviceLoader(split.to(device), batch_size=128, transform=transform, train=True,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip

    def epoch() -> None:
        for _ in loader:
            pass

    seconds = median(interleaved({"epoch": epoch}, repeats=3, device=device)["epoch"])
    return _row(
        "speed",
        "in-memory CIFAR batches (crop + flip)",
        None,
        f"{len(loader) / seconds:,.0f} batches/s of 128",
    )


def check_memory(device: torch.device, quick: bool) -> list[Row]:
    if device.type != "cuda":
        return [_row("memory", "peak of one training step", None, "CUDA only")]
    from vitexp.models import VisionTransformer
    from vitexp.models.vit import PAPER_SIZES

    rows = []
    for size, patch in (("b", 16), ("l", 16)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        model = VisionTransformer(img_size=224, patch_size=patch, num_classes=1000, **PAPER_SIZES[size]).to(
            device
        )
        x, y = torch.randn(64, 3, 224, 224, device=device), torch.randint(0, 1000, (64,), device=device)
        _step_closure(model, x, y, "bf16")()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        rows.append(
            _row(
                "memory",
                f"ViT-{size.upper()}/{patch}, batch 64, bf16, AdamW",
                None,
                f"{peak / 2**30:.1f} GiB",
            )
        )
        del model, x, y
    return rows


# --------------------------------------------------------------------------- the report


def run(device: str | torch.device = "cpu", *, quick: bool = False) -> dict[str, Any]:
    dev = torch.device(device)
    results: dict[str, Any] = {"machine": machine(dev), "quick": quick, "rows": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        sections: list[tuple[str, Callable[[], list[Row]]]] = [
            ("precision", lambda: check_precisions(dev, quick, work)),
            ("resume", lambda: check_resume(dev, quick, work)),
            ("ddp", lambda: check_ddp(dev)),
            ("syncs", lambda: check_syncs(dev)),
            ("speed", lambda: check_speed(dev, quick)),
            ("memory", lambda: check_memory(dev, quick)),
        ]
        for name, section in sections:
            try:  # one broken check must not cost the others their slot on the GPU
                results["rows"] += section()
            except Exception as e:
                results["rows"].append(
                    _row(name, f"{name} (crashed)", False, f"{type(e).__name__}: {e}"[:200])
                )
                traceback.print_exc()
    results["passed"] = all(r["ok"] is not False for r in results["rows"])
    return results


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cores']} cores)"
    mark = {True: "pass", False: "FAIL", None: ""}
    rows = [[r["group"], r["check"], mark[r["ok"]], r["result"]] for r in results["rows"]]
    head = f"GPU check on {where}, torch {m['torch']}{' (--quick)' if results['quick'] else ''}"
    return f"{head}\n\n{table(['group', 'check', 'verdict', 'result'], rows)}\n"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_check.json and gpu_check.md")
    args = p.parse_args(argv)
    dev = setup(args.device, args.threads)
    results = run(dev, quick=args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
