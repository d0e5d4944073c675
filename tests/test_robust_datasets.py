"""Robustness of the dataset loaders and ShapeWorld's searches (issue 13).

Corrupted annotation files in tiny dataset folders (the real formats, written by the existing fixture
writers) must end in one :class:`BadDataError` naming the file, or a correct dataset; impossible ShapeWorld
settings must raise a :class:`BadConfigError` naming the setting, never hang (``pytest.mark.timeout``).
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langseg.data import build_dataset, render_scene, write_shapeworld
from langseg.data.fewshot_datasets import FSS1000, COCO20i, PASCAL5i
from langseg.data.refcoco import RefCOCO, decode_segmentation
from langseg.data.shapes import ShapeWorldConfig
from langseg.data.shapes_datasets import ShapeWorldFolder
from langseg.errors import BadConfigError, BadDataError
from tests.robust import ROBUST, expect_clean
from tests.test_data_fewshot import (
    compressed_rle,
    write_coco2014,
    write_fss,
    write_hsnet_pascal_lists,
    write_pascal,
)
from tests.test_data_refcoco import write_refer
from tests.test_data_semantic import write_voc

pytestmark = pytest.mark.usefixtures("one_thread")


def read_all(make: Any) -> Any:
    """Build a dataset and read every sample (lazy loaders fail at ``__getitem__``)."""
    dataset = make()
    return [dataset[i] for i in range(len(dataset))]


# --------------------------------------------------------------------------------- ShapeWorld hangs


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"gap": 5}, "gap"),  # the example: hung for ever
        ({"gap": 0.5, "min_objects": 12, "max_objects": 12}, "gap"),  # refused by the geometric check
        ({"gap": -0.1}, "gap"),
        ({"size": 100_000}, "size"),
        ({"size": 64.5}, "size"),
        ({"num_scenes": 10**12}, "num_scenes"),
        ({"num_scenes": -1}, "num_scenes"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"colour_jitter": -5}, "colour_jitter"),
        ({"min_visible": float("nan")}, "min_visible"),
        ({"exclude_pairs": [1, 2]}, "exclude_pairs"),
        ({"render_sizes": [100_000]}, "render_sizes"),
        ({"max_objects": 100}, "max_objects"),
    ],
)
@pytest.mark.parametrize("name", ["shapeworld-semantic", "shapeworld-referring"])
def test_impossible_or_absurd_shapeworld_settings_are_named(name: str, kwargs: dict, setting: str) -> None:
    err = expect_clean(
        "dataset", read_all, lambda: build_dataset(name, {"num_scenes": 2, "size": 32, **kwargs})
    )
    assert isinstance(err, BadConfigError), f"{kwargs} accepted"
    assert setting in err.message, err.message


@pytest.mark.timeout(60)
def test_placement_search_is_bounded() -> None:
    # Passes the geometric check (two small objects in opposite corners would fit) but random placement
    # essentially never finds it: the attempt bound ends the search with the settings named.
    start = time.perf_counter()
    config = ShapeWorldConfig(size=64, gap=0.99, min_objects=2, max_objects=2)
    err = expect_clean("dataset", render_scene, 0, 0, config)
    assert isinstance(err, BadConfigError) and "gap 0.99" in err.message and "attempts" in err.message
    assert time.perf_counter() - start < 50


@pytest.mark.timeout(60)
def test_visibility_search_is_bounded() -> None:
    config = ShapeWorldConfig(size=32, allow_overlap=True, min_visible=1.0, min_objects=16, max_objects=16)
    err = expect_clean("dataset", render_scene, 0, 0, config)
    assert isinstance(err, BadConfigError) and "min_visible" in err.message


def test_feasible_worlds_still_render() -> None:
    scene = render_scene(0, 3, ShapeWorldConfig(size=64, gap=0.2, min_objects=6, max_objects=6))
    assert len(scene.objects) == 6
    assert render_scene(0, 0).image.tobytes() == render_scene(0, 0).image.tobytes()


@pytest.mark.timeout(300)
@settings(parent=ROBUST, max_examples=25)
@given(
    gap=st.floats(-0.5, 1.5),
    min_objects=st.integers(0, 18),
    extra=st.integers(0, 3),
    size=st.integers(16, 80),
    allow_overlap=st.booleans(),
    min_visible=st.floats(0.0, 1.2),
)
def test_generated_shapeworld_settings(gap, min_objects, extra, size, allow_overlap, min_visible) -> None:
    kwargs = {
        "gap": gap,
        "min_objects": min_objects,
        "max_objects": min(min_objects + extra, 8),
        "size": size,
    }
    kwargs.update(allow_overlap=allow_overlap, min_visible=min_visible, num_scenes=1)
    result = expect_clean("dataset", read_all, lambda: build_dataset("shapeworld-semantic", kwargs))
    if not isinstance(result, BadConfigError):
        assert result[0]["mask"].shape == (size, size)


# --------------------------------------------------------------------------------- corrupted files

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**66), 2**66)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def locations(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (path to a container, key or index) in a JSON tree."""
    found: list[tuple] = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for key, value in items:
        found.append((*prefix, key))
        found += locations(value, (*prefix, key))
    return found


