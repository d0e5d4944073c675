"""The model zoo: one module per family, wiring networks (:mod:`langseg.models`) to predictors.

Each module registers its entries (:class:`~langseg.registry.ModelEntry`: builder, weights,
preprocessing, default plan) and its :class:`~langseg.registry.Family` (typed options, how to load a
network or a predictor) when imported; importing this package registers them all. Families:
:mod:`~langseg.zoo.lseg`, :mod:`~langseg.zoo.vlt`, :mod:`~langseg.zoo.dense_clip`.
"""

from langseg.zoo import dense_clip, lseg, vlt

__all__ = ["dense_clip", "lseg", "vlt"]
