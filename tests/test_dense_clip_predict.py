"""Training-free dense CLIP end to end, offline: open_clip checkpoints by path, prompt ensembles, PAMR,
missing weights, registry names, bad input and the ``langseg segment`` command.

A tiny ViT architecture is registered with open_clip (``open_clip.add_model_config`` on a JSON file in a
tmp dir) and its random weights are written in open_clip's own formats (``torch.save`` state dict as
``.bin``/``.pt``, and ``.safetensors``), so every path below is the one real weights take.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import langseg
from langseg import hub
from langseg.errors import (
    BadConfigError,
    BadDataError,
    BadLabelsError,
    MissingWeightsError,
    UnknownModelError,
)
from langseg.models.dense_clip import DenseCLIP, DenseCLIPModel
from langseg.models.pamr import pamr, pamr_affinity
from langseg.predict.images import CLIP_MEAN, CLIP_STD
from langseg.predict.segmenter import Preprocess, Segmenter, check_templates
from langseg.registry import WeightsSpec, get_model_entry
from langseg.zoo import dense_clip as zoo
from tests.open_clip_helpers import random_state, register_tiny_vit
from tests.test_cli import run_cli

TINY, OTHER = "langseg-test-tiny-vit", "langseg-test-tiny-vit-wide"
LABELS = ["cat", "sofa; couch", "other"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random open_clip checkpoints (``bin``, ``pt``, ``safetensors``) of the architecture ``TINY``."""
    folder = tmp_path_factory.mktemp("open_clip")
    for name, width in ((TINY, 32), (OTHER, 48)):
        register_tiny_vit(folder, name, vision_width=width)
    state = random_state(TINY)
    torch.save(state, folder / "tiny.bin")
    torch.save(state, folder / "tiny.pt")
    save_file(state, str(folder / "tiny.safetensors"))
    return {"bin": folder / "tiny.bin", "pt": folder / "tiny.pt", "safetensors": folder / "tiny.safetensors"}


def tiny_clip(ckpt: dict[str, Path]) -> open_clip.CLIP:
    model = open_clip.create_model(TINY)
    model.load_state_dict(torch.load(ckpt["bin"], weights_only=True))
    return model.eval()


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blocks of colour with noise: edges for PAMR to follow."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    image[:, : width // 2] = (200, 40, 30)
    image[height // 2 :, width // 3 :] = (30, 90, 210)
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def literal_ensemble(model: open_clip.CLIP, labels: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """open_clip's own ``encode_text`` (all 77 positions) per label; normalise, average, normalise by hand."""
    tokenizer = open_clip.get_tokenizer(TINY)
    rows = []
    for label in labels:
        embeddings = model.encode_text(tokenizer([template.replace("{}", label) for template in templates]))
        total = 0
        for e in embeddings:
            total = total + e / e.norm()
        mean = total / len(templates)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


# ------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["bin", "pt", "safetensors"])
def test_local_checkpoint_in_each_open_clip_format_is_loaded_exactly(ckpt, fmt) -> None:
    seg = langseg.load(f"naclip:{TINY}", weights=ckpt[fmt])
    state = torch.load(ckpt["bin"], weights_only=True)
    loaded = seg.model.clip.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert seg.model.dense.visual is seg.model.clip.visual  # one model, shared
    assert seg.preprocess.pad_multiple == 8 and seg.plan.crop == 224 and seg.plan.stride == 112


def test_segment_equals_the_pipeline_written_out(ckpt) -> None:
    """Mask and scores at the original size equal CLIP -> NACLIP block -> 40 x cosine with the template
    ensemble -> max over aliases -> bilinear upsampling -> PAMR -> softmax, computed by hand."""
    seg = langseg.load(f"naclip:{TINY}", weights=ckpt["safetensors"], short_side=0, crop=64)
    image = photo(64, 64)
    result = seg.segment(image, LABELS, keep_scores=True)

    model = tiny_clip(ckpt)
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        patches = F.normalize(DenseCLIP(model, "naclip")(x), dim=1)
        text = literal_ensemble(model, ["cat", "sofa", "couch", "other"], zoo.IMAGENET_TEMPLATES)
        logits = 40 * torch.einsum("bdhw,kd->bkhw", patches, text)
        logits = torch.stack([logits[:, 0], logits[:, 1:3].amax(1), logits[:, 3]], dim=1)
        logits = pamr(
            F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False), x, 10, (8, 16)
        )
        expected = logits[0].softmax(0)
    assert result.mask.shape == (64, 64) and result.labels == ["cat", "sofa", "other"]
    np.testing.assert_allclose(result.scores, expected.numpy(), atol=2e-5)
    assert (result.mask == expected.argmax(0).numpy()).mean() > 0.999
    assert len(np.unique(result.mask)) >= 2  # the random model does not answer one label everywhere


def test_prompt_ensemble_equals_a_literal_loop(ckpt) -> None:
    model = tiny_clip(ckpt).double()
    assert tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES) == zoo.IMAGENET_TEMPLATES
    labels = ["cat", "a very long label " * 20, "猫", "Ünïcödé 🐱"]  # one over the 77-token context
    tokenizer = open_clip.get_tokenizer(TINY)
    dense = DenseCLIPModel(model, "naclip")
    with torch.no_grad():
        seg = Segmenter(dense, tokenizer, templates=zoo.IMAGENET_TEMPLATES, text_batch_size=100)
        ours = seg.encode_prompts(labels)
        assert torch.allclose(ours, literal_ensemble(model, labels, zoo.IMAGENET_TEMPLATES), atol=1e-12)
        mine = ("a {} on a table", "{}")
        assert torch.allclose(
            Segmenter(dense, tokenizer, templates=mine).encode_prompts(labels),
            literal_ensemble(model, labels, mine),
            atol=1e-12,
        )
    for bad in ("a photo", ["no placeholder"], ["{} and {}"], []):
        with pytest.raises(BadConfigError):
            check_templates(bad)


