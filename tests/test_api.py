"""The public API: one predictor contract, typed options checked first, one path to weights.

A converted random-weight LSeg (official checkpoint layout) and the bundled ``vlt-shapes`` stand in for
the two predictor kinds; nothing here needs the network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

import langseg
from langseg import hub
from langseg.convert import convert_lseg_official
from langseg.data import ShapeWorldConfig, render_scene
from langseg.errors import BadConfigError, ImageNotSetError, MissingWeightsError
from langseg.predict import Predictor, ReferringResult, SegmentationResult
from langseg.predict.referrer import Referrer
from langseg.predict.segmenter import Segmenter
from langseg.registry import WeightsSpec
from langseg.zoo.lseg import load_lseg
from tests.test_lseg_convert import TINY, _write_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lseg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lseg")
    _write_ckpt(root / "tiny.ckpt", TINY, seed=5)
    return convert_lseg_official(root / "tiny.ckpt", root / "converted", "lseg-tiny")


@pytest.fixture(scope="module")
def predictors(lseg_folder: Path) -> dict[str, Predictor]:
    return {"segmenter": langseg.load(lseg_folder), "referrer": langseg.load("vlt-shapes")}


def ask(predictor: Predictor, image: object = None) -> SegmentationResult | ReferringResult:
    if isinstance(predictor, Segmenter):
        return predictor.segment(image, ["red circle", "blue square", "other"], keep_scores=True)
    return predictor.refer(image, "the red circle", keep_scores=True)


def test_top_level_names_are_the_predictor_classes() -> None:
    assert langseg.Segmenter is Segmenter and langseg.Referrer is Referrer
    assert langseg.SegmentationResult is SegmentationResult and langseg.ReferringResult is ReferringResult
    assert {"load", "create_model", "list_models", "Segmenter", "Referrer"} <= set(dir(langseg))
    with pytest.raises(AttributeError):
        _ = langseg.no_such_name


@pytest.mark.parametrize("kind", ["segmenter", "referrer"])
def test_one_contract_for_both_predictors(predictors, kind: str, tmp_path: Path) -> None:
    predictor = predictors[kind]
    assert isinstance(predictor, Predictor) and isinstance(predictor.model, torch.nn.Module)
    assert not predictor.model.training and predictor.device == torch.device("cpu")
    predictor.reset_image()
    assert not predictor.is_image_set
    with pytest.raises(ImageNotSetError) as info:  # the same mistake, the same error class
        ask(predictor)
    assert "set_image" in info.value.hint
    scene = render_scene(seed=3, index=0, config=None).image  # 256 x 256 uint8
    Image.fromarray(scene).save(tmp_path / "scene.png")
    inputs = [
        tmp_path / "scene.png",
        str(tmp_path / "scene.png"),
        Image.fromarray(scene),
        scene,
        torch.from_numpy(scene).permute(2, 0, 1).contiguous(),
        torch.from_numpy(scene).permute(2, 0, 1).float() / 255,
    ]
    results = [ask(predictor, image) for image in inputs]
    for result in results:  # every image kind gives the same result, at the image size
        assert result.mask.shape == (256, 256) and result.image.shape == (256, 256, 3)
        assert np.array_equal(result.mask, results[0].mask)
        assert np.allclose(result.scores, results[0].scores, atol=1e-5)
    predictor.set_image(scene)
    assert predictor.is_image_set and np.array_equal(predictor.image, scene)
    assert np.array_equal(ask(predictor).mask, results[0].mask)  # the set image is reused
    predictor.reset_image()
    assert not predictor.is_image_set and predictor.image is None


@pytest.mark.parametrize("kind", ["segmenter", "referrer"])
def test_results_share_field_names_and_encode_masks_as_coco_rle(predictors, kind: str) -> None:
    result = ask(predictors[kind], render_scene(seed=3, index=1).image)
    for name in ("mask", "scores", "image"):
        assert hasattr(result, name)
    assert result.scores.shape[-2:] == result.mask.shape
    shares = result.areas()
    assert all(0 < share <= 1 for share in shares.values())
    record = json.loads(json.dumps(result.to_dict()))  # JSON-able
    assert record["size"] == [256, 256]
    if kind == "segmenter":
        assert record["labels"] == ["red circle", "blue square", "other"]
        decoded = np.zeros(result.mask.shape, np.int64) - 1
        for segment in record["segments"]:
            rle = {"size": segment["mask"]["size"], "counts": segment["mask"]["counts"].encode()}
            decoded[coco_mask.decode(rle).astype(bool)] = result.labels.index(segment["label"])
            assert segment["area"] == pytest.approx(shares[segment["label"]])
        assert np.array_equal(decoded, result.mask)  # the segments tile the image exactly
    else:
        assert record["text"] == "the red circle" and record["score"] == pytest.approx(result.score)
        rle = {"size": record["mask"]["size"], "counts": record["mask"]["counts"].encode()}
        assert np.array_equal(coco_mask.decode(rle).astype(bool), result.mask)
        assert record["area"] == pytest.approx(result.mask.mean())
    assert result.overlay().size == (256, 256)


# ---------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("vlt-shapes", {"plan": "paper"}, "Options of vlt models: threshold, upsample"),
        ("vlt-shapes", {"treshold": 0.4}, "Did you mean 'threshold'"),
        ("vlt-shapes", {"threshold": 1.5}, r"threshold must be in \(0, 1\)"),
        ("vlt-shapes", {"upsample": "nearest"}, "upsample"),
        ("lseg-vitl16-384", {"upsample": "logits"}, "Options of lseg models: plan, dtype"),
        ("lseg-vitl16-384", {"plan": "fast"}, "unknown LSeg plan"),
        ("lseg-vitl16-384", {"dtype": "int8"}, "unknown dtype"),
        ("lseg-vitl16-384", {"max_labels": 0}, "max_labels"),
        ("naclip-vit-b16", {"threshold": 0.3}, "Options of dense_clip models: templates"),
        ("naclip-vit-b16", {"templates": ["no placeholder"]}, "exactly once"),
        ("naclip-vit-b16", {"dtype": "int3"}, "unknown dtype"),
        ("naclip-vit-b16", {"precision": "bf16"}, "take no option .precision.* dtype"),
        ("vlt-shapes", {"dtype": torch.int8}, "float dtype"),
    ],
)
def test_options_are_checked_before_any_weights_are_looked_for(name, options, message, monkeypatch) -> None:
    """A bad option is a BadConfigError naming what the family takes, even where the weights are missing
    (the LSeg and dense CLIP weights are not on this machine): nothing heavy runs first."""

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were resolved before the options were checked")

    monkeypatch.setattr(hub, "resolve_weights", no_weights)
    for module in ("lseg", "vlt", "dense_clip"):
        monkeypatch.setattr(f"langseg.zoo.{module}.resolve_weights", no_weights)
    with pytest.raises(BadConfigError) as info:
        langseg.load(name, **options)
    assert re.search(message, f"{info.value.message} {info.value.hint}"), info.value.hint


@pytest.mark.parametrize("device", ["cuda:99", "bogus", "", "meta", "tpu"])
def test_unusable_devices_are_config_errors(device: str) -> None:
    with pytest.raises(BadConfigError, match="device") as info:
        langseg.load("vlt-shapes", device=device)
    assert "cpu" in info.value.message + info.value.hint  # names what there is


def test_device_names_are_case_insensitive() -> None:
    assert langseg.load("vlt-shapes", device=" CPU ").device == torch.device("cpu")


def test_good_options_reach_the_predictor() -> None:
    referrer = langseg.load("vlt-shapes", threshold=0.5, upsample="probability")
    assert referrer.threshold == 0.5 and referrer.upsample == "probability"
    # bf16 weights (inputs cast to them): nearly the float32 masks.
    image = render_scene(seed=5, index=0, config=ShapeWorldConfig(size=64)).image
    fp32 = langseg.load("vlt-shapes").refer(image, "the large circle", keep_scores=True)
    bf16 = langseg.load("vlt-shapes", dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    got = bf16.refer(image, "the large circle", keep_scores=True)
    assert (got.mask == fp32.mask).mean() > 0.98 and np.abs(got.scores - fp32.scores).mean() < 0.02


# ---------------------------------------------------------------------------------------- weights


def test_create_model_pretrained_for_every_family_with_weights(lseg_folder: Path) -> None:
    vlt = langseg.create_model("vlt-shapes", pretrained=True)
    state, config = hub.read_checkpoint(hub.BUNDLED_DIR / "vlt-shapes")
    assert vlt.text.embed.num_embeddings == config["kwargs"]["text"]["vocab_size"]  # the checkpoint's size
    assert all(torch.equal(vlt.state_dict()[k], v) for k, v in state.items())
    net = langseg.create_model("lseg-tiny", weights=lseg_folder)
    expected, _, _ = load_lseg(lseg_folder)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.state_dict().items())
    with pytest.raises(MissingWeightsError) as info:  # no published LSeg weights: say how to convert
        langseg.create_model("lseg-vitl16-384", pretrained=True)
    assert "langseg convert lseg-official" in info.value.hint
    with pytest.raises(MissingWeightsError, match="no published weights"):
        langseg.create_model("vlt-tiny", pretrained=True)


def test_list_models_says_which_weights_are_here(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("LANGSEG_CACHE", str(tmp_path / "langseg"))
    here = langseg.list_models(pretrained=True)
    assert "vlt-shapes" in here and "vlt-tiny" not in here and "naclip-vit-b16" not in here
    assert set(here) <= set(langseg.list_models())
    # A file in open_clip's Hugging Face cache layout makes the dense CLIP entries local.
    repo = tmp_path / "hf" / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "open_clip_model.safetensors").write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    here = langseg.list_models(pretrained=True)
    assert {"naclip-vit-b16", "sclip-vit-b16", "clearclip-vit-b16", "maskclip-vit-b16"} <= set(here)
    assert langseg.list_models(task="referring", pretrained=True) == ["vlt-shapes"]


def test_every_weights_kind_resolves_through_one_function(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(MissingWeightsError) as info:
        hub.resolve_weights(WeightsSpec.convert("run langseg convert first"), "x")
    assert info.value.hint == "run langseg convert first"
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE"):
        hub.resolve_weights(WeightsSpec.open_clip("ViT-B-16", "openai"), "naclip-vit-b16")
    assert hub.resolve_weights(WeightsSpec.bundled(None), "vlt-shapes") == hub.BUNDLED_DIR / "vlt-shapes" / (
        "model.safetensors"
    )
    assert WeightsSpec(repo="org/x").kind == "hub" and WeightsSpec().kind == "bundled"


def test_checkpoint_writes_replace_files_whole(tmp_path: Path) -> None:
    first = hub.save_checkpoint(torch.nn.Linear(2, 3), tmp_path / "ckpt", {"model": "a"})
    second = hub.save_checkpoint(torch.nn.Linear(4, 1), first, {"model": "b"})
    state, config = hub.read_checkpoint(second)
    assert config == {"model": "b"} and state["weight"].shape == (1, 4)
    assert sorted(p.name for p in second.iterdir()) == ["config.json", "model.safetensors"]  # no temp files


def test_create_model_keyword_arguments_keep_or_refuse_the_checkpoint_weights() -> None:
    plain = langseg.create_model("vlt-shapes", pretrained=True)
    tuned = langseg.create_model("vlt-shapes", pretrained=True, dropout=0.1)  # same shapes: same weights
    for (key, a), b in zip(plain.state_dict().items(), tuned.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    with pytest.raises(BadConfigError, match="change the network"):
        langseg.create_model("vlt-shapes", pretrained=True, hidden_dim=48)
