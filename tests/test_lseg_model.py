"""LSegNet, its DPT pieces, the ViT tower, the spatial regularisation blocks and the text encoder."""

from __future__ import annotations

import math

import pytest
import torch

from langseg.errors import BadConfigError, BadExpressionError, BadImageError, BadLabelsError
from langseg.models import lseg
from langseg.models.backbones import resize_pos_embed
from langseg.models.dpt import DPTReassemble
from langseg.models.lseg import LSegNet, SpatialRegularizer
from langseg.models.text import ClipTextEncoder
from langseg.registry import get_model_entry, list_models
from langseg.zoo import lseg as _lseg_zoo  # noqa: F401  (registers the LSeg entries)


def _vit_params(c: int, patch: int, tokens: int, depth: int) -> int:
    # patch conv + cls + pos, then per block: 2 norms (4c), qkv (3c^2+3c), proj (c^2+c), mlp (8c^2+5c)
    return 3 * patch * patch * c + c + c + (tokens + 1) * c + depth * (12 * c * c + 13 * c)


def _dpt_params(c: int, widths: list[int], kernels: list[int | None], f: int, d: int) -> int:
    n = 4 * (2 * c * c + c)  # readout projections
    for w, k in zip(widths, kernels, strict=True):
        n += c * w + w + (w * w * k * k + w if k else 0) + w * f * 9  # 1x1 conv, resample, 3x3 proj
    rcu = 2 * 9 * f * f + 2 * 2 * f  # two bias-free 3x3 convs + two BatchNorm affines
    n += 3 * (2 * rcu) + rcu + 4 * (f * f + f)  # fusion: 3 with skip unit, deepest without; out convs
    return n + f * d + d + 1  # head and logit_scale


@pytest.mark.parametrize(
    ("name", "size", "expected_params"),
    [
        (
            "lseg-tiny",
            64,
            _vit_params(48, 16, 16, 4) + _dpt_params(48, [8, 16, 32, 32], [4, 2, None, 3], 16, 32),
        ),
        (
            "lseg-vitb32-384",
            64,
            _vit_params(768, 32, 144, 12) + _dpt_params(768, [96, 192, 384, 768], [8, 4, 2, None], 256, 512),
        ),
        (
            "lseg-vitl16-384",
            32,
            _vit_params(1024, 16, 576, 24)
            + _dpt_params(1024, [256, 512, 1024, 1024], [4, 2, None, 3], 256, 512),
        ),
    ],
)
def test_registered_variants_build_and_run(name, size, expected_params):
    entry = get_model_entry(name)
    assert (entry.family, entry.task) == ("lseg", "semantic")
    torch.manual_seed(0)
    net = entry.builder().eval()
    assert sum(p.numel() for p in net.parameters()) == expected_params
    text = torch.randn(3, net.embed_dim)
    with torch.no_grad():
        logits = net(torch.randn(2, 3, size, size + 32), text)
    assert logits.shape == (2, 3, size, size + 32)
    # cosine similarities scaled by 1/0.07 (bilinear upsampling keeps the bounds)
    assert logits.abs().max() <= 1 / 0.07 + 1e-4 and logits.std() > 0


def test_lseg_models_are_registered():
    assert {"lseg-vitl16-384", "lseg-vitb32-384", "lseg-tiny"} <= set(list_models(family="lseg"))


@pytest.fixture
def tiny() -> LSegNet:
    torch.manual_seed(0)
    return lseg.lseg_tiny(spatial_reg="bottleneck", spatial_reg_depth=2).eval()


def test_embeddings_cached_once_give_the_same_logits(tiny):
    images, text = torch.randn(2, 3, 64, 64), torch.randn(4, 32)
    with torch.no_grad():
        pixels = tiny.encode_image(images)
        assert pixels.shape == (2, 32, 16, 16)  # H/4: LSeg's embeddings are these upsampled x2
        embeddings = tiny.pixel_embeddings(pixels)
        assert embeddings.shape == (2, 32, 32, 32)
        assert torch.allclose(embeddings.norm(dim=1), torch.ones(2, 32, 32), atol=1e-5)
        assert torch.allclose(tiny.classify(pixels, text), tiny(images, text), atol=1e-6)
        # label embeddings are normalised inside: their scale does not matter
        assert torch.allclose(tiny(images, 7.0 * text), tiny(images, text), atol=1e-5)


def test_label_permutation_permutes_logits(tiny):
    images, text, perm = torch.randn(1, 3, 64, 96), torch.randn(5, 32), torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        assert torch.allclose(tiny(images, text[perm]), tiny(images, text)[:, perm], atol=1e-5)