def test_second_call_with_the_same_labels_encodes_no_text(ckpt) -> None:
    seg = langseg.load(f"sclip:{TINY}", weights=ckpt["bin"], crop=64, short_side=0)
    prompts_seen: list[int] = []
    ensemble = seg.encode_prompts
    seg.encode_prompts = lambda labels: prompts_seen.append(len(labels)) or ensemble(labels)
    first = seg.segment(photo(50, 70), LABELS)
    second = seg.segment(photo(60, 40, seed=1), LABELS)
    assert prompts_seen == [4]  # cat, sofa, couch, other: once
    assert first.mask.shape == (50, 70) and second.mask.shape == (60, 40)


# ------------------------------------------------------------------------------- missing weights


def test_offline_missing_weights_is_an_instant_clear_error(ckpt, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:
        langseg.load("naclip-vit-b16")
    assert time.perf_counter() - start < 2.0
    assert "open_clip_pytorch_model.bin" in info.value.message
    assert "timm/vit_base_patch16_clip_224.openai" in info.value.message
    assert str(tmp_path / "empty") in info.value.hint and "weights=PATH" in info.value.hint

    # Not flagged offline but no route to the hub: the probe answers at once, no retries for minutes.
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # nothing listens on port 1
    start = time.perf_counter()
    assert not hub.hub_reachable() and time.perf_counter() - start < 3.5
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(MissingWeightsError, match="cannot be reached"):
        langseg.load("clearclip-vit-b16", cache_dir=tmp_path / "empty")

    # A file in the cache (open_clip's Hugging Face layout) is found without any network.
    snapshot = tmp_path / "hf" / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"x")
    (tmp_path / "hf" / "models--timm--vit_base_patch16_clip_224.openai" / "refs").mkdir()
    (tmp_path / "hf" / "models--timm--vit_base_patch16_clip_224.openai" / "refs" / "main").write_text("abc")
    found = hub.open_clip_checkpoint("ViT-B-16", "openai", tmp_path / "hf")
    assert Path(found) == snapshot / "open_clip_model.safetensors"

    with pytest.raises(MissingWeightsError, match="not found"):
        langseg.load("naclip-vit-b16", weights=tmp_path / "absent.bin")
    with pytest.raises(MissingWeightsError, match="no pretrained tag"):
        langseg.load(f"naclip:{TINY}")


