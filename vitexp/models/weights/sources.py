"""Where pretrained weights come from: `resolve_weights(source)` turns what `model.pretrained`
says into a local file, downloading it first when it is not cached.

A source is one of

- a local file or `save_pretrained` folder (used as it is);
- `hf-hub:ORG/NAME[@REVISION]`: a Hugging Face Hub repo in timm's or transformers' layout, its
  `model.safetensors` (else `pytorch_model.bin`) fetched by `huggingface_hub` into its own cache,
  so `HF_HOME`, `HF_ENDPOINT` (mirrors), `HF_TOKEN` and `HF_HUB_OFFLINE` work as everywhere else;
- a name from `NAMED_WEIGHTS`, the original checkpoints of google-research/vision_transformer
  (`ViT-B_16`, `R50+ViT-B_16`, the AugReg files), fetched from its public bucket (or the mirror
  in `$VITEXP_VIT_MODELS_URL`) into torch hub's cache (`$TORCH_HOME/hub/checkpoints/vit_models/`);
- an `http(s)://` URL, cached the same way (`.../checkpoints/urls/`); a `#sha256=HEX` fragment
  gives its checksum.

Downloads of names and URLs show a progress bar, go to a `.incomplete` file that becomes the
cached file only once complete (its length; its first bytes, which must be its format's, so that
an HTML sign-in page answered with 200 is refused, not cached; and the CRCs of a zip (`.npz`,
`.pth`) or the header of a `.safetensors`, checked), and are serialised by a lock next to the
file, so the jobs of a sweep share one download. A cached file whose first bytes are not
weights is removed and fetched again. The SHA-256 of a downloaded file is recorded next to it
(`.sha256`) and checked on every later read, as is a published one. A source that does not exist is a
ConfigError; a download that fails, or a file that is damaged, a DataError: one line each,
naming the source, where it was fetched from and where to put the file by hand.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vitexp.errors import ConfigError, DataError, first_line
from vitexp.models.weights.io import HEAD_BYTES, HF_WEIGHT_FILES, format_problem

__all__ = [
    "HUB_PREFIX",
    "HUB_WEIGHTS",
    "NAMED_WEIGHTS",
    "VIT_MODELS_URL",
    "VIT_MODELS_URL_ENV",
    "HubWeights",
    "NamedWeights",
    "cache_dir",
    "find_named",
    "named_url",
    "resolve_weights",
]

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
# The public bucket of google-research/vision_transformer, and the variable that replaces it
# (a mirror, or a local server in the tests).
VIT_MODELS_URL = "https://storage.googleapis.com/vit_models/"
VIT_MODELS_URL_ENV = "VITEXP_VIT_MODELS_URL"
_TIMEOUT_S = 60.0  # per socket operation, not for the whole download
_CHUNK = 1 << 20


@dataclass(frozen=True)
class NamedWeights:
    """One checkpoint of the vit_models bucket that `model.pretrained` may name."""

    name: str  # what model.pretrained takes (its file name, with or without .npz, works too)
    path: str  # inside the bucket
    model: str  # the model= config it fits
    trained: str  # on what, in words
    sha256: str | None = None  # a published checksum, when there is one (none is, for these)


_I21K = "ImageNet-21k (ViT paper)"
_AR = "ImageNet-21k, AugReg"


def _augreg(model: str, size: str, regularisation: str) -> NamedWeights:
    """An AugReg checkpoint (Steiner et al. 2021) pre-trained on ImageNet-21k, named by its size."""
    path = f"augreg/{size}-i21k-300ep-lr_0.001-{regularisation}.npz"
    return NamedWeights(size, path, model, _AR)


# The file names are those of the bucket's listing in google-research/vision_transformer's
# vit_jax.ipynb (imagenet21k/) and its README's table of recommended AugReg checkpoints
# (augreg/); B_8's is the one timm imports. Hybrids without a vitexp config (R26+ViT-B_32,
# R50+ViT-L_32, the AugReg R+Ti/16, R26+S/32, R50+L/32) are left out.
NAMED_WEIGHTS: tuple[NamedWeights, ...] = (
    NamedWeights("ViT-B_16", "imagenet21k/ViT-B_16.npz", "vit_b16", _I21K),
    NamedWeights("ViT-B_32", "imagenet21k/ViT-B_32.npz", "vit_b32", _I21K),
    NamedWeights("ViT-B_8", "imagenet21k/ViT-B_8.npz", "vit_b8", _I21K),
    NamedWeights("ViT-L_16", "imagenet21k/ViT-L_16.npz", "vit_l16", _I21K),
    NamedWeights("ViT-L_32", "imagenet21k/ViT-L_32.npz", "vit_l32", _I21K),
    NamedWeights("ViT-H_14", "imagenet21k/ViT-H_14.npz", "vit_h14", _I21K),
    NamedWeights("R50+ViT-B_16", "imagenet21k/R50+ViT-B_16.npz", "vit_r50_b16", _I21K),
    _augreg("vit_ti16", "Ti_16", "aug_none-wd_0.03-do_0.0-sd_0.0"),
    _augreg("vit_s16", "S_16", "aug_light1-wd_0.03-do_0.0-sd_0.0"),
    _augreg("vit_s32", "S_32", "aug_none-wd_0.1-do_0.0-sd_0.0"),
    _augreg("vit_b16", "B_16", "aug_medium1-wd_0.1-do_0.0-sd_0.0"),
    _augreg("vit_b32", "B_32", "aug_light1-wd_0.1-do_0.0-sd_0.0"),
    _augreg("vit_b8", "B_8", "aug_medium1-wd_0.1-do_0.0-sd_0.0"),
    _augreg("vit_l16", "L_16", "aug_strong1-wd_0.1-do_0.0-sd_0.0"),
)


@dataclass(frozen=True)
class HubWeights:
    """A Hub repo worth knowing, for the listing (`python -m vitexp.weights`); any other
    `hf-hub:` id works the same way."""

    repo: str
    model: str
    trained: str
    note: str = ""


# timm's ids of the bucket's checkpoints (its pretrained configs name the files), and
# transformers' ViT-B/16. timm's AugReg S/32, B/32 and L/16 are other runs than the names above.
_OTHER_RUN = "another AugReg run than {}"
HUB_WEIGHTS: tuple[HubWeights, ...] = (
    HubWeights("timm/vit_tiny_patch16_224.augreg_in21k", "vit_ti16", _AR, "= Ti_16"),
    HubWeights("timm/vit_small_patch16_224.augreg_in21k", "vit_s16", _AR, "= S_16"),
    HubWeights("timm/vit_small_patch32_224.augreg_in21k", "vit_s32", _AR, _OTHER_RUN.format("S_32")),
    HubWeights("timm/vit_base_patch16_224.augreg_in21k", "vit_b16", _AR, "= B_16"),
    HubWeights("timm/vit_base_patch32_224.augreg_in21k", "vit_b32", _AR, _OTHER_RUN.format("B_32")),
    HubWeights("timm/vit_base_patch8_224.augreg_in21k", "vit_b8", _AR, "= B_8"),
    HubWeights("timm/vit_large_patch16_224.augreg_in21k", "vit_l16", _AR, _OTHER_RUN.format("L_16")),
    HubWeights("timm/vit_base_patch16_224.orig_in21k", "vit_b16", _I21K, "ViT-B_16 without its head"),
    HubWeights("timm/vit_large_patch16_224.orig_in21k", "vit_l16", _I21K, "ViT-L_16 without its head"),
    HubWeights("timm/vit_huge_patch14_224.orig_in21k", "vit_h14", _I21K, "ViT-H_14 without its head"),
    HubWeights("timm/vit_base_r50_s16_224.orig_in21k", "vit_r50_b16", _I21K, "R50+ViT-B_16 without its head"),
    HubWeights("google/vit-base-patch16-224-in21k", "vit_b16", _I21K, "add model.norm_eps=1e-12"),
)  # fmt: skip


def _lookup_keys(entry: NamedWeights) -> tuple[str, ...]:
    stem = PurePosixPath(entry.path).stem
    return (entry.name, stem, entry.path, entry.path.removesuffix(".npz"))


_BY_KEY: dict[str, NamedWeights] = {key: entry for entry in NAMED_WEIGHTS for key in _lookup_keys(entry)}


def find_named(source: str) -> NamedWeights | None:
    """The entry of `NAMED_WEIGHTS` that `source` names (its name, its file name with or
    without `.npz`, or its path in the bucket), or None."""
    return _BY_KEY.get(source) or _BY_KEY.get(source.removesuffix(".npz"))


def named_url(entry: NamedWeights) -> str:
    """Where `entry` is downloaded from: the bucket, or the mirror `$VITEXP_VIT_MODELS_URL`."""
    base = os.environ.get(VIT_MODELS_URL_ENV) or VIT_MODELS_URL
    return base.rstrip("/") + "/" + urllib.parse.quote(entry.path)


def cache_dir() -> Path:
    """Where names and URLs are cached: torch hub's `checkpoints/` (`$TORCH_HOME/hub/...`)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(source: str | os.PathLike[str], *, hub_files: tuple[str, ...] = HF_WEIGHT_FILES) -> Path:
    """The local file (or `save_pretrained` folder) that `source` names, downloaded first when
    needed; see the module's docstring. `hub_files`: the files of a Hub repo to look for, in
    order (timm names one where its weights have another name). ConfigError for a source that
    does not exist (an unknown name, a Hub repo or revision that is not there); DataError for a
    download that fails or a file that is damaged; each one line."""
    text = os.fspath(source).strip()
    if text.startswith(HUB_PREFIX):
        return _from_hub(text[len(HUB_PREFIX) :], hub_files)
    if re.match(r"https?://", text, flags=re.IGNORECASE):
        url, sha256 = _split_checksum(text)
        return _cached_download(url, _url_cache_path(url), what=url, sha256=sha256)
    path = Path(text).expanduser()
    if path.exists():
        return path
    entry = find_named(text)
    if entry is not None:
        target = cache_dir() / "vit_models" / entry.path
        return _cached_download(named_url(entry), target, what=entry.name, sha256=entry.sha256)
    raise _not_found(text, path)


