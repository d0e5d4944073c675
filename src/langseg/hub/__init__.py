"""Weights: the one path to every model's weights, and the one checkpoint layout (safetensors + config).

:func:`resolve_weights` turns a registry entry's :class:`~langseg.registry.WeightsSpec` (or a local
path) into a local file: bundled package data, langseg's cache and Hugging Face downloads, or open_clip's
pretrained catalogue and its cache. :func:`weights_available` says whether that needs a download.

langseg checkpoints are a folder (or a ``.safetensors`` file with a ``config.json`` beside it) holding
``model.safetensors`` and ``config.json`` (``{"model": registry name, "kwargs": {...}, ...}``). Foreign
checkpoints are read with ``torch.load(..., weights_only=True)`` so that no pickled code ever runs.
:mod:`langseg.hub.files` holds the safe readers: every path, ``config.json`` and weights file a user
passes is checked there (types, size, encoding, paths that leave a model folder, NaN weights).

Without a network, a missing file is a :class:`MissingWeightsError` saying which file, where the cache
is, and how to pass a local checkpoint, raised at once (hub calls run with ``HF_HUB_OFFLINE`` honoured
and short timeouts), never a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors.torch import save_file

from langseg.errors import BadDataError, MissingWeightsError, OutputError, UnknownModelError
from langseg.hub.files import (  # noqa: F401 - re-exported
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    WEIGHTS_NAME,
    as_path,
    check_finite,
    clean_message,
    config_dict,
    config_normalisation,
    file_in_folder,
    is_dir,
    is_file,
    read_config,
    read_safetensors,
    reading_config,
    refused_pickle_message,
    state_mismatch,
    torch_load_safely,
)
from langseg.registry import WeightsSpec

BUNDLED_DIR = Path(__file__).parent.parent / "weights"


def cache_dir() -> Path:
    """Where downloaded weights live: ``$LANGSEG_CACHE``, else ``$XDG_CACHE_HOME/langseg``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache``.
    """
    if "LANGSEG_CACHE" in os.environ:
        return Path(os.environ["LANGSEG_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "langseg"


def resolve_weights(
    spec: WeightsSpec | None,
    name: str,
    path: str | Path | None = None,
    open_clip_cache_dir: str | Path | None = None,
) -> Path:
    """The local file (or folder) of ``name``'s weights; the one path every family's weights take.

    In order: ``path`` if given (a file or a checkpoint folder), else by ``spec.kind``: the package's
    bundled copy (sha256-checked), langseg's cache then a hub download (``hub``), open_clip's cache then
    its download (``open_clip``; ``open_clip_cache_dir`` replaces its cache), or a
    :class:`MissingWeightsError` saying how to convert (``convert``).
    """
    if path is not None:
        local = as_path(path, "the weights path").expanduser()
        if not (is_file(local) or is_dir(local)):
            raise MissingWeightsError(f"checkpoint not found: {local}", hint="Check the path you passed.")
        return local
    if spec is None:
        raise MissingWeightsError(
            f"model {name!r} has no published weights",
            hint="Train it (`langseg train`) or pass a checkpoint path; create_model(..., pretrained=False) "
            "gives random weights.",
        )
    if spec.kind == "bundled":
        return bundled_weights(spec, name)
    if spec.kind == "open_clip":
        assert spec.arch is not None and spec.tag is not None
        return Path(open_clip_checkpoint(spec.arch, spec.tag, open_clip_cache_dir))
    if spec.kind == "convert":
        raise MissingWeightsError(f"{name!r} has no published langseg weights yet", hint=spec.hint)
    cached = cache_dir() / name / spec.filename
    if cached.is_file():
        return cached
    return _download(spec, name, cached)


def weights_available(spec: WeightsSpec | None, name: str) -> bool:
    """Whether ``name``'s weights are on this machine now (bundled or cached), without any download."""
    if spec is None or spec.kind == "convert":
        return False
    if spec.kind == "bundled":
        return (BUNDLED_DIR / name / spec.filename).is_file()
    if spec.kind == "open_clip":
        assert spec.arch is not None and spec.tag is not None
        return _open_clip_cached(spec.arch, spec.tag) is not None
    return (cache_dir() / name / spec.filename).is_file()