def test_bad_checkpoints_are_clear_errors(ckpt, tmp_path) -> None:
    with pytest.raises(BadDataError, match=OTHER):  # weights of another architecture
        langseg.load(f"naclip:{OTHER}", weights=ckpt["bin"])
    script = tmp_path / "openai.pt"
    with pytest.warns(Warning):  # torch deprecates jit.save; OpenAI's files are still TorchScript
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    with pytest.raises(BadDataError) as info, pytest.warns(UserWarning, match="TorchScript"):
        langseg.load(f"naclip:{TINY}", weights=script)
    assert "TorchScript" in info.value.hint
    with pytest.raises(BadConfigError, match="dtype"):
        langseg.load(f"naclip:{TINY}", weights=ckpt["bin"], dtype="int3")


# ------------------------------------------------------------------------------------ registry


def test_registered_and_resolved_names(ckpt) -> None:
    names = langseg.list_models(family="dense_clip")
    assert {"naclip-vit-b16", "clearclip-vit-b16", "sclip-vit-b16", "maskclip-vit-b16"} <= set(names)
    b16 = get_model_entry("naclip-vit-b16")
    assert b16.weights == WeightsSpec.open_clip("ViT-B-16", "openai")
    # OpenAI weights were trained with QuickGELU
    assert b16.kwargs == {"arch": "ViT-B-16", "mode": "naclip", "quick_gelu": True}
    for name, spec in [
        ("naclip:ViT-L-14/openai", ("naclip", "ViT-L-14", "openai")),
        ("clearclip:ViT-B/16/laion2b_s34b_b88k", ("clearclip", "ViT-B-16", "laion2b_s34b_b88k")),
        (f"maskclip:{TINY}", ("maskclip", TINY, None)),
    ]:
        entry = get_model_entry(name)
        assert entry.name == name and entry.family == "dense_clip" and entry.task == "semantic"
        tag = entry.weights.tag if entry.weights is not None else None
        assert (entry.kwargs["mode"], entry.kwargs["arch"], tag) == spec
    with pytest.raises(UnknownModelError) as info:
        get_model_entry("naclip:ViT-L-41/openai")
    assert "Did you mean" in info.value.hint and "ViT-L-14" in info.value.hint
    with pytest.raises(UnknownModelError) as info:
        get_model_entry("naclip:ViT-B-16/no-such-tag")
    assert "openai" in info.value.hint
    with pytest.raises(BadConfigError, match="timm"):
        get_model_entry("naclip:ViT-B-16-SigLIP/webli")
    with pytest.raises(UnknownModelError):
        get_model_entry("nomode:ViT-B-16/openai")
    net = langseg.create_model(f"sclip:{TINY}")
    assert (
        isinstance(net, DenseCLIP)
        and net.mode == "sclip"
        and net(torch.zeros(1, 3, 16, 24)).shape[-2:] == (2, 3)
    )


# ----------------------------------------------------------------------------------------- PAMR


def literal_pamr(
    logits: torch.Tensor, image: torch.Tensor, iterations: int, dilations: tuple
) -> torch.Tensor:
    """PAMR pixel by pixel in Python (K x H x W logits, C x H x W image), from the paper's definition."""
    channels, height, width = image.shape
    steps = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]

    def at(t: torch.Tensor, c: int, i: int, j: int) -> float:
        return float(t[c, min(max(i, 0), height - 1), min(max(j, 0), width - 1)])

    weights = {}
    for i in range(height):
        for j in range(width):
            kernel = []
            for dy, dx in steps:
                total = 0.0
                for c in range(channels):
                    window = [
                        at(image, c, i + a * d, j + b * d)
                        for d in dilations
                        for a in (-1, 0, 1)
                        for b in (-1, 0, 1)
                    ]
                    sigma = statistics.stdev(window)
                    total += -abs(at(image, c, i, j) - at(image, c, i + dy, j + dx)) / (1e-8 + 0.1 * sigma)
                kernel.append(total / channels)
            top = max(kernel)
            exp = [math.exp(k - top) for k in kernel]
            weights[i, j] = [(dy, dx, e / sum(exp)) for (dy, dx), e in zip(steps, exp, strict=True)]
    mask = logits.clone()
    for _ in range(iterations):
        new = torch.zeros_like(mask)
        for k in range(mask.shape[0]):
            for (i, j), neighbours in weights.items():
                new[k, i, j] = sum(w * at(mask, k, i + dy, j + dx) for dy, dx, w in neighbours)
        mask = new
    return mask


