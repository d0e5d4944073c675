"""`langseg segment` / `langseg refer` over many images: outputs against the predictors called directly,
bad files skipped, nothing overwritten, and every argument checked before a model loads.

A converted random-weight LSeg (tiny) stands in for a semantic model and the bundled ``vlt-shapes`` for a
referring one; images are small ShapeWorld scenes written into tmp_path.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

import langseg
import langseg.api
from langseg.batch import check_job, expand_images, run_batch, write_atomic
from langseg.convert import convert_lseg_official
from langseg.data import ShapeWorldConfig, render_scene
from langseg.errors import OutputError
from langseg.predict import ReferringSet
from tests.test_cli import run_cli
from tests.test_lseg_convert import TINY, _write_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = ["red circle", "blue square", "other"]
TEXTS = ["the large circle on the left", "the red square"]


@pytest.fixture(scope="module")
def lseg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lseg")
    _write_ckpt(root / "tiny.ckpt", TINY, seed=5)
    return convert_lseg_official(root / "tiny.ckpt", root / "converted", "lseg-tiny")


def scene(index: int, size: int = 64) -> np.ndarray:
    return render_scene(seed=11, index=index, config=ShapeWorldConfig(size=size)).image


def mixed_folder(root: Path) -> tuple[list[Path], list[str]]:
    """Good images (RGB, grayscale, RGBA, one of another size) and bad files; (good paths, bad names)."""
    root.mkdir()
    Image.fromarray(scene(0)).save(root / "a_rgb.png")
    Image.fromarray(scene(1, 48)).save(root / "b_rgb.jpg", quality=95)
    Image.fromarray(scene(2)[..., 0]).save(root / "c_gray.png")
    rgba = np.concatenate([scene(3), np.full((64, 64, 1), 255, np.uint8)], -1)
    rgba[:20, :, 3] = 0  # a transparent band
    Image.fromarray(rgba, "RGBA").save(root / "d_rgba.png")
    buffer = io.BytesIO()
    Image.fromarray(scene(4)).save(buffer, "PNG")
    (root / "e_corrupt.png").write_bytes(buffer.getvalue()[:80])
    (root / "f_empty.png").write_bytes(b"")
    (root / "g_text.png").write_text("not an image at all\n")
    (root / "notes.txt").write_text("not an input: no image suffix")
    good = [root / n for n in ("a_rgb.png", "b_rgb.jpg", "c_gray.png", "d_rgba.png")]
    return good, ["e_corrupt.png", "f_empty.png", "g_text.png"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def decode(rle: dict) -> np.ndarray:
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make loading a model fail the test; returns the list of attempted loads (must stay empty)."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(langseg.api, "load", refuse)
    return calls


def test_segment_folder_writes_good_images_and_lists_bad_ones(
    lseg_folder, tmp_path, monkeypatch, capsys
) -> None:
    good, bad = mixed_folder(tmp_path / "in")
    inputs, out = snapshot(tmp_path / "in"), tmp_path / "out"
    args = ["segment", str(tmp_path / "in"), "--labels", ", ".join(LABELS), "--model", str(lseg_folder)]
    code, stdout, err = run_cli(monkeypatch, capsys, *args, "--out", str(out), "--device", "cpu")
    assert code == 1, err
    assert all(name in err for name in bad) and "3 image(s) failed" in err and "Traceback" not in err
    assert "empty file (0 bytes)" in err and "not a readable image" in err
    assert f"wrote 4 of 7 images to {out}" in stdout.replace("\n", " ")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{p.stem}{suffix}" for p in good for suffix in (".overlay.png", ".mask.png", ".json")
    )  # nothing for the bad files, no temporary files left
    direct = langseg.load(lseg_folder)
    for path in good:
        expected = direct.segment(path, LABELS, keep_scores=True)
        height, width = expected.mask.shape
        mask = Image.open(out / f"{path.stem}.mask.png")
        assert mask.mode == "P" and np.array_equal(np.asarray(mask), expected.mask)
        assert np.array_equal(np.asarray(mask.convert("RGB")), langseg.viz.palette(3)[expected.mask])
        assert Image.open(out / f"{path.stem}.overlay.png").size == (width, height)
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert (
            record["image"] == str(path) and record["labels"] == LABELS and record["size"] == [height, width]
        )
        decoded = np.full((height, width), -1)
        for segment in record["segments"]:
            decoded[decode(segment["mask"])] = segment["index"]
            assert segment["area"] == pytest.approx(expected.areas()[segment["label"]])
            assert segment["score"] == pytest.approx(expected.label_scores()[segment["label"]], abs=1e-6)
        assert np.array_equal(decoded, expected.mask)  # the RLEs tile the image into the same mask
    assert snapshot(tmp_path / "in") == inputs  # inputs untouched

    # A second run without --overwrite refuses before loading the model and changes nothing.
    written, loads = snapshot(out), []
    monkeypatch.setattr(langseg.api, "load", lambda *a, **k: loads.append(a))
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", str(out), "--device", "cpu")
    assert code == 2 and "exist already" in err and "--overwrite" in err and "Traceback" not in err
    assert snapshot(out) == written and loads == []


def test_refer_two_texts_on_vlt_shapes_matches_the_referrer(tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(scene(i, 64 + 32 * i)).save(folder / f"s{i}.png")
    loaded: list = []
    real_load = langseg.api.load
    monkeypatch.setattr(langseg.api, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    args = [
        "refer",
        str(folder / "s*.png"),
        "--text",
        TEXTS[0],
        "--text",
        TEXTS[1],
        "--out",
        str(tmp_path / "o"),
    ]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--device", "cpu")
    assert code == 0, err
    # The expressions were checked and tokenised once for the whole run, the images encoded once each.
    assert loaded[0].text_encodings == 1 and loaded[0].image_encodings == 3
    direct = langseg.load("vlt-shapes")
    for i in range(3):
        results = direct.refer_all(folder / f"s{i}.png", TEXTS, keep_scores=True)
        expected = ReferringSet(results)
        mask = Image.open(tmp_path / "o" / f"s{i}.mask.png")
        assert mask.mode == "P" and np.array_equal(np.asarray(mask), expected.mask)
        assert set(np.unique(expected.mask)) <= {0, 1, 2}
        assert Image.open(tmp_path / "o" / f"s{i}.overlay.png").size == (64 + 32 * i,) * 2
        record = json.loads((tmp_path / "o" / f"s{i}.json").read_text())
        assert record["task"] == "referring" and record["texts"] == TEXTS
        for entry, result in zip(record["expressions"], results, strict=True):
            assert np.array_equal(decode(entry["mask"]), result.mask)
            assert entry["score"] == pytest.approx(result.score, abs=1e-6)
            assert entry["area"] == pytest.approx(result.mask.mean())


def test_label_embeddings_are_computed_once_per_run(lseg_folder, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(scene(i)).save(folder / f"{i}.png")
    segmenter = langseg.load(lseg_folder)
    calls = []
    tokenize = segmenter.tokenizer
    segmenter.tokenizer = lambda texts: calls.append(list(texts)) or tokenize(texts)
    job = check_job(
        "semantic", [folder], LABELS, model=str(lseg_folder), out_dir=tmp_path / "o", device="cpu"
    )
    summary = run_batch(segmenter, job)
    assert len(summary.written) == 4 and not summary.failed and len(summary.files) == 12
    assert segmenter.text_encodings == 1 and len(calls) == 1 and calls[0] == LABELS
    assert segmenter.image_encodings == 4


def test_folders_and_globs_expand(tmp_path) -> None:
    (tmp_path / "a" / "deeper").mkdir(parents=True)
    for name in ("2.png", "1.JPG", "x.overlay.png", "readme.md", "deeper/3.png"):
        (tmp_path / "a" / name).write_bytes(b"")
    (tmp_path / "b.webp").write_bytes(b"")
    (tmp_path / "odd.name").write_bytes(b"")
    found = expand_images(
        [tmp_path / "a", str(tmp_path / "*.webp"), tmp_path / "odd.name", tmp_path / "a/2.png"]
    )
    names = [p.relative_to(tmp_path).as_posix() for p in found]
    # Folders: image suffixes only, sorted, not recursive; a named file whatever its suffix; each once.
    assert names == ["a/1.JPG", "a/2.png", "a/x.overlay.png", "b.webp", "odd.name"]
    own = expand_images([tmp_path / "a"], skip_outputs_in=tmp_path / "a")  # our outputs are not inputs
    assert [p.name for p in own] == ["1.JPG", "2.png"]


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["segment", "{tmp}/missing.png", "--labels", "a, b"], "image not found", "Check the path"),
        (["segment", "{tmp}/empty_dir", "--labels", "a, b"], "holds no images", "Image files end in"),
        (["segment", "{tmp}/*.gif", "--labels", "a, b"], "no image file matches", "pattern"),
        (["segment", "{img}", "--labels", "cat"], "one label", "other"),
        (["segment", "{img}", "--labels", "cat,,dog"], "empty label", "distinct"),
        (["segment", "{img}", "--labels", "cat, cat"], "duplicate labels", "synonyms"),
        (
            ["segment", "{img}", "--labels", "a, b", "--background-threshold", "0.5"],
            "needs a label",
            "background",
        ),
        (["refer", "{img}", "--text", "   ", "--model", "vlt-shapes"], "expression is empty", "sentence"),
        (["refer", "{img}", "--text", "42 !", "--model", "vlt-shapes"], "no words", "sentence"),
        (["segment", "{img}", "--labels", "a, b", "--out", "{tmp}/file.txt"], "is a file", "folder"),
        (["segment", "{img}", "--labels", "a, b", "--out", "{tmp}/file.txt/sub"], "is a file", "folder"),
        (["segment", "{img}", "{tmp}/twin/img.png", "--labels", "a, b"], "same outputs", "different --out"),
        (["segment", "{img}", "--labels", "a, b", "--device", "cuda:99"], "not available", "cpu"),
        (["segment", "{img}", "--labels", "a, b", "--device", "abacus"], "unknown device", "cpu"),
        (["segment", "{img}", "--labels", "a, b", "--dtype", "int8"], "Invalid value", "float32"),
        (["segment", "{img}", "--labels", "a, b", "--format", "gif"], "Invalid value", "png"),
        (
            ["segment", "{img}", "--labels", "a, b", "--model", "no-such-model"],
            "no-such-model",
            "langseg models",
        ),
        (
            ["segment", "{img}", "--labels", "a, b", "--model", "vlt-shapes"],
            "referring model",
            "langseg refer",
        ),
        (
            ["refer", "{img}", "--text", "the red one", "--model", "{lseg}"],
            "semantic model",
            "langseg segment",
        ),
        (
            ["segment", "{img}", "--labels", "a, b", "--weights", "{tmp}/nope.safetensors"],
            "not found",
            "path",
        ),
    ],
)
def test_every_argument_is_checked_before_the_model_loads(
    lseg_folder, tmp_path, monkeypatch, capsys, no_loading, args, message, hint
) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "twin").mkdir()
    Image.fromarray(scene(0)).save(tmp_path / "img.png")
    Image.fromarray(scene(1)).save(tmp_path / "twin" / "img.png")
    monkeypatch.chdir(tmp_path)
    fill = {"tmp": str(tmp_path), "img": str(tmp_path / "img.png"), "lseg": str(lseg_folder)}
    full = [a.format(**fill) for a in args]
    if "--model" not in full:
        full += ["--model", str(lseg_folder) if full[0] == "segment" else "vlt-shapes"]
    code, out, err = run_cli(monkeypatch, capsys, *full)
    assert code == 2, out + err
    assert message in err and hint in err and "Traceback" not in out + err
    assert no_loading == [] and not (tmp_path / "langseg_out").exists()  # nothing loaded, nothing created


def test_writes_are_atomic_and_never_clobber(tmp_path) -> None:
    target = tmp_path / "x.json"
    target.write_text("precious")
    with pytest.raises(OutputError, match="exists already"):
        write_atomic(target, lambda tmp: tmp.write_text("new"), overwrite=False)
    assert target.read_text() == "precious"

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "y.json", half_then_crash, overwrite=True)
    write_atomic(target, lambda tmp: tmp.write_text("new"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"] and target.read_text() == "new"


def test_format_chooses_the_files_and_overwrite_replaces_them(tmp_path, monkeypatch, capsys) -> None:
    Image.fromarray(scene(0)).save(tmp_path / "a.png")
    base = ["refer", str(tmp_path / "a.png"), "--text", TEXTS[1], "--device", "cpu"]
    for fmt, names in (("json", ["a.json"]), ("png", ["a.mask.png", "a.overlay.png"])):
        code, _, err = run_cli(monkeypatch, capsys, *base, "--format", fmt, "--out", str(tmp_path / fmt))
        assert code == 0, err
        assert sorted(p.name for p in (tmp_path / fmt).iterdir()) == names
    (tmp_path / "png" / "a.mask.png").write_bytes(b"stale")
    code, _, err = run_cli(
        monkeypatch, capsys, *base, "--format", "png", "--out", str(tmp_path / "png"), "--overwrite"
    )
    assert code == 0, err
    assert Image.open(tmp_path / "png" / "a.mask.png").mode == "P"  # replaced by a complete mask


def test_an_interrupted_run_leaves_only_complete_files(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(scene(i)).save(folder / f"{i}.png")
    referrer = langseg.load("vlt-shapes")
    infer_many, calls = referrer.infer_many, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return infer_many(*args, **kwargs)

    monkeypatch.setattr(referrer, "infer_many", interrupted)
    job = check_job("referring", [folder], TEXTS, model="vlt-shapes", out_dir=tmp_path / "o", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        run_batch(referrer, job, batch_size=3)
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    # The batch of three images computed before the interrupt is written whole; nothing else, no
    # temporary file.
    assert names == sorted(f"{i}{s}" for i in range(3) for s in (".overlay.png", ".mask.png", ".json"))
    for i in range(3):
        assert json.loads((tmp_path / "o" / f"{i}.json").read_text())["texts"] == TEXTS
        assert Image.open(tmp_path / "o" / f"{i}.mask.png").size == (64, 64)