def test_logit_scale_is_a_learnable_parameter(tiny):
    assert isinstance(tiny.logit_scale, torch.nn.Parameter) and tiny.logit_scale.requires_grad
    assert torch.allclose(tiny.logit_scale.exp(), torch.tensor(1 / 0.07))
    tiny.train()
    tiny(torch.randn(2, 3, 64, 64), torch.randn(3, 32)).square().mean().backward()
    assert tiny.logit_scale.grad is not None and tiny.logit_scale.grad.abs() > 0
    unused = [n for n, p in tiny.named_parameters() if p.grad is None]
    assert unused == []  # DistributedDataParallel needs every parameter used


def test_bad_inputs_raise_langseg_errors(tiny):
    with pytest.raises(BadLabelsError):
        tiny(torch.randn(1, 3, 64, 64), torch.randn(3, 16))
    with pytest.raises(BadLabelsError):
        tiny(torch.randn(1, 3, 64, 64), torch.randn(0, 32))
    with pytest.raises(BadImageError, match="multiple of the patch size"):
        tiny(torch.randn(1, 3, 60, 64), torch.randn(3, 32))
    with pytest.raises(BadConfigError):
        lseg.lseg_tiny(spatial_reg="maxpool")
    with pytest.raises(BadConfigError):
        lseg.lseg_tiny(readout="mean")


def _box_filter_3x3(x: list[list[float]]) -> list[list[float]]:
    """Sum over each 3x3 neighbourhood with zero padding, by hand."""
    h, w = len(x), len(x[0])
    return [
        [
            sum(
                x[a][b] for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if 0 <= a < h and 0 <= b < w
            )
            for j in range(w)
        ]
        for i in range(h)
    ]


def _with_box_kernel(block: SpatialRegularizer, bias: float) -> SpatialRegularizer:
    with torch.no_grad():
        block.conv.weight.fill_(1.0)
        block.conv.bias.fill_(bias)
    return block


def test_depthwise_block_known_answer():
    block = _with_box_kernel(SpatialRegularizer("depthwise", depth=1), bias=0.0)
    x = torch.ones(1, 1, 3, 3)
    expected = torch.tensor([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]])
    assert torch.allclose(block(x)[0, 0], expected)


def test_bottleneck_block_known_answer():
    # label 0 is all ones, label 1 all zeros: the max over labels is 1 everywhere.
    block = _with_box_kernel(SpatialRegularizer("bottleneck", depth=1), bias=0.0)
    x = torch.stack([torch.ones(3, 3), torch.zeros(3, 3)])[None]
    out = block(x)[0]
    assert torch.allclose(out[0], torch.tensor([[5.0, 7.0, 5.0], [7.0, 10.0, 7.0], [5.0, 7.0, 5.0]]))
    assert torch.allclose(out[1], torch.ones(3, 3))


@pytest.mark.parametrize("activation", ["relu", "lrelu", "tanh"])
def test_two_step_bottleneck_known_answer(activation):
    # bias -6 makes some first-step values negative so the activation matters; none after the last step
    block = _with_box_kernel(SpatialRegularizer("bottleneck", depth=2, activation=activation), bias=-6.0)
    x = [[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]], [[0.5, 3.0, 0.0], [1.0, 0.0, 1.0]]]  # K=2, H=2, W=3
    act = {"relu": lambda v: max(v, 0.0), "lrelu": lambda v: v if v > 0 else 0.01 * v, "tanh": math.tanh}[
        activation
    ]

    def step(maps, activate):
        top = [[max(m[i][j] for m in maps) for j in range(3)] for i in range(2)]
        out = [
            [[s + top[i][j] - 6.0 for j, s in enumerate(row)] for i, row in enumerate(_box_filter_3x3(m))]
            for m in maps
        ]
        return [[[act(v) for v in row] for row in m] for m in out] if activate else out

    expected = torch.tensor(step(step(x, True), False))
    assert torch.allclose(block(torch.tensor(x)[None])[0], expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["bottleneck", "depthwise"])
def test_spatial_reg_is_label_equivariant(kind):
    torch.manual_seed(1)
    block = SpatialRegularizer(kind, depth=3, activation="tanh")
    x, perm = torch.randn(2, 6, 8, 9), torch.randperm(6)
    assert torch.allclose(block(x[:, perm]), block(x)[:, perm], atol=1e-6)
    assert block.conv.weight.shape == (1, 1, 3, 3)  # one kernel whatever the number of labels


