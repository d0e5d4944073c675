"""ONNX export: every graph against PyTorch (fp32, 1e-4), masks of the onnxruntime predictor against the
PyTorch predictor, the exporter each family uses, the legacy fallback, and the error cases.

Models: the shipped ``lseg-shapes`` and ``vlt-shapes`` (trained, small), a tiny random-weight NACLIP
(an open_clip ViT registered from a JSON file, as in test_dense_clip_predict.py), and a tiny
random-weight ResNet LSeg registered as ``lseg-zs-rn101`` (its image graph only). Each is exported once
per module (export takes tens of seconds on a busy CPU); ``vlt-shapes`` through the command line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import langseg
from langseg.data.shapes import ShapeWorldConfig, render_scene
from langseg.errors import BadConfigError, BadDataError, MissingWeightsError, OutputError
from langseg.export import export_onnx, onnx_io, read_manifest
from langseg.export.graphs import (
    RESNET_DEFAULT_GRID,
    ClassifyGraph,
    GraphSpec,
    patch_and_native_grid,
    segmenter_graphs,
)
from langseg.export.onnx_io import export_graph, session
from tests.open_clip_helpers import random_state, register_tiny_vit
from tests.test_cli import run_cli

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "langseg-test-onnx-tiny-vit"
TOL = 1e-4
EXPRESSIONS = ["the large red circle", "the blue square on the left", "a green triangle", "the small one"]


@pytest.fixture(scope="module")
def lseg(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """(PyTorch Segmenter, exported folder) of lseg-shapes."""
    torch.set_num_threads(1)
    predictor = langseg.load("lseg-shapes")
    out = tmp_path_factory.mktemp("lseg") / "onnx"
    export_onnx(predictor, out, model_name="lseg-shapes")
    return predictor, out


@pytest.fixture(scope="module")
def vlt(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """(PyTorch Referrer, folder exported by `langseg export vlt-shapes --format onnx --out DIR`)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("vlt") / "onnx"
    monkeypatch, capture = pytest.MonkeyPatch(), _Capture()
    code, _, err = run_cli(
        monkeypatch, capture, "export", "vlt-shapes", "--format", "onnx", "--out", str(out)
    )
    monkeypatch.undo()
    assert code == 0, err
    return langseg.load("vlt-shapes"), out


class _Capture:
    """capsys for a module-scoped fixture (run_cli only calls readouterr(); the output goes to the
    terminal, and the manifest is checked instead)."""

    def readouterr(self) -> tuple[str, str]:
        return "", ""


