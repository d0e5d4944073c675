"""Text encoders that turn token ids into label embeddings.

Tokenisation belongs to the predictors; these modules take ``K x L`` token ids and return ``K x D``
embeddings, computed once per label set and reused for every image.
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn

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
        return self.text(token_ids.long())

    forward = encode


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