def _not_found(text: str, path: Path) -> ConfigError | DataError:
    names = [e.name for e in NAMED_WEIGHTS]
    close = difflib.get_close_matches(text.removesuffix(".npz"), names, n=1) if len(path.parts) == 1 else []
    if close:
        return ConfigError(
            f"model.pretrained={text} is neither a file nor a known weights name; did you mean "
            f"{close[0]}? (python -m vitexp.weights lists the names)"
        )
    if len(path.parts) > 1 or path.suffix:
        return DataError(
            f"pretrained weights file {path} does not exist: set model.pretrained to an existing file, "
            f"a name from `python -m vitexp.weights`, {HUB_PREFIX}ORG/NAME or an http(s) URL"
        )
    return ConfigError(
        f"model.pretrained={text} is neither a file nor a known weights name: give a path, a name from "
        f"`python -m vitexp.weights` (e.g. ViT-B_16), {HUB_PREFIX}ORG/NAME or an http(s) URL"
    )


# --------------------------------------------------------------------------- Hugging Face Hub


def _from_hub(spec: str, filenames: tuple[str, ...] = HF_WEIGHT_FILES) -> Path:
    """`ORG/NAME[@REVISION]` → the cached weights file of that repo (the first of `filenames`
    it has), through huggingface_hub."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, at, revision = spec.partition("@")
    source = f"{HUB_PREFIX}{spec}"
    if not repo_id or (at and not revision):
        raise ConfigError(f"model.pretrained={source} names no repo: write {HUB_PREFIX}ORG/NAME[@REVISION]")
    unreachable: LocalEntryNotFoundError | None = None
    for filename in filenames:
        with _hub_errors(source, filename), _one_line_for_retries(source):
            try:
                return Path(
                    huggingface_hub.hf_hub_download(
                        repo_id,
                        filename,
                        revision=revision or None,
                        library_name="vitexp",
                        # Once the Hub could not be reached, ask the cache alone for the others.
                        local_files_only=unreachable is not None,
                    )
                )
            except LocalEntryNotFoundError as e:
                unreachable = unreachable or e
                continue
            except huggingface_hub.errors.EntryNotFoundError:
                continue  # the repo has no such file: try the next layout
    if unreachable is not None:
        raise DataError(_hub_unreachable(source, repo_id, unreachable, constants.HF_HUB_CACHE, filenames))
    raise ConfigError(
        f"model.pretrained={source}: {_none_of(filenames)} in the repo; point at a "
        f"repo of timm or transformers ViT weights"
    )


def _none_of(filenames: tuple[str, ...]) -> str:
    return f"neither {' nor '.join(filenames)} is" if len(filenames) > 1 else f"{filenames[0]} is not"


def _hub_unreachable(
    source: str, repo_id: str, error: BaseException, cache: str, filenames: tuple[str, ...] = HF_WEIGHT_FILES
) -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        reason = "HF_HUB_OFFLINE is set"
    else:
        cause = error.__cause__ or error
        reason = f"{constants.ENDPOINT} cannot be reached: {_first_line(cause)}"
    return (
        f"cannot fetch {source}: {_none_of(filenames)} in the Hub cache {cache} and "
        f"{reason}; on a machine with a network run `hf download {repo_id}` (or python -m vitexp.weights "
        f"{source}) and copy its cache there (HF_HOME), then run again, with HF_HUB_OFFLINE=1"
    )


class _RetriesInOneLine(logging.Filter):
    """huggingface_hub logs two warnings per retry (five of them, over ~25 s) when the Hub does
    not answer; this says it once, in a line of ours."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source, self.told = source, False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if not self.told:
            self.told = True
            logger.warning(
                "fetching %s: the Hub does not answer (%s); huggingface_hub retries for about 25 s before "
                "the cache is tried (HF_HUB_OFFLINE=1 reads the cache alone)",
                self.source,
                record.getMessage()[:200],
            )
        return False


