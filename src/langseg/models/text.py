"""Text encoders that turn token ids into label embeddings.

Tokenisation belongs to the predictors; these modules take ``K x L`` token ids and return ``K x D``
embeddings, computed once per label set and reused for every image.
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_text_tower
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, TextTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from langseg.errors import BadConfigError, BadExpressionError


class ClipTextEncoder(nn.Module):
    """A frozen open_clip text tower: ``K x L`` token ids -> ``K x D`` text embeddings.

    Args:
        model_name: any open_clip model name (``"ViT-B-32"`` default: LSeg's text encoder), or ``None``
            together with ``embed_dim`` and ``text_cfg`` for a custom (tiny) tower.
        pretrained: an open_clip pretrained tag (e.g. ``"openai"``); needs the network or the open_clip
            cache. ``None`` gives random weights, to be loaded from a checkpoint.
        quick_gelu: use OpenAI's ``x * sigmoid(1.702 x)`` activation. OpenAI CLIP weights (which LSeg
            uses) need it; ``None`` follows the open_clip config (GELU unless the name says quickgelu).
        embed_dim: output width ``D`` for a custom tower.
        text_cfg: open_clip ``CLIPTextCfg`` fields for a custom tower (``width``, ``heads``, ``layers``...).

    The weights live in ``self.text`` with OpenAI/open_clip key names (``token_embedding.weight``,
    ``positional_embedding``, ``transformer.resblocks.N.*``, ``ln_final.*``, ``text_projection``).
    Parameters are frozen (``requires_grad=False``): LSeg keeps the CLIP text tower fixed.
    """

    def __init__(
        self,
        model_name: str | None = "ViT-B-32",
        pretrained: str | None = None,
        *,
        quick_gelu: bool | None = None,
        embed_dim: int | None = None,
        text_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            if model_name is None:
                raise BadConfigError("pretrained text weights need an open_clip model_name")
            self.text = _text_tower_from_open_clip(model_name, pretrained)
        else:
            if model_name is not None:
                config = open_clip.get_model_config(model_name)
                if config is None:
                    raise BadConfigError(
                        f"unknown open_clip model {model_name!r}",
                        hint="See open_clip.list_models() for the names open_clip knows.",
                    )
                embed_dim = config["embed_dim"] if embed_dim is None else embed_dim
                text_cfg = {**config["text_cfg"], **(text_cfg or {})}
                if quick_gelu is None:
                    quick_gelu = bool(config.get("quick_gelu", False))
            if embed_dim is None or text_cfg is None:
                raise BadConfigError("a custom text tower needs embed_dim and text_cfg")
            tower = _build_text_tower(embed_dim, text_cfg, quick_gelu=bool(quick_gelu))
            if not isinstance(tower, TextTransformer):
                raise BadConfigError(f"{model_name!r} has no CLIP-style text transformer")
            self.text = tower
        for param in self.parameters():
            param.requires_grad_(False)

    @property
    def output_dim(self) -> int:
        """``D``, the width of the returned embeddings."""
        return int(self.text.output_dim)

    @property
    def context_length(self) -> int:
        """``L``, the number of token positions the tower accepts."""
        return int(self.text.context_length)

    def encode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embed tokenised labels.

        Args:
            token_ids: ``K x L`` integer ids from the matching open_clip tokenizer (``L <= context``).

        Returns:
            ``K x D`` embeddings (not normalised; LSegNet normalises them).
        """
        if token_ids.ndim != 2 or token_ids.shape[0] == 0:
            raise BadExpressionError(
                f"expected K x L token ids with K >= 1, got shape {tuple(token_ids.shape)}"
            )
        if token_ids.shape[1] > self.context_length:
            raise BadExpressionError(
                f"{token_ids.shape[1]} tokens exceed the text context of {self.context_length}",
                hint="Shorten the label or tokenise with the model's context length.",
            )
        token_ids = token_ids.long()
        if trim_text_now(self.text):
            return encode_text_trimmed(self.text, token_ids)[0]
        return self.text(token_ids)  # not trimmable (see can_trim_text): open_clip's full forward

    forward = encode


