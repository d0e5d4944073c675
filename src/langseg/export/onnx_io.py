"""One graph to one ``.onnx`` file: torch's current exporter (``torch.export`` + ``dynamo=True``) first,
the legacy TorchScript-based one (``dynamo=False``) as a fallback, each result compared with PyTorch.

The current exporter is tried first because it captures the network's own Python (sizes stay symbols,
branches on them are checked); the legacy tracer records one run and can silently bake a size or a
branch into the graph. Either way the file is only kept if onnxruntime reproduces PyTorch on the
example *and* on inputs of other dynamic sizes, so a graph that specialised a size fails here, at
export time, and not in a user's predictor.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from langseg.errors import BadConfigError
from langseg.export.graphs import GraphSpec

# Parity a graph must reach at export time, relative to the largest output value (logits can be ~100).
EXPORT_TOLERANCE = 1e-4


class GraphExportError(BadConfigError):
    """Neither exporter produced a graph that reproduces the PyTorch network."""

    default_hint = (
        "Report it with the model name and `langseg version`; the graph's manifest entry records why the "
        "current exporter was not used."
    )


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence the exporters' warnings and progress lines (the outcome is recorded in the manifest)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _dynamic_shapes(spec: GraphSpec) -> dict[str, Any]:
    """``torch.export`` dims for the spec's dynamic axes: one ``Dim`` per symbol name (shared by the
    inputs that name it), times its multiple (image sides are multiples of the patch size)."""
    dims: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    for name in spec.inputs:
        axes = spec.dynamic.get(name)
        if not axes:
            shapes[name] = None
            continue
        shapes[name] = {}
        for axis, (symbol, multiple) in axes.items():
            if symbol not in dims:
                dims[symbol] = torch.export.Dim(symbol, min=1, max=1 << 16)
            shapes[name][axis] = dims[symbol] * multiple if multiple > 1 else dims[symbol]
    return shapes


def _export_dynamo(spec: GraphSpec, path: Path, opset: int) -> None:
    with quiet_export():
        program = torch.export.export(
            spec.module, spec.example, dynamic_shapes=_dynamic_shapes(spec), strict=False
        )
        onnx_program = torch.onnx.export(
            program,
            spec.example,
            dynamo=True,
            opset_version=opset,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            external_data=False,
            verbose=False,
        )
        assert onnx_program is not None
        onnx_program.save(str(path))


def _export_legacy(spec: GraphSpec, path: Path, opset: int) -> None:
    axes: dict[str, dict[int, str]] = {
        name: {axis: symbol for axis, (symbol, _) in given.items()} for name, given in spec.dynamic.items()
    }
    with quiet_export():
        torch.onnx.export(
            spec.module,
            spec.example,
            str(path),
            dynamo=False,
            opset_version=min(opset, 20),  # the legacy exporter stops at opset 20
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes=axes,
        )


def session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session over ``path`` (``threads``: intra-op threads, default torch's count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only: ORT warns about initializers it folds
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_difference(spec: GraphSpec, path: Path) -> float:
    """Largest ``|onnxruntime - PyTorch|`` over the graph's example and check inputs, relative to the
    largest PyTorch output value when that is above 1 (raises if onnxruntime cannot run the graph)."""
    runner = session(path)
    worst = 0.0
    for inputs in (spec.example, spec.check):
        with torch.no_grad():
            expected = spec.module(*inputs)
        feed = {name: tensor.numpy() for name, tensor in zip(spec.inputs, inputs, strict=True)}
        (got,) = runner.run(list(spec.outputs), feed)
        reference = expected.float().numpy()
        if got.shape != reference.shape:
            raise ValueError(f"onnxruntime gave shape {got.shape}, PyTorch {reference.shape}")
        scale = max(1.0, float(np.abs(reference).max()))
        worst = max(worst, float(np.abs(got - reference).max()) / scale)
    return worst


def export_graph(spec: GraphSpec, folder: Path, opset: int, dynamo: bool = True) -> dict[str, Any]:
    """Write ``folder / (spec.name + ".onnx")`` and return its manifest entry: the file, the exporter
    used (``"dynamo"`` or ``"legacy"``), why the current one was not (``fallback_reason``), the inputs
    and outputs with their dynamic axes, and the parity reached (``max_abs_diff``, relative to the
    output's scale above 1). ``dynamo=False`` goes straight to the legacy exporter.

    Raises:
        GraphExportError: neither exporter gave a graph within :data:`EXPORT_TOLERANCE` of PyTorch.
    """
    path = folder / f"{spec.name}.onnx"
    reason: str | None = "the legacy exporter was asked for" if not dynamo else None
    exporter = "legacy"
    if dynamo:
        try:
            _export_dynamo(spec, path, opset)
            difference = max_difference(spec, path)
            if not difference <= EXPORT_TOLERANCE:
                raise ValueError(f"onnxruntime differs from PyTorch by {difference:.2g}")
            exporter = "dynamo"
        except Exception as err:  # every exporter failure falls back, with its reason recorded
            reason = f"{type(err).__name__}: {_first_line(err)}"
            path.unlink(missing_ok=True)
    if exporter == "legacy":
        try:
            _export_legacy(spec, path, opset)
            difference = max_difference(spec, path)
        except Exception as err:
            raise GraphExportError(
                f"the {spec.name} graph could not be exported: current exporter: {reason}; legacy "
                f"exporter: {type(err).__name__}: {_first_line(err)}"
            ) from err
        if not difference <= EXPORT_TOLERANCE:
            raise GraphExportError(
                f"the {spec.name} graph differs from PyTorch by {difference:.2g} (legacy exporter; current "
                f"exporter: {reason})"
            )
    return {
        "file": path.name,
        "exporter": exporter,
        "fallback_reason": reason,
        "inputs": _io_entry(spec, spec.inputs, spec.example),
        "outputs": list(spec.outputs),
        "max_abs_diff": difference,
    }


def _io_entry(spec: GraphSpec, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """``{name: {"shape": [int or symbol, ...], "dtype": ...}}`` (symbols for the dynamic axes)."""
    entry = {}
    for name, tensor in zip(names, tensors, strict=True):
        axes = spec.dynamic.get(name, {})
        shape = [axes[i][0] if i in axes else int(size) for i, size in enumerate(tensor.shape)]
        entry[name] = {"shape": shape, "dtype": str(tensor.dtype).removeprefix("torch.")}
    return entry


def _first_line(err: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."