@contextlib.contextmanager
def _one_line_for_retries(source: str) -> Iterator[None]:
    retries = logging.getLogger("huggingface_hub.utils._http")
    quiet = _RetriesInOneLine(source)
    retries.addFilter(quiet)
    try:
        yield
    finally:
        retries.removeFilter(quiet)


@contextlib.contextmanager
def _hub_errors(source: str, filename: str) -> Iterator[None]:
    """huggingface_hub's errors for a repo, a revision or an access that is not there, and for
    a failed transfer, as one line each; the ones `_from_hub` handles pass through."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except EntryNotFoundError:
        raise
    except GatedRepoError:
        raise ConfigError(
            f"model.pretrained={source} is a gated repo: accept its terms on the Hub and log in "
            f"(hf auth login, or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"model.pretrained={source}: no such repo on the Hub (or it is private: log in with "
            f"hf auth login, or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(
            f"model.pretrained={source}: the repo has no such revision (a branch, tag or commit)"
        ) from None
    except HFValidationError as e:
        raise ConfigError(f"model.pretrained={source} is not a Hub repo id: {_first_line(e)}") from None
    except (HfHubHTTPError, OSError) as e:
        raise DataError(f"cannot fetch {filename} of {source}: {_first_line(e)}") from None


# --------------------------------------------------------------------------- URLs and names


def _split_checksum(url: str) -> tuple[str, str | None]:
    """The URL without its fragment, and the SHA-256 a `#sha256=HEX` fragment gives."""
    base, _, fragment = url.partition("#")
    if not fragment:
        return url, None
    match = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
    if match is None:
        raise ConfigError(
            f"model.pretrained={url}: the only fragment understood is #sha256= and 64 hex digits"
        )
    return base, match.group(1).lower()


def _url_cache_path(url: str) -> Path:
    """One folder per URL (two URLs may end in the same file name), holding its file name."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if name in ("", ".", ".."):
        name = "weights"
    return cache_dir() / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def _first_line(error: BaseException | str) -> str:
    # A URLError's message is its reason's.
    return first_line(getattr(error, "reason", None) or error)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)


