"""Official LSeg checkpoints (isl-org/lang-seg, PyTorch Lightning ``.ckpt``) -> langseg.

The official Lightning module keeps the network in ``self.net``, so its ``state_dict`` holds:

- ``net.pretrained.model.*``: the timm ViT (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.N.*``, plus ``norm``/``head`` that the forward never reads);
- ``net.pretrained.act_postprocessN.{0.project.0, 3, 4}.*``: DPT reassembly (readout projection,
  1x1 conv, resample) for N = 1..4;
- ``net.scratch.layerN_rn``, ``net.scratch.refinenetN.{resConfUnit1, resConfUnit2, out_conv}``,
  ``net.scratch.head1``, and ``net.scratch.head_block.depthwise.depthwise`` when spatial
  regularisation was trained (``arch_option`` 1 = bottleneck, 2 = depthwise);
- ``net.clip_pretrained.*``: the whole OpenAI CLIP ViT-B/32 (text tower used, image tower unused), or
  CLIP RN50x16 for the ``clipRN50x16_vitl16_384`` backbone (768-d text, a ModifiedResNet image tower).

The zero-shot networks (``lseg_net_zs.py``, trained by ``train_lseg_zs.py`` with ``--nshot 0``) hold the
same keys, except that the ResNet-101 one (``clip_resnet101``) has a torchvision ResNet-101 split into
``net.pretrained.layer1`` (``Sequential(conv1, bn1, relu, maxpool, layer1)``: indices 0, 1 and 4 hold
weights) and ``net.pretrained.layer2..4`` instead of the ViT and its ``act_postprocess`` blocks. A
zero-shot ViT-L/16 checkpoint has the semantic one's keys: only hyper-parameters holding the few-shot
options (``nshot``, ``fold``) tell it apart. The official Lightning modules never call
``save_hyperparameters()`` (PL 1.4.9 then saves none), so the released files probably carry none and
``fss_l16`` needs ``variant="lseg-zs-vitl16"``; without it, it converts as ``lseg-vitl16-384``, the same
network under the semantic name (identical scores).

Its logit scale is ``exp(log(1/0.07))`` held as a plain tensor attribute, so it is *not* in the
checkpoint; we set our learnable ``logit_scale`` to that value. Every official key is either mapped or
matched by an explicit "unused by the official forward" rule; anything else, any key we lack and any
shape mismatch is a :class:`BadDataError` naming the keys.

Checkpoints are read with ``weights_only=True``. Lightning also pickles a few of its own classes into
them (hyper-parameters as an ``AttributeDict``, and before PL 1.5 callback *classes* as the keys of
``"callbacks"``), which safe loading refuses; :data:`LIGHTNING_STAND_INS` maps exactly those names onto
inert stand-ins for the duration of one load, so neither Lightning nor any of its code is needed.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from langseg.convert.lseg_keys import map_key, official_name
from langseg.errors import BadConfigError, BadDataError, MissingWeightsError
from langseg.hub import as_path, check_finite, is_file, save_checkpoint, torch_load_safely
from langseg.models.lseg import LSEG_CONFIGS, OFFICIAL_LOGIT_SCALE, TEXT_ENCODER_CONFIGS, LSegNet
from langseg.models.text import ClipTextEncoder

_BACKBONE_VARIANTS = {
    "clip_vitl16_384": "lseg-vitl16-384",
    "clip_vitb32_384": "lseg-vitb32-384",
    "clipRN50x16_vitl16_384": "lseg-rn50x16-vitl16-384",
    "clip_resnet101": "lseg-zs-rn101",
}
# Official backbone -> zero-shot variant, for checkpoints whose hyper-parameters hold few-shot options.
_ZERO_SHOT_VARIANTS = {"clip_vitl16_384": "lseg-zs-vitl16", "clip_resnet101": "lseg-zs-rn101"}
_ZERO_SHOT_HPARAMS = ("nshot", "fold")
# Variants that are one network under two names (the zero-shot ViT-L/16 is the semantic one).
_SAME_NETWORK = {"lseg-zs-vitl16": "lseg-vitl16-384"}
# (ViT width, patch, embedding width) of patch_embed.proj and head1 -> variant, when hparams are absent.
_PATCH_VARIANTS = {
    (1024, 16, 512): "lseg-vitl16-384",
    (768, 32, 512): "lseg-vitb32-384",
    (1024, 16, 768): "lseg-rn50x16-vitl16-384",
}
_RESNET101_BLOCKS = (3, 4, 23, 3)
_ARCH_OPTIONS = {0: "none", 1: "bottleneck", 2: "depthwise"}


class _PlainDict:
    """Stand-in for Lightning's ``AttributeDict``: unpickles as a plain, empty ``dict`` that the unpickler
    then fills item by item (``SETITEMS`` only fills exact dicts, so a dict subclass would not do)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[misc]
        return {}


