"""Streaming, mergeable segmentation metrics.

Both metric classes keep their state as *sums* (``int64`` counts and ``float64`` totals on the CPU), so
that a dataset can be scored in any number of batches, on any number of processes, and the pieces added
together (:meth:`merge` in one process, :meth:`all_reduce` across ``torch.distributed`` ranks) give
exactly the scores of one pass over all the data.

Semantic segmentation (:class:`SemanticMetrics`), from a ``K x K`` confusion matrix ``C`` over the
labelled pixels (rows = ground truth, columns = prediction):

- ``IoU_k = C[k, k] / (sum_j C[k, j] + sum_i C[i, k] - C[k, k])``, i.e. TP / (TP + FP + FN). A class
  absent from both ground truth and prediction has union 0 and IoU NaN.
- ``mIoU``: mean of ``IoU_k`` over the classes with union > 0 (present in the ground truth *or* the
  prediction); a class predicted but absent from the ground truth counts with IoU 0.
- pixel accuracy: ``trace(C) / sum(C)``, correctly labelled pixels over labelled pixels.
- mean accuracy: mean over the classes present in the ground truth of the per-class recall
  ``C[k, k] / sum_j C[k, j]``.
- FB-IoU (two-class problems, e.g. few-shot segmentation): mean of background and foreground IoU.

Pixels whose target equals ``ignore_index`` are skipped entirely, whatever was predicted there.

Referring segmentation (:class:`ReferringMetrics`), one binary mask per expression:

- per-expression ``IoU = |P & G| / |P | G|``, defined as 1.0 when both masks are empty (the model
  correctly predicted nothing, as for the no-target expressions of gRefCOCO);
- ``oIoU`` (overall or cumulative IoU): ``sum |P & G| / sum |P | G|`` over the whole set, which weights
  large objects more;
- ``mIoU``: mean of the per-expression IoUs;
- ``Pr@t``: share of expressions with IoU >= t (so an IoU of exactly 0.5 counts towards ``Pr@0.5``).

Few-shot segmentation (:class:`FewShotMetrics`), LSeg's and HSNet's protocol: each sample is one image
with a binary mask of one class (0 = others, 1 = the class), and the class changes from sample to sample:

- ``mIoU``: mean over the classes seen of the *foreground* IoU, each accumulated over all of that class's
  samples (sum of intersections / sum of unions);
- ``FB-IoU``: mean of background and foreground IoU over all samples pooled.

Scores with nothing to average over (no labelled pixel, no expression) are NaN rather than 0, so that an
empty evaluation cannot pass for a bad one.
"""

from langseg.metrics.fewshot import FewShotMetrics, FewShotScores
from langseg.metrics.referring import ReferringMetrics, ReferringScores
from langseg.metrics.semantic import SemanticMetrics, SemanticScores

__all__ = [
    "FewShotMetrics",
    "FewShotScores",
    "ReferringMetrics",
    "ReferringScores",
    "SemanticMetrics",
    "SemanticScores",
]
