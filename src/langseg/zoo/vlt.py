"""VLT in the zoo: registry entries, typed predictor options, checkpoints with their vocabulary, Referrer.

A VLT checkpoint is the one layout of :mod:`langseg.hub`; its ``config.json`` records the registry name,
the network's arguments (``kwargs``), the tokenizer (the whole vocabulary) and the pixel normalisation
(``preprocess``), so that a folder alone rebuilds the Referrer it was saved from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from langseg.errors import BadConfigError, BadDataError
from langseg.hub import (
    checkpoint_files,
    config_dict,
    config_normalisation,
    read_checkpoint,
    reading_config,
    resolve_weights,
    save_checkpoint,
    state_mismatch,
)
from langseg.models.vlt import THRESHOLD, VLT, vlt_darknet53, vlt_shapes, vlt_swinb, vlt_tiny
from langseg.predict.base import check_probability
from langseg.predict.images import IMAGENET_MEAN, IMAGENET_STD, UNIT_MEAN, UNIT_STD
from langseg.predict.referrer import UPSAMPLE, Letterbox, Referrer
from langseg.predict.tokenizers import Tokenizer, Vocab, tokenizer_from_config
from langseg.registry import Family, ModelEntry, WeightsSpec, register_family, register_model
from langseg.zoo.options import as_float_dtype, refit

# Weights that ship inside the package (langseg/weights/<name>/), checked by digest when loaded.
VLT_SHAPES_SHA256 = "2e2e7b615de0b4c4534732f897307dd646c6551547a6cb6f945f0e03170c4085"


@dataclass(frozen=True)
class VLTOptions:
    """What ``langseg.load("vlt-...", **options)`` takes.

    Attributes:
        threshold: foreground when the sigmoid probability exceeds it (official 0.35).
        upsample: resize the ``"logits"`` (default) or the ``"probability"`` (official) to the image.
        dtype: weight dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``); inputs
            are cast to it, probabilities come back float32.
    """

    threshold: float = THRESHOLD
    upsample: str = "logits"
    dtype: str | torch.dtype = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", as_float_dtype(self.dtype))
        object.__setattr__(self, "threshold", check_probability(self.threshold, "threshold"))  # VLT: 0.35
        if not isinstance(self.upsample, str) or self.upsample not in UPSAMPLE:
            raise BadConfigError(f"unknown upsample {self.upsample!r}", hint=f"Use one of {UPSAMPLE}.")


def save_vlt(
    model: VLT, tokenizer: Tokenizer, out_dir: str | Path, name: str, preprocess: dict[str, Any] | None = None
) -> Path:
    """Write a checkpoint :func:`langseg.load` reads back as a Referrer.

    ``preprocess`` (``mean``/``std``) defaults to the registry entry's, if ``name`` is registered.
    """
    from langseg.registry import get_model_entry

    if preprocess is None:
        try:
            preprocess = dict(get_model_entry(name).preprocess)
        except LookupError:
            preprocess = {}
    config = {
        "model": name,
        "family": "vlt",
        "kwargs": model.config,
        "tokenizer": tokenizer.to_config(),
        "preprocess": {k: list(v) for k, v in preprocess.items()},
    }
    return save_checkpoint(model, out_dir, config)


def load_vlt(entry: ModelEntry, weights: Path | None = None) -> tuple[VLT, Tokenizer, dict[str, Any]]:
    """(network with weights, tokenizer, checkpoint config) of ``entry`` or of a local checkpoint.

    Every value of ``config.json`` is checked before it is used: the network is first built on the meta
    device (no memory, whatever sizes the file claims) and its tensors compared with the file's, so a
    mismatch names the first key that differs.

    Raises:
        BadDataError: the folder's config or weights are malformed, hold NaN/inf, or do not fit.
    """
    source = resolve_weights(entry.weights, entry.name, weights)
    state, config = read_checkpoint(source)
    config_file = checkpoint_files(source)[0]
    if config.get("family", "vlt") != "vlt":
        raise BadDataError(
            f"{config_file} describes a {config.get('family')!r:.40} model, not a VLT",
            hint=f"Load the folder by itself (langseg.load({str(source)!r})): its config names the model.",
        )
    if not isinstance(config.get("tokenizer"), dict):
        raise BadDataError(
            f"{config_file} records no tokenizer",
            hint="Save VLT checkpoints with langseg.zoo.vlt.save_vlt (it stores the vocabulary).",
        )
    kwargs = {**entry.kwargs, **config_dict(config, "kwargs", config_file)}
    with reading_config(config_file, "building the tokenizer"):
        tokenizer = tokenizer_from_config(config["tokenizer"])
    with reading_config(config_file, f"building {entry.name} from its kwargs"), torch.device("meta"):
        shapes = entry.builder(**kwargs)
    problem = state_mismatch(shapes.state_dict(), state)
    if problem is not None:
        raise BadDataError(
            f"the weights in {source} do not fit {entry.name}: {problem}",
            hint="Load it with the registry name it was saved under (or the folder by itself).",
        )
    embed = getattr(shapes.text, "embed", None)
    if isinstance(tokenizer, Vocab) and embed is not None and len(tokenizer) > embed.num_embeddings:
        raise BadDataError(
            f"{config_file}: the vocabulary has {len(tokenizer)} ids but the model embeds "
            f"{embed.num_embeddings}",
            hint="Save the checkpoint with the vocabulary it was trained with (save_vlt).",
        )
    with reading_config(config_file, f"building {entry.name} from its kwargs"):
        model = entry.builder(**kwargs)
    model.load_state_dict(state, strict=True)  # fits: checked on the meta network above
    return model, tokenizer, config


def load_predictor(
    entry: ModelEntry, weights: Path | None, device: str | torch.device, options: VLTOptions
) -> Referrer:
    """The family's ``load_predictor``: a Referrer with weights, vocabulary and normalisation."""
    model, tokenizer, config = load_vlt(entry, weights)
    source = checkpoint_files(resolve_weights(entry.weights, entry.name, weights))[0]
    pre = {**entry.preprocess, **config_dict(config, "preprocess", source)}
    mean, std = config_normalisation(pre, source, UNIT_MEAN, UNIT_STD)
    return Referrer(
        model.to(dtype=options.dtype),  # type: ignore[arg-type]
        tokenizer,
        letterbox=Letterbox(mean=mean, std=std),
        device=device,
        threshold=options.threshold,
        upsample=options.upsample,
    )


