"""LSeg in the zoo: registry entries, typed predictor options, test-time plans, and the Segmenter wiring.

What the official code feeds CLIP is the raw label text (``lseg_net.py``: ``clip.tokenize(labelset)``),
with ViT-B/32's tokenizer, and images normalised with mean = std = 0.5 (``lseg_module.py``); each entry
records that preprocessing and its default plan. A langseg LSeg checkpoint is the one layout of
:mod:`langseg.hub` (``model.safetensors`` with :class:`~langseg.models.lseg.LSeg`'s keys ``net.*`` and
``text_encoder.*``, plus ``config.json``), written by ``langseg convert lseg-official`` and by
``langseg export``; folders converted by langseg 0.1 (two safetensors files) still load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from langseg.errors import BadConfigError, BadDataError, MissingWeightsError
from langseg.hub import (
    CONFIG_NAME,
    as_path,
    checkpoint_files,
    config_dict,
    config_normalisation,
    file_in_folder,
    is_dir,
    is_file,
    read_checkpoint,
    read_config,
    read_safetensors,
    reading_config,
    resolve_weights,
    state_mismatch,
)
from langseg.models.lseg import (
    LSEG_CONFIGS,
    LSeg,
    LSegNet,
    lseg_shapes,
    lseg_tiny,
    lseg_vitb32_384,
    lseg_vitl16_384,
)
from langseg.models.lseg_zeroshot import lseg_rn50x16_vitl16_384, lseg_zs_rn101, lseg_zs_vitl16
from langseg.models.text import ClipTextEncoder
from langseg.predict.images import HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD
from langseg.predict.segmenter import Preprocess, Segmenter
from langseg.predict.tta import PAPER_SCALES, InferencePlan
from langseg.registry import Family, ModelEntry, WeightsSpec, register_family, register_model
from langseg.zoo.options import as_float_dtype, check_int, check_type, refit

LSEG_TOKENIZER = "ViT-B-32"
PLAN_NAMES = ("single", "paper", "native")


def lseg_plan(name: str) -> InferencePlan:
    """A named test-time plan.

    - ``"single"``: the long side resized to 480 (the training crop), one pass, no flip.
    - ``"native"``: the image as it is (padded to the patch size), one pass: for models trained at
      another resolution, such as the ShapeWorld recipe; exported models record it.
    - ``"paper"``: the official evaluation (additional_utils/models.py, test_lseg.py): the long side
      resized to ``s * 520`` for ``s`` in 0.5 ... 1.75, 480 windows every ``int(480 * 2/3) = 320`` pixels,
      plus the horizontal flip.
    """
    if name == "single":
        return InferencePlan(base_size=480)
    if name == "native":
        return InferencePlan()
    if name == "paper":
        return InferencePlan(crop=480, stride=320, scales=PAPER_SCALES, base_size=520, flip=True)
    raise BadConfigError(f"unknown LSeg plan {name!r}", hint=f"Use one of {PLAN_NAMES} or an InferencePlan.")


@dataclass(frozen=True)
class LSegOptions:
    """What ``langseg.load("lseg-...", **options)`` takes.

    Attributes:
        plan: ``"single"``, ``"paper"``, ``"native"`` (see :func:`lseg_plan`) or an ``InferencePlan``;
            ``None``: the plan the checkpoint records, else the entry's.
        dtype: weight dtype of the image network (``"float32"``, ``"bfloat16"``, ``"float16"`` or a
            ``torch.dtype``): the ViT, the DPT decoder and the head run in it; the normalisation, the
            dot product and the logit scale stay float32; logits come back float32. The text tower
            stays float32: it runs once per label set.
        max_labels, text_cache_size, feature_cache_bytes: Segmenter limits and caches.
        preprocess: replaces the entry's resizing/normalisation.
        arch_option, block_depth, activation: official spatial-regularisation options (official ``.ckpt``
            files only; see :func:`langseg.convert.official_to_langseg`).
        compile: run the image network through ``torch.compile`` (inductor, weights frozen into the
            graph). Measured on a 2-core Xeon, ViT-B/32 at 384 px, float32: 1.25x the eager image
            network, but the first call compiles for about 100 s, and so does the first call at every
            new input size (after 8 sizes torch falls back to eager); needs a C++ compiler. For
            servers and long batches at a fixed plan size, not for one image.
    """

    plan: str | InferencePlan | None = None
    dtype: str | torch.dtype = "float32"
    max_labels: int = 1024
    text_cache_size: int = 16
    feature_cache_bytes: int = 1 << 30
    preprocess: Preprocess | None = None
    arch_option: int | None = None
    block_depth: int | None = None
    activation: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.plan, str):
            lseg_plan(self.plan)  # raises on unknown names
        elif self.plan is not None and not isinstance(self.plan, InferencePlan):
            raise BadConfigError(
                f"plan must be a name or an InferencePlan, got {type(self.plan).__name__} {self.plan!r:.80}",
                hint=f"Use one of {', '.join(PLAN_NAMES)} or a langseg.predict.InferencePlan.",
            )
        object.__setattr__(self, "dtype", as_float_dtype(self.dtype))
        check_int(self.max_labels, "max_labels", 1)
        check_int(self.text_cache_size, "text_cache_size", 1)
        check_int(self.feature_cache_bytes, "feature_cache_bytes", 0)
        check_type(self.preprocess, "preprocess", Preprocess, "a langseg.predict.Preprocess")
        check_int(self.arch_option, "arch_option", 0, optional=True)
        check_int(self.block_depth, "block_depth", 0, optional=True)
        check_type(self.activation, "activation", str, "an activation name such as 'lrelu'")
        if not isinstance(self.compile, bool):
            raise BadConfigError(f"compile must be True or False, got {self.compile!r:.80}")


class LSegBundle(NamedTuple):
    """A loaded LSeg: the network, the text encoder whose space it was trained in, and its config."""

    net: LSegNet
    text_encoder: ClipTextEncoder
    config: dict[str, Any]


def load_lseg(
    path: str | Path,
    variant: str | None = None,
    *,
    arch_option: int | None = None,
    block_depth: int | None = None,
    activation: str | None = None,
) -> LSegBundle:
    """Load an LSeg from a langseg folder (or its ``model.safetensors``) or an official ``.ckpt``.

    ``variant``, ``arch_option``, ``block_depth`` and ``activation`` only apply to official checkpoints
    (see :func:`langseg.convert.official_to_langseg`). Modules stay in training mode. The networks are
    first built on the meta device from the config (no memory, whatever sizes it claims) and compared
    with the weights, so a mismatch names the first key that differs.

    Raises:
        BadDataError: the config or weights are malformed, hold NaN/inf, or do not fit each other.
    """
    from langseg.convert.lseg_official import official_to_langseg, read_official_checkpoint

    path = as_path(path, "the LSeg checkpoint path")
    folder = path.parent if is_file(path) and path.suffix == ".safetensors" else path
    if is_dir(folder):
        config, net_state, text_state = _read_folder(folder)
        config_file = folder / CONFIG_NAME
    else:
        state, hyper = read_official_checkpoint(path)
        converted = official_to_langseg(
            state, hyper, variant, arch_option=arch_option, block_depth=block_depth, activation=activation
        )
        del state  # the official dict can be >1 GB; keep only the converted copy
        config, net_state, text_state = converted
        config_file = path
    net_kwargs = config_dict(config, "kwargs", config_file)
    text_kwargs = config_dict(config_dict(config, "text_encoder", config_file), "kwargs", config_file)
    with reading_config(config_file, "building the LSeg network from its kwargs"), torch.device("meta"):
        shapes = (LSegNet(**net_kwargs), ClipTextEncoder(**text_kwargs))
    for module, tensors, prefix in zip(
        shapes, (net_state, text_state), ("net.", "text_encoder."), strict=True
    ):
        problem = state_mismatch(module.state_dict(), tensors)
        if problem is not None:
            raise BadDataError(
                f"the weights in {path} do not fit the LSeg its config describes: {problem} "
                f"(under {prefix!r})",
                hint="Re-convert or re-export the model; the config and weights come from different models.",
            )
    with reading_config(config_file, "building the LSeg network from its kwargs"):
        net, text_encoder = LSegNet(**net_kwargs), ClipTextEncoder(**text_kwargs)
    net.load_state_dict(net_state, strict=True)  # fits: checked on the meta networks above
    text_encoder.load_state_dict(text_state, strict=True)
    return LSegBundle(net, text_encoder, config)


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, net state, text state) of a langseg LSeg folder, in the one layout or langseg 0.1's."""
    config_file = folder / CONFIG_NAME
    if not is_file(config_file):
        raise MissingWeightsError(f"{folder} has no {CONFIG_NAME}", hint="Convert the checkpoint first.")
    config = read_config(config_file)
    if config.get("family") != "lseg":
        raise BadDataError(
            f"{config_file} describes a {config.get('family')!r:.40} model, not LSeg",
            hint=f"Load the folder by itself (langseg.load({str(folder)!r})): its config names the model.",
        )
    legacy = config_dict(config, "text_encoder", config_file).get("weights")
    if legacy:  # langseg 0.1: the network and the text tower in two files, named by the config
        named = ((config.get("weights"), "'weights'"), (legacy, "'text_encoder.weights'"))
        files = [file_in_folder(folder, name, what) for name, what in named]
        for file in files:
            if not is_file(file):
                raise MissingWeightsError(
                    f"weights file {file} missing", hint="Convert the checkpoint again."
                )
        return config, read_safetensors(files[0]), read_safetensors(files[1])
    state, config = read_checkpoint(folder)
    parts: dict[str, dict[str, torch.Tensor]] = {"net": {}, "text_encoder": {}}
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts:
            raise BadDataError(
                f"unexpected tensor {key!r} in {folder} (LSeg keys start net. or text_encoder.)"
            )
        parts[prefix][rest] = tensor
    return config, parts["net"], parts["text_encoder"]


