"""``Segmenter``: open-vocabulary semantic segmentation of one image with free-text labels.

The predictor owns everything around a dense image-text model: loading the image, resizing it to the
working resolution, normalising, the test-time plan (windows, scales, flips), the text side (label
aliases, caching label embeddings per label set), caching image features across calls with different
labels, and mapping the result back to the original size.

The model is an ``nn.Module`` with three methods, so LSeg (:class:`~langseg.models.lseg.LSeg`) and the
training-free dense CLIP modes (:class:`~langseg.models.dense_clip.DenseCLIPModel`) share this class:

- ``encode_image(images: B x 3 x h x w) -> features`` (any tensor, e.g. ``B x D x h' x w'``),
- ``dense_logits(features, text_embeddings: K x D) -> B x K x h'' x w''``, and
- ``encode_text(token_ids: P x L) -> P x D``.

The predictor owns the text side around ``encode_text``: each label goes into every prompt template,
is tokenised, encoded, and the label's embedding is the mean of the L2-normalised template embeddings,
renormalised (CLIP's prompt ensembling; one template ``"{}"``, LSeg's, is the plain normalised
embedding of the raw label).

Labels may carry aliases separated by ``;`` ("person; man; woman"): each alias is encoded and the label's
logit is the maximum over its aliases. With ``background_threshold``, pixels whose top probability is
below it go to the label named ``background`` or ``other`` (which must be among the labels).
"""

from __future__ import annotations

import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from langseg.errors import BadConfigError, BadLabelsError
from langseg.predict.base import Predictor, PreparedImage, as_list, check_flag, check_probability
from langseg.predict.images import CLIP_MEAN, CLIP_STD, ImageInput
from langseg.predict.results import BACKGROUND_NAMES, SegmentationResult
from langseg.predict.tta import InferencePlan, run_plan, scaled_inputs, upsample_argmax

