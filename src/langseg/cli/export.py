"""``langseg export``: a model as ONNX graphs (``--format onnx``), or a training checkpoint as a model
folder (``RECIPE OUT_DIR``, no ``--format``).

Both check every argument (format, output folder, opset, model name, recipe) before anything loads.
"""

from __future__ import annotations

from pathlib import Path

import typer

from langseg.cli import app, console, path_arg
from langseg.errors import BadConfigError

FORMATS = ("onnx",)
# What an ONNX export writes in its folder (--overwrite replaces a folder of these only).
ONNX_FILES = ("manifest.json", "image.onnx", "text.onnx", "classify.onnx", "model.onnx")
USAGE = (
    "langseg export MODEL --format onnx --out DIR, or langseg export RECIPE OUT_DIR for a trained checkpoint"
)


@app.command("export")
def export(
    source: Path = typer.Argument(
        ...,
        parser=path_arg,
        help="With --format onnx: MODEL, a registry name or model folder. Else: the YAML recipe a "
        "checkpoint was trained with.",
        metavar="MODEL|RECIPE",
    ),
    out_dir: Path | None = typer.Argument(
        None,
        parser=path_arg,
        help="(recipe) Folder to write the model into, new or empty.",
        show_default=False,
    ),
    fmt: str | None = typer.Option(
        None,
        "--format",
        help="onnx: MODEL as ONNX graphs in --out (leave out for a recipe).",
        show_default=False,
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        parser=path_arg,
        help="(onnx) Folder to write the graphs into, new or empty.",
        show_default=False,
    ),
    weights: Path | None = typer.Option(
        None, "--weights", parser=path_arg, help="(onnx) Weights file or folder instead of MODEL's own."
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", min=1, help="(onnx) Image side the graphs are checked at (default: native)."
    ),
    opset: int = typer.Option(18, "--opset", help="(onnx) ONNX opset, 18 to 23."),
    checkpoint: str = typer.Option(
        "auto", "--checkpoint", help="(recipe) Checkpoint file, run folder or auto."
    ),
    overrides: list[str] | None = typer.Option(
        None, "--set", help="(recipe) Config override KEY=VALUE, repeatable."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the output folder (langseg's files only)."
    ),
) -> None:
    """Export a model to ONNX (--format onnx --out DIR), or a trained checkpoint as a model folder."""
    if fmt is None and out is None:
        _export_checkpoint(source, out_dir, checkpoint, overrides, overwrite)
        return
    fmt = "onnx" if fmt is None else fmt
    if fmt.strip().lower() not in FORMATS:
        raise BadConfigError(
            f"unknown export format {fmt!r:.40}",
            hint="Only --format onnx is supported for now (no --format: export a training checkpoint).",
        )
    if out is None:
        raise BadConfigError("--format onnx needs --out DIR", hint=f"Usage: {USAGE}.")
    if out_dir is not None:
        raise BadConfigError(
            f"an ONNX export writes to --out; the second argument {str(out_dir)!r:.60} is not used",
            hint=f"Usage: {USAGE}.",
        )
    if checkpoint != "auto" or overrides:
        raise BadConfigError(
            "--checkpoint and --set export a training checkpoint, not --format onnx", hint=USAGE
        )
    _export_onnx(str(source), out, weights, image_size, opset, overwrite)


def _export_onnx(
    model: str, out: Path, weights: Path | None, image_size: int | None, opset: int, overwrite: bool
) -> None:
    import langseg
    from langseg.api import check_load
    from langseg.batch import check_output_folder
    from langseg.errors import BadConfigError
    from langseg.export import is_exported_folder
    from langseg.export.exporter import check_export_arguments, export_onnx
    from langseg.export.runtime import require_exporter

    require_exporter()
    check_export_arguments(out, opset, image_size, overwrite)
    inputs = [Path(model)] + ([weights] if weights is not None else [])
    check_output_folder(out, overwrite, ONNX_FILES, inputs=inputs, option="--out")
    if is_exported_folder(model):
        raise BadConfigError(
            f"{model} is already an exported ONNX model",
            hint="Export the model it came from (its manifest.json names it).",
        )
    check_load(model, weights, "cpu")  # the name, the weights path: before anything loads
    predictor = langseg.load(model, weights=weights, device="cpu")
    console.print(f"exporting {model} to {out} (each graph is checked against PyTorch)...", highlight=False)
    manifest = export_onnx(
        predictor, out, model_name=model, opset=opset, image_size=image_size, overwrite=overwrite
    )
    for graph in manifest["graphs"].values():
        how = graph["exporter"] + (
            f" (fallback: {graph['fallback_reason']})" if graph["fallback_reason"] else ""
        )
        console.print(
            f"  {graph['file']}: {how}, max difference {graph['max_abs_diff']:.1e}",
            highlight=False,
            markup=False,
        )
    console.print(f"exported to {out}; load it with langseg.load({str(out)!r})", highlight=False)


def _export_checkpoint(
    config: Path, out_dir: Path | None, checkpoint: str, overrides: list[str] | None, overwrite: bool
) -> None:
    """A training checkpoint as a model folder for `langseg.load`, `segment` and `eval`."""
    from langseg.batch import check_output_folder, write_folder_atomic
    from langseg.hub import CONFIG_NAME, WEIGHTS_NAME
    from langseg.train import load_config
    from langseg.train.export import export_checkpoint

    if out_dir is None:
        raise BadConfigError("missing OUT_DIR, the folder to write the model into", hint=f"Usage: {USAGE}.")
    if not checkpoint.strip():
        raise BadConfigError("--checkpoint is empty", hint="Pass a checkpoint file, a run folder or auto.")
    recipe = load_config(config, overrides or [])
    # The checkpoint (or the run folder "auto" searches) is an input: OUT_DIR must not hold it.
    source = Path(recipe.out_dir) if checkpoint.strip() == "auto" else Path(checkpoint)
    check_output_folder(out_dir, overwrite, (WEIGHTS_NAME, CONFIG_NAME), inputs=[config, source])
    write_folder_atomic(out_dir, lambda tmp: export_checkpoint(recipe, checkpoint, tmp), last=CONFIG_NAME)
    console.print(f"exported to {out_dir}; load it with langseg.load({str(out_dir)!r})")
