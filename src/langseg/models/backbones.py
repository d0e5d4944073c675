"""Image towers that feed dense decoders.

:class:`TimmResNetTower` wraps a timm ResNet and returns the outputs of its four stages (strides 4, 8,
16 and 32): the maps the zero-shot LSeg's DPT decoder reads directly, with no reassembly.

:class:`TimmViTTower` wraps a timm Vision Transformer and returns the token sequences of four chosen
blocks (DPT's "hooks"), with absolute position embeddings resized to any input size that is a multiple
of the patch size. The timm module holds the weights; we only drive its pieces in the order DPT needs,
because timm's own ``forward_intermediates`` resamples position embeddings bicubically, while LSeg/DPT
were trained with bilinear resampling.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from langseg.errors import BadConfigError, BadImageError

# Blocks whose outputs DPT reads, per timm model (0-based; official LSeg/DPT values).
VIT_HOOKS: dict[str, tuple[int, int, int, int]] = {
    "vit_large_patch16_384": (5, 11, 17, 23),
    "vit_base_patch16_384": (2, 5, 8, 11),
    "vit_base_patch32_384": (2, 5, 8, 11),
}


def resize_pos_embed(pos_embed: torch.Tensor, num_prefix: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample the patch part of ViT position embeddings to a new token grid.

    Args:
        pos_embed: ``1 x (P + g*g) x C`` embeddings of a square ``g x g`` grid after ``P`` prefix tokens.
        num_prefix: ``P``, the number of prefix (class) tokens, kept as they are.
        grid_hw: target grid ``(h, w)``.

    Returns:
        ``1 x (P + h*w) x C``. Bilinear with ``align_corners=False`` as in DPT; a same-size resize is the
        identity, so it is skipped.
    """
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    side = round(grid.shape[1] ** 0.5)
    if side * side != grid.shape[1]:
        raise ValueError(f"position embeddings hold {grid.shape[1]} patches, not a square grid")
    if (side, side) == tuple(grid_hw):
        return pos_embed
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=grid_hw, mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], -1)
    return torch.cat([prefix, grid], dim=1)


