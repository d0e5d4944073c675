"""Temporary names and the renames that put a finished output in place, for files and folders alike.

Every temporary output is named :data:`TEMP_PREFIX` + its final name + a process/thread tag, in the folder
of its final name: one rename puts it in place (the same file system), and a leftover of a killed run is
recognisable as langseg's own. Used by the batch writers and by ``langseg data shapes``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["TEMP_PREFIX", "put_folder_in_place", "temp_path", "write_folder"]

TEMP_PREFIX = ".langseg-tmp-"


def temp_path(path: Path, tag: str = "") -> Path:
    """The temporary sibling of ``path`` this process and thread write before renaming it to ``path``."""
    # The final name is cut short so that the temporary one fits the file system's name limit (255).
    return path.with_name(f"{TEMP_PREFIX}{path.name[:160]}.{os.getpid()}-{threading.get_ident()}{tag}")


def put_folder_in_place(tmp: Path, target: Path, last: str | None = None) -> None:
    """Put the finished folder ``tmp`` at ``target``: renamed if ``target`` is new; its entries moved in
    (``last`` last, e.g. the file whose presence marks the folder complete) if ``target`` is an empty
    folder, which keeps a folder the user made and its permissions; else swapped with ``target``, whose
    old content is then deleted. A failure of the swap's second rename puts the old folder back.

    Raises:
        OSError: a rename failed (the caller turns it into its own error).
    """
    if not target.exists():
        os.rename(tmp, target)
    elif not any(target.iterdir()):
        for child in sorted(tmp.iterdir(), key=lambda p: p.name == last):
            os.rename(child, target / child.name)
    else:
        old = temp_path(target, ".old")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)


def write_folder(target: Path, write: Callable[[Path], None], last: str | None = None) -> None:
    """Call ``write(temporary folder)`` (a sibling of the resolved ``target``), then
    :func:`put_folder_in_place`. A failing or interrupted write leaves ``target`` as it was and removes
    the temporary folder and the parent folders this call made.

    Raises:
        whatever ``write`` raises, or OSError from the file system (callers turn it into their error).
    """
    tmp = temp_path(target)
    created: list[Path] = []
    done = False
    try:
        created = [folder for folder in target.parents if not folder.exists()]  # deepest first
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        put_folder_in_place(tmp, target, last)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful write
        for folder in created if not done else ():  # the parent folders made here, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
