"""VLT: Vision-Language Transformer and Query Generation for referring segmentation (Ding et al., ICCV 2021).

``images -> backbone [F8, F16, F32] -> sentence fused into F32, merged down to the F16 grid ->``
``QGM: Nq queries from image + words -> transformer (encoder over the grid, decoder over the queries) ->``
``QBM: responses scaled by query confidence -> one map per query -> convs + upsampling -> 1 logit map``.

Structure and sizes follow the official Keras code (``model/vlt_model.py``, ``config/base.yaml``: input
416, hidden 256, 8 heads, 2 + 2 layers, ``jemb_dim`` 1024, GRU 1024, output stride 2, threshold 0.35,
15 words). Like the official network, the query maps are flattened into ``Dense`` layers, so a model
takes exactly ``input_size x input_size`` images; the :class:`~langseg.predict.referrer.Referrer`
letterboxes any image to that size. Ablation switches (paper Tables 1-3): ``query_source`` (``qgm``,
``text``: the projected sentence feature as every query, told apart only by the decoder's positional
encoding; ``learnt``: input-independent ``nn.Embedding`` queries), ``num_queries``, ``qbm`` and
``decoder="conv"`` (convolutions instead of QGM + transformer + QBM; query settings then unused).

Builders: ``vlt_darknet53`` (paper), ``vlt_swinb``, ``vlt_tiny`` (tests) and ``vlt_shapes`` (the
ShapeWorld-Ref recipe). Their registry entries, weights and predictor wiring live in :mod:`langseg.zoo.vlt`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from langseg.errors import BadConfigError, BadDataError, BadImageError
from langseg.models.text_gru import build_text_encoder
from langseg.models.vlt_modules import (
    DarknetTop,
    MaskHead,
    MultiScaleMerge,
    QueryBalance,
    QueryGeneration,
    ResponseMaps,
    TimmBackbone,
    TinyBackbone,
    VLTransformer,
    conv_bn_leaky,
)

THRESHOLD = 0.35  # official `segment_thresh` on the sigmoid probability
QUERY_SOURCES = ("qgm", "text", "learnt")
DECODERS = ("transformer", "conv")
# The paper's text side: 300-d word vectors (official: spaCy en_vectors_web_lg) into a 1024-wide bi-GRU;
# the vocabulary size is the trained checkpoint's (config.json overrides this placeholder).
PAPER_TEXT: dict[str, Any] = {"kind": "gru", "vocab_size": 10000, "word_dim": 300, "hidden_dim": 1024}


class VLT(nn.Module):
    """The VLT network on tensors.

    Args:
        backbone: a timm model name (``darknet53``, ``resnet50``, ``swin_base_patch4_window12_384``) or
            ``"tiny"`` (:class:`TinyBackbone`, reductions 2/4/8, for tests).
        backbone_kwargs: extra ``timm.create_model`` (or ``TinyBackbone``) arguments.
        darknet_top: the three YOLOv3 (1x1, 3x3) pairs after the coarsest map, as the official body.
        input_size: square input side; must divide by the coarsest reduction.
        text: text encoder config, ``{"kind": "gru", "vocab_size": ..., ...}`` or ``{"kind": "clip", ...}``.
        fusion_dim: width of the language-vision fusion (official ``jemb_dim`` 1024).
        hidden_dim: transformer width ``D`` and mask-head width (256).
        num_heads, ffn_dim, encoder_layers, decoder_layers, dropout: transformer sizes (8, 256, 2, 2, 0.1).
        num_queries: ``Nq`` (official example configs: 16).
        query_source: ``"qgm"``, ``"text"`` or ``"learnt"`` (see module docstring).
        qbm: Query Balance Module on/off.
        decoder: ``"transformer"`` or ``"conv"``.
        memory_pos: positional encoding of the memory, ``"sine2d"`` or official ``"sine1d"``.
        out_stride: output stride (a power of two dividing the grid stride; official 2).
        concat_lower_feat: concatenate the QGM input features into the mask head (the official
            ``concate_lower_feat``, present but commented out in its ``vlt_postproc``: off is the
            paper's network).
        fine_skip: concatenate the finest backbone map (``F8``, language-free) into the mask head once
            it has upsampled to that map's resolution (not in the paper: sharper mask edges; needs
            ``out_stride`` <= the finest reduction).

    ``self.config`` holds these arguments (JSON-able) so checkpoints can rebuild the network.
    """

    def __init__(
        self,
        backbone: str = "darknet53",
        backbone_kwargs: dict[str, Any] | None = None,
        darknet_top: bool = False,
        input_size: int = 416,
        text: dict[str, Any] | None = None,
        fusion_dim: int = 1024,
        hidden_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 256,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        dropout: float = 0.1,
        num_queries: int = 16,
        query_source: str = "qgm",
        qbm: bool = True,
        decoder: str = "transformer",
        memory_pos: str = "sine2d",
        out_stride: int = 2,
        concat_lower_feat: bool = False,
        fine_skip: bool = False,
    ) -> None:
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        text = dict(text or PAPER_TEXT)
        self.config["text"] = text
        if query_source not in QUERY_SOURCES:
            raise BadConfigError(
                f"unknown query_source {query_source!r}", hint=f"Use one of {QUERY_SOURCES}."
            )
        if decoder not in DECODERS:
            raise BadConfigError(f"unknown decoder {decoder!r}", hint=f"Use one of {DECODERS}.")
        if num_queries < 1 or hidden_dim % num_heads or fusion_dim % 4:
            raise BadConfigError(
                "need num_queries >= 1, hidden_dim divisible by num_heads and fusion_dim by 4, got "
                f"{num_queries}, {hidden_dim}/{num_heads}, {fusion_dim}"
            )
        kwargs = dict(backbone_kwargs or {})
        self.backbone = (
            TinyBackbone(**kwargs) if backbone == "tiny" else TimmBackbone(backbone, input_size, **kwargs)
        )
        reductions, channels = self.backbone.reductions, list(self.backbone.channels)
        self.top = DarknetTop(channels[2]) if darknet_top else None
        if input_size % reductions[2]:
            raise BadConfigError(
                f"input_size {input_size} must be a multiple of {reductions[2]} for {backbone}"
            )
        grid_stride = reductions[1]
        num_up = round(math.log2(grid_stride / out_stride)) if out_stride > 0 else -1
        if num_up < 0 or 2**num_up * out_stride != grid_stride:
            raise BadConfigError(
                f"out_stride must be a power of two dividing the grid stride {grid_stride}, got {out_stride}"
            )
        self.input_size, self.out_stride = input_size, out_stride
        self.grid = (input_size // grid_stride, input_size // grid_stride)
        self.text = build_text_encoder(text)
        text_dim = self.text.output_dim
        self.merge = MultiScaleMerge(channels, text_dim, fusion_dim, hidden_dim)
        self.query_source, self.decoder_kind = query_source, decoder
        self.qgm = self.text_query = self.learnt_query = self.transformer = None
        self.qbm = self.response_maps = self.conv_decoder = None
        if decoder == "conv":
            # Table 1's convolutional baseline: as many 3x3 layers as transformer layers, same width.
            depth = encoder_layers + decoder_layers
            self.conv_decoder = nn.Sequential(
                *(conv_bn_leaky(hidden_dim, hidden_dim, 3) for _ in range(depth))
            )
            head_in = hidden_dim
        else:
            if query_source == "qgm":
                cells = self.grid[0] * self.grid[1]
                self.qgm = QueryGeneration(
                    self.merge.query_channels, cells, num_queries, text_dim, hidden_dim, num_heads
                )
            elif query_source == "text":
                self.text_query = nn.Linear(text_dim, hidden_dim)
            else:
                self.learnt_query = nn.Embedding(num_queries, hidden_dim)
            self.transformer = VLTransformer(
                hidden_dim, num_heads, ffn_dim, encoder_layers, decoder_layers, dropout, memory_pos
            )
            self.qbm = QueryBalance(hidden_dim) if qbm else None
            self.response_maps = ResponseMaps(hidden_dim, self.grid)
            head_in = num_queries
        self.num_queries = num_queries
        lower = self.merge.query_channels if concat_lower_feat else 0
        fine_after_up = round(math.log2(grid_stride / reductions[0]))
        if fine_skip and not 1 <= fine_after_up <= num_up:
            raise BadConfigError(
                f"fine_skip needs out_stride <= {reductions[0]} (the finest backbone map), got {out_stride}"
            )
        fine = channels[0] if fine_skip else 0
        self.mask_head = MaskHead(head_in, hidden_dim, num_up, lower, fine, max(fine_after_up, 1))

    # ------------------------------------------------------------------ image side

    def encode_image(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``B x 3 x S x S`` (S = ``input_size``) -> ``[F8, F16, F32]`` backbone maps, reusable for
        many expressions (the expensive, language-free part)."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.input_size,) * 2:
            raise BadImageError(
                f"VLT expects B x 3 x {self.input_size} x {self.input_size} images, "
                f"got {tuple(images.shape)}",
                hint="Letterbox images to the model's input_size (langseg.predict.referrer.Referrer does).",
            )
        features = self.backbone(images)
        if self.top is not None:
            features = [*features[:2], self.top(features[2])]
        return features

    # ------------------------------------------------------------------ language side

    def queries(
        self, query_features: torch.Tensor, words: torch.Tensor, mask: torch.Tensor, sentence: torch.Tensor
    ) -> torch.Tensor:
        """``B x Nq x D`` queries from the chosen ``query_source``."""
        if self.qgm is not None:
            return self.qgm(query_features, words, mask)
        batch = sentence.shape[0]
        if self.text_query is not None:
            return F.relu(self.text_query(sentence))[:, None].expand(batch, self.num_queries, -1)
        assert self.learnt_query is not None
        return self.learnt_query.weight[None].expand(batch, -1, -1)

    def decode(
        self, features: list[torch.Tensor], token_ids: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        """Mask logits for expressions on encoded images.

        Args:
            features: from :meth:`encode_image`, batch ``B`` or 1 (then shared by all ``B`` expressions).
            token_ids: ``B x L`` ids; ``token_mask``: ``B x L`` bool, True at real tokens.

        Returns:
            ``B x 1 x S/s x S/s`` logits (``s`` = ``out_stride``); sigmoid > 0.35 is the mask.
        """
        words, mask, sentence = self.text(token_ids, token_mask)
        batch = words.shape[0]
        if features[0].shape[0] != batch:
            if features[0].shape[0] != 1:
                raise BadDataError(f"{features[0].shape[0]} encoded images for {batch} expressions")
            features = [f.expand(batch, -1, -1, -1) for f in features]
        query_features, memory = self.merge(features, sentence)
        lower = query_features if self.mask_head.lower_channels else None
        fine = features[0] if self.mask_head.fine is not None else None
        if self.conv_decoder is not None:
            return self.mask_head(self.conv_decoder(memory), lower, fine)
        assert self.transformer is not None and self.response_maps is not None
        queries = self.queries(query_features, words, mask, sentence)
        responses = self.transformer(memory, queries)
        if self.qbm is not None:
            responses = self.qbm(responses, queries)
        return self.mask_head(self.response_maps(responses), lower, fine)

    def forward(
        self, images: torch.Tensor, token_ids: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        """``B x 3 x S x S`` images, ``B x L`` ids and mask -> ``B x 1 x S/s x S/s`` logits."""
        return self.decode(self.encode_image(images), token_ids, token_mask)


def vlt_loss(
    logits: torch.Tensor, masks: torch.Tensor, reduction: str = "image", resolution: str = "output"
) -> torch.Tensor:
    """Binary cross-entropy on logits (official ``yolo_loss``).

    Args:
        logits: ``B x 1 x h x w``.
        masks: ``B x H x W`` (or ``B x 1 x H x W``) bool/float targets.
        reduction: ``"image"``: sum over pixels / B (official); ``"mean"``: mean over pixels.
        resolution: ``"output"`` (official): the targets are area-averaged to ``h x w`` when larger (soft
            targets keep thin parts that nearest-neighbour shrinking, as official, drops);
            ``"input"``: the logits are bilinearly upsampled to ``H x W`` instead, the way predictions
            are mapped to the image, so the loss sees boundaries finer than the output grid. With
            ``"image"`` reduction the sum is rescaled to output pixels, keeping the loss scale.
    """
    target = masks.float()
    if target.ndim == 3:
        target = target[:, None]
    if resolution not in ("output", "input"):
        raise BadConfigError(f"unknown loss resolution {resolution!r}", hint="Use output or input.")
    scale = 1.0
    if target.shape[-2:] != logits.shape[-2:]:
        if resolution == "input":
            scale = logits.shape[-2] * logits.shape[-1] / (target.shape[-2] * target.shape[-1])
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        else:
            target = F.adaptive_avg_pool2d(target, logits.shape[-2:])
    if reduction == "mean":
        return F.binary_cross_entropy_with_logits(logits, target)
    if reduction != "image":
        raise BadConfigError(f"unknown reduction {reduction!r}", hint="Use image or mean.")
    total = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    return total * scale / logits.shape[0]


# --- registered variants ----------------------------------------------------------------------------

VLT_CONFIGS: dict[str, dict[str, Any]] = {
    "vlt-darknet53": {"backbone": "darknet53", "darknet_top": True, "input_size": 416, "text": PAPER_TEXT},
    "vlt-swinb": {"backbone": "swin_base_patch4_window12_384", "input_size": 384, "text": PAPER_TEXT},
    "vlt-tiny": {
        "backbone": "tiny",
        "backbone_kwargs": {"channels": (16, 32, 64)},
        "input_size": 64,
        "text": {"kind": "gru", "vocab_size": 64, "word_dim": 32, "hidden_dim": 32},
        "fusion_dim": 32,
        "hidden_dim": 32,
        "num_heads": 2,
        "ffn_dim": 64,
        "num_queries": 4,
        "out_stride": 1,
    },
}
# configs/vlt_shapes.yaml's network (the bundled weights were trained by that recipe): vlt-tiny with 16
# queries, output stride 2 and the lower features. The checkpoint's config.json sets the vocabulary size.
VLT_CONFIGS["vlt-shapes"] = {
    **VLT_CONFIGS["vlt-tiny"],
    "backbone_kwargs": {"channels": (16, 32, 32)},
    "dropout": 0.0,
    "num_queries": 16,
    "out_stride": 2,
    "concat_lower_feat": True,
}


def vlt_darknet53(**kwargs: Any) -> VLT:
    """VLT as in the paper: Darknet-53 (+ YOLOv3 top convs), bi-GRU text, input 416."""
    return VLT(**{**VLT_CONFIGS["vlt-darknet53"], **kwargs})


def vlt_swinb(**kwargs: Any) -> VLT:
    """VLT with a Swin-B (window 12, 384) backbone."""
    return VLT(**{**VLT_CONFIGS["vlt-swinb"], **kwargs})


def vlt_tiny(**kwargs: Any) -> VLT:
    """VLT at toy size (64 x 64 input, width 32), for tests."""
    return VLT(**{**VLT_CONFIGS["vlt-tiny"], **kwargs})


def vlt_shapes(**kwargs: Any) -> VLT:
    """The ``vlt-shapes`` network (``configs/vlt_shapes.yaml``): QGM, 16 queries, QBM, 64 x 64 input."""
    return VLT(**{**VLT_CONFIGS["vlt-shapes"], **kwargs})
