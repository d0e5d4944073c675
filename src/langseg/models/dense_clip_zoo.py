"""Training-free dense CLIP by name: ``naclip-vit-b16``, ... and ``mode:ARCH/TAG`` for any open_clip ViT.

A name picks a last-block mode of :class:`~langseg.models.dense_clip.DenseCLIP` and open_clip weights;
:func:`langseg.load` returns a :class:`~langseg.predict.Segmenter` wired to them: prompt-ensembled text
embeddings (the 80 ImageNet templates of the CLIP paper), sliding windows, the papers' logit scale and,
for NACLIP, PAMR refinement. Weights come through open_clip's pretrained catalogue and its Hugging Face
cache; ``weights=PATH`` loads a local open_clip checkpoint (``.bin``, ``.pt`` or ``.safetensors``) instead.
Offline, a missing file is a :class:`MissingWeightsError` at once, never a hang. See docs/dense_clip.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from langseg.errors import BadConfigError, BadDataError, MissingWeightsError, UnknownModelError
from langseg.hub import hub_offline, hub_reachable
from langseg.models.dense_clip import MODES, DenseCLIP, dense_logits
from langseg.models.pamr import NACLIP_DILATIONS, NACLIP_ITERATIONS, PAMR
from langseg.predict.segmenter import CLIP_MEAN, CLIP_STD, Preprocess, Segmenter
from langseg.predict.tta import InferencePlan
from langseg.registry import ModelEntry, register_model, register_resolver

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


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """``templates`` as a tuple, each holding exactly one ``{}``; raises :class:`BadConfigError`."""
    if isinstance(templates, str) or not templates:
        raise BadConfigError(
            "templates must be a non-empty list of strings", hint='e.g. templates=["a photo of a {}."]'
        )
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise BadConfigError(
                f"template {template!r} must contain '{{}}' exactly once", hint="'{}' marks the label."
            )
    return tuple(templates)


def encode_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``K x L`` token ids -> ``K x D`` text embeddings, equal to ``model.encode_text(tokens)``.

    For a plain open_clip ``CLIP`` (causal mask, pooled at the end-of-text token) only the positions up to
    the last end-of-text token are run: under a causal mask later (padding) positions cannot reach the
    pooled one, so the result is the same while short prompts cost far less (80 templates: 12 positions
    instead of 77, 7x faster on a CPU).
    """
    exact_cut = (
        hasattr(model, "token_embedding")
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) == "argmax"
    )
    if not exact_cut:
        return model.encode_text(tokens)
    eot = tokens.argmax(dim=-1)  # the end-of-text id is the largest in CLIP's vocabulary
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    projection = model.text_projection
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class PromptEnsemble:
    """``encode_text`` for the Segmenter: labels -> ``P x D`` prompt-ensembled, unit-norm embeddings.

    Each label is put into every template; the label's embedding is the mean over templates of the
    L2-normalised text embeddings, renormalised (CLIP's prompt ensembling, as NACLIP/SCLIP/ClearCLIP use).
    The Segmenter caches the result per label set.

    Args:
        model: an open_clip CLIP (its text tower is used).
        tokenizer: its open_clip tokenizer (``open_clip.get_tokenizer(arch)``).
        templates: strings with one ``{}``; default :data:`IMAGENET_TEMPLATES`.
        batch_size: prompts per text-tower call (bounds memory for hundreds of labels).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        batch_size: int = 256,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.templates = check_templates(templates)
        self.batch_size = batch_size

    def __call__(self, labels: list[str]) -> torch.Tensor:
        """``P x D`` embeddings of ``P`` labels (float32, or float64 for a float64 model)."""
        prompts = [template.replace("{}", label) for label in labels for template in self.templates]
        device = next(self.model.parameters()).device
        parts = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[start : start + self.batch_size]).to(device)
            embeddings = encode_tokens(self.model, tokens)
            # Average in at least float32: bf16 weights must not round the ensemble.
            parts.append(
                F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=-1)
            )
        per_template = torch.cat(parts).view(len(labels), len(self.templates), -1)
        return F.normalize(per_template.mean(dim=1), dim=-1)


class DenseImageEncoder:
    """``encode_image`` for the Segmenter: ``B x 3 x H x W`` -> ``B x D x H/p x W/p`` (weights' dtype)."""

    def __init__(self, dense: DenseCLIP) -> None:
        self.dense = dense

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.dense(images.to(self.dense.visual.conv1.weight.dtype))


def dense_clip_segmenter(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    mode: str = "naclip",
    *,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    short_side: int | None = None,
    crop: int | None = None,
    stride: int | None = None,
    logit_scale: float | None = None,
    pamr: bool | None = None,
    pamr_iterations: int = NACLIP_ITERATIONS,
    pamr_dilations: Sequence[int] = NACLIP_DILATIONS,
    sigma: float = 5.0,
    batch_size: int = 8,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    device: str | torch.device = "cpu",
    max_labels: int = 1024,
) -> Segmenter:
    """A :class:`Segmenter` over an open_clip CLIP ``model`` (weights loaded) in dense ``mode``.

    ``None`` options take the mode's :data:`MODE_DEFAULTS`; ``short_side=0`` keeps the image size (up to
    the Segmenter's ``max_side``). The model is put in eval mode on ``device`` and frozen, never copied.
    """
    if mode not in MODE_DEFAULTS:
        raise BadConfigError(f"unknown dense CLIP mode {mode!r}", hint=f"Choose one of {', '.join(MODES)}.")
    defaults = MODE_DEFAULTS[mode]
    short_side = defaults.short_side if short_side is None else short_side
    crop = defaults.crop if crop is None else crop
    stride = max(1, crop // 2) if stride is None else stride  # half the window in all three papers
    logit_scale = defaults.logit_scale if logit_scale is None else logit_scale
    if short_side < 0 or crop < 1 or not 1 <= stride <= crop or not logit_scale > 0 or batch_size < 1:
        raise BadConfigError(
            f"invalid inference options: short_side={short_side}, crop={crop}, stride={stride}, "
            f"logit_scale={logit_scale}, batch_size={batch_size}",
            hint="Use short_side >= 0, crop >= 1, 1 <= stride <= crop, logit_scale > 0, batch_size >= 1.",
        )
    model = model.to(device).eval().requires_grad_(False)
    dense = DenseCLIP(model, mode, sigma=sigma)
    refine = PAMR(pamr_iterations, pamr_dilations) if (defaults.pamr if pamr is None else pamr) else None
    return Segmenter(
        encode_image=DenseImageEncoder(dense),
        dense_logits=partial(dense_logits, logit_scale=float(logit_scale)),
        encode_text=PromptEnsemble(model, tokenizer, templates),
        plan=InferencePlan(crop=crop, stride=stride, batch_size=batch_size),
        preprocess=Preprocess(
            short_side=short_side or None,
            pad_multiple=dense.patch_size[0],
            mean=tuple(mean),  # type: ignore[arg-type]
            std=tuple(std),  # type: ignore[arg-type]
        ),
        device=device,
        max_labels=max_labels,
        refine=refine,
    )


# ---------------------------------------------------------------------------------------- weights


def open_clip_cache(cache_dir: str | Path | None = None) -> Path:
    """Where open_clip keeps hub downloads: ``cache_dir``, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else huggingface_hub's default (``~/.cache/huggingface/hub``). Read at call time, not import time."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def open_clip_checkpoint(arch: str, tag: str, cache_dir: str | Path | None = None) -> str:
    """Local file of open_clip's ``arch``/``tag`` weights: from the cache, else downloaded by open_clip.

    Raises:
        MissingWeightsError: not cached and offline (``HF_HUB_OFFLINE``), unreachable, or failed download.
    """
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    cfg = _pretrained_cfg(arch, tag)
    cache = open_clip_cache(cache_dir)
    repo, filename = os.path.split(cfg.get("hf_hub", ""))  # "org/name/" names open_clip's default file
    filename = filename or HF_WEIGHTS_NAME
    if repo:
        # open_clip prefers a .safetensors twin of the file when the repo has one; so does the cache lookup.
        safe = filename.rsplit(".", 1)[0] + ".safetensors"
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else safe
        for name in (safe, filename):
            found = try_to_load_from_cache(repo, name, cache_dir=str(cache))
            if isinstance(found, str):
                return found
        wanted = f"{filename} (or its .safetensors) from the Hugging Face repo {repo}"
        fetch = partial(download_pretrained_from_hf, repo, filename=filename, cache_dir=str(cache))
    else:
        wanted = f"the open_clip weights {arch}/{tag}"
        fetch = partial(download_pretrained, cfg, cache_dir=str(cache))
    hint = (
        f"The cache is {cache} (set HF_HUB_CACHE or pass cache_dir= to move it); run once with a network to "
        "fill it, or pass a local open_clip checkpoint (.bin, .pt or .safetensors): "
        "langseg.load(name, weights=PATH) or `langseg segment ... --weights PATH`."
    )
    if hub_offline():
        raise MissingWeightsError(f"{wanted} is not in the cache and HF_HUB_OFFLINE is set", hint=hint)
    if not hub_reachable():
        raise MissingWeightsError(f"{wanted} is not in the cache and the hub cannot be reached", hint=hint)
    try:
        return str(fetch())
    except Exception as err:  # any network, auth or hub failure ends the same way for the user
        raise MissingWeightsError(f"cannot download {wanted} ({type(err).__name__})", hint=hint) from err


def _tags_hint(arch: str) -> str:
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
    return f"open_clip's tags for {arch}: {tags}. Or pass weights=PATH (a local open_clip checkpoint)."


def _pretrained_cfg(arch: str, tag: str) -> dict[str, Any]:
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise UnknownModelError(f"open_clip has no pretrained tag {tag!r} for {arch}", hint=_tags_hint(arch))
    return cfg


def create_open_clip(arch: str, checkpoint: str | None, quick_gelu: bool, dtype: torch.dtype) -> nn.Module:
    """open_clip ``arch`` with the weights of ``checkpoint`` (open_clip accepts a file as ``pretrained``)."""
    try:
        model = open_clip.create_model(arch, pretrained=checkpoint, force_quick_gelu=quick_gelu)
    except Exception as err:  # strict load mismatch, refused pickle, TorchScript archive, corrupt file
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        hint = f"Pass an open_clip state_dict saved for {arch} (.bin/.pt via torch.save, or .safetensors)."
        if "TorchScript" in str(err):
            hint = (
                "This is a TorchScript archive (OpenAI's original .pt); langseg never runs code from files. "
                "If you trust it, convert it once: torch.save(open_clip.load_openai_model(PATH)"
                ".state_dict(), 'weights.bin'), or use open_clip's own download."
            )
        raise BadDataError(f"cannot load {checkpoint} as open_clip {arch}: {text}", hint=hint) from err
    return model.to(dtype)


# ---------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DenseClipSpec:
    """What a dense CLIP name means: a last-block ``mode``, an open_clip ``arch`` and pretrained ``tag``."""

    mode: str
    arch: str
    tag: str | None


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_dense_clip(
    entry: ModelEntry,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    spec: DenseClipSpec,
    cache_dir: str | Path | None = None,
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    **options: Any,
) -> Segmenter:
    """The registry loader (see :func:`langseg.load`): resolve weights, build open_clip, wire a Segmenter.

    Args:
        weights: local open_clip checkpoint used instead of the tag's published weights.
        cache_dir: open_clip/Hugging Face cache to read and fill (default: :func:`open_clip_cache`).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the weights are converted (no autocast).
        quick_gelu: override the activation (default: the tag's, e.g. QuickGELU for OpenAI weights).
        options: :func:`dense_clip_segmenter` options (``templates``, ``short_side``, ``pamr``, ...).
    """
    if precision not in _DTYPES:
        raise BadConfigError(f"unknown precision {precision!r}", hint=f"Choose one of {', '.join(_DTYPES)}.")
    tag_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag) if spec.tag else {}
    if weights is not None:
        checkpoint = str(Path(weights).expanduser())
        if not Path(checkpoint).is_file():
            raise MissingWeightsError(
                f"checkpoint not found: {checkpoint}", hint="Pass the path of an open_clip checkpoint file."
            )
    elif spec.tag is None:
        raise MissingWeightsError(f"{entry.name!r} names no pretrained tag", hint=_tags_hint(spec.arch))
    else:  # resolve (and fail) before building anything: the offline error must be instant
        checkpoint = open_clip_checkpoint(spec.arch, spec.tag, cache_dir)
    config = open_clip.get_model_config(spec.arch) or {}
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", config.get("quick_gelu", False)))
    model = create_open_clip(spec.arch, checkpoint, quick_gelu, _DTYPES[precision])
    try:
        tokenizer = open_clip.get_tokenizer(spec.arch)
    except Exception as err:  # tokenizers hosted on the hub need the network once, like weights
        raise MissingWeightsError(f"cannot load the tokenizer of {spec.arch}: {err}") from err
    options.setdefault("mean", tag_cfg.get("mean", CLIP_MEAN))
    options.setdefault("std", tag_cfg.get("std", CLIP_STD))
    return dense_clip_segmenter(model, tokenizer, spec.mode, device=device, **options)


def build_dense_clip(arch: str, mode: str, quick_gelu: bool = False, **kwargs: Any) -> DenseCLIP:
    """Random-weight :class:`DenseCLIP` over open_clip ``arch`` (use :func:`langseg.load` for weights)."""
    return DenseCLIP(open_clip.create_model(arch, force_quick_gelu=quick_gelu), mode, **kwargs)


def _entry(name: str, spec: DenseClipSpec, description: str) -> ModelEntry:
    quick = bool(open_clip.get_pretrained_cfg(spec.arch, spec.tag).get("quick_gelu")) if spec.tag else False
    return ModelEntry(
        name=name,
        family="dense_clip",
        task="semantic",
        builder=partial(build_dense_clip, spec.arch, spec.mode),
        description=description,
        kwargs={"quick_gelu": quick} if quick else {},
        loader=partial(load_dense_clip, spec=spec),
    )


def resolve_dense_clip(name: str) -> ModelEntry:
    """Entry for ``"mode:ARCH[/TAG]"``, e.g. ``naclip:ViT-L-14/openai`` (ARCH as open_clip names it)."""
    mode, _, rest = name.partition(":")
    arch, tag = rest.replace("/", "-"), None
    if arch not in open_clip.list_models() and "/" in rest:
        arch, _, tag = rest.rpartition("/")
        arch = arch.replace("/", "-")
    if arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        raise UnknownModelError(
            f"open_clip has no model {arch!r} (in {name!r})",
            hint=(f"Did you mean {', '.join(close)}? " if close else "")
            + f"Write {mode}:ARCH/TAG with ARCH from open_clip.list_models(), e.g. {mode}:ViT-B-16/openai.",
        )
    if tag is not None:
        _pretrained_cfg(arch, tag)
    vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    if "timm_model_name" in vision:
        raise BadConfigError(
            f"{arch} has a timm image tower; dense CLIP needs open_clip's own VisionTransformer",
            hint="Pick an open_clip ViT such as ViT-B-16, ViT-L-14 or ViT-H-14.",
        )
    described = f"{arch}/{tag}" if tag else f"{arch} (weights=PATH)"
    return _entry(name, DenseClipSpec(mode, arch, tag), f"{mode} training-free dense CLIP on {described}")


for _mode, _what in (
    ("naclip", "NACLIP (WACV 2025) on open_clip ViT-B-16/openai: the default for real photos"),
    ("clearclip", "ClearCLIP (ECCV 2024) on open_clip ViT-B-16/openai"),
    ("sclip", "SCLIP (ECCV 2024) on open_clip ViT-B-16/openai"),
    ("maskclip", "MaskCLIP (ECCV 2022) on open_clip ViT-B-16/openai"),
):
    register_model(_entry(f"{_mode}-vit-b16", DenseClipSpec(_mode, "ViT-B-16", "openai"), _what))
for _mode in MODES:
    register_resolver(_mode, resolve_dense_clip)

__all__ = [
    "IMAGENET_TEMPLATES",
    "MODE_DEFAULTS",
    "DenseClipSpec",
    "ModeDefaults",
    "PromptEnsemble",
    "dense_clip_segmenter",
    "encode_tokens",
    "load_dense_clip",
    "open_clip_cache",
    "open_clip_checkpoint",
    "resolve_dense_clip",
]