@pytest.fixture(scope="module")
def naclip(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, Path]:
    """(PyTorch Segmenter, exported folder, weights) of a tiny random NACLIP with PAMR."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("clip")
    register_tiny_vit(folder, TINY)
    save_file(random_state(TINY), str(folder / "tiny.safetensors"))
    options = {"crop": 48, "stride": 32, "templates": ["a photo of a {}.", "{}"], "pamr": True}
    predictor = langseg.load(f"naclip:{TINY}", weights=folder / "tiny.safetensors", **options)
    export_onnx(predictor, folder / "onnx", model_name=f"naclip:{TINY}")
    return predictor, folder / "onnx", folder / "tiny.safetensors"


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    image[:, : width // 2] = (200, 40, 30)
    image[height // 2 :, width // 3 :] = (30, 90, 210)
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def scene(index: int, size: int = 128) -> np.ndarray:
    return render_scene(7, index, ShapeWorldConfig(size=size)).image


def run(folder: Path, graph: str, **inputs: torch.Tensor) -> np.ndarray:
    runner = session(folder / f"{graph}.onnx", threads=1)
    return runner.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


# ------------------------------------------------------------------------------------------ graphs


@pytest.mark.parametrize("family", ["lseg", "naclip", "vlt"])
def test_every_graph_is_exported_by_the_current_exporter(family, request) -> None:
    """A regression to the legacy fallback fails here (the manifest records the exporter per graph)."""
    folder = request.getfixturevalue(family)[1]
    manifest = read_manifest(folder)
    expected = ["model"] if family == "vlt" else ["image", "text", "classify"]
    assert sorted(manifest["graphs"]) == sorted(expected)
    for name, graph in manifest["graphs"].items():
        assert graph["exporter"] == "dynamo" and graph["fallback_reason"] is None, name
        assert 0 <= graph["max_abs_diff"] < TOL
    assert manifest["family"] == {"lseg": "lseg", "naclip": "dense_clip", "vlt": "vlt"}[family]
    assert manifest["format"] == "langseg-onnx" and manifest["opset"] == 18


@pytest.mark.parametrize("family", ["lseg", "naclip"])
def test_segmentation_graphs_match_pytorch_at_two_image_sizes(family, request) -> None:
    """One image graph, two sizes (dynamic H, W and batch); text and classify graphs at other K."""
    predictor, folder = request.getfixturevalue(family)[:2]
    model, patch = predictor.model, predictor.preprocess.pad_multiple
    ids = predictor.tokenizer(["red circle", "a blue square", "background", "green"])
    with torch.no_grad():
        text = model.encode_text(ids)
        np.testing.assert_allclose(run(folder, "text", token_ids=ids), text.numpy(), atol=TOL, rtol=0)
        for shape in ((1, 3, 16 * patch, 16 * patch), (2, 3, 7 * patch, 12 * patch)):
            images = torch.randn(shape, generator=torch.Generator().manual_seed(shape[2]))
            features = model.encode_image(images)
            got = run(folder, "image", images=images)
            np.testing.assert_allclose(got, features.numpy(), atol=TOL, rtol=0)
            logits = run(folder, "classify", features=features, text_embeddings=text[:3])
            np.testing.assert_allclose(
                logits, model.dense_logits(features, text[:3]).numpy(), atol=TOL, rtol=0
            )


def test_vlt_graph_matches_pytorch_for_any_number_of_expressions(vlt) -> None:
    referrer, folder = vlt
    model = referrer.model
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for texts in (EXPRESSIONS[:1], EXPRESSIONS):
        ids, mask = referrer.tokenizer.encode_batch(texts)
        with torch.no_grad():
            expected = model.decode(model.encode_image(images), ids, mask).numpy()
        pad = 15 - ids.shape[1]
        got = run(
            folder,
            "model",
            images=images,
            token_ids=torch.nn.functional.pad(ids, (0, pad)),
            token_mask=torch.nn.functional.pad(mask, (0, pad)),
        )
        assert got.shape == (len(texts), 1, 32, 32)
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------- predictors


def test_lseg_onnx_predictor_gives_the_same_masks(lseg) -> None:
    torch_seg, folder = lseg
    onnx_seg = langseg.load(folder)
    assert type(onnx_seg) is type(torch_seg) and onnx_seg.plan == torch_seg.plan
    labels = ["background", "red circle", "blue square", "green triangle", "yellow circle"]
    for image in (scene(0), scene(1, size=96)[:, :80]):  # the native size, and another one
        expected = torch_seg.segment(image, labels, keep_scores=True)
        got = onnx_seg.segment(image, labels, keep_scores=True)
        np.testing.assert_array_equal(got.mask, expected.mask)
        np.testing.assert_allclose(got.scores, expected.scores, atol=TOL)
        assert len(np.unique(got.mask)) >= 2


def test_naclip_onnx_predictor_gives_the_same_masks_with_windows_and_pamr(naclip) -> None:
    torch_seg, folder, _ = naclip
    onnx_seg = langseg.load(folder, device="auto")
    assert onnx_seg.refine is not None and onnx_seg.plan.crop == 48 and len(onnx_seg.templates) == 2
    labels = ["cat", "sofa; couch", "other"]
    for image in (photo(40, 40), photo(64, 100, seed=1)):  # one window (padded), several windows
        expected = torch_seg.segment(image, labels, keep_scores=True)
        got = onnx_seg.segment(image, labels, keep_scores=True)
        np.testing.assert_array_equal(got.mask, expected.mask)
        np.testing.assert_allclose(got.scores, expected.scores, atol=TOL)


def test_vlt_onnx_predictor_gives_the_same_masks(vlt) -> None:
    torch_ref, folder = vlt
    onnx_ref = langseg.load(folder)
    image = render_scene(3, 0, ShapeWorldConfig(size=80)).image[:, :70]  # letterboxed to 64
    expected = torch_ref.refer_all(image, EXPRESSIONS, keep_scores=True)
    got = onnx_ref.refer_all(image, EXPRESSIONS, keep_scores=True)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.scores, b.scores, atol=TOL)
        assert abs(a.score - b.score) < TOL
    assert any(r.mask.any() for r in got)
    single = onnx_ref.refer(image, "the large red circle")
    np.testing.assert_array_equal(single.mask, expected[0].mask)
    # A batch (langseg refer's path) runs the one-image graph image by image, with the same masks.
    images = [image, render_scene(3, 1, ShapeWorldConfig(size=64)).image]
    batched = onnx_ref.infer_many([onnx_ref.prepare(i) for i in images], EXPRESSIONS, keep_scores=True)
    for one, pending in zip(images, batched, strict=True):
        want = torch_ref.refer_all(one, EXPRESSIONS, keep_scores=True)
        for a, b in zip(onnx_ref.finish(pending), want, strict=True):
            np.testing.assert_array_equal(a.mask, b.mask)


def tiny_zero_shot_rn_folder(folder: Path) -> Path:
    """A langseg folder registered as ``lseg-zs-rn101`` whose network is a tiny ResNet one: a timm
    ``resnet26`` cut to one bottleneck per stage, 8-64 wide (stage outputs 32-256), a 16-wide DPT and
    the tiny text tower. Same code path as the real ResNet-101 (TimmResNetTower, no reassembly), random
    weights and BatchNorm statistics so that every tensor counts."""
    from langseg.hub import save_checkpoint
    from langseg.models.lseg import TEXT_ENCODER_CONFIGS, LSeg, LSegNet
    from langseg.models.text import ClipTextEncoder

    torch.manual_seed(0)
    resnet = {"channels": [8, 16, 32, 64], "stem_width": 8, "layers": [1, 1, 1, 1]}
    kwargs = {"backbone": "resnet26", "encoder": "resnet", "vit_kwargs": resnet,
              "widths": [32, 64, 128, 256], "features": 16, "embed_dim": 32}  # fmt: skip
    # One text layer over 8 positions (as lseg-shapes' tower): the text graph is not what is new here.
    text_cfg = {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    text_kwargs = {**TEXT_ENCODER_CONFIGS["lseg-tiny"], "text_cfg": text_cfg}
    model = LSeg(LSegNet(**kwargs), ClipTextEncoder(**text_kwargs))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = {"format": "langseg", "model": "lseg-zs-rn101", "family": "lseg", "variant": "lseg-zs-rn101",
              "kwargs": kwargs, "text_encoder": {"kwargs": text_kwargs}}  # fmt: skip
    return save_checkpoint({k: v.contiguous() for k, v in model.state_dict().items()}, folder, config)


def test_zero_shot_resnet_image_graph_matches_pytorch_at_two_sizes(tmp_path) -> None:
    """The image graph of an ``lseg-zs-rn101`` network (a ResNet tower: no ViT, no position embeddings;
    what is new for export): traced at the ResNet's default grid plus one, any multiple of 32 afterwards,
    within 1e-4 of PyTorch at two other sizes and batches. Its text and classify graphs are LSeg's
    (covered by the lseg-shapes tests), and the runtime Segmenter reads the preprocessing (ImageNet
    statistics, padding to 32) from the manifest like any other field."""
    predictor = langseg.load(tiny_zero_shot_rn_folder(tmp_path / "zs"))
    assert predictor.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    model = predictor.model.eval()
    assert patch_and_native_grid(model) == (32, RESNET_DEFAULT_GRID)
    image = segmenter_graphs(model, predictor.tokenizer(["a", "b", "c", "d", "e"]), 64)[0]
    assert image.name == "image" and image.example[0].shape[-2:] == (32 * 16, 32 * 18)
    entry = export_graph(image, tmp_path, 18)
    assert entry["exporter"] == "dynamo" and entry["fallback_reason"] is None
    assert entry["inputs"]["images"]["shape"] == ["batch", 3, "height", "width"]
    for shape in ((1, 3, 64, 96), (2, 3, 96, 64)):
        images = torch.randn(shape, generator=torch.Generator().manual_seed(shape[2]))
        with torch.no_grad():
            expected = model.encode_image(images).numpy()
        got = run(tmp_path, "image", images=images)
        assert got.shape == (shape[0], 32, shape[2] // 4, shape[3] // 4)  # before LSeg's x2 upsampling
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------- the fallback


def test_legacy_fallback_records_its_reason_and_still_matches(tmp_path, monkeypatch) -> None:
    """When the current exporter fails, the legacy one writes the graph, and the manifest says why."""
    net = langseg.create_model("lseg-tiny").eval()

    class Classify(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def dense_logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            return self.net.classify(features, text)

    features = torch.nn.functional.normalize(torch.randn(2, 32, 5, 7), dim=1)
    spec = GraphSpec(
        "classify",
        ClassifyGraph(Classify()),
        ("features", "text_embeddings"),
        ("logits",),
        (features, torch.randn(3, 32)),
        (features[:1, :, :4, :6], torch.randn(2, 32)),
        {"features": {0: ("batch", 1), 2: ("h", 1), 3: ("w", 1)}, "text_embeddings": {0: ("labels", 1)}},
    )

    def broken(*args: object) -> None:
        raise RuntimeError("no luck today\nsecond line")

    monkeypatch.setattr(onnx_io, "_export_dynamo", broken)
    entry = export_graph(spec, tmp_path, 18)
    assert entry["exporter"] == "legacy" and entry["fallback_reason"] == "RuntimeError: no luck today"
    check_features, check_text = spec.check
    got = run(tmp_path, "classify", features=check_features, text_embeddings=check_text)
    with torch.no_grad():
        expected = net.classify(check_features, check_text).numpy()
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------- errors


def test_existing_folder_needs_overwrite(lseg, tmp_path) -> None:
    predictor, _ = lseg
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        export_onnx(predictor, tmp_path, model_name="lseg-shapes")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cli_refuses_bad_arguments_before_loading(tmp_path, monkeypatch, capsys) -> None:
    cases = [
        (
            ["export", "lseg-shapes", "--format", "tflite", "--out", str(tmp_path / "a")],
            "unknown export format",
        ),
        (["export", "lseg-shapes", "--format", "onnx"], "needs --out"),
        (
            ["export", "lseg-shapes", "--format", "onnx", "--out", str(tmp_path / "a"), "--opset", "9"],
            "opset 9",
        ),
        (["export", "no-such-model", "--format", "onnx", "--out", str(tmp_path / "a")], "no-such-model"),
        (["export", "recipe.yaml"], "missing OUT_DIR"),
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    cases.append(
        (["export", "lseg-shapes", "--format", "onnx", "--out", str(tmp_path / "full")], "not empty")
    )
    for argv, message in cases:
        code, _, err = run_cli(monkeypatch, capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "a").exists()


def test_damaged_folders_are_clear_errors(lseg, tmp_path) -> None:
    _, folder = lseg
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = copy / "manifest.json"
    good = manifest.read_text()
    manifest.write_text("{not json")
    with pytest.raises(BadDataError, match="not valid JSON"):
        langseg.load(copy)
    manifest.write_text(json.dumps({**json.loads(good), "task": "dance"}))
    with pytest.raises(BadDataError, match="unknown task"):
        langseg.load(copy)
    manifest.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(BadDataError, match="format_version 99"):
        langseg.load(copy)
    bad_plan = json.loads(good)
    bad_plan["predictor"]["plan"]["crop"] = "big"
    manifest.write_text(json.dumps(bad_plan))
    with pytest.raises(BadDataError, match="usable predictor"):  # at load, not at the first image
        langseg.load(copy)
    manifest.write_text(good)
    (copy / "text.onnx").unlink()
    with pytest.raises(MissingWeightsError, match=r"text\.onnx"):
        langseg.load(copy)
    with pytest.raises(BadConfigError, match="takes no options"):
        langseg.load(folder, plan="paper")
    with pytest.raises(BadConfigError, match="no weights"):
        langseg.load(folder, weights=tmp_path)


def test_missing_onnxruntime_names_the_extra(lseg, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    with pytest.raises(BadConfigError) as info:
        langseg.load(lseg[1])
    assert 'pip install "langseg[export]"' in info.value.hint


def test_cli_segments_with_an_exported_folder(lseg, tmp_path, monkeypatch, capsys) -> None:
    """`langseg segment --model EXPORTED_DIR` runs onnxruntime and writes what langseg.load(DIR) gives;
    an option the folder fixes, the wrong task, or exporting it again is refused before anything is
    written."""
    from PIL import Image

    folder = lseg[1]
    image = tmp_path / "scene.png"
    Image.fromarray(scene(3)).save(image)
    labels = "red circle,blue square,background"
    argv = ["segment", str(image), "--model", str(folder), "--labels", labels, "--format", "both"]
    code, _, err = run_cli(monkeypatch, capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 0, err
    written = np.array(Image.open(tmp_path / "out" / "scene.mask.png"))
    expected = langseg.load(folder).segment(scene(3), labels.split(",")).mask
    assert np.array_equal(written, expected)
    code, _, err = run_cli(monkeypatch, capsys, *argv, "--dtype", "bfloat16", "--out", str(tmp_path / "o2"))
    assert code != 0 and "takes no options (got dtype)" in err and not (tmp_path / "o2").exists()
    code, _, err = run_cli(
        monkeypatch, capsys, "refer", str(image), "--model", str(folder), "--text", "the red circle",
        "--out", str(tmp_path / "o3"),
    )  # fmt: skip
    assert code != 0 and "is a semantic model" in err and not (tmp_path / "o3").exists()
    again = ["export", str(folder), "--format", "onnx", "--out", str(tmp_path / "o4")]
    code, _, err = run_cli(monkeypatch, capsys, *again)
    assert code != 0 and "already an exported ONNX model" in err and not (tmp_path / "o4").exists()
