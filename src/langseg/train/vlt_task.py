"""The ``vlt-referring`` training task: VLT on a referring dataset (ShapeWorld-Ref by default).

Every step tokenises ``batch["text"]``, runs the network and takes the official loss
(:func:`~langseg.models.vlt.vlt_loss`: binary cross-entropy summed over the output grid, averaged over
images). Prediction is what the :class:`~langseg.predict.referrer.Referrer` does: sigmoid, bilinear
resize to the image, threshold 0.35, so validation scores are the scores a user gets.

Image size. A VLT takes exactly ``input_size x input_size`` images (its query maps are flattened into
dense layers). Batches of another size are *letterboxed* here as the Referrer does (scale to fit,
centre, pad with grey 0.5), masks likewise, and predictions are mapped back to the image. The simple
and recommended setup is a dataset rendered at the model's input size (ShapeWorld ``size``), where the
letterbox is the identity and training, evaluation and the saved Referrer see identical pixels.

Augmentation. Referring samples must keep their referent and their meaning: scales above 1 followed by
a crop could cut the object out or change what "on the left" picks, so the task refuses
``data.scale_range`` above 1 and a ``data.crop_size`` smaller than the images (scales below 1 pad
instead). Horizontal flips are fine: :mod:`langseg.train.transforms` swaps "left" and "right".

Vocabulary. The word vocabulary is built from the training set's expressions (and their left/right
swapped forms, which flips produce). It lives in the train module (its ``get_extra_state``), so training
checkpoints carry it, and :func:`save_trained_vlt` / :func:`export_vlt` write it beside the weights for
:func:`langseg.load`.

``model_kwargs`` keys: any :class:`~langseg.models.vlt.VLT` argument (ablation switches ``query_source``,
``num_queries``, ``qbm``, ``decoder``, sizes ...) over the registered variant's, with ``text`` merged
over the variant's text config (``vocab_size`` is set from the vocabulary); plus ``vocab``
(``{min_count, max_size, max_tokens}``), ``loss_reduction`` (``image``, official, or ``mean``) and
``threshold`` (0.35).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import langseg.zoo  # noqa: F401  (importing the zoo registers the model entries)
from langseg.data import build_dataset
from langseg.errors import BadConfigError, BadDataError, LangsegError
from langseg.evaluate import ReferringEvaluator
from langseg.models.vlt import PAPER_TEXT, THRESHOLD, VLT, VLT_CONFIGS, vlt_loss
from langseg.predict.letterbox import PAD_VALUE, Placement, letterbox
from langseg.predict.referrer import foreground_probability
from langseg.predict.tokenizers import (
    DEFAULT_MAX_TOKENS,
    ClipTokenizer,
    Tokenizer,
    Vocab,
    tokenizer_from_config,
)
from langseg.registry import get_model_entry
from langseg.train.config import DataConfig, TrainConfig, config_from_dict
from langseg.train.optim import head_backbone_groups
from langseg.train.tasks import TaskParts, check_model_kwargs, network_error, network_errors, register_task
from langseg.train.transforms import swap_left_right

__all__ = ["VLTTrainModule", "build_vlt_module", "build_vlt_referring", "export_vlt", "save_trained_vlt"]

Batch = dict[str, Any]
TASK_KEYS = ("vocab", "loss_reduction", "loss_resolution", "threshold")
VOCAB_KEYS = ("min_count", "max_size", "max_tokens")
_VLT_PARAMS = {k: p for k, p in inspect.signature(VLT.__init__).parameters.items() if k != "self"}
_VLT_KEYS = tuple(_VLT_PARAMS)
# Scalar VLT arguments by their (string) annotation, checked here so that the error names the key.
_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_types(kwargs: dict[str, Any]) -> None:
    for key, value in kwargs.items():
        types = _SCALARS.get(str(_VLT_PARAMS[key].annotation)) if key in _VLT_PARAMS else None
        if types and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            raise BadConfigError(
                f"config key 'model_kwargs.{key}' must be {_VLT_PARAMS[key].annotation}, got {value!r}",
                hint="Fix the value in the YAML or the override.",
            )


class VLTTrainModule(nn.Module):
    """VLT + tokeniser: the train module of ``vlt-referring``.

    Args:
        net: the VLT network.
        tokenizer: turns ``batch["text"]`` into ids (a :class:`Vocab` for the GRU, else CLIP's BPE).
        model_name: registry name the network was built from (recorded when saving).
        mean, std: the pixel normalisation of the training data (recorded when saving, and used for the
            grey letterbox padding).
        head_lr_mult: learning-rate factor of everything but the backbone.
        loss_reduction: :func:`vlt_loss` reduction, ``image`` (official) or ``mean``.
        loss_resolution: :func:`vlt_loss` resolution, ``output`` (official) or ``input``.
        threshold: foreground when the sigmoid probability exceeds it (official 0.35).
    """

    def __init__(
        self,
        net: VLT,
        tokenizer: Tokenizer,
        model_name: str,
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        head_lr_mult: float = 1.0,
        loss_reduction: str = "image",
        threshold: float = THRESHOLD,
        loss_resolution: str = "output",
    ) -> None:
        super().__init__()
        self.net, self.tokenizer, self.model_name = net, tokenizer, model_name
        self.mean, self.std = tuple(mean), tuple(std)
        self.head_lr_mult, self.loss_reduction, self.threshold = head_lr_mult, loss_reduction, threshold
        self.loss_resolution = loss_resolution
        pad = (torch.full((3,), PAD_VALUE) - torch.tensor(self.mean)) / torch.tensor(self.std)
        self.register_buffer("pad", pad, persistent=False)

    # The vocabulary travels in state_dict()["_extra_state"], so a training checkpoint restores it.
    def get_extra_state(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.to_config()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tokenizer = tokenizer_from_config(state["tokenizer"])

    def tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B x L ids, B x L bool mask)`` on the module's device."""
        ids, mask = self.tokenizer.encode_batch(list(texts))
        device = self.pad.device
        return ids.to(device), mask.to(device)

    def logits(self, batch: Batch) -> tuple[torch.Tensor, Placement]:
        """``B x 1 x S/s x S/s`` logits for a batch's ``image`` (normalised ``B x 3 x H x W``) and
        ``text``, and where the images sit in the letterboxed input (the Referrer's letterbox)."""
        images, place = letterbox(batch["image"], self.net.input_size, self.pad)
        return self.net(images, *self.tokens(batch["text"])), place

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, "logits": B x 1 x h x w}``; ``batch["mask"]`` is ``B x H x W`` bool."""
        logits, _ = self.logits(batch)
        masks = letterbox(batch["mask"].float()[:, None], self.net.input_size, 0.0, mode="bilinear")[0][:, 0]
        loss = vlt_loss(logits, masks, self.loss_reduction, self.loss_resolution)
        return {"loss": loss, "logits": logits}

    @torch.no_grad()
    def probability(self, batch: Batch) -> torch.Tensor:
        """``B x H x W`` foreground probability at the image size (the Referrer's mapping)."""
        logits, place = self.logits(batch)
        return foreground_probability(logits.float()[:, 0], place)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """``B x H x W`` bool masks at the image size (probability > ``threshold``)."""
        return self.probability(batch) > self.threshold

    def export(self, out_dir: str | Path) -> Path:
        """Write this trained model as a folder ``langseg.load`` reads (``langseg export`` calls it)."""
        return save_trained_vlt(self, out_dir)

    def load_exported(self, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Take the network weights and vocabulary of a folder :meth:`export` wrote (``init_from``)."""
        self.net.load_state_dict(state)
        if isinstance(config.get("tokenizer"), dict):
            self.tokenizer = tokenizer_from_config(config["tokenizer"])

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Backbone (and Darknet top) at ``base_lr``; fusion, text, transformer and head at
        ``base_lr * head_lr_mult`` (a pretrained backbone wants the smaller rate)."""
        backbone = [*self.net.backbone.parameters()]
        if self.net.top is not None:
            backbone += list(self.net.top.parameters())
        ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return head_backbone_groups(backbone, rest, base_lr, self.head_lr_mult)


# --- building ---------------------------------------------------------------------------------------


def dataset_texts(dataset: Dataset) -> list[str]:
    """Every expression of a referring dataset: its ``texts`` attribute (a list of strings) when it has
    one, or its index (ShapeWorld-Ref, ShapeWorld folders), else by loading every sample (slow)."""
    texts = getattr(dataset, "texts", None)
    if isinstance(texts, list) and all(isinstance(t, str) for t in texts):
        return list(texts)
    index = getattr(dataset, "index", None)
    if isinstance(index, list) and all(hasattr(e, "text") for _, e in index[:1]):
        return [expr.text for _, expr in index]
    items = getattr(dataset, "items", None)
    if isinstance(items, list) and items and isinstance(items[0][1], dict):
        return [expr["text"] for _, expr in items]
    texts = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        text = dataset[i].get("text")
        if not isinstance(text, str):
            break
        texts.append(text)
    return texts


def _vocab(texts: list[str], options: Any, hflip: bool) -> Vocab:
    if not isinstance(options, dict):
        raise BadConfigError("model_kwargs.vocab must be a mapping", hint=f"Keys: {', '.join(VOCAB_KEYS)}.")
    unknown = [k for k in options if k not in VOCAB_KEYS]
    if unknown:
        raise BadConfigError(
            f"unknown config key 'model_kwargs.vocab.{unknown[0]}'", hint=f"Valid: {', '.join(VOCAB_KEYS)}."
        )
    # Flipped samples say "right" where the data says "left": both spellings must be in the vocabulary.
    corpus = texts + [swap_left_right(t) for t in texts] if hflip else texts
    try:
        return Vocab.build(
            corpus,
            min_count=int(options.get("min_count", 1)),
            max_size=options.get("max_size"),
            max_tokens=int(options.get("max_tokens", DEFAULT_MAX_TOKENS)),
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, LangsegError):
            raise
        raise BadConfigError(f"bad model_kwargs.vocab {options!r}: {err}") from None


def _text_config(name: str, base: dict[str, Any], override: Any) -> dict[str, Any]:
    text = dict(base.get("text", PAPER_TEXT if name not in VLT_CONFIGS else VLT_CONFIGS[name]["text"]))
    if override is None:
        return text
    if not isinstance(override, dict):
        raise BadConfigError(
            "model_kwargs.text must be a mapping", hint="e.g. {word_dim: 64, hidden_dim: 64}"
        )
    if override.get("kind", text.get("kind", "gru")) != text.get("kind", "gru"):
        return dict(override)  # another encoder kind: the variant's GRU settings do not apply
    return {**text, **override}


def _tokenizer(text: dict[str, Any], texts: list[str], vocab_options: Any, hflip: bool) -> Tokenizer:
    if text.get("kind", "gru") == "clip":
        context = (text.get("text_cfg") or {}).get("context_length")
        return ClipTokenizer(text.get("model_name") or "ViT-B-32", context)
    return _vocab(texts, vocab_options, hflip)


def build_vlt_module(
    config: TrainConfig, texts: list[str] | None, tokenizer: Tokenizer | None = None
) -> VLTTrainModule:
    """The train module for ``config``: the VLT variant ``config.model`` with ``model_kwargs``.

    Args:
        config: the run's config.
        texts: training expressions to build the vocabulary from (unused when ``tokenizer`` is given).
        tokenizer: a ready tokeniser (e.g. from a checkpoint); its vocabulary size sizes the embedding.

    Raises:
        BadConfigError: not a VLT model, an unknown or badly typed ``model_kwargs`` key (named).
    """
    name = config.model or "vlt-tiny"
    try:
        entry = get_model_entry(name)
    except LangsegError as err:
        raise BadConfigError(f"config key 'model': {err}", hint=err.hint) from None
    if entry.family != "vlt":
        raise BadConfigError(
            f"config key 'model': task vlt-referring trains VLT models, not {name!r}",
            hint="Use a VLT variant, e.g. model: vlt-tiny (langseg models lists them).",
        )
    kwargs = dict(config.model_kwargs)
    unknown = [k for k in kwargs if k not in _VLT_KEYS and k not in TASK_KEYS]
    if unknown:
        raise BadConfigError(
            f"unknown config key 'model_kwargs.{unknown[0]}' for task vlt-referring",
            hint=f"Valid: the VLT arguments {', '.join(_VLT_KEYS)}, and {', '.join(TASK_KEYS)}.",
        )
    _check_types(kwargs)
    check_model_kwargs(kwargs)
    vocab_options = kwargs.pop("vocab", {})
    loss_reduction = kwargs.pop("loss_reduction", "image")
    loss_resolution = kwargs.pop("loss_resolution", "output")
    threshold = kwargs.pop("threshold", THRESHOLD)
    if loss_reduction not in ("image", "mean"):
        raise BadConfigError(
            f"config key 'model_kwargs.loss_reduction': {loss_reduction!r}", hint="Use image or mean."
        )
    if loss_resolution not in ("output", "input"):
        raise BadConfigError(
            f"config key 'model_kwargs.loss_resolution': {loss_resolution!r}", hint="Use output or input."
        )
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise BadConfigError(f"config key 'model_kwargs.threshold' must be in (0, 1), got {threshold!r}")
    base = {**VLT_CONFIGS.get(name, {}), **entry.kwargs}
    text = _text_config(name, base, kwargs.pop("text", None))
    if tokenizer is None:
        tokenizer = _tokenizer(text, texts or [], vocab_options, config.data.hflip)
    if isinstance(tokenizer, Vocab):
        # The embedding table is sized by the vocabulary, unless the user pinned a (larger) size.
        pinned = (config.model_kwargs.get("text") or {}).get("vocab_size")
        if pinned is not None and (not isinstance(pinned, int) or pinned < len(tokenizer)):
            raise BadConfigError(
                f"config key 'model_kwargs.text.vocab_size' is {pinned!r}, but the vocabulary has "
                f"{len(tokenizer)} ids",
                hint="Leave vocab_size out (it is set from the vocabulary) or cap vocab.max_size.",
            )
        text["vocab_size"] = pinned or len(tokenizer)
    try:
        net = entry.builder(**{**entry.kwargs, **kwargs, "text": text})
    except network_errors as err:  # a value of the wrong type or size reaching the network
        raise network_error(err, name) from None
    data = config.data
    return VLTTrainModule(
        net,
        tokenizer,
        name,
        data.mean,
        data.std,
        config.optim.head_lr_mult,
        loss_reduction,
        float(threshold),
        loss_resolution,
    )


def _check_augmentation(data: DataConfig, dataset: Dataset) -> None:
    if data.scale_range[1] > 1.0:
        raise BadConfigError(
            f"config key 'data.scale_range' {list(data.scale_range)} scales referring images up; the crop "
            "back could cut the referred object out",
            hint="Use data.scale_range: [1, 1] (or a range up to 1, e.g. [0.75, 1]).",
        )
    if data.crop_size is not None and len(dataset) > 0:  # type: ignore[arg-type]
        h, w = dataset[0]["image"].shape[-2:]
        if data.crop_size < max(h, w):
            raise BadConfigError(
                f"config key 'data.crop_size' {data.crop_size} is smaller than the {h} x {w} images; a "
                "crop could cut the referred object out",
                hint="Leave data.crop_size null, or at least the image size (smaller images are padded).",
            )


def build_vlt_referring(config: TrainConfig) -> TaskParts:
    """``vlt-referring``: a registered VLT variant (``config.model``, default ``vlt-tiny``) on a
    referring dataset (``shapeworld-referring``, ``shapeworld-folder`` with ``task: referring``, ...)."""
    train = build_dataset(config.data.name, config.data.kwargs)
    texts = dataset_texts(train)
    if len(train) and not texts:  # type: ignore[arg-type]
        raise BadConfigError(
            f"config key 'data.name': dataset {config.data.name!r} has no referring expressions",
            hint="Use shapeworld-referring (or a folder dataset with task: referring).",
        )
    _check_augmentation(config.data, train)
    val = build_dataset(config.val_data.name, config.val_data.kwargs) if config.val_data is not None else None
    module = build_vlt_module(config, texts)
    return TaskParts(module, train, val, ReferringEvaluator())


register_task("vlt-referring", build_vlt_referring)


# --- saving for the predictor -------------------------------------------------------------------------


def save_trained_vlt(module: VLTTrainModule, out_dir: str | Path, name: str | None = None) -> Path:
    """Write the trained network and its vocabulary so that ``langseg.load(out_dir)`` is a Referrer.

    Args:
        module: the train module (e.g. ``fit(config).module``).
        out_dir: checkpoint folder (``model.safetensors`` + ``config.json``).
        name: registry name to record (default: the one the network was built from); the loader
            rebuilds the network from it plus the saved arguments.
    """
    from langseg.zoo.vlt import save_vlt

    preprocess = {"mean": list(module.mean), "std": list(module.std)}
    return save_vlt(module.net, module.tokenizer, out_dir, name or module.model_name, preprocess)


def export_vlt(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A ``vlt-referring`` training checkpoint -> a folder that :func:`langseg.load` reads as a Referrer.

    Args:
        checkpoint: a ``step_*.pt`` file, or a run's ``out_dir`` (its newest checkpoint is used).
        out_dir: the folder to write (``model.safetensors`` + ``config.json``).

    The network is rebuilt from the checkpoint's config and vocabulary, without building the dataset.

    Raises:
        BadConfigError / BadDataError: no checkpoint there, or not a readable ``vlt-referring`` one.
    """
    from langseg.train.checkpoint import load_checkpoint, resolve_resume

    path = resolve_resume(checkpoint, Path(checkpoint))
    if path is None:  # only for "auto", which is not a path here
        raise BadConfigError(f"no checkpoint at {checkpoint}", hint="Pass a step_*.pt file or a run folder.")
    state = load_checkpoint(path)
    if state.get("task") != "vlt-referring" or "_extra_state" not in state.get("model", {}):
        raise BadDataError(
            f"{path} is not a vlt-referring training checkpoint",
            hint="Pass a step_*.pt file (or the out_dir) of a vlt-referring run.",
        )
    config = config_from_dict(state["config"])
    tokenizer = tokenizer_from_config(state["model"]["_extra_state"]["tokenizer"])
    module = build_vlt_module(config, None, tokenizer)
    module.load_state_dict(state["model"])
    return save_trained_vlt(module, out_dir)
