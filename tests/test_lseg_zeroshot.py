"""The official zero-shot LSeg networks and the RN50x16 text variant, converted and checked against
independent functional reference forwards.

Key layouts are written from isl-org/lang-seg (``lseg_net_zs.py``: ``LSegRNNetZS`` keeps torchvision's
``resnet101`` as ``pretrained.layer1 = Sequential(conv1, bn1, relu, maxpool, layer1)`` and
``pretrained.layer2..4``; ``_make_scratch([256, 512, 1024, 2048], 256)``; the zero-shot ViT-L/16 and the
``clipRN50x16_vitl16_384`` networks keep the ViT layout of ``lseg_vit.py``; ``clip.load("RN50x16")``
gives OpenAI CLIP's ModifiedResNet image tower and a 768-wide, 12-layer text tower), not from our
state dicts. The references spell out the official order of operations in functional code; the
zero-shot one scores each image against ``clip.tokenize(['others', class])`` as ``LSegRNNetZS.forward``.

What runs at full size: the ResNet-101 network (numerics, 64 x 96 images) and the RN50x16 text tower
(numerics). The ViT-L/16 networks are checked at full size on meta tensors (every key maps, shapes
agree) and numerically with the ViT cut to 4 blocks (hooks 0-3, full 1024 width). The cut is a fair
proxy: the 20 blocks it drops are the same block (one key rule maps every index, checked at full depth
on meta tensors), hook selection at non-adjacent depths is checked numerically on the full 12-block
ViT-B/32 (test_lseg_convert.py), and the hooks and depth of the real config are asserted against the
official ones. A full-depth run of the ViT-L/16 zero-shot test measured 32.5 s and 5.6 GB peak memory
(niced, 2 cores; logits within 3.1e-6 of the reference) against 13 s for the cut.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from langseg.convert import convert_lseg_official, official_to_langseg
from langseg.errors import BadConfigError
from langseg.models.lseg import LSEG_CONFIGS, LSeg
from langseg.models.lseg_zeroshot import OTHERS_PROMPT, LSegZeroShot, binary_mask, others_vs_class_logits
from langseg.zoo.lseg import load_lseg
from tests.test_cli import run_cli
from tests.test_lseg_convert import (
    VITB32,
    VITL16,
    _rcu,
    _tokens,
    official_shapes,
    random_official_state,
    ref_encode_text,
    ref_lseg,
)

RESNET101_BLOCKS, RESNET_PLANES = (3, 4, 23, 3), (64, 128, 256, 512)
# The DPT/CLIP part of the ResNet network: official_shapes() with the ViT keys removed below.
RN101 = {**VITB32, "backbone": "clip_resnet101", "depth": 0, "widths": (256, 512, 1024, 2048)}
ZS_HYPER = {"nshot": 0, "fold": 0, "dataset": "fss", "arch_option": 0, "block_depth": 0}


def _bn_shapes(s: dict, prefix: str, channels: int) -> None:
    for stat in ("weight", "bias", "running_mean", "running_var"):
        s[prefix + stat] = (channels,)
    s[prefix + "num_batches_tracked"] = ()


def _bottleneck_stages(
    s: dict, stages: list[str], blocks: tuple[int, ...], planes: tuple[int, ...], inplanes: int
) -> None:
    """Add the keys of bottleneck ResNet stages to ``s``: block ``i`` of stage ``n`` under
    ``stages[n] + f"{i}."``, with torchvision's names (conv1-3 and bn1-3, the first block's
    ``downsample.0`` conv and ``downsample.1`` BatchNorm; 4x expansion). torchvision's ResNet and
    OpenAI CLIP's ModifiedResNet name and shape their bottlenecks alike (CLIP's stride sits in an
    ``avgpool`` without weights), so one writer serves both layouts."""
    for stage, count, width in zip(stages, blocks, planes, strict=True):
        for i in range(count):
            b = f"{stage}{i}."
            s[b + "conv1.weight"], s[b + "conv2.weight"] = (width, inplanes, 1, 1), (width, width, 3, 3)
            s[b + "conv3.weight"] = (4 * width, width, 1, 1)
            for j, c in ((1, width), (2, width), (3, 4 * width)):
                _bn_shapes(s, f"{b}bn{j}.", c)
            if i == 0:
                s[b + "downsample.0.weight"] = (4 * width, inplanes, 1, 1)
                _bn_shapes(s, b + "downsample.1.", 4 * width)
            inplanes = 4 * width


def official_rn101_shapes() -> dict[str, tuple[int, ...]]:
    """LSegModuleZS.state_dict() for backbone clip_resnet101: torchvision ResNet-101 (no fc) + DPT + CLIP."""
    s = {k: v for k, v in official_shapes(RN101).items() if not k.startswith("net.pretrained.")}
    s["net.pretrained.layer1.0.weight"] = (64, 3, 7, 7)
    _bn_shapes(s, "net.pretrained.layer1.1.", 64)
    # pretrained.layer1 = Sequential(conv1, bn1, relu, maxpool, layer1): torchvision's layer1 is item 4.
    stages = [
        "net.pretrained.layer1.4.",
        "net.pretrained.layer2.",
        "net.pretrained.layer3.",
        "net.pretrained.layer4.",
    ]
    _bottleneck_stages(s, stages, RESNET101_BLOCKS, RESNET_PLANES, inplanes=64)
    return s


def random_rn101_state(seed: int) -> dict[str, torch.Tensor]:
    """Random official weights; ResNet BatchNorms near identity, the last of each block scaled down (so
    that 33 random residual blocks keep the activations in range)."""
    shapes = official_rn101_shapes()
    state = random_official_state(shapes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for key, shape in shapes.items():
        if not key.startswith("net.pretrained.") or not key.endswith(("weight", "bias")) or len(shape) != 1:
            continue  # convolutions keep random_official_state's fan-in scaling
        scale = 0.2 if key.endswith("bn3.weight") else 1.0
        base = scale if key.endswith("weight") else 0.0
        state[key] = base + 0.1 * scale * torch.randn(shape, generator=g)
    return state


def vitl16_cut(embed: int = 512) -> dict:
    """The ViT-L/16 official layout with the ViT cut to 4 blocks (full width), as in the numeric tests."""
    return {**VITL16, "depth": 4, "hooks": (0, 1, 2, 3), "out_c": embed}


def _cut_config(monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    """Make ``variant`` build the 4-block ViT-L/16 that :func:`vitl16_cut` writes.

    What the cut leaves out is checked here instead: the full network reads the official hooks of
    ``clip_vitl16_384`` (``lseg_net_zs.py``: ``[5, 11, 17, 23]``) from a 24-block ``vit_large_patch16_384``.
    """
    assert LSEG_CONFIGS[variant]["hooks"] == [5, 11, 17, 23]
    assert (
        LSEG_CONFIGS[variant]["backbone"] == "vit_large_patch16_384"
        and "vit_kwargs" not in LSEG_CONFIGS[variant]
    )
    cut = {**LSEG_CONFIGS[variant], "hooks": [0, 1, 2, 3], "vit_kwargs": {"depth": 4}}
    monkeypatch.setitem(LSEG_CONFIGS, variant, cut)


# ------------------------------------------------------------------ independent reference forwards
def _bn(x, sd, key):
    return F.batch_norm(x, sd[key + ".running_mean"], sd[key + ".running_var"], sd[key + ".weight"],
                        sd[key + ".bias"], False, 0.0, 1e-5)  # fmt: skip


def ref_resnet101(sd, x):
    """torchvision resnet101 up to layer4 as LSegRN.forward runs it: the four stage outputs."""
    p = "net.pretrained."
    x = F.relu(_bn(F.conv2d(x, sd[p + "layer1.0.weight"], stride=2, padding=3), sd, p + "layer1.1"))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for n, blocks in enumerate(RESNET101_BLOCKS, start=1):
        stage = f"{p}layer1.4." if n == 1 else f"{p}layer{n}."
        for i in range(blocks):
            b, stride = f"{stage}{i}.", 2 if (i == 0 and n > 1) else 1
            out = F.relu(_bn(F.conv2d(x, sd[b + "conv1.weight"]), sd, b + "bn1"))
            out = F.relu(_bn(F.conv2d(out, sd[b + "conv2.weight"], stride=stride, padding=1), sd, b + "bn2"))
            out = _bn(F.conv2d(out, sd[b + "conv3.weight"]), sd, b + "bn3")
            if i == 0:
                x = _bn(F.conv2d(x, sd[b + "downsample.0.weight"], stride=stride), sd, b + "downsample.1")
            x = F.relu(out + x)
        outs.append(x)
    return outs


def ref_zs_decoder_scores(sd, layers, text_pairs):
    """The scratch of LSegRN.forward (layerN_rn, refinenets, head1) and its per-image scoring: image
    ``i`` against its ``2 x D`` text pair, scale exp(log(1/0.07)), then output_conv (x2 bilinear)."""
    layers = [F.conv2d(x, sd[f"net.scratch.layer{n}_rn.weight"], padding=1) for n, x in enumerate(layers, 1)]
    path = None
    for n in (4, 3, 2, 1):
        r = f"net.scratch.refinenet{n}"
        out = layers[n - 1] if path is None else path + _rcu(layers[n - 1], sd, r + ".resConfUnit1")
        out = F.interpolate(_rcu(out, sd, r + ".resConfUnit2"), scale_factor=2, mode="bilinear",
                            align_corners=True)  # fmt: skip
        path = F.conv2d(out, sd[r + ".out_conv.weight"], sd[r + ".out_conv.bias"])
    img = F.conv2d(path, sd["net.scratch.head1.weight"], sd["net.scratch.head1.bias"])
    b, c, h, w = img.shape
    outs = []
    for i in range(b):
        feats = img[i].unsqueeze(0).permute(0, 2, 3, 1).reshape(-1, c)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        txt = text_pairs[i] / text_pairs[i].norm(dim=-1, keepdim=True)
        logits = torch.exp(torch.ones([]) * math.log(1 / 0.07)) * feats @ txt.t()
        outs.append(logits.view(1, h, w, -1).permute(0, 3, 1, 2))
    return F.interpolate(torch.cat(outs), scale_factor=2, mode="bilinear", align_corners=True)


def _float(state):
    return {k: v.float() for k, v in state.items() if "clip" not in k}


def _save(path, state, hyper):
    torch.save({"epoch": 3, "global_step": 99, "state_dict": state, "hyper_parameters": hyper}, path)


# ------------------------------------------------------------------------------------------ tests
def test_zero_shot_rn101_matches_official_reference(tmp_path):
    """THE ResNet-101 test: the official zero-shot layout at full size, 64 x 96 images, two episodes."""
    start = time.perf_counter()
    state = random_rn101_state(seed=11)
    _save(tmp_path / "fss_rn101.ckpt", state, {"backbone": "clip_resnet101", "num_features": 256, **ZS_HYPER})
    out_dir = convert_lseg_official(tmp_path / "fss_rn101.ckpt", tmp_path / "zs-rn101")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["variant"] == "lseg-zs-rn101" and config["kwargs"]["encoder"] == "resnet"
    net, text_encoder, _ = load_lseg(out_dir)
    zero_shot = LSegZeroShot(LSeg(net, text_encoder)).eval()
    torch.manual_seed(0)
    images, classes = torch.rand(2, 3, 64, 96) * 2 - 1, ["bus", "golden retriever"]
    with torch.no_grad():
        ours = zero_shot(images, _tokens(classes), _tokens([OTHERS_PROMPT]))
        pairs = [ref_encode_text(state, _tokens([OTHERS_PROMPT, c]), heads=8) for c in classes]
        sd = _float(state)
        ref = ref_zs_decoder_scores(sd, ref_resnet101(sd, images), pairs)
    assert ours.shape == ref.shape == (2, 2, 64, 96)
    diff = (ours - ref).abs().max().item()
    print(f"zs rn101 max abs logit diff {diff:.2e}, {time.perf_counter() - start:.1f}s")
    assert ref.std() > 0.1 and (ref[:, 1] > ref[:, 0]).float().mean() not in (0.0, 1.0)
    assert diff < 1e-3
    assert torch.equal(binary_mask(ours), ref.argmax(1) == 1)


def test_zero_shot_vitl16_matches_official_reference(tmp_path, monkeypatch):
    """The ViT-L/16 zero-shot network (fss_l16): few-shot hparams select it; numerics at 4 blocks."""
    _cut_config(monkeypatch, "lseg-zs-vitl16")
    cfg = vitl16_cut()
    state = random_official_state(official_shapes(cfg), seed=12)
    _save(tmp_path / "fss_l16.ckpt", state, {"backbone": "clip_vitl16_384", "num_features": 256, **ZS_HYPER})
    net, text_encoder, config = load_lseg(tmp_path / "fss_l16.ckpt")
    assert config["variant"] == "lseg-zs-vitl16" and config["kwargs"]["spatial_reg"] == "none"
    net.eval()
    images, classes = torch.rand(2, 3, 64, 64) * 2 - 1, ["cat", "sofa"]
    with torch.no_grad():
        text = text_encoder.encode(_tokens([OTHERS_PROMPT, *classes]))
        ours = others_vs_class_logits(net, net.encode_image(images), text[0], text[1:])
        sd = _float(state)
        ref = torch.cat([
            ref_lseg(sd, cfg, images[i : i + 1], ref_encode_text(state, _tokens([OTHERS_PROMPT, c]), heads=8))
            for i, c in enumerate(classes)
        ])  # fmt: skip
    assert ours.shape == ref.shape == (2, 2, 64, 64) and ref.std() > 0.1
    assert (ours - ref).abs().max().item() < 1e-3


def test_rn50x16_text_variant_matches_official_reference(tmp_path, monkeypatch):
    """clipRN50x16_vitl16_384: 768-d head, full-size CLIP RN50x16 text tower, ViT cut to 4 blocks."""
    _cut_config(monkeypatch, "lseg-rn50x16-vitl16-384")
    cfg = {**vitl16_cut(768), "clip_text": (768, 12)}
    shapes = {k: v for k, v in official_shapes(cfg).items() if ".visual." not in k}
    shapes.update({k: (1,) for k in official_rn50x16_visual_shapes()})  # dropped: any size will do here
    state = random_official_state(shapes, seed=13)
    _save(tmp_path / "rn50x16.ckpt", state, {"backbone": "clipRN50x16_vitl16_384", "arch_option": 0})
    net, text_encoder, config = load_lseg(tmp_path / "rn50x16.ckpt")
    assert config["variant"] == "lseg-rn50x16-vitl16-384" and text_encoder.output_dim == 768
    net.eval()
    images, labels = torch.rand(1, 3, 64, 96) * 2 - 1, ["cat", "a red sofa", "other"]
    with torch.no_grad():
        ours = net(images, text_encoder.encode(_tokens(labels)))
        ref = ref_lseg(_float(state), cfg, images, ref_encode_text(state, _tokens(labels), heads=12))
    assert ours.shape == ref.shape == (1, 3, 64, 96) and ref.std() > 0.1
    assert (ours - ref).abs().max().item() < 1e-3


def official_rn50x16_visual_shapes() -> dict[str, tuple[int, ...]]:
    """OpenAI CLIP RN50x16's image tower (ModifiedResNet, layers 6/8/18/8, width 96, 384 px) keys."""
    v, s, width = "net.clip_pretrained.visual.", {}, 96
    for j, (cin, cout) in enumerate(((3, width // 2), (width // 2, width // 2), (width // 2, width)), 1):
        s[f"{v}conv{j}.weight"] = (cout, cin, 3, 3)
        _bn_shapes(s, f"{v}bn{j}.", cout)
    stages = [f"{v}layer{n}." for n in range(1, 5)]
    _bottleneck_stages(s, stages, (6, 8, 18, 8), tuple(width * 2**n for n in range(4)), inplanes=width)
    s[v + "attnpool.positional_embedding"] = (145, 32 * width)
    for proj in "qkv":
        s[f"{v}attnpool.{proj}_proj.weight"], s[f"{v}attnpool.{proj}_proj.bias"] = (3072, 3072), (3072,)
    s[v + "attnpool.c_proj.weight"], s[v + "attnpool.c_proj.bias"] = (768, 3072), (768,)
    return s


@pytest.mark.parametrize(
    ("name", "hyper", "variant"),
    [
        ("rn101", {}, "lseg-zs-rn101"),  # inferred from the ResNet stem and its 3/4/23/3 blocks
        ("rn101", {"backbone": "clip_resnet101", **ZS_HYPER}, "lseg-zs-rn101"),
        ("vitl16", {"backbone": "clip_vitl16_384", **ZS_HYPER}, "lseg-zs-vitl16"),
        ("vitl16", {"backbone": "clip_vitl16_384"}, "lseg-vitl16-384"),
        ("rn50x16", {}, "lseg-rn50x16-vitl16-384"),  # inferred from the 768-d head
        ("rn50x16", {"backbone": "clipRN50x16_vitl16_384"}, "lseg-rn50x16-vitl16-384"),
    ],
)
def test_full_size_layouts_map_completely(name, hyper, variant):
    """Every zoo network's full layout, on meta tensors: every key maps or is dropped by a rule."""
    if name == "rn101":
        shapes = official_rn101_shapes()
    elif name == "vitl16":
        shapes = official_shapes(VITL16)
    else:
        shapes = {k: v for k, v in official_shapes({**VITL16, "out_c": 768, "clip_text": (768, 12)}).items()
                  if ".visual." not in k} | official_rn50x16_visual_shapes()  # fmt: skip
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    converted = official_to_langseg(state, hyper)
    assert converted.config["variant"] == variant
    dropped = converted.config["source"]["dropped_keys"]
    assert len(converted.net_state) + len(converted.text_state) == len(state) - dropped + 1  # + logit_scale
    if name == "rn101":  # only CLIP's logit scale and image tower, and the unused deepest skip unit
        assert dropped == 1 + 12 + len([k for k in state if ".visual." in k])
        assert converted.net_state["encoder.resnet.layer3.22.conv3.weight"].shape == (1024, 256, 1, 1)
    if name == "rn50x16":
        assert converted.text_state["text.text_projection"].shape == (768, 768)


def test_other_networks_are_refused_naming_what_they_hold(tmp_path):
    shapes = official_rn101_shapes()
    for key in [k for k in shapes if k.startswith("net.pretrained.layer3.") and int(k.split(".")[3]) >= 6]:
        del shapes[key]  # a ResNet-50's layer3
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    with pytest.raises(BadConfigError, match=r"ResNet with \[3, 4, 6, 3\] blocks per stage"):
        official_to_langseg(state, {})
    shapes = official_shapes({**VITL16, "out_c": 640})  # clipRN50x4_vitl16_384's 640-d head
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    with pytest.raises(BadConfigError, match=r"a ViT 1024 wide with 16-px patches and 640-d"):
        official_to_langseg(state, {})
    with pytest.raises(BadConfigError, match="clipRN50x4_vitl16_384"):
        official_to_langseg(state, {"backbone": "clipRN50x4_vitl16_384"})
    with pytest.raises(BadConfigError, match="trained as lseg-zs-rn101"):
        official_to_langseg(state, {"backbone": "clip_resnet101"}, "lseg-zs-vitl16")


def test_cli_converts_and_refuses(tmp_path, monkeypatch, capsys):
    """`langseg convert lseg-official` on a 4-block ViT-L/16 zero-shot checkpoint, with --variant for a
    file without hyper-parameters, and its refusal of an unsupported backbone."""
    _cut_config(monkeypatch, "lseg-zs-vitl16")
    state = random_official_state(official_shapes(vitl16_cut()), seed=14)
    torch.save({"state_dict": state}, tmp_path / "bare.ckpt")
    code, out, err = run_cli(monkeypatch, capsys, "convert", "lseg-official", str(tmp_path / "bare.ckpt"),
                             str(tmp_path / "zs"), "--variant", "lseg-zs-vitl16")  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "zs" / "config.json").read_text())["variant"] == "lseg-zs-vitl16"
    _save(tmp_path / "x4.ckpt", {"net.scratch.head1.bias": torch.zeros(640)},
          {"backbone": "clipRN50x4_vitl16_384"})  # fmt: skip
    code, out, err = run_cli(monkeypatch, capsys, "convert", "lseg-official", str(tmp_path / "x4.ckpt"),
                             str(tmp_path / "x4"))  # fmt: skip
    assert code != 0 and "clipRN50x4_vitl16_384" in out + err and not (tmp_path / "x4").exists()


def test_eval_pascal5i_fold_with_a_converted_zero_shot_model(tmp_path, monkeypatch, capsys):
    """`langseg eval FOLDER --data pascal-5i --fold 0` on the real-layout fixture with a converted
    (random-weight) ResNet-101 zero-shot model, run as the published protocol with two settings shrunk
    for time (64 x 64 instead of 480 x 480, 3 episodes instead of 1000: the two pairs cycled, the first
    twice): the CLI's scores equal HSNet's Evaluator/AverageMeter (test_fewshot_protocol.py) on the
    predictor's own ``["others", class]`` masks of the same episodes."""
    import langseg
    from langseg.data import build_dataset
    from tests.test_eval_fewshot import pascal_root
    from tests.test_fewshot_protocol import hsnet_scores

    _save(tmp_path / "pascal_fold0.ckpt", random_rn101_state(seed=15),
          {"backbone": "clip_resnet101", "num_features": 256, **ZS_HYPER})  # fmt: skip
    folder = convert_lseg_official(tmp_path / "pascal_fold0.ckpt", tmp_path / "zs")
    root, out = pascal_root(tmp_path), tmp_path / "scores.json"
    settings = {"root": str(root), "fold": 0, "size": 64, "episodes": 3}
    cli = ["eval", str(folder), "--data", "pascal-5i", "--root", str(root), "--fold", "0", "--plan", "native"]
    cli += ["--data-arg", "size=64", "--data-arg", "episodes=3", "--out", str(out)]
    code, _, err = run_cli(monkeypatch, capsys, *cli)
    assert code == 0, err
    scores = json.loads(out.read_text())
    seg = langseg.load(str(folder), plan="native")
    # The ResNet-101 was evaluated on ImageNet-normalised images (test_lseg_zs.py: imagenet_norm=True).
    assert seg.preprocess.mean == pytest.approx((0.485, 0.456, 0.406)) and seg.preprocess.std[0] == 0.229
    dataset = build_dataset("pascal-5i", settings)
    episodes, predicted = [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image"].shape == (3, 64, 64)
        pred = torch.as_tensor(seg.segment(sample["image"].permute(1, 2, 0).numpy(), sample["labels"]).mask)
        assert pred.shape == (64, 64)
        episodes.append((sample["meta"]["class_id"] - 1, pred, sample["mask"]))
        predicted.append(pred.float().mean().item())
    assert [e[0] for e in episodes] == [0, 2, 0]  # aeroplane, bird, aeroplane again
    assert any(0 < f < 1 for f in predicted) or len(set(predicted)) > 1  # not one constant answer
    miou, fb_iou = hsnet_scores(episodes, class_ids=[0, 2])
    assert scores["classes"] == 2
    assert scores["mIoU"] == pytest.approx(miou, abs=1e-6)
    assert scores["FB-IoU"] == pytest.approx(fb_iou, abs=1e-6)
