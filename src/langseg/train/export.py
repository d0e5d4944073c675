"""Turn a training checkpoint into a model folder that ``langseg.load`` reads."""

from __future__ import annotations

from pathlib import Path

from langseg.errors import BadConfigError
from langseg.hub import clean_message
from langseg.train.checkpoint import load_checkpoint, resolve_resume
from langseg.train.config import TrainConfig
from langseg.train.tasks import get_task


def export_checkpoint(config: TrainConfig, checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Rebuild ``config``'s train module, load the weights of ``checkpoint`` (a ``.pt`` file, a run folder
    or ``"auto"`` for the newest in ``config.out_dir``) and write it with the module's ``export()``."""
    path = resolve_resume(checkpoint, config.out_dir)
    if path is None:
        raise BadConfigError(f"no checkpoint found for {checkpoint!r} in {config.out_dir}")
    module = get_task(config.task)(config).module
    if not hasattr(module, "export"):
        raise BadConfigError(f"task {config.task!r} does not export predictor folders")
    try:
        module.load_state_dict(load_checkpoint(path)["model"])  # a validated state dict of finite tensors
    except RuntimeError as err:  # missing/unexpected keys, shape mismatches
        raise BadConfigError(
            f"checkpoint {path} does not fit the model built from this config: {clean_message(err)}",
            hint="Export with the config the checkpoint was trained with (model, model_kwargs, ...).",
        ) from None
    return Path(module.export(out_dir))
