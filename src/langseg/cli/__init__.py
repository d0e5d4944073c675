"""The ``langseg`` command line: each command is a thin call into the public API.

Errors a user can cause (:class:`langseg.errors.LangsegError`) are printed as one message and a hint,
without a traceback, and exit with status 2, the same status click uses for usage errors.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from langseg.errors import LangsegError

app = typer.Typer(
    name="langseg",
    help="Segment images with language: open-vocabulary (LSeg, dense CLIP) and referring (VLT).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Make and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
convert_app = typer.Typer(help="Convert official checkpoints to langseg folders.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")

console = Console()
err_console = Console(stderr=True)


def path_arg(value: str | Path) -> Path:
    """A path from the command line (the ``parser`` of every path option): an empty one, or one this
    machine cannot even look at (too long, a symlink loop), is a usage error (exit status 2) before
    any work; typer reports the ``ValueError`` with the option's name."""
    text = str(value)
    if not text.strip():
        raise ValueError("an empty path: pass a file or folder name")
    try:
        os.stat(text)
    except (FileNotFoundError, NotADirectoryError):
        pass  # new outputs, and inputs the command reports as missing itself
    except (OSError, ValueError) as err:  # ValueError: a NUL byte
        shown = text if len(text) <= 60 else f"{text[:60]}..."
        raise ValueError(f"cannot use the path {shown!r}: {getattr(err, 'strerror', None) or err}") from err
    return Path(text)


@app.command()
def version() -> None:
    """Print the versions of langseg and of the libraries it runs on."""
    import open_clip
    import timm
    import torch

    from langseg import __version__

    console.print(f"langseg {__version__}")
    cuda = torch.version.cuda if torch.cuda.is_available() else "not available"
    console.print(
        f"torch {torch.__version__} (CUDA {cuda}), open_clip {open_clip.__version__}, timm {timm.__version__}"
    )


def weights_source(spec: Any) -> str:
    """Where a registry entry's weights come from, in words (for ``langseg models``)."""
    if spec is None:
        return "none (random init)"
    return {
        "bundled": "bundled with langseg",
        "open_clip": "open_clip download",
        "hub": "download",
        "convert": "convert official ckpt",
    }.get(spec.kind, str(spec.kind))