def bundled_weights(spec: WeightsSpec, name: str) -> Path:
    """The weights shipped inside the package, ``langseg/weights/<name>/<filename>`` (small models
    trained on ShapeWorld), checked against ``spec.sha256``."""
    path = BUNDLED_DIR / name / spec.filename
    if not path.is_file():
        raise MissingWeightsError(
            f"bundled weights {spec.filename} for {name!r} are missing from the install ({path})",
            hint="Reinstall langseg (pip install --force-reinstall), or pass a checkpoint path.",
        )
    if spec.sha256 is not None and _sha256(path) != spec.sha256:
        raise BadDataError(
            f"bundled weights {path} do not match their recorded sha256",
            hint="The install is damaged or was edited; reinstall langseg.",
        )
    return path


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now (huggingface_hub reads it only at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within ``timeout`` seconds.

    huggingface_hub retries unreachable hosts with backoff (~25 s per file); this probe turns "no network"
    into an immediate error. Behind a proxy the probe cannot tell, so it answers True and the hub's own
    timeouts apply.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    address = (url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80))
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    # A thread bounds the DNS lookup too, which socket timeouts do not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def _download(spec: WeightsSpec, name: str, target: Path) -> Path:
    hint = (
        f"Without a network, put the file at {target} (cache: {cache_dir()}, set LANGSEG_CACHE to move it), "
        "or pass a local checkpoint path."
    )
    if hub_offline() or not hub_reachable():
        raise MissingWeightsError(
            f"{spec.filename} for {name!r} is not cached and the hub is offline", hint=hint
        )
    try:
        from huggingface_hub import hf_hub_download

        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
        file = hf_hub_download(spec.repo, spec.filename, local_dir=target.parent)  # type: ignore[arg-type]
    except Exception as err:  # any network, auth or offline failure ends the same way for the user
        raise MissingWeightsError(
            f"cannot download {spec.filename} for {name!r} from {spec.repo} ({type(err).__name__})",
            hint=hint,
        ) from err
    if spec.sha256 is not None and _sha256(Path(file)) != spec.sha256:
        Path(file).unlink(missing_ok=True)  # never leave a bad file where the cache would reuse it
        raise BadDataError(
            f"{spec.filename} for {name!r} from {spec.repo} does not match its recorded sha256",
            hint="Try again; if it persists, the published file changed: report it.",
        )
    return Path(file)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    weights: torch.nn.Module | Mapping[str, torch.Tensor], out_dir: str | Path, config: dict[str, Any]
) -> Path:
    """Write a langseg checkpoint: ``out_dir/model.safetensors`` and ``out_dir/config.json``.

    The one writer of the one layout, used by conversion, ``langseg export`` and training. ``weights``
    is a module (its ``state_dict()``) or a state dict. Each file is written under a temporary name and
    renamed into place, weights first, so an interrupted write never leaves a half file, and a folder's
    ``config.json`` never describes weights that are not there yet.
    """
    out = Path(out_dir)
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else dict(weights)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    temporary = [out / f".{WEIGHTS_NAME}.{os.getpid()}.tmp", out / f".{CONFIG_NAME}.{os.getpid()}.tmp"]
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        save_file(_untie(state), str(temporary[0]), metadata={"format": "pt"})
        temporary[1].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # safetensors creates the file owner-only (0600); give it the mode config.json got from the
        # umask, so a model folder shared with others (or packaged) is readable by them.
        temporary[0].chmod(temporary[1].stat().st_mode & 0o777)
        os.replace(temporary[0], out / WEIGHTS_NAME)
        os.replace(temporary[1], out / CONFIG_NAME)
    except OSError as err:
        raise OutputError(f"cannot write a checkpoint to {out}: {err.strerror or err}") from err
    finally:
        for path in temporary:
            with contextlib.suppress(OSError):  # e.g. out_dir could not be created
                path.unlink(missing_ok=True)
    return out