class LightningNamespace(argparse.Namespace):
    """Stand-in for a pickled ``argparse.Namespace``: its attributes are restored, nothing else runs."""


def _marker(path: str) -> type:
    """An empty class standing in for the Lightning class ``path`` (callback classes used as dict keys)."""
    return type(path.rsplit(".", 1)[1], (), {"__module__": __name__, "__doc__": f"Stand-in for {path}."})


_ATTRIBUTE_DICTS = (
    "pytorch_lightning.utilities.parsing.AttributeDict",  # PL 1.x, the official checkpoints
    "lightning_fabric.utilities.data.AttributeDict",  # PL 2.x
    "lightning.fabric.utilities.data.AttributeDict",
)
_CALLBACK_KEYS = (  # PL < 1.5 keyed callback states by the callback's class
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
)
# (stand-in, fully qualified name) pairs for torch.serialization.safe_globals (torch >= 2.5).
LIGHTNING_STAND_INS: list[tuple[Any, str]] = [
    *((_PlainDict, name) for name in _ATTRIBUTE_DICTS),
    (LightningNamespace, "argparse.Namespace"),
    *((_marker(name), name) for name in _CALLBACK_KEYS),
]


class ConvertedLSeg(NamedTuple):
    """An official checkpoint in langseg layout (float32 tensors, our key names)."""

    config: dict[str, Any]
    net_state: dict[str, torch.Tensor]
    text_state: dict[str, torch.Tensor]

    def lseg_state(self) -> dict[str, torch.Tensor]:
        """One state dict with :class:`~langseg.models.lseg.LSeg`'s keys (``net.*``, ``text_encoder.*``)."""
        return {
            **{f"net.{k}": v for k, v in self.net_state.items()},
            **{f"text_encoder.{k}": v for k, v in self.text_state.items()},
        }


