"""Pretrained weights under bad input and faults (#27): downloads that are not weights (an HTML
sign-in page answered with 200), bad files already in the cache, weights that hold NaN, and the
README's checksum form on the command line.

Downloads come from the loopback server of tests/test_weights_sources.py (127.0.0.1, in a
thread, stopping by itself) into a torch hub cache in a temporary `TORCH_HOME`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from tests.helpers import REPO
from tests.test_weights_sources import (
    Loopback,
    _model_cfg,
    _npz_bytes,
    _one_line,
    _safetensors_bytes,
    _timm_vit,
)
from vitexp.cli import check_command_line
from vitexp.config import validate
from vitexp.errors import DataError
from vitexp.models import build_model
from vitexp.models.weights import read_weights, resolve_weights
from vitexp.models.weights.sources import _url_cache_path

SIGN_IN = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body><form>...</form></body></html>\n"


@pytest.fixture
def server() -> Iterator[Loopback]:
    loopback = Loopback({}, lifetime=60.0)
    yield loopback
    loopback.stop()


def _tiny_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(_model_cfg("")).state_dict()


def _torch_bytes(state_dict: dict[str, torch.Tensor], *, zipped: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer, _use_new_zipfile_serialization=zipped)
    return buffer.getvalue()


def _cached_files(torch_home: Path) -> list[str]:
    return sorted(p.name for p in (torch_home / "hub" / "checkpoints").rglob("*") if p.is_file())


# --------------------------------------------------------------------------- downloads


@pytest.mark.parametrize("name", ["w.pth", "w.npz", "w.safetensors", "download"])
def test_sign_in_page_is_refused_in_one_line_and_not_cached(
    name: str, server: Loopback, torch_home: Path
) -> None:
    server.files[f"/{name}"] = SIGN_IN
    server.types[f"/{name}"] = "text/html; charset=utf-8"
    url = f"{server.url}/{name}"
    with pytest.raises(DataError) as error:
        resolve_weights(f"{url}#sha256={'0' * 64}")
    message = _one_line(error)
    assert message.startswith(f"the download of {url} is an HTML page (a sign-in or error page?), not "), (
        message
    )
    assert "nothing was cached" in message and "put it at" in message
    assert _cached_files(torch_home) == [f"{name}.lock"]


def test_text_served_as_weights_is_named_by_its_first_line(server: Loopback, torch_home: Path) -> None:
    server.files["/w.pth"] = b'{"error": "token expired"}\n'
    with pytest.raises(DataError) as error:
        resolve_weights(f"{server.url}/w.pth")
    assert 'is text (\'{"error": "token expired"}\'…), not a torch file' in _one_line(error)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_torch_files_of_either_serialisation_pass_the_check(
    zipped: bool, server: Loopback, torch_home: Path
) -> None:
    weights = _tiny_weights()
    server.files["/w.pth"] = _torch_bytes(weights, zipped=zipped)
    model = build_model(_model_cfg(f"{server.url}/w.pth"))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())


def _plant(torch_home: Path, url: str, body: bytes) -> Path:
    """Put `body` where `url` is cached, with its checksum recorded, as an older vitexp that
    did not check downloads left a sign-in page."""
    cached = _url_cache_path(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(body)
    cached.with_name(cached.name + ".sha256").write_text(
        f"{hashlib.sha256(body).hexdigest()}  {cached.name}\n"
    )
    return cached


def test_page_already_in_the_cache_is_removed_and_fetched_again(
    server: Loopback, torch_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.files["/w.safetensors"] = body = _safetensors_bytes(build_model(_model_cfg("")))
    url = f"{server.url}/w.safetensors"
    cached = _plant(torch_home, url, SIGN_IN)
    with caplog.at_level(logging.WARNING, logger="vitexp"):
        assert resolve_weights(url) == cached
    assert cached.read_bytes() == body and server.requests == ["/w.safetensors"]
    assert cached.with_name("w.safetensors.sha256").read_text().split()[0] == hashlib.sha256(body).hexdigest()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (
        f"the cached {url} at {cached} was an HTML page (a sign-in or error page?), not a safetensors file: "
        f"removed it, downloading it again"
    )


def test_page_in_the_cache_with_the_server_gone_is_removed_and_named(
    server: Loopback, torch_home: Path
) -> None:
    url = f"{server.url}/w.pth"
    cached = _plant(torch_home, url, SIGN_IN)
    server.stop()
    with pytest.raises(DataError) as error:
        resolve_weights(url)
    assert _one_line(error).startswith(f"cannot download {url} (")
    assert f"put it at {cached} " in str(error.value)
    assert not cached.exists() and not cached.with_name("w.pth.sha256").exists()


@pytest.mark.parametrize("suffix", [".pth", ".npz", ".safetensors"])
def test_local_html_file_is_named_as_a_page(suffix: str, tmp_path: Path) -> None:
    """An .npz that is a page was said to hold pickled objects, a .pth to fail torch's unpickler."""
    path = tmp_path / f"w{suffix}"
    path.write_bytes(SIGN_IN)
    with pytest.raises(DataError) as error:
        read_weights(path)
    assert _one_line(error).startswith(f"cannot read pretrained weights {path}: it is an HTML page (")


