"""Official LSeg checkpoint conversion, checked against an independent functional reference.

The official-layout key list below is written from isl-org/lang-seg (modules/lseg_module.py keeps
the network as ``self.net``; modules/models/lseg_net.py, lseg_blocks.py and lseg_vit.py build it;
``clip.load`` gives the OpenAI CLIP module under ``clip_pretrained``), not from our state_dict.
The reference forward follows the official order of operations literally, in functional code.
"""

from __future__ import annotations

import json
import math
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F

from langseg.convert import convert_lseg_official, official_to_langseg
from langseg.errors import BadDataError
from langseg.zoo.lseg import load_lseg

# Official structure per backbone. "post" is act_postprocessN's module 4 (after the 1x1 conv), from
# _make_vit_b32_backbone / _make_vit_b16_backbone; the tiny layout mirrors the L/16 structure.
VITB32 = dict(
    backbone="clip_vitb32_384", width=768, depth=12, heads=12, patch=32, img=384, hooks=(2, 5, 8, 11),
    widths=(96, 192, 384, 768), post=(("convT", 8), ("convT", 4), ("convT", 2), None), features=256,
    out_c=512, clip_text=(512, 12), clip_visual=(768, 12, 32, 224),
)  # fmt: skip
TINY = dict(
    backbone="tiny", width=48, depth=4, heads=2, patch=16, img=64, hooks=(0, 1, 2, 3),
    widths=(8, 16, 32, 32), post=(("convT", 4), ("convT", 2), None, ("conv_s2",)), features=16,
    out_c=32, clip_text=(32, 2), clip_visual=(32, 1, 16, 32),
)  # fmt: skip