# The temporary names save_checkpoint writes (".model.safetensors.<pid>.tmp"), and only those.
_TEMPORARY = re.compile(rf"^\.(?:{re.escape(WEIGHTS_NAME)}|{re.escape(CONFIG_NAME)})\.(\d+)\.tmp$")


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary files that a killed writer of another process left in ``out`` (never another
    file: only names of :data:`_TEMPORARY`'s pattern)."""
    with contextlib.suppress(OSError):
        for path in out.iterdir():
            match = _TEMPORARY.match(path.name)
            if match and int(match.group(1)) != os.getpid() and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights) and strided ones (e.g. channels-last
    convolution weights); store each as its own contiguous copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone(memory_format=torch.contiguous_format) if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """``(config.json, weights file)`` of a langseg checkpoint folder or of its ``.safetensors`` file."""
    path = as_path(path, "the checkpoint path")
    folder = path.parent if is_file(path) else path
    return folder / CONFIG_NAME, path if is_file(path) else folder / WEIGHTS_NAME


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config) from a langseg checkpoint folder or its ``.safetensors`` file.

    Raises:
        MissingWeightsError: the folder lacks ``config.json`` or the weights file.
        BadDataError: either file is unreadable or malformed, or a tensor holds NaN or infinity.
    """
    config_file, weights = checkpoint_files(path)
    for required in (weights, config_file):
        if not is_file(required):
            raise MissingWeightsError(
                f"{required} not found",
                hint=f"A langseg checkpoint is a folder with {WEIGHTS_NAME} and {CONFIG_NAME}.",
            )
    config = read_config(config_file)
    return read_safetensors(weights), config


# --------------------------------------------------------------------------------- open_clip weights


def open_clip_cache(cache_dir: str | Path | None = None) -> Path:
    """Where open_clip keeps hub downloads: ``cache_dir``, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else huggingface_hub's default (``~/.cache/huggingface/hub``). Read at call time, not import time."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def open_clip_pretrained_cfg(arch: str, tag: str) -> dict[str, Any]:
    """open_clip's pretrained config of ``arch``/``tag``; :class:`UnknownModelError` listing the tags."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise UnknownModelError(
            f"open_clip has no pretrained tag {tag!r} for {arch}", hint=open_clip_tags_hint(arch)
        )
    return cfg


def open_clip_tags_hint(arch: str) -> str:
    import open_clip

    tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
    return f"open_clip's tags for {arch}: {tags}. Or pass weights=PATH (a local open_clip checkpoint)."


def _open_clip_files(arch: str, tag: str) -> tuple[str, list[str]]:
    """(Hugging Face repo, candidate file names in preference order) of open_clip's ``arch``/``tag``."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(open_clip_pretrained_cfg(arch, tag).get("hf_hub", ""))
    filename = filename or HF_WEIGHTS_NAME  # "org/name/" names open_clip's default file
    # open_clip prefers a .safetensors twin of the file when the repo has one; so does the cache lookup.
    safe = (
        HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else filename.rsplit(".", 1)[0] + ".safetensors"
    )
    return repo, [safe, filename]


def _open_clip_cached(arch: str, tag: str, cache_dir: str | Path | None = None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, names = _open_clip_files(arch, tag)
    if not repo:
        return None
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=str(open_clip_cache(cache_dir)))
        if isinstance(found, str):
            return found
    return None


def open_clip_checkpoint(arch: str, tag: str, cache_dir: str | Path | None = None) -> str:
    """Local file of open_clip's ``arch``/``tag`` weights: from the cache, else downloaded by open_clip.

    Raises:
        MissingWeightsError: not cached and offline (``HF_HUB_OFFLINE``), unreachable, or failed download.
    """
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    found = _open_clip_cached(arch, tag, cache_dir)
    if found is not None:
        return found
    cache = open_clip_cache(cache_dir)
    repo, names = _open_clip_files(arch, tag)
    if repo:
        wanted = f"{names[1]} (or its .safetensors) from the Hugging Face repo {repo}"
        fetch = partial(download_pretrained_from_hf, repo, filename=names[1], cache_dir=str(cache))
    else:
        wanted = f"the open_clip weights {arch}/{tag}"
        fetch = partial(download_pretrained, open_clip_pretrained_cfg(arch, tag), cache_dir=str(cache))
    hint = (
        f"The cache is {cache} (set HF_HUB_CACHE or pass cache_dir= to move it); run once with a network to "
        "fill it, or pass a local open_clip checkpoint (.bin, .pt or .safetensors): "
        "langseg.load(name, weights=PATH) or `langseg segment ... --weights PATH`."
    )
    if hub_offline():
        raise MissingWeightsError(f"{wanted} is not in the cache and HF_HUB_OFFLINE is set", hint=hint)
    if not hub_reachable():
        raise MissingWeightsError(f"{wanted} is not in the cache and the hub cannot be reached", hint=hint)
    try:
        return str(fetch())
    except Exception as err:  # any network, auth or hub failure ends the same way for the user
        raise MissingWeightsError(f"cannot download {wanted} ({type(err).__name__})", hint=hint) from err
