"""Official LSeg state-dict key names -> langseg's, as regular-expression rules.

Each official key (without its leading ``net.``) maps to a key of :class:`~langseg.models.lseg.LSegNet`
(``net:``), of the CLIP text tower (``text:``), or is dropped by an explicit rule that says why
(``drop:``): parts the official forward never reads. Anything else is "unknown", and the converter
(:mod:`langseg.convert.lseg_official`) refuses it by name.
"""

from __future__ import annotations

import re

_BLOCK = (
    r"blocks\.\d+\.(?:norm[12]\.(?:weight|bias)|attn\.(?:qkv|proj)\.(?:weight|bias)|"
    r"mlp\.fc[12]\.(?:weight|bias))"
)
_CLIP_BLOCK = (
    r"transformer\.resblocks\.\d+\.(?:ln_[12]\.(?:weight|bias)|attn\.(?:in_proj_weight|in_proj_bias|"
    r"out_proj\.weight|out_proj\.bias)|mlp\.c_(?:fc|proj)\.(?:weight|bias))"
)
_BN = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
# A torchvision/timm bottleneck block, and OpenAI CLIP's ModifiedResNet image tower (RN50x16; dropped).
_BOTTLENECK = rf"\d+\.(?:conv[1-3]\.weight|bn[1-3]\.{_BN}|downsample\.0\.weight|downsample\.1\.{_BN})"
_CLIP_RESNET = (
    rf"(?:conv[1-3]\.weight|bn[1-3]\.{_BN}|layer[1-4]\.{_BOTTLENECK}|"
    r"attnpool\.(?:positional_embedding|[qkvc]_proj\.(?:weight|bias)))"
)
_RCU = r"(?:conv[12]\.(?:weight|bias)|bn[12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))"

