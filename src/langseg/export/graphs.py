"""The graphs an exported model is made of: small ``nn.Module`` wrappers that take and return tensors
only, with the example inputs they are traced with and the axes that stay dynamic.

A Segmenter's network (LSeg, dense CLIP) becomes three graphs, so that the ONNX predictor keeps the
PyTorch predictor's caches (image features across label sets, label embeddings across images):

- ``image``: ``images: B x 3 x H x W`` (normalised; H, W multiples of the patch size) -> ``features``
  (LSeg ``B x D x H/4 x W/4`` pixel features, before LSeg's x2 upsampling and normalisation; dense
  CLIP ``B x D x H/p x W/p`` patches);
- ``text``: ``token_ids: K x L`` int64 (``L`` the tokenizer's context) -> ``text_embeddings: K x D``;
- ``classify``: ``features``, ``text_embeddings: K x D`` -> ``logits: B x K x h x w`` (LSeg: the
  cosine of the x2-upsampled features, the learnt logit scale, spatial regularisation and x2
  upsampling; dense CLIP: the scaled cosine).

A Referrer's network (VLT) is one graph, ``model``: ``images: 1 x 3 x S x S`` (letterboxed and
normalised), ``token_ids: B x T`` int64 and ``token_mask: B x T`` bool -> ``logits: B x 1 x S/s x S/s``.
``S`` is fixed: VLT's query generation and response maps have one weight per cell of its grid. ``T`` is
fixed too (the tokenizer's limit; the runtime pads to it, which changes nothing as padding is masked),
because the GRU is unrolled over the words when it is captured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from langseg.errors import BadConfigError
from langseg.models.backbones import TimmResNetTower
from langseg.models.dense_clip import DenseCLIPModel
from langseg.models.lseg import LSeg
from langseg.models.vlt import VLT


@dataclass
class GraphSpec:
    """One graph to export.

    Attributes:
        name: ``"image"``, ``"text"``, ``"classify"`` or ``"model"`` (the file is ``NAME.onnx``).
        module: the wrapper; its ``forward`` takes the inputs in the order of ``inputs``.
        inputs, outputs: ONNX names of the graph's inputs and outputs.
        example: the inputs the graph is traced with.
        check: other inputs (other dynamic sizes) the exported graph is compared on with PyTorch.
        dynamic: per input, the dynamic axes: ``{axis: (symbol name, multiple of)}``.
    """

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    example: tuple[torch.Tensor, ...]
    check: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, tuple[str, int]]] = field(default_factory=dict)


class ImageGraph(nn.Module):
    """``images: B x 3 x H x W`` -> the network's image features (see module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class TextGraph(nn.Module):
    """``token_ids: K x L`` -> ``K x D`` label embeddings. While a graph is captured the text towers
    run every position (no trimming at the end-of-text token; the same numbers)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(token_ids)


class ClassifyGraph(nn.Module):
    """``features: B x D x h x w`` and ``text_embeddings: K x D`` -> ``B x K x h' x w'`` logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        return self.model.dense_logits(features, text_embeddings)


