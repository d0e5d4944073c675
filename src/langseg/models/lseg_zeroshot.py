"""LSeg's zero-shot networks for the few-shot benchmarks (FSS-1000, PASCAL-5i, COCO-20i).

The official zero-shot LSeg (isl-org/lang-seg, ``lseg_net_zs.py``) is the semantic network with no
spatial regularisation, run as a binary segmenter: each episode names one class, and every pixel is
scored against two prompts, ``"others"`` and the class name; the pixel belongs to the class where the
class prompt wins. Two image encoders were released:

- ``lseg-zs-vitl16``: the ViT-L/16 DPT of the semantic network (``fss_l16``);
- ``lseg-zs-rn101``: a ResNet-101 whose four stages feed the DPT decoder directly (``pascal_fold*``,
  ``coco_fold*``, ``fss_rn101``).

Both score in CLIP ViT-B/32's text space. :class:`LSegZeroShot` does the binary scoring on top of an
:class:`~langseg.models.lseg.LSeg`; the networks themselves are :class:`~langseg.models.lseg.LSegNet`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from langseg.errors import BadLabelsError
from langseg.models.lseg import LSEG_CONFIGS, LSeg, LSegNet

# The background prompt of the official zero-shot forward: ['others', class] for every class.
OTHERS_PROMPT = "others"


def lseg_zs_rn101(**kwargs: Any) -> LSegNet:
    """Zero-shot LSeg with a ResNet-101 DPT image encoder (timm ``resnet101``, random weights)."""
    return LSegNet(**{**LSEG_CONFIGS["lseg-zs-rn101"], **kwargs})


def lseg_zs_vitl16(**kwargs: Any) -> LSegNet:
    """Zero-shot LSeg with the ViT-L/16 (384) DPT image encoder."""
    return LSegNet(**{**LSEG_CONFIGS["lseg-zs-vitl16"], **kwargs})


def lseg_rn50x16_vitl16_384(**kwargs: Any) -> LSegNet:
    """Semantic LSeg, ViT-L/16 image encoder, 768-d embeddings in CLIP RN50x16's text space."""
    return LSegNet(**{**LSEG_CONFIGS["lseg-rn50x16-vitl16-384"], **kwargs})


def others_vs_class_logits(
    net: LSegNet, pixel_embeddings: torch.Tensor, others: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Score each image against ``["others", its class]``.

    Args:
        net: the network whose :meth:`~LSegNet.classify` scores (cosine of the x2-upsampled features,
            scale, x2 upsampling).
        pixel_embeddings: ``B x D x h x w`` pixel features from :meth:`LSegNet.encode_image` (``H/4``).
        others: ``D`` or ``1 x D`` embedding of the background prompt.
        classes: ``B x D``, one class embedding per image (an episode's class).

    Returns:
        ``B x 2 x 4h x 4w`` logits (the input size): channel 0 "others", channel 1 the image's class.
    """
    others = others.reshape(1, -1)
    if classes.ndim != 2 or classes.shape[0] != pixel_embeddings.shape[0]:
        raise BadLabelsError(
            f"expected one class embedding per image ({pixel_embeddings.shape[0]} x D), "
            f"got {tuple(classes.shape)}"
        )
    # One classify() per image: each image has its own pair of prompts, and classify() keeps the
    # network's own scoring (dtype handling, spatial regularisation) instead of a copy of it here.
    return torch.cat(
        [
            net.classify(pixel_embeddings[i : i + 1], torch.cat([others, classes[i : i + 1]]))
            for i in range(classes.shape[0])
        ]
    )


class LSegZeroShot(nn.Module):
    """An :class:`LSeg` run as the official zero-shot binary segmenter.

    Args:
        model: the network and its text tower.
    """

    def __init__(self, model: LSeg) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, class_token_ids: torch.Tensor, others_token_ids: torch.Tensor
    ) -> torch.Tensor:
        """Binary logits.

        Args:
            images: ``B x 3 x H x W`` normalised images, H and W multiples of 32: mean = std = 0.5 for
                the ViT-L/16, ImageNet's mean and std for the ResNet-101 (as the official test feeds
                each; the registry entries record it). The official protocol uses 480 x 480.
            class_token_ids: ``B x L`` tokens of each image's class name.
            others_token_ids: ``1 x L`` tokens of :data:`OTHERS_PROMPT`.

        Returns:
            ``B x 2 x H x W`` logits (channel 1: the class); :func:`binary_mask` turns them into masks.
        """
        text = self.model.encode_text(torch.cat([others_token_ids, class_token_ids]))
        pixels = self.model.encode_image(images)
        return others_vs_class_logits(self.model.net, pixels, text[0], text[1:])


def binary_mask(logits: torch.Tensor) -> torch.Tensor:
    """``B x 2 x H x W`` others-vs-class logits -> ``B x H x W`` bool masks (the class wins the argmax)."""
    return logits.argmax(dim=1) == 1
