"""VLT's building blocks: backbones, language-vision fusion, QGM, transformer, QBM and mask head.

The structure follows the official Keras code (henghuiding/Vision-Language-Transformer,
``model/vlt_model.py``, ``model/transfromer_model.py``, ``model/visual_backbone.py``, ``model/utils.py``);
:mod:`langseg.models.vlt` assembles them. Feature lists are ordered fine to coarse, ``[F8, F16, F32]``
for reductions ``(r, 2r, 4r)`` (8, 16, 32 for Darknet-53). "Grid" is the ``F16`` resolution, where the
transformer runs.
"""

from __future__ import annotations

import math
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from langseg.errors import BadConfigError


def conv_bn_leaky(c_in: int, c_out: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    """Darknet's ``DarknetConv2D_BN_Leaky``: conv without bias, BatchNorm, LeakyReLU(0.1)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.1),
    )


class DarknetResidual(nn.Module):
    """``x + CBL3x3(CBL1x1(x -> c/2) -> c)`` (official ``darknet_resblock``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_leaky(channels, channels // 2), conv_bn_leaky(channels // 2, channels, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def coord_channels(x: torch.Tensor) -> torch.Tensor:
    """``B x (C+6) x h x w``: ``x`` with x-coordinates three times, then y three times, in [-1, 1].

    As official ``concat_coord`` (the triple copies weigh position against the many feature channels).
    """
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype) if h > 1 else x.new_full((1,), -1.0)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype) if w > 1 else x.new_full((1,), -1.0)
    grid_x = xs.view(1, 1, 1, w).expand(b, 3, h, w)
    grid_y = ys.view(1, 1, h, 1).expand(b, 3, h, w)
    return torch.cat([x, grid_x, grid_y], dim=1)


def sine_1d(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``length x dim`` sinusoidal encoding: sin on even, cos on odd channels (Keras TrigPosEmbedding)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(position * freq)
    out[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return out


def sine_2d(height: int, width: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``(h*w) x dim`` 2-D sine encoding (DETR style): half the channels encode y, half x.

    Positions are normalised to ``(0, 2*pi]`` so the encoding depends on relative, not absolute, place.
    """
    if dim % 4:
        raise BadConfigError(f"a 2-D sine encoding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = (torch.arange(1, height + 1, device=device, dtype=torch.float32) / height * 2 * math.pi)[
        :, None
    ] / freq
    xs = (torch.arange(1, width + 1, device=device, dtype=torch.float32) / width * 2 * math.pi)[
        :, None
    ] / freq
    pos_y = torch.cat([ys.sin(), ys.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    pos_x = torch.cat([xs.sin(), xs.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([pos_y, pos_x], dim=-1).reshape(height * width, dim)


# --- backbones ----------------------------------------------------------------------------------------


class TinyBackbone(nn.Module):
    """A Darknet-style toy network for tests: stem + three stride-2 stages, reductions ``(2, 4, 8)``.

    Shallow strides keep a 16 x 16 transformer grid at 64 x 64 inputs, so small ShapeWorld objects
    survive; the real backbones run at reductions ``(8, 16, 32)``.
    """

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        stem = channels[0] // 2
        self.stem = conv_bn_leaky(3, stem, 3)
        c_in = stem
        self.stages = nn.ModuleList()
        for c in channels:
            self.stages.append(nn.Sequential(conv_bn_leaky(c_in, c, 3, stride=2), DarknetResidual(c)))
            c_in = c
        self.channels = list(channels)
        self.reductions = [2, 4, 8]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class TimmBackbone(nn.Module):
    """The last three feature maps of a timm model (``features_only=True``), as NCHW.

    Args:
        name: timm model name (``darknet53``, ``resnet50``, ``swin_base_patch4_window12_384``, ...).
        input_size: square input side; passed as ``img_size`` to models that take one (Swin, ViT).
        pretrained: timm weights (needs the network; checkpoints load ours instead).
        kwargs: more ``timm.create_model`` arguments.
    """

    def __init__(self, name: str, input_size: int, pretrained: bool = False, **kwargs: Any) -> None:
        super().__init__()
        try:
            try:
                model = timm.create_model(
                    name, pretrained=pretrained, features_only=True, img_size=input_size, **kwargs
                )
            except TypeError as err:  # convnets take no img_size
                if "img_size" not in str(err):
                    raise
                model = timm.create_model(name, pretrained=pretrained, features_only=True, **kwargs)
        except RuntimeError as err:
            raise BadConfigError(
                f"timm cannot build {name!r} ({err})", hint="Use a timm model name, e.g. darknet53."
            ) from err
        reductions, channels = model.feature_info.reduction(), model.feature_info.channels()
        if (
            len(reductions) < 3
            or reductions[-1] != 2 * reductions[-2]
            or reductions[-2] != 2 * reductions[-3]
        ):
            raise BadConfigError(f"{name!r} lacks three feature maps at strides r, 2r, 4r ({reductions})")
        self.model = model
        self.reductions, self.channels = list(reductions[-3:]), list(channels[-3:])
        fmt = getattr(model, "output_fmt", "NCHW")
        self.nhwc = str(getattr(fmt, "value", fmt)) == "NHWC"  # Swin returns B x H x W x C

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.model(images)[-3:]
        return [f.permute(0, 3, 1, 2).contiguous() for f in features] if self.nhwc else list(features)


class DarknetTop(nn.Module):
    """YOLOv3's three (1x1 -> c/2, 3x3 -> c) pairs after Darknet-53, part of the official ``darknet_body``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.body = nn.Sequential(
            *(m for _ in range(3) for m in (conv_bn_leaky(channels, half), conv_bn_leaky(half, channels, 3)))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# --- fusion ------------------------------------------------------------------------------------------


class SimpleFusion(nn.Module):
    """Coarsest visual map x sentence feature (official ``simple_fusion``).

    ``leaky(BN(resblock(F32) * tile(leaky(BN(W f_s)))))``; a 1x1 CBL first maps ``F32`` to ``dim`` when
    the widths differ (the official Darknet map already has ``jemb_dim`` = 1024 channels).
    """

    def __init__(self, visual_channels: int, text_dim: int, dim: int) -> None:
        super().__init__()
        self.project = conv_bn_leaky(visual_channels, dim) if visual_channels != dim else nn.Identity()
        self.visual = DarknetResidual(dim)
        self.text = nn.Sequential(nn.Linear(text_dim, dim), nn.BatchNorm1d(dim), nn.LeakyReLU(0.1))
        self.out = nn.Sequential(nn.BatchNorm2d(dim), nn.LeakyReLU(0.1))

    def forward(self, visual: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """``B x Cv x h x w`` and ``B x Ct`` -> ``B x dim x h x w``."""
        text = self.text(sentence)[..., None, None]
        return self.out(self.visual(self.project(visual)) * text)


class MultiScaleMerge(nn.Module):
    """Fuse the sentence into ``F32`` and merge with ``F16`` and ``F8`` at the grid (``F16``) resolution.

    Official ``make_multitask_braches`` with ``C`` = ``fusion_dim``: ``Fm`` = fusion(F32);
    ``mid = CBL1(up(Fm) ++ CBL1(F16))`` (C/2); ``query = CBL1(mid ++ CBL1(avgpool(F8)))`` (C/2, the
    QGM input); ``mid_tf = CBL3(CBL1(query)) ++ mid`` (C); ``memory = CBL1(CBL1(up(Fm) ++ CBL1(mid_tf)))``
    (``hidden``, the transformer memory). ``++`` is channel concatenation, ``up`` nearest x2.
    """

    def __init__(self, channels: list[int], text_dim: int, fusion_dim: int, hidden_dim: int) -> None:
        super().__init__()
        c8, c16, c32 = channels
        half, quarter = fusion_dim // 2, fusion_dim // 4
        self.fusion = SimpleFusion(c32, text_dim, fusion_dim)
        self.proj16 = conv_bn_leaky(c16, c16)
        self.mid = conv_bn_leaky(fusion_dim + c16, half)
        self.proj8 = conv_bn_leaky(c8, c8)
        self.query = conv_bn_leaky(half + c8, half)
        self.mid_tf = nn.Sequential(conv_bn_leaky(half, quarter), conv_bn_leaky(quarter, half, 3))
        self.proj_tf = conv_bn_leaky(fusion_dim, half)
        self.memory = nn.Sequential(
            conv_bn_leaky(fusion_dim + half, hidden_dim), conv_bn_leaky(hidden_dim, hidden_dim)
        )
        self.query_channels = half

    def forward(
        self, features: list[torch.Tensor], sentence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([F8, F16, F32], B x Ct)`` -> ``(B x C/2 x h x w query features, B x hidden x h x w memory)``."""
        f8, f16, f32 = features
        fused = F.interpolate(self.fusion(f32, sentence), scale_factor=2.0, mode="nearest")
        mid = self.mid(torch.cat([fused, self.proj16(f16)], dim=1))
        query = self.query(torch.cat([mid, self.proj8(F.avg_pool2d(f8, 2))], dim=1))
        mid_tf = torch.cat([self.mid_tf(query), mid], dim=1)
        memory = self.memory(torch.cat([fused, self.proj_tf(mid_tf)], dim=1))
        return query, memory


# --- queries, transformer, balance, mask --------------------------------------------------------------


class QueryGeneration(nn.Module):
    """Query Generation Module: ``Nq`` language-aware queries from the image (official ``vlt_querynet``
    + ``lang_tf_enc``).

    1. ``maps = Conv1x1(CBL3(CBL3(CBL3(coords(x)))))``: ``Nq`` spatial maps ``B x Nq x h x w``;
    2. ``f_v = relu(W_v flatten(maps))``: each map, flattened, projected to ``dim`` (so ``h * w`` is fixed);
    3. ``q = relu(W_q(f_v + pe))``, ``k = relu(W_k(l + pe))``, ``v = relu(W_k'(l + pe))`` with
       ``l = relu(W_l words)`` and 1-D sine ``pe``; multi-head attention over the (unpadded) words with
       the visual vector as query; ``queries = attention + f_v`` (residual).
    """

    def __init__(
        self, in_channels: int, grid_cells: int, num_queries: int, text_dim: int, dim: int, heads: int
    ) -> None:
        super().__init__()
        c = in_channels + 6
        self.maps = nn.Sequential(
            conv_bn_leaky(c, c, 3),
            conv_bn_leaky(c, c, 3),
            conv_bn_leaky(c, c, 3),
            nn.Conv2d(c, num_queries, 1),
        )
        self.visual = nn.Linear(grid_cells, dim)
        self.words = nn.Linear(text_dim, dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def spatial_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``B x C x h x w`` query features -> ``B x Nq x h x w`` maps."""
        return self.maps(coord_channels(x))

    def attend(self, visual: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``B x Nq x D`` visual vectors, ``B x L x Ct`` words, ``B x L`` mask -> ``B x Nq x D`` queries."""
        lang = F.relu(self.words(words))
        pe_q = sine_1d(visual.shape[1], visual.shape[2], visual.device).to(visual.dtype)
        pe_w = sine_1d(lang.shape[1], lang.shape[2], lang.device).to(lang.dtype)
        q = F.relu(self.q_proj(visual + pe_q))
        k, v = F.relu(self.k_proj(lang + pe_w)), F.relu(self.v_proj(lang + pe_w))
        ignore = ~mask.bool()
        # A row without words would attend to nothing (NaN): it attends to its first slot. (No boolean
        # indexing: its shape depends on values, which an ONNX graph cannot capture.)
        first = ignore[:, :1] & ~ignore.all(1, keepdim=True)
        ignore = torch.cat([first, ignore[:, 1:]], dim=1)
        out, _ = self.attention(q, k, v, key_padding_mask=ignore, need_weights=False)
        return out + visual

    def forward(self, x: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visual = F.relu(self.visual(self.spatial_maps(x).flatten(2)))
        return self.attend(visual, words, mask)


class VLTransformer(nn.Module):
    """Transformer encoder over the visual memory, decoder over the queries (official ``ref_tf``).

    Post-norm layers with ReLU feed-forward of width ``ffn_dim`` (official: 256, keras-transformer's
    ``hidden_dim``). Positional encodings are added once to the inputs, as the official code does: the
    memory gets a 2-D sine (``"sine2d"``) or the official 1-D sine over the flattened grid (``"sine1d"``),
    the queries a 1-D sine over their index.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        encoder_layers: int,
        decoder_layers: int,
        dropout: float,
        memory_pos: str = "sine2d",
    ) -> None:
        super().__init__()
        if memory_pos not in ("sine2d", "sine1d"):
            raise BadConfigError(f"unknown memory_pos {memory_pos!r}", hint="Use sine2d or sine1d.")
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, ffn_dim, dropout, batch_first=True)
            for _ in range(encoder_layers)
        )
        self.decoder = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, heads, ffn_dim, dropout, batch_first=True)
            for _ in range(decoder_layers)
        )
        self.memory_pos = memory_pos

    def forward(self, memory: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``B x D x h x w`` memory and ``B x Nq x D`` queries -> ``B x Nq x D`` responses."""
        _, d, h, w = memory.shape
        pos = (
            sine_2d(h, w, d, memory.device)
            if self.memory_pos == "sine2d"
            else sine_1d(h * w, d, memory.device)
        )
        x = memory.flatten(2).transpose(1, 2) + pos.to(memory.dtype)
        for layer in self.encoder:
            x = layer(x)
        y = queries + sine_1d(queries.shape[1], d, queries.device).to(queries.dtype)
        for layer in self.decoder:
            y = layer(y, x)
        return y


class QueryBalance(nn.Module):
    """Query Balance Module: each response scaled by its query's confidence (official ``balance``).

    ``c = sigmoid(W_c relu(W_h [relu(W_r r); relu(W_q q)]))`` per query (``B x Nq x 1``); output ``c * r``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.response, self.query = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.hidden, self.gate = nn.Linear(2 * dim, dim), nn.Linear(dim, 1)

    def confidence(self, responses: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``B x Nq x 1`` in (0, 1) for ``B x Nq x D`` responses and queries."""
        joint = torch.cat([F.relu(self.response(responses)), F.relu(self.query(queries))], dim=-1)
        return torch.sigmoid(self.gate(F.relu(self.hidden(joint))))

    def forward(self, responses: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return responses * self.confidence(responses, queries)


class ResponseMaps(nn.Module):
    """Each query's response -> one ``h x w`` map, ``relu(W r)`` (official ``Dense(h*w)``); the ``Nq``
    maps become channels for the mask head, which merges them with a 3x3 conv."""

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.project = nn.Linear(dim, grid[0] * grid[1])

    def forward(self, responses: torch.Tensor) -> torch.Tensor:
        b, n, _ = responses.shape
        return F.relu(self.project(responses)).view(b, n, *self.grid)


class MaskHead(nn.Module):
    """3x3 CBLs with nearest x2 upsamplings, then a 3x3 conv to one logit (official ``vlt_postproc``).

    ``CBL(in -> dim), CBL, [++ lower] CBL``, then ``[up] CBL`` once and ``up CBL`` for each further
    upsampling (``num_up`` = log2(grid stride / output stride)), then ``Conv3x3(dim -> 1)`` with a bias.
    With ``lower_channels`` > 0 the grid-resolution visual features (the QGM input) are concatenated
    after the second CBL: the official ``concate_lower_feat`` (commented out in its code), which hands
    the decoder the language-conditioned image features that the responses reach only through one
    ``Dense(h * w)`` map per query.

    With ``fine_channels`` > 0 (not in the official network) a finer backbone map, projected by a 1x1
    CBL to ``dim / 2``, is concatenated right after upsampling number ``fine_after_up`` (1-based) and
    one more CBL merges it: the coarse map says *which* object, the language-free fine map where its
    edges are (a U-Net / DeepLabv3+ style skip).
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        num_up: int,
        lower_channels: int = 0,
        fine_channels: int = 0,
        fine_after_up: int = 1,
    ) -> None:
        super().__init__()
        if fine_channels and not 1 <= fine_after_up <= num_up:
            raise BadConfigError(
                f"the fine skip joins after upsampling {fine_after_up}, but the head upsamples {num_up} times"
            )
        fine_dim = dim // 2 if fine_channels else 0
        layers: list[nn.Module] = [conv_bn_leaky(in_channels, dim, 3), conv_bn_leaky(dim, dim, 3)]
        layers.append(conv_bn_leaky(dim + lower_channels, dim, 3))
        for i in range(max(num_up, 1)):
            joins = fine_channels and i + 1 == fine_after_up
            if i < num_up:
                layers.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
            layers.append(conv_bn_leaky(dim + (fine_dim if joins else 0), dim, 3))
            if joins:
                layers.append(conv_bn_leaky(dim, dim, 3))
        layers.append(nn.Conv2d(dim, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.lower_channels = lower_channels
        self.fine_channels, self.fine_after_up = fine_channels, fine_after_up
        self.fine = conv_bn_leaky(fine_channels, fine_dim) if fine_channels else None

    def forward(
        self, x: torch.Tensor, lower: torch.Tensor | None = None, fine: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``B x in x h x w`` (with ``B x lower x h x w`` when built with ``lower_channels``, and
        ``B x fine x h*2^k x w*2^k``, k = ``fine_after_up``, when built with ``fine_channels``) ->
        ``B x 1 x h * 2^num_up x w * 2^num_up`` logits."""
        if (lower is None) != (self.lower_channels == 0):
            raise ValueError("pass lower features exactly when the head was built with lower_channels")
        if (fine is None) != (self.fine is None):
            raise ValueError("pass fine features exactly when the head was built with fine_channels")
        x = self.body[1](self.body[0](x))
        if lower is not None:
            x = torch.cat([x, lower], dim=1)
        ups = 0
        for layer in self.body[2:]:
            if isinstance(layer, nn.Upsample):
                ups += 1
                x = layer(x)
                if self.fine is not None and fine is not None and ups == self.fine_after_up:
                    x = torch.cat([x, self.fine(fine)], dim=1)
                continue
            x = layer(x)
        return x
