"""LSeg predictor: load() paths, image kinds, caches, label errors, safe Lightning loading and the CLI.

Everything runs on ``lseg-tiny`` checkpoints in the official layout with random weights, written by the
generator of tests/test_lseg_convert.py. The wiring check compares the predictor with an independent
``LSegNet.forward`` on hand-normalised, hand-padded input and hand-tokenised labels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import langseg
from langseg.convert import convert_lseg_official
from langseg.convert.lseg_official import read_official_checkpoint
from langseg.errors import BadConfigError, BadDataError, BadLabelsError, MissingWeightsError
from langseg.predict import InferencePlan
from langseg.predict.tta import PAPER_SCALES
from langseg.zoo.lseg import lseg_plan
from tests.test_cli import run_cli
from tests.test_lseg_convert import TINY, _write_ckpt

LABELS = ["cat", "a red sofa", "grass", "other"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(official-layout checkpoint, converted folder) of one random-weight lseg-tiny."""
    root = tmp_path_factory.mktemp("lseg")
    _write_ckpt(root / "tiny.ckpt", TINY, arch_option=1, block_depth=2, seed=11)
    return root / "tiny.ckpt", convert_lseg_official(root / "tiny.ckpt", root / "converted", "lseg-tiny")


def scene(height: int = 70, width: int = 90) -> np.ndarray:
    """``H x W x 3`` uint8 image with a few regions, so random weights still give a varied mask."""
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([(xs * 255 // width), (ys * 255 // height), np.full_like(xs, 60)], -1)
    image[height // 3 : 2 * height // 3, width // 4 : width // 2] = (230, 30, 30)
    return image.astype(np.uint8)


def test_load_from_folder_and_official_ckpt_give_identical_masks(tiny) -> None:
    ckpt, folder = tiny
    assert json.loads((folder / "config.json").read_text())["model"] == "lseg-tiny"
    masks = []
    for model, weights in ((folder, None), ("lseg-tiny", ckpt), ("lseg-tiny", folder / "model.safetensors")):
        result = langseg.load(model, weights=weights).segment(scene(), LABELS)
        masks.append(result.mask)
    assert len(np.unique(masks[0])) > 1  # the comparison is between informative masks
    assert all(np.array_equal(masks[0], mask) for mask in masks[1:])


def test_segment_keeps_the_original_size_for_every_image_kind(tiny, tmp_path) -> None:
    seg = langseg.load(tiny[1])
    rgb = Image.fromarray(scene(37, 53))
    files = {
        "rgb.png": (rgb, (37, 53)),
        "gray.png": (rgb.convert("L"), (37, 53)),
        "rgba.png": (rgb.convert("RGBA"), (37, 53)),
        "16bit.png": (Image.fromarray(scene(37, 53)[..., 0].astype(np.uint16) * 257), (37, 53)),
        "cmyk.jpg": (rgb.convert("CMYK"), (37, 53)),
    }
    for name, (image, _) in files.items():
        image.save(tmp_path / name)
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display upright
    rgb.save(tmp_path / "exif.jpg", exif=exif)
    files["exif.jpg"] = (rgb, (53, 37))  # shown upright, the 53-wide image is 53 tall
    for name, (_, size) in files.items():
        result = seg.segment(tmp_path / name, LABELS)
        assert result.mask.shape == size and result.image.shape == (*size, 3), name
        assert result.mask.min() >= 0 and result.mask.max() < len(LABELS)


def test_caches_skip_text_and_image_work(tiny) -> None:
    seg = langseg.load(tiny[1], plan=InferencePlan(crop=48, stride=32))
    parts = seg.model
    calls = {"text": 0, "image": 0}
    # Every text forward (trimmed or not) starts by embedding the tokens.
    text = parts.text_encoder.text.token_embedding
    text.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    parts.net.encoder.register_forward_hook(lambda *_: calls.__setitem__("image", calls["image"] + 1))
    seg.set_image(scene())
    first = seg.segment(labels=LABELS)
    windows = calls["image"]
    assert calls["text"] == 1 and windows == 2  # 70 x 90 in 48-windows every 32: 2 x 3, 4 per call
    again = seg.segment(labels=LABELS)
    assert calls == {"text": 1, "image": windows}  # same labels, same image: no model work at all
    assert np.array_equal(first.mask, again.mask)
    seg.segment(labels=["dog", *LABELS])
    assert calls == {"text": 2, "image": windows}  # new labels: text only, image features cached


def test_bad_label_sets_raise_before_any_text_encoding(tiny) -> None:
    seg = langseg.load(tiny[1], max_labels=3)
    for labels in ([], ["cat", " "], ["cat", "dog", "cat"], ["a", "b", "c", "d"]):
        with pytest.raises(BadLabelsError):
            seg.segment(scene(), labels)
    assert seg.text_encodings == 0


def test_predictor_logits_equal_lsegnet_forward(tiny, tmp_path) -> None:
    """One window, no resizing: predictor probabilities == softmax(LSegNet.forward) on hand-made input."""
    Image.fromarray(scene(70, 90)).save(tmp_path / "scene.png")
    seg = langseg.load(tiny[1], plan=InferencePlan())
    result = seg.segment(tmp_path / "scene.png", LABELS, keep_scores=True)
    parts = seg.model
    x = torch.from_numpy(scene(70, 90)).permute(2, 0, 1)[None].float() / 255.0
    x = F.pad((x - 0.5) / 0.5, (0, 96 - 90, 0, 80 - 70))  # LSeg normalisation; pad to the 16-px patch
    with torch.no_grad():
        text = parts.text_encoder(open_clip.get_tokenizer("ViT-B-32")(LABELS))  # the raw label text
        expected = parts.net(x, text)[0, :, :70, :90].softmax(0)
    assert result.scores is not None and result.scores.shape == (4, 70, 90)
    assert expected.std() > 0.05  # not a flat map
    np.testing.assert_allclose(result.scores, expected.numpy(), atol=2e-5, rtol=0)
    assert (result.mask == expected.argmax(0).numpy()).mean() > 0.999  # ties aside


def test_bf16_weights_give_close_probabilities(tiny) -> None:
    image = scene()
    fp32 = langseg.load(tiny[1]).segment(image, LABELS, keep_scores=True)
    bf16 = langseg.load(tiny[1], dtype="bfloat16").segment(image, LABELS, keep_scores=True)
    assert fp32.scores is not None and bf16.scores is not None
    assert np.abs(fp32.scores - bf16.scores).mean() < 0.02


def test_named_plans_and_bad_options() -> None:
    paper = InferencePlan(crop=480, stride=320, scales=PAPER_SCALES, base_size=520, flip=True)
    assert lseg_plan("paper") == paper and PAPER_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert lseg_plan("single") == InferencePlan(base_size=480)
    with pytest.raises(BadConfigError, match="unknown LSeg plan"):
        lseg_plan("fast")


def test_missing_weights_say_how_to_convert() -> None:
    with pytest.raises(MissingWeightsError, match="no published langseg weights") as info:
        langseg.load("lseg-vitb32-384")
    assert "langseg convert lseg-official" in info.value.hint and "weights=" in info.value.hint


def test_wrong_variant_is_a_clear_error(tiny, tmp_path) -> None:
    with pytest.raises(BadConfigError, match="holds 'lseg-tiny', not 'lseg-vitb32-384'"):
        langseg.load("lseg-vitb32-384", weights=tiny[1])
    ckpt = torch.load(tiny[0], weights_only=True)
    ckpt["hyper_parameters"]["backbone"] = "clip_vitl16_384"
    torch.save(ckpt, tmp_path / "l16.ckpt")
    with pytest.raises(BadConfigError, match="trained as lseg-vitl16-384") as info:
        langseg.load("lseg-vitb32-384", weights=tmp_path / "l16.ckpt")
    assert "'lseg-vitl16-384'" in info.value.hint


# ------------------------------------------------------------------ Lightning checkpoints, safely
LIGHTNING = (
    "pytorch_lightning",
    "pytorch_lightning.utilities",
    "pytorch_lightning.utilities.parsing",
    "pytorch_lightning.callbacks",
    "pytorch_lightning.callbacks.model_checkpoint",
)


def save_with_fake_lightning(path: Path, build) -> list[str]:
    """``torch.save(build(fake_classes), path)`` with a fake Lightning importable only while saving.

    Returns the list the fake classes append to whenever any of their code runs.
    """
    if importlib.util.find_spec("pytorch_lightning") is not None:
        pytest.skip("the real pytorch_lightning is installed; these tests fake it")
    ran: list[str] = []
    modules = {name: types.ModuleType(name) for name in LIGHTNING}

    def fake(module: str, name: str, base: type = object) -> type:
        body = {
            "__module__": module,
            "__init__": lambda self, *a, **k: ran.append(f"{name}.__init__"),
            "__setstate__": lambda self, state: ran.append(f"{name}.__setstate__"),
        }
        cls = type(name, (base,), body)
        setattr(modules[module], name, cls)
        return cls

    classes = {
        "AttributeDict": fake("pytorch_lightning.utilities.parsing", "AttributeDict", dict),
        "ModelCheckpoint": fake("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
        "Evil": fake("pytorch_lightning.utilities.parsing", "Evil"),
    }
    sys.modules.update(modules)
    try:
        torch.save(build(classes), path)
    finally:
        for name in LIGHTNING:
            del sys.modules[name]
    ran.clear()  # building the objects ran their __init__; only what loading runs counts
    return ran


def test_lightning_checkpoint_loads_without_lightning(tmp_path) -> None:
    state = _write_ckpt(tmp_path / "plain.ckpt", TINY, arch_option=1, block_depth=2)

    def build(classes):
        hyper = dict.__new__(classes["AttributeDict"])  # as Lightning's save_hyperparameters() keeps them
        hyper.update(backbone="tiny", arch_option=1, block_depth=2, activation="lrelu", lr=0.004)
        return {
            "epoch": 199,
            "pytorch-lightning_version": "1.3.5",
            "state_dict": state,
            "hyper_parameters": hyper,
            "callbacks": {classes["ModelCheckpoint"]: {"best_model_score": torch.tensor(0.5)}},
            "args": argparse.Namespace(backbone="clip_vitl16_384", arch_option=1),
        }

    ran = save_with_fake_lightning(tmp_path / "lightning.ckpt", build)
    assert "pytorch_lightning" not in sys.modules  # gone, and not installed (else the helper skips)
    _, hyper = read_official_checkpoint(tmp_path / "lightning.ckpt")
    assert type(hyper) is dict and hyper["arch_option"] == 1 and hyper["lr"] == pytest.approx(0.004)
    out = convert_lseg_official(tmp_path / "lightning.ckpt", tmp_path / "out", "lseg-tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["kwargs"]["spatial_reg"] == "bottleneck" and config["kwargs"]["spatial_reg_depth"] == 2
    assert ran == [] and "pytorch_lightning" not in sys.modules  # no code of the pickled classes ran
    torch.save(
        {"state_dict": {}, "hyper_parameters": argparse.Namespace(arch_option=2)}, tmp_path / "ns.ckpt"
    )
    assert read_official_checkpoint(tmp_path / "ns.ckpt")[1] == {"arch_option": 2}  # old-style hparams


def test_other_pickled_classes_are_still_refused(tmp_path) -> None:
    ran = save_with_fake_lightning(
        tmp_path / "evil.ckpt", lambda classes: {"state_dict": {}, "hyper_parameters": classes["Evil"]()}
    )
    with pytest.raises(BadDataError, match=r"refuses: pytorch_lightning\.utilities\.parsing\.Evil$"):
        read_official_checkpoint(tmp_path / "evil.ckpt")
    assert ran == []
    # A stand-in is scoped to the conversion: a plain torch.load still refuses Lightning's AttributeDict.
    save_with_fake_lightning(
        tmp_path / "hp.ckpt", lambda classes: {"hp": dict.__new__(classes["AttributeDict"])}
    )
    with pytest.raises(Exception, match="AttributeDict"):
        torch.load(tmp_path / "hp.ckpt", weights_only=True)


# ------------------------------------------------------------------ CLI
def test_cli_convert_lseg_official(tiny, tmp_path, monkeypatch, capsys) -> None:
    ckpt, _ = tiny
    out = tmp_path / "converted"
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "convert", "lseg-official", str(ckpt), str(out), "--variant", "lseg-tiny"
    )
    assert code == 0, stderr
    assert "converted" in stdout and json.loads((out / "config.json").read_text())["model"] == "lseg-tiny"
    assert langseg.load(out).segment(scene(), LABELS).mask.shape == (70, 90)
    code, _, stderr = run_cli(monkeypatch, capsys, "convert", "lseg-official", str(ckpt), str(out))
    assert code == 2 and "already holds a converted model" in stderr and "--overwrite" in stderr
    code, _, stderr = run_cli(
        monkeypatch, capsys, "convert", "lseg-official", str(ckpt), str(out), "--arch-option", "0",
        "--variant", "lseg-tiny", "--overwrite",
    )  # fmt: skip
    assert code == 2 and "error:" in stderr and "Traceback" not in stderr  # the keys disagree
    code, _, stderr = run_cli(monkeypatch, capsys, "convert", "lseg-official", str(tmp_path / "no.ckpt"), "x")
    assert code == 2 and "no checkpoint at" in stderr


@pytest.mark.slow
def test_compiled_image_network_segments_as_eager() -> None:
    """compile=True: the shipped lseg-shapes through torch.compile (inductor, frozen weights) gives the
    eager logits to float rounding and the same masks; a non-bool option is refused before loading."""
    import langseg
    from langseg.data import ShapeWorldConfig, render_scene
    from langseg.errors import BadConfigError

    labels = ["red circle", "blue square", "green triangle", "yellow star", "background"]
    eager, compiled = langseg.load("lseg-shapes"), langseg.load("lseg-shapes", compile=True)
    assert compiled.model.net.encode_image is not eager.model.net.encode_image
    for index in range(2):  # the second image reuses the graph compiled for the first
        image = render_scene(
            seed=321, index=index, config=ShapeWorldConfig(size=128, background="noise")
        ).image
        ours = compiled.infer(compiled.prepare(image), labels, None, True)
        theirs = eager.infer(eager.prepare(image), labels, None, True)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(compiled.finish(ours).mask, eager.finish(theirs).mask)
    with pytest.raises(BadConfigError, match="compile must be True or False"):
        langseg.load("lseg-shapes", compile="yes")