# (official key without "net.", target) where target is "net:<template>", "text:<template>" or
# "drop:<why>". Templates use \1, \2 ... and {n-1} for "the first group minus one".
_RULES: list[tuple[str, str]] = [
    (
        rf"pretrained\.model\.(cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|{_BLOCK})",
        r"net:encoder.vit.\1",
    ),
    (r"pretrained\.model\.(?:norm|head)\.(?:weight|bias)", "drop:final norm and classifier of the timm ViT"),
    # The zero-shot ResNet-101: pretrained.layer1 = Sequential(conv1, bn1, relu, maxpool, layer1).
    (r"pretrained\.layer1\.0\.weight", r"net:encoder.resnet.conv1.weight"),
    (rf"pretrained\.layer1\.1\.({_BN})", r"net:encoder.resnet.bn1.\1"),
    (rf"pretrained\.layer1\.4\.({_BOTTLENECK})", r"net:encoder.resnet.layer1.\1"),
    (rf"pretrained\.layer([2-4])\.({_BOTTLENECK})", r"net:encoder.resnet.layer\1.\2"),
    (
        r"pretrained\.act_postprocess([1-4])\.0\.project\.0\.(weight|bias)",
        r"net:reassemble.blocks.{n-1}.readout.proj.\2",
    ),
    (r"pretrained\.act_postprocess([1-4])\.3\.(weight|bias)", r"net:reassemble.blocks.{n-1}.conv.\2"),
    (r"pretrained\.act_postprocess([1-4])\.4\.(weight|bias)", r"net:reassemble.blocks.{n-1}.resample.\2"),
    (r"scratch\.layer([1-4])_rn\.weight", r"net:decoder.proj.{n-1}.weight"),
    (rf"scratch\.refinenet4\.resConfUnit1\.{_RCU}", "drop:skip unit of the deepest fusion block"),
    (rf"scratch\.refinenet([1-4])\.resConfUnit1\.({_RCU})", r"net:decoder.fusion.{n-1}.skip_unit.\2"),
    (rf"scratch\.refinenet([1-4])\.resConfUnit2\.({_RCU})", r"net:decoder.fusion.{n-1}.unit.\2"),
    (r"scratch\.refinenet([1-4])\.out_conv\.(weight|bias)", r"net:decoder.fusion.{n-1}.out_conv.\2"),
    (r"scratch\.head1\.(weight|bias)", r"net:head.\1"),
    (r"scratch\.head_block\.depthwise\.depthwise\.(weight|bias)", r"net:spatial_reg.conv.\1"),
    (
        rf"clip_pretrained\.(token_embedding\.weight|positional_embedding|text_projection|"
        rf"ln_final\.(?:weight|bias)|{_CLIP_BLOCK})",
        r"text:text.\1",
    ),
    (r"clip_pretrained\.logit_scale", "drop:CLIP's image-text temperature"),
    (
        rf"clip_pretrained\.visual\.(?:class_embedding|positional_embedding|proj|conv1\.weight|"
        rf"ln_(?:pre|post)\.(?:weight|bias)|{_CLIP_BLOCK})",
        "drop:CLIP image tower",
    ),
    (rf"clip_pretrained\.visual\.{_CLIP_RESNET}", "drop:CLIP image tower (ModifiedResNet)"),
]
_COMPILED = [(re.compile(pattern), target) for pattern, target in _RULES]
# Our key -> official key, only to name missing keys the way the user's checkpoint spells them.
_INVERSE: list[tuple[str, str]] = [
    (r"net:encoder\.vit\.(.+)", r"pretrained.model.\1"),
    (r"net:encoder\.resnet\.conv1\.(.+)", r"pretrained.layer1.0.\1"),
    (r"net:encoder\.resnet\.bn1\.(.+)", r"pretrained.layer1.1.\1"),
    (r"net:encoder\.resnet\.layer1\.(.+)", r"pretrained.layer1.4.\1"),
    (r"net:encoder\.resnet\.(layer[2-4]\..+)", r"pretrained.\1"),
    (r"net:reassemble\.blocks\.(\d)\.readout\.proj\.(.+)", r"pretrained.act_postprocess{n+1}.0.project.0.\2"),
    (r"net:reassemble\.blocks\.(\d)\.conv\.(.+)", r"pretrained.act_postprocess{n+1}.3.\2"),
    (r"net:reassemble\.blocks\.(\d)\.resample\.(.+)", r"pretrained.act_postprocess{n+1}.4.\2"),
    (r"net:decoder\.proj\.(\d)\.weight", r"scratch.layer{n+1}_rn.weight"),
    (r"net:decoder\.fusion\.(\d)\.skip_unit\.(.+)", r"scratch.refinenet{n+1}.resConfUnit1.\2"),
    (r"net:decoder\.fusion\.(\d)\.unit\.(.+)", r"scratch.refinenet{n+1}.resConfUnit2.\2"),
    (r"net:decoder\.fusion\.(\d)\.out_conv\.(.+)", r"scratch.refinenet{n+1}.out_conv.\2"),
    (r"net:head\.(.+)", r"scratch.head1.\1"),
    (r"net:spatial_reg\.conv\.(.+)", r"scratch.head_block.depthwise.depthwise.\1"),
    (r"text:text\.(.+)", r"clip_pretrained.\1"),
]


def map_key(key: str) -> tuple[str, str]:
    """``("net"|"text"|"drop"|"unknown", new_key_or_reason)`` for an official key without ``net.``."""
    for pattern, target in _COMPILED:
        match = pattern.fullmatch(key)
        if match is None:
            continue
        kind, _, template = target.partition(":")
        if kind == "drop":
            return kind, template
        template = (
            template.replace("{n-1}", str(int(match.group(1)) - 1)) if "{n-1}" in template else template
        )
        return kind, match.expand(template)
    return "unknown", key


def official_name(kind: str, key: str) -> str:
    """The official checkpoint key that would fill our ``key`` (for error messages)."""
    for pattern, template in _INVERSE:
        match = re.fullmatch(pattern, f"{kind}:{key}")
        if match is not None:
            template = (
                template.replace("{n+1}", str(int(match.group(1)) + 1)) if "{n+1}" in template else template
            )
            return "net." + match.expand(template)
    return f"{kind}:{key}"