def read_official_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, hyper_parameters)`` of a Lightning checkpoint, loaded without running pickled code."""
    path = as_path(path, "the official checkpoint path")
    if not is_file(path):
        raise MissingWeightsError(
            f"no checkpoint at {path}", hint="Check the path to the official .ckpt (see docs/lseg.md)."
        )
    ckpt = torch_load_safely(path, LIGHTNING_STAND_INS)
    if not isinstance(ckpt, dict):
        raise BadDataError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    state = ckpt.get("state_dict", ckpt)
    hyper = ckpt.get("hyper_parameters")
    hyper = vars(hyper) if isinstance(hyper, argparse.Namespace) else hyper  # hparams saved as a Namespace
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BadDataError(f"{path} has no tensor state_dict (names -> tensors)")
    return state, dict(hyper) if isinstance(hyper, dict) else {}


def _option_int(name: str, value: Any) -> int:
    """An official integer option (``arch_option``, ``block_depth``) given or read from hyper-parameters."""
    try:
        if isinstance(value, bool) or float(value) != int(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise BadConfigError(f"official {name} must be an integer, got {value!r:.80}") from None


def _resolve_variant(state: dict[str, torch.Tensor], hyper: dict[str, Any], variant: str | None) -> str:
    backbone = hyper.get("backbone")
    zero_shot = any(name in hyper for name in _ZERO_SHOT_HPARAMS)
    if variant is not None:
        if variant not in LSEG_CONFIGS:
            raise BadConfigError(
                f"unknown LSeg variant {variant!r}", hint=f"Use one of {sorted(LSEG_CONFIGS)}."
            )
        trained = _backbone_variant(backbone, zero_shot) if isinstance(backbone, str) else None
        network = _SAME_NETWORK.get(variant, variant)
        # Say so now rather than list 500 shape mismatches; one network under two names is fine.
        if trained is not None and _SAME_NETWORK.get(trained, trained) != network:
            raise BadConfigError(
                f"this checkpoint was trained as {trained} (backbone {backbone}), not {variant}",
                hint=f"Load it as {trained!r} (variant={trained!r}), or leave the variant out to infer it.",
            )
        return variant
    if backbone is not None:
        trained = _backbone_variant(backbone, zero_shot) if isinstance(backbone, str) else None
        if trained is None:
            raise BadConfigError(
                f"official backbone {backbone!r:.80} is not supported",
                hint=f"Supported: {', '.join(_BACKBONE_VARIANTS)}; or pass variant= explicitly.",
            )
        return trained
    return _variant_from_shapes(state)


def _backbone_variant(backbone: str, zero_shot: bool) -> str | None:
    """The variant an official ``backbone`` name was trained as (zero-shot when few-shot options were set)."""
    if zero_shot and backbone in _ZERO_SHOT_VARIANTS:
        return _ZERO_SHOT_VARIANTS[backbone]
    return _BACKBONE_VARIANTS.get(backbone)


def _variant_from_shapes(state: dict[str, torch.Tensor]) -> str:
    """The variant of a checkpoint without hyper-parameters, read from its tensors' shapes."""
    head = state.get("net.scratch.head1.weight")
    out_c = int(head.shape[0]) if head is not None else None
    if "net.pretrained.layer1.0.weight" in state:  # the zero-shot ResNet: count each stage's blocks
        prefixes = [f"net.pretrained.{stage}" for stage in ("layer1.4.", "layer2.", "layer3.", "layer4.")]
        # layer1 sits at index 4 of a Sequential(conv1, bn1, relu, maxpool, layer1); count block indices.
        blocks = tuple(len({k[len(p) :].split(".")[0] for k in state if k.startswith(p)}) for p in prefixes)
        if blocks == _RESNET101_BLOCKS and out_c == 512:
            return "lseg-zs-rn101"
        raise BadConfigError(
            f"this checkpoint holds a ResNet with {list(blocks)} blocks per stage and {out_c}-d embeddings; "
            f"langseg converts the zero-shot ResNet-101 ({list(_RESNET101_BLOCKS)}, 512-d)",
            hint="Pass variant=... if you know which network it is.",
        )
    patch = state.get("net.pretrained.model.patch_embed.proj.weight")
    if patch is not None and (patch.shape[0], patch.shape[-1], out_c) in _PATCH_VARIANTS:
        return _PATCH_VARIANTS[(patch.shape[0], patch.shape[-1], out_c)]
    found = (
        f"a ViT {patch.shape[0]} wide with {patch.shape[-1]}-px patches"
        if patch is not None and patch.ndim == 4
        else "no ViT patch embedding and no ResNet stem"
    )
    raise BadConfigError(
        f"cannot tell which LSeg variant this checkpoint is: it holds {found} and "
        f"{out_c if out_c is not None else 'no'}-d pixel embeddings",
        hint="langseg converts ViT-L/16 (512-d or 768-d RN50x16 text), ViT-B/32 and the zero-shot "
        "ResNet-101; pass variant=... if you know which network it is.",
    )


