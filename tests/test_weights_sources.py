"""Pretrained weights by source (vitexp.models.weights.sources, `python -m vitexp.weights`):
names of the original ViT checkpoints, URLs and `hf-hub:` ids, all offline.

Named checkpoints and URLs are fetched from a loopback HTTP server (127.0.0.1, in a thread, that
stops by itself) into a torch hub cache in a temporary `TORCH_HOME`; `hf-hub:` ids are read from
a Hub cache the tests fill in huggingface_hub's own layout (checked with its `scan_cache_dir`).
Weights are tiny random timm / transformers ViTs, and the logits after loading must equal
theirs to 1e-5.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import REPO, TINY_MODEL, compose_cfg, fill_hub_cache, model_options, run_cli
from tests.test_convert import _assert_same, _images, _npz_arrays, _perturb
from vitexp.errors import ConfigError, DataError
from vitexp.models import build_model
from vitexp.models.weights.sources import (
    HUB_WEIGHTS,
    NAMED_WEIGHTS,
    VIT_MODELS_URL,
    VIT_MODELS_URL_ENV,
    find_named,
    named_url,
    resolve_weights,
)

timm = pytest.importorskip("timm")

# Small: the tiny ViT of vitexp's tests (TINY_MODEL) at 32 px with 8 px patches.
IMG, PATCH, DIM, HEADS, LAYERS, MLP, CLASSES = 32, 8, 32, 2, 2, 64, 5
TINY_CLI = [*TINY_MODEL, f"model.img_size={IMG}", f"model.patch_size={PATCH}"]
RUN_CLI = [
    "dataset=fake",
    "dataset.load.num_train=64",
    "dataset.load.num_test=32",
    "trainer.max_steps=2",
    "trainer.batch_size=16",
    "trainer.grad_accum_steps=1",
    "trainer.eval_batch_size=32",
    "trainer.precision=fp32",
    "trainer.progress=false",
    "trainer.sample_figures=false",
]


class Loopback:
    """Serves `files` (URL path -> bytes) on 127.0.0.1 from a thread, and stops by itself after
    `lifetime` seconds so that nothing outlives a test. `requests` lists the paths asked for;
    a path in `truncate` is cut after half its bytes (its Content-Length promising all); a path
    in `types` is sent with that Content-Type; clearing `release` holds every response after its
    first half until it is set."""

    def __init__(self, files: dict[str, bytes], lifetime: float = 120.0) -> None:
        self.files = dict(files)
        self.requests: list[str] = []
        self.truncate: set[str] = set()
        self.types: dict[str, str] = {}
        self.release = threading.Event()
        self.release.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer._respond(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._stopped = False
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.unquote(handler.path)
        self.requests.append(path)
        body = self.files.get(path)
        if body is None:
            handler.send_error(404)
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        if path in self.types:
            handler.send_header("Content-Type", self.types[path])
        handler.end_headers()
        sent = body[: len(body) // 2] if path in self.truncate else body
        handler.wfile.write(sent[: len(sent) // 2])
        handler.wfile.flush()
        self.release.wait(timeout=60)
        handler.wfile.write(sent[len(sent) // 2 :])

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._timer.cancel()
            self.release.set()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[Loopback]:
    loopback = Loopback({})
    yield loopback
    loopback.stop()


def _timm_vit(seed: int = 0) -> nn.Module:
    """A tiny random timm ViT made as timm makes its hub models (so it carries timm's config)."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH, embed_dim=DIM,
        depth=LAYERS, num_heads=HEADS, mlp_ratio=MLP / DIM, num_classes=CLASSES,
    )  # fmt: skip
    return _perturb(model, seed)


def _model_cfg(pretrained: str, **overrides: Any) -> dict[str, Any]:
    return {
        "_target_": "vitexp.models.VisionTransformer", "img_size": IMG, "patch_size": PATCH,
        "num_classes": CLASSES, "hidden_size": DIM, "mlp_dim": MLP, "num_heads": HEADS,
        "num_layers": LAYERS, "pretrained": pretrained, **overrides,
    }  # fmt: skip


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_images())


