"""The ONNX predictor: an exported folder back as a :class:`~langseg.predict.Segmenter` or
:class:`~langseg.predict.Referrer` whose network runs on onnxruntime.

The predictors are langseg's own, so images, labels, expressions, caches, test-time plans, PAMR,
thresholds and results behave exactly as with PyTorch; only the network is replaced, by a small module
with the same methods whose work is done by onnxruntime sessions. Tokenisation stays in Python
(:mod:`langseg.predict.tokenizers`, open_clip's BPE); token ids go through the ``text`` graph.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from langseg.errors import BadConfigError, BadDataError, LangsegError
from langseg.export.manifest import REEXPORT_HINT, read_manifest
from langseg.export.onnx_io import session
from langseg.models.pamr import PAMR
from langseg.predict.base import check_device
from langseg.predict.referrer import Letterbox, Referrer
from langseg.predict.segmenter import Preprocess, Segmenter
from langseg.predict.tokenizers import tokenizer_from_config
from langseg.predict.tta import InferencePlan

EXPORT_EXTRA_HINT = 'Install the ONNX extra: pip install "langseg[export]" (onnx, onnxruntime, onnxscript).'


def require_onnxruntime() -> None:
    """Raise :class:`BadConfigError` naming the ``export`` extra unless onnxruntime is installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise BadConfigError(
            "running an exported model needs onnxruntime, which is not installed", hint=EXPORT_EXTRA_HINT
        )


