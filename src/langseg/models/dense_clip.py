"""Training-free dense CLIP: patch embeddings in CLIP's text space from a frozen CLIP ViT.

CLIP is trained on its pooled class token only, so its patch tokens after the last block are poorly
localised. MaskCLIP, SCLIP, ClearCLIP and NACLIP fix this without training by recomputing only the LAST
residual block of the image tower, then applying ``ln_post`` and ``proj`` to every token exactly as CLIP
does to its pooled token. :class:`DenseCLIP` wraps an open_clip ``CLIP`` (or its ``VisionTransformer``),
shares its weights and never modifies them.

Last-block formulas, per head, with ``s = head_dim ** -0.5`` and ``q, k, v`` from ``in_proj`` of
``ln_1(x)``; ``ls_1``/``ls_2`` (layer scale) are applied to the attention/MLP branch whenever the model
has them:

=========== ================================================ ========= =====
mode        attention output (before ``out_proj``)           residual  MLP
=========== ================================================ ========= =====
vanilla     softmax(s q k^T) v          (CLIP unchanged)     yes       yes
maskclip    v                           (identity attention) yes       yes
sclip       (softmax(s q q^T) + softmax(s k k^T)) v          yes       yes
clearclip   softmax(s q q^T) v                               no        no
naclip      softmax(s k k^T + G) v                           no        no
=========== ================================================ ========= =====

``G`` is NACLIP's Gaussian neighbourhood bias (:func:`neighbourhood_bias`). The residual/MLP choice of
any mode can be overridden (``residual=``, ``mlp=``) to re-run the papers' ablations.

In every mode the class token stays in the sequence and takes part in the last block's attention as a
query and as a key, as in CLIP (for ``maskclip`` no token mixes with another). Without a residual the
class token's own output row does not reach the patch tokens, but its key/value column still does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from langseg.errors import BadConfigError, BadImageError
from langseg.models.text import capturing_graph, encode_text_trimmed, trim_text_now


@dataclass(frozen=True)
class LastBlock:
    """How the last residual block is recomputed.

    Attributes:
        attention: ``"qk"`` (CLIP's own), ``"identity"``, ``"qq+kk"``, ``"qq"`` or ``"kk+gauss"``.
        residual: add the attention branch to the block input (otherwise the branch replaces it).
        mlp: run the block's MLP branch (with its residual) after the attention branch.
    """

    attention: str
    residual: bool
    mlp: bool


MODES: dict[str, LastBlock] = {
    "vanilla": LastBlock("qk", residual=True, mlp=True),
    "maskclip": LastBlock("identity", residual=True, mlp=True),
    "sclip": LastBlock("qq+kk", residual=True, mlp=True),
    "clearclip": LastBlock("qq", residual=False, mlp=False),
    "naclip": LastBlock("kk+gauss", residual=False, mlp=False),
}


def neighbourhood_bias(
    h: int,
    w: int,
    sigma: float = 5.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """NACLIP's Gaussian neighbourhood bias over a ``h x w`` patch grid, with a class-token row/column.

    ``G[1 + i, 1 + j] = exp(-d_ij^2 / (2 sigma^2))`` where ``d_ij`` is the Euclidean distance between
    patches ``i`` and ``j`` (row-major) in patch units. This is the unnormalised 2D Gaussian of NACLIP
    (Hajimiri et al., WACV 2025) with covariance ``sigma^2 I`` centred on the query patch, so its peak
    is 1 on the diagonal; the same bias is added to every head's logits. Row and column 0 (the class
    token, which has no grid position) are 0: the class token still attends and is attended to, unbiased.

    Returns:
        ``(1 + h*w) x (1 + h*w)`` tensor.
    """
    # expand + reshape and pad, not repeat_interleave and a slice assignment: the same numbers, and a
    # graph that onnxruntime runs for any grid when the bias is exported with symbolic h and w.
    rows = torch.arange(h, device=device, dtype=torch.float64)[:, None].expand(h, w).reshape(-1)
    cols = torch.arange(w, device=device, dtype=torch.float64)[None, :].expand(h, w).reshape(-1)
    d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    bias = F.pad(torch.exp(-d2 / (2.0 * sigma**2)), (1, 0, 1, 0))
    return bias.to(dtype)


def dense_logits(
    patch_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """Cosine similarity of every patch with every text embedding, times ``logit_scale``.

    Args:
        patch_emb: ``B x D x h x w`` patch embeddings (e.g. from :class:`DenseCLIP`).
        text_emb: ``K x D`` text embeddings, one per label.
        logit_scale: multiplier, already exponentiated (e.g. ``clip.logit_scale.exp()``).

    Returns:
        ``B x K x h x w`` logits.
    """
    if patch_emb.ndim != 4 or text_emb.ndim != 2 or patch_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"expected patch_emb B x D x h x w and text_emb K x D with the same D, "
            f"got {tuple(patch_emb.shape)} and {tuple(text_emb.shape)}"
        )
    patches = F.normalize(patch_emb, dim=1)
    texts = F.normalize(text_emb, dim=1).to(patches.dtype)
    return torch.einsum("bdhw,kd->bkhw", patches, texts) * logit_scale


def encode_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``K x L`` token ids -> ``K x D`` text embeddings, equal to ``model.encode_text(tokens)``.

    For a plain open_clip ``CLIP`` (causal mask, pooled at the end-of-text token) only the positions up to
    the last end-of-text token are run (:func:`langseg.models.text.encode_text_trimmed`): under a causal
    mask later (padding) positions cannot reach the pooled one, so the result is the same while short
    prompts cost far less (80 templates: 12 positions instead of 77, 7x faster on a CPU). Other models
    (no causal mask, other pooling) fall back to their own ``encode_text``.
    """
    if not trim_text_now(model):
        return model.encode_text(tokens)
    return encode_text_trimmed(model, tokens)[0]


