"""LSeg: language-driven semantic segmentation (Li et al., ICLR 2022).

A ViT + DPT image encoder maps every pixel to a ``D``-dim embedding in CLIP's text space; logits are
scaled cosine similarities with label embeddings, optionally smoothed by label-equivariant spatial
regularisation blocks, then upsampled x2 to the input size.

The network takes label *embeddings*, not text: encode the labels once with a text encoder (for LSeg,
the frozen CLIP ViT-B/32 text tower, :class:`langseg.models.text.ClipTextEncoder`) and reuse them.
:class:`LSeg` holds both towers: it is what a :class:`~langseg.predict.Segmenter` runs and what a
langseg LSeg checkpoint stores (keys ``net.*`` and ``text_encoder.*``). The registry entries and the
predictor wiring live in :mod:`langseg.zoo.lseg`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from langseg.errors import BadConfigError, BadLabelsError
from langseg.models.backbones import TimmResNetTower, TimmViTTower
from langseg.models.dpt import DPTDecoder, DPTReassemble
from langseg.models.text import ClipTextEncoder
from langseg.models.upsampled_cosine import upsampled_cosine

# The official network multiplies by exp(log(1/0.07)) = 1/0.07, a constant it never trains.
OFFICIAL_LOGIT_SCALE = 1 / 0.07
SPATIAL_REGS = ("none", "bottleneck", "depthwise")
# The image network's parts, in the order they run: what LSegNet.set_precision may run in a low dtype.
IMAGE_PARTS = ("encoder", "reassemble", "decoder", "head")
ACTIVATIONS = {"relu": nn.ReLU, "lrelu": nn.LeakyReLU, "tanh": nn.Tanh}
ENCODERS = ("vit", "resnet")


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
    """ViT (or ResNet) + DPT pixel encoder scored against label embeddings.

    Args:
        backbone: timm ViT name, or ``None`` to build ``vit_kwargs`` directly (tiny test towers); a timm
            ResNet name when ``encoder="resnet"``.
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
        encoder: ``"vit"`` (DPT reassembly of four token sequences) or ``"resnet"`` (the zero-shot
            LSeg's ResNet-101: its four stages already are maps at strides 4 ... 32, so the decoder reads
            them directly; ``reassemble`` is an identity and ``widths`` must be the stages' channels).
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
        encoder: str = "vit",
    ) -> None:
        super().__init__()
        if spatial_reg not in SPATIAL_REGS:
            raise BadConfigError(f"unknown spatial_reg {spatial_reg!r}", hint=f"Use one of {SPATIAL_REGS}.")
        if encoder not in ENCODERS:
            raise BadConfigError(f"unknown LSeg encoder {encoder!r}", hint=f"Use one of {ENCODERS}.")
        self.encoder: TimmViTTower | TimmResNetTower
        self.reassemble: nn.Module
        if encoder == "resnet":
            self.encoder = TimmResNetTower(backbone or "resnet101", model_kwargs=vit_kwargs)
            if tuple(widths) != self.encoder.widths:
                raise BadConfigError(
                    f"widths {list(widths)} differ from the ResNet's stage channels "
                    f"{list(self.encoder.widths)}"
                )
            self.reassemble = nn.Identity()  # the stages already are image-like maps
        else:
            self.encoder = TimmViTTower(backbone, hooks=hooks, vit_kwargs=vit_kwargs, conv_stem=conv_stem)
            self.reassemble = DPTReassemble(
                self.encoder.embed_dim, widths, self.encoder.patch_size[0], readout
            )
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
        self.channels_last = False  # see use_channels_last

    @property
    def image_dtype(self) -> torch.dtype:
        """The dtype images enter in: the encoder's weights' (bf16 weights take bf16 inputs)."""
        return _weight_dtype(self.encoder)

    @property
    def score_dtype(self) -> torch.dtype:
        """The dtype of the normalisation, the dot product and the logit scale (see :meth:`set_precision`)."""
        return self.logit_scale.dtype

    def set_precision(self, dtype: torch.dtype, float32_parts: Iterable[str] = ()) -> LSegNet:
        """Run the image network in ``dtype`` but score in float32 (at least); returns ``self``.

        The encoder, reassemble, decoder and head take ``dtype`` (each part in ``float32_parts``, a subset
        of :data:`IMAGE_PARTS`, stays float32); the logit scale and the spatial regularisation take
        ``promote(dtype, float32)``, so :meth:`encode_image` normalises and :meth:`classify` scores in that
        dtype. Why: a random-weight ViT-B/32 LSeg kept 95.4 % of its argmax pixels with every weight in
        bf16, 98.0 % with the scoring in float32 (``benchmarks/bf16_agreement.py``): in bf16 the cosine
        similarities are rounded to ~3 significant digits, and the logit scale itself to 14.25 instead
        of 1/0.07. ``set_precision(torch.float32)`` is ``.to(torch.float32)``; a plain
        ``.to(torch.bfloat16)`` still casts everything, scoring included.
        """
        unknown = sorted(set(float32_parts) - set(IMAGE_PARTS))
        if unknown:
            raise BadConfigError(f"unknown LSeg parts {unknown}", hint=f"Use some of {IMAGE_PARTS}.")
        self.to(torch.promote_types(dtype, torch.float32))  # logit scale, spatial regularisation
        for part in IMAGE_PARTS:
            getattr(self, part).to(torch.float32 if part in float32_parts else dtype)
        return self

    def use_channels_last(self, enabled: bool = True) -> LSegNet:
        """Keep the DPT's convolutions (reassemble, decoder, head) in channels-last memory, weights and
        activations; returns ``self``. The values do not change (within 2e-7 in float32).

        Why: oneDNN's (and cuDNN's) convolutions are fastest on NHWC tensors, and the DPT decoder, at half
        the input resolution with 256 channels, costs more than the ViT. Measured on a 2-core Xeon with
        AMX, ViT-B/32 at 384 px, image network alone: float32 1.28x faster, bfloat16 weights 3.5x faster
        (the NCHW bf16 convolutions were barely faster than float32 ones).
        """
        memory_format = torch.channels_last if enabled else torch.contiguous_format
        for part in (self.reassemble, self.decoder, self.head):
            part.to(memory_format=memory_format)
        self.channels_last = enabled
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel features: the head's output before its x2 upsampling.

        Args:
            images: ``B x 3 x H x W``, normalised with mean = std = 0.5 (LSeg), H and W multiples of the
                patch size (32 keeps every DPT level aligned); any float dtype (cast to the encoder's).

        Returns:
            ``B x D x H/4 x W/4`` features in :attr:`score_dtype`, not normalised (cache them to try
            many label sets). LSeg's pixel embeddings are these upsampled x2 and L2-normalised;
            :meth:`pixel_embeddings` computes them, :meth:`classify` scores without materialising them.
        """
        # Each part takes its inputs in its own weights' dtype (set_precision may mix them); with one
        # dtype throughout every cast is a no-op, so a float32 network computes exactly as before.
        if isinstance(self.encoder, TimmResNetTower):
            maps = self.encoder(images.to(self.image_dtype))
        else:
            tokens, grid = self.encoder(images.to(self.image_dtype))
            dtype = _weight_dtype(self.reassemble)
            maps = self.reassemble([t.to(dtype) for t in tokens], grid)
        dtype = _weight_dtype(self.decoder)
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        pixels = self.decoder([m.to(dtype, memory_format=layout) for m in maps], upsample_last=False)
        # The official head (1x1) runs after the decoder's last x2 upsampling; a 1x1 convolution commutes
        # with bilinear upsampling (weights summing to one), so it runs on the H/4 map here: the same
        # embeddings to float rounding, the head at a quarter of the cost (1.13x the image forward with
        # the decoder's own out_conv moved likewise, ViT-B/32 at 384, float32). The upsampling itself
        # is left to classify (see langseg.models.upsampled_cosine). Scoring runs in the score dtype:
        # the cosine differences that decide the argmax are far below bf16's 3 significant digits.
        return self.head(pixels.to(_weight_dtype(self.head))).to(self.score_dtype)

    @staticmethod
    def pixel_embeddings(features: torch.Tensor) -> torch.Tensor:
        """LSeg's unit-norm pixel embeddings, ``B x D x 2h x 2w``, from :meth:`encode_image`'s
        ``B x D x h x w`` features (the official network's ``image_features``; large: for inspection)."""
        upsampled = F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=True)
        return F.normalize(upsampled, dim=1)

    def classify(self, features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Score pixel features against labels.

        Args:
            features: ``B x D x h x w`` from :meth:`encode_image`.
            text_embeddings: ``K x D`` label embeddings (any norm; normalised here).

        Returns:
            ``B x K x 4h x 4w`` logits in :attr:`score_dtype`: ``scale * cos(pixel, label)`` for the
            pixel embeddings at ``2h x 2w`` (see :meth:`pixel_embeddings`), regularised, upsampled x2
            (bilinear, ``align_corners=True``, as the official head).
        """
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] == 0:
            raise BadLabelsError(
                f"expected K x D label embeddings with K >= 1, got {tuple(text_embeddings.shape)}"
            )
        if text_embeddings.shape[1] != features.shape[1]:
            raise BadLabelsError(
                f"label embeddings have width {text_embeddings.shape[1]}, the model expects "
                f"{features.shape[1]}",
                hint="Encode the labels with the text encoder that matches this model.",
            )
        # Both sides in the scoring dtype (float32 under a bf16 plan): see set_precision.
        text = F.normalize(text_embeddings.to(self.score_dtype), dim=1)
        logits = self.logit_scale.exp() * upsampled_cosine(features.to(self.score_dtype), text)
        if self.spatial_reg is not None:
            logits = self.spatial_reg(logits)
        return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` images and ``K x D`` label embeddings -> ``B x K x H x W`` logits."""
        return self.classify(self.encode_image(images), text_embeddings)


def _weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first parameter (every LSeg part has one)."""
    return next(module.parameters()).dtype


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

# configs/lseg_shapes.yaml's network (the bundled lseg-shapes weights were trained by that recipe): the
# tiny structure at 128 px with an 8-px convolutional patch stem, 96-wide ViT and 64-dim embeddings.
LSEG_CONFIGS["lseg-shapes"] = {
    **LSEG_CONFIGS["lseg-tiny"],
    "vit_kwargs": {"img_size": 128, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
    "widths": [24, 48, 96, 96],
    "features": 48,
    "embed_dim": 64,
    "conv_stem": True,
}

# The zero-shot networks of the official few-shot benchmarks (lseg_net_zs.py): the ViT-L/16 one is the
# semantic network; the ResNet-101 one feeds torchvision-layout ResNet-101 stages to the same decoder.
LSEG_CONFIGS["lseg-zs-vitl16"] = dict(LSEG_CONFIGS["lseg-vitl16-384"])
LSEG_CONFIGS["lseg-zs-rn101"] = {
    "backbone": "resnet101",
    "encoder": "resnet",
    "widths": [256, 512, 1024, 2048],
}
# The semantic network trained in CLIP RN50x16's 768-d text space (official clipRN50x16_vitl16_384).
LSEG_CONFIGS["lseg-rn50x16-vitl16-384"] = {**LSEG_CONFIGS["lseg-vitl16-384"], "embed_dim": 768}

# Text towers whose embedding space each variant was trained in (kwargs of ClipTextEncoder).
# LSeg uses OpenAI's CLIP ViT-B/32, hence QuickGELU.
TEXT_ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "lseg-vitl16-384": {"model_name": "ViT-B-32", "quick_gelu": True},
    "lseg-vitb32-384": {"model_name": "ViT-B-32", "quick_gelu": True},
    "lseg-zs-vitl16": {"model_name": "ViT-B-32", "quick_gelu": True},
    "lseg-zs-rn101": {"model_name": "ViT-B-32", "quick_gelu": True},
    # OpenAI's RN50x16 text tower: 12 layers, 768 wide, 12 heads, 768-d output, QuickGELU.
    "lseg-rn50x16-vitl16-384": {"model_name": "RN50x16", "quick_gelu": True},
    "lseg-tiny": {
        "model_name": None,
        "quick_gelu": True,
        "embed_dim": 32,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
}


# lseg-shapes' text tower is trained jointly (no CLIP offline): 2 layers, 8 token positions.
TEXT_ENCODER_CONFIGS["lseg-shapes"] = {
    "model_name": None,
    "quick_gelu": True,
    "embed_dim": 64,
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
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


def lseg_shapes(**kwargs: Any) -> LSegNet:
    """The ``lseg-shapes`` network (``configs/lseg_shapes.yaml``), 41 ShapeWorld classes at 128 px."""
    return LSegNet(**{**LSEG_CONFIGS["lseg-shapes"], **kwargs})


class LSeg(nn.Module):
    """An LSeg network and the text tower whose embedding space it was trained in.

    Args:
        net: the pixel encoder (any dtype, e.g. bfloat16 weights for speed on CPU).
        text_encoder: the text tower (:class:`~langseg.models.text.ClipTextEncoder`).
    """

    def __init__(self, net: LSegNet, text_encoder: ClipTextEncoder) -> None:
        super().__init__()
        self.net, self.text_encoder = net, text_encoder

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` normalised images (any float dtype) -> ``B x D x H/4 x W/4`` pixel features
        (see :meth:`LSegNet.encode_image`), in the network's scoring dtype (float32 under a bf16 plan,
        see :meth:`LSegNet.set_precision`)."""
        return self.net.encode_image(images)

    def dense_logits(self, features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Pixel features and ``K x D`` label embeddings -> ``B x K x H x W`` logits."""
        return self.net.classify(features, text_embeddings)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``K x L`` token ids (the text tower's tokenizer) -> ``K x D`` label embeddings."""
        device = self.text_encoder.text.positional_embedding.device
        return self.text_encoder.encode(token_ids.to(device))

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` images and ``K x L`` label tokens -> ``B x K x H x W`` logits."""
        return self.dense_logits(self.encode_image(images), self.encode_text(token_ids))
