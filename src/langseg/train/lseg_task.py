"""The ``lseg-semantic`` training task: LSeg with its text tower, on any semantic dataset.

Every step embeds the label names with the text tower (cheap: K short prompts) and scores every pixel
against them, with cross-entropy over the labels. Two text regimes:

- ``freeze_text: true`` (the paper): a frozen CLIP text tower, label embeddings computed once and cached;
- ``freeze_text: false``: a small open_clip-style text transformer trained jointly, for worlds where no
  pretrained CLIP is available (ShapeWorld offline).

Zero-shot protocol: ``train_exclude_labels`` removes labels from the training label set (their pixels
are ignored; with ShapeWorld's ``exclude_pairs`` they never occur), while evaluation scores every label,
so the unseen ones are predicted from their names alone.

``model_kwargs`` keys: the LSegNet builder's keyword arguments, plus ``text`` (ClipTextEncoder keyword
arguments; default: the variant's own text tower), ``freeze_text`` (bool), ``prompt`` (a template such as
``"a photo of a {}"``; default the bare label) and ``train_exclude_labels`` (list of label names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

import langseg.zoo  # noqa: F401  (importing the zoo registers the model entries)
from langseg.data import build_dataset
from langseg.errors import BadConfigError
from langseg.evaluate import SemanticEvaluator
from langseg.hub import save_checkpoint
from langseg.models.lseg import LSEG_CONFIGS, TEXT_ENCODER_CONFIGS, LSegNet
from langseg.models.text import ClipTextEncoder
from langseg.registry import get_model_entry
from langseg.train.config import TrainConfig
from langseg.train.losses import cross_entropy
from langseg.train.optim import head_backbone_groups
from langseg.train.tasks import TaskParts, check_model_kwargs, network_error, network_errors, register_task

Batch = dict[str, Any]


class LSegTrainModule(nn.Module):
    """LSegNet + text tower + tokenised label set: the train module of ``lseg-semantic``.

    Args:
        net: the LSeg network.
        text_encoder: its text tower; trainable when ``freeze_text`` is False.
        labels: every label name of the dataset, in class-index order.
        train_label_ids: the labels used as classes during training (all by default).
        freeze_text: keep the text tower fixed (and cache its label embeddings).
        prompt: template applied to each label name before tokenisation.
        head_lr_mult: learning-rate factor of the decoder/head group (LSeg: 10).
        ignore_index: unlabelled target value.
    """

    def __init__(
        self,
        net: LSegNet,
        text_encoder: ClipTextEncoder,
        labels: list[str],
        train_label_ids: list[int] | None = None,
        freeze_text: bool = True,
        prompt: str = "{}",
        head_lr_mult: float = 10.0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.net, self.text_encoder = net, text_encoder
        self.labels, self.freeze_text, self.head_lr_mult = labels, freeze_text, head_lr_mult
        self.ignore_index = ignore_index
        for param in text_encoder.parameters():
            param.requires_grad_(not freeze_text)
        tokenizer = SimpleTokenizer(context_length=text_encoder.context_length)
        self.register_buffer(
            "tokens", tokenizer([prompt.format(label) for label in labels]), persistent=False
        )
        ids = list(range(len(labels))) if train_label_ids is None else list(train_label_ids)
        # Full class index -> training class index (labels left out of training map to ignore).
        lookup = torch.full((max(len(labels), ignore_index + 1),), ignore_index, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("train_ids", torch.tensor(ids), persistent=False)
        self.register_buffer("to_train_index", lookup, persistent=False)
        self._frozen_text: torch.Tensor | None = None
        # What export() records so that langseg.load() can rebuild the predictor (set by the builder).
        self.export_config: dict[str, Any] = {}
        self.train_size: int | None = None  # the training resolution (crop or image side), if known

    def text_embeddings(self) -> torch.Tensor:
        """``K x D`` embeddings of every label (cached when the text tower is frozen)."""
        if not self.freeze_text:
            return self.text_encoder.encode(self.tokens)
        if self._frozen_text is None or self._frozen_text.device != self.tokens.device:
            with torch.no_grad():
                self._frozen_text = self.text_encoder.encode(self.tokens)
        return self._frozen_text

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"loss", "logits": B x K_train x H x W}``; ``batch["mask"]`` holds full class indices."""
        text = self.text_embeddings()[self.train_ids]
        logits = self.net(batch["image"], text)
        target = self.to_train_index[batch["mask"]]
        return {"loss": cross_entropy(logits, target, self.ignore_index), "logits": logits}

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """``B x H x W`` full class indices, choosing among *all* labels (seen and unseen)."""
        return self.net(batch["image"], self.text_embeddings()).argmax(dim=1)

    def export(self, out_dir: str | Path) -> Path:
        """Write the trained network and text tower as a langseg LSeg folder that ``langseg.load`` reads
        (the one layout of :func:`langseg.hub.save_checkpoint`, keys ``net.*`` and ``text_encoder.*``)."""
        config = {
            "format": "langseg",
            "family": "lseg",
            **self.export_config,
            # Trained at one resolution: every image is resized to it (long side), not to the paper's 480.
            "predict": {"plan": {"base_size": self.train_size} if self.train_size else "native"},
            "labels": self.labels,
        }
        state = {
            **{f"net.{k}": v for k, v in self.net.state_dict().items()},
            **{f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()},
        }
        return save_checkpoint(state, out_dir, config)

    def load_exported(self, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Take the weights of a folder :meth:`export` wrote (``init_from``; keys ``net.*``,
        ``text_encoder.*``)."""
        self.load_state_dict(state)
        self._frozen_text = None

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """The official recipe: the ViT and its reassemble projections at ``base_lr``; the DPT fusion
        blocks, head, regularisation, logit scale (and a trainable text tower) at ``head_lr_mult`` x."""
        backbone = [*self.net.encoder.parameters(), *self.net.reassemble.parameters()]
        backbone_ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in backbone_ids]
        return head_backbone_groups(backbone, head, base_lr, self.head_lr_mult)


def _check_task_kwargs(text: Any, freeze_text: Any, prompt: Any, excluded: Any) -> None:
    """BadConfigError naming the first of the task's own ``model_kwargs`` keys of a wrong type."""
    if text is not None and not isinstance(text, dict):
        raise BadConfigError("config key 'model_kwargs.text' must be a mapping of ClipTextEncoder arguments")
    if not isinstance(freeze_text, bool):
        raise BadConfigError(
            f"config key 'model_kwargs.freeze_text' must be true or false, got {freeze_text!r}"
        )
    try:
        ok = isinstance(prompt, str) and isinstance(prompt.format("label"), str)
    except (IndexError, KeyError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise BadConfigError(
            f"config key 'model_kwargs.prompt' must be a template with one {{}}, got {str(prompt)[:60]!r}",
            hint='e.g. prompt: "a photo of a {}"',
        )
    if not isinstance(excluded, list) or not all(isinstance(name, str) for name in excluded):
        raise BadConfigError("config key 'model_kwargs.train_exclude_labels' must be a list of label names")


def build_lseg_semantic(config: TrainConfig) -> TaskParts:
    """``lseg-semantic``: a registered LSeg variant (``config.model``) on a semantic dataset."""
    kwargs = dict(config.model_kwargs)
    check_model_kwargs(kwargs)
    text_kwargs = kwargs.pop("text", None)
    freeze_text = kwargs.pop("freeze_text", True)
    prompt = kwargs.pop("prompt", "{}")
    excluded = kwargs.pop("train_exclude_labels", [])
    _check_task_kwargs(text_kwargs, freeze_text, prompt, excluded)
    entry = get_model_entry(config.model or "lseg-tiny")
    if entry.family != "lseg":
        raise BadConfigError(f"task lseg-semantic trains LSeg models, not {entry.name!r}")
    if text_kwargs is None and entry.name not in TEXT_ENCODER_CONFIGS:
        raise BadConfigError(
            f"config key 'model_kwargs.text' is needed for {entry.name!r} (it has no default text tower)",
            hint="Give ClipTextEncoder's arguments, e.g. {model_name: ViT-B-32, quick_gelu: true}.",
        )
    try:
        net = entry.builder(**{**entry.kwargs, **kwargs})
        text_encoder = ClipTextEncoder(**(text_kwargs or TEXT_ENCODER_CONFIGS[entry.name]))
    except network_errors as err:
        raise network_error(err, entry.name) from None
    base_kwargs = dict(LSEG_CONFIGS.get(entry.name, {}))
    net_kwargs = {**entry.kwargs, **kwargs}
    train = build_dataset(config.data.name, config.data.kwargs)
    val = build_dataset(config.val_data.name, config.val_data.kwargs) if config.val_data is not None else None
    labels = list(getattr(train, "labels", []))
    if not labels:
        raise BadConfigError(
            f"dataset {config.data.name!r} has no class labels", hint="Use a semantic dataset."
        )
    unknown = [name for name in excluded if name not in labels]
    if unknown:
        raise BadConfigError(f"train_exclude_labels names labels the dataset lacks: {unknown}")
    train_ids = [i for i, name in enumerate(labels) if name not in excluded]
    text_kwargs = text_kwargs or TEXT_ENCODER_CONFIGS[entry.name]
    module = LSegTrainModule(
        net,
        text_encoder,
        labels,
        train_ids,
        freeze_text=freeze_text,
        prompt=prompt,
        head_lr_mult=config.optim.head_lr_mult,
        ignore_index=config.data.ignore_index,
    )
    module.train_size = config.data.crop_size or config.data.kwargs.get("size")
    module.export_config = {
        "model": entry.name,
        "variant": entry.name,
        "kwargs": {**base_kwargs, **net_kwargs},
        "text_encoder": {"kwargs": dict(text_kwargs)},
        "source": {"trained": "langseg train", "task": "lseg-semantic", "data": config.data.name},
    }
    return TaskParts(module, train, val, SemanticEvaluator(len(labels), labels, config.data.ignore_index))


register_task("lseg-semantic", build_lseg_semantic)
