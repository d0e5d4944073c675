"""Where the ``langseg`` commands write, checked before any work, and how: atomically.

- :func:`plan_outputs`: the files ``langseg segment`` / ``refer`` write per image (:data:`OUTPUTS`).
- :func:`check_output_file` / :func:`check_output_folder` refuse, before any work, an output that
  cannot or must not be written: a path that is too long, a folder where a file goes or a file where a
  folder goes (or above it), an input, an existing output without ``overwrite``, and with it a folder
  holding files langseg did not write there.
- :func:`write_atomic` / :func:`write_file_atomic` / :func:`write_folder_atomic` write to a temporary
  name (:data:`TEMP_PREFIX`) next to the final one and rename it into place, so a failing or killed
  command leaves no partial output and a reader never sees a mix of old and new.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from langseg.atomic import TEMP_PREFIX as TEMP_PREFIX  # re-exported: langseg.batch.TEMP_PREFIX
from langseg.atomic import temp_path, write_folder
from langseg.errors import BadConfigError, LangsegError, OutputError

# What ``langseg segment`` / ``refer`` write per image STEM, and which of them each --format writes.
OUTPUTS = {"overlay": ".overlay.png", "mask": ".mask.png", "json": ".json"}
FORMATS = {"png": ("overlay", "mask"), "json": ("json",), "both": ("overlay", "mask", "json")}


def path_kind(path: Path) -> str:
    """``"missing"``, ``"file"``, ``"dir"`` or ``"other"`` (a device, a pipe...) for ``path``.

    Raises:
        OutputError: the path cannot even be looked at (too long, a symlink loop, no permission).
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except (OSError, ValueError) as err:  # ValueError: an embedded NUL byte
        reason = getattr(err, "strerror", None) or err
        hint = "Pass a shorter, valid path."
        raise OutputError(f"cannot use the path {str(path)!r}: {reason}", hint=hint) from err
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def check_output_dir(out_dir: Path) -> None:
    """Raise :class:`OutputError` unless ``out_dir`` is (or can be created as) a writable folder; creates
    nothing."""
    existing = out_dir
    while path_kind(existing) == "missing" and existing != existing.parent:
        existing = existing.parent
    if path_kind(existing) != "dir":
        hint = "Pass --out a folder (new or existing)."
        raise OutputError(f"cannot write into {out_dir}: {existing} is a file", hint=hint)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {out_dir}: {existing} is not writable")


