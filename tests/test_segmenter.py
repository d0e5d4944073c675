"""Segmenter: labels, caches, aliases, background rule and sizes, with a hand-made colour 'model'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from langseg.errors import BadImageError, BadLabelsError, ImageNotSetError
from langseg.predict import InferencePlan
from langseg.predict.segmenter import Preprocess, Segmenter

# Words -> unit RGB directions: the 'text tower' of a model that classifies pixels by colour.
COLOUR_WORDS = {
    "red": (1, 0, 0),
    "green": (0, 1, 0),
    "blue": (0, 0, 1),
    "crimson": (1, 0, 0.1),
    "background": (0, 1, 0),
}
PLAIN = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class ColourModel(nn.Module):
    """A hand-made dense image-text 'model': pixels are their colour, words are looked up in a table."""

    def __init__(self, words: dict[str, tuple[float, float, float]]) -> None:
        super().__init__()
        self.words = list(words)
        table = F.normalize(torch.tensor(list(words.values()), dtype=torch.float32), dim=-1)
        self.register_buffer("table", table)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([self.words.index(p) for p in prompts])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Features at 1/4 resolution, like a patch-based encoder."""
        return F.avg_pool2d(images, 4)

    def dense_logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return 20 * torch.einsum("bdhw,kd->bkhw", F.normalize(features, dim=1), text)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.table[token_ids]


def colour_segmenter(words: dict[str, tuple[float, float, float]], **kwargs) -> Segmenter:
    model = ColourModel(words)
    return Segmenter(model, model.tokenize, **kwargs)


def make_segmenter(**kwargs) -> Segmenter:
    kwargs.setdefault("preprocess", Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), pad_multiple=4))
    return colour_segmenter(COLOUR_WORDS, **kwargs)


def halves(height: int = 40, width: int = 64) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2, 0] = 220  # red left
    image[:, width // 2 :, 2] = 220  # blue right
    return image


def test_segments_by_closest_label_at_the_original_size() -> None:
    result = make_segmenter().segment(halves(), ["blue", "red", "green"])
    assert result.mask.shape == (40, 64) and result.labels == ["blue", "red", "green"]
    assert (result.mask[:, :28] == 1).all() and (result.mask[:, 36:] == 0).all()
    assert result.areas()["red"] == pytest.approx(0.5, abs=0.05)


def test_text_is_encoded_once_per_label_set_and_image_once_per_image() -> None:
    seg = make_segmenter(plan=InferencePlan(crop=16, stride=8))
    seg.set_image(halves())
    first = seg.segment(labels=["red", "blue"])
    windows = seg.image_encodings
    assert windows > 1 and seg.text_encodings == 1
    second = seg.segment(labels=["red", "blue"])
    assert seg.text_encodings == 1 and seg.image_encodings == windows  # no text, no image work
    assert np.array_equal(first.mask, second.mask)
    seg.segment(labels=["red", "blue", "green"])
    assert seg.text_encodings == 2 and seg.image_encodings == windows  # new labels, same image features
    seg.set_image(halves(48, 48))
    seg.segment(labels=["red", "blue"])
    assert seg.text_encodings == 2 and seg.image_encodings == 2 * windows + (
        seg.image_encodings - 2 * windows
    )


def test_feature_cache_respects_its_budget() -> None:
    seg = make_segmenter(plan=InferencePlan(crop=16, stride=8), feature_cache_bytes=0)
    seg.set_image(halves())
    a = seg.segment(labels=["red", "blue"])
    calls = seg.image_encodings
    b = seg.segment(labels=["red", "blue"])
    assert seg.image_encodings == 2 * calls and np.array_equal(a.mask, b.mask)


def test_aliases_take_the_max_over_synonyms() -> None:
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0], image[..., 2] = 200, 21  # red with a touch of blue: closest to 'crimson'
    seg = make_segmenter()
    with_alias = seg.segment(image, ["red; crimson", "blue"], keep_scores=True)
    alone = seg.segment(image, ["crimson", "blue"], keep_scores=True)
    assert with_alias.labels == ["red", "blue"]
    assert np.allclose(with_alias.scores, alone.scores, atol=1e-6)


def test_background_threshold_assigns_uncertain_pixels() -> None:
    image = np.full((16, 16, 3), 128, np.uint8)
    image[:8, :, :] = (230, 0, 0)  # top half clearly red, bottom half grey: equally far from red and blue
    seg = make_segmenter()
    result = seg.segment(image, ["red", "blue", "background"], background_threshold=0.6, keep_scores=True)
    assert result.scores is not None and np.allclose(result.scores.sum(0), 1, atol=1e-5)
    assert (result.mask[:6] == 0).all() and (result.mask[10:] == 2).all()
    with pytest.raises(BadLabelsError, match="background"):
        seg.segment(image, ["red", "blue"], background_threshold=0.5)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([], "no labels"),
        (["red", "red"], "duplicate"),
        (["red", " ; "], "empty label"),
        ("red", "single string"),
        (["red"], "one label"),
        ([f"red{i}" for i in range(9)], "limit"),
        (["red", 3], "string"),
    ],
)
def test_bad_labels_are_clear_errors(labels, message: str) -> None:
    with pytest.raises(BadLabelsError, match=message) as info:
        make_segmenter(max_labels=8).segment(halves(), labels)
    assert info.value.hint