def official_to_langseg(
    state: dict[str, torch.Tensor],
    hyper: dict[str, Any] | None = None,
    variant: str | None = None,
    *,
    arch_option: int | None = None,
    block_depth: int | None = None,
    activation: str | None = None,
) -> ConvertedLSeg:
    """Map an official LSeg state dict onto langseg's ``LSegNet`` and ``ClipTextEncoder``.

    ``arch_option``, ``block_depth`` and ``activation`` are the official training options for the
    spatial regularisation blocks; by default they come from the checkpoint's hyper-parameters, else
    0 / 0 / ``"lrelu"`` (the released checkpoints use ``arch_option=0``).
    """
    hyper = hyper or {}
    if not any(k.startswith("net.") for k in state):  # a bare LSegNet state dict
        state = {f"net.{k}": v for k, v in state.items()}
    variant = _resolve_variant(state, hyper, variant)
    arch = _option_int("arch_option", arch_option if arch_option is not None else hyper.get("arch_option", 0))
    if variant.startswith("lseg-zs-") and arch_option is None:
        arch = 0  # lseg_net_zs.py stores arch_option but never builds the regularisation blocks
    depth = _option_int(
        "block_depth", block_depth if block_depth is not None else hyper.get("block_depth", 0)
    )
    activation = activation or hyper.get("activation", "lrelu")
    if not isinstance(activation, str):
        raise BadConfigError(f"official activation must be a name, got {activation!r:.80}")
    if arch not in _ARCH_OPTIONS:
        raise BadConfigError(
            f"unknown official arch_option {arch}", hint="Use 0, 1 (bottleneck) or 2 (depthwise)."
        )
    kwargs: dict[str, Any] = {
        **LSEG_CONFIGS[variant],
        "readout": "project",
        "use_bn": True,
        "spatial_reg": _ARCH_OPTIONS[arch],
        # The official head applies its one block max(block_depth, 1) times, the last without activation.
        "spatial_reg_depth": max(depth, 1),
        "spatial_reg_activation": activation,
        "logit_scale": OFFICIAL_LOGIT_SCALE,
    }
    text_kwargs = dict(TEXT_ENCODER_CONFIGS[variant])
    with torch.device("meta"):  # shapes only: no memory, no init time
        targets = {
            "net": {k: v.shape for k, v in LSegNet(**kwargs).state_dict().items()},
            "text": {k: v.shape for k, v in ClipTextEncoder(**text_kwargs).state_dict().items()},
        }
    out: dict[str, dict[str, torch.Tensor]] = {"net": {}, "text": {}}
    unexpected, mismatched, dropped, floating = [], [], [], []
    for key, tensor in state.items():
        kind, new_key = map_key(key.removeprefix("net.")) if key.startswith("net.") else ("unknown", key)
        if kind == "drop":
            dropped.append(key)
        elif kind == "unknown" or new_key not in targets[kind]:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(targets[kind][new_key]):
            mismatched.append(f"{key}: {tuple(tensor.shape)} vs {tuple(targets[kind][new_key])} ({new_key})")
        else:
            out[kind][new_key] = tensor.float() if tensor.is_floating_point() else tensor
            if tensor.is_floating_point():
                floating.append(key)
    out["net"]["logit_scale"] = torch.tensor(math.log(OFFICIAL_LOGIT_SCALE))
    missing = [
        official_name(kind, k) for kind in ("net", "text") for k in targets[kind] if k not in out[kind]
    ]
    _raise_on_problems(variant, arch, missing, unexpected, mismatched)
    # NaN/inf weights would load without a word and give NaN scores: name them (official key names).
    check_finite({key: state[key] for key in floating}, "the official LSeg checkpoint")
    config = {
        "format": "langseg",
        "model": variant,  # the registry name langseg.load() builds the predictor from
        "family": "lseg",
        "variant": variant,
        "kwargs": kwargs,
        "text_encoder": {"kwargs": text_kwargs},
        "source": {"converter": "lseg_official", "dropped_keys": len(dropped)},
    }
    return ConvertedLSeg(config, out["net"], out["text"])


def _raise_on_problems(
    variant: str, arch: int, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> None:
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
            parts.append(f"{title} keys: {shown}")
    hint = f"Check that this is an official LSeg checkpoint of variant {variant!r} (or pass variant=...)."
    if any("head_block" in k for k in missing + unexpected):
        hint += (
            f" Spatial-regularisation keys disagree with arch_option={arch}: pass arch_option=1 or 2 (or 0)."
        )
    raise BadDataError(f"official LSeg checkpoint does not match {variant}: " + "; ".join(parts), hint=hint)


def convert_lseg_official(
    ckpt_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    variant: str | None = None,
    *,
    arch_option: int | None = None,
    block_depth: int | None = None,
    activation: str | None = None,
) -> Path:
    """Convert an official LSeg ``.ckpt`` into ``out_dir`` and return that folder.

    Writes langseg's one checkpoint layout (:func:`langseg.hub.save_checkpoint`): ``model.safetensors``
    holding the network (keys ``net.*``) and the CLIP text tower (``text_encoder.*``), as
    :class:`~langseg.models.lseg.LSeg` names them, and ``config.json`` (variant, builder kwargs, text
    encoder kwargs).
    """
    state, hyper = read_official_checkpoint(ckpt_path)
    converted = official_to_langseg(
        state, hyper, variant, arch_option=arch_option, block_depth=block_depth, activation=activation
    )
    converted.config["source"]["checkpoint"] = Path(ckpt_path).name
    return save_checkpoint(converted.lseg_state(), out_dir, converted.config)