def _safetensors_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    return save({key: value.contiguous() for key, value in model.state_dict().items()})


def _npz_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **_npz_arrays(model))
    return buffer.getvalue()


def _one_line(error: pytest.ExceptionInfo[Exception]) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- URLs


def test_url_is_downloaded_once_cached_and_read_with_the_server_stopped(
    server: Loopback, torch_home: Path
) -> None:
    reference = _timm_vit()
    server.files["/weights/tiny.safetensors"] = _safetensors_bytes(reference)
    url = f"{server.url}/weights/tiny.safetensors"
    _assert_same(_logits(build_model(_model_cfg(url))), _logits(reference))
    (cached,) = (torch_home / "hub" / "checkpoints" / "urls").glob("*/tiny.safetensors")
    assert cached.read_bytes() == server.files["/weights/tiny.safetensors"]
    recorded = cached.with_name("tiny.safetensors.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert not list(cached.parent.glob("*.incomplete"))
    server.stop()
    _assert_same(_logits(build_model(_model_cfg(url))), _logits(reference))
    assert server.requests == ["/weights/tiny.safetensors"]


def test_two_urls_with_one_file_name_are_cached_apart(server: Loopback, torch_home: Path) -> None:
    first, second = _timm_vit(0), _timm_vit(1)
    server.files["/a/w.safetensors"] = _safetensors_bytes(first)
    server.files["/b/w.safetensors"] = _safetensors_bytes(second)
    path_a = resolve_weights(f"{server.url}/a/w.safetensors")
    path_b = resolve_weights(f"{server.url}/b/w.safetensors")
    assert path_a != path_b and path_a.read_bytes() != path_b.read_bytes()


def test_published_checksum_in_the_url_is_checked(server: Loopback, torch_home: Path) -> None:
    body = _safetensors_bytes(_timm_vit())
    server.files["/w.safetensors"] = body
    good = hashlib.sha256(body).hexdigest()
    with pytest.raises(DataError) as error:
        resolve_weights(f"{server.url}/w.safetensors#sha256={'0' * 64}")
    assert "is not the published 000000000000" in _one_line(error)
    assert "nothing was cached" in str(error.value)
    assert resolve_weights(f"{server.url}/w.safetensors#sha256={good}").read_bytes() == body
    with pytest.raises(ConfigError, match="#sha256= and 64 hex digits"):
        resolve_weights(f"{server.url}/w.safetensors#md5=abc")


def test_truncated_download_is_refused_and_not_cached(server: Loopback, torch_home: Path) -> None:
    server.files["/w.npz"] = _npz_bytes(_timm_vit())
    server.truncate.add("/w.npz")
    url = f"{server.url}/w.npz"
    with pytest.raises(DataError) as error:
        resolve_weights(url)
    message = _one_line(error)
    assert message.startswith(f"the download of {url} was cut short (") or (
        message.startswith(f"cannot download {url} (") and "IncompleteRead" in message
    ), message
    cache = torch_home / "hub" / "checkpoints" / "urls"
    assert [p.name for p in cache.rglob("*") if p.is_file()] == ["w.npz.lock"]  # no data, no partial file


def test_damaged_download_is_refused_by_its_crc(server: Loopback, torch_home: Path) -> None:
    body = bytearray(_npz_bytes(_timm_vit()))
    body[len(body) // 3] ^= 0xFF  # one flipped byte inside an array: the zip's CRC catches it
    server.files["/w.npz"] = bytes(body)
    with pytest.raises(DataError) as error:
        resolve_weights(f"{server.url}/w.npz")
    assert "is damaged (member " in _one_line(error) and "fails its CRC check" in str(error.value)
    assert not list((torch_home / "hub" / "checkpoints").rglob("w.npz"))


def test_short_safetensors_with_honest_length_is_refused(server: Loopback, torch_home: Path) -> None:
    body = _safetensors_bytes(_timm_vit())
    server.files["/w.safetensors"] = body[:-100]
    with pytest.raises(DataError) as error:
        resolve_weights(f"{server.url}/w.safetensors")
    assert f"({len(body) - 100} bytes where its header promises {len(body)})" in _one_line(error)


def test_cached_file_changed_later_is_refused(server: Loopback, torch_home: Path) -> None:
    server.files["/w.safetensors"] = _safetensors_bytes(_timm_vit())
    cached = resolve_weights(f"{server.url}/w.safetensors")
    cached.write_bytes(cached.read_bytes()[:-1] + b"\0")
    with pytest.raises(DataError) as error:
        resolve_weights(f"{server.url}/w.safetensors")
    message = _one_line(error)
    assert message.startswith(f"cached weights {cached} do not match the SHA-256 recorded in ")
    assert message.endswith("delete it and run again to download it afresh")


def test_unreachable_server_is_one_line_saying_where_to_put_the_file(
    server: Loopback, torch_home: Path
) -> None:
    url = f"{server.url}/weights/tiny.safetensors"
    server.stop()
    with pytest.raises(DataError) as error:
        build_model(_model_cfg(url))
    message = _one_line(error)
    (lock,) = (torch_home / "hub" / "checkpoints" / "urls").glob("*/tiny.safetensors.lock")
    target = lock.with_name("tiny.safetensors")
    assert not target.exists()
    assert message == (
        f"cannot download {url} ([Errno 111] Connection refused): download it elsewhere and put it at "
        f"{target} (or set model.pretrained to a local copy)"
    )


def test_missing_file_on_the_server_is_a_data_error(server: Loopback, torch_home: Path) -> None:
    with pytest.raises(DataError) as error:
        resolve_weights(f"{server.url}/gone.npz")
    assert "(HTTP 404 " in _one_line(error)


@pytest.mark.slow
def test_concurrent_jobs_share_one_download(server: Loopback, tmp_path: Path) -> None:
    """Two processes (as two jobs of a sweep) ask for the same URL: one downloads, the other
    waits on the lock and then reads the cached file; the server sees one request."""
    server.files["/w.safetensors"] = body = _safetensors_bytes(_timm_vit())
    server.release.clear()  # the first download stalls half-way until the second one waits
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); "
        "from vitexp.models.weights.sources import resolve_weights; "
        "print(resolve_weights(sys.argv[1]))"
    )
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    logs = [tmp_path / f"job{i}.log" for i in range(2)]
    jobs = []
    command = [sys.executable, "-c", script, f"{server.url}/w.safetensors"]
    for log in logs:
        with log.open("w") as err:
            jobs.append(
                subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            )
    try:
        deadline = time.monotonic() + 120
        while not any("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(job.poll() is None for job in jobs), [
                log.read_text()[-2000:] for log in logs
            ]
            time.sleep(0.1)
        server.release.set()
        outputs = [job.communicate(timeout=120)[0].strip() for job in jobs]
    finally:
        for job in jobs:
            job.kill() if job.poll() is None else None
    assert all(job.returncode == 0 for job in jobs), [log.read_text()[-2000:] for log in logs]
    assert outputs[0] == outputs[1] and Path(outputs[0]).read_bytes() == body
    assert server.requests == ["/w.safetensors"]