def test_resize_pos_embed_known_answers():
    pos = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pos, 1, (4, 4)) is pos
    # a horizontal ramp 0, 1, 2, 3 resampled to 6 columns; the class token is untouched
    ramp = torch.arange(4.0).repeat(4).reshape(1, 16, 1).expand(1, 16, 8)
    pos = torch.cat([torch.full((1, 1, 8), 9.0), ramp], dim=1)
    out = resize_pos_embed(pos, 1, (2, 6))
    assert out.shape == (1, 13, 8) and torch.equal(out[:, 0], pos[:, 0])
    grid = out[0, 1:, 0].reshape(2, 6)
    # bilinear, align_corners=False (DPT): source x = (x' + 0.5) * 4 / 6 - 0.5, clamped to [0, 3]
    expected = torch.tensor([0.0, 0.5, 7 / 6, 11 / 6, 2.5, 3.0])
    assert torch.allclose(grid, expected.expand(2, 6), atol=1e-6)


@pytest.mark.parametrize("readout", ["ignore", "add", "project"])
def test_reassemble_shapes_and_strides(readout):
    reassemble = DPTReassemble(embed_dim=24, widths=[4, 8, 12, 16], patch_size=16, readout=readout)
    tokens = [torch.randn(2, 1 + 3 * 5, 24) for _ in range(4)]
    maps = reassemble(tokens, (3, 5))
    assert [tuple(m.shape) for m in maps] == [(2, 4, 12, 20), (2, 8, 6, 10), (2, 12, 3, 5), (2, 16, 2, 3)]
    if readout == "ignore":  # the class token must not leak into the maps
        changed = [t.clone() for t in tokens]
        for t in changed:
            t[:, 0] += 5.0
        assert all(torch.equal(a, b) for a, b in zip(maps, reassemble(changed, (3, 5)), strict=True))


def test_clip_text_encoder_tiny():
    encoder = ClipTextEncoder(**lseg.TEXT_ENCODER_CONFIGS["lseg-tiny"])
    assert all(not p.requires_grad for p in encoder.parameters())
    tokens = torch.zeros(3, 77, dtype=torch.long)
    tokens[:, 0], tokens[0, 1:3], tokens[1, 1:2], tokens[2, 1:4] = 49406, 320, 2368, 1010
    tokens[[0, 1, 2], [3, 2, 4]] = 49407  # end-of-text, where CLIP reads the sentence embedding
    out = encoder.encode(tokens)
    assert out.shape == (3, 32) and encoder.output_dim == 32
    assert torch.allclose(encoder.encode(tokens[[2, 0]]), out[[2, 0]], atol=1e-5)  # labels are independent
    with pytest.raises(BadExpressionError):
        encoder.encode(torch.zeros(2, 78, dtype=torch.long))


def test_clip_text_encoder_default_is_vit_b32():
    encoder = ClipTextEncoder()
    assert encoder.output_dim == 512 and encoder.context_length == 77
    assert isinstance(encoder.text.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)  # open_clip config
    assert not isinstance(
        ClipTextEncoder(quick_gelu=True).text.transformer.resblocks[0].mlp.gelu, torch.nn.GELU
    )  # OpenAI weights need QuickGELU


def test_fusion_aligns_odd_token_grids():
    # 25x25 tokens: the stride-2 conv of the deepest level rounds up to 13, its x2 upsample to 26
    torch.manual_seed(0)
    net = lseg.lseg_tiny().eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 400, 400 - 16 * 4), torch.randn(2, 32))
    assert out.shape == (1, 2, 400, 336) and torch.isfinite(out).all()


def test_channels_last_dpt_gives_the_same_embeddings_and_saves(tmp_path) -> None:
    """The predictor's channels-last DPT (weights and activations NHWC) computes what the plain network
    computes, and its weights still save as a langseg checkpoint (safetensors wants contiguous tensors)."""
    from safetensors.torch import load_file

    from langseg import create_model
    from langseg.hub import save_checkpoint

    torch.manual_seed(0)
    net = create_model("lseg-tiny").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        plain = net.encode_image(x)
        assert net.use_channels_last() is net and net.channels_last
        assert net.decoder.proj[0].weight.is_contiguous(memory_format=torch.channels_last)
        fast = net.encode_image(x)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    folder = save_checkpoint(net, tmp_path / "ckpt", {"format": "langseg", "model": "lseg-tiny"})
    saved = load_file(folder / "model.safetensors")
    for key, value in net.state_dict().items():
        assert torch.equal(saved[key], value), key
    net.use_channels_last(False)
    assert net.decoder.proj[0].weight.is_contiguous() and not net.channels_last