def official_shapes(cfg: dict, arch_option: int = 0) -> dict[str, tuple[int, ...]]:
    """Key -> shape of LSegModule.state_dict() for an official-layout network."""
    c, p, f = cfg["width"], cfg["patch"], cfg["features"]
    s: dict[str, tuple[int, ...]] = {}
    vit = "net.pretrained.model."
    s[vit + "cls_token"] = (1, 1, c)
    s[vit + "pos_embed"] = (1, (cfg["img"] // p) ** 2 + 1, c)
    s[vit + "patch_embed.proj.weight"], s[vit + "patch_embed.proj.bias"] = (c, 3, p, p), (c,)
    for i in range(cfg["depth"]):
        b = f"{vit}blocks.{i}."
        for norm in ("norm1", "norm2"):
            s[b + norm + ".weight"] = s[b + norm + ".bias"] = (c,)
        s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"] = (3 * c, c), (3 * c,)
        s[b + "attn.proj.weight"], s[b + "attn.proj.bias"] = (c, c), (c,)
        s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"] = (4 * c, c), (4 * c,)
        s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"] = (c, 4 * c), (c,)
    s[vit + "norm.weight"] = s[vit + "norm.bias"] = (c,)
    s[vit + "head.weight"], s[vit + "head.bias"] = (1000, c), (1000,)
    for n, (w, post) in enumerate(zip(cfg["widths"], cfg["post"], strict=True), start=1):
        a = f"net.pretrained.act_postprocess{n}."
        s[a + "0.project.0.weight"], s[a + "0.project.0.bias"] = (c, 2 * c), (c,)
        s[a + "3.weight"], s[a + "3.bias"] = (w, c, 1, 1), (w,)
        if post is not None:
            k = post[1] if post[0] == "convT" else 3
            s[a + "4.weight"], s[a + "4.bias"] = (w, w, k, k), (w,)
        s[f"net.scratch.layer{n}_rn.weight"] = (f, w, 3, 3)
        for unit in ("resConfUnit1", "resConfUnit2"):  # refinenet4 builds resConfUnit1 too
            r = f"net.scratch.refinenet{n}.{unit}."
            for j in (1, 2):
                s[f"{r}conv{j}.weight"] = (f, f, 3, 3)  # bias=False with BatchNorm
                for stat in ("weight", "bias", "running_mean", "running_var"):
                    s[f"{r}bn{j}.{stat}"] = (f,)
                s[f"{r}bn{j}.num_batches_tracked"] = ()
        s[f"net.scratch.refinenet{n}.out_conv.weight"] = (f, f, 1, 1)
        s[f"net.scratch.refinenet{n}.out_conv.bias"] = (f,)
    s["net.scratch.head1.weight"], s["net.scratch.head1.bias"] = (cfg["out_c"], f, 1, 1), (cfg["out_c"],)
    if arch_option in (1, 2):
        s["net.scratch.head_block.depthwise.depthwise.weight"] = (1, 1, 3, 3)
        s["net.scratch.head_block.depthwise.depthwise.bias"] = (1,)
    # OpenAI CLIP (clip/model.py): text tower at top level, image tower under visual.
    e, (tw, tl), (vw, vl, vp, vr) = cfg["out_c"], cfg["clip_text"], cfg["clip_visual"]
    clip = "net.clip_pretrained."
    s[clip + "positional_embedding"], s[clip + "text_projection"] = (77, tw), (tw, e)
    s[clip + "logit_scale"], s[clip + "token_embedding.weight"] = (), (49408, tw)
    s[clip + "ln_final.weight"] = s[clip + "ln_final.bias"] = (tw,)
    s[clip + "visual.class_embedding"], s[clip + "visual.proj"] = (vw,), (vw, e)
    s[clip + "visual.positional_embedding"] = ((vr // vp) ** 2 + 1, vw)
    s[clip + "visual.conv1.weight"] = (vw, 3, vp, vp)
    for ln in ("ln_pre", "ln_post"):
        s[f"{clip}visual.{ln}.weight"] = s[f"{clip}visual.{ln}.bias"] = (vw,)
    for prefix, w, layers in ((clip, tw, tl), (clip + "visual.", vw, vl)):
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            s[b + "attn.in_proj_weight"], s[b + "attn.in_proj_bias"] = (3 * w, w), (3 * w,)
            s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"] = (w, w), (w,)
            for ln in ("ln_1", "ln_2"):
                s[b + ln + ".weight"] = s[b + ln + ".bias"] = (w,)
            s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"] = (4 * w, w), (4 * w,)
            s[b + "mlp.c_proj.weight"], s[b + "mlp.c_proj.bias"] = (w, 4 * w), (w,)
    return s


def random_official_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random weights at sensible scales; CLIP matrices in fp16 as clip.load(device="cuda") keeps them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        name = key.rsplit(".", 1)[-1]
        if name == "num_batches_tracked":
            t = torch.tensor(100, dtype=torch.long)
        elif name == "running_var":
            t = 0.5 + torch.rand(shape, generator=g)
        elif "norm" in key.rsplit(".", 2)[-2] or ".ln_" in key or ".bn" in key:  # affine of norms
            t = (1.0 if name == "weight" else 0.0) + 0.1 * torch.randn(shape, generator=g)
        elif name == "logit_scale":
            t = torch.tensor(math.log(1 / 0.07))
        elif len(shape) >= 2 and name in ("weight", "text_projection", "proj", "in_proj_weight"):
            fan_in = math.prod(shape[1:]) if name != "proj" and name != "text_projection" else shape[0]
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        else:  # biases, embeddings, tokens
            t = 0.05 * torch.randn(shape, generator=g)
        is_clip_matrix = ".clip_pretrained." in key and (
            name in ("text_projection", "proj", "in_proj_weight", "in_proj_bias")
            or (len(shape) >= 1 and ("mlp." in key or "out_proj" in key or "conv1" in key))
        )
        state[key] = t.half() if is_clip_matrix else t
    return state


# ------------------------------------------------------------------ independent reference forward
def _ln(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"].float(), sd[key + ".bias"].float(), eps)


def _lin(x, sd, key):
    return F.linear(x, sd[key + ".weight"].float(), sd[key + ".bias"].float())


def _attention(q, k, v, heads, mask=None):
    b, n, c = q.shape
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) * (c // heads) ** -0.5
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


def ref_encode_text(sd, tokens, heads):
    """OpenAI CLIP encode_text: embeddings, causal transformer with QuickGELU, ln_final, EOT @ proj."""
    p = "net.clip_pretrained."
    x = sd[p + "token_embedding.weight"].float()[tokens] + sd[p + "positional_embedding"].float()
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf")).triu_(1)
    i = 0
    while f"{p}transformer.resblocks.{i}.ln_1.weight" in sd:
        b = f"{p}transformer.resblocks.{i}."
        h = _ln(x, sd, b + "ln_1", 1e-5)
        q, k, v = F.linear(
            h, sd[b + "attn.in_proj_weight"].float(), sd[b + "attn.in_proj_bias"].float()
        ).chunk(3, -1)
        x = x + _lin(_attention(q, k, v, heads, mask), sd, b + "attn.out_proj")
        h = _lin(_ln(x, sd, b + "ln_2", 1e-5), sd, b + "mlp.c_fc")
        x = x + _lin(h * torch.sigmoid(1.702 * h), sd, b + "mlp.c_proj")
        i += 1
    x = _ln(x, sd, p + "ln_final", 1e-5)
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd[p + "text_projection"].float()


def _rcu(x, sd, key):
    out = F.conv2d(F.relu(x), sd[key + ".conv1.weight"], padding=1)
    out = F.batch_norm(out, sd[key + ".bn1.running_mean"], sd[key + ".bn1.running_var"],
                       sd[key + ".bn1.weight"], sd[key + ".bn1.bias"], False, 0.0, 1e-5)  # fmt: skip
    out = F.conv2d(F.relu(out), sd[key + ".conv2.weight"], padding=1)
    out = F.batch_norm(out, sd[key + ".bn2.running_mean"], sd[key + ".bn2.running_var"],
                       sd[key + ".bn2.weight"], sd[key + ".bn2.bias"], False, 0.0, 1e-5)  # fmt: skip
    return out + x


def _head_block(x, sd, arch_option, act):
    """bottleneck_block (arch 1) / depthwise_block (arch 2) of lseg_net.py with LeakyReLU."""
    key = "net.scratch.head_block.depthwise.depthwise."
    c, h, w = x.shape[1:]
    sum_layer = x.max(dim=1, keepdim=True)[0]
    y = F.conv2d(x.reshape(-1, 1, h, w), sd[key + "weight"], sd[key + "bias"], padding=1).view(-1, c, h, w)
    if arch_option == 1:
        y = y + sum_layer
    return F.leaky_relu(y) if act else y


def ref_lseg(sd, cfg, x, text_features, arch_option=0, block_depth=0):
    """LSeg.forward of lseg_net.py with forward_vit/forward_flex of lseg_vit.py, spelt out."""
    vit, p, heads = "net.pretrained.model.", cfg["patch"], cfg["heads"]
    b, _, h, w = x.shape
    t = F.conv2d(x, sd[vit + "patch_embed.proj.weight"], sd[vit + "patch_embed.proj.bias"], stride=p)
    t = torch.cat([sd[vit + "cls_token"].expand(b, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    pos, gs = sd[vit + "pos_embed"], int(math.sqrt(sd[vit + "pos_embed"].shape[1] - 1))
    grid = pos[0, 1:].reshape(1, gs, gs, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h // p, w // p), mode="bilinear")
    t = t + torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, (h // p) * (w // p), -1)], 1)
    acts = []
    for i in range(cfg["depth"]):
        k = f"{vit}blocks.{i}."
        q, kk, v = _lin(_ln(t, sd, k + "norm1", 1e-6), sd, k + "attn.qkv").chunk(3, -1)
        t = t + _lin(_attention(q, kk, v, heads), sd, k + "attn.proj")
        t = t + _lin(F.gelu(_lin(_ln(t, sd, k + "norm2", 1e-6), sd, k + "mlp.fc1")), sd, k + "mlp.fc2")
        if i in cfg["hooks"]:
            acts.append(t)
    layers = []
    for n, (a, post) in enumerate(zip(acts, cfg["post"], strict=True), start=1):
        pp = f"net.pretrained.act_postprocess{n}."
        feats = torch.cat([a[:, 1:], a[:, :1].expand_as(a[:, 1:])], -1)
        y = F.gelu(_lin(feats, sd, pp + "0.project.0")).transpose(1, 2).unflatten(2, (h // p, w // p))
        y = F.conv2d(y, sd[pp + "3.weight"], sd[pp + "3.bias"])
        if post is not None and post[0] == "convT":
            y = F.conv_transpose2d(y, sd[pp + "4.weight"], sd[pp + "4.bias"], stride=post[1])
        elif post is not None:
            y = F.conv2d(y, sd[pp + "4.weight"], sd[pp + "4.bias"], stride=2, padding=1)
        layers.append(F.conv2d(y, sd[f"net.scratch.layer{n}_rn.weight"], padding=1))
    path = None
    for n in (4, 3, 2, 1):
        r = f"net.scratch.refinenet{n}"
        out = layers[n - 1] if path is None else path + _rcu(layers[n - 1], sd, r + ".resConfUnit1")
        out = F.interpolate(
            _rcu(out, sd, r + ".resConfUnit2"), scale_factor=2, mode="bilinear", align_corners=True
        )
        path = F.conv2d(out, sd[r + ".out_conv.weight"], sd[r + ".out_conv.bias"])
    img = F.conv2d(path, sd["net.scratch.head1.weight"], sd["net.scratch.head1.bias"])
    shape = img.shape
    img = img.permute(0, 2, 3, 1).reshape(-1, shape[1])
    img = img / img.norm(dim=-1, keepdim=True)
    txt = text_features / text_features.norm(dim=-1, keepdim=True)
    scale = torch.exp(torch.ones([]) * math.log(1 / 0.07))
    out = (scale * img @ txt.t()).view(shape[0], shape[2], shape[3], -1).permute(0, 3, 1, 2)
    if arch_option in (1, 2):
        for _ in range(block_depth - 1):
            out = _head_block(out, sd, arch_option, act=True)
        out = _head_block(out, sd, arch_option, act=False)
    return F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)


def _tokens(labels):
    return open_clip.get_tokenizer("ViT-B-32")(labels)


def _write_ckpt(path, cfg, arch_option=0, block_depth=0, seed=0):
    state = random_official_state(official_shapes(cfg, arch_option), seed)
    hyper = {"backbone": cfg["backbone"], "num_features": cfg["features"], "arch_option": arch_option,
             "block_depth": block_depth, "activation": "lrelu"}  # fmt: skip
    torch.save({"epoch": 1, "global_step": 10, "state_dict": state, "hyper_parameters": hyper}, path)
    return state


# ------------------------------------------------------------------------------------------ tests
def test_converted_vitb32_matches_official_reference(tmp_path):
    """THE key test: official-layout ViT-B/32 LSeg with random weights, 384x384 input."""
    start = time.perf_counter()
    ckpt = tmp_path / "lseg_vitb32.ckpt"
    state = _write_ckpt(ckpt, VITB32, seed=1)
    out_dir = convert_lseg_official(ckpt, tmp_path / "converted")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["variant"] == "lseg-vitb32-384" and config["kwargs"]["spatial_reg"] == "none"
    net, text_encoder, _ = load_lseg(out_dir)
    net.eval()
    torch.manual_seed(0)
    images, tokens = torch.rand(1, 3, 384, 384) * 2 - 1, _tokens(["cat", "a red sofa", "grass", "other"])
    with torch.no_grad():
        ours = net(images, text_encoder.encode(tokens))
        ref_text = ref_encode_text(state, tokens, heads=8)
        ref = ref_lseg({k: v.float() for k, v in state.items() if "clip" not in k}, VITB32, images, ref_text)
    assert ours.shape == ref.shape == (1, 4, 384, 384)
    assert torch.allclose(net.logit_scale.exp(), torch.tensor(1 / 0.07))
    diff = (ours - ref).abs().max().item()
    print(f"vitb32 max abs logit diff {diff:.2e}, {time.perf_counter() - start:.1f}s")
    assert ref.std() > 0.1  # the comparison is not between two near-constant maps
    assert diff < 1e-3


@pytest.mark.parametrize(("arch_option", "block_depth"), [(0, 0), (1, 2), (2, 3), (1, 0)])
def test_converted_tiny_matches_reference_with_spatial_reg(tmp_path, arch_option, block_depth):
    ckpt = tmp_path / "tiny.ckpt"
    state = _write_ckpt(ckpt, TINY, arch_option, block_depth, seed=2)
    net, text_encoder, config = load_lseg(ckpt, variant="lseg-tiny")
    net.eval()
    assert config["kwargs"]["spatial_reg"] == {0: "none", 1: "bottleneck", 2: "depthwise"}[arch_option]
    images, tokens = torch.rand(2, 3, 64, 96) * 2 - 1, _tokens(["cat", "sofa", "floor"])
    with torch.no_grad():
        ours = net(images, text_encoder.encode(tokens))
        ref_text = ref_encode_text(state, tokens, heads=2)
        flat = {k: v.float() for k, v in state.items() if "clip" not in k}
        ref = ref_lseg(flat, TINY, images, ref_text, arch_option, block_depth)
    assert ours.shape == (2, 3, 64, 96)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0)


def test_load_ckpt_and_converted_dir_agree(tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    _write_ckpt(ckpt, TINY, arch_option=1, block_depth=2, seed=3)
    out_dir = convert_lseg_official(ckpt, tmp_path / "out", variant="lseg-tiny")
    # langseg's one checkpoint layout; the text tower's tensors sit in the same file under text_encoder.
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    images, tokens = torch.rand(1, 3, 64, 64) * 2 - 1, _tokens(["a", "b"])
    results = []
    for source in (ckpt, out_dir, out_dir / "model.safetensors"):
        net, text_encoder, _ = load_lseg(source, variant="lseg-tiny")
        with torch.no_grad():
            results.append(net.eval()(images, text_encoder.encode(tokens)))
    assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])


def test_folders_converted_by_langseg_0_1_still_load(tmp_path):
    """langseg 0.1 wrote the network and the text tower to two files; such folders load unchanged."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "tiny.ckpt"
    _write_ckpt(ckpt, TINY, arch_option=0, block_depth=0, seed=4)
    new = convert_lseg_official(ckpt, tmp_path / "new", variant="lseg-tiny")
    state, config = load_file(str(new / "model.safetensors")), json.loads((new / "config.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    for name, prefix in (("model.safetensors", "net."), ("text_encoder.safetensors", "text_encoder.")):
        save_file(
            {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}, str(old / name)
        )
    config["weights"] = "model.safetensors"
    config["text_encoder"]["weights"] = "text_encoder.safetensors"
    (old / "config.json").write_text(json.dumps(config))
    images, tokens = torch.rand(1, 3, 64, 64) * 2 - 1, _tokens(["a", "b"])
    outputs = []
    for folder in (new, old):
        net, text_encoder, _ = load_lseg(folder)
        with torch.no_grad():
            outputs.append(net.eval()(images, text_encoder.encode(tokens)))
    assert torch.equal(outputs[0], outputs[1])


def test_missing_key_is_an_error_naming_it(tmp_path):
    state = random_official_state(official_shapes(TINY), 4)
    del state["net.scratch.refinenet2.resConfUnit1.bn1.running_var"]
    torch.save({"state_dict": state}, tmp_path / "m.ckpt")
    with pytest.raises(
        BadDataError, match=r"missing keys: net\.scratch\.refinenet2\.resConfUnit1\.bn1\.running_var$"
    ):
        convert_lseg_official(tmp_path / "m.ckpt", tmp_path / "out", variant="lseg-tiny")
    assert not (tmp_path / "out").exists()


def test_unexpected_key_is_an_error_naming_it(tmp_path):
    state = random_official_state(official_shapes(TINY), 5)
    state["net.scratch.auxlayer.weight"] = torch.zeros(3)
    state["net.logit_scale"] = torch.tensor(14.3)  # not in official checkpoints: a plain tensor attribute
    torch.save({"state_dict": state}, tmp_path / "u.ckpt")
    with pytest.raises(BadDataError, match=r"unexpected keys: .*net\.scratch\.auxlayer\.weight") as info:
        load_lseg(tmp_path / "u.ckpt", variant="lseg-tiny")
    assert "net.logit_scale" in str(info.value)


def test_spatial_reg_keys_without_arch_option_hint(tmp_path):
    torch.save({"state_dict": random_official_state(official_shapes(TINY, 1), 6)}, tmp_path / "s.ckpt")
    with pytest.raises(BadDataError, match="head_block") as info:
        load_lseg(tmp_path / "s.ckpt", variant="lseg-tiny")
    assert "arch_option" in info.value.hint


VITL16 = {
    **VITB32,
    **dict(backbone="clip_vitl16_384", width=1024, depth=24, heads=16, patch=16, hooks=(5, 11, 17, 23),
           widths=(256, 512, 1024, 1024), post=(("convT", 4), ("convT", 2), None, ("conv_s2",))),
}  # fmt: skip


@pytest.mark.parametrize("hyper", [{}, {"backbone": "clip_vitl16_384"}])
def test_vitl16_layout_maps_completely(hyper):
    """The paper's layout, on meta tensors (shapes only): every key maps, variant is inferred."""
    state = {k: torch.empty(shape, device="meta") for k, shape in official_shapes(VITL16).items()}
    converted = official_to_langseg(state, hyper)
    assert converted.config["variant"] == "lseg-vitl16-384"
    # timm norm/head (4), refinenet4.resConfUnit1 (2 convs + 2 BNs x 5), CLIP logit_scale and image tower
    dropped = 4 + 12 + 1 + len([k for k in state if ".visual." in k])
    assert len(converted.net_state) + len(converted.text_state) == len(state) - dropped + 1  # + logit_scale
    assert converted.net_state["reassemble.blocks.3.resample.weight"].shape == (1024, 1024, 3, 3)


class _Opaque:  # any non-tensor object: safe loading must refuse it
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": {}, "hyper_parameters": _Opaque()}, tmp_path / "p.ckpt")
    with pytest.raises(BadDataError, match="safe loading refuses") as info:
        convert_lseg_official(tmp_path / "p.ckpt", tmp_path / "out")
    assert "weights_only" in info.value.hint