# --------------------------------------------------------------------------- NaN weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_hold_nan_are_refused_naming_file_and_first_key(bad: float, tmp_path: Path) -> None:
    weights = _tiny_weights()
    keys = [key for key, value in weights.items() if value.is_floating_point()]
    first, later = keys[3], keys[-1]
    weights[first].view(-1)[0] = bad
    weights[later].view(-1)[-1] = bad
    path = tmp_path / "diverged.pth"
    torch.save(weights, path)
    with pytest.raises(DataError) as error:
        build_model(_model_cfg(str(path)))
    assert _one_line(error) == (
        f"pretrained weights {path} hold NaN or inf in {first} (and 1 more): the file is damaged or "
        f"comes from a run that diverged; point model.pretrained at other weights"
    )


# --------------------------------------------------------------------------- the documented checksum form


# The README and the docs pages, where the checksum form is documented.
README = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
# The form the docs give, quoted for the shell and for Hydra's grammar.
QUOTED = re.compile(r"'model\.pretrained=\"[^\"']+#sha256=[^\"']+\"'")


def _documented_checksum_forms() -> list[str]:
    """Every `model.pretrained` override with a `#sha256=` in the README (with the model and
    data of the example around it), and every command line that has one."""
    lines = [
        line for line in README.splitlines() if line.startswith("python -m vitexp ") and "#sha256=" in line
    ]
    return [f"model=vit_s16 dataset=cifar10 {form}" for form in QUOTED.findall(README)] + [
        line.removeprefix("python -m vitexp ") for line in lines
    ]


def test_readme_gives_the_checksum_form_quoted_and_only_so() -> None:
    """Unquoted, `model.pretrained=URL#sha256=HEX` is an error of Hydra's override grammar."""
    # Console examples of the error itself (`$ python -m vitexp ...` and its `error: ...`) are
    # the unquoted form on purpose.
    shown = "\n".join(line for line in README.splitlines() if not line.startswith(("$ ", "error: ")))
    every = re.findall(r"model\.pretrained=[^\s`|]*#sha256=", shown)
    assert every and len(QUOTED.findall(shown)) == len(every), every
    assert len(_documented_checksum_forms()) > len(QUOTED.findall(README))  # a whole command line too


@pytest.mark.parametrize("command", _documented_checksum_forms())
def test_documented_checksum_form_parses_and_resolves(
    command: str, server: Loopback, torch_home: Path
) -> None:
    """The README's form, as the shell splits it, passes Hydra's override grammar and vitexp's
    command-line check; with its placeholders filled in, the URL it names downloads and checks."""
    composed: list[DictConfig] = []
    argv = shlex.split(command)
    check_command_line("config", argv, lambda cfg: (validate(cfg), composed.append(cfg)))
    (value,) = [arg.split("=", 1)[1].strip('"') for arg in argv if arg.startswith("model.pretrained=")]
    assert composed[0].model.pretrained == value and "#sha256=" in value

    reference = _timm_vit()
    suffix = Path(value.split("#")[0]).suffix
    if suffix == ".npz":
        body = _npz_bytes(reference)
    elif suffix == ".safetensors":
        body = _safetensors_bytes(reference)
    else:  # a torch file (.pth, .pt, .bin)
        buffer = io.BytesIO()
        torch.save(reference.state_dict(), buffer)
        body = buffer.getvalue()
    url = re.sub(r"^https://[^/]+", server.url, value.split("#")[0])
    server.files[url.removeprefix(server.url)] = body
    filled = command.replace(value, f"{url}#sha256={hashlib.sha256(body).hexdigest()}")
    composed.clear()
    check_command_line("config", shlex.split(filled), composed.append)
    assert resolve_weights(composed[0].model.pretrained).read_bytes() == body


# --------------------------------------------------------------------------- noise


def test_no_object_address_in_a_failed_download(
    server: Loopback, torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Socket:
        def __repr__(self) -> str:
            return object.__repr__(self)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(f"connection reset on {Socket()!r}")

    monkeypatch.setattr("urllib.request.urlopen", refuse)
    with pytest.raises(DataError) as error:
        resolve_weights(f"{server.url}/w.pth")
    message = _one_line(error)
    assert "(connection reset on <" in message and " at 0x" not in message, message
