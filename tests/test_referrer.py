"""Referrer and vocabulary: tokenisation, letterboxing, one image encoding, bad input, checkpoints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import langseg
from langseg.errors import (
    BadConfigError,
    BadDataError,
    BadExpressionError,
    ImageNotSetError,
    MissingWeightsError,
)
from langseg.models.vlt import vlt_tiny
from langseg.predict.letterbox import Placement
from langseg.predict.referrer import ExpressionWarning, Letterbox, Referrer, foreground_probability
from langseg.predict.tokenizers import (
    PAD_ID,
    UNK_ID,
    ClipTokenizer,
    Vocab,
    split_words,
    tokenizer_from_config,
)
from langseg.zoo.vlt import save_vlt

CORPUS = ["the red circle on the left", "the large blue square", "the star above the red circle"]


pytestmark = pytest.mark.usefixtures("one_thread")


class RedModel(torch.nn.Module):
    """A hand-made 'model': foreground where the input is red, at half resolution (output stride 2)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = 20 * (features[:, :1] - features[:, 2:3]) - 5  # red ~ +12, grey padding -5, blue -22
        return F.avg_pool2d(logits, 2).expand(ids.shape[0], -1, -1, -1)


def red_referrer(input_size: int = 32) -> Referrer:
    return Referrer(RedModel(input_size), Vocab.build(CORPUS))


def red_left(height: int = 40, width: int = 100) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width * 3 // 10, 0] = 220
    image[:, width * 3 // 10 :, 2] = 220
    return image


# --------------------------------------------------------------------------- vocabulary


def test_vocab_build_encode_truncate_and_json_round_trip(tmp_path: Path) -> None:
    vocab = Vocab.build(CORPUS)
    assert vocab.itos[:4] == ["<pad>", "<unk>", "the", "circle"]  # by count, ties alphabetically
    assert len(vocab) == 2 + len(set(split_words(" ".join(CORPUS))))
    assert split_words("The RED-circle, on the left!") == ["the", "red", "circle", "on", "the", "left"]
    assert vocab.encode("The zebra") == [vocab.stoi["the"], UNK_ID]
    ids, mask = vocab.encode_batch(["the red circle", "star"])
    assert ids.shape == (2, 3) and ids[1, 1:].tolist() == [PAD_ID, PAD_ID]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    long = " ".join(["red"] * 20)
    assert len(vocab.encode(long)) == 15 and vocab.count(long) == 20
    assert len(Vocab.build(CORPUS, max_tokens=4).encode(long)) == 4
    loaded = Vocab.load(vocab.save(tmp_path / "vocab.json"))
    assert loaded.itos == vocab.itos and loaded.max_tokens == 15
    assert torch.equal(loaded.encode_batch(CORPUS)[0], vocab.encode_batch(CORPUS)[0])
    assert vocab.decode(vocab.encode("the red zebra")) == "the red <unk>"
    assert isinstance(tokenizer_from_config(json.loads((tmp_path / "vocab.json").read_text())), Vocab)
    clip = tokenizer_from_config(ClipTokenizer("ViT-B-32").to_config())
    assert isinstance(clip, ClipTokenizer) and clip.max_tokens == 77
    with pytest.raises(BadDataError):
        tokenizer_from_config({"kind": "bert"})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BadDataError):
        Vocab.load(tmp_path / "bad.json")


# --------------------------------------------------------------------------- predictor


def test_letterbox_maps_the_mask_back_to_the_original_size() -> None:
    place = Placement.fit(100, 40, 32)
    assert (place.nw, place.nh, place.dx, place.dy) == (32, 12, 0, 10)  # official: int(), centred
    ref = red_referrer()
    result = ref.refer(red_left(), "the red circle")
    assert result.mask.shape == (40, 100) and result.mask.dtype == bool
    assert result.mask[:, :27].all() and not result.mask[:, 33:].any()
    # The score is the mean probability over the mask: high for a confident red region (its blurred
    # edge, after stride-2 output and two resizes, keeps it below 1).
    assert 0.85 < result.score < 1.0 and result.text == "the red circle"
    kept = ref.refer(red_left(), "the red circle", keep_scores=True)
    assert kept.scores.shape == (40, 100)
    assert kept.score == pytest.approx(float(kept.scores[kept.mask].mean()), abs=1e-6)
    # Tall images are padded left and right instead.
    tall = ref.refer(red_left(90, 30).transpose(1, 0, 2).copy(), "the red circle")
    assert tall.mask.shape == (30, 90)


def test_logits_or_probabilities_are_resized_to_the_image() -> None:
    # A 2 x 2 output grid, background logit -2 left and foreground 12 right, resized to 4 x 4 without a
    # letterbox. Bilinear (align_corners=False) samples the columns at -0.25, 0.25, 0.75 and 1.25 grid
    # cells: weights (1, 0), (3/4, 1/4), (1/4, 3/4), (0, 1) on (left, right).
    logits = torch.tensor([[[-2.0, 12.0], [-2.0, 12.0]]])
    place = Placement(4, 4, 4, 4, 4, 0, 0)
    sig = torch.sigmoid
    by_logits = sig(torch.tensor([-2.0, 1.5, 8.5, 12.0]))
    left, right = sig(torch.tensor(-2.0)), sig(torch.tensor(12.0))
    by_probability = torch.stack([left, 0.75 * left + 0.25 * right, 0.25 * left + 0.75 * right, right])
    got = foreground_probability(logits, place)
    assert torch.allclose(got[0], by_logits.expand(4, 4), atol=1e-6)
    official = foreground_probability(logits, place, "probability")
    assert torch.allclose(official[0], by_probability.expand(4, 4), atol=1e-6)
    # The second column is foreground (> 0.35) only when the logits are resized: 0.82 against 0.34.
    assert (got[0, 0] > 0.35).tolist() == [False, True, True, True]
    assert (official[0, 0] > 0.35).tolist() == [False, False, True, True]
    with pytest.raises(BadConfigError, match="upsample"):
        Referrer(RedModel(32), Vocab.build(CORPUS), upsample="nearest")


