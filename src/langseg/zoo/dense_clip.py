"""Training-free dense CLIP by name: ``naclip-vit-b16``, ... and ``mode:ARCH/TAG`` for any open_clip ViT.

A name picks a last-block mode of :class:`~langseg.models.dense_clip.DenseCLIP` and open_clip weights;
:func:`langseg.load` returns a :class:`~langseg.predict.Segmenter` over a
:class:`~langseg.models.dense_clip.DenseCLIPModel`: prompt-ensembled text embeddings (the 80 ImageNet
templates of the CLIP paper), sliding windows, the papers' logit scale and, for NACLIP, PAMR refinement.
Weights come through :func:`langseg.hub.resolve_weights` (open_clip's pretrained catalogue and its
Hugging Face cache); ``weights=PATH`` loads a local open_clip checkpoint (``.bin``, ``.pt`` or
``.safetensors``) instead. Offline, a missing file is a :class:`MissingWeightsError` at once, never a
hang. See docs/dense_clip.md.
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from langseg.errors import BadConfigError, BadDataError, MissingWeightsError, UnknownModelError
from langseg.hub import (
    check_finite,
    clean_message,
    open_clip_pretrained_cfg,
    open_clip_tags_hint,
    refused_pickle_message,
    resolve_weights,
)
from langseg.models.dense_clip import MODES, DenseCLIP, DenseCLIPModel
from langseg.models.pamr import NACLIP_DILATIONS, NACLIP_ITERATIONS, PAMR
from langseg.predict.images import CLIP_MEAN, CLIP_STD
from langseg.predict.segmenter import Preprocess, Segmenter, check_templates
from langseg.predict.tta import InferencePlan
from langseg.registry import (
    Family,
    ModelEntry,
    WeightsSpec,
    register_family,
    register_model,
    register_resolver,
)
from langseg.zoo.options import as_float_dtype, check_int, check_number, check_type

# The 80 prompt templates of CLIP's ImageNet zero-shot classifier (Radford et al. 2021), which NACLIP,
# SCLIP and ClearCLIP ensemble for every class name. "{}" stands for the label.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip


@dataclass(frozen=True)
class ModeDefaults:
    """Inference defaults of one mode, from its authors' evaluation code (see docs/dense_clip.md).

    Attributes:
        short_side: resize so the image's short side has this many pixels (mmseg ``Resize((2048, s))``).
        crop: sliding-window side at that resolution; the step is half of it, as in all three papers.
        logit_scale: multiplier of the cosine similarities before the softmax over labels.
        pamr: refine the logits with PAMR (10 iterations, dilations (8, 16)) at the working resolution.
    """

    short_side: int
    crop: int
    logit_scale: float
    pamr: bool


MODE_DEFAULTS: dict[str, ModeDefaults] = {
    "naclip": ModeDefaults(336, 224, 40.0, pamr=True),  # NACLIP main results: PAMR on
    "sclip": ModeDefaults(336, 224, 40.0, pamr=False),  # SCLIP: pamr_steps=0 by default
    "clearclip": ModeDefaults(448, 448, 50.0, pamr=False),  # ClearCLIP: slide 448 (step 224), scale 50
    "maskclip": ModeDefaults(336, 224, 40.0, pamr=False),  # as SCLIP/NACLIP evaluate MaskCLIP
    "vanilla": ModeDefaults(336, 224, 40.0, pamr=False),
}


@dataclass(frozen=True)
class DenseClipOptions:
    """What ``langseg.load("naclip-...", **options)`` takes; ``None`` takes the mode's :data:`MODE_DEFAULTS`.

    Attributes:
        templates: prompt templates, each with one ``{}`` (default :data:`IMAGENET_TEMPLATES`).
        short_side: resize the short side to this (``0`` keeps the image size, up to 2048 on the long side).
        crop, stride: sliding window side and step (default: half the window, as in all three papers).
        logit_scale: multiplier of the cosine similarities.
        pamr, pamr_iterations, pamr_dilations: PAMR refinement (NACLIP's default: on, 10, (8, 16)).
        sigma: NACLIP's Gaussian standard deviation in patches.
        batch_size: windows per image-tower call.
        mean, std: normalisation (default: the pretrained tag's, else CLIP's).
        max_labels: refuse larger label sets.
        cache_dir: open_clip/Hugging Face cache to read and fill.
        dtype: weight dtype, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype`` (the
            weights are converted; no autocast, which was slower on CPU).
        quick_gelu: override the activation (default: the tag's, e.g. QuickGELU for OpenAI weights).
    """

    templates: Sequence[str] = IMAGENET_TEMPLATES
    short_side: int | None = None
    crop: int | None = None
    stride: int | None = None
    logit_scale: float | None = None
    pamr: bool | None = None
    pamr_iterations: int = NACLIP_ITERATIONS
    pamr_dilations: Sequence[int] = NACLIP_DILATIONS
    sigma: float = 5.0
    batch_size: int = 8
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    max_labels: int = 1024
    cache_dir: str | Path | None = None
    dtype: str | torch.dtype = "float32"
    quick_gelu: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", check_templates(self.templates))
        object.__setattr__(self, "dtype", as_float_dtype(self.dtype))
        numbers = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("short_side", "crop", "stride", "batch_size", "max_labels", "pamr_iterations"):
            value = numbers[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise BadConfigError(f"{name} must be an integer, got {value!r:.80}")
        check_int(self.pamr_iterations, "pamr_iterations", 0)
        check_number(self.logit_scale, "logit_scale", positive=True, optional=True)
        check_number(self.sigma, "sigma", positive=True)
        for name in ("pamr", "quick_gelu"):
            check_type(numbers[name], name, bool, "True, False or None")
        check_type(self.cache_dir, "cache_dir", (str, os.PathLike), "a folder path")
        dilations = self.pamr_dilations
        if isinstance(dilations, (str, bytes)) or not isinstance(dilations, Sequence) or not dilations:
            raise BadConfigError(f"pamr_dilations must be a list of positive integers, got {dilations!r:.80}")
        for value in dilations:
            check_int(value, "each of pamr_dilations", 1)
        for name in ("mean", "std"):
            value = numbers[name]
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
                raise BadConfigError(f"{name} must be three numbers (R, G, B), got {value!r:.80}")
            for number in value:
                check_number(number, f"each of {name}", positive=name == "std")

    def resolved(self, mode: str) -> tuple[int, int, int, float, bool]:
        """(short_side, crop, stride, logit_scale, pamr) with the mode's defaults filled in, checked."""
        defaults = MODE_DEFAULTS[mode]
        short_side = defaults.short_side if self.short_side is None else self.short_side
        crop = defaults.crop if self.crop is None else self.crop
        stride = max(1, crop // 2) if self.stride is None else self.stride
        logit_scale = defaults.logit_scale if self.logit_scale is None else self.logit_scale
        if (
            short_side < 0
            or crop < 1
            or not 1 <= stride <= crop
            or not logit_scale > 0
            or self.batch_size < 1
        ):
            raise BadConfigError(
                f"invalid inference options: short_side={short_side}, crop={crop}, stride={stride}, "
                f"logit_scale={logit_scale}, batch_size={self.batch_size}",
                hint="Use short_side >= 0, crop >= 1, 1 <= stride <= crop, logit_scale > 0, batch_size >= 1.",
            )
        return short_side, crop, stride, float(logit_scale), defaults.pamr if self.pamr is None else self.pamr


def dense_clip_segmenter(
    clip: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    mode: str = "naclip",
    device: str | torch.device = "cpu",
    options: DenseClipOptions | None = None,
) -> Segmenter:
    """A :class:`Segmenter` over an open_clip CLIP ``clip`` (weights loaded) in dense ``mode``.

    The model is put in eval mode on ``device`` and frozen, never copied.
    """
    if mode not in MODE_DEFAULTS:
        raise BadConfigError(f"unknown dense CLIP mode {mode!r}", hint=f"Choose one of {', '.join(MODES)}.")
    options = options or DenseClipOptions()
    short_side, crop, stride, logit_scale, pamr = options.resolved(mode)
    clip = clip.requires_grad_(False)
    model = DenseCLIPModel(clip, mode, logit_scale=logit_scale, sigma=options.sigma)
    refine = PAMR(options.pamr_iterations, options.pamr_dilations) if pamr else None
    return Segmenter(
        model,
        tokenizer,
        templates=options.templates,
        plan=InferencePlan(crop=crop, stride=stride, batch_size=options.batch_size),
        preprocess=Preprocess(
            short_side=short_side or None,
            pad_multiple=model.patch_size[0],
            mean=tuple(options.mean or CLIP_MEAN),  # type: ignore[arg-type]
            std=tuple(options.std or CLIP_STD),  # type: ignore[arg-type]
        ),
        device=device,
        max_labels=options.max_labels,
        refine=refine,
    )


def create_open_clip(arch: str, checkpoint: str | None, quick_gelu: bool, dtype: torch.dtype) -> nn.Module:
    """open_clip ``arch`` with the weights of ``checkpoint`` (open_clip accepts a file as ``pretrained``),
    read with ``weights_only=True`` and checked for NaN/inf.

    Raises:
        BadDataError: the file does not fit ``arch``, is damaged, is refused for safety (it pickles code),
            or holds NaN/inf weights.
    """
    try:
        model = open_clip.create_model(
            arch, pretrained=checkpoint, force_quick_gelu=quick_gelu, weights_only=True
        )
    except Exception as err:  # strict load mismatch, refused pickle, TorchScript archive, corrupt file
        hint = f"Pass an open_clip state_dict saved for {arch} (.bin/.pt via torch.save, or .safetensors)."
        text = clean_message(err)
        if _caused_by(err, pickle.UnpicklingError) and checkpoint is not None:
            refused = refused_pickle_message(checkpoint, err)
            text = f"it contains pickled objects that safe loading refuses: {refused}"
        if "TorchScript" in str(err):
            hint = (
                "This is a TorchScript archive (OpenAI's original .pt); langseg never runs code from files. "
                "If you trust it, convert it once: torch.save(open_clip.load_openai_model(PATH)"
                ".state_dict(), 'weights.bin'), or use open_clip's own download."
            )
        raise BadDataError(f"cannot load {checkpoint} as open_clip {arch}: {text}", hint=hint) from err
    if checkpoint is not None:
        check_finite(model.state_dict(), checkpoint)
    return model.to(dtype)


def _caused_by(err: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``err`` or an exception it was raised from or during is a ``kind``."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _open_clip_with_weights(
    entry: ModelEntry, weights: Path | None, options: DenseClipOptions
) -> tuple[nn.Module, dict[str, Any]]:
    """(open_clip model with weights, pretrained-tag config) for a dense CLIP entry."""
    arch, tag = entry.kwargs["arch"], entry.weights.tag if entry.weights else None
    if weights is not None and not Path(weights).expanduser().is_file():
        raise MissingWeightsError(
            f"checkpoint not found: {weights}", hint="Pass the path of an open_clip checkpoint file."
        )
    if weights is None and tag is None:
        raise MissingWeightsError(f"{entry.name!r} names no pretrained tag", hint=open_clip_tags_hint(arch))
    # Resolve (and fail) before building anything: the offline error must be instant.
    checkpoint = resolve_weights(entry.weights, entry.name, weights, open_clip_cache_dir=options.cache_dir)
    tag_cfg = open_clip_pretrained_cfg(arch, tag) if tag else {}
    quick_gelu = options.quick_gelu
    if quick_gelu is None:
        config = open_clip.get_model_config(arch) or {}
        quick_gelu = bool(tag_cfg.get("quick_gelu", config.get("quick_gelu", False)))
    model = create_open_clip(arch, str(checkpoint), quick_gelu, options.dtype)  # type: ignore[arg-type]
    return model, tag_cfg


def load_predictor(
    entry: ModelEntry, weights: Path | None, device: str | torch.device, options: DenseClipOptions
) -> Segmenter:
    """The family's ``load_predictor``: resolve weights, build open_clip, wire a Segmenter."""
    clip, tag_cfg = _open_clip_with_weights(entry, weights, options)
    try:
        tokenizer = open_clip.get_tokenizer(entry.kwargs["arch"])
    except Exception as err:  # tokenizers hosted on the hub need the network once, like weights
        raise MissingWeightsError(f"cannot load the tokenizer of {entry.kwargs['arch']}: {err}") from err
    if options.mean is None or options.std is None:
        options = replace(
            options,
            mean=options.mean or tag_cfg.get("mean", CLIP_MEAN),
            std=options.std or tag_cfg.get("std", CLIP_STD),
        )
    return dense_clip_segmenter(clip, tokenizer, entry.kwargs["mode"], device, options)


def load_network(entry: ModelEntry, weights: Path | None, **kwargs: Any) -> DenseCLIP:
    """The family's ``load_network``: :class:`DenseCLIP` over open_clip with its published weights."""
    clip, _ = _open_clip_with_weights(entry, weights, DenseClipOptions())
    return DenseCLIP(clip, entry.kwargs["mode"], **kwargs)


def build_dense_clip(arch: str, mode: str, quick_gelu: bool = False, **kwargs: Any) -> DenseCLIP:
    """Random-weight :class:`DenseCLIP` over open_clip ``arch`` (use :func:`langseg.load` for weights)."""
    return DenseCLIP(open_clip.create_model(arch, force_quick_gelu=quick_gelu), mode, **kwargs)


def _entry(name: str, mode: str, arch: str, tag: str | None, description: str) -> ModelEntry:
    tag_cfg = open_clip_pretrained_cfg(arch, tag) if tag else {}
    return ModelEntry(
        name=name,
        family="dense_clip",
        task="semantic",
        builder=build_dense_clip,
        description=description,
        weights=WeightsSpec.open_clip(arch, tag) if tag else None,
        kwargs={"arch": arch, "mode": mode, "quick_gelu": bool(tag_cfg.get("quick_gelu", False))},
        preprocess={
            "mean": tuple(tag_cfg.get("mean", CLIP_MEAN)),
            "std": tuple(tag_cfg.get("std", CLIP_STD)),
        },
    )


def resolve_dense_clip(name: str) -> ModelEntry:
    """Entry for ``"mode:ARCH[/TAG]"``, e.g. ``naclip:ViT-L-14/openai`` (ARCH as open_clip names it)."""
    mode, _, rest = name.partition(":")
    arch, tag = rest.replace("/", "-"), None
    if arch not in open_clip.list_models() and "/" in rest:
        arch, _, tag = rest.rpartition("/")
        arch = arch.replace("/", "-")
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        raise UnknownModelError(
            f"open_clip has no model {arch!r} (in {name!r})",
            hint=(f"Did you mean {', '.join(close)}? " if close else "")
            + f"Write {mode}:ARCH/TAG with ARCH from open_clip.list_models(), e.g. {mode}:ViT-B-16/openai.",
        )
    if tag is not None:
        open_clip_pretrained_cfg(arch, tag)
    vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    if "timm_model_name" in vision:
        raise BadConfigError(
            f"{arch} has a timm image tower; dense CLIP needs open_clip's own VisionTransformer",
            hint="Pick an open_clip ViT such as ViT-B-16, ViT-L-14 or ViT-H-14.",
        )
    described = f"{arch}/{tag}" if tag else f"{arch} (weights=PATH)"
    return _entry(name, mode, arch, tag, f"{mode} training-free dense CLIP on {described}")


FAMILY = register_family(Family("dense_clip", DenseClipOptions, load_predictor, load_network))
for _mode, _what in (
    ("naclip", "NACLIP (WACV 2025) on open_clip ViT-B-16/openai: the default for real photos"),
    ("clearclip", "ClearCLIP (ECCV 2024) on open_clip ViT-B-16/openai"),
    ("sclip", "SCLIP (ECCV 2024) on open_clip ViT-B-16/openai"),
    ("maskclip", "MaskCLIP (ECCV 2022) on open_clip ViT-B-16/openai"),
):
    register_model(_entry(f"{_mode}-vit-b16", _mode, "ViT-B-16", "openai", _what))
for _mode in MODES:
    register_resolver(_mode, resolve_dense_clip)