@app.command()
def models(
    task: str | None = typer.Option(None, help="Only models for this task: semantic or referring."),
) -> None:
    """List the registered models, where their weights come from and whether they are here now."""
    import langseg.zoo  # noqa: F401  (registers the models)
    from langseg.hub import weights_available
    from langseg.registry import model_entries

    if task is not None and task not in ("semantic", "referring"):
        from langseg.errors import BadConfigError

        raise BadConfigError(f"unknown task {task!r}", hint="Use --task semantic or --task referring.")
    entries = [e for e in model_entries() if task is None or e.task == task]
    if not entries:
        console.print("No models registered" + (f" for task {task!r}." if task else "."))
        return
    # Narrow terminals get the four columns that matter; the descriptions need ~120 columns.
    wide = console.width >= 120
    table = Table("name", "task", "weights", "here", *(("family", "description") if wide else ()))
    for e in entries:
        source = weights_source(e.weights)
        if wide and e.weights is not None and e.weights.kind == "open_clip":
            source = f"{source} ({e.weights.arch}/{e.weights.tag})"
        here = "yes" if weights_available(e.weights, e.name) else "no"
        table.add_row(e.name, e.task, source, here, *((e.family, e.description) if wide else ()))
    console.print(table)
    if not wide:
        console.print("(a wider terminal also shows each model's family and description)", style="dim")


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Option(
        ..., "--out", parser=path_arg, help="Folder to write the world into (new, or empty)."
    ),
    num: int = typer.Option(100, "--num", min=0, help="Number of scenes."),
    seed: int = typer.Option(0, "--seed", help="World seed: the same seed gives the same bytes."),
    size: int = typer.Option(256, "--size", min=32, help="Image side in pixels."),
    min_objects: int = typer.Option(2, "--min-objects", min=1, help="Fewest objects per scene."),
    max_objects: int = typer.Option(6, "--max-objects", min=1, help="Most objects per scene."),
    background: str = typer.Option("plain", "--background", help="plain, noise or texture."),
    overlap: bool = typer.Option(False, "--overlap/--no-overlap", help="Let objects occlude each other."),
    granularity: str = typer.Option(
        "colour_shape", "--granularity", help="Semantic classes: shape, colour or colour_shape."
    ),
    per_object: int = typer.Option(3, "--per-object", min=1, help="Referring expressions per object."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the world in --out (a folder of a world only), all at once."
    ),
) -> None:
    """Render a ShapeWorld to disk: PNG images and masks, JSON objects and referring expressions."""
    from langseg.data.shapes import ShapeWorldConfig
    from langseg.data.shapes_datasets import write_shapeworld

    config = ShapeWorldConfig(
        size=size,
        min_objects=min_objects,
        max_objects=max_objects,
        background=background,  # type: ignore[arg-type]
        allow_overlap=overlap,
    )
    columns = (TextColumn("rendering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("scenes", total=num)
        write_shapeworld(
            out,
            num,
            seed=seed,
            config=config,
            granularity=granularity,  # type: ignore[arg-type]
            per_object=per_object,
            overwrite=overwrite,
            on_scene=lambda _: progress.advance(task),
        )
    console.print(f"wrote {num} scenes (seed {seed}) to {out}")


@convert_app.command("lseg-official")
def convert_lseg(
    ckpt: Path = typer.Argument(
        ..., parser=path_arg, help="Official LSeg Lightning checkpoint, e.g. demo_e200.ckpt."
    ),
    out_dir: Path = typer.Argument(
        ..., parser=path_arg, help="Folder to write model.safetensors and config.json into (new or empty)."
    ),
    variant: str | None = typer.Option(
        None,
        "--variant",
        help="lseg-vitl16-384, lseg-vitb32-384, lseg-rn50x16-vitl16-384, lseg-zs-rn101 or lseg-zs-vitl16 "
        "(default: read from the checkpoint).",
    ),
    arch_option: int | None = typer.Option(
        None, "--arch-option", help="Official spatial regularisation: 0 none, 1 bottleneck, 2 depthwise."
    ),
    block_depth: int | None = typer.Option(None, "--block-depth", help="Official block_depth."),
    activation: str | None = typer.Option(None, "--activation", help="Official activation: lrelu or tanh."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the converted model in OUT_DIR (a model folder only)."
    ),
) -> None:
    """Convert an official LSeg checkpoint (isl-org/lang-seg) into a folder langseg.load() reads."""
    from langseg.batch import check_output_folder, path_kind, write_folder_atomic
    from langseg.convert.lseg_official import convert_lseg_official
    from langseg.errors import OutputError
    from langseg.hub import CONFIG_NAME, WEIGHTS_NAME

    if path_kind(out_dir / CONFIG_NAME) == "file" and not overwrite:
        raise OutputError(
            f"{out_dir} already holds a converted model", hint="Choose another folder, or pass --overwrite."
        )
    check_output_folder(out_dir, overwrite, (WEIGHTS_NAME, CONFIG_NAME), inputs=[ckpt])

    def convert(folder: Path) -> None:
        options = {"arch_option": arch_option, "block_depth": block_depth, "activation": activation}
        convert_lseg_official(ckpt, folder, variant, **options)

    write_folder_atomic(out_dir, convert, last=CONFIG_NAME)
    console.print(f"converted {ckpt} to {out_dir}; load it with langseg.load({str(out_dir)!r})")


class OutputFormat(str, Enum):
    """What ``segment`` and ``refer`` write per image."""

    png = "png"
    json = "json"
    both = "both"


class DType(str, Enum):
    """The dtype a model's weights run in."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


IMAGES_HELP = "Image files, folders (their images, not recursive) or quoted globs such as 'scenes/*.png'."
OUT_HELP = "Folder for the outputs: STEM.overlay.png, STEM.mask.png (palette PNG) and STEM.json per image."
FORMAT_HELP = "png: overlay and mask; json: the JSON sidecar (areas, scores, COCO RLE masks); both."
BATCH_HELP = "Images per network call (same-sized inputs; plans with sliding windows run one by one)."
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps."


def read_labels(value: str) -> list[str]:
    """Labels from ``--labels``: comma-separated, or ``@FILE`` (commas or lines; blank lines skipped)."""
    if not value.startswith("@"):
        return [part.strip() for part in value.split(",")]
    from langseg.errors import BadLabelsError

    path = Path(value[1:])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BadLabelsError(
            f"cannot read labels from {path}: {getattr(err, 'strerror', None) or err}",
            hint="Pass @FILE with a UTF-8 text file of labels, or the labels themselves, comma-separated.",
        ) from err
    return [part.strip() for line in text.splitlines() if line.strip() for part in line.split(",")]


@app.command()
def segment(
    images: list[Path] = typer.Argument(..., parser=path_arg, help=IMAGES_HELP, show_default=False),
    labels: str = typer.Option(
        ...,
        "--labels",
        help='Comma-separated labels, e.g. "cat, sofa, other"; join synonyms with ";". @FILE reads them from '
        "a text file (one or more per line).",
    ),
    model: str = typer.Option(
        "naclip-vit-b16", "--model", help="Semantic model: name, folder, mode:ARCH/TAG."
    ),
    weights: Path | None = typer.Option(
        None, "--weights", parser=path_arg, help="Local checkpoint to use instead."
    ),
    out: Path = typer.Option("langseg_out", "--out", parser=path_arg, help=OUT_HELP),
    fmt: OutputFormat = typer.Option(OutputFormat.both, "--format", help=FORMAT_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace output files that exist already."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: DType | None = typer.Option(
        None, "--dtype", help="Weights dtype [default: float32; an exported ONNX folder runs as exported]."
    ),
    background_threshold: float | None = typer.Option(
        None, "--background-threshold", help="Pixels less sure than this go to 'background'/'other'."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help=BATCH_HELP),
) -> None:
    """Segment images into free-text labels: an overlay with a legend, a palette mask and a JSON each."""
    prompts = read_labels(labels)
    family_options = {} if dtype is None else {"dtype": dtype.value}
    options = {"model": model, "weights": weights, "device": device, "options": family_options}
    _run_images(
        "semantic", images, prompts, out, fmt.value, overwrite, background_threshold, batch_size, **options
    )


@app.command()
def refer(
    images: list[Path] = typer.Argument(..., parser=path_arg, help=IMAGES_HELP, show_default=False),
    texts: list[str] = typer.Option(
        ..., "--text", help='An expression, e.g. "the large circle on the left"; repeat for more.'
    ),
    model: str = typer.Option("vlt-shapes", "--model", help="Referring model name or folder."),
    weights: Path | None = typer.Option(
        None, "--weights", parser=path_arg, help="Local checkpoint to use instead."
    ),
    out: Path = typer.Option("langseg_out", "--out", parser=path_arg, help=OUT_HELP),
    fmt: OutputFormat = typer.Option(OutputFormat.both, "--format", help=FORMAT_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace output files that exist already."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: DType | None = typer.Option(
        None, "--dtype", help="Weights dtype [default: float32; an exported ONNX folder runs as exported]."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help=BATCH_HELP),
) -> None:
    """Segment the objects expressions describe: each expression's mask in its own colour per image."""
    family_options = {} if dtype is None else {"dtype": dtype.value}
    options = {"model": model, "weights": weights, "device": device, "options": family_options}
    _run_images("referring", images, list(texts), out, fmt.value, overwrite, None, batch_size, **options)


def _run_images(
    task: str,
    images: list[Path],
    prompts: list[str],
    out: Path,
    fmt: str,
    overwrite: bool,
    background_threshold: float | None,
    batch_size: int,
    **model: Any,
) -> None:
    """Check everything, load the model (with a status line), run the batch, print the summary; exit
    status 1 if any image failed."""
    from langseg.batch import check_job, load_predictor, run_batch

    job = check_job(
        task, images, prompts, out_dir=out, fmt=fmt, overwrite=overwrite,
        background_threshold=background_threshold, **model,
    )  # fmt: skip
    with err_console.status(f"loading {job.model} on {job.device}", spinner="dots"):
        predictor = load_predictor(job)
    summary = run_batch(predictor, job, console=err_console, batch_size=batch_size)
    if len(summary.written) == 1:
        table = Table("expression" if task == "referring" else "label", "area", "score")
        for name, share, score in summary.areas[summary.written[0]]:
            table.add_row(name, f"{100 * share:.1f}%", "-" if score is None else f"{score:.2f}")
        console.print(table)
    rate = f"{summary.images_per_second:.1f} images/s" if summary.written else "no images"
    console.print(
        f"wrote {len(summary.written)} of {summary.total} images to {out} ({len(summary.files)} files, "
        f"{summary.seconds:.1f} s, {rate})",
        highlight=False,
    )
    if summary.failed:
        table = Table("image", "why it failed", title=f"{len(summary.failed)} image(s) failed")
        for image, reason in summary.failed:
            table.add_row(str(image), reason)
        err_console.print(table)
        raise typer.Exit(1)


def print_error(err: LangsegError) -> None:
    """Message and hint, no traceback."""
    err_console.print(f"[bold red]error:[/] {err.message}", highlight=False)
    err_console.print(f"[yellow]hint:[/] {err.hint}", highlight=False)


def main() -> None:
    """Entry point of the ``langseg`` script."""
    try:
        app()
    except LangsegError as err:
        print_error(err)
        sys.exit(2)


@app.command()
def train(
    config: Path = typer.Argument(
        ..., parser=path_arg, help="YAML training recipe, e.g. configs/toy_shapes.yaml."
    ),
    overrides: list[str] | None = typer.Argument(
        None, help="dotted key=value overrides, e.g. optim.lr=0.001 data.batch_size=4.", show_default=False
    ),
    resume: str | None = typer.Option(
        None, "--resume", help="Checkpoint file, run folder, or 'auto' (newest in out_dir, else fresh)."
    ),
) -> None:
    """Train a model from a YAML recipe; run under torchrun for several processes or GPUs."""
    import os

    from langseg.train import fit, load_config

    result = fit(load_config(config, overrides or []), resume=resume)
    if os.environ.get("RANK", "0") == "0":
        scores = result.metrics or {}
        summary = "".join(f", {k} {v:.4f}" for k, v in scores.items() if "/" not in k)
        console.print(f"trained to step {result.state.step}/{result.total_steps}{summary}")
        if result.checkpoint is not None:
            console.print(f"checkpoint: {result.checkpoint}")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Registered name, or a langseg checkpoint folder."),
    data: str = typer.Option(
        ..., "--data", help="Dataset name, e.g. shapeworld-semantic, ade20k, pascal-5i, refcoco."
    ),
    root: Path | None = typer.Option(
        None, "--root", parser=path_arg, help="Dataset root folder (real benchmarks)."
    ),
    split: str | None = typer.Option(None, "--split", help="Dataset split, e.g. val, testA."),
    fold: int | None = typer.Option(
        None,
        "--fold",
        min=0,
        help="Few-shot fold (pascal-5i: 0-3, coco-20i: 0-3); same as --data-arg fold=K.",
    ),
    data_args: list[str] | None = typer.Option(
        None, "--data-arg", help="Extra dataset setting KEY=VALUE (YAML value), repeatable."
    ),
    weights: Path | None = typer.Option(
        None, "--weights", parser=path_arg, help="Local weights for a registered name."
    ),
    plan: str | None = typer.Option(None, "--plan", help="Test-time plan: single or paper (LSeg)."),
    upsample: str | None = typer.Option(
        None, "--upsample", help="VLT: resize logits (default) or probability (official) to the image."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate the first N samples only."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
    out: Path | None = typer.Option(
        None,
        "--out",
        parser=path_arg,
        help="Also write the scores as JSON here (a NaN or infinite score is written as null).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --out file if it exists."),
) -> None:
    """Score a model on a dataset (mIoU/pixAcc, few-shot mIoU/FB-IoU, oIoU/mIoU/Pr@k); torchrun shards it."""
    import os

    import langseg
    from langseg.api import check_load
    from langseg.batch import check_output_file, write_file_atomic
    from langseg.data import build_dataset
    from langseg.errors import BadConfigError, OutputError
    from langseg.evaluate import evaluate, scores_json
    from langseg.yamlio import load_yaml, short_repr

    # Everything about the model, the device and the output is checked before the dataset is built.
    given = {"plan": plan, "upsample": upsample}
    options = {key: value for key, value in given.items() if value is not None}
    check_load(model, weights, device, **options)
    if out is not None:
        check_output_file(out, overwrite, _eval_inputs(model, weights))
        if root is not None and root.resolve() in out.resolve().parents:
            hint = "Write the scores outside the dataset, e.g. --out scores.json."
            raise OutputError(f"--out {out} is inside the dataset root {root}", hint=hint)
    kwargs: dict = {}
    for item in data_args or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadConfigError(f"--data-arg expects KEY=VALUE, got {short_repr(item)}")
        kwargs[key.strip()] = load_yaml(value, f"--data-arg {short_repr(item, 60)}")
    if root is not None:
        kwargs["root"] = str(root)
    if split is not None:
        kwargs["split"] = split
    if fold is not None:
        kwargs["fold"] = fold
    dataset = build_dataset(data, kwargs)
    predictor = langseg.load(model, weights=weights, device=device, **options)
    scores = evaluate(predictor, dataset, limit=limit)
    if os.environ.get("RANK", "0") != "0":
        return
    table = Table("metric", "value", title=f"{model} on {data}")
    for key, value in scores.items():
        if "/" not in key:
            table.add_row(key, f"{value:g}" if key == "classes" else f"{value:.4f}")  # a count
    console.print(table)
    if out is not None:
        text = scores_json(scores)
        write_file_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


def _eval_inputs(model: str, weights: Path | None) -> list[Path]:
    """The files ``langseg eval`` reads, which its ``--out`` must never replace: the weights, and the
    model's own checkpoint files when ``model`` is a path."""
    from langseg.hub import CONFIG_NAME, WEIGHTS_NAME

    inputs = [weights] if weights is not None else []
    path = Path(model)
    try:
        if model.strip() and path.exists():
            folder = path if path.is_dir() else path.parent
            inputs += [path, folder / CONFIG_NAME, folder / WEIGHTS_NAME]
    except OSError:  # not a usable path: a registered name, checked by check_load
        pass
    return inputs


# The web commands live in their own module; importing it registers them on ``app``.
from langseg.cli import export as _export  # noqa: E402, F401
from langseg.cli import web as _web  # noqa: E402, F401

if __name__ == "__main__":
    main()
