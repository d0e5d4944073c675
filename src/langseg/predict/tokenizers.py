"""Tokenisers for referring expressions: a word vocabulary (VLT's GRU) and open_clip's BPE (CLIP towers).

Both turn a batch of sentences into ``B x L`` token ids and a ``B x L`` bool mask (True = a real token),
truncating silently to ``max_tokens``; the predictor warns about truncation because it knows the user.
Both serialise to a small JSON-able dict (``to_config``) stored in a checkpoint's ``config.json``, so a
checkpoint always carries the tokeniser it was trained with (:func:`tokenizer_from_config`).

Words are lower-cased runs of letters in any script (``[^\\W\\d_]+``): digits, punctuation and emoji
separate words and are dropped, while non-English words survive as words the vocabulary does not know
(``<unk>``), never as a crash. The official VLT splits on white space and looks words up in spaCy's
300-d vectors, where unknown words become zero vectors; ``<unk>`` is our learnt counterpart.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from langseg.errors import BadConfigError, BadDataError, OutputError

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
# VLT's `word_len` (config/base.yaml): expressions are cut to 15 words.
DEFAULT_MAX_TOKENS = 15
_WORD = re.compile(r"[^\W\d_]+")
# Function words that name no object, attribute or place; an expression made only of them (and unknown
# words) cannot pick anything out, so the predictor warns about it.
STOP_WORDS: frozenset[str] = frozenset(
    {
        "a",
        "an",
        "the",
        "this",
        "that",
        "these",
        "those",
        "it",
        "its",
        "of",
        "in",
        "on",
        "at",
        "to",
        "from",
        "by",
        "with",
        "and",
        "or",
        "is",
        "are",
        "be",
        "which",
        "who",
        "one",
        "ones",
        "thing",
        "please",
        "there",
        "here",
    }
)


def split_words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (runs of letters; everything else separates words)."""
    return _WORD.findall(text.lower())


class Tokenizer(Protocol):
    """What the :class:`~langseg.predict.referrer.Referrer` needs from a tokeniser."""

    @property
    def max_tokens(self) -> int: ...

    def count(self, text: str) -> int:
        """Token positions ``text`` needs before truncation."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B x L int64 ids, B x L bool mask)``, truncated to ``max_tokens``, L = longest row."""
        ...

    def is_known(self, word: str) -> bool:
        """Whether ``word`` maps to a learnt token rather than ``<unk>``."""
        ...

    def to_config(self) -> dict[str, Any]: ...


class Vocab:
    """A word vocabulary: ``<pad>`` = 0, ``<unk>`` = 1, then corpus words by frequency.

    Args:
        words: the vocabulary's words after the two specials, in id order (no duplicates).
        max_tokens: expressions are cut to this many words (VLT: 15).
    """

    kind = "words"

    def __init__(self, words: Sequence[str], max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if max_tokens < 1:
            raise BadConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        words = list(words)
        if len(set(words)) != len(words) or PAD in words or UNK in words:
            raise BadConfigError("vocabulary words must be distinct and must not repeat <pad>/<unk>")
        self.itos: list[str] = [PAD, UNK, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self._max_tokens = int(max_tokens)

    @classmethod
    def build(
        cls,
        corpus: Iterable[str],
        min_count: int = 1,
        max_size: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> Vocab:
        """Vocabulary of the words in ``corpus`` seen at least ``min_count`` times.

        Ordered by decreasing count, ties alphabetically, so the same corpus always gives the same ids;
        ``max_size`` caps the number of words (specials not counted).
        """
        counts = Counter(word for text in corpus for word in split_words(text))
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(ranked[:max_size] if max_size is not None else ranked, max_tokens=max_tokens)

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def __len__(self) -> int:
        """Number of ids, specials included (the embedding table size)."""
        return len(self.itos)

    def is_known(self, word: str) -> bool:
        return word.lower() in self.stoi

    def count(self, text: str) -> int:
        return len(split_words(text))

    def encode(self, text: str) -> list[int]:
        """Ids of the first ``max_tokens`` words of ``text`` (unknown words -> ``<unk>``)."""
        return [self.stoi.get(w, UNK_ID) for w in split_words(text)[: self._max_tokens]]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i != PAD_ID)

    def encode_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.encode(t) for t in texts]
        # At least one column so that an all-empty batch still has a shape; the model masks pads anyway.
        length = max([1, *(len(r) for r in rows)])
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != PAD_ID

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "words": self.itos[2:], "max_tokens": self._max_tokens}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Vocab:
        try:
            return cls(config["words"], max_tokens=int(config.get("max_tokens", DEFAULT_MAX_TOKENS)))
        except (KeyError, TypeError) as err:
            raise BadDataError(f"malformed vocabulary config ({err})") from err

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as JSON to ``path``."""
        path = Path(path)
        try:
            path.write_text(json.dumps(self.to_config(), indent=1))
        except OSError as err:
            raise OutputError(f"cannot write the vocabulary to {path}: {err.strerror or err}") from err
        return path

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            return cls.from_config(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise BadDataError(f"cannot read a vocabulary from {path}: {err}") from err


class ClipTokenizer:
    """open_clip's tokenizer for ``model_name``, trimmed to the longest row of each batch.

    CLIP pads with id 0 after the end-of-text token; its causal attention never lets a position see a
    later one, so trailing padding columns carry nothing and are dropped here (the encoder pads back to
    the tower's context internally), which keeps the word mask, and VLT's attention over it, short.
    """

    kind = "open_clip"

    def __init__(self, model_name: str = "ViT-B-32", context_length: int | None = None) -> None:
        import open_clip

        self.model_name = model_name
        self._tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
        self._max_tokens = int(context_length or self._tokenizer.context_length)

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def is_known(self, word: str) -> bool:
        return True  # byte-pair encoding spells every word

    def count(self, text: str) -> int:
        encode = getattr(self._tokenizer, "encode", None)
        if encode is None:
            return min(len(split_words(text)) + 2, self._max_tokens)
        return len(encode(text)) + 2  # start and end tokens

    def encode_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._tokenizer(list(texts)).long()
        mask = ids != 0
        length = max(1, int(mask.sum(1).max())) if len(texts) else 1
        return ids[:, :length], mask[:, :length]

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_name": self.model_name, "max_tokens": self._max_tokens}


def tokenizer_from_config(config: dict[str, Any]) -> Vocab | ClipTokenizer:
    """The tokeniser a checkpoint's ``config.json`` records (``Vocab`` or ``ClipTokenizer``)."""
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind == Vocab.kind:
        return Vocab.from_config(config)
    if kind == ClipTokenizer.kind:
        return ClipTokenizer(config.get("model_name", "ViT-B-32"), config.get("max_tokens"))
    raise BadDataError(
        f"unknown tokenizer config {config!r}",
        hint="A VLT checkpoint's config.json needs 'tokenizer': {'kind': 'words' | 'open_clip', ...}.",
    )
