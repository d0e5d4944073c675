"""bf16 that keeps the answer (issue 15, item 2): ``dtype="bfloat16"`` runs the ViT, DPT and head in bf16
and the normalisation, dot product and logit scale in float32.

The agreement test renders a few held-out ShapeWorld scenes (world seed 7, which no recipe trains on)
and compares the bundled ``lseg-shapes`` in bf16 with float32; ``benchmarks/bf16_agreement.py`` measures
the same on 72 scenes and on a random-weight ViT-B/32 (run with ``-s`` to see the figures here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import langseg
from langseg.data import ShapeWorldConfig, label_names, render_scene
from langseg.errors import BadConfigError
from langseg.models.lseg import LSegNet

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 7


@pytest.fixture(scope="module")
def scenes() -> list:
    """Nine small held-out scenes: 64 and 128 px over the three backgrounds."""
    return [
        render_scene(SEED, index, ShapeWorldConfig(size=(64, 128)[index % 2], background=background))
        for background in ("plain", "noise", "texture")
        for index in range(3)
    ]


def _miou(masks: list[np.ndarray], truths: list[np.ndarray], num_classes: int) -> float:
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for mask, truth in zip(masks, truths, strict=True):
        for k in np.union1d(np.unique(mask), np.unique(truth)):
            inter[k] += np.logical_and(mask == k, truth == k).sum()
            union[k] += np.logical_or(mask == k, truth == k).sum()
    return float(np.mean(inter[union > 0] / union[union > 0]))


def test_lseg_shapes_bf16_keeps_the_argmax_and_the_miou(scenes: list) -> None:
    labels = label_names(ShapeWorldConfig(), "colour_shape")
    fp32, bf16 = langseg.load("lseg-shapes"), langseg.load("lseg-shapes", dtype="bfloat16")
    assert bf16.model.net.image_dtype == torch.bfloat16 and bf16.model.net.score_dtype == torch.float32
    masks32 = [fp32.segment(scene.image, labels).mask for scene in scenes]
    masks16 = [bf16.segment(scene.image, labels).mask for scene in scenes]
    truths = [scene.semantic_map("colour_shape") for scene in scenes]
    same = sum(int((a == b).sum()) for a, b in zip(masks16, masks32, strict=True))
    agreement = 100 * same / sum(m.size for m in masks32)
    miou32, miou16 = _miou(masks32, truths, len(labels)), _miou(masks16, truths, len(labels))
    print(
        f"lseg-shapes bf16 vs fp32 on {len(scenes)} scenes: argmax agreement {agreement:.3f} %, "
        f"mIoU {miou16:.4f} vs {miou32:.4f} ({100 * (miou16 - miou32):+.2f} points)"
    )
    assert agreement >= 99.5
    assert abs(miou16 - miou32) <= 0.002
    assert miou32 >= 0.80  # the scenes are real work: a model that outputs nothing would agree too


def _image(scene) -> torch.Tensor:
    """``1 x 3 x 128 x 128`` normalised as LSeg expects (mean = std = 0.5)."""
    x = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255
    return F.interpolate((x - 0.5) / 0.5, size=(128, 128), mode="bilinear", align_corners=False)


def test_bf16_plan_normalises_and_scores_in_float32(scenes: list) -> None:
    fp32 = langseg.load("lseg-shapes").model
    net = langseg.load("lseg-shapes", dtype="bfloat16").model.net
    assert net.head.weight.dtype == net.decoder.proj[0].weight.dtype == torch.bfloat16
    # The logit scale is the float32 one, not bf16's rounding of it.
    assert net.logit_scale.dtype == torch.float32
    assert_close(net.logit_scale.exp(), fp32.net.logit_scale.exp(), rtol=1e-7, atol=0)
    x = _image(scenes[0])
    text = torch.randn(5, net.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        # The head runs before the decoder's last x2 upsampling (they commute; see LSegNet.encode_image).
        maps = net.reassemble(*net.encoder(x.to(torch.bfloat16)))
        head = net.head(net.decoder(maps, upsample_last=False))
        features = net.encode_image(x)
        logits = net.classify(features, text)
    assert head.dtype == torch.bfloat16 and features.dtype == logits.dtype == torch.float32
    # Cast to float32 before anything else: upsampling, norms and dot products are float32 (in bf16
    # the unit norms would miss by ~1e-3).
    assert torch.equal(features, head.float())
    # The logits are the literal float64 computation from the same features (upsample x2, normalise,
    # scaled dot product, upsample x2), to float32 precision.
    pixels = F.interpolate(features.double(), scale_factor=2, mode="bilinear", align_corners=True)
    expected = fp32.net.logit_scale.double().exp() * torch.einsum(
        "bdhw,kd->bkhw", F.normalize(pixels, dim=1), F.normalize(text.double(), dim=1)
    )
    expected = F.interpolate(expected, scale_factor=2, mode="bilinear", align_corners=True)
    assert_close(logits.double(), expected, rtol=0, atol=2e-5)


def _official_order(net: LSegNet, x: torch.Tensor) -> torch.Tensor:
    """LSeg's pixel embeddings with the official order of operations: every fusion block upsamples
    before its 1x1 out_conv, and the 1x1 head runs on the upsampled H/2 map."""
    decoder = net.decoder
    levels = [proj(m) for proj, m in zip(decoder.proj, net.reassemble(*net.encoder(x)), strict=True)]
    path = None
    for i in (3, 2, 1, 0):
        block = decoder.fusion[i]
        path = levels[i] if path is None else path + block.skip_unit(levels[i])
        path = F.interpolate(block.unit(path), scale_factor=2, mode="bilinear", align_corners=True)
        path = block.out_conv(path)
    return F.normalize(net.head(path), dim=1)


def test_float32_plan_matches_the_official_order_of_operations(scenes: list) -> None:
    net = langseg.load("lseg-shapes").model.net
    assert net.set_precision(torch.float32) is net
    x, text = _image(scenes[1]), torch.randn(4, net.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        pixels = _official_order(net, x)
        old = net.logit_scale.exp() * torch.einsum("bdhw,kd->bkhw", pixels, F.normalize(text, dim=1))
        old = F.interpolate(old, scale_factor=2, mode="bilinear", align_corners=True)
        new = net(x, text)
    # The 1x1 convolutions run before the upsampling they commute with: equal to float rounding.
    assert_close(net.pixel_embeddings(net.encode_image(x)), pixels, rtol=0, atol=2e-6)
    assert_close(new, old, rtol=0, atol=2e-5)


def test_set_precision_keeps_the_named_parts_in_float32() -> None:
    net = langseg.create_model("lseg-tiny").eval()
    mixed = net.set_precision(torch.bfloat16, float32_parts=("decoder", "head"))
    dtypes = {part: next(getattr(mixed, part).parameters()).dtype for part in ("encoder", "reassemble")}
    assert dtypes == {"encoder": torch.bfloat16, "reassemble": torch.bfloat16}
    assert mixed.decoder.proj[0].weight.dtype == mixed.head.weight.dtype == torch.float32
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits = mixed(x, torch.randn(3, 32))
    assert logits.dtype == torch.float32 and logits.shape == (1, 3, 64, 64)
    with pytest.raises(BadConfigError, match="unknown LSeg parts"):
        LSegNet.set_precision(mixed, torch.bfloat16, float32_parts=("text",))