Tokenize = Callable[[list[str]], torch.Tensor]


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """``templates`` as a tuple, each holding exactly one ``{}``; raises :class:`BadConfigError`."""
    if isinstance(templates, str) or not templates:
        raise BadConfigError(
            "templates must be a non-empty list of strings", hint='e.g. templates=["a photo of a {}."]'
        )
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise BadConfigError(
                f"template {template!r} must contain '{{}}' exactly once", hint="'{}' marks the label."
            )
    return tuple(templates)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input.

    Attributes:
        short_side: resize so the short side has this many pixels (``None`` keeps the size); images are
            also shrunk so that the long side is at most ``max_side``.
        max_side: cap on the long side of the working image.
        pad_multiple: pad each model input (bottom/right) to a multiple of this (a ViT's patch size).
        mean, std: normalisation.
    """

    short_side: int | None = None
    max_side: int = 2048
    pad_multiple: int = 1
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass
class _LabelSet:
    names: list[str]
    embeddings: torch.Tensor  # P x D, every alias of every label
    owner: torch.Tensor  # P, index of the label each alias belongs to


@dataclass
class SegmentationLogits:
    """What :meth:`Segmenter.infer` computed for one image, before :meth:`Segmenter.finish` maps it to the
    image size.

    Attributes:
        logits: ``1 x K x h x w`` at the working resolution (after the plan and any refinement).
        image: the ``H x W x 3`` uint8 original.
        labels: the ``K`` label names.
        background: index of the label uncertain pixels go to, or ``None``.
        background_threshold: the top probability under which a pixel is uncertain.
        keep_scores: whether the result keeps the ``K x H x W`` probabilities.
    """

    logits: torch.Tensor
    image: np.ndarray
    labels: list[str]
    background: int | None = None
    background_threshold: float | None = None
    keep_scores: bool = False


LABELS_HINT = 'Pass a list of distinct, non-empty label strings, e.g. labels=["cat", "sofa", "other"].'


def _visible(text: str) -> bool:
    """Whether ``text`` has a character that shows: not only spaces, control or format characters (a
    zero-width space alone is an empty label too)."""
    return any(unicodedata.category(ch)[0] not in ("C", "Z") for ch in text)


def parse_labels(labels: Iterable[str], max_labels: int) -> tuple[list[str], list[list[str]]]:
    """(display names, aliases per label) from user labels; raises :class:`BadLabelsError`.

    ``labels`` is any iterable of strings (a list, tuple, generator, ...); it is read once, and at most
    ``max_labels + 1`` items are read, so an endless generator is an error, not a hang.
    """
    if isinstance(labels, str):
        raise BadLabelsError(
            f"labels must be a list of strings, got the single string {labels!r:.80}",
            hint=f'Pass labels=[{labels!r:.40}, "other"] or split it yourself.',
        )
    items = as_list(
        labels,
        "labels",
        BadLabelsError,
        max_labels,
        hint=LABELS_HINT,
        limit_hint="Split the label set over several calls, or raise max_labels if memory allows.",
    )
    names, aliases = [], []
    for raw in items:
        if not isinstance(raw, str):
            raise BadLabelsError(
                f"every label must be a string, got {type(raw).__name__} {raw!r:.60}", hint=LABELS_HINT
            )
        parts = [p.strip() for p in raw.split(";") if _visible(p)]
        if not parts:
            what = "empty label" if not raw.strip() else "empty label (no visible characters)"
            raise BadLabelsError(f"{what} {raw!r:.60}", hint=LABELS_HINT)
        names.append(parts[0])
        aliases.append(parts)
    if not names:
        raise BadLabelsError("no labels given", hint=LABELS_HINT)
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        shown = ", ".join(repr(d) if len(d) <= 40 else repr(d[:40] + "...") for d in duplicates[:5])
        raise BadLabelsError(
            f"duplicate labels: {shown}"
            + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""),
            hint="Give each label once; join synonyms with ';' as in 'person; man; woman'.",
        )
    return names, aliases


class Segmenter(Predictor):
    """Segment images with labels chosen at call time.

    Args:
        model: the dense image-text network (see module docstring).
        tokenizer: ``list[str] -> P x L`` token ids for ``model.encode_text`` (an open_clip tokenizer).
        templates: prompt templates, each with one ``{}`` for the label (default: the bare label).
        plan: test-time plan at the working resolution.
        preprocess: resizing, padding and normalisation.
        device: where the model runs.
        max_labels: refuse larger label sets (memory grows with labels x pixels).
        text_cache_size: label sets whose embeddings are kept.
        feature_cache_bytes: keep image features up to this size for repeated calls on one image.
        refine: optional ``refine(logits: 1 x K x h x w, image: 1 x 3 x h x w) -> 1 x K x h x w`` applied
            to the plan's logits at the working resolution, with the normalised working image, before
            the upsampling to the original size (e.g. :class:`langseg.models.pamr.PAMR`).
        text_batch_size: prompts per ``encode_text`` call (bounds memory for hundreds of labels).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenize,
        *,
        templates: Sequence[str] = ("{}",),
        plan: InferencePlan | None = None,
        preprocess: Preprocess | None = None,
        device: str | torch.device = "cpu",
        max_labels: int = 1024,
        text_cache_size: int = 16,
        feature_cache_bytes: int = 1 << 30,
        refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        text_batch_size: int = 256,
    ) -> None:
        for name, value in (("max_labels", max_labels), ("text_cache_size", text_cache_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadConfigError(f"{name} must be a positive integer, got {value!r:.80}")
        if plan is not None and not isinstance(plan, InferencePlan):
            raise BadConfigError(f"plan must be an InferencePlan, got {type(plan).__name__}")
        if preprocess is not None and not isinstance(preprocess, Preprocess):
            raise BadConfigError(f"preprocess must be a Preprocess, got {type(preprocess).__name__}")
        super().__init__(model, device)
        self.tokenizer, self.templates = tokenizer, check_templates(templates)
        self.plan = plan or InferencePlan()
        self.preprocess = preprocess or Preprocess()
        self.max_labels, self.text_batch_size = max_labels, text_batch_size
        self.text_cache_size, self.feature_cache_bytes = text_cache_size, feature_cache_bytes
        self.refine = refine
        self._text_cache: OrderedDict[tuple[tuple[str, ...], ...], _LabelSet] = OrderedDict()
        self._input: torch.Tensor | None = None
        self._scaled: dict[tuple[int, int], torch.Tensor] | None = None  # the plan's resized inputs
        self._features: list[torch.Tensor] = []  # per model call of the plan, for the current image
        self.text_encodings = 0  # label sets encoded, for tests and benchmarks
        self.image_encodings = 0  # encode_image calls

    # ------------------------------------------------------------------ image side

    @property
    def input_tensor(self) -> torch.Tensor | None:
        """The current image as the plan sees it: ``1 x 3 x h x w`` normalised, at the working size."""
        return self._input

    def _prepare(self, image: np.ndarray) -> PreparedImage:
        # A one-scale plan's resized input too, so that in a batch the decoding threads resize it (more
        # scales would hold several copies of the image for as long as it is set: those resize later).
        working = self._normalised_input(image)
        scaled = scaled_inputs(working, self.plan) if len(self.plan.scales) == 1 else None
        return PreparedImage(image, working, scaled)

    def _set_input(self, prepared: PreparedImage) -> None:
        self._input, self._scaled = prepared.input, prepared.extra

    def _forget(self) -> None:
        self._input, self._scaled = None, None
        self._features = []

    def _normalised_input(self, image: np.ndarray) -> torch.Tensor:
        """``1 x 3 x h x w`` normalised float tensor at the working resolution."""
        pre = self.preprocess
        height, width = image.shape[:2]
        factor = 1.0 if pre.short_side is None else pre.short_side / min(height, width)
        factor = min(factor, pre.max_side / max(height, width))
        if abs(factor - 1.0) > 1e-9:
            # Resize the uint8 image with PIL (antialiased when shrinking) before it becomes float: an
            # 8000 x 6000 photo would otherwise cost 600 MB of float pixels.
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            image = np.array(Image.fromarray(image).resize(size, Image.BILINEAR))
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None]
        x = x.float() / 255.0
        mean = torch.tensor(pre.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _features_for(self, call: int, windows: torch.Tensor) -> torch.Tensor:
        """Image features of the ``call``-th model input of the plan, cached across label sets.

        The plan is deterministic, so call ``i`` always sees the same window of the same image; the cache
        keeps features up to ``feature_cache_bytes`` and recomputes the rest.
        """
        if call < len(self._features):
            return self._features[call]
        features = self._encode(windows)
        used = sum(f.numel() * f.element_size() for f in self._features)
        if (
            call == len(self._features)
            and used + features.numel() * features.element_size() <= self.feature_cache_bytes
        ):
            self._features.append(features)
        self.image_encodings += 1
        return features

    def _encode(self, windows: torch.Tensor) -> torch.Tensor:
        """Image features of ``B x 3 x h x w`` model inputs, padded to the model's multiple first."""
        multiple = self.preprocess.pad_multiple
        pad_h, pad_w = (-windows.shape[-2]) % multiple, (-windows.shape[-1]) % multiple
        return self.model.encode_image(F.pad(windows, (0, pad_w, 0, pad_h)))

    def _window_logits(
        self, features: torch.Tensor, label_set: _LabelSet, size: tuple[int, int]
    ) -> torch.Tensor:
        """``B x K x h x w`` float logits of inputs of ``size`` (h, w) from their features: each label's
        best alias, upsampled to the padded input and cropped to the input."""
        logits = self.model.dense_logits(features, label_set.embeddings)
        logits = _max_over_aliases(logits, label_set.owner, len(label_set.names))
        multiple = self.preprocess.pad_multiple
        height, width = size
        padded = (height + (-height) % multiple, width + (-width) % multiple)
        if tuple(logits.shape[-2:]) != padded:
            logits = F.interpolate(logits.float(), size=padded, mode="bilinear", align_corners=False)
        return logits.float()[..., :height, :width]

    # ------------------------------------------------------------------ text side

    def label_set(self, labels: Sequence[str]) -> _LabelSet:
        """Embeddings of every alias of ``labels``, computed once per label set."""
        names, aliases = parse_labels(labels, self.max_labels)
        key = tuple(tuple(a) for a in aliases)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        prompts = [alias for group in aliases for alias in group]
        owner = torch.tensor([i for i, group in enumerate(aliases) for _ in group], device=self.device)
        with torch.inference_mode():
            embeddings = self.encode_prompts(prompts).to(self.device)
        self.text_encodings += 1
        entry = _LabelSet(names, embeddings, owner)
        self._text_cache[key] = entry
        if len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return entry

    def encode_prompts(self, labels: list[str]) -> torch.Tensor:
        """``P x D`` unit-norm embeddings of ``P`` label texts, ensembled over the templates (float32, or
        float64 for a float64 model)."""
        prompts = [template.replace("{}", label) for label in labels for template in self.templates]
        parts = []
        for start in range(0, len(prompts), self.text_batch_size):
            embeddings = self.model.encode_text(self.tokenizer(prompts[start : start + self.text_batch_size]))
            # Average in at least float32: bf16 weights must not round the ensemble.
            parts.append(
                F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=-1)
            )
        per_template = torch.cat(parts).view(len(labels), len(self.templates), -1)
        return F.normalize(per_template.mean(dim=1), dim=-1)

    # ------------------------------------------------------------------ segmentation

    def segment(
        self,
        image: ImageInput | None = None,
        labels: Sequence[str] = (),
        background_threshold: float | None = None,
        keep_scores: bool = False,
    ) -> SegmentationResult:
        """Segment ``image`` (or the one given to :meth:`set_image`) into ``labels``.

        Returns a :class:`SegmentationResult` whose ``mask`` has the original image size.
        """
        return self.finish(self.infer(image, labels, background_threshold, keep_scores))

    @torch.inference_mode()
    def infer(
        self,
        image: ImageInput | PreparedImage | None = None,
        labels: Sequence[str] = (),
        background_threshold: float | None = None,
        keep_scores: bool = False,
    ) -> SegmentationLogits:
        """The network's part of :meth:`segment`: the plan's logits at the working resolution. ``image``
        may be a :class:`PreparedImage` from :meth:`prepare`."""
        keep_scores = check_flag(keep_scores, "keep_scores")
        label_set = self.label_set(labels)
        background = _background_index(label_set.names, background_threshold)
        if isinstance(image, PreparedImage):
            self.set_prepared(image)
        elif image is not None:
            self.set_image(image)
        original = self._require_image()
        assert self._input is not None
        calls = iter(range(1 << 30))

        def logits_fn(windows: torch.Tensor) -> torch.Tensor:
            features = self._features_for(next(calls), windows)
            return self._window_logits(features, label_set, windows.shape[-2:])

        working_logits = run_plan(logits_fn, self._input, self.plan, self._scaled)
        if self.refine is not None:
            working_logits = self.refine(working_logits, self._input)
        return SegmentationLogits(
            working_logits, original, label_set.names, background, background_threshold, keep_scores
        )

    @torch.inference_mode()
    def infer_many(
        self,
        images: Sequence[PreparedImage],
        labels: Sequence[str] = (),
        background_threshold: float | None = None,
        keep_scores: bool = False,
        max_batch: int = 8,
    ) -> list[SegmentationLogits]:
        """:meth:`infer` of several images from :meth:`prepare`, one result each, in order.

        Images with the same input size go through the network together, up to ``max_batch`` at a
        time (on a CPU, 4 images of ``lseg-shapes`` in one batch cost 0.66x their time one by one), when
        the plan runs whole images (no sliding window) and no refinement follows; otherwise, and for a
        size met once, this is :meth:`infer` per image. The logits equal :meth:`infer`'s up to the
        rounding of batched kernels. The image set with :meth:`set_image` is left as it was, and the
        per-image feature cache is neither read nor filled.
        """
        keep_scores = check_flag(keep_scores, "keep_scores")
        images = list(images)
        if self.plan.crop is not None or self.refine is not None or len(images) < 2:
            return [self._infer_alone(p, labels, background_threshold, keep_scores) for p in images]
        label_set = self.label_set(labels)
        background = _background_index(label_set.names, background_threshold)
        groups: dict[tuple[tuple[int, ...], tuple[object, ...]], list[int]] = {}
        for i, prepared in enumerate(images):
            scaled = prepared.extra if isinstance(prepared.extra, dict) else {}
            groups.setdefault((tuple(prepared.input.shape), tuple(scaled)), []).append(i)
        results: list[SegmentationLogits | None] = [None] * len(images)

        def logits_fn(windows: torch.Tensor) -> torch.Tensor:
            self.image_encodings += windows.shape[0]
            return self._window_logits(self._encode(windows), label_set, windows.shape[-2:])

        for members in groups.values():
            for start in range(0, len(members), max(1, max_batch)):
                chunk = [images[i] for i in members[start : start + max(1, max_batch)]]
                stacked = torch.cat([p.input for p in chunk])
                scaled = {k: torch.cat([p.extra[k] for p in chunk]) for k in chunk[0].extra or {}}
                logits = run_plan(logits_fn, stacked, self.plan, scaled or None)
                for j, prepared in enumerate(chunk):
                    results[members[start + j]] = SegmentationLogits(
                        logits[j : j + 1],
                        prepared.image,
                        label_set.names,
                        background,
                        background_threshold,
                        keep_scores,
                    )
        return results  # type: ignore[return-value]

    def _infer_alone(
        self, prepared: PreparedImage, labels: Sequence[str], threshold: float | None, keep_scores: bool
    ) -> SegmentationLogits:
        """:meth:`infer` of one prepared image, leaving the image that was set (if any) set."""
        saved = (self._image, self._input, self._scaled, self._features)
        try:
            return self.infer(prepared, labels, threshold, keep_scores)
        finally:
            self._image, self._input, self._scaled, self._features = saved

    @staticmethod
    @torch.inference_mode()
    def finish(pending: SegmentationLogits) -> SegmentationResult:
        """:meth:`infer`'s logits upsampled to the image: the label map (and probabilities). Reads no
        predictor state, so a batch runs it in another thread while the network takes the next image."""
        height, width = pending.image.shape[:2]
        logits = pending.logits
        need_probs = pending.keep_scores or pending.background is not None
        # Bands of at most ~2**25 values per temporary: many labels on a huge image must not exhaust memory.
        band = max(1, min(512, (1 << 25) // (logits.shape[1] * width)))
        mask, probs = upsample_argmax(logits, (height, width), band, keep_probabilities=need_probs)
        if pending.background is not None and probs is not None:
            mask[probs.max(0).values < pending.background_threshold] = pending.background
        return SegmentationResult(
            mask=mask.cpu().numpy(),
            labels=pending.labels,
            image=pending.image,
            scores=probs.cpu().numpy() if pending.keep_scores and probs is not None else None,
        )


def check_labels(
    labels: Sequence[str], background_threshold: float | None = None, max_labels: int = 1024
) -> list[str]:
    """The label names, after every check :meth:`Segmenter.segment` makes on ``labels`` and
    ``background_threshold`` without a model; raises :class:`BadLabelsError`."""
    names, _ = parse_labels(labels, max_labels)
    _background_index(names, background_threshold)
    return names


def _background_index(names: list[str], threshold: float | None) -> int | None:
    if threshold is None:
        if len(names) == 1:
            raise BadLabelsError(
                f"one label ({names[0]!r}) would give every pixel that label",
                hint='Add a second label such as "other" (or "background", with background_threshold).',
            )
        return None
    check_probability(threshold, "background_threshold", BadLabelsError)
    for i, name in enumerate(names):
        if name.lower() in BACKGROUND_NAMES:
            return i
    raise BadLabelsError(
        "background_threshold needs a label named 'background' or 'other' to assign uncertain pixels to",
        hint='Add "background" (or "other") to the labels.',
    )


def _max_over_aliases(logits: torch.Tensor, owner: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``B x K x h x w`` from ``B x P x h x w`` alias logits: each label's maximum over its aliases."""
    if logits.shape[1] == num_labels:
        return logits
    out = logits.new_full((logits.shape[0], num_labels, *logits.shape[2:]), float("-inf"))
    index = owner.view(1, -1, 1, 1).expand_as(logits)
    return out.scatter_reduce(1, index, logits, reduce="amax")
