"""``export_onnx``: a loaded predictor -> a folder of ONNX graphs and a manifest that rebuilds it.

The predictor (from :func:`langseg.load`) carries everything the folder must record: the network, the
tokeniser, the preprocessing, the test-time plan, the prompt templates, the refinement and the
thresholds. The network's graphs are written by :mod:`langseg.export.onnx_io`; the folder is written
under a temporary name and renamed into place, manifest last (:func:`langseg.atomic.write_folder`).
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from langseg.atomic import write_folder
from langseg.errors import BadConfigError, OutputError
from langseg.export.graphs import family_of, referrer_graph, segmenter_graphs
from langseg.export.manifest import FORMAT, FORMAT_VERSION, write_manifest
from langseg.export.onnx_io import export_graph
from langseg.models.pamr import PAMR
from langseg.predict.referrer import Referrer
from langseg.predict.segmenter import Segmenter

DEFAULT_OPSET = 18
# The current exporter writes opset 18 and later; onnxruntime 1.2x reads up to 23.
OPSETS = range(18, 24)
# Labels that tokenise the text graph's example and check inputs, and probe the recorded tokeniser.
PROBE_LABELS = ("cat", "a red square", "the large circle on the left", "sofa", "other; background")
PROBE_EXPRESSIONS = ("the large red circle", "a blue square on the left", "circle", "the small one", "green")


def check_export_arguments(out: Path, opset: int, image_size: int | None, overwrite: bool) -> None:
    """What :func:`export_onnx` refuses before any work: a bad opset or image size, or an existing,
    non-empty ``out`` without ``overwrite``."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise BadConfigError(
            f"opset {opset!r:.40} is not supported", hint=f"Use an opset from {OPSETS[0]} to {OPSETS[-1]}."
        )
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise BadConfigError(f"image size must be a positive integer, got {image_size!r:.40}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder", hint="Pass --out a new folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out} is not empty", hint="Choose a new or empty folder, or pass --overwrite.")


def _clip_tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """The manifest entry of a Segmenter's open_clip tokenizer, checked to rebuild identical ids."""
    import open_clip

    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        raise BadConfigError(
            f"cannot record the tokenizer {type(tokenizer).__name__} in an ONNX folder",
            hint="ONNX export supports models tokenised with open_clip's CLIP tokenizer (SimpleTokenizer).",
        )
    config = {"kind": "open_clip_bpe", "context_length": int(tokenizer.context_length)}
    rebuilt = open_clip.tokenizer.SimpleTokenizer(context_length=config["context_length"])
    if not torch.equal(rebuilt(list(PROBE_LABELS)), tokenizer(list(PROBE_LABELS))):
        raise BadConfigError("the model's tokenizer differs from open_clip's default CLIP tokenizer")
    return config


def _segmenter_manifest(predictor: Segmenter) -> dict[str, Any]:
    refine = predictor.refine
    if refine is not None and not isinstance(refine, PAMR):
        raise BadConfigError(f"cannot record the refinement {type(refine).__name__} in an ONNX folder")
    return {
        "tokenizer": _clip_tokenizer_config(predictor.tokenizer),
        "templates": list(predictor.templates),
        "plan": dataclasses.asdict(predictor.plan),
        "preprocess": dataclasses.asdict(predictor.preprocess),
        "refine": None
        if refine is None
        else {"kind": "pamr", "iterations": refine.iterations, "dilations": list(refine.dilations)},
        "max_labels": predictor.max_labels,
        "text_batch_size": predictor.text_batch_size,
    }


def _referrer_manifest(predictor: Referrer) -> dict[str, Any]:
    return {
        "tokenizer": predictor.tokenizer.to_config(),
        "input_size": predictor.input_size,
        "letterbox": dataclasses.asdict(predictor.letterbox),
        "threshold": predictor.threshold,
        "upsample": predictor.upsample,
    }


def _float32_copy_check(predictor: Segmenter | Referrer) -> None:
    for tensor in [*predictor.model.parameters(), *predictor.model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise BadConfigError(
                f"the model holds {tensor.dtype} weights; ONNX export writes float32 graphs",
                hint="Load the model with dtype='float32' (the default) to export it.",
            )


def _langseg_version() -> str:
    """The installed langseg's version (read from its metadata: the package root sits above this layer)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("langseg")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def export_onnx(
    predictor: Segmenter | Referrer,
    out: str | Path,
    *,
    model_name: str,
    opset: int = DEFAULT_OPSET,
    image_size: int | None = None,
    overwrite: bool = False,
    dynamo: bool = True,
) -> dict[str, Any]:
    """Export a predictor's network to ONNX graphs in ``out`` with a manifest; returns the manifest.

    Args:
        predictor: a float32 :class:`Segmenter` (LSeg, dense CLIP) or :class:`Referrer` (VLT) on the CPU.
        out: the folder to write (new or empty; an existing one only with ``overwrite``).
        model_name: what the model is called (recorded; ``langseg.load(out)`` reports it).
        opset: ONNX opset (18 to 23).
        image_size: side of the image the image graph is checked at against PyTorch (default: the
            model's native size; a multiple of the patch size). VLT's input size is fixed.
        overwrite: replace an existing folder.
        dynamo: try torch's current exporter first (``False``: the legacy one only).

    Raises:
        BadConfigError: a network, tokenizer or refinement that cannot be exported, or bad arguments.
        OutputError: ``out`` exists without ``overwrite``, or cannot be written.
    """
    check_export_arguments(Path(out), opset, image_size, overwrite)
    if not isinstance(predictor, (Segmenter, Referrer)):
        raise BadConfigError(f"export_onnx takes a Segmenter or a Referrer, got {type(predictor).__name__}")
    family = family_of(predictor.model)
    if predictor.device.type != "cpu":
        raise BadConfigError("export a model loaded on the CPU", hint="Load it with device='cpu'.")
    _float32_copy_check(predictor)
    model = predictor.model.eval()
    if isinstance(predictor, Segmenter):
        settings = _segmenter_manifest(predictor)
        specs = segmenter_graphs(model, predictor.tokenizer(list(PROBE_LABELS)), image_size)
        task = "semantic"
    else:
        if image_size is not None and image_size != predictor.input_size:
            raise BadConfigError(
                f"{model_name} takes {predictor.input_size} x {predictor.input_size} images; --image-size "
                f"{image_size} cannot change that",
                hint="Leave --image-size out: the predictor letterboxes every image to the model's size.",
            )
        settings = _referrer_manifest(predictor)
        ids, mask = predictor.tokenizer.encode_batch(list(PROBE_EXPRESSIONS))
        pad = predictor.tokenizer.max_tokens - ids.shape[1]
        specs = [referrer_graph(model, F.pad(ids, (0, pad)), F.pad(mask, (0, pad)))]
        task = "referring"
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "family": family,
        "task": task,
        "opset": opset,
        "langseg_version": _langseg_version(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "graphs": {},
        "predictor": settings,
    }

    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        with torch.no_grad():
            for spec in specs:
                manifest["graphs"][spec.name] = export_graph(spec, folder, opset, dynamo=dynamo)
        write_manifest(folder, manifest)

    try:
        write_folder(Path(out), write, last="manifest.json")
    except OSError as err:
        raise OutputError(f"cannot write {out}: {err.strerror or err}") from err
    return manifest
