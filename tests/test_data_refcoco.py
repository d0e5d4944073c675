"""RefCOCO / RefCOCO+ / RefCOCOg on a fixture in refer's layout: a real-format refs pickle (Python 2
protocol, plain lists and dicts) and instances.json with polygon, uncompressed and compressed RLE
masks; plus the safety of the pickle reader."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from langseg.data.refcoco import RefCOCO, load_plain_pickle
from langseg.errors import BadConfigError, BadDataError
from tests.test_data_fewshot import annotation, box, compressed_rle, polygon, uncompressed_rle
from tests.test_data_semantic import photo

SIZES = {1: (24, 32), 2: (20, 16)}  # image id -> (H, W)


pytestmark = pytest.mark.usefixtures("one_thread")


def sentence(sent_id: int, text: str) -> dict:
    return {"tokens": text.split(), "raw": text.upper() + " ", "sent_id": sent_id, "sent": text}


def ref(ref_id: int, ann_id: int, image_id: int, split: str, texts: list[str], category: int = 1) -> dict:
    sents = [sentence(ref_id * 10 + i, t) for i, t in enumerate(texts)]
    return {
        "sent_ids": [s["sent_id"] for s in sents],
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",  # refer's per-ref name, not the image
        "ann_id": ann_id,
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "sentences": sents,
        "category_id": category,
    }


def write_refer(
    root: Path, dataset: str = "refcoco", split_by: str = "unc", seed: int = 0, sizes: dict = SIZES
) -> dict[int, np.ndarray]:
    """refer's data folder: ``root/<dataset>/refs(<split_by>).p`` + instances.json and
    ``root/images/mscoco/images/train2014``; returns ann id -> expected mask."""
    rng = np.random.default_rng(seed)
    images = root / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True, exist_ok=True)
    image_entries = []
    for image_id, size in sizes.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(photo(rng, size)).save(images / name, quality=90)
        image_entries.append({"id": image_id, "file_name": name, "height": size[0], "width": size[1]})
    (h1, w1), (h2, w2) = sizes[1], sizes[2]
    masks = {
        101: box(2, 8, 12, 20, (h1, w1)),
        102: box(h1 // 2, h1, 0, w1 // 3, (h1, w1)),
        201: box(3, h2 - 2, 4, w2 - 4, (h2, w2)),
    }
    annotations = [
        annotation(101, 1, 1, polygon(2, 8, 12, 20)),
        annotation(102, 1, 18, uncompressed_rle(masks[102]), iscrowd=1),
        annotation(201, 2, 1, compressed_rle(masks[201])),
        annotation(999, 2, 3, polygon(0, 1, 0, 1)),  # an unreferred object: dropped by the loader
    ]
    instances = {
        "info": {},
        "licenses": [],
        "images": image_entries,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
    }
    splits = ("train", "val", "test") if split_by == "umd" else ("train", "testA", "testB")
    refs = [
        ref(1, 101, 1, splits[1], ["man in red", "left guy"]),
        ref(2, 102, 1, splits[1], ["dog on the left"], category=18),
        ref(3, 201, 2, splits[2], ["person in the middle"]),
        ref(4, 101, 1, "train", ["the man"]),
    ]
    folder = root / dataset
    folder.mkdir(parents=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    # refer's files are Python 2 pickles: protocol 2 keeps the same opcodes and needs no globals.
    (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    return masks


def test_refcoco_one_sample_per_sentence_with_exact_masks(tmp_path: Path) -> None:
    masks = write_refer(tmp_path, split_by="unc")
    data = RefCOCO(tmp_path, "testA", "refcoco")
    assert len(data) == 3
    texts = [data[i]["text"] for i in range(3)]
    assert texts == ["man in red", "left guy", "dog on the left"]
    first = data[0]
    assert first["image"].shape == (3, 24, 32) and first["mask"].dtype == torch.bool
    assert torch.equal(first["mask"], torch.from_numpy(masks[101]))  # polygon
    assert torch.equal(data[2]["mask"], torch.from_numpy(masks[102]))  # uncompressed (crowd) RLE
    meta = data[1]["meta"]
    assert (meta["ref_id"], meta["sent_id"], meta["ann_id"], meta["image_id"]) == (1, 11, 101, 1)
    assert data[2]["meta"]["category"] == "dog" and meta["dataset"] == "refcoco" and meta["split"] == "testA"
    test_b = RefCOCO(
        tmp_path / "refcoco", "testB", "refcoco", image_root=tmp_path / "images/mscoco/images/train2014"
    )
    assert len(test_b) == 1 and torch.equal(test_b[0]["mask"], torch.from_numpy(masks[201]))  # compressed RLE
    assert test_b[0]["image"].shape == (3, 20, 16)
    assert RefCOCO(tmp_path, "testA", text_field="raw")[0]["text"] == "MAN IN RED"
    assert len(RefCOCO(tmp_path, "train")) == 1 and len(RefCOCO(tmp_path, "val")) == 0


def test_refcocog_umd_and_google_and_refcoco_plus(tmp_path: Path) -> None:
    write_refer(tmp_path, "refcocog", "umd")
    assert [s["text"] for s in RefCOCO(tmp_path, "test", "refcocog")] == ["person in the middle"]
    with pytest.raises(BadDataError, match=r"refs\(google\).p"):
        RefCOCO(tmp_path, "val", "refcocog", split_by="google")
    with pytest.raises(BadConfigError, match="testA"):
        RefCOCO(tmp_path, "testA", "refcocog")
    write_refer(tmp_path / "plus", "refcoco+", "unc")
    assert len(RefCOCO(tmp_path / "plus", "testA", "refcoco+")) == 3


def test_python2_pickle_strings_are_decoded(tmp_path: Path) -> None:
    # A Python 2 str is a SHORT_BINSTRING ('U'); Python 3 cannot write one, so the bytes are spelled out:
    # PROTO 2, EMPTY_LIST, MARK, U 'caf\xc3\xa9' (UTF-8), BININT1 7, APPENDS, STOP.
    path = tmp_path / "py2.p"
    path.write_bytes(b"\x80\x02](U\x05caf\xc3\xa9K\x07e.")
    assert load_plain_pickle(path) == ["café", 7]


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "refcoco" / "refs(unc).p"
    write_refer(tmp_path)
    path.write_bytes(pickle.dumps([Exploit()], protocol=2))
    with pytest.raises(BadDataError, match="refusing to load") as info:
        RefCOCO(tmp_path, "testA")
    assert "posix.system" in str(info.value) or "os.system" in str(info.value)
    assert not marker.exists()
    path.write_bytes(pickle.dumps([{"ref_id": 1}, b"x"], protocol=4)[:-3])  # truncated
    with pytest.raises(BadDataError, match="not a plain-data pickle"):
        load_plain_pickle(path)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match="does not exist"):
        RefCOCO(tmp_path / "none")
    write_refer(tmp_path)
    (tmp_path / "refcoco" / "instances.json").unlink()
    with pytest.raises(BadDataError, match=r"refcoco/instances.json"):
        RefCOCO(tmp_path, "testA")
    write_refer(tmp_path / "b")
    (
        tmp_path / "b" / "images" / "mscoco" / "images" / "train2014" / "COCO_train2014_000000000002.jpg"
    ).unlink()
    data = RefCOCO(tmp_path / "b", "testB")
    with pytest.raises(BadDataError, match=r"COCO_train2014_000000000002\.jpg"):
        data[0]
    write_refer(tmp_path / "c")
    os.rename(tmp_path / "c" / "images", tmp_path / "c" / "elsewhere")
    with pytest.raises(BadDataError, match=r"images/mscoco/images/train2014") as info:
        RefCOCO(tmp_path / "c", "testA")
    assert "image_root" in info.value.hint


def test_wrong_image_size_is_bad_data(tmp_path: Path) -> None:
    write_refer(tmp_path)
    Image.new("RGB", (7, 7)).save(tmp_path / "images/mscoco/images/train2014/COCO_train2014_000000000001.jpg")
    with pytest.raises(BadDataError, match=r"instances\.json says 32x24"):
        RefCOCO(tmp_path, "testA")[0]
