"""Converters from official checkpoints to langseg's safetensors + config.json layout."""

from langseg.convert.lseg_official import (
    ConvertedLSeg,
    LSegBundle,
    convert_lseg_official,
    load_lseg,
    official_to_langseg,
    read_official_checkpoint,
)

__all__ = [
    "ConvertedLSeg",
    "LSegBundle",
    "convert_lseg_official",
    "load_lseg",
    "official_to_langseg",
    "read_official_checkpoint",
]
