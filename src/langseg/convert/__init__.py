"""Converters from official checkpoints to langseg's one layout (model.safetensors + config.json)."""

from langseg.convert.lseg_official import (
    ConvertedLSeg,
    convert_lseg_official,
    official_to_langseg,
    read_official_checkpoint,
)

__all__ = ["ConvertedLSeg", "convert_lseg_official", "official_to_langseg", "read_official_checkpoint"]
