"""Registers the benchmark datasets with :mod:`langseg.train.tasks` so configs and ``langseg eval --data
NAME --root DIR`` can build them by name: ``build_dataset(DataConfig(name, kwargs={"root", "split"}))``.

Imported at the bottom of :mod:`langseg.train.tasks` (after ``register_dataset`` exists), so that
importing either module first works and :mod:`langseg.data` itself never imports the training code.
"""

from __future__ import annotations

import os
from typing import Literal

from torch.utils.data import Dataset

from langseg.data.fewshot_datasets import FSS1000, COCO20i, PASCAL5i
from langseg.data.refcoco import RefCOCO
from langseg.data.semantic_datasets import ADE20K, VOC2012, COCOStuff, PascalContext
from langseg.train.tasks import register_dataset

__all__ = ["BENCHMARKS"]

Root = str | os.PathLike


def _context59(root: Root, split: str = "val") -> Dataset:
    return PascalContext(root, split, num_classes=59)


def _context60(root: Root, split: str = "val") -> Dataset:
    return PascalContext(root, split, num_classes=60)


def _refcoco(
    root: Root, split: str = "val", image_root: Root | None = None, text_field: str = "sent"
) -> Dataset:
    return RefCOCO(root, split, "refcoco", "unc", image_root, text_field)  # type: ignore[arg-type]


def _refcoco_plus(
    root: Root, split: str = "val", image_root: Root | None = None, text_field: str = "sent"
) -> Dataset:
    return RefCOCO(root, split, "refcoco+", "unc", image_root, text_field)  # type: ignore[arg-type]


def _refcocog(
    root: Root,
    split: str = "val",
    split_by: Literal["umd", "google"] = "umd",
    image_root: Root | None = None,
    text_field: str = "sent",
) -> Dataset:
    return RefCOCO(root, split, "refcocog", split_by, image_root, text_field)  # type: ignore[arg-type]


# name -> builder; the classes are registered directly, so data.kwargs are their keyword arguments.
BENCHMARKS = {
    "ade20k": ADE20K,
    "voc2012": VOC2012,
    "pascal-context-59": _context59,
    "pascal-context-60": _context60,
    "coco-stuff-171": COCOStuff,
    "pascal-5i": PASCAL5i,
    "coco-20i": COCO20i,
    "fss1000": FSS1000,
    "refcoco": _refcoco,
    "refcoco+": _refcoco_plus,
    "refcocog": _refcocog,
}

for _name, _builder in BENCHMARKS.items():
    register_dataset(_name, _builder)