def lseg_segmenter(
    model: LSeg,
    device: str | torch.device = "cpu",
    options: LSegOptions | None = None,
    *,
    default_plan: str | InferencePlan = "single",
    mean: tuple[float, float, float] = HALF_MEAN,
    std: tuple[float, float, float] = HALF_STD,
) -> Segmenter:
    """Wrap an :class:`~langseg.models.lseg.LSeg` in a :class:`~langseg.predict.Segmenter`.

    The image network takes ``options.dtype`` (ViT, DPT and head; the scoring stays float32, see
    :meth:`~langseg.models.lseg.LSegNet.set_precision`); the text tower stays float32 (in bf16 on CPU it
    was slower: its batched matmuls copy their operands). ``default_plan`` applies when the options name
    none.
    """
    import open_clip

    options = options or LSegOptions()
    plan = options.plan if options.plan is not None else default_plan
    plan = lseg_plan(plan) if isinstance(plan, str) else plan
    # bf16/fp16 for the ViT, DPT and head; the normalisation, dot product and logit scale stay float32
    # (LSegNet.set_precision says why). float32 is a plain .to(torch.float32).
    model.net.set_precision(options.dtype).use_channels_last()
    if options.compile:
        # Freezing folds the (never trained here) weights into the graph as constants, which lets
        # inductor pre-pack them for oneDNN; one graph per input size (dynamic=False: fixed-size kernels).
        compiled = torch.compile(model.net.encode_image, dynamic=False, options={"freezing": True})
        model.net.encode_image = compiled  # type: ignore[method-assign]
    model.text_encoder.to(dtype=torch.float32)
    # The tokenizer pads to the text tower's own context (77 for CLIP; small towers trained on
    # ShapeWorld use fewer positions).
    tokenizer = open_clip.get_tokenizer(LSEG_TOKENIZER, context_length=model.text_encoder.context_length)
    # Pad to the patch size (odd token grids are fine). When the plan resizes to a base size, shrink big
    # photos with PIL's antialiasing to the plan's largest side first, before its own bilinear resizing.
    largest = 2048 if plan.base_size is None else max(1, round(max(plan.scales) * plan.base_size))
    patch = model.net.encoder.patch_size[0]
    preprocess = options.preprocess or Preprocess(max_side=largest, pad_multiple=patch, mean=mean, std=std)
    return Segmenter(
        model,
        tokenizer,
        plan=plan,
        preprocess=preprocess,
        device=device,
        max_labels=options.max_labels,
        text_cache_size=options.text_cache_size,
        feature_cache_bytes=options.feature_cache_bytes,
    )


