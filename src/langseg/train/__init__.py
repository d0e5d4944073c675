"""The shared training engine (LSeg, VLT, the toy task): configs, transforms, losses, optimiser, fit.

Quick use::

    from langseg.train import fit, load_config
    result = fit(load_config("configs/toy_shapes.yaml", ["optim.lr=0.05"]))

or ``langseg train configs/toy_shapes.yaml optim.lr=0.05 [--resume auto]``, and under ``torchrun`` for
several processes. A task registers a builder with :func:`register_task`; see :mod:`langseg.train.tasks`
for the train-module contract. Datasets come from :func:`langseg.data.build_dataset`, evaluators from
:mod:`langseg.evaluate`.
"""

# Task modules register themselves on import.
from langseg.train import lseg_task as _lseg_task  # noqa: F401
from langseg.train import vlt_task as _vlt_task  # noqa: F401
from langseg.train.config import DataConfig, OptimConfig, TrainConfig, load_config
from langseg.train.engine import FitResult, TrainState, evaluate, fit
from langseg.train.tasks import TaskParts, get_task, list_tasks, register_task

__all__ = [
    "DataConfig",
    "FitResult",
    "OptimConfig",
    "TaskParts",
    "TrainConfig",
    "TrainState",
    "evaluate",
    "fit",
    "get_task",
    "list_tasks",
    "load_config",
    "register_task",
]
