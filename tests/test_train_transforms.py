"""Train-time augmentation, batching and normalisation on the shared sample dicts."""

from __future__ import annotations

import pytest
import torch

from langseg.data import ShapeWorldConfig, ShapeWorldReferring, ShapeWorldSemantic
from langseg.errors import BadDataError
from langseg.train.config import CLIP_MEAN, CLIP_STD
from langseg.train.transforms import (
    AugmentedDataset,
    TrainTransform,
    collate,
    hflip_sample,
    normalize,
    pad_crop_sample,
    sample_generator,
    scale_sample,
    swap_left_right,
)

WORLD = ShapeWorldConfig(size=32)


def semantic_sample() -> dict:
    return ShapeWorldSemantic(1, seed=0, config=WORLD, granularity="colour")[0]


def test_crop_padding_is_255_for_semantic_masks_and_false_for_referring() -> None:
    sample = semantic_sample()
    out = pad_crop_sample(sample, (40, 24), top=0, left=5)
    assert out["image"].shape == (3, 40, 24) and out["mask"].shape == (40, 24)
    # Height 32 is padded at the bottom to 40; the width 32 leaves room, and the crop starts at column 5.
    assert torch.equal(out["image"][:, :32], sample["image"][:, :, 5:29])
    assert torch.equal(out["mask"][:32], sample["mask"][:, 5:29])
    assert (out["mask"][32:] == 255).all() and (out["image"][:, 32:] == 0).all()
    assert out["mask"].dtype == torch.int64 and out["image"].dtype == torch.uint8

    referring = {"image": sample["image"], "mask": sample["mask"] > 0, "text": "x", "meta": {}}
    out = pad_crop_sample(referring, (36, 36), top=0, left=0)
    assert out["mask"].dtype == torch.bool and not out["mask"][32:].any() and not out["mask"][:, 32:].any()
    with pytest.raises(ValueError):
        pad_crop_sample(sample, (16, 16), top=20, left=0)


def test_transform_shrinks_then_pads_with_ignore() -> None:
    sample = semantic_sample()
    transform = TrainTransform(crop_size=32, scale_range=(0.5, 0.5), hflip=False)
    out = transform(sample, torch.Generator().manual_seed(0))
    assert out["image"].shape == (3, 32, 32)
    # Shrunk to 16x16, so there is no room to move: the content is top-left and the rest is padding.
    assert (out["mask"][16:] == 255).all() and (out["mask"][:, 16:] == 255).all()
    assert (out["mask"][:16, :16] != 255).all()
    assert torch.equal(out["mask"][:16, :16], scale_sample(sample, 0.5)["mask"])
    # Nearest resizing never invents classes.
    assert set(out["mask"][:16, :16].unique().tolist()) <= set(sample["mask"].unique().tolist())


def test_swap_left_right_words() -> None:
    assert swap_left_right("the circle on the left") == "the circle on the right"
    assert swap_left_right("the red square right of the blue star") == "the red square left of the blue star"
    assert swap_left_right("Left, RIGHT and leftmost") == "Right, LEFT and rightmost"
    assert swap_left_right("a bright leftover at the top") == "a bright leftover at the top"


def test_hflip_swaps_text_and_mirrors_the_mask() -> None:
    dataset = ShapeWorldReferring(20, seed=0, config=ShapeWorldConfig(size=64))
    sample = next(s for s in (dataset[i] for i in range(len(dataset))) if s["text"].endswith("on the left"))
    flipped = hflip_sample(sample)
    assert flipped["text"] == sample["text"][: -len("left")] + "right"
    assert torch.equal(flipped["mask"], sample["mask"].flip(-1))
    assert torch.equal(flipped["image"], sample["image"].flip(-1))
    # The target was the leftmost object; after the flip it lies in the right half, as the text now says.
    cols = flipped["mask"].nonzero()[:, 1].float()
    assert cols.mean() > 32
    assert sample["text"].endswith("left")  # the input is not modified


def test_random_flip_of_referring_samples_keeps_text_and_mask_consistent() -> None:
    sample = next(s for s in ShapeWorldReferring(10, seed=0, config=WORLD) if "left" in s["text"])
    transform = TrainTransform(crop_size=None, scale_range=(1.0, 1.0), hflip=True)
    flips = 0
    for seed in range(12):
        out = transform(sample, torch.Generator().manual_seed(seed))
        flipped = out["text"] != sample["text"]
        flips += flipped
        expected = hflip_sample(sample) if flipped else sample
        assert out["text"] == expected["text"] and torch.equal(out["mask"], expected["mask"])
        assert torch.equal(out["image"], expected["image"]) and out["mask"].dtype == torch.bool
    assert 0 < flips < 12


def test_augmentation_depends_only_on_seed_epoch_and_index() -> None:
    base = ShapeWorldSemantic(4, seed=0, config=WORLD)
    transform = TrainTransform(crop_size=24, scale_range=(0.5, 2.0), hflip=True)
    a, b = AugmentedDataset(base, transform, seed=3), AugmentedDataset(base, transform, seed=3)
    for i in (2, 0, 3):  # any access order
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
    first = a[1]
    a.set_epoch(1)
    assert not torch.equal(a[1]["image"], first["image"])  # a fresh draw per epoch
    assert a[1]["image"].shape == (3, 24, 24)
    g1, g2 = sample_generator(0, 0, 5), sample_generator(0, 0, 5)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_collate_stacks_tensors_and_lists_the_rest() -> None:
    dataset = ShapeWorldReferring(2, seed=0, config=WORLD)
    batch = collate([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert batch["mask"].dtype == torch.bool
    assert batch["text"] == [dataset[0]["text"], dataset[1]["text"]]
    assert isinstance(batch["meta"], list) and len(batch["meta"]) == 2
    semantic = collate([semantic_sample(), semantic_sample()])
    assert semantic["labels"][0] == semantic["labels"][1] and len(semantic["labels"]) == 2
    with pytest.raises(BadDataError, match="different shapes"):
        collate([semantic_sample(), pad_crop_sample(semantic_sample(), (16, 16), 0, 0)])


def test_normalize_uses_clip_statistics() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 1, 2)
    out = normalize(images, CLIP_MEAN, CLIP_STD)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 1, 2)
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-CLIP_MEAN[c] / CLIP_STD[c], rel=1e-6)
        assert out[1, c, 0, 1].item() == pytest.approx((1 - CLIP_MEAN[c]) / CLIP_STD[c], rel=1e-6)