def mutate(data: Any, draw: Any) -> Any:
    """``data`` with one drawn location deleted or replaced by a drawn JSON value (or the whole replaced)."""
    spots = locations(data)
    if not spots or draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    spot = draw(st.sampled_from(spots))
    node = data
    for key in spot[:-1]:
        node = node[key]
    if draw(st.booleans()):
        del node[spot[-1]]
    else:
        node[spot[-1]] = draw(JSON_VALUES)
    return data


def fresh(tmp_path: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=tmp_path))


def corrupt_bytes(path: Path, draw: Any) -> None:
    """Truncate ``path``, or overwrite it with random bytes, non-UTF-8 text or the wrong JSON shape."""
    kind = draw(st.sampled_from(["truncate", "random", "latin-1", "list"]))
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: draw(st.integers(0, max(len(data) - 1, 0)))])
    elif kind == "random":
        path.write_bytes(draw(st.binary(max_size=64)))
    elif kind == "latin-1":
        path.write_bytes(data[:20] + "\u00e9t\u00e9".encode("latin-1") + data[20:])
    else:
        path.write_text("[1, 2, 3]")


@pytest.mark.timeout(300)
@settings(parent=ROBUST, max_examples=30)
@given(draw=st.data())
def test_generated_refcoco_instances(tmp_path: Path, draw: st.DataObject) -> None:
    root = fresh(tmp_path)
    write_refer(root)
    path = root / "refcoco" / "instances.json"
    if draw.draw(st.booleans()):
        path.write_text(json.dumps(mutate(json.loads(path.read_text()), draw.draw)))
    else:
        corrupt_bytes(path, draw.draw)
    result = expect_clean("dataset", read_all, lambda: RefCOCO(root, "testA"))
    if isinstance(result, BadDataError):
        assert (
            "instances.json" in result.message or "annotation" in result.message or "image" in result.message
        )
    shutil.rmtree(root)


@pytest.mark.timeout(300)
@settings(parent=ROBUST, max_examples=25)
@given(draw=st.data())
def test_generated_refcoco_refs(tmp_path: Path, draw: st.DataObject) -> None:
    root = fresh(tmp_path)
    write_refer(root)
    path = root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps(mutate(refs, draw.draw), protocol=2))
    expect_clean("dataset", read_all, lambda: RefCOCO(root, "testA"))
    shutil.rmtree(root)


@pytest.mark.timeout(300)
@settings(parent=ROBUST, max_examples=30)
@given(draw=st.data())
def test_generated_coco20i_instances(tmp_path: Path, draw: st.DataObject) -> None:
    root = fresh(tmp_path)
    write_coco2014(root)
    path = root / "annotations" / "instances_val2014.json"
    if draw.draw(st.integers(0, 3)):
        path.write_text(json.dumps(mutate(json.loads(path.read_text()), draw.draw)))
    else:
        corrupt_bytes(path, draw.draw)
    with warnings.catch_warnings():  # "deriving pairs" (no split lists): expected here
        warnings.simplefilter("ignore", UserWarning)
        result = expect_clean("dataset", read_all, lambda: COCO20i(root, "val", fold=0, min_pixels=1))
    if isinstance(result, BadDataError):
        assert "instances_val2014.json" in result.message or "COCO" in result.message, result.message
    shutil.rmtree(root)