# --------------------------------------------------------------------------- names


def test_named_checkpoint_comes_from_the_bucket_or_its_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VIT_MODELS_URL_ENV, raising=False)
    entry = find_named("R50+ViT-B_16")
    assert entry is not None and entry.model == "vit_r50_b16"
    assert named_url(entry) == "https://storage.googleapis.com/vit_models/imagenet21k/R50%2BViT-B_16.npz"
    assert VIT_MODELS_URL == "https://storage.googleapis.com/vit_models/"
    monkeypatch.setenv(VIT_MODELS_URL_ENV, "http://mirror.example/vit")
    b16 = find_named("ViT-B_16")
    assert b16 is not None and named_url(b16) == "http://mirror.example/vit/imagenet21k/ViT-B_16.npz"
    # The file name, with or without .npz, and the path in the bucket name it too.
    s16 = "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"
    for alias in (s16, s16 + ".npz", "augreg/" + s16 + ".npz", "S_16"):
        assert find_named(alias) is find_named("S_16") is not None
    assert find_named("ViT-B_16.npz") is b16 and find_named("ViT-S_16") is None


def test_named_npz_through_the_mirror_gives_reference_logits(
    server: Loopback, torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _timm_vit()
    server.files["/vit/imagenet21k/ViT-B_16.npz"] = _npz_bytes(reference)
    monkeypatch.setenv(VIT_MODELS_URL_ENV, server.url + "/vit/")
    _assert_same(_logits(build_model(_model_cfg("ViT-B_16"))), _logits(reference))
    cached = torch_home / "hub" / "checkpoints" / "vit_models" / "imagenet21k" / "ViT-B_16.npz"
    assert cached.read_bytes() == server.files["/vit/imagenet21k/ViT-B_16.npz"]
    server.stop()
    _assert_same(_logits(build_model(_model_cfg("ViT-B_16.npz"))), _logits(reference))
    assert server.requests == ["/vit/imagenet21k/ViT-B_16.npz"]


def test_named_checkpoint_offline_says_where_to_put_it(
    server: Loopback, torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VIT_MODELS_URL_ENV, server.url)
    server.stop()
    with pytest.raises(DataError) as error:
        build_model(_model_cfg("ViT-L_16"))
    cached = torch_home / "hub" / "checkpoints" / "vit_models" / "imagenet21k" / "ViT-L_16.npz"
    assert _one_line(error) == (
        f"cannot download ViT-L_16 from {server.url}/imagenet21k/ViT-L_16.npz ([Errno 111] Connection "
        f"refused): download it elsewhere and put it at {cached} (or set model.pretrained to a local copy)"
    )
    # Put there by hand (here: a tiny stand-in), it is used and its checksum recorded.
    reference = _timm_vit()
    cached.write_bytes(_npz_bytes(reference))
    _assert_same(_logits(build_model(_model_cfg("ViT-L_16"))), _logits(reference))
    assert cached.with_name("ViT-L_16.npz.sha256").is_file()


def test_unknown_names_and_missing_files(tmp_path: Path, torch_home: Path) -> None:
    with pytest.raises(ConfigError) as error:
        build_model(_model_cfg("ViT-B16"))
    assert _one_line(error) == (
        "model.pretrained=ViT-B16 is neither a file nor a known weights name; did you mean ViT-B_16? "
        "(python -m vitexp.weights lists the names)"
    )
    with pytest.raises(ConfigError, match=r"^model.pretrained=nothing is neither a file nor a known"):
        resolve_weights("nothing")
    with pytest.raises(DataError, match=r"^pretrained weights file .*nope.npz does not exist: set"):
        resolve_weights(tmp_path / "nope.npz")
    with pytest.raises(DataError, match=r"^pretrained weights file .*/ViT-B_16.npz does not exist"):
        resolve_weights(tmp_path / "ViT-B_16.npz")  # a path, not the name
    assert not (torch_home / "hub").exists()  # nothing was downloaded, nothing created


def test_every_name_fits_a_model_config_and_the_presets_name_theirs() -> None:
    options = set(model_options())
    assert {entry.model for entry in NAMED_WEIGHTS} | {hub.model for hub in HUB_WEIGHTS} <= options
    assert len({entry.name for entry in NAMED_WEIGHTS}) == len(NAMED_WEIGHTS)
    for preset in ("cifar10_finetune_vit_b16", "cifar100_finetune_vit_b16"):
        cfg = compose_cfg([f"experiment={preset}"])
        entry = find_named(str(cfg.model.pretrained))
        assert entry is not None and entry.path == "imagenet21k/ViT-B_16.npz"
        assert compose_cfg([f"model={entry.model}"]).model.hidden_size == cfg.model.hidden_size == 768


def test_weights_command_lists_names_with_their_config(capsys: pytest.CaptureFixture[str]) -> None:
    from vitexp.commands.weights import main

    assert main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("ViT-B_16 "))
    assert row.split()[:2] == ["ViT-B_16", "vit_b16"] and row.endswith("/imagenet21k/ViT-B_16.npz")
    hub_row = ["hf-hub:timm/vit_small_patch16_224.augreg_in21k", "vit_s16"]
    assert any(line.split()[:2] == hub_row for line in lines)
    assert all(any(line.startswith(entry.name + " ") for line in lines) for entry in NAMED_WEIGHTS)