def _same(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _inside(path: Path, folder: Path) -> bool:
    return folder.expanduser().resolve() in path.expanduser().resolve().parents


def check_output_file(
    path: Path, overwrite: bool, inputs: Sequence[Path] = (), option: str = "--out"
) -> None:
    """Refuse, before any work, a file output that cannot or must not be written: an existing folder or
    special file at ``path``, a parent that is a file or not writable, one of the ``inputs`` (never
    replaced, even with ``overwrite``) or, without ``overwrite``, a file that exists already."""
    kind = path_kind(path)
    if kind == "dir":
        raise OutputError(
            f"{option} {path} is a folder", hint=f"Pass {option} a file name, e.g. scores.json."
        )
    if kind == "other":
        raise OutputError(f"{option} {path} is not a regular file", hint=f"Pass {option} a new file name.")
    check_output_dir(path.parent)
    for item in inputs:
        if _same(path, item):
            raise OutputError(f"{option} {path} is also an input", hint=f"Pass {option} another file name.")
    if kind == "file" and not overwrite:
        raise OutputError(
            f"{path} exists already", hint=f"Pass --overwrite to replace it, or another {option}."
        )


def plan_outputs(images: Sequence[Path], out_dir: Path, fmt: str, overwrite: bool) -> list[dict[str, Path]]:
    """For each image, output kind -> path in ``out_dir`` (``STEM.overlay.png``, ``STEM.mask.png``,
    ``STEM.json``); raises :class:`OutputError` if two images share a stem, or (without ``overwrite``)
    if any output exists already."""
    if fmt not in FORMATS:
        raise BadConfigError(f"unknown format {fmt!r}", hint=f"Use one of {', '.join(FORMATS)}.")
    check_output_dir(out_dir)
    owners: dict[str, Path] = {}
    plans = []
    for image in images:
        if image.stem in owners:
            raise OutputError(
                f"{owners[image.stem]} and {image} would write the same outputs ({image.stem}.*)",
                hint="Rename one of them, or run them with different --out folders.",
            )
        owners[image.stem] = image
        plans.append({kind: out_dir / f"{image.stem}{OUTPUTS[kind]}" for kind in FORMATS[fmt]})
    inputs = {image.resolve() for image in images}
    for path in (path for plan in plans for path in plan.values()):
        if path_kind(path) not in ("missing", "file"):
            raise OutputError(
                f"the output {path} exists and is not a file", hint="Move it away, or use another --out."
            )
        if path.resolve() in inputs:
            raise OutputError(f"the output {path} is also an input image", hint="Use another --out folder.")
    existing = [path for plan in plans for path in plan.values() if path_kind(path) == "file"]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise OutputError(
            f"{len(existing)} output file(s) exist already: {', '.join(map(str, existing[:3]))}{more}",
            hint="Pass --overwrite to replace them, or choose another --out folder.",
        )
    return plans


def write_atomic(path: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Call ``write(temporary path)``, then move the file to ``path`` in one step; without ``overwrite``
    a file that is at ``path`` by then is kept and this raises :class:`OutputError`."""
    tmp = temp_path(path)
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails if path exists, atomically: never replaces what appeared meanwhile
        except FileExistsError as err:
            raise OutputError(f"{path} exists already", hint="Pass --overwrite to replace it.") from err
        except OSError:  # a file system without hard links
            if path.exists():
                raise OutputError(f"{path} exists already", hint="Pass --overwrite to replace it.") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file_atomic(path: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """:func:`write_atomic` for a command's single output file (e.g. ``langseg eval --out``): creates the
    missing parent folders, and turns a failure to write into an :class:`OutputError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, write, overwrite)
    except LangsegError:
        raise
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err


def check_output_folder(
    out: Path, overwrite: bool, own: Collection[str], inputs: Sequence[Path] = (), option: str = "OUT_DIR"
) -> None:
    """Refuse, before any work, a folder that :func:`write_folder_atomic` must not write or replace.

    A new or empty folder is fine. A non-empty one needs ``overwrite``, and then may hold only names in
    ``own`` (what the command writes there): ``--overwrite`` replaces the whole folder, so it never
    deletes what langseg did not write. Never: a file at ``out`` or above it, a folder holding one of the
    ``inputs``, or (replacing) the current folder.
    """
    kind = path_kind(out)
    if kind not in ("missing", "dir"):
        raise OutputError(f"{option} {out} exists and is not a folder", hint=f"Pass {option} a new folder.")
    check_output_dir(out)
    for item in inputs:
        if _same(out, item) or _inside(item, out):
            raise OutputError(f"{option} {out} holds the input {item}", hint=f"Pass {option} a new folder.")
    if kind == "missing":
        return
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as err:
        raise OutputError(f"cannot list {out}: {err.strerror or err}") from err
    if names and not overwrite:
        raise OutputError(
            f"{out} is not empty", hint="Choose a new or empty folder, or pass --overwrite to replace it."
        )
    # Leftovers of an interrupted write inside the folder (".NAME.PID.tmp") are langseg's own too.
    foreign = [n for n in names if n not in own and not (n.startswith(".") and n.endswith(".tmp"))]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise OutputError(
            f"{out} holds files langseg does not write there: {', '.join(foreign[:3])}{more}",
            hint="--overwrite replaces a folder of langseg's own files only: move the others away, or "
            "choose a new folder.",
        )
    if names and (_same(Path.cwd(), out) or _inside(Path.cwd(), out)):
        raise OutputError(f"{option} {out} is the current folder", hint="Run from another folder.")


def write_folder_atomic(out: Path, write: Callable[[Path], Any], last: str | None = None) -> Path:
    """Call ``write(temporary folder)`` (a sibling of ``out``, see :data:`TEMP_PREFIX`), then put it in
    place: renamed to ``out`` if that is new, its entries moved into ``out`` (``last`` last) if that is an
    empty folder, else swapped with ``out`` (whose old content is then deleted). A failing or interrupted
    write leaves ``out`` as it was and removes the temporary folder (and the parent folders it made).
    Check with :func:`check_output_folder` first."""
    try:
        write_folder(out.expanduser().resolve(), write, last)
    except LangsegError:
        raise
    except OSError as err:
        raise OutputError(f"cannot write {out}: {err.strerror or err}") from err
    return out