class ReferGraph(nn.Module):
    """VLT in one graph: ``images: 1 x 3 x S x S``, ``token_ids`` and ``token_mask: B x T`` ->
    ``B x 1 x S/s x S/s`` logits. The one image's features are expanded to the ``B`` expressions here,
    so that the network's batch check sees equal batches (a branch on sizes would be baked in)."""

    def __init__(self, model: VLT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, token_ids: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        batch = token_ids.shape[0]
        features = [f.expand(batch, -1, -1, -1) for f in self.model.encode_image(images)]
        return self.model.decode(features, token_ids, token_mask)


def family_of(model: nn.Module) -> str:
    """``"lseg"``, ``"dense_clip"`` or ``"vlt"`` for a predictor's network; others cannot be exported."""
    if isinstance(model, LSeg):
        return "lseg"
    if isinstance(model, DenseCLIPModel):
        return "dense_clip"
    if isinstance(model, VLT):
        return "vlt"
    raise BadConfigError(
        f"cannot export a {type(model).__name__} to ONNX",
        hint="ONNX export covers LSeg, the dense CLIP modes and VLT (`langseg models` lists them).",
    )


# The token grid a ResNet image tower is checked at by default: 480 x 480 images (15 x 15 at stride 32),
# the input size of the zero-shot LSeg's official evaluation (HSNet's loaders resize to 480 x 480).
RESNET_DEFAULT_GRID = (15, 15)


def patch_and_native_grid(model: nn.Module) -> tuple[int, tuple[int, int]]:
    """(patch size, native grid) of an LSeg or dense CLIP image tower.

    A ViT's native grid is that of its position embeddings (inputs of other sizes resize them, a
    branch the graph must not specialise on). A ResNet tower (the zero-shot ``lseg-zs-rn101``) has no
    position embeddings: its "patch" is its deepest stride (32) and any multiple of it is native, so
    :data:`RESNET_DEFAULT_GRID` stands in.
    """
    if isinstance(model, LSeg):
        encoder = model.net.encoder
        patch = int(encoder.patch_size[0])
        grid = (
            RESNET_DEFAULT_GRID if isinstance(encoder, TimmResNetTower) else encoder.vit.patch_embed.grid_size
        )
    else:
        patch = int(model.patch_size[0])
        grid = model.dense.visual.grid_size
    return patch, (int(grid[0]), int(grid[1]))


def segmenter_graphs(model: nn.Module, token_ids: torch.Tensor, check_side: int | None) -> list[GraphSpec]:
    """The ``image``, ``text`` and ``classify`` graphs of an LSeg or dense CLIP network.

    Args:
        model: the Segmenter's network (float32, eval mode).
        token_ids: ``K x L`` tokenised labels, ``K >= 3`` (the text graph's example and check).
        check_side: image side the image graph is checked at (default: the native grid's size).
    """
    patch, (gh, gw) = patch_and_native_grid(model)
    check_side = check_side or patch * gh
    if check_side % patch:
        raise BadConfigError(
            f"--image-size {check_side} is not a multiple of the patch size {patch}",
            hint=f"Pass a multiple of {patch}, e.g. {patch * gh}.",
        )
    # Traced away from the native grid (and with H != W): a size equal to it takes the branch that skips
    # resizing the position embeddings, and the graph would only accept that size.
    example = torch.randn(
        2, 3, patch * (gh + 1), patch * (gw + 3), generator=torch.Generator().manual_seed(0)
    )
    check = torch.randn(1, 3, check_side, check_side + patch, generator=torch.Generator().manual_seed(1))
    image_axes = {0: ("batch", 1), 2: ("height", patch), 3: ("width", patch)}
    with torch.no_grad():
        # Contiguous, as onnxruntime's inputs are: a permuted (channels-last) example makes torch.export
        # guard on its strides and bound the grid's size.
        features, check_features = (model.encode_image(x).contiguous() for x in (example, check))
        text, check_text = model.encode_text(token_ids[:3]), model.encode_text(token_ids[3:5])
    feature_axes = {0: ("batch", 1), 2: ("grid_height", 1), 3: ("grid_width", 1)}
    return [
        GraphSpec(
            "image",
            ImageGraph(model),
            ("images",),
            ("features",),
            (example,),
            (check,),
            {"images": image_axes},
        ),
        GraphSpec(
            "text",
            TextGraph(model),
            ("token_ids",),
            ("text_embeddings",),
            (token_ids[:3],),
            (token_ids[3:5],),
            {"token_ids": {0: ("prompts", 1)}},
        ),
        GraphSpec(
            "classify",
            ClassifyGraph(model),
            ("features", "text_embeddings"),
            ("logits",),
            (features, text),
            (check_features, check_text),
            {"features": feature_axes, "text_embeddings": {0: ("labels", 1)}},
        ),
    ]


def referrer_graph(model: VLT, token_ids: torch.Tensor, token_mask: torch.Tensor) -> GraphSpec:
    """The one ``model`` graph of a VLT; ``token_ids`` / ``token_mask``: ``5 x T`` expressions padded to
    the tokenizer's limit (two trace the graph, three check it)."""
    side = int(model.input_size)
    example = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    check = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    return GraphSpec(
        "model",
        ReferGraph(model),
        ("images", "token_ids", "token_mask"),
        ("logits",),
        (example, token_ids[:2], token_mask[:2]),
        (check, token_ids[2:5], token_mask[2:5]),
        {"token_ids": {0: ("expressions", 1)}, "token_mask": {0: ("expressions", 1)}},
    )
