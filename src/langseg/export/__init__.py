"""ONNX export and the onnxruntime predictor (docs/export.md).

``export_onnx(predictor, out, model_name=...)`` writes a predictor's network as ONNX graphs with a
manifest; ``load_exported(out)`` (what :func:`langseg.load` does for such a folder) gives back a
Segmenter or Referrer whose network runs on onnxruntime, with the same ``segment()`` / ``refer()``.
The exporter needs the extra ``export`` (onnx, onnxscript, onnxruntime); the predictor onnxruntime.
"""

from __future__ import annotations

from langseg.export.manifest import MANIFEST_NAME, is_exported_folder, read_manifest

__all__ = [
    "MANIFEST_NAME",
    "check_exported",
    "export_onnx",
    "is_exported_folder",
    "load_exported",
    "read_manifest",
]


def __getattr__(name: str) -> object:
    # The exporter and the runtime import torch, the models and the predictors: only when used, so that
    # langseg.load can ask `is_exported_folder` cheaply.
    if name == "export_onnx":
        from langseg.export.exporter import export_onnx

        return export_onnx
    if name == "load_exported":
        from langseg.export.runtime import load_exported

        return load_exported
    if name == "check_exported":
        from langseg.export.runtime import check_exported

        return check_exported
    raise AttributeError(f"module 'langseg.export' has no attribute {name!r}")