def test_non_ascii_labels_and_hundreds_of_labels() -> None:
    words = {f"étiquette-{i}-猫": (np.cos(i), np.sin(i), 0.3) for i in range(300)}
    words["rouge"] = (1, 0, 0)

    seg = colour_segmenter(words, preprocess=PLAIN)
    result = seg.segment(halves(), list(words))
    assert result.mask.shape == (40, 64) and len(result.labels) == 301


def test_tiny_and_odd_sized_images() -> None:
    seg = make_segmenter(plan=InferencePlan(crop=16, stride=8))
    tiny = halves(3, 2)  # smaller than one 4-pixel 'patch' and than one window
    assert seg.segment(tiny, ["red", "blue"]).mask.shape == (3, 2)
    odd = halves(37, 51)
    result = seg.segment(odd, ["red", "blue"])
    assert result.mask.shape == (37, 51) and (result.mask[:, :20] == 0).all()


def test_huge_image_runs_at_a_working_resolution() -> None:
    big = np.zeros((6000, 8000, 3), np.uint8)
    big[:, :4000, 0] = 200
    big[:, 4000:, 1] = 200
    seg = make_segmenter(preprocess=Preprocess(short_side=64, mean=(0, 0, 0), std=(1, 1, 1), pad_multiple=4))
    result = seg.segment(big, ["red", "green"])
    assert result.mask.shape == (6000, 8000)
    assert (result.mask[:, :3800] == 0).all() and (result.mask[:, 4200:] == 1).all()


def test_bad_image_is_a_clear_error() -> None:
    with pytest.raises(BadImageError):
        make_segmenter().segment(np.zeros((4, 4, 2), np.uint8), ["red", "blue"])
    with pytest.raises(ImageNotSetError, match="no image"):
        make_segmenter().segment(labels=["red", "blue"])


def test_infer_many_batches_same_sized_images_and_matches_infer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped lseg-shapes network: images of one size share a forward (batch sizes recorded at the
    network), and every image's logits equal its own infer()'s; the image set before stays set."""
    import langseg
    from langseg.data import ShapeWorldConfig, render_scene

    segmenter = langseg.load("lseg-shapes")
    labels = ["red circle", "blue square", "green triangle", "yellow star", "background"]
    sizes = [96, 96, 64, 96, 64, 80]  # two sizes batched (3 and 2 images), one alone
    images = [
        render_scene(
            seed=77, index=i, config=ShapeWorldConfig(size=s, background=("plain", "noise")[i % 2])
        ).image
        for i, s in enumerate(sizes)
    ]
    prepared = [segmenter.prepare(image) for image in images]
    alone = [segmenter.infer(p, labels, None, True) for p in prepared]
    segmenter.set_image(images[0])
    batches: list[int] = []
    encode = segmenter.model.encode_image
    monkeypatch.setattr(segmenter.model, "encode_image", lambda x: batches.append(x.shape[0]) or encode(x))
    together = segmenter.infer_many(prepared, labels, None, True, max_batch=2)
    # flip doubles the calls of each batch; max_batch=2 splits the three 96 px images into 2 + 1
    assert sorted(batches) == sorted([2, 2, 1, 1, 2, 2, 1, 1])
    for one, many, image in zip(alone, together, images, strict=True):
        assert many.image is image and many.labels == one.labels and many.keep_scores
        torch.testing.assert_close(many.logits, one.logits, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(Segmenter.finish(many).mask, Segmenter.finish(one).mask)
    assert segmenter.image is images[0]


def test_infer_many_runs_image_by_image_under_a_sliding_window() -> None:
    segmenter = make_segmenter(plan=InferencePlan(crop=16))
    images = [halves(40, 64), halves(40, 64)[:, ::-1].copy()]
    prepared = [segmenter.prepare(image) for image in images]
    together = segmenter.infer_many(prepared, ["red", "blue"])
    assert segmenter.image_encodings > 2 and not segmenter.is_image_set  # windows, one image at a time
    for image, pending in zip(images, together, strict=True):
        expected = segmenter.segment(image, ["red", "blue"]).mask
        np.testing.assert_array_equal(Segmenter.finish(pending).mask, expected)
    assert (Segmenter.finish(together[0]).mask[:, :20] == 0).all()
    assert (Segmenter.finish(together[1]).mask[:, :20] == 1).all()
