"""Sentence encoders for referring segmentation: word features, their mask and one sentence feature.

Every encoder here maps ``(token_ids: B x L, token_mask: B x L bool)`` to

- ``words``: ``B x L x C`` per-token features (zero at padding),
- ``mask``: the ``B x L`` bool mask, passed through,
- ``sentence``: ``B x C`` one feature for the whole expression,

which is what VLT consumes (``words`` feed the Query Generation Module, ``sentence`` the fusion).

:class:`GRUTextEncoder` is the paper's: word embeddings -> bidirectional GRU whose two directions are
*summed* -> attention pooling (official ``model/language_backbone.py``). :class:`ClipWordEncoder` adapts
an open_clip text tower. A Hugging Face (BERT) encoder is not provided: ``transformers`` is not a
dependency, and the two above cover the paper and the CLIP text space.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from langseg.errors import BadConfigError, BadExpressionError
from langseg.models.text import (
    ClipTextEncoder,
    capturing_graph,
    encode_text_trimmed,
    project_text,
    trim_text_now,
)

TextOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_tokens(token_ids: torch.Tensor, token_mask: torch.Tensor) -> None:
    if token_ids.ndim != 2 or token_ids.shape != token_mask.shape or token_ids.shape[0] == 0:
        raise BadExpressionError(
            f"expected B x L token ids and an equal B x L mask, got {tuple(token_ids.shape)} and "
            f"{tuple(token_mask.shape)}",
            hint="Tokenise with the model's tokenizer (Vocab.encode_batch) or use the Referrer.",
        )


class GRUTextEncoder(nn.Module):
    """Word embeddings -> bi-GRU (directions summed) -> per-channel attention pooling.

    Args:
        vocab_size: rows of the embedding table (``len(vocab)``, ``<pad>`` = 0 included).
        word_dim: embedding width (official: 300-d spaCy vectors, fixed; here learnt).
        hidden_dim: GRU width ``C`` (official ``rnn_hidden_size`` 1024).
        bidirectional: run a backward GRU too; its output is added to the forward one (Keras
            ``merge_mode="sum"``), so ``C`` does not double.
        dropout: dropout on the GRU input (Keras ``GRU(dropout=0.1)``).
        pooling: ``"attention"`` (official ``lang_att: True``) or ``"last"`` (final GRU states).
        attention_dropout: dropout on the attention scores before the softmax (official 0.1).

    Attention pooling, as the official code: ``a = softmax_L(tanh(W h + b))`` taken *per channel* (``a`` is
    ``B x L x C``) and ``sentence = sum_L a * h``. Unlike the official code, padding is masked: the GRU
    runs on packed sequences and padded words get no attention, so an expression's features do not
    depend on how much padding its batch has.
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        hidden_dim: int = 1024,
        bidirectional: bool = True,
        dropout: float = 0.1,
        pooling: str = "attention",
        attention_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if vocab_size < 3:
            raise BadConfigError(f"vocab_size must be at least 3 (<pad>, <unk> and a word), got {vocab_size}")
        if pooling not in ("attention", "last"):
            raise BadConfigError(f"unknown pooling {pooling!r}", hint="Use attention or last.")
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.input_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(word_dim, hidden_dim, batch_first=True, bidirectional=bidirectional)
        self.pooling = pooling
        self.attention = nn.Linear(hidden_dim, hidden_dim) if pooling == "attention" else None
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.output_dim = hidden_dim
        self.bidirectional = bidirectional

    def run_gru(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B x L x C word features, zero at pads; B x C last states summed over directions)``."""
        x = self.input_dropout(self.embed(token_ids))
        if capturing_graph():
            return self._run_gru_padded(x, token_mask.sum(1).clamp(min=1))
        lengths = token_mask.sum(1).clamp(min=1).cpu()  # an empty row still reads its first (pad) slot
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, last = self.gru(packed)
        words, _ = pad_packed_sequence(out, batch_first=True, total_length=token_ids.shape[1])
        if self.bidirectional:
            words = words.view(*words.shape[:2], 2, -1).sum(2)
        return words, last.sum(0)

    def _run_gru_padded(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`run_gru` without packed sequences, for graph capture (ONNX export): packing makes
        shapes that depend on the lengths, which ``torch.export`` refuses.

        Each direction reads only real words, as with packing: the forward direction runs on the
        left-aligned rows (its outputs before a row's length never see the padding after it) and the
        backward direction on the same rows right-aligned (padding first, so it starts at the last word).
        Two GRU passes instead of one; the same numbers up to float rounding.

        Args:
            x: ``B x L x E`` word embeddings (left-aligned, padding after); lengths: ``B`` int64, >= 1.
        """
        batch, length, _ = x.shape
        positions = torch.arange(length, device=x.device)
        real = positions[None] < lengths[:, None]  # B x L
        shift = length - lengths  # right-aligning moves row b by L - len_b places
        hx = x.new_zeros(2 if self.bidirectional else 1, batch, self.gru.hidden_size)
        out, _ = self.gru(x, hx)
        out = out.view(batch, length, 2 if self.bidirectional else 1, -1)
        # The forward direction's last state is its output at the row's last word.
        index = (lengths - 1).view(batch, 1, 1).expand(batch, 1, out.shape[-1])
        last = out[:, :, 0].gather(1, index)[:, 0]
        words = out[:, :, 0] * real[..., None]
        if not self.bidirectional:
            return words, last
        # Right-aligned rows: row b's word t sits at t + shift_b; taking index (t - shift_b) mod L back.
        right = x.gather(1, ((positions[None] - shift[:, None]) % length)[..., None].expand_as(x))
        back, _ = self.gru(right, hx)
        back = back.view(batch, length, 2, -1)[:, :, 1]
        aligned = back.gather(1, ((positions[None] + shift[:, None]) % length)[..., None].expand_as(back))
        # The backward direction's last state is its output at the row's first word.
        return words + aligned * real[..., None], last + aligned[:, 0]

    def pool(self, words: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Attention pooling of ``B x L x C`` words into ``B x C`` (see class docstring)."""
        assert self.attention is not None
        scores = self.attention_dropout(torch.tanh(self.attention(words)))
        scores = scores.masked_fill(~token_mask[..., None], float("-inf"))
        # A row without any real token would give 0/0; let it attend to its (zero) pads instead.
        # (masked_fill, not `if empty.any()`: a branch on values cannot be captured in an ONNX graph.)
        empty = ~token_mask.any(1)
        scores = scores.masked_fill(empty[:, None, None], 0.0)
        return (scores.softmax(dim=1) * words).sum(1)

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> TextOutput:
        """``(B x L x C words, B x L mask, B x C sentence)`` for ``B x L`` ids and bool mask."""
        _check_tokens(token_ids, token_mask)
        token_mask = token_mask.bool()
        words, last = self.run_gru(token_ids.long(), token_mask)
        sentence = self.pool(words, token_mask) if self.pooling == "attention" else last
        return words, token_mask, sentence


class ClipWordEncoder(nn.Module):
    """An open_clip text tower returning per-token features and the pooled sentence embedding.

    Args:
        model_name, pretrained, quick_gelu, embed_dim, text_cfg: as
            :class:`langseg.models.text.ClipTextEncoder` (``None`` model name + cfg for a tiny tower).
        trainable: fine-tune the tower (default: frozen, as CLIP text towers usually are).

    Token features are ``ln_final`` outputs passed through the tower's text projection, so words and
    sentence share CLIP's embedding width ``D``; the sentence is CLIP's own pooled (end-of-text) token.
    Tokenise with :class:`langseg.predict.tokenizers.ClipTokenizer` (id 0 = padding).
    """

    def __init__(
        self,
        model_name: str | None = "ViT-B-32",
        pretrained: str | None = None,
        *,
        quick_gelu: bool | None = None,
        embed_dim: int | None = None,
        text_cfg: dict[str, Any] | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        clip = ClipTextEncoder(
            model_name, pretrained, quick_gelu=quick_gelu, embed_dim=embed_dim, text_cfg=text_cfg
        )
        self.text = clip.text
        self.text.output_tokens = True
        for param in self.text.parameters():
            param.requires_grad_(trainable)
        self.output_dim = int(self.text.output_dim)

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> TextOutput:
        """``(B x L x D words, B x L mask, B x D sentence)``; ``L`` at most the tower's context."""
        _check_tokens(token_ids, token_mask)
        if token_ids.shape[1] > self.text.context_length:
            raise BadExpressionError(
                f"{token_ids.shape[1]} tokens exceed the text context of {self.text.context_length}"
            )
        token_ids, token_mask = token_ids.long(), token_mask.bool()
        length = token_ids.shape[1]
        if trim_text_now(self.text):
            # Run only up to the longest prompt (its last real token or EOT, whichever is later): under
            # the causal mask the used positions never see the later ones. Padding columns come back zero.
            used = token_mask.any(0).nonzero()
            longest = int(used.max()) + 1 if used.numel() else 1
            sentence, tokens = encode_text_trimmed(self.text, token_ids, length=longest)
            tokens = project_text(self.text.text_projection, tokens)
            tokens = F.pad(tokens, (0, 0, 0, length - tokens.shape[1]))
        else:
            # Not trimmable (see can_trim_text): open_clip's full forward, whose masks are built for the
            # full context, so pad back to it and drop the padding after.
            padded = F.pad(token_ids, (0, self.text.context_length - length))
            sentence, tokens = self.text(padded)
            tokens = project_text(self.text.text_projection, tokens[:, :length])
        return tokens * token_mask[..., None], token_mask, sentence


def build_text_encoder(config: dict[str, Any]) -> nn.Module:
    """A text encoder from ``{"kind": "gru" | "clip", **kwargs}`` (kwargs of the class)."""
    kwargs = dict(config)
    kind = kwargs.pop("kind", "gru")
    if kind == "gru":
        return GRUTextEncoder(**kwargs)
    if kind == "clip":
        return ClipWordEncoder(**kwargs)
    raise BadConfigError(f"unknown text encoder {kind!r}", hint="Use 'gru' (paper) or 'clip'.")