def capturing_graph() -> bool:
    """Whether a graph is being captured (``torch.export`` / ``torch.compile``, or the TorchScript tracer
    behind the legacy ONNX exporter). Shapes that depend on tensor values (trimming to the last
    end-of-text token, packed sequences) would be refused, or baked into the graph as constants, so the
    models take their value-independent paths then (same results, more work)."""
    return bool(torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing())


def trim_text_now(tower: nn.Module) -> bool:
    """:func:`can_trim_text`, and no graph is being captured (:func:`capturing_graph`): trimming runs
    a number of positions read from the token values, which a captured graph cannot follow."""
    return can_trim_text(tower) and not capturing_graph()


def can_trim_text(tower: nn.Module) -> bool:
    """Whether :func:`encode_text_trimmed` gives exactly the tower's own result.

    ``tower`` is an open_clip ``TextTransformer`` or a plain ``CLIP`` (which keeps the same parts as
    top-level attributes). Trimming the positions after the last end-of-text (EOT) token is exact only
    when nothing before it can see them and the pooled token is the EOT one:

    - a causal ``attn_mask`` (a bidirectional tower lets every position attend to the padding);
    - ``argmax`` pooling (EOT has the largest id); ``last`` pools the final padded position, which
      depends on the whole context, and ``first``/``eos`` are not used by the towers we ship;
    - no appended class token (CoCa's ``cls_emb`` sits after the padding and attends to all of it)
      and no padding mask.

    Anything else falls back to open_clip's full forward.
    """
    pool_type = getattr(tower, "pool_type", getattr(tower, "text_pool_type", None))
    transformer = getattr(tower, "transformer", None)
    return (
        isinstance(getattr(tower, "token_embedding", None), nn.Embedding)
        and isinstance(getattr(tower, "attn_mask", None), torch.Tensor)
        and pool_type == "argmax"
        and getattr(tower, "cls_emb", None) is None
        and not getattr(tower, "use_pad_mask", False)
        and isinstance(getattr(transformer, "resblocks", None), nn.ModuleList)
        and hasattr(tower, "ln_final")
        and hasattr(tower, "positional_embedding")
    )