def _checked(target: Path, published: str | None) -> Path:
    """`target`, once its SHA-256 matches the published one, else the one recorded at its
    download. A file put there by hand (no record) has its checksum recorded now."""
    record = target.with_name(target.name + ".sha256")
    recorded = record.read_text().split()[0] if record.is_file() and record.read_text().strip() else None
    expected = published or recorded
    actual = _sha256(target)
    if expected is None:
        _write_atomically(record, f"{actual}  {target.name}\n")
    elif actual != expected:
        said = "published" if published else f"recorded in {record.name} when it was downloaded"
        raise DataError(
            f"cached weights {target} do not match the SHA-256 {said} ({actual[:12]}… ≠ {expected[:12]}…): "
            f"the file is damaged or was replaced; delete it and run again to download it afresh"
        )
    return target


def _cached_download(url: str, target: Path, *, what: str, sha256: str | None) -> Path:
    """`target` if cached, else downloaded from `url` under a lock (one process downloads, the
    others wait for it and then read its file). A cached file that is not weights at all (an
    HTML page an older vitexp cached, a file put there by mistake) is removed and fetched again."""
    if target.is_file() and _format_problem_of(target, target.suffix) is None:
        return _checked(target, sha256)
    from filelock import FileLock, Timeout

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another process that is downloading %s to %s", what, target)
            lock.acquire()
    except OSError as e:
        raise DataError(f"cannot write to the weights cache {target.parent}: {_first_line(e)}") from None
    try:
        if target.is_file():  # another process downloaded it while this one waited, or it is bad
            problem = _format_problem_of(target, target.suffix)
            if problem is None:
                return _checked(target, sha256)
            _remove_cached(target, what, problem)
        _download(url, target, what=what, sha256=sha256)  # checked as it arrived
        return target
    finally:
        lock.release()