def test_pamr_matches_a_literal_implementation() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 6, 7, generator=gen, dtype=torch.float64)
    image[..., :, 4:] += 1.5  # an edge
    logits = torch.randn(1, 2, 6, 7, generator=gen, dtype=torch.float64)
    ours = pamr(logits, image, iterations=3, dilations=(1, 4))  # 4: neighbours beyond the border
    expected = literal_pamr(logits[0], image[0], 3, (1, 4))
    assert torch.allclose(ours[0], expected, atol=1e-10)
    affinity = pamr_affinity(image, (1, 4))
    assert affinity.shape == (1, 16, 6, 7) and torch.allclose(affinity.sum(1), torch.ones(1, 6, 7).double())
    # Linear in the mask and invariant to per-channel affine changes of the image.
    scaled = pamr(3 * logits, 2 * image + 0.5, iterations=3, dilations=(1, 4))
    assert torch.allclose(scaled, 3 * ours, atol=1e-6)
    assert torch.allclose(pamr(logits.float(), image.float(), 3, (1, 4)).double(), ours, atol=1e-5)
    # Logits at another resolution are resized to the image first.
    small = F.interpolate(logits, size=(3, 4), mode="bilinear", align_corners=False)
    resized = F.interpolate(small, size=(6, 7), mode="bilinear", align_corners=False)
    assert torch.allclose(pamr(small, image, 2, (1,)), pamr(resized, image, 2, (1,)))


