"""Weights: an explicit path, else the local cache, else a hub download; safetensors + config.json.

langseg checkpoints are a folder (or a ``.safetensors`` file with a ``config.json`` beside it) holding
``model.safetensors`` and ``config.json`` (``{"model": registry name, "kwargs": {...}, ...}``). Foreign
checkpoints are read with ``torch.load(..., weights_only=True)`` so that no pickled code ever runs.

Without a network, a missing file is a :class:`MissingWeightsError` saying which file, where the cache
is, and how to pass a local checkpoint, raised at once (hub calls run with ``HF_HUB_OFFLINE`` honoured
and short timeouts), never a hang.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from langseg.errors import BadDataError, MissingWeightsError, OutputError
from langseg.registry import WeightsSpec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BUNDLED_DIR = Path(__file__).parent / "weights"


def cache_dir() -> Path:
    """Where downloaded weights live: ``$LANGSEG_CACHE``, else ``$XDG_CACHE_HOME/langseg``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache``.
    """
    if "LANGSEG_CACHE" in os.environ:
        return Path(os.environ["LANGSEG_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "langseg"


def resolve_weights(spec: WeightsSpec | None, name: str, path: str | Path | None = None) -> Path:
    """The local file for ``name``'s weights: ``path`` if given, else the cache, else a download."""
    if path is not None:
        local = Path(path)
        if not local.exists():
            raise MissingWeightsError(f"checkpoint not found: {local}", hint="Check the path you passed.")
        return local
    if spec is None:
        raise MissingWeightsError(
            f"model {name!r} has no published weights",
            hint="Train it (`langseg train`) or pass a checkpoint path; create_model(..., pretrained=False) "
            "gives random weights.",
        )
    if spec.repo is None:
        return bundled_weights(spec, name)
    cached = cache_dir() / name / spec.filename
    if cached.is_file():
        return cached
    return _download(spec, name, cached)


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


def save_checkpoint(module: torch.nn.Module, out_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write ``module``'s weights as ``out_dir/model.safetensors`` and ``config`` as ``config.json``."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(_untie(state), str(out / WEIGHTS_NAME))
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        # safetensors creates the file owner-only (0600); give it the mode config.json got from the
        # umask, so a model folder shared with others (or packaged) is readable by them.
        (out / WEIGHTS_NAME).chmod((out / CONFIG_NAME).stat().st_mode & 0o777)
    except OSError as err:
        raise OutputError(f"cannot write a checkpoint to {out}: {err.strerror or err}") from err
    return out


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights); store each as its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config) from a langseg checkpoint folder or its ``.safetensors`` file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / WEIGHTS_NAME
    config_file = folder / CONFIG_NAME
    for required in (weights, config_file):
        if not required.is_file():
            raise MissingWeightsError(
                f"{required} not found",
                hint=f"A langseg checkpoint is a folder with {WEIGHTS_NAME} and {CONFIG_NAME}.",
            )
    try:
        config = json.loads(config_file.read_text())
        state = load_file(str(weights))
    except (json.JSONDecodeError, OSError, RuntimeError, ValueError, SafetensorError) as err:
        raise BadDataError(f"cannot read the checkpoint at {folder}: {err}") from err
    return state, config


def torch_load_safely(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (no pickled code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise MissingWeightsError(f"checkpoint not found: {path}") from err
    except Exception as err:  # pickle.UnpicklingError and friends: the file wants to run code or is corrupt
        raise BadDataError(
            f"{path} cannot be loaded safely ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
            hint="Only tensors and plain containers are read (weights_only=True); re-save the checkpoint's "
            "state_dict, or convert it with `langseg convert`.",
        ) from err
