"""Predictors: everything around the models (images, text, caches, test-time plans, results)."""

from langseg.predict.images import load_image
from langseg.predict.results import ReferringResult, SegmentationResult
from langseg.predict.segmenter import Preprocess, Segmenter
from langseg.predict.tta import InferencePlan, run_plan, sliding_window, upsample_argmax

__all__ = [
    "InferencePlan",
    "Preprocess",
    "ReferringResult",
    "SegmentationResult",
    "Segmenter",
    "load_image",
    "run_plan",
    "sliding_window",
    "upsample_argmax",
]
