"""Predictors: everything around the models (images, text, caches, test-time plans, results).

:class:`Segmenter` (free-text labels, every pixel) and :class:`Referrer` (one object an expression
describes) share one contract (:class:`~langseg.predict.base.Predictor`): ``.model``, ``set_image()``,
``reset_image()``, images as paths, PIL images, arrays or tensors, and results with the same field names.
"""

from langseg.predict.base import Predictor, PreparedImage
from langseg.predict.images import load_image
from langseg.predict.referrer import ExpressionWarning, Letterbox, Referrer
from langseg.predict.results import ReferringResult, ReferringSet, SegmentationResult, to_coco_rle
from langseg.predict.segmenter import Preprocess, Segmenter
from langseg.predict.tta import InferencePlan, run_plan, sliding_window, upsample_argmax

__all__ = [
    "ExpressionWarning",
    "InferencePlan",
    "Letterbox",
    "Predictor",
    "PreparedImage",
    "Preprocess",
    "Referrer",
    "ReferringResult",
    "ReferringSet",
    "SegmentationResult",
    "Segmenter",
    "load_image",
    "run_plan",
    "sliding_window",
    "to_coco_rle",
    "upsample_argmax",
]