def require_exporter() -> None:
    """Raise :class:`BadConfigError` naming the ``export`` extra unless onnx, onnxscript and onnxruntime
    (which checks every exported graph) are installed."""
    missing = [
        name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise BadConfigError(
            f"ONNX export needs {', '.join(missing)}, which is not installed", hint=EXPORT_EXTRA_HINT
        )


def _run(runner: Any, outputs: list[str], **inputs: torch.Tensor) -> torch.Tensor:
    """One onnxruntime call: CPU numpy in, a torch tensor out (on the first input's device)."""
    device = next(iter(inputs.values())).device
    feed = {name: np.ascontiguousarray(value.detach().cpu().numpy()) for name, value in inputs.items()}
    (result,) = runner.run(outputs, feed)
    return torch.from_numpy(result).to(device)


class OnnxSegmentationNetwork(nn.Module):
    """A Segmenter's network on onnxruntime: ``encode_image``, ``encode_text`` and ``dense_logits`` run
    the folder's ``image``, ``text`` and ``classify`` graphs (shapes as in :mod:`langseg.export.graphs`).

    Attributes:
        manifest: the folder's manifest.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        super().__init__()
        graphs = manifest["graphs"]
        self.manifest = manifest
        self.image_session = session(folder / graphs["image"]["file"], threads)
        self.text_session = session(folder / graphs["text"]["file"], threads)
        self.classify_session = session(folder / graphs["classify"]["file"], threads)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` normalised images -> ``B x D x h x w`` features."""
        return _run(self.image_session, ["features"], images=images.float())

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``K x L`` token ids -> ``K x D`` label embeddings."""
        return _run(self.text_session, ["text_embeddings"], token_ids=token_ids.long())

    def dense_logits(self, features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """``B x D x h x w`` features and ``K x D`` label embeddings -> ``B x K x h' x w'`` logits."""
        return _run(
            self.classify_session,
            ["logits"],
            features=features.float(),
            text_embeddings=text_embeddings.float(),
        )


class OnnxReferringNetwork(nn.Module):
    """A Referrer's network on onnxruntime: ``encode_image`` keeps the letterboxed image (the one
    ``model`` graph encodes it with the expressions) and ``decode`` runs that graph.

    Attributes:
        input_size: the square input side ``S``; ``max_tokens``: the graph's token axis ``T``.
    """

    images_per_call = 1  # the graph takes one image (its batch axis is the expressions')

    def __init__(self, folder: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        super().__init__()
        graph = manifest["graphs"]["model"]
        self.manifest = manifest
        self.model_session = session(folder / graph["file"], threads)
        self.input_size = int(manifest["predictor"]["input_size"])
        self.max_tokens = int(self.model_session.get_inputs()[1].shape[1])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``1 x 3 x S x S`` -> the same tensor (the Referrer caches it as the image's features)."""
        return images.float()

    def decode(self, images: torch.Tensor, token_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """``1 x 3 x S x S`` image, ``B x L`` ids and bool mask -> ``B x 1 x S/s x S/s`` logits.

        Tokens are padded to the graph's ``T`` (the tokenizer never gives more); padding is masked, so it
        changes nothing."""
        pad = self.max_tokens - token_ids.shape[1]
        if pad < 0:
            raise BadConfigError(f"{token_ids.shape[1]} tokens exceed the exported graph's {self.max_tokens}")
        return _run(
            self.model_session,
            ["logits"],
            images=images,
            token_ids=F.pad(token_ids.long(), (0, pad)),
            token_mask=F.pad(token_mask.bool(), (0, pad)),
        )


def _cpu(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cpu")
    resolved = check_device(device)
    if resolved.type != "cpu":
        raise BadConfigError(
            f"an exported model runs on onnxruntime's CPU provider, not on {resolved}",
            hint="Load it with device='cpu' (or 'auto').",
        )
    return resolved


def _checked(values: Any, kinds: dict[str, tuple[type, ...]], what: str) -> dict[str, Any]:
    """``values`` (a manifest object) with each key of ``kinds`` of one of its types (lists become tuples);
    a wrong type is a ValueError (reported as a damaged manifest), not a failure at the first image."""
    if not isinstance(values, dict) or set(values) - set(kinds):
        raise ValueError(f"{what} must be an object with keys among {sorted(kinds)}")
    out = {}
    for key, value in values.items():
        value = tuple(value) if isinstance(value, list) else value
        items = value if isinstance(value, tuple) else (value,)
        if (isinstance(value, bool) != (bool in kinds[key]) and value is not None) or not all(
            isinstance(item, kinds[key]) for item in items
        ):
            raise ValueError(f"{what}.{key} is {value!r:.60}")
        out[key] = value
    return out


NUMBER, OPTIONAL_INT = (int, float), (int, type(None))
PLAN_FIELDS = {
    "crop": OPTIONAL_INT,
    "stride": OPTIONAL_INT,
    "scales": NUMBER,
    "base_size": OPTIONAL_INT,
    "flip": (bool,),
    "batch_size": (int,),
}
PREPROCESS_FIELDS = {
    "short_side": OPTIONAL_INT,
    "max_side": (int,),
    "pad_multiple": (int,),
    "mean": NUMBER,
    "std": NUMBER,
}


def _segmenter(folder: Path, manifest: dict[str, Any], device: torch.device) -> Segmenter:
    import open_clip

    settings = manifest["predictor"]
    tokenizer_config = settings["tokenizer"]
    if tokenizer_config.get("kind") != "open_clip_bpe":
        raise BadDataError(f"unknown tokenizer {tokenizer_config!r:.80} in {folder}", hint=REEXPORT_HINT)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(tokenizer_config["context_length"]))
    plan = _checked(settings["plan"], PLAN_FIELDS, "plan")
    preprocess = _checked(settings["preprocess"], PREPROCESS_FIELDS, "preprocess")
    refine = settings.get("refine")
    return Segmenter(
        OnnxSegmentationNetwork(folder, manifest),
        tokenizer,
        templates=settings["templates"],
        plan=InferencePlan(**plan),
        preprocess=Preprocess(**preprocess),
        device=device,
        max_labels=int(settings["max_labels"]),
        text_batch_size=int(settings["text_batch_size"]),
        refine=None if refine is None else PAMR(refine["iterations"], refine["dilations"]),
    )


def _referrer(folder: Path, manifest: dict[str, Any], device: torch.device) -> Referrer:
    settings = manifest["predictor"]
    box = {k: tuple(v) if isinstance(v, list) else v for k, v in settings["letterbox"].items()}
    return Referrer(
        OnnxReferringNetwork(folder, manifest),
        tokenizer_from_config(settings["tokenizer"]),
        letterbox=Letterbox(**box),
        device=device,
        threshold=settings["threshold"],
        upsample=settings["upsample"],
    )


def check_exported(
    folder: str | Path, weights: Any = None, device: str | torch.device = "cpu", **options: Any
) -> tuple[dict[str, Any], torch.device]:
    """Everything :func:`load_exported` checks before it opens a graph: onnxruntime importable, no
    ``weights`` or options, a CPU device, a readable manifest. Returns ``(manifest, device)``.

    Raises:
        BadConfigError: onnxruntime missing, ``weights`` or options given (the folder fixes them), or a
            device other than the CPU.
        BadDataError / MissingWeightsError: a damaged manifest, or a graph file missing.
    """
    require_onnxruntime()
    folder = Path(folder)
    if weights is not None:
        raise BadConfigError(
            f"{folder} is an exported ONNX model; it takes no weights", hint="Load it without weights=."
        )
    if options:
        raise BadConfigError(
            f"an exported ONNX model takes no options (got {', '.join(sorted(options))})",
            hint="Its settings were recorded when it was exported; export again to change them.",
        )
    resolved = _cpu(device)
    return read_manifest(folder), resolved


def load_exported(
    folder: str | Path, weights: Any = None, device: str | torch.device = "cpu", **options: Any
) -> Segmenter | Referrer:
    """The predictor of an exported folder (what :func:`langseg.load` returns for one).

    Raises: as :func:`check_exported`.
    """
    folder = Path(folder)
    manifest, resolved = check_exported(folder, weights, device, **options)
    try:
        if manifest["task"] == "semantic":
            return _segmenter(folder, manifest, resolved)
        return _referrer(folder, manifest, resolved)
    except BadDataError:
        raise
    except (LangsegError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise BadDataError(
            f"{folder}/manifest.json does not describe a usable predictor: {err}", hint=REEXPORT_HINT
        ) from err