def _remove_cached(target: Path, what: str, problem: str) -> None:
    try:
        target.unlink()
        target.with_name(target.name + ".sha256").unlink(missing_ok=True)
    except OSError as e:
        raise DataError(
            f"the cached {what} at {target} is {problem}, and it cannot be removed ({_first_line(e)}): "
            f"delete it and run again"
        ) from None
    logger.warning("the cached %s at %s was %s: removed it, downloading it again", what, target, problem)


def _download(url: str, target: Path, *, what: str, sha256: str | None) -> None:
    """Fetch `url` into `target.incomplete`, check it, record its SHA-256 and only then move it
    to `target`: a download that is killed, cut short or damaged never looks complete."""
    from tqdm import tqdm

    partial = target.with_name(target.name + ".incomplete")
    origin = url if what == url else f"{what} from {url}"
    by_hand = f"download it elsewhere and put it at {target} (or set model.pretrained to a local copy)"
    request = urllib.request.Request(url, headers={"User-Agent": "vitexp"})
    digest, written = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, partial.open("wb") as out:
            length = response.headers.get("Content-Length")
            content_type = response.headers.get("Content-Type") or ""
            total = int(length) if length and length.isdigit() else None
            logger.info("downloading %s from %s to %s", what, url, target)
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=None)
            with bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if total is not None and written != total:
            raise DataError(
                f"the download of {origin} was cut short ({written} of {total} bytes); nothing "
                f"was cached: run again, or {by_hand}"
            )
        not_weights = _format_problem_of(partial, target.suffix, content_type)
        if not_weights is not None:
            raise DataError(
                f"the download of {origin} is {not_weights}; nothing was cached: check the URL (does it need "
                f"a sign-in or a token?), or {by_hand}"
            )
        damage = _damage(partial, suffix=target.suffix)
        if damage is None and sha256 is not None and digest.hexdigest() != sha256:
            damage = f"its SHA-256 {digest.hexdigest()[:12]}… is not the published {sha256[:12]}…"
        if damage is not None:
            raise DataError(
                f"the download of {origin} is damaged ({damage}); nothing was cached: run again, or {by_hand}"
            )
        _write_atomically(target.with_name(target.name + ".sha256"), f"{digest.hexdigest()}  {target.name}\n")
        os.replace(partial, target)
    except (OSError, http.client.HTTPException) as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else _first_line(e)
        raise DataError(f"cannot download {origin} ({reason}): {by_hand}") from None
    finally:
        partial.unlink(missing_ok=True)


def _format_problem_of(path: Path, suffix: str, content_type: str = "") -> str | None:
    """What `path` is instead of weights of its `suffix`'s format, from its first bytes (see
    `io.format_problem`), or None when they fit."""
    with path.open("rb") as f:
        return format_problem(f.read(HEAD_BYTES), suffix, content_type)


def _damage(path: Path, suffix: str) -> str | None:
    """What is wrong with a freshly downloaded file (to be named `*suffix`), as far as its format
    can tell without parsing the weights: the CRC of every member of a zip (`.npz`, torch's
    `.pth`/`.bin`), the sizes a `.safetensors` header promises. None when nothing is."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"not a readable zip archive: {_first_line(e)}"
        return f"member {bad} fails its CRC check" if bad else None
    if suffix == ".safetensors":
        return _safetensors_damage(path)
    if suffix == ".npz":
        return "not a zip archive, which every .npz is"
    return None


def _safetensors_damage(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_size <= size - 8:
            return "no safetensors header"
        try:
            header = json.loads(f.read(header_size))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "a malformed safetensors header"
    expected = 8 + header_size + max(ends, default=0)
    return None if expected == size else f"{size} bytes where its header promises {expected}"
