"""The ``langseg`` command line: each command is a thin call into the public API.

Errors a user can cause (:class:`langseg.errors.LangsegError`) are printed as one message and a hint,
without a traceback, and exit with status 2, the same status click uses for usage errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

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

console = Console()
err_console = Console(stderr=True)


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


@app.command()
def models(
    task: str | None = typer.Option(None, help="Only models for this task: semantic or referring."),
) -> None:
    """List the registered models."""
    import langseg.models  # noqa: F401  (registers the models)
    from langseg.registry import model_entries

    entries = [e for e in model_entries() if task is None or e.task == task]
    if not entries:
        console.print("No models registered" + (f" for task {task!r}." if task else "."))
        return
    table = Table("name", "task", "family", "weights", "description")
    for e in entries:
        weights = "-" if e.weights is None else (e.weights.repo or "bundled")
        table.add_row(e.name, e.task, e.family, weights, e.description)
    console.print(table)


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Option(..., "--out", help="Folder to write the world into (new or empty)."),
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty folder."),
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


if __name__ == "__main__":
    main()