def test_empty_mask_scores_its_best_pixel() -> None:
    ref = red_referrer()
    blue = np.zeros((20, 20, 3), np.uint8)
    blue[..., 2] = 200
    result = ref.refer(blue, "the red circle", keep_scores=True)
    assert not result.mask.any() and result.score == pytest.approx(float(result.scores.max()))
    assert result.score < 0.35


def test_image_is_encoded_once_for_many_expressions() -> None:
    ref = red_referrer()
    ref.set_image(red_left())
    first = ref.refer("the red circle")
    ref.refer(text="the large blue square")
    results = ref.refer_all(None, ["the star", "the circle on the left", "the red circle"])
    assert ref.image_encodings == 1 and len(results) == 3
    assert np.array_equal(results[2].mask, first.mask)
    ref.refer(red_left(), "the red circle")  # a new image is a new encoding
    assert ref.image_encodings == 2


def test_bad_expressions() -> None:
    ref = red_referrer()
    ref.set_image(red_left())
    for bad in ("", "   ", "?!", "123 456", "🔵🔴"):
        with pytest.raises(BadExpressionError) as info:
            ref.refer(bad)
        assert info.value.hint
    with pytest.raises(BadExpressionError, match="string"):
        ref.refer(text=42)  # type: ignore[arg-type]
    with pytest.raises(ImageNotSetError, match="no image"):
        red_referrer().refer("the red circle")
    with pytest.warns(ExpressionWarning, match="limit of 15"):
        result = ref.refer(" ".join(["the red circle"] * 7))
    assert result.mask.shape == (40, 100)
    with pytest.warns(ExpressionWarning, match="function words"):
        ref.refer("the one on the")
    for foreign in ("le grand cercle à gauche", "左边的大圆", "der rote Kreis"):
        with pytest.warns(ExpressionWarning, match="vocabulary"):
            assert ref.refer(foreign).mask.shape == (40, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary expression with an unknown word is not a warning
        ref.refer("the red zebra")


def test_checkpoint_round_trip_through_the_hub(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vocab = Vocab.build(CORPUS)
    model = vlt_tiny(text={"kind": "gru", "vocab_size": len(vocab), "word_dim": 32, "hidden_dim": 32})
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    image = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    original = Referrer(model, vocab, letterbox=Letterbox())
    expected = original.refer(image, "the red circle", keep_scores=True)
    folder = save_vlt(model, vocab, tmp_path / "ckpt", "vlt-tiny")
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == "vlt-tiny" and config["tokenizer"]["words"] == vocab.itos[2:]
    for loaded in (langseg.load(folder), langseg.load("vlt-tiny", weights=folder / "model.safetensors")):
        assert isinstance(loaded, Referrer)
        got = loaded.refer(image, "the red circle", keep_scores=True)
        assert np.allclose(got.scores, expected.scores, atol=1e-6)
        assert np.array_equal(got.mask, expected.mask) and got.score == pytest.approx(expected.score)
    with pytest.raises(MissingWeightsError, match="no published weights"):
        langseg.load("vlt-tiny")
    config["tokenizer"]["words"] += [f"word{i}" for i in range(5)]  # ids the embedding table lacks
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadDataError, match="vocabulary has"):
        langseg.load(folder)
    del config["tokenizer"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadDataError, match="tokenizer"):
        langseg.load(folder)


def test_infer_many_batches_images_and_matches_infer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped vlt-shapes network: images go through encode_image up to max_batch at a time and
    decode as image-expression pairs; every image's logits equal its own infer()'s (to batched-kernel
    rounding), masks identical; the image set before stays set."""
    from langseg.data import ShapeWorldConfig, render_scene

    referrer = langseg.load("vlt-shapes")
    texts = ["the large circle on the left", "the red square", "the blue shape"]
    sizes = [96, 128, 64, 128, 80]  # letterboxed to one input size: any sizes batch together
    images = [
        render_scene(
            seed=91, index=i, config=ShapeWorldConfig(size=s, background=("plain", "noise", "texture")[i % 3])
        ).image
        for i, s in enumerate(sizes)
    ]
    prepared = [referrer.prepare(image) for image in images]
    alone = [referrer.infer(p, texts, keep_scores=True) for p in prepared]
    referrer.set_image(images[0])
    batches: list[int] = []
    encode = referrer.model.encode_image
    monkeypatch.setattr(referrer.model, "encode_image", lambda x: batches.append(x.shape[0]) or encode(x))
    together = referrer.infer_many(prepared, texts, keep_scores=True, max_batch=2)
    assert batches == [2, 2, 1]
    for one, many, image in zip(alone, together, images, strict=True):
        assert many.image is image and many.texts == one.texts and many.placement == one.placement
        assert many.logits.shape == one.logits.shape == (3, *one.logits.shape[1:])
        torch.testing.assert_close(many.logits, one.logits, atol=1e-4, rtol=1e-4)
        for a, b in zip(Referrer.finish(many), Referrer.finish(one), strict=True):
            np.testing.assert_array_equal(a.mask, b.mask)
    assert referrer.image is images[0]
