"""Every benchmark is found by name through ``langseg.data.build_dataset(name, kwargs)`` with ``root``
and ``split``, batches through the engine's collate (with DataLoader workers), and pickles (spawn); the
registry lives in langseg.data, which does not import the training code."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from langseg.data import build_dataset, list_datasets, register_dataset
from langseg.data import registry as data_registry
from langseg.errors import BadConfigError, BadDataError
from langseg.train.transforms import collate
from tests.test_data_fewshot import write_coco2014, write_fss, write_hsnet_pascal_lists, write_pascal
from tests.test_data_refcoco import write_refer
from tests.test_data_semantic import write_ade20k, write_coco_stuff, write_context, write_voc

SEMANTIC = {
    "ade20k": (write_ade20k, {"split": "val"}, 150),
    "voc2012": (write_voc, {"split": "val"}, 21),
    "pascal-context-59": (write_context, {"split": "val"}, 59),
    "pascal-context-60": (write_context, {"split": "val"}, 60),
    "coco-stuff-171": (write_coco_stuff, {"split": "val"}, 171),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, root: Path, **kwargs):
    return build_dataset(name, {"root": str(root), **kwargs})


def test_all_benchmarks_registered() -> None:
    names = {"ade20k", "voc2012", "pascal-context-59", "pascal-context-60", "coco-stuff-171"}
    names |= {"pascal-5i", "coco-20i", "fss1000", "refcoco", "refcoco+", "refcocog"}
    assert names <= set(list_datasets())


def test_importing_langseg_data_does_not_import_the_training_code() -> None:
    """The registry and every loader come with ``import langseg.data``; ``langseg.train`` stays out."""
    code = (
        "import sys, langseg.data, langseg.data.registry as r; "
        "assert set(r.BENCHMARKS) <= set(langseg.data.list_datasets()); "
        "loaded = sorted(m for m in sys.modules if m.startswith('langseg.train')); "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(SEMANTIC))
def test_semantic_through_build_dataset_and_collate(tmp_path: Path, name: str) -> None:
    write, kwargs, num_classes = SEMANTIC[name]
    write(tmp_path)
    data = build(name, tmp_path, **kwargs)
    assert len(data.labels) == num_classes
    batch = next(iter(DataLoader(data, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape[:2] == (2, 3) and batch["image"].dtype == torch.uint8
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (2, *batch["image"].shape[2:])
    assert len(batch["labels"]) == 2 and batch["labels"][0] == data.labels
    labelled = batch["mask"][batch["mask"] != 255]
    assert labelled.numel() > 0 and int(labelled.min()) >= 0 and int(labelled.max()) < num_classes
    assert len(pickle.loads(pickle.dumps(data))) == len(data)


def test_fewshot_and_referring_through_build_dataset(tmp_path: Path) -> None:
    write_pascal(tmp_path / "voc")
    write_hsnet_pascal_lists(tmp_path / "voc" / "splits")
    write_coco2014(tmp_path / "coco")
    write_fss(tmp_path / "fss", ["ab_wheel", "bus"])
    (tmp_path / "fss" / "splits" / "fss").mkdir(parents=True)
    (tmp_path / "fss" / "splits" / "fss" / "test.txt").write_text("bus\n")
    write_refer(tmp_path / "refer")
    write_refer(tmp_path / "refer", "refcoco+")
    write_refer(tmp_path / "refer", "refcocog", "umd")
    with pytest.warns(UserWarning, match="deriving"):
        coco = build("coco-20i", tmp_path / "coco", split="val", fold=0, min_pixels=20)
    datasets = {
        "pascal-5i": build("pascal-5i", tmp_path / "voc", split="val", fold=0),
        "coco-20i": coco,
        "fss1000": build("fss1000", tmp_path / "fss", split="test"),
        "refcoco": build("refcoco", tmp_path / "refer", split="testA"),
        "refcoco+": build("refcoco+", tmp_path / "refer", split="testB"),
        "refcocog": build("refcocog", tmp_path / "refer", split="val"),
    }
    # The few-shot names default to LSeg's zero-shot protocol: HSNet's 1000 test episodes (PASCAL-5i
    # cycling through its 2 pairs, COCO-20i drawing from its 2), every FSS-1000 image, all at 480 x 480.
    sizes = {"pascal-5i": 1000, "coco-20i": 1000, "fss1000": 4, "refcoco": 3, "refcoco+": 1, "refcocog": 3}
    for name, data in datasets.items():
        assert len(data) == sizes[name], name
        batch = next(iter(DataLoader(data, batch_size=1, collate_fn=collate)))
        if name.startswith("ref"):
            assert batch["mask"].dtype == torch.bool and isinstance(batch["text"][0], str)
        else:
            assert batch["mask"].dtype == torch.int64 and batch["labels"][0][0] == "others"
            assert batch["image"].shape[-2:] == batch["mask"].shape[-2:] == (480, 480)
        assert batch["meta"][0]["dataset"] == name
        pickle.loads(pickle.dumps(data))


def test_two_workers_return_every_sample_once(tmp_path: Path) -> None:
    write_ade20k(tmp_path, num=5)
    data = build("ade20k", tmp_path, split="val")
    loader = DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate)
    stems = [m["stem"] for batch in loader for m in batch["meta"]]
    assert stems == [f"ADE_val_{i:08d}" for i in range(1, 6)]


def test_config_errors_name_the_keyword_and_root(tmp_path: Path) -> None:
    with pytest.raises(BadConfigError, match="unknown keyword 'fold' for dataset 'ade20k'"):
        build("ade20k", tmp_path, fold=1)
    with pytest.raises(BadDataError, match="does not exist"):
        build("voc2012", tmp_path / "missing", split="val")


def test_registry_errors_and_registration() -> None:
    with pytest.raises(BadConfigError, match="unknown dataset 'nope'") as unknown:
        build_dataset("nope")
    assert "shapeworld-semantic" in unknown.value.hint and "pascal-5i" in unknown.value.hint
    with pytest.raises(BadConfigError, match="unknown ShapeWorld setting 'colour'"):
        build_dataset("shapeworld-semantic", {"colour": "red"})
    with pytest.raises(
        BadConfigError, match=r"bad data\.kwargs / --data-arg for dataset 'shapeworld-folder':"
    ):
        build_dataset("shapeworld-folder", {"root": None})  # Path(None): a TypeError inside the builder

    def tiny(size: int = 3) -> list[int]:
        return list(range(size))

    register_dataset("test-tiny", tiny)  # type: ignore[arg-type]
    try:
        assert "test-tiny" in list_datasets() and build_dataset("test-tiny", {"size": 2}) == [0, 1]
        with pytest.raises(BadConfigError, match="unknown keyword 'length'") as bad:
            build_dataset("test-tiny", {"length": 2})
        assert "size" in bad.value.hint
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("test-tiny", lambda: [])  # type: ignore[arg-type,return-value]
        register_dataset("test-tiny", lambda: [7], overwrite=True)  # type: ignore[arg-type,return-value]
        assert build_dataset("test-tiny") == [7]
    finally:
        data_registry._DATASETS.pop("test-tiny")