def load_network(entry: ModelEntry, weights: Path | None, **kwargs: Any) -> VLT:
    """The family's ``load_network``: the bare :class:`VLT`, sized as its checkpoint records."""
    model, _, config = load_vlt(entry, weights)
    if not kwargs:
        return model
    rebuilt = entry.builder(**{**entry.kwargs, **config.get("kwargs", {}), **kwargs})
    return refit(entry.name, model, rebuilt, kwargs)


FAMILY = register_family(Family("vlt", VLTOptions, load_predictor, load_network))
# Pixel normalisation per variant: the official Darknet sees RGB in [0, 1]; timm's ImageNet backbones
# their usual statistics; vlt-shapes' bundled config.json records its recipe's (CLIP) statistics.
_UNIT = {"mean": UNIT_MEAN, "std": UNIT_STD}
for _name, _builder, _description, _weights, _preprocess in (
    (
        "vlt-darknet53",
        vlt_darknet53,
        "VLT, Darknet-53 backbone, bi-GRU words, 416 input (paper)",
        None,
        _UNIT,
    ),
    (
        "vlt-swinb",
        vlt_swinb,
        "VLT, Swin-B/12 384 backbone, bi-GRU words",
        None,
        {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    ),
    ("vlt-tiny", vlt_tiny, "VLT architecture at toy size, random weights (tests)", None, _UNIT),
    (
        "vlt-shapes",
        vlt_shapes,
        "VLT trained on ShapeWorld-Ref, 64 x 64 (weights ship with langseg)",
        WeightsSpec.bundled(VLT_SHAPES_SHA256),
        {},
    ),
):
    register_model(
        ModelEntry(
            name=_name,
            family="vlt",
            task="referring",
            builder=_builder,
            description=_description,
            weights=_weights,
            preprocess=_preprocess,
        )
    )