class DenseCLIP(nn.Module):
    """Dense patch embeddings from an open_clip ViT with a training-free last block (see module doc).

    Args:
        model: an open_clip ``CLIP`` whose ``visual`` is a ``VisionTransformer``, or that tower itself.
            Its modules are shared (registered as ``self.visual``), never copied or modified.
        mode: ``"naclip"``, ``"clearclip"``, ``"sclip"``, ``"maskclip"`` or ``"vanilla"``.
        residual: override the mode's residual choice (for ablations); ``None`` keeps the mode's.
        mlp: override the mode's MLP choice (for ablations); ``None`` keeps the mode's.
        sigma: NACLIP's Gaussian standard deviation in patch units.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "naclip",
        *,
        residual: bool | None = None,
        mlp: bool | None = None,
        sigma: float = 5.0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise BadConfigError(
                f"unknown dense CLIP mode {mode!r}", hint=f"Choose one of {', '.join(MODES)}."
            )
        if not sigma > 0:
            raise BadConfigError(f"NACLIP sigma must be positive, got {sigma}")
        visual = getattr(model, "visual", model)
        _check_supported(visual)
        self.visual: VisionTransformer = visual
        self.mode = mode
        block = MODES[mode]
        self.last_block = replace(
            block,
            residual=block.residual if residual is None else residual,
            mlp=block.mlp if mlp is None else mlp,
        )
        self.sigma = float(sigma)
        # Plain dicts, not buffers: derived data must stay out of state_dict and must not alias weights.
        self._pos_cache: dict[tuple, tuple[tuple, torch.Tensor]] = {}
        self._bias_cache: dict[tuple, torch.Tensor] = {}

    @property
    def patch_size(self) -> tuple[int, int]:
        """``(ph, pw)`` in pixels; inputs must be multiples of it."""
        return tuple(self.visual.patch_size)

    @property
    def embed_dim(self) -> int:
        """``D``, the text-space dimension of the output (``width`` if the model has no ``proj``)."""
        proj = self.visual.proj
        return proj.shape[1] if proj is not None else self.visual.conv1.out_channels

    def extra_repr(self) -> str:
        lb = self.last_block
        return f"mode={self.mode!r}, attention={lb.attention!r}, residual={lb.residual}, mlp={lb.mlp}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` normalised images -> ``B x D x (H // ph) x (W // pw)`` patch embeddings."""
        return self.forward_with_cls(images)[1]

    def forward_with_cls(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward`, also returning the class token through the same last block.

        Returns:
            ``(cls, patches)``: ``B x D`` and ``B x D x h x w``. In ``vanilla`` mode at the native size
            ``cls`` equals ``encode_image`` for class-token pooling (``pool_type="tok"``).
        """
        x, (h, w) = self._embed(images)
        transformer = self.visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in transformer.resblocks[:-1]:
            x = block(x)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        x = self._last_block(x, (h, w))
        x = self.visual.ln_post(x)
        if self.visual.proj is not None:
            x = x @ self.visual.proj
        patches = x[:, 1:].reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)
        return x[:, 0], patches

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``B x 3 x H x W`` -> tokens ``B x (1 + h*w) x C`` after ``ln_pre``, and the grid ``(h, w)``."""
        ph, pw = self.patch_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise BadImageError(f"expected a B x 3 x H x W image tensor, got shape {tuple(images.shape)}")
        if images.shape[-2] % ph or images.shape[-1] % pw:
            raise BadImageError(
                f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {(ph, pw)}",
                hint="Resize or pad the image to a multiple of the patch size (the predictor does this).",
            )
        v = self.visual
        x = v.conv1(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(h, w).to(x.dtype)
        # patch_dropout is skipped on purpose: a dense map needs every patch (it is a no-op in eval).
        return v.ln_pre(x), (h, w)

    def _positional_embedding(self, h: int, w: int) -> torch.Tensor:
        """``(1 + h*w) x C`` position embeddings: the model's own at its native grid, else bicubic."""
        pos = self.visual.positional_embedding
        gh, gw = self.visual.grid_size
        if (h, w) == (gh, gw):
            return pos
        # A cached tensor carries no autograd graph, so cache only when no gradient must reach `pos`; and
        # not while a graph is captured (ONNX export): its tensors have no storage (no data_ptr) and its
        # sizes may be symbols, and a cached tensor would enter the graph as a constant.
        cacheable = not (torch.is_grad_enabled() and pos.requires_grad) and not capturing_graph()
        key = (h, w, torch.is_inference_mode_enabled())
        # Stamp: a new or in-place-updated (optimizer step, load_state_dict, .to()) weight is a miss.
        stamp = (pos.data_ptr(), pos._version, pos.device, pos.dtype) if cacheable else None
        if cacheable and key in self._pos_cache and self._pos_cache[key][0] == stamp:
            return self._pos_cache[key][1]
        work = torch.promote_types(pos.dtype, torch.float32)  # bicubic in at least float32
        grid = pos[1:].to(work).reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(h * w, -1)
        out = torch.cat([pos[:1].to(work), grid], dim=0).to(pos.dtype)
        if cacheable:
            _remember(self._pos_cache, key, (stamp, out))
        return out

    def _gaussian(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        if capturing_graph():  # symbolic sizes cannot key a cache; the graph computes the bias itself
            return neighbourhood_bias(h, w, self.sigma, dtype=like.dtype, device=like.device)
        key = (h, w, like.dtype, like.device, torch.is_inference_mode_enabled())
        if key not in self._bias_cache:
            bias = neighbourhood_bias(h, w, self.sigma, dtype=like.dtype, device=like.device)
            _remember(self._bias_cache, key, bias)
        return self._bias_cache[key]

    def _last_block(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Recompute the last residual block on ``B x N x C`` tokens according to ``self.last_block``."""
        block: ResidualAttentionBlock = self.visual.transformer.resblocks[-1]
        attn: nn.MultiheadAttention = block.attn
        b, n, c = x.shape
        heads = attn.num_heads
        scale = (c // heads) ** -0.5
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # each B x heads x N x d

        kind = self.last_block.attention
        if kind == "identity":
            out = v
        else:
            if kind == "qk":
                weights = (scale * q @ k.transpose(-2, -1)).softmax(dim=-1)
            elif kind == "qq":
                weights = (scale * q @ q.transpose(-2, -1)).softmax(dim=-1)
            elif kind == "qq+kk":
                weights = (scale * q @ q.transpose(-2, -1)).softmax(dim=-1) + (
                    scale * k @ k.transpose(-2, -1)
                ).softmax(dim=-1)
            elif kind == "kk+gauss":
                logits = scale * k @ k.transpose(-2, -1)
                weights = (logits + self._gaussian(*grid, logits)).softmax(dim=-1)
            else:  # pragma: no cover - MODES is closed
                raise AssertionError(kind)
            out = weights @ v
        out = attn.out_proj(out.transpose(1, 2).reshape(b, n, c))
        # ls_1 belongs to the attention branch, so it is kept even when the branch replaces the stream.
        out = block.ls_1(out)
        x = x + out if self.last_block.residual else out
        if self.last_block.mlp:
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x


class DenseCLIPModel(nn.Module):
    """A whole open_clip CLIP as a dense image-text model: what a Segmenter runs in a dense CLIP mode.

    Args:
        clip: an open_clip ``CLIP`` (image and text towers), shared, never copied or modified.
        mode, sigma: the last-block mode of :class:`DenseCLIP`.
        logit_scale: multiplier of the cosine similarities (the papers use 40 to 50, not CLIP's 100).
    """

    def __init__(
        self, clip: nn.Module, mode: str = "naclip", logit_scale: float = 40.0, sigma: float = 5.0
    ) -> None:
        super().__init__()
        if not logit_scale > 0:
            raise BadConfigError(f"logit_scale must be positive, got {logit_scale}")
        self.clip = clip
        self.dense = DenseCLIP(clip, mode, sigma=sigma)
        self.logit_scale = float(logit_scale)

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.dense.patch_size

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` normalised images -> ``B x D x H/p x W/p`` patch embeddings (weights' dtype)."""
        return self.dense(images.to(self.dense.visual.conv1.weight.dtype))

    def dense_logits(self, features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Patch embeddings and ``K x D`` text embeddings -> ``B x K x h x w`` scaled cosine similarities."""
        return dense_logits(features, text_embeddings, self.logit_scale)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``K x L`` open_clip token ids -> ``K x D`` text embeddings (see :func:`encode_tokens`)."""
        return encode_tokens(self.clip, token_ids.to(self.dense.visual.conv1.weight.device))

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` images and ``K x L`` tokens -> ``B x K x h x w`` logits."""
        return self.dense_logits(self.encode_image(images), self.encode_text(token_ids))


def _remember(cache: dict, key: tuple, value: object, limit: int = 8) -> None:
    """Store ``value``, evicting the oldest entries: images of ever-new sizes must not grow memory."""
    cache[key] = value
    while len(cache) > limit:
        del cache[next(iter(cache))]


def _check_supported(visual: nn.Module) -> None:
    """Raise :class:`BadConfigError` unless ``visual`` is an open_clip ViT this module can recompute."""
    hint = "Use an open_clip CLIP with a plain ViT image tower (e.g. ViT-B-16 with OpenAI weights)."
    if not isinstance(visual, VisionTransformer):
        raise BadConfigError(
            f"dense CLIP needs an open_clip VisionTransformer, got {type(visual).__name__}", hint=hint
        )
    if visual.attn_pool is not None:
        raise BadConfigError("dense CLIP does not support attention-pooled towers (e.g. CoCa)", hint=hint)
    block = visual.transformer.resblocks[-1]
    attn = getattr(block, "attn", None)
    if (
        not isinstance(block, ResidualAttentionBlock)
        or not isinstance(attn, nn.MultiheadAttention)
        or not attn._qkv_same_embed_dim
        or attn.bias_k is not None
        or attn.add_zero_attn
    ):
        raise BadConfigError(
            f"dense CLIP needs a last block with a plain nn.MultiheadAttention, got {type(block).__name__}",
            hint=hint,
        )


__all__ = ["MODES", "DenseCLIP", "LastBlock", "dense_logits", "neighbourhood_bias"]