def test_refine_hook_runs_at_the_working_resolution(ckpt) -> None:
    seg = langseg.load(f"sclip:{TINY}", weights=ckpt["bin"], crop=64, short_side=40)
    calls = []

    def prefer_last(logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        calls.append((tuple(logits.shape), image is seg._input))
        return logits + 1000 * (torch.arange(logits.shape[1]) == logits.shape[1] - 1).view(1, -1, 1, 1)

    seg.refine = prefer_last
    result = seg.segment(photo(80, 120), ["cat", "dog", "other"])
    assert calls == [((1, 3, 40, 60), True)]  # short side 40: working size 40 x 60
    assert result.mask.shape == (80, 120) and (result.mask == 2).all()


# ------------------------------------------------------------------------------------ bad input


def test_bad_and_extreme_input(ckpt) -> None:
    seg = langseg.load(f"naclip:{TINY}", weights=ckpt["bin"])
    for labels, match in (([], "no labels"), (["cat"], "one label"), (["cat", ""], "empty")):
        with pytest.raises(BadLabelsError, match=match):
            seg.segment(photo(40, 40), labels)
    # Hundreds of labels: two templates (the ensemble is tested above), at the image's own size.
    many = [f"thing number {i}" for i in range(300)]
    two = langseg.load(
        f"naclip:{TINY}", weights=ckpt["bin"], templates=("a photo of a {}.", "a {}"), short_side=0
    )
    result = two.segment(photo(30, 250), many)
    assert result.mask.shape == (30, 250) and result.labels == many and result.mask.max() < 300
    unicode = ["猫", "café", "Ünïcödé 🐱", "other"]
    result = seg.segment(photo(40, 40), unicode, keep_scores=True)
    assert result.labels == unicode and np.allclose(result.scores.sum(0), 1, atol=1e-5)
    embeddings = seg.label_set(unicode).embeddings
    assert (embeddings @ embeddings.T - torch.eye(4)).abs().max() < 1 - 1e-3  # four distinct embeddings
    for size in ((1, 1), (3, 5), (7, 7)):  # smaller than one 8-pixel patch
        tiny = seg.segment(photo(*size), ["cat", "other"], keep_scores=True)
        assert tiny.mask.shape == size and np.allclose(tiny.scores.sum(0), 1, atol=1e-5)


def test_many_labels_on_a_wide_image_upsample_in_narrow_bands(monkeypatch) -> None:
    """Bands shrink so that labels x band x width stays ~2**25 values; the mask is the same."""
    from langseg.predict import segmenter as module

    bands = []
    real = module.upsample_argmax
    monkeypatch.setattr(module, "upsample_argmax", lambda *a, **k: bands.append(a[2]) or real(*a, **k))
    words = F.normalize(torch.randn(400, 3, generator=torch.Generator().manual_seed(0)), dim=1)

    class Model(torch.nn.Module):
        def encode_image(self, x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(x, 4)

        def dense_logits(self, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bdhw,kd->bkhw", f, t)

        def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
            return words[ids]

    tokenize = lambda prompts: torch.tensor([int(p) for p in prompts])  # noqa: E731
    seg = module.Segmenter(Model(), tokenize, preprocess=Preprocess(pad_multiple=4))
    image = photo(6, 3000)
    result = seg.segment(image, [str(i) for i in range(400)])
    assert bands == [(1 << 25) // (400 * 3000)]
    x = seg._input  # the working image: the long side capped at 2048, 4 x 2048
    used = seg.label_set([str(i) for i in range(400)]).embeddings  # words, renormalised (within 1e-7)
    assert torch.allclose(used, words, atol=1e-6) and tuple(x.shape[-2:]) == (4, 2048)
    logits = torch.einsum("bdhw,kd->bkhw", F.avg_pool2d(x, 4), used)
    logits = F.interpolate(logits, size=(4, 2048), mode="bilinear", align_corners=False)  # working size
    full = F.interpolate(logits, size=(6, 3000), mode="bilinear", align_corners=False)[0]
    # 400 unit directions in 3-D leave near-ties (top-2 gaps of 1e-6), which float32 rounding may flip
    # either way: pixels decided by a clear margin must agree, and they are nearly all of them.
    top2 = full.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-4).numpy()
    assert clear.mean() > 0.95
    assert (result.mask == full.argmax(0).numpy())[clear].all()


def test_huge_image_stays_in_memory_bounds(ckpt) -> None:
    seg = langseg.load(f"naclip:{TINY}", weights=ckpt["bin"])
    image = np.zeros((6000, 8000, 3), np.uint8)
    image[:, 4000:] = (10, 200, 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = seg.segment(image, ["cat", "sofa", "other"])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert result.mask.shape == (6000, 8000) and tuple(seg._input.shape[-2:]) == (336, 448)
    assert grown < 2.5e9  # image 144 MB, its float copies in load_image ~1.2 GB, mask 384 MB
    assert (result.mask[:, :3900] == result.mask[0, 0]).all()  # a flat half gets one label


# ------------------------------------------------------------------------------------------ CLI


def test_cli_segment_writes_overlay_and_mask(ckpt, tmp_path, monkeypatch, capsys) -> None:
    Image.fromarray(photo(90, 120)).save(tmp_path / "photo.png")
    args = ["segment", str(tmp_path / "photo.png"), "--model", f"naclip:{TINY}", "--weights", str(ckpt["pt"])]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, *args, "--labels", "cat, sofa; couch,other", "--out", "res")
    assert code == 0, err
    overlay, mask = (
        Image.open(tmp_path / "res/photo.overlay.png"),
        Image.open(tmp_path / "res/photo.mask.png"),
    )
    assert overlay.size == (120, 90) and mask.size == (120, 90) and mask.mode == "P"
    expected = langseg.load(f"naclip:{TINY}", weights=ckpt["pt"]).segment(tmp_path / "photo.png", LABELS)
    assert np.array_equal(np.asarray(mask), expected.mask)
    record = json.loads((tmp_path / "res/photo.json").read_text())
    assert record["labels"] == ["cat", "sofa", "other"] and record["model"] == f"naclip:{TINY}"
    assert all(label in out for label in expected.areas()) and "%" in out

    code, _, err = run_cli(monkeypatch, capsys, *args, "--labels", "cat", "--out", "new")
    assert code == 2 and "one label" in err and "hint:" in err and "Traceback" not in err
    code, _, err = run_cli(
        monkeypatch, capsys, *args, "--labels", "cat,other", "--out", "res"
    )  # outputs exist
    assert code == 2 and "exist already" in err