def _source(entry: ModelEntry, weights: Path | None) -> Path:
    return resolve_weights(entry.weights, entry.name, weights)


def load_predictor(
    entry: ModelEntry, weights: Path | None, device: str | torch.device, options: LSegOptions
) -> Segmenter:
    """The family's ``load_predictor``: a ready Segmenter from a converted folder or an official ``.ckpt``."""
    source = _source(entry, weights)
    net, text_encoder, config = load_lseg(
        source,
        variant=entry.name,
        arch_option=options.arch_option,
        block_depth=options.block_depth,
        activation=options.activation,
    )
    if config.get("variant", config.get("model")) != entry.name:
        raise BadConfigError(
            f"{source} holds {config.get('variant', config.get('model'))!r:.80}, not {entry.name!r}",
            hint=f"Load it as langseg.load({str(source)!r}) (its config.json names the model).",
        )
    config_file = (
        source if is_file(source) and source.suffix != ".safetensors" else checkpoint_files(source)[0]
    )
    # A model trained by langseg records the plan and normalisation it suits: a name, or the fields of
    # an InferencePlan (e.g. {"base_size": 128}: every image resized to the training resolution).
    plan = config_dict(config, "predict", config_file).get("plan") or entry.plan or "single"
    with reading_config(config_file, "the recorded test-time plan 'predict.plan'"):
        if isinstance(plan, dict):
            plan = InferencePlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan.items()})
        elif isinstance(plan, str):
            lseg_plan(plan)
        else:
            raise BadDataError(f"a plan is a name or an object, got {plan!r:.80}")
    pre = {**entry.preprocess, **config_dict(config, "preprocess", config_file)}
    mean, std = config_normalisation(pre, config_file, HALF_MEAN, HALF_STD)
    return lseg_segmenter(LSeg(net, text_encoder), device, options, default_plan=plan, mean=mean, std=std)


