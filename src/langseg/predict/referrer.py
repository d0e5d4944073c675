"""``Referrer``: referring segmentation of one image with free-form expressions.

The predictor owns everything around a referring model (VLT): loading the image, letterboxing it to the
model's square input (the official loader's scheme: scale to fit, centre, pad with grey 0.5), pixel
normalisation, tokenisation and its checks, caching the image features across expressions, and mapping
the mask back to the original size: bilinear resize of the logits to the input, crop the letterbox,
resize to the image, sigmoid, threshold 0.35. The official evaluation resizes the sigmoid
probabilities instead (``upsample="probability"``); a network trained with its loss on upsampled logits
(``loss_resolution: input``) draws its edges where the *logits* cross; resizing its probabilities
instead swells every mask by a fraction of an output cell, which on vlt-shapes (output stride 2, objects
a few pixels across) cost 14 points of held-out mean IoU (0.712 against 0.854, docs/vlt.md).

The model side is two callables, as for the :class:`~langseg.predict.segmenter.Segmenter`:

- ``encode_image(images: 1 x 3 x S x S) -> features`` (any object; cached per image), and
- ``decode(features, token_ids: B x L, token_mask: B x L) -> B x 1 x h x w`` logits.

Expressions: an empty one (or one without any letters, e.g. only digits or emoji) raises
:class:`BadExpressionError`. Words the vocabulary does not know become ``<unk>`` and never fail; when
no word is both known and meaningful (only function words such as "the", or only unknown words, e.g. a
sentence in another language), the model still runs, because a mask is still its best guess, but an
:class:`ExpressionWarning` says the mask is unreliable. Expressions longer than the tokenizer's limit
(VLT: 15 words) are truncated with an :class:`ExpressionWarning` naming the limit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from langseg.errors import BadConfigError, BadExpressionError, BadImageError
from langseg.models.vocab import STOP_WORDS, Tokenizer, split_words
from langseg.predict.images import ImageInput, load_image
from langseg.predict.results import ReferringResult

THRESHOLD = 0.35  # official `segment_thresh`
UPSAMPLE = ("logits", "probability")


class ExpressionWarning(UserWarning):
    """An expression was truncated, or holds no word the model can use."""


@dataclass(frozen=True)
class Letterbox:
    """How an image becomes the model's square input.

    Attributes:
        mean, std: normalisation of RGB in [0, 1] (VLT's Darknet: none, i.e. 0 and 1).
        pad_value: grey level of the padding, in [0, 1] before normalisation (official 0.5).
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pad_value: float = 0.5


@dataclass(frozen=True)
class Placement:
    """Where the resized image sits in the ``size x size`` input: ``(dx, dy)`` offset, ``nw x nh`` size."""

    size: int
    width: int
    height: int
    nw: int
    nh: int
    dx: int
    dy: int

    @classmethod
    def fit(cls, width: int, height: int, size: int) -> Placement:
        """Official: ``scale = min(S/w, S/h)``, ``nw = int(w * scale)``, centred with floor offsets."""
        scale = min(size / width, size / height)
        nw, nh = max(1, int(width * scale)), max(1, int(height * scale))
        return cls(size, width, height, nw, nh, (size - nw) // 2, (size - nh) // 2)


class Referrer:
    """Segment the object an expression refers to.

    Args:
        encode_image, decode: the model (see module docstring).
        tokenizer: turns expressions into ids (:class:`langseg.models.vocab.Vocab` for VLT's GRU).
        input_size: the model's square input side ``S``.
        letterbox: normalisation and padding.
        device: where the model runs.
        threshold: foreground when the sigmoid probability exceeds it (official 0.35).
        upsample: what is resized to the image, ``"logits"`` (default) or ``"probability"`` (official).
    """

    def __init__(
        self,
        encode_image: Callable[[torch.Tensor], Any],
        decode: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor],
        tokenizer: Tokenizer,
        input_size: int,
        letterbox: Letterbox | None = None,
        device: str | torch.device = "cpu",
        threshold: float = THRESHOLD,
        upsample: str = "logits",
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise BadExpressionError(f"threshold must be in (0, 1), got {threshold}", hint="VLT uses 0.35.")
        if upsample not in UPSAMPLE:
            raise BadConfigError(f"unknown upsample {upsample!r}", hint=f"Use one of {UPSAMPLE}.")
        self.upsample = upsample
        self.encode_image, self.decode, self.tokenizer = encode_image, decode, tokenizer
        self.input_size = int(input_size)
        self.letterbox = letterbox or Letterbox()
        self.device = torch.device(device)
        self.threshold = threshold
        self._image: np.ndarray | None = None
        self._input: torch.Tensor | None = None
        self._placement: Placement | None = None
        self._features: Any = None
        self.image_encodings = 0  # encode_image calls, for tests and benchmarks

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Tokenizer, **kwargs: Any) -> Referrer:
        """A Referrer over a network with encode_image, decode and input_size (VLT); sets eval mode."""
        device = torch.device(kwargs.get("device", "cpu"))
        model = model.to(device).eval()
        return cls(model.encode_image, model.decode, tokenizer, model.input_size, **kwargs)

    # ------------------------------------------------------------------ image side

    def set_image(self, image: ImageInput) -> None:
        """Load and letterbox ``image``; later :meth:`refer` calls without an image reuse its features."""
        self._image = load_image(image)
        height, width = self._image.shape[:2]
        self._placement = Placement.fit(width, height, self.input_size)
        self._input = self._prepare(self._image, self._placement)
        self._features = None

    def _prepare(self, image: np.ndarray, place: Placement) -> torch.Tensor:
        """``1 x 3 x S x S`` normalised input: the image resized (bicubic, as official) and centred."""
        resized = np.array(Image.fromarray(image).resize((place.nw, place.nh), Image.BICUBIC))
        box = self.letterbox
        canvas = torch.full((3, place.size, place.size), box.pad_value, device=self.device)
        pixels = (
            torch.from_numpy(np.ascontiguousarray(resized)).to(self.device).permute(2, 0, 1).float() / 255.0
        )
        canvas[:, place.dy : place.dy + place.nh, place.dx : place.dx + place.nw] = pixels
        mean = torch.tensor(box.mean, device=self.device).view(3, 1, 1)
        std = torch.tensor(box.std, device=self.device).view(3, 1, 1)
        return ((canvas - mean) / std)[None]

    def _image_features(self) -> Any:
        if self._features is None:
            self._features = self.encode_image(self._input)
            self.image_encodings += 1
        return self._features

    # ------------------------------------------------------------------ text side

    def check_expression(self, text: Any) -> str:
        """``text`` if it can be segmented; raises :class:`BadExpressionError`, warns as documented."""
        if not isinstance(text, str):
            raise BadExpressionError(f"an expression must be a string, got {type(text).__name__}")
        if not text.strip():
            raise BadExpressionError("the expression is empty")
        words = split_words(text)
        if not words:
            raise BadExpressionError(f"the expression {text!r} contains no words (letters)")
        limit, needed = self.tokenizer.max_tokens, self.tokenizer.count(text)
        if needed > limit:
            warnings.warn(
                f"the expression has {needed} tokens; only the first {limit} are used (the model's limit of "
                f"{limit} tokens): {text!r}",
                ExpressionWarning,
                stacklevel=4,
            )
        used = words[:limit]
        if not any(w not in STOP_WORDS and self.tokenizer.is_known(w) for w in used):
            unknown = [w for w in used if not self.tokenizer.is_known(w)]
            reason = (
                "none of its words is in the model's vocabulary"
                if len(unknown) == len(used)
                else "it holds only function words or words the model does not know"
            )
            warnings.warn(
                f"the expression {text!r} names nothing the model knows ({reason}); the mask is a guess",
                ExpressionWarning,
                stacklevel=4,
            )
        return text

    # ------------------------------------------------------------------ referring

    def refer(
        self, image: ImageInput | str | None = None, text: str | None = None, keep_probability: bool = False
    ) -> ReferringResult:
        """Mask of the object ``text`` refers to in ``image`` (or in the image given to :meth:`set_image`).

        ``refer(image, text)``, ``refer(text)`` after :meth:`set_image`, or ``refer(text=...)``: a single
        string argument is the expression, never an image path.

        Returns:
            :class:`ReferringResult` at the original size: ``mask`` (probability > threshold) and
            ``score``, the mean foreground probability over the mask (how sure the model is of the pixels
            it chose; the maximum probability when the mask is empty, which is then below the threshold).
            ``probability`` (``H x W`` float32) only with ``keep_probability``.
        """
        if text is None and isinstance(image, str):
            image, text = None, image
        return self.refer_all(image, [text], keep_probability=keep_probability)[0]  # type: ignore[list-item]

    @torch.inference_mode()
    def refer_all(
        self, image: ImageInput | None, texts: Sequence[str], keep_probability: bool = False
    ) -> list[ReferringResult]:
        """One result per expression in ``texts``, decoded in one batch over one image encoding."""
        if isinstance(texts, str) or len(texts) == 0:
            raise BadExpressionError("texts must be a non-empty list of expressions")
        checked = [self.check_expression(t) for t in texts]
        if image is not None:
            self.set_image(image)
        if self._input is None or self._image is None or self._placement is None:
            raise BadImageError("no image to segment", hint="Pass an image, or call set_image() first.")
        ids, mask = self.tokenizer.encode_batch(checked)
        logits = self.decode(self._image_features(), ids.to(self.device), mask.to(self.device))
        probabilities = self._to_image(logits.float()[:, 0], self._placement, self.upsample)
        results = []
        for text, prob in zip(checked, probabilities, strict=True):
            fg = prob > self.threshold
            score = prob[fg].mean() if fg.any() else prob.max()
            results.append(
                ReferringResult(
                    mask=fg.cpu().numpy(),
                    score=float(score),
                    text=text,
                    image=self._image,
                    probability=prob.cpu().numpy() if keep_probability else None,
                )
            )
        return results

    @staticmethod
    def _to_image(logits: torch.Tensor, place: Placement, upsample: str = "logits") -> torch.Tensor:
        """``B x h x w`` output-grid logits -> ``B x H x W`` foreground probability at the original image
        size, resizing the logits (``upsample="logits"``) or their sigmoid (``"probability"``)."""
        values = logits if upsample == "logits" else torch.sigmoid(logits)
        full = F.interpolate(values[:, None], size=(place.size,) * 2, mode="bilinear", align_corners=False)
        crop = full[..., place.dy : place.dy + place.nh, place.dx : place.dx + place.nw]
        out = F.interpolate(crop, size=(place.height, place.width), mode="bilinear", align_corners=False)
        out = out[:, 0]
        return torch.sigmoid(out) if upsample == "logits" else out.clamp(0.0, 1.0)