def test_weights_command_fetches_into_the_cache(
    server: Loopback, torch_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitexp.commands.weights import main

    server.files["/w.safetensors"] = _safetensors_bytes(_timm_vit())
    assert main([f"{server.url}/w.safetensors"]) == 0
    path = Path(capsys.readouterr().out.strip().split(": ", 1)[1])
    assert path.read_bytes() == server.files["/w.safetensors"] and torch_home in path.parents
    with pytest.raises(SystemExit) as stopped:
        main(["ViT-B16"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: model.pretrained=ViT-B16 is neither a file nor a known weights name; did you mean "
        "ViT-B_16? (python -m vitexp.weights lists the names)"
    ]


# --------------------------------------------------------------------------- the Hugging Face Hub


def test_hub_timm_repo_gives_timm_logits(hub_cache: Path, tmp_path: Path) -> None:
    from timm.models._hub import save_for_hf

    reference = _timm_vit()
    save_for_hf(reference, str(tmp_path / "saved"), safe_serialization=True)
    commit = fill_hub_cache(hub_cache, "timm/vit_small_patch16_224.augreg_in21k", tmp_path / "saved")
    source = "hf-hub:timm/vit_small_patch16_224.augreg_in21k"
    _assert_same(_logits(build_model(_model_cfg(source))), _logits(reference))
    _assert_same(_logits(build_model(_model_cfg(f"{source}@{commit}"))), _logits(reference))
    with pytest.raises(DataError):  # a revision the cache does not hold: offline, not there
        resolve_weights(f"{source}@{'b' * 40}")


def test_hub_transformers_repo_with_only_a_bin_gives_hf_logits(hub_cache: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=IMG, patch_size=PATCH, hidden_size=DIM, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=MLP, num_labels=CLASSES, hidden_act="gelu",
        layer_norm_eps=1e-12,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = _perturb(transformers.ViTForImageClassification(config))
    reference.save_pretrained(tmp_path / "saved")
    # A repo of the older layout (transformers 5 writes only safetensors): pytorch_model.bin.
    (tmp_path / "saved" / "model.safetensors").unlink()
    torch.save(reference.state_dict(), tmp_path / "saved" / "pytorch_model.bin")
    fill_hub_cache(hub_cache, "google/vit-tiny-test", tmp_path / "saved")
    model = build_model(_model_cfg("hf-hub:google/vit-tiny-test", norm_eps=1e-12))
    with torch.no_grad():
        expected = reference(pixel_values=_images()).logits
    _assert_same(_logits(model), expected)


def test_hub_offline_with_nothing_cached_is_one_line(hub_cache: Path) -> None:
    with pytest.raises(DataError) as error:
        build_model(_model_cfg("hf-hub:timm/vit_small_patch16_224.augreg_in21k"))
    assert _one_line(error) == (
        "cannot fetch hf-hub:timm/vit_small_patch16_224.augreg_in21k: neither model.safetensors nor "
        f"pytorch_model.bin is in the Hub cache {hub_cache} and HF_HUB_OFFLINE is set; on a machine with "
        "a network run `hf download timm/vit_small_patch16_224.augreg_in21k` (or python -m vitexp.weights "
        "hf-hub:timm/vit_small_patch16_224.augreg_in21k) and copy its cache there (HF_HOME), then run "
        "again, with HF_HUB_OFFLINE=1"
    )


@pytest.mark.parametrize("spec", ["hf-hub:", "hf-hub:org/name@", "hf-hub:a/b/c"])
def test_hub_ids_that_name_no_repo(spec: str, hub_cache: Path) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_weights(spec)
    assert _one_line(error).startswith(f"model.pretrained={spec}")


# --------------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_cli_hub_id_stops_offline_then_trains_from_a_filled_cache(tmp_path: Path) -> None:
    """The issue's check: with nothing cached and no Hub, one line and nothing trained; with a
    filled cache and HF_HUB_OFFLINE=1, it trains."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    source = "hf-hub:timm/vit_small_patch16_224.augreg_in21k"
    args = ["model=vit_s16", f"model.pretrained={source}", *TINY_CLI, *RUN_CLI]
    refused = run_cli(*args, f"hydra.run.dir={tmp_path / 'refused'}", env=env)
    assert refused.returncode == 3, refused.stderr[-3000:]
    assert "Traceback" not in refused.stdout + refused.stderr
    (line,) = [line for line in (refused.stdout + refused.stderr).splitlines() if "error:" in line]
    assert line.endswith(
        f"error: model: cannot fetch {source}: neither model.safetensors nor pytorch_model.bin is in the "
        f"Hub cache {tmp_path / 'hf' / 'hub'} and HF_HUB_OFFLINE is set; on a machine with a network run "
        f"`hf download timm/vit_small_patch16_224.augreg_in21k` (or python -m vitexp.weights {source}) and "
        f"copy its cache there (HF_HOME), then run again, with HF_HUB_OFFLINE=1"
    )
    assert not {"metrics.jsonl", "last.pt"} & {p.name for p in (tmp_path / "refused").iterdir()}

    from timm.models._hub import save_for_hf

    save_for_hf(_timm_vit(), str(tmp_path / "saved"), safe_serialization=True)
    fill_hub_cache(tmp_path / "hf" / "hub", source.removeprefix("hf-hub:"), tmp_path / "saved")
    trained = run_cli(*args, f"hydra.run.dir={tmp_path / 'trained'}", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "trained" / "last.pt").is_file()


@pytest.mark.slow
def test_cli_finetune_preset_downloads_its_named_weights(server: Loopback, tmp_path: Path) -> None:
    """`experiment=cifar10_finetune_vit_b16` with nothing downloaded: its ViT-B_16 comes from the
    (mirrored) bucket into the torch hub cache; tiny sizes and fake data stand in for the GPU run."""
    server.files["/imagenet21k/ViT-B_16.npz"] = _npz_bytes(_timm_vit())
    env = {VIT_MODELS_URL_ENV: server.url, "TORCH_HOME": str(tmp_path / "torch")}
    args = ["experiment=cifar10_finetune_vit_b16", *TINY_CLI, *RUN_CLI, f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.requests == ["/imagenet21k/ViT-B_16.npz"]
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "vit_models" / "imagenet21k" / "ViT-B_16.npz"
    assert cached.read_bytes() == server.files["/imagenet21k/ViT-B_16.npz"]
    assert (tmp_path / "run" / "last.pt").is_file()


@pytest.mark.slow
def test_cli_hub_that_does_not_answer_is_one_line_then_the_cache_serves(tmp_path: Path) -> None:
    """Not offline, but the Hub (HF_ENDPOINT: a closed port here) does not answer: after
    huggingface_hub's retries (about 25 s, said in one warning), one error line; with a filled
    cache the run trains from it."""
    closed = Loopback({})
    endpoint = closed.url
    closed.stop()
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": endpoint, "TORCH_HOME": str(tmp_path / "torch")}
    source = "hf-hub:timm/vit_small_patch16_224.augreg_in21k"
    args = ["model=vit_s16", f"model.pretrained={source}", *TINY_CLI, *RUN_CLI]
    refused = run_cli(*args, f"hydra.run.dir={tmp_path / 'refused'}", env=env)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 3, output[-3000:]
    (line,) = [line for line in output.splitlines() if "error:" in line]
    assert f"error: model: cannot fetch {source}: neither model.safetensors nor pytorch_model.bin" in line
    assert f"and {endpoint} cannot be reached: " in line and "Connection refused" in line
    assert "Retrying in" not in output and output.count("the Hub does not answer") == 1

    from timm.models._hub import save_for_hf

    save_for_hf(_timm_vit(), str(tmp_path / "saved"), safe_serialization=True)
    fill_hub_cache(tmp_path / "hf" / "hub", source.removeprefix("hf-hub:"), tmp_path / "saved")
    trained = run_cli(*args, f"hydra.run.dir={tmp_path / 'trained'}", env=env)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    assert (tmp_path / "trained" / "last.pt").is_file()