def load_network(entry: ModelEntry, weights: Path | None, **kwargs: Any) -> LSegNet:
    """The family's ``load_network``: the bare :class:`LSegNet` with the weights of a checkpoint."""
    net, _, config = load_lseg(_source(entry, weights), variant=entry.name)
    if not kwargs:
        return net
    return refit(entry.name, net, LSegNet(**{**config["kwargs"], **kwargs}), kwargs)


# Weights that ship inside the package (langseg/weights/lseg-shapes/), checked by digest when loaded.
LSEG_SHAPES_SHA256 = "53af7ce33b35641d704cea2d5928b4c77b513831c83e5411886e697b62d4c23d"
_CONVERT_HINT = (
    "Convert the official checkpoint once (`langseg convert lseg-official demo_e200.ckpt lseg-vitl16/`, see "
    "docs/lseg.md), then langseg.load('lseg-vitl16/'); or pass weights='path/to/official.ckpt'."
)
# Every LSeg normalises images with mean = std = 0.5, except the zero-shot ResNet-101, whose official
# evaluation (test_lseg_zs.py: FSSDataset.initialize(..., imagenet_norm=True)) uses ImageNet statistics.
_HALF_PREPROCESS = {"mean": HALF_MEAN, "std": HALF_STD}
_ZERO_SHOT_RN101_PREPROCESS = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
FAMILY = register_family(Family("lseg", LSegOptions, load_predictor, load_network))
for _name, _builder, _description, _weights in (
    (
        "lseg-vitl16-384",
        lseg_vitl16_384,
        "LSeg, ViT-L/16 DPT image encoder, CLIP ViT-B/32 labels (paper)",
        WeightsSpec.convert(_CONVERT_HINT),
    ),
    (
        "lseg-vitb32-384",
        lseg_vitb32_384,
        "LSeg, ViT-B/32 DPT image encoder, CLIP ViT-B/32 labels",
        WeightsSpec.convert(_CONVERT_HINT.replace("lseg-vitl16", "lseg-vitb32")),
    ),
    (
        "lseg-rn50x16-vitl16-384",
        lseg_rn50x16_vitl16_384,
        "LSeg, ViT-L/16 DPT image encoder, CLIP RN50x16 labels (768-d)",
        WeightsSpec.convert(
            _CONVERT_HINT.replace("demo_e200", "your_rn50x16").replace("vitl16/", "rn50x16/")
        ),
    ),
    (
        "lseg-zs-rn101",
        lseg_zs_rn101,
        "Zero-shot LSeg (few-shot benchmarks), ResNet-101 DPT, CLIP ViT-B/32 labels; segment with "
        "labels=['others', class]",
        WeightsSpec.convert(_CONVERT_HINT.replace("demo_e200", "fss_rn101").replace("vitl16/", "zs-rn101/")),
    ),
    (
        "lseg-zs-vitl16",
        lseg_zs_vitl16,
        "Zero-shot LSeg (few-shot benchmarks), ViT-L/16 DPT, CLIP ViT-B/32 labels; segment with "
        "labels=['others', class]",
        WeightsSpec.convert(_CONVERT_HINT.replace("demo_e200", "fss_l16").replace("vitl16/", "zs-vitl16/")),
    ),
    ("lseg-tiny", lseg_tiny, "LSeg architecture at toy size, random weights (tests)", None),
    (
        "lseg-shapes",
        lseg_shapes,
        "LSeg trained on ShapeWorld's 41 colour+shape classes, 128 px (weights ship with langseg)",
        WeightsSpec.bundled(LSEG_SHAPES_SHA256),
    ),
):
    assert _name in LSEG_CONFIGS
    register_model(
        ModelEntry(
            name=_name,
            family="lseg",
            task="semantic",
            builder=_builder,
            description=_description,
            weights=_weights,
            preprocess=_ZERO_SHOT_RN101_PREPROCESS if _name == "lseg-zs-rn101" else _HALF_PREPROCESS,
            plan="single",
        )
    )