def encode_text_trimmed(
    tower: nn.Module, token_ids: torch.Tensor, *, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a causal CLIP text tower over only the positions up to each batch's last EOT token.

    Under a causal mask position ``i`` only sees positions ``<= i``, so the outputs at and before the
    last EOT token do not depend on the padding after it: running ``N = max EOT index + 1`` positions
    instead of the full context (77) gives the same embeddings for a fraction of the cost (most labels
    are under 10 tokens). The causal mask is sliced to ``N x N``.

    Args:
        tower: an open_clip ``TextTransformer`` or plain ``CLIP`` for which :func:`can_trim_text` holds.
        token_ids: ``K x L`` token ids (``L <= context``), EOT the largest id of each row.
        length: run at least this many positions (capped at ``L``), e.g. to get token features up to
            the longest prompt of a mask; ``None``: up to the last EOT only.

    Returns:
        ``(pooled, tokens)``: ``K x D`` projected EOT embeddings, equal to the tower's own forward
        (``encode_text`` for a CLIP), and ``K x N x W`` per-token ``ln_final`` outputs (unprojected).
    """
    if not can_trim_text(tower):
        raise BadConfigError("this text tower cannot be trimmed at the end-of-text token; run it in full")
    eot = token_ids.argmax(dim=-1)  # open_clip's argmax pooling: the EOT id is the largest in the vocab
    n = int(eot.max()) + 1
    if length is not None:
        n = max(n, min(int(length), token_ids.shape[1]))
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(token_ids[:, :n]).to(cast_dtype)
    x = x + tower.positional_embedding[:n].to(cast_dtype)
    x = run_text_blocks(tower.transformer, x, tower.attn_mask[:n, :n])
    tokens = tower.ln_final(x)
    pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), eot]
    return project_text(tower.text_projection, pooled), tokens


def project_text(projection: nn.Module | torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Apply a CLIP text projection (``W x D`` matrix, ``nn.Linear`` or none) to ``... x W`` features."""
    if isinstance(projection, nn.Linear):
        return projection(x)
    if projection is not None:
        return x @ projection
    return x


def run_text_blocks(transformer: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """open_clip ``Transformer`` blocks over ``K x N x W`` batch-first features, without batched matmuls.

    Why not just call the blocks: ``nn.MultiheadAttention(batch_first=True)`` transposes its input to a
    ``N x K x W`` *view* and hands it to ``F.linear``. For a non-contiguous 3-D input ``linear`` goes
    through ``matmul``, which folds the input into one ``mm`` only if it can ``view`` it as 2-D (it
    cannot: the transposed view is not contiguous in its leading dims) or if the input or the weight
    has ``requires_grad`` set (then it copies, to keep the backward a plain ``mm``). A frozen tower
    (``requires_grad_(False)``) meets neither, so the in-projection runs as ``aten::bmm`` over the
    weight expanded ``N`` times: ``[N, K, W] x [N, W, 3W]``. Same numbers, but 1.3x slower in fp32 and
    ~15x in bf16 on a CPU. The fast path (``_native_multi_head_attention``) never applies here: open_clip
    passes a float causal mask, which disqualifies it. So for the standard block we do the attention
    ourselves with the in-projection on a contiguous 2-D ``K*N x W`` view (one ``addmm``), the same
    ``scaled_dot_product_attention`` that ``F.multi_head_attention_forward`` uses, and the block's own
    modules for everything else. Other block types (open_clip's custom attention, cross-attention
    variants) are called as they are.

    Args:
        transformer: an open_clip ``Transformer`` (``resblocks``, ``grad_checkpointing``, ``batch_first``).
        x: ``K x N x W`` batch-first features.
        attn_mask: ``N x N`` additive mask (``-inf`` above the diagonal for a causal tower).

    Returns:
        ``K x N x W`` features after the last block (before ``ln_final``).
    """
    batch_first = getattr(transformer, "batch_first", True)
    checkpointing = getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled()
    for block in transformer.resblocks:
        if _is_plain_block(block):
            if checkpointing:
                x = checkpoint(_plain_block_forward, block, x, attn_mask, use_reentrant=False)
            else:
                x = _plain_block_forward(block, x, attn_mask)
        elif batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


def _is_plain_block(block: nn.Module) -> bool:
    """An open_clip ``ResidualAttentionBlock`` whose self-attention we can compute ourselves."""
    attn = getattr(block, "attn", None)
    return (
        isinstance(block, ResidualAttentionBlock)
        and not hasattr(block, "ln_1_kv")  # cross-attention blocks (CoCa's decoder)
        and isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim  # one packed in_proj_weight
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
    )


def _plain_block_forward(
    block: ResidualAttentionBlock, x: torch.Tensor, attn_mask: torch.Tensor
) -> torch.Tensor:
    """``ResidualAttentionBlock.forward`` for ``K x N x W`` batch-first ``x``, in-projection as one matmul."""
    attn = block.attn
    k, n, width = x.shape
    heads = attn.num_heads
    h = block.ln_1(x).reshape(k * n, width)  # contiguous 2-D: F.linear is a single addmm
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # K*N x 3W
    q, key, value = qkv.view(k, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # K x H x N x d
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout)
    out = F.linear(out.transpose(1, 2).reshape(k * n, width), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(out.view(k, n, width))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _text_tower_from_open_clip(model_name: str, pretrained: str) -> TextTransformer:
    """Build the full open_clip model with its published weights and keep only the text tower."""
    model = open_clip.create_model(model_name, pretrained=pretrained)
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):  # CustomTextCLIP keeps the tower in .text
        return text
    if not hasattr(model, "token_embedding"):
        raise BadConfigError(f"{model_name!r} has no CLIP-style text transformer")
    # Plain CLIP spreads the tower over its top-level attributes: rebuild it and copy them over.
    config = open_clip.get_model_config(model_name)
    quick_gelu = isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    tower = _build_text_tower(config["embed_dim"], config["text_cfg"], quick_gelu=quick_gelu)
    keys = set(tower.state_dict())
    tower.load_state_dict({k: v for k, v in model.state_dict().items() if k in keys}, strict=True)
    return tower