def conv_patch_stem(patch: int, embed_dim: int) -> nn.Sequential:
    """``B x 3 x H x W -> B x embed_dim x H/patch x W/patch`` with log2(patch) stride-2 3x3 conv-BN-ReLU
    stages (channels doubling up to ``embed_dim / 2``) and a final 1x1 projection."""
    stages = patch.bit_length() - 1
    if patch < 2 or 1 << stages != patch:
        raise BadConfigError(f"a convolutional stem needs a power-of-two patch size, got {patch}")
    layers: list[nn.Module] = []
    channels_in = 3
    for stage in range(stages):
        channels = max(8, embed_dim // (2 ** (stages - stage)))
        layers += [
            nn.Conv2d(channels_in, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
        channels_in = channels
    layers.append(nn.Conv2d(channels_in, embed_dim, 1))
    return nn.Sequential(*layers)


class TimmViTTower(nn.Module):
    """A timm ViT returning the token sequences after four chosen blocks.

    Args:
        model_name: a timm ViT name (``vit_large_patch16_384``, ``vit_base_patch32_384``,
            ``vit_base_patch16_384``, ...), or ``None`` to build ``VisionTransformer(**vit_kwargs)``
            directly (tiny test towers).
        hooks: four 0-based block indices; defaults to :data:`VIT_HOOKS` for known names.
        vit_kwargs: extra keyword arguments for timm (or the full config when ``model_name`` is None).
        pretrained: passed to ``timm.create_model`` (needs the network; the converters load weights
            themselves, so this stays ``False`` here).
        conv_stem: replace the linear patch embedding by a stack of stride-2 3x3 convolutions (Xiao et
            al., 2021, "Early convolutions help transformers see better"): the same token grid, but a
            ViT trained from scratch on small data converges several times faster. Off for every
            published variant (their patch embeddings are linear).

    Blocks after the last hook, the final norm and the classifier are removed: the decoder never reads
    them, and unused parameters would break DistributedDataParallel.
    """

    def __init__(
        self,
        model_name: str | None = "vit_large_patch16_384",
        hooks: tuple[int, ...] | list[int] | None = None,
        vit_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        conv_stem: bool = False,
    ) -> None:
        super().__init__()
        kwargs = dict(vit_kwargs or {})
        if model_name is None:
            vit = VisionTransformer(**{"num_classes": 0, **kwargs})
        else:
            vit = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
        if not isinstance(vit, VisionTransformer):
            raise BadConfigError(f"{model_name!r} is not a timm VisionTransformer")
        if vit.cls_token is None or vit.no_embed_class or vit.reg_token is not None:
            raise BadConfigError(
                "the ViT must have exactly one class token with a position embedding (DPT readout)",
                hint="Use a classic ViT such as vit_base_patch16_384.",
            )
        if hooks is None:
            if model_name not in VIT_HOOKS:
                raise BadConfigError(f"no default hooks for {model_name!r}", hint="Pass hooks=(i, j, k, l).")
            hooks = VIT_HOOKS[model_name]
        hooks = tuple(int(h) for h in hooks)
        if len(hooks) != 4 or list(hooks) != sorted(set(hooks)) or hooks[-1] >= len(vit.blocks):
            raise BadConfigError(f"hooks must be 4 increasing block indices < {len(vit.blocks)}, got {hooks}")
        vit.blocks = vit.blocks[: hooks[-1] + 1]
        vit.norm = nn.Identity()
        self.vit = vit
        self.hooks = hooks
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.patch_size: tuple[int, int] = tuple(vit.patch_embed.patch_size)  # type: ignore[assignment]
        if conv_stem:
            vit.patch_embed.proj = conv_patch_stem(self.patch_size[0], self.embed_dim)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` for an image of ``height x width``; both must divide by the patch."""
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise BadImageError(
                f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}",
                hint="Resize or pad the image to a multiple of the patch size (the predictors do this).",
            )
        return height // ph, width // pw

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Run the tower.

        Args:
            images: ``B x 3 x H x W``, H and W multiples of the patch size.

        Returns:
            ``(tokens, (h, w))``: four ``B x (1 + h*w) x C`` token sequences (class token first) taken
            after the hooked blocks, and the token grid size.
        """
        grid = self.grid_size(images.shape[-2], images.shape[-1])
        vit = self.vit
        x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)  # B x h*w x C
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + resize_pos_embed(vit.pos_embed, self.num_prefix_tokens, grid)
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        outputs = []
        for index, block in enumerate(vit.blocks):
            x = block(x)
            if index in self.hooks:
                outputs.append(x)
        return outputs, grid


class TimmResNetTower(nn.Module):
    """A timm ResNet returning the maps after its four stages (``layer1`` ... ``layer4``).

    Args:
        model_name: a timm ResNet name (the zero-shot LSeg uses ``"resnet101"``: torchvision's layout,
            stride in the 3x3 convolution, 1x1 convolution + BatchNorm shortcuts).
        pretrained: passed to ``timm.create_model`` (needs the network; converters load weights
            themselves, so this stays ``False`` here).
        model_kwargs: extra timm keyword arguments.

    The pooling and classifier are removed (never read, and unused parameters would break
    DistributedDataParallel). :attr:`patch_size` is ``(32, 32)``: images must divide by the deepest
    stride so that every level of the decoder lines up (the predictors pad to it), just as a ViT's
    images divide by its patch.
    """

    def __init__(
        self,
        model_name: str = "resnet101",
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        resnet = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **(model_kwargs or {}))
        if not isinstance(resnet, ResNet):
            raise BadConfigError(f"{model_name!r} is not a timm ResNet", hint="Use e.g. resnet101.")
        resnet.global_pool, resnet.fc = nn.Identity(), nn.Identity()
        self.resnet = resnet
        # Output channels of layer1..layer4 (256, 512, 1024, 2048 for bottleneck ResNets).
        self.widths: tuple[int, ...] = tuple(int(info["num_chs"]) for info in resnet.feature_info[-4:])
        self.patch_size: tuple[int, int] = (32, 32)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``B x 3 x H x W`` (H, W multiples of 32) -> maps ``B x widths[i] x H/s x W/s``, s = 4 ... 32."""
        height, width = images.shape[-2:]
        if height % 32 or width % 32:
            raise BadImageError(
                f"image size {height}x{width} is not a multiple of 32 (the ResNet's deepest stride)",
                hint="Resize or pad the image to a multiple of 32 (the predictors do this).",
            )
        net = self.resnet
        x = net.maxpool(net.act1(net.bn1(net.conv1(images))))
        maps = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = stage(x)
            maps.append(x)
        return maps
