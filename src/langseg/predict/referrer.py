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

The model is an ``nn.Module`` (:class:`~langseg.models.vlt.VLT`) with an ``input_size`` ``S`` and:

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
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from langseg.errors import BadConfigError, BadExpressionError
from langseg.models.vlt import THRESHOLD
from langseg.predict.base import Predictor, PreparedImage, as_list, check_flag, check_probability
from langseg.predict.images import UNIT_MEAN, UNIT_STD, ImageInput
from langseg.predict.letterbox import PAD_VALUE, Placement, crop_to_image, letterbox
from langseg.predict.results import ReferringResult
from langseg.predict.tokenizers import STOP_WORDS, Tokenizer, split_words

UPSAMPLE = ("logits", "probability")
# Expressions decoded in one batch at most (an endless generator must end in an error, not a hang).
MAX_EXPRESSIONS = 4096


class ExpressionWarning(UserWarning):
    """An expression was truncated, or holds no word the model can use."""


@dataclass(frozen=True)
class Letterbox:
    """How an image becomes the model's square input (see :mod:`langseg.predict.letterbox`).

    Attributes:
        mean, std: normalisation of RGB in [0, 1] (VLT's Darknet: none, i.e. 0 and 1).
        pad_value: grey level of the padding, in [0, 1] before normalisation (official 0.5).
    """

    mean: tuple[float, float, float] = UNIT_MEAN
    std: tuple[float, float, float] = UNIT_STD
    pad_value: float = PAD_VALUE


def foreground_probability(logits: torch.Tensor, place: Placement, upsample: str = "logits") -> torch.Tensor:
    """``B x h x w`` output-grid logits -> ``B x H x W`` foreground probability at the original image
    size, resizing the logits (``upsample="logits"``) or their sigmoid (``"probability"``, official)."""
    if not isinstance(upsample, str) or upsample not in UPSAMPLE:
        raise BadConfigError(f"unknown upsample {upsample!r}", hint=f"Use one of {UPSAMPLE}.")
    values = logits if upsample == "logits" else torch.sigmoid(logits)
    out = crop_to_image(values[:, None], place)[:, 0]
    return torch.sigmoid(out) if upsample == "logits" else out.clamp(0.0, 1.0)


def check_expression_text(text: Any) -> str:
    """``text`` if it is a string with a word in it (the checks that need no model's vocabulary);
    raises :class:`BadExpressionError`."""
    if not isinstance(text, str):
        raise BadExpressionError(f"an expression must be a string, got {type(text).__name__}")
    if not text.strip():
        raise BadExpressionError("the expression is empty")
    if not split_words(text):
        raise BadExpressionError(f"the expression {text!r} contains no words (letters)")
    return text


@dataclass
class Expressions:
    """Checked expressions and their token ids, computed once per set (:meth:`Referrer.expressions`).

    Attributes:
        texts: the ``B`` expressions; ``ids``, ``mask``: their ``B x L`` token ids and real-token mask.
    """

    texts: list[str]
    ids: torch.Tensor
    mask: torch.Tensor


@dataclass
class ReferringLogits:
    """What :meth:`Referrer.infer` computed for one image, before :meth:`Referrer.finish`.

    Attributes:
        logits: ``B x h x w`` float32 output-grid logits, one per expression.
        placement: where the image sits in the letterboxed input.
        texts: the ``B`` expressions; ``image``: the ``H x W x 3`` uint8 original.
        threshold, upsample: the predictor's settings; ``keep_scores``: keep per-pixel probabilities.
    """

    logits: torch.Tensor
    placement: Placement
    texts: list[str]
    image: np.ndarray
    threshold: float
    upsample: str
    keep_scores: bool = False


