"""LSeg: language-driven semantic segmentation (Li et al., ICLR 2022).

A ViT + DPT image encoder maps every pixel to a ``D``-dim embedding in CLIP's text space; logits are
scaled cosine similarities with label embeddings, optionally smoothed by label-equivariant spatial
regularisation blocks, then upsampled x2 to the input size.

The network takes label *embeddings*, not text: encode the labels once with a text encoder (for LSeg,
the frozen CLIP ViT-B/32 text tower, :class:`langseg.models.text.ClipTextEncoder`) and reuse them.
Importing this module registers ``lseg-vitl16-384``, ``lseg-vitb32-384`` and ``lseg-tiny``; their
registry loader (:func:`load_lseg_segmenter`, used by :func:`langseg.load`) wraps the network in a
:class:`langseg.predict.Segmenter`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from langseg.errors import BadConfigError, BadLabelsError, MissingWeightsError
from langseg.models.backbones import TimmViTTower
from langseg.models.dpt import DPTDecoder, DPTReassemble
from langseg.registry import ModelEntry, register_model

if TYPE_CHECKING:  # the predictor layer is imported lazily: building a network needs none of it
    from langseg.models.text import ClipTextEncoder
    from langseg.predict import InferencePlan, Segmenter

# The official network multiplies by exp(log(1/0.07)) = 1/0.07, a constant it never trains.
OFFICIAL_LOGIT_SCALE = 1 / 0.07
SPATIAL_REGS = ("none", "bottleneck", "depthwise")
ACTIVATIONS = {"relu": nn.ReLU, "lrelu": nn.LeakyReLU, "tanh": nn.Tanh}


class SpatialRegularizer(nn.Module):
    """Label-equivariant smoothing of ``B x K x H x W`` logits (LSeg's spatial regularisation blocks).

    One 3x3 kernel ``k`` is shared by every label channel, so permuting labels permutes the output.
    Each step is

    - ``bottleneck``: ``act(k * x + max_K(x))`` (the max over labels is broadcast back to every channel),
    - ``depthwise``:  ``act(k * x)``,

    applied ``depth`` times with the *same* kernel (as the official network does), with no activation
    after the last step.

    Args:
        kind: ``"bottleneck"`` or ``"depthwise"``.
        depth: number of steps (>= 1).
        activation: ``"relu"``, ``"lrelu"`` (LeakyReLU, slope 0.01) or ``"tanh"``.
    """

    def __init__(self, kind: str = "bottleneck", depth: int = 1, activation: str = "lrelu") -> None:
        super().__init__()
        if kind not in ("bottleneck", "depthwise"):
            raise BadConfigError(
                f"unknown spatial regularisation {kind!r}", hint="Use bottleneck or depthwise."
            )
        if depth < 1:
            raise BadConfigError(f"spatial regularisation depth must be >= 1, got {depth}")
        if activation not in ACTIVATIONS:
            raise BadConfigError(
                f"unknown activation {activation!r}", hint=f"Use one of {list(ACTIVATIONS)}."
            )
        self.kind, self.depth = kind, depth
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1)
        self.act = ACTIVATIONS[activation]()

    def step(self, logits: torch.Tensor, activate: bool) -> torch.Tensor:
        """One block on ``B x K x H x W`` logits."""
        b, k, h, w = logits.shape
        out = self.conv(logits.reshape(b * k, 1, h, w)).reshape(b, k, h, w)
        if self.kind == "bottleneck":
            out = out + logits.amax(dim=1, keepdim=True)
        return self.act(out) if activate else out

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        for index in range(self.depth):
            logits = self.step(logits, activate=index < self.depth - 1)
        return logits


class LSegNet(nn.Module):
    """ViT + DPT pixel encoder scored against label embeddings.

    Args:
        backbone: timm ViT name, or ``None`` to build ``vit_kwargs`` directly (tiny test towers).
        hooks: ViT blocks feeding DPT (defaults per backbone).
        vit_kwargs: extra timm keyword arguments.
        widths: channels of the four reassembled maps.
        features: DPT decoder width.
        readout: ``"ignore"``, ``"add"`` or ``"project"`` (LSeg: project).
        use_bn: BatchNorm in the fusion blocks (LSeg: True).
        embed_dim: ``D``, pixel/text embedding width (512 for CLIP ViT-B/32).
        spatial_reg: ``"none"``, ``"bottleneck"`` or ``"depthwise"``.
        spatial_reg_depth: number of regularisation steps.
        spatial_reg_activation: activation between steps.
        logit_scale: initial multiplier of the cosine similarities (stored as its log, learnable).
        conv_stem: convolutional patch embedding (small models trained from scratch; see
            :func:`langseg.models.backbones.conv_patch_stem`).
    """

    def __init__(
        self,
        backbone: str | None = "vit_large_patch16_384",
        hooks: tuple[int, ...] | list[int] | None = None,
        vit_kwargs: dict[str, Any] | None = None,
        widths: tuple[int, ...] | list[int] = (256, 512, 1024, 1024),
        features: int = 256,
        readout: str = "project",
        use_bn: bool = True,
        embed_dim: int = 512,
        spatial_reg: str = "none",
        spatial_reg_depth: int = 1,
        spatial_reg_activation: str = "lrelu",
        logit_scale: float = OFFICIAL_LOGIT_SCALE,
        conv_stem: bool = False,
    ) -> None:
        super().__init__()
        if spatial_reg not in SPATIAL_REGS:
            raise BadConfigError(f"unknown spatial_reg {spatial_reg!r}", hint=f"Use one of {SPATIAL_REGS}.")
        self.encoder = TimmViTTower(backbone, hooks=hooks, vit_kwargs=vit_kwargs, conv_stem=conv_stem)
        self.reassemble = DPTReassemble(self.encoder.embed_dim, widths, self.encoder.patch_size[0], readout)
        self.decoder = DPTDecoder(widths, features, use_bn)
        self.head = nn.Conv2d(features, embed_dim, kernel_size=1)
        # Stored as a log (CLIP convention) so that training keeps the scale positive.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.spatial_reg = (
            None
            if spatial_reg == "none"
            else SpatialRegularizer(spatial_reg, spatial_reg_depth, spatial_reg_activation)
        )
        self.embed_dim = embed_dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel embeddings.

        Args:
            images: ``B x 3 x H x W``, normalised with mean = std = 0.5 (LSeg), H and W multiples of the
                patch size (32 keeps every DPT level aligned).

        Returns:
            ``B x D x H/2 x W/2`` L2-normalised pixel embeddings (cache them to try many label sets).
        """
        tokens, grid = self.encoder(images)
        pixels = self.head(self.decoder(self.reassemble(tokens, grid)))
        return F.normalize(pixels, dim=1)

    def classify(self, pixel_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Score pixel embeddings against labels.

        Args:
            pixel_embeddings: ``B x D x h x w`` from :meth:`encode_image`.
            text_embeddings: ``K x D`` label embeddings (any norm; normalised here).

        Returns:
            ``B x K x 2h x 2w`` logits: ``scale * cos(pixel, label)``, regularised, upsampled x2
            (bilinear, ``align_corners=True``, as the official head).
        """
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] == 0:
            raise BadLabelsError(
                f"expected K x D label embeddings with K >= 1, got {tuple(text_embeddings.shape)}"
            )
        if text_embeddings.shape[1] != pixel_embeddings.shape[1]:
            raise BadLabelsError(
                f"label embeddings have width {text_embeddings.shape[1]}, the model expects "
                f"{pixel_embeddings.shape[1]}",
                hint="Encode the labels with the text encoder that matches this model.",
            )
        text = F.normalize(text_embeddings.to(pixel_embeddings.dtype), dim=1)
        logits = self.logit_scale.exp() * torch.einsum("bdhw,kd->bkhw", pixel_embeddings, text)
        if self.spatial_reg is not None:
            logits = self.spatial_reg(logits)
        return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` images and ``K x D`` label embeddings -> ``B x K x H x W`` logits."""
        return self.classify(self.encode_image(images), text_embeddings)


# --- registered variants ----------------------------------------------------------------------------

LSEG_CONFIGS: dict[str, dict[str, Any]] = {
    # The paper's model: ViT-L/16 image encoder, CLIP ViT-B/32 text space.
    "lseg-vitl16-384": {
        "backbone": "vit_large_patch16_384",
        "hooks": [5, 11, 17, 23],
        "widths": [256, 512, 1024, 1024],
    },
    "lseg-vitb32-384": {
        "backbone": "vit_base_patch32_384",
        "hooks": [2, 5, 8, 11],
        "widths": [96, 192, 384, 768],
    },
    # A few-hundred-kilobyte network with the same structure as the ViT-L/16 one, for tests.
    "lseg-tiny": {
        "backbone": None,
        "hooks": [0, 1, 2, 3],
        "vit_kwargs": {"img_size": 64, "patch_size": 16, "embed_dim": 48, "depth": 4, "num_heads": 2},
        "widths": [8, 16, 32, 32],
        "features": 16,
        "embed_dim": 32,
    },
}

# Text towers whose embedding space each variant was trained in (kwargs of ClipTextEncoder).
# LSeg uses OpenAI's CLIP ViT-B/32, hence QuickGELU.
TEXT_ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "lseg-vitl16-384": {"model_name": "ViT-B-32", "quick_gelu": True},
    "lseg-vitb32-384": {"model_name": "ViT-B-32", "quick_gelu": True},
    "lseg-tiny": {
        "model_name": None,
        "quick_gelu": True,
        "embed_dim": 32,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
}


def lseg_vitl16_384(**kwargs: Any) -> LSegNet:
    """LSeg with a ViT-L/16 (384) image encoder, as in the paper."""
    return LSegNet(**{**LSEG_CONFIGS["lseg-vitl16-384"], **kwargs})


def lseg_vitb32_384(**kwargs: Any) -> LSegNet:
    """LSeg with a ViT-B/32 (384) image encoder."""
    return LSegNet(**{**LSEG_CONFIGS["lseg-vitb32-384"], **kwargs})


def lseg_tiny(**kwargs: Any) -> LSegNet:
    """A tiny LSeg (4-block ViT, 16-wide decoder, 32-dim embeddings) for tests."""
    return LSegNet(**{**LSEG_CONFIGS["lseg-tiny"], **kwargs})


# --- predictor --------------------------------------------------------------------------------------
# Kept beside the builders so that each registry entry carries its loader; everything on the predictor
# side (tokenizer, Segmenter, plans, checkpoint files) is imported inside the functions.

# What the official code feeds CLIP: the raw label text (lseg_net.py: clip.tokenize(labelset)), with
# ViT-B/32's tokenizer, and images normalised with mean = std = 0.5 (lseg_module.py, lseg_app.py).
LSEG_TOKENIZER = "ViT-B-32"
LSEG_MEAN = LSEG_STD = (0.5, 0.5, 0.5)
PLAN_NAMES = ("single", "paper", "native")


def lseg_plan(name: str) -> InferencePlan:
    """A named test-time plan.

    - ``"single"``: the long side resized to 480 (the training crop), one pass, no flip.
    - ``"native"``: the image as it is (padded to the patch size), one pass: for models trained at
      another resolution, such as the ShapeWorld recipe (96 pixels); exported models record it.
    - ``"paper"``: the official evaluation (additional_utils/models.py, test_lseg.py): the long side
      resized to ``s * 520`` for ``s`` in 0.5 ... 1.75, 480 windows every ``int(480 * 2/3) = 320`` pixels,
      plus the horizontal flip.
    """
    from langseg.predict.tta import PAPER_SCALES, InferencePlan

    if name == "single":
        return InferencePlan(base_size=480)
    if name == "native":
        return InferencePlan()
    if name == "paper":
        return InferencePlan(crop=480, stride=320, scales=PAPER_SCALES, base_size=520, flip=True)
    raise BadConfigError(f"unknown LSeg plan {name!r}", hint=f"Use one of {PLAN_NAMES} or an InferencePlan.")


class LSegCallables:
    """The three model callables a :class:`~langseg.predict.Segmenter` needs, over one loaded LSeg.

    Reach it from a predictor as ``segmenter.encode_image.__self__`` (``.net``, ``.text_encoder``).
    """

    def __init__(self, net: LSegNet, text_encoder: ClipTextEncoder, tokenizer: Callable[..., Any]) -> None:
        self.net, self.text_encoder, self.tokenizer = net, text_encoder, tokenizer
        self.dtype = next(net.parameters()).dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` float32 normalised images -> ``B x D x H/2 x W/2`` pixel embeddings."""
        return self.net.encode_image(images.to(self.dtype))  # bf16 weights take bf16 inputs

    def dense_logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Pixel embeddings and ``K x D`` label embeddings -> ``B x K x H x W`` logits."""
        return self.net.classify(features, text)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``K`` label texts -> ``K x D`` embeddings (the raw text, as the official code feeds CLIP)."""
        tokens = self.tokenizer(prompts).to(next(self.text_encoder.parameters()).device)
        return self.text_encoder.encode(tokens)


def lseg_segmenter(
    net: LSegNet,
    text_encoder: ClipTextEncoder,
    device: str | torch.device = "cpu",
    *,
    plan: str | InferencePlan = "single",
    dtype: torch.dtype | str = torch.float32,
    **segmenter_options: Any,
) -> Segmenter:
    """Wrap an LSeg network and its text encoder in a :class:`~langseg.predict.Segmenter`.

    Args:
        net, text_encoder: the model (moved to ``device``, set to eval mode).
        device: where the model runs.
        plan: ``"single"`` (default), ``"paper"`` (see :func:`lseg_plan`) or an ``InferencePlan``.
        dtype: weight dtype of the image network, e.g. ``torch.bfloat16`` (inputs are cast to it; logits
            come back float32). The text tower stays float32: it runs once per label set, and in bf16 on
            CPU it was 2.5x slower (its batched matmuls copy their operands).
        segmenter_options: ``max_labels``, ``text_cache_size``, ``feature_cache_bytes``, ``preprocess``.
    """
    import open_clip

    from langseg.predict import Preprocess, Segmenter

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)  # type: ignore[assignment]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadConfigError(f"dtype must be a float dtype such as torch.bfloat16, got {dtype!r}")
    plan = lseg_plan(plan) if isinstance(plan, str) else plan
    net = net.to(device=device, dtype=dtype).eval()
    text_encoder = text_encoder.to(device=device, dtype=torch.float32).eval()
    # The tokenizer pads to the text tower's own context (77 for CLIP; small towers trained on
    # ShapeWorld use fewer positions).
    tokenizer = open_clip.get_tokenizer(LSEG_TOKENIZER, context_length=text_encoder.context_length)
    parts = LSegCallables(net, text_encoder, tokenizer)
    # Pad to the patch size (odd token grids are fine). When the plan resizes to a base size, shrink big
    # photos with PIL's antialiasing to the plan's largest side first, before its own bilinear resizing.
    largest = 2048 if plan.base_size is None else max(1, round(max(plan.scales) * plan.base_size))
    segmenter_options.setdefault(
        "preprocess",
        Preprocess(max_side=largest, pad_multiple=net.encoder.patch_size[0], mean=LSEG_MEAN, std=LSEG_STD),
    )
    return Segmenter(
        parts.encode_image,
        parts.dense_logits,
        parts.encode_text,
        plan=plan,
        device=device,
        **segmenter_options,
    )


def load_lseg_segmenter(
    entry: ModelEntry,
    weights: Any = None,
    device: str | torch.device = "cpu",
    *,
    arch_option: int | None = None,
    block_depth: int | None = None,
    activation: str | None = None,
    **options: Any,
) -> Segmenter:
    """The registry loader of the LSeg entries (``langseg.load``): a ready ``Segmenter``.

    Args:
        entry: the registry entry (its name is the variant).
        weights: a converted folder (or its ``model.safetensors``) or an official ``.ckpt``.
        device: where the model runs.
        arch_option, block_depth, activation: official spatial-regularisation options (official ckpt only).
        options: ``plan``, ``dtype`` and Segmenter options, see :func:`lseg_segmenter`.
    """
    from langseg.convert.lseg_official import load_lseg

    if weights is None:
        raise MissingWeightsError(
            f"{entry.name!r} has no published langseg weights yet",
            hint="Convert the official checkpoint once (`langseg convert lseg-official demo_e200.ckpt "
            "lseg-vitl16/`, see docs/lseg.md), then langseg.load('lseg-vitl16/'); or pass "
            f"langseg.load({entry.name!r}, weights='path/to/official.ckpt').",
        )
    net, text_encoder, config = load_lseg(
        weights, variant=entry.name, arch_option=arch_option, block_depth=block_depth, activation=activation
    )
    if config.get("variant") != entry.name:
        raise BadConfigError(
            f"{weights} holds {config.get('variant')!r}, not {entry.name!r}",
            hint=f"Load it as langseg.load({str(weights)!r}) (its config.json names the model).",
        )
    # A model trained by langseg records the plan it suits (e.g. its training resolution).
    options.setdefault("plan", config.get("predict", {}).get("plan", "single"))
    return lseg_segmenter(net, text_encoder, device, **options)


def _register() -> None:
    entries = [
        (
            "lseg-vitl16-384",
            lseg_vitl16_384,
            "LSeg, ViT-L/16 DPT image encoder, CLIP ViT-B/32 labels (paper)",
        ),
        ("lseg-vitb32-384", lseg_vitb32_384, "LSeg, ViT-B/32 DPT image encoder, CLIP ViT-B/32 labels"),
        ("lseg-tiny", lseg_tiny, "LSeg architecture at toy size, random weights (tests)"),
    ]
    for name, builder, description in entries:
        register_model(
            ModelEntry(
                name=name,
                family="lseg",
                task="semantic",
                builder=builder,
                description=description,
                loader=load_lseg_segmenter,
            )
        )


_register()