@pytest.mark.timeout(300)
@settings(parent=ROBUST, max_examples=20)
@given(draw=st.data(), which=st.sampled_from(["pascal-list", "voc-list", "fss-list", "coco-pickle"]))
def test_generated_split_lists(tmp_path: Path, draw: st.DataObject, which: str) -> None:
    root = fresh(tmp_path)
    if which == "pascal-list":
        write_pascal(root)
        write_hsnet_pascal_lists(root / "splits")
        corrupt_bytes(root / "splits" / "pascal" / "val" / "fold0.txt", draw.draw)
        make = lambda: PASCAL5i(root, "val", fold=0)  # noqa: E731
    elif which == "voc-list":
        write_voc(root)
        corrupt_bytes(root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt", draw.draw)
        make = lambda: build_dataset("voc2012", {"root": str(root), "split": "val"})  # noqa: E731
    elif which == "fss-list":
        write_fss(root / "fewshot_data", ["bus", "zebra"], images=1)
        (root / "splits" / "fss").mkdir(parents=True)
        (root / "splits" / "fss" / "test.txt").write_text("bus\nzebra\n")
        corrupt_bytes(root / "splits" / "fss" / "test.txt", draw.draw)
        make = lambda: FSS1000(root, "test")  # noqa: E731
    else:
        write_coco2014(root)
        lists = root / "splits" / "coco" / "val"
        lists.mkdir(parents=True)
        data = {0: ["val2014/COCO_val2014_000000000001.jpg"]}
        (lists / "fold0.pkl").write_bytes(pickle.dumps(mutate(data, draw.draw)))
        make = lambda: COCO20i(root, "val", fold=0)  # noqa: E731
    expect_clean("dataset", read_all, make)
    shutil.rmtree(root)


@pytest.mark.timeout(300)
@settings(parent=ROBUST, max_examples=25)
@given(draw=st.data(), task=st.sampled_from(["semantic", "referring"]))
def test_generated_shapeworld_folders(tmp_path: Path, draw: st.DataObject, task: str) -> None:
    root = fresh(tmp_path)
    write_shapeworld(root / "w", 2, config=ShapeWorldConfig(size=32, max_objects=3))
    target = draw.draw(st.sampled_from(["world.json", "annotations/000001.json"]))
    path = root / "w" / target
    if draw.draw(st.integers(0, 3)):
        path.write_text(json.dumps(mutate(json.loads(path.read_text()), draw.draw)))
    else:
        corrupt_bytes(path, draw.draw)
    result = expect_clean("dataset", read_all, lambda: ShapeWorldFolder(root / "w", task))
    if isinstance(result, BadDataError):
        assert str(root / "w") in result.message, result.message
    shutil.rmtree(root)


SEGMENTATIONS = st.one_of(
    st.lists(st.lists(st.floats() | st.integers(-(10**12), 10**12), max_size=10), max_size=3),
    st.fixed_dictionaries(
        {
            "size": st.sampled_from([[6, 5], [5, 6], [6], "6x5"]),
            "counts": st.lists(st.integers(-40, 40), max_size=6),
        }
    ),
    st.fixed_dictionaries(
        {
            "size": st.just([6, 5]),
            "counts": st.text(
                alphabet="0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnoz~!", max_size=8
            ),
        }
    ),
    JSON_VALUES,
)


@pytest.mark.timeout(120)
@settings(parent=ROBUST, max_examples=40)
@given(segmentation=SEGMENTATIONS)
def test_generated_segmentations_never_hang(segmentation: Any) -> None:
    result = expect_clean("dataset", decode_segmentation, segmentation, 6, 5, "ann 7 of x.json")
    if isinstance(result, BadDataError):
        assert "ann 7 of x.json" in result.message
    else:
        assert result.shape == (6, 5) and result.dtype == bool


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "segmentation",
    [
        [[float("inf"), 0, 1, 1, 2, 2]],  # pycocotools loops for ever on this
        [[1e12, 0, 1, 1, 2, 2]],
        {"counts": [-5, 35], "size": [6, 5]},  # ... and on negative run lengths
        {"counts": [3, 30], "size": [6, 5]},  # runs that do not add up to H x W
        {"counts": "!!!!", "size": [6, 5]},
        {"counts": "0", "size": [7, 5]},  # size of another image
        {"counts": [30]},
        [[1, 2, 3]],
        [],
    ],
)
def test_bad_segmentations_are_named(segmentation: Any) -> None:
    err = expect_clean("dataset", decode_segmentation, segmentation, 6, 5, "annotation 12 of instances.json")
    assert isinstance(err, BadDataError) and "annotation 12 of instances.json" in err.message


def test_good_compressed_rle_still_decodes() -> None:
    mask = np.zeros((6, 5), bool)
    mask[1:4, 2:] = True
    assert np.array_equal(decode_segmentation(compressed_rle(mask), 6, 5), mask)


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (lambda inst: inst["annotations"][0].update(category_id=777), "unknown category_id 777"),
        (lambda inst: inst["annotations"][0].pop("image_id"), "lacks 'image_id'"),
        (lambda inst: inst["images"][0].update(height="24"), "'height' must be int"),
        (lambda inst: inst.update(images={"a": 1}), "'images' must be list"),
    ],
)
def test_coco_annotation_errors_name_file_and_entry(tmp_path: Path, mutation: Any, expected: str) -> None:
    write_coco2014(tmp_path)
    path = tmp_path / "annotations" / "instances_val2014.json"
    instances = json.loads(path.read_text())
    mutation(instances)
    path.write_text(json.dumps(instances))
    err = expect_clean("dataset", COCO20i, tmp_path, "val", fold=0)
    assert isinstance(err, BadDataError) and str(path) in err.message and expected in err.message, err


def test_missing_image_file_is_named(tmp_path: Path) -> None:
    write_refer(tmp_path)
    image = tmp_path / "images" / "mscoco" / "images" / "train2014" / "COCO_train2014_000000000001.jpg"
    image.unlink()
    err = expect_clean("dataset", read_all, lambda: RefCOCO(tmp_path, "testA"))
    assert isinstance(err, BadDataError) and image.name in err.message