class Referrer(Predictor):
    """Segment the object an expression refers to.

    Args:
        model: the network (see module docstring).
        tokenizer: turns expressions into ids (:class:`langseg.predict.tokenizers.Vocab` for VLT's GRU).
        letterbox: normalisation and padding.
        device: where the model runs.
        threshold: foreground when the sigmoid probability exceeds it (official 0.35).
        upsample: what is resized to the image, ``"logits"`` (default) or ``"probability"`` (official).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        letterbox: Letterbox | None = None,
        device: str | torch.device = "cpu",
        threshold: float = THRESHOLD,
        upsample: str = "logits",
    ) -> None:
        threshold = check_probability(threshold, "threshold")  # VLT's is 0.35
        if not isinstance(upsample, str) or upsample not in UPSAMPLE:
            raise BadConfigError(f"unknown upsample {upsample!r}", hint=f"Use one of {UPSAMPLE}.")
        super().__init__(model, device)
        self.tokenizer, self.upsample, self.threshold = tokenizer, upsample, threshold
        self.input_size = int(model.input_size)
        self.letterbox = letterbox or Letterbox()
        self._input: torch.Tensor | None = None
        self._placement: Placement | None = None
        self._features: object = None
        self._expressions: OrderedDict[tuple[str, ...], Expressions] = OrderedDict()
        self.image_encodings = 0  # encode_image calls, for tests and benchmarks
        self.text_encodings = 0  # expression sets checked and tokenised

    # ------------------------------------------------------------------ image side

    def _prepare(self, image: np.ndarray) -> PreparedImage:
        """``1 x 3 x S x S`` normalised input: the image resized (bicubic, as official) and centred."""
        box = self.letterbox
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None]
        canvas, placement = letterbox(pixels.float() / 255.0, self.input_size, box.pad_value)
        mean = torch.tensor(box.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(box.std, device=self.device).view(1, 3, 1, 1)
        return PreparedImage(image, (canvas - mean) / std, placement)

    def _set_input(self, prepared: PreparedImage) -> None:
        self._input, self._placement, self._features = prepared.input, prepared.extra, None

    def _forget(self) -> None:
        self._input, self._placement, self._features = None, None, None

    def _image_features(self) -> object:
        if self._features is None:
            weight = next(self.model.parameters(), None)  # bf16 weights take bf16 inputs
            images = self._input if weight is None else self._input.to(weight.dtype)
            self._features = self.model.encode_image(images)
            self.image_encodings += 1
        return self._features

    # ------------------------------------------------------------------ text side

    def check_expression(self, text: Any) -> str:
        """``text`` if it can be segmented; raises :class:`BadExpressionError`, warns as documented."""
        words = split_words(check_expression_text(text))
        limit, needed = self.tokenizer.max_tokens, self.tokenizer.count(text)
        if needed > limit:
            warnings.warn(
                f"the expression has {needed} tokens; only the first {limit} are used (the model's limit of "
                f"{limit} tokens): {text!r}",
                ExpressionWarning,
                stacklevel=6,  # check_expression < expressions < infer < inference_mode < refer_all
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
                stacklevel=6,  # check_expression < expressions < infer < inference_mode < refer_all
            )
        return text

    def expressions(self, texts: Iterable[str], cache_size: int = 16) -> Expressions:
        """``texts`` checked (:meth:`check_expression`: errors, and warnings once) and tokenised, once per
        set of expressions: a batch over many images reuses them. Any iterable of strings (a list, a
        generator, ...) is read once, up to :data:`MAX_EXPRESSIONS` of them."""
        if isinstance(texts, str):
            raise BadExpressionError(
                f"texts must be a list of expressions, got the single string {texts!r:.80}",
                hint=f"Pass texts=[{texts!r:.60}], or use refer(image, text) for one expression.",
            )
        texts = as_list(texts, "expressions", BadExpressionError, MAX_EXPRESSIONS)  # generators too
        if not texts:
            raise BadExpressionError("texts must be a non-empty list of expressions")
        key = tuple(texts) if all(isinstance(t, str) for t in texts) else None
        if key is not None and key in self._expressions:
            self._expressions.move_to_end(key)
            return self._expressions[key]
        checked = [self.check_expression(t) for t in texts]
        ids, mask = self.tokenizer.encode_batch(checked)
        entry = Expressions(checked, ids.to(self.device), mask.to(self.device))
        self.text_encodings += 1
        self._expressions[tuple(checked)] = entry
        if len(self._expressions) > cache_size:
            self._expressions.popitem(last=False)
        return entry

    # ------------------------------------------------------------------ referring

    def refer(
        self, image: ImageInput | str | None = None, text: str | None = None, keep_scores: bool = False
    ) -> ReferringResult:
        """Mask of the object ``text`` refers to in ``image`` (or in the image given to :meth:`set_image`).

        ``refer(image, text)``, ``refer(text)`` after :meth:`set_image`, or ``refer(text=...)``: a single
        string argument is the expression, never an image path.

        Returns:
            :class:`ReferringResult` at the original size: ``mask`` (probability > threshold) and
            ``score``, the mean foreground probability over the mask (how sure the model is of the pixels
            it chose; the maximum probability when the mask is empty, which is then below the threshold).
            ``scores`` (``H x W`` float32 foreground probability) only with ``keep_scores``.
        """
        if text is None and isinstance(image, str):
            image, text = None, image
        return self.refer_all(image, [text], keep_scores=keep_scores)[0]  # type: ignore[list-item]

    def refer_all(
        self, image: ImageInput | None, texts: Iterable[str], keep_scores: bool = False
    ) -> list[ReferringResult]:
        """One result per expression in ``texts``, decoded in one batch over one image encoding."""
        return self.finish(self.infer(image, texts, keep_scores))

    @torch.inference_mode()
    def infer(
        self, image: ImageInput | PreparedImage | None, texts: Iterable[str], keep_scores: bool = False
    ) -> ReferringLogits:
        """The network's part of :meth:`refer_all`: output-grid logits for every expression. ``image``
        may be a :class:`PreparedImage` from :meth:`prepare`."""
        keep_scores = check_flag(keep_scores, "keep_scores")
        expressions = self.expressions(texts)
        if isinstance(image, PreparedImage):
            self.set_prepared(image)
        elif image is not None:
            self.set_image(image)
        original = self._require_image()
        assert self._placement is not None
        logits = self.model.decode(self._image_features(), expressions.ids, expressions.mask)
        return ReferringLogits(
            logits.float()[:, 0],
            self._placement,
            expressions.texts,
            original,
            self.threshold,
            self.upsample,
            keep_scores,
        )

    @torch.inference_mode()
    def infer_many(
        self,
        images: Sequence[PreparedImage],
        texts: Iterable[str],
        keep_scores: bool = False,
        max_batch: int = 8,
    ) -> list[ReferringLogits]:
        """:meth:`infer` of several images from :meth:`prepare` with the same expressions, one result
        each, in order: up to ``max_batch`` images go through the network as one batch (``encode_image``
        of ``n`` images, ``decode`` of the ``n x E`` image-expression pairs). On a CPU, 8 images of
        ``vlt-shapes`` in one batch cost 0.47x their time one by one: the tiny network's per-call
        overheads are shared. The logits equal :meth:`infer`'s up to the rounding of batched kernels.
        The image set with :meth:`set_image` is left as it was."""
        keep_scores = check_flag(keep_scores, "keep_scores")
        expressions = self.expressions(texts)
        count = len(expressions.texts)
        weight = next(self.model.parameters(), None)  # bf16 weights take bf16 inputs
        # A network may take one image per call (an exported ONNX graph: ``images_per_call = 1``).
        step = max(1, min(int(max_batch), getattr(self.model, "images_per_call", int(max_batch))))
        results: list[ReferringLogits] = []
        for start in range(0, len(images), step):
            chunk = list(images[start : start + step])
            stacked = torch.cat([p.input for p in chunk])
            features = self.model.encode_image(stacked if weight is None else stacked.to(weight.dtype))
            self.image_encodings += len(chunk)
            if len(chunk) == 1:  # as infer(): one encoding shared by all the expressions
                logits = self.model.decode(features, expressions.ids, expressions.mask).float()[:, 0]
            else:
                # Each image's features once per expression, image-major: pair k is image k // E, text k % E.
                features = [f.repeat_interleave(count, dim=0) for f in features]
                ids, mask = expressions.ids.repeat(len(chunk), 1), expressions.mask.repeat(len(chunk), 1)
                logits = self.model.decode(features, ids, mask).float()[:, 0]
            for j, prepared in enumerate(chunk):
                results.append(
                    ReferringLogits(
                        logits[j * count : (j + 1) * count],
                        prepared.extra,
                        expressions.texts,
                        prepared.image,
                        self.threshold,
                        self.upsample,
                        keep_scores,
                    )
                )
        return results

    @staticmethod
    @torch.inference_mode()
    def finish(pending: ReferringLogits) -> list[ReferringResult]:
        """:meth:`infer`'s logits mapped to the image: masks, scores (and probabilities). Reads no
        predictor state, so a batch runs it in another thread while the network takes the next image."""
        probabilities = foreground_probability(pending.logits, pending.placement, pending.upsample)
        results = []
        for text, prob in zip(pending.texts, probabilities, strict=True):
            fg = prob > pending.threshold
            score = prob[fg].mean() if fg.any() else prob.max()
            results.append(
                ReferringResult(
                    mask=fg.cpu().numpy(),
                    score=float(score),
                    text=text,
                    image=pending.image,
                    scores=prob.cpu().numpy() if pending.keep_scores else None,
                )
            )
        return results
