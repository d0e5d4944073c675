"""Tests for langseg.models.dense_clip against literal re-implementations and open_clip itself.

The references below are deliberately slow and literal (Python loops over heads, patches and grid
positions, q/k/v sliced out of in_proj_weight by hand, softmax and bicubic weights written out) so that
they share no code path with the vectorised module under test.
"""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
from open_clip.transformer import LayerScale

from langseg.errors import BadConfigError, BadImageError
from langseg.models.dense_clip import MODES, DenseCLIP, dense_logits, neighbourhood_bias

TOL = {"atol": 1e-10, "rtol": 1e-8}  # float64 throughout unless a test says otherwise
NATIVE, WIDE = (64, 64), (48, 80)  # WIDE: 3 x 5 patches, off the 4 x 4 native grid in both directions


def make_clip(ls_init: float | None, seed: int = 0) -> open_clip.CLIP:
    """Tiny random CLIP (ViT 64 px, patch 16, width 64, 4 heads, 3 layers; embed 32) in float64."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={
            "image_size": 64,
            "patch_size": 16,
            "width": 64,
            "head_width": 16,
            "layers": 3,
            "ls_init_value": ls_init,
        },
        text_cfg={"context_length": 16, "vocab_size": 100, "width": 64, "heads": 4, "layers": 2},
    )
    with torch.no_grad():  # default init has zero biases and unit LayerNorms; make every weight count
        for p in model.visual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double()


@pytest.fixture(scope="module", params=[None, 0.3], ids=["no-layerscale", "layerscale"])
def clip(request: pytest.FixtureRequest) -> open_clip.CLIP:
    return make_clip(request.param)


def images(size: tuple[int, int], batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- literal reference implementation


def lit_layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def lit_softmax(a: torch.Tensor) -> torch.Tensor:
    e = torch.exp(a - a.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def lit_layer_scale(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x * module.gamma if isinstance(module, LayerScale) else x


def lit_cubic(t: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel, the one torch's bicubic mode uses."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def lit_bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``n_out x n_in`` resampling matrix: half-pixel centres (align_corners=False), clamped borders."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for tap in range(-1, 3):
            m[o, min(max(base + tap, 0), n_in - 1)] += lit_cubic(tap - (src - base))
    return m


def lit_positional_embedding(pos: torch.Tensor, native: tuple[int, int], h: int, w: int) -> torch.Tensor:
    gh, gw = native
    if (h, w) == (gh, gw):
        return pos
    grid = pos[1:].reshape(gh, gw, -1)
    rows, cols = lit_bicubic_matrix(gh, h), lit_bicubic_matrix(gw, w)
    out = torch.zeros(h, w, pos.shape[1], dtype=pos.dtype)
    for i in range(h):
        for j in range(w):
            for a in range(gh):
                for b in range(gw):
                    out[i, j] += rows[i, a] * cols[j, b] * grid[a, b]
    return torch.cat([pos[:1], out.reshape(h * w, -1)])


def lit_gaussian(h: int, w: int, sigma: float) -> torch.Tensor:
    """NACLIP bias; index 0 is the class token (no bias), patch p sits at (p // w, p % w)."""
    g = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.float64)
    for p in range(h * w):
        for r in range(h * w):
            dist2 = (p // w - r // w) ** 2 + (p % w - r % w) ** 2
            g[1 + p, 1 + r] = math.exp(-dist2 / (2 * sigma**2))
    return g


def lit_dense(
    model: open_clip.CLIP,
    x: torch.Tensor,
    mode: str,
    sigma: float = 5.0,
    residual: bool | None = None,
    mlp: bool | None = None,
):
    """Literal dense CLIP: returns (cls B x D, patches B x D x h x w); residual/mlp default per mode."""
    full_block = mode in ("vanilla", "maskclip", "sclip")
    residual = full_block if residual is None else residual
    mlp = full_block if mlp is None else mlp
    v = model.visual
    bsz, _, height, width = x.shape
    p = v.patch_size[0]
    h, w = height // p, width // p
    c = v.conv1.out_channels
    kernel = v.conv1.weight.reshape(c, -1)
    tokens = [
        x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(bsz, -1) @ kernel.T
        for i in range(h)
        for j in range(w)
    ]
    t = torch.stack([v.class_embedding.expand(bsz, c), *tokens], dim=1)
    t = lit_layer_norm(t + lit_positional_embedding(v.positional_embedding, v.grid_size, h, w), v.ln_pre)
    for block in v.transformer.resblocks[:-1]:  # untouched blocks: open_clip's own code is the reference
        t = block(t)

    block = v.transformer.resblocks[-1]
    y = lit_layer_norm(t, block.ln_1)
    wi, bi = block.attn.in_proj_weight, block.attn.in_proj_bias
    heads = block.attn.num_heads
    d = c // heads
    s = 1.0 / math.sqrt(d)
    gauss = lit_gaussian(h, w, sigma)
    head_outputs = []
    for head in range(heads):
        rows = slice(head * d, (head + 1) * d)
        q = y @ wi[0 * c : 1 * c][rows].T + bi[0 * c : 1 * c][rows]
        k = y @ wi[1 * c : 2 * c][rows].T + bi[1 * c : 2 * c][rows]
        val = y @ wi[2 * c : 3 * c][rows].T + bi[2 * c : 3 * c][rows]
        if mode == "maskclip":
            head_outputs.append(val)
            continue
        if mode == "vanilla":
            a = lit_softmax(s * q @ k.transpose(1, 2))
        elif mode == "sclip":
            a = lit_softmax(s * q @ q.transpose(1, 2)) + lit_softmax(s * k @ k.transpose(1, 2))
        elif mode == "clearclip":
            a = lit_softmax(s * q @ q.transpose(1, 2))
        elif mode == "naclip":
            a = lit_softmax(s * k @ k.transpose(1, 2) + gauss)
        head_outputs.append(a @ val)
    o = torch.cat(head_outputs, dim=-1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    o = lit_layer_scale(block.ls_1, o)
    t = t + o if residual else o
    if mlp:
        t = t + lit_layer_scale(block.ls_2, block.mlp(lit_layer_norm(t, block.ln_2)))
    z = lit_layer_norm(t, v.ln_post) @ v.proj
    return z[:, 0], z[:, 1:].reshape(bsz, h, w, -1).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("size", [NATIVE, WIDE], ids=["native", "48x80"])
@pytest.mark.parametrize("mode", list(MODES))
def test_mode_matches_literal_reference(clip: open_clip.CLIP, mode: str, size: tuple[int, int]) -> None:
    x = images(size)
    cls, patches = DenseCLIP(clip, mode).forward_with_cls(x)
    ref_cls, ref_patches = lit_dense(clip, x, mode)
    assert patches.shape == (2, 32, size[0] // 16, size[1] // 16)
    assert torch.allclose(patches, ref_patches, **TOL)
    assert torch.allclose(cls, ref_cls, **TOL)


def test_modes_differ(clip: open_clip.CLIP) -> None:
    """Guards the reference too: every mode must change the output, or the comparison above is vacuous."""
    x = images(WIDE)
    outs = {mode: DenseCLIP(clip, mode)(x) for mode in MODES}
    for a in MODES:
        for b in MODES:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


def test_vanilla_cls_equals_encode_image(clip: open_clip.CLIP) -> None:
    x = images(NATIVE)
    cls, _ = DenseCLIP(clip, "vanilla").forward_with_cls(x)
    assert torch.allclose(cls, clip.encode_image(x, normalize=False), **TOL)


def test_vanilla_patches_equal_open_clip_forward_intermediates(clip: open_clip.CLIP) -> None:
    x = images(NATIVE)
    out = clip.visual.forward_intermediates(
        x, indices=1, normalize_intermediates=True, intermediates_only=True
    )
    last = out["image_intermediates"][-1]  # B x C x h x w, after the last block and ln_post
    expected = torch.einsum("bchw,cd->bdhw", last, clip.visual.proj)
    assert torch.allclose(DenseCLIP(clip, "vanilla")(x), expected, **TOL)


def test_interpolated_positional_embedding_literal_bicubic(clip: open_clip.CLIP) -> None:
    dense = DenseCLIP(clip, "vanilla")
    pos = clip.visual.positional_embedding
    for h, w in [(3, 5), (7, 2), (4, 4)]:
        expected = lit_positional_embedding(pos, (4, 4), h, w)
        assert torch.allclose(dense._positional_embedding(h, w), expected, **TOL)


def test_neighbourhood_bias_matches_loops() -> None:
    bias = neighbourhood_bias(3, 5, sigma=2.0, dtype=torch.float64)
    assert torch.allclose(bias, lit_gaussian(3, 5, 2.0), **TOL)
    assert math.isclose(bias[1 + 7, 1 + 7].item(), 1.0)  # peak 1 on the diagonal: unnormalised Gaussian
    assert torch.allclose(bias[0], torch.zeros(16, dtype=torch.float64))


def test_naclip_sigma_is_used(clip: open_clip.CLIP) -> None:
    x = images(WIDE)
    out = DenseCLIP(clip, "naclip", sigma=1.5)(x)
    assert torch.allclose(out, lit_dense(clip, x, "naclip", sigma=1.5)[1], **TOL)
    assert (out - DenseCLIP(clip, "naclip")(x)).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("mode", "residual", "mlp"),
    [("clearclip", True, True), ("maskclip", False, False), ("naclip", False, True), ("sclip", True, False)],
)
def test_residual_and_mlp_overrides(clip: open_clip.CLIP, mode: str, residual: bool, mlp: bool) -> None:
    x = images(WIDE)
    dense = DenseCLIP(clip, mode, residual=residual, mlp=mlp)
    assert (dense.last_block.residual, dense.last_block.mlp) == (residual, mlp)
    assert torch.allclose(dense(x), lit_dense(clip, x, mode, residual=residual, mlp=mlp)[1], **TOL)


def test_float32_matches_float64_reference(clip: open_clip.CLIP) -> None:
    x = images(WIDE)
    model32 = copy.deepcopy(clip).float()
    out = DenseCLIP(model32, "naclip")(x.float())
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), lit_dense(clip, x, "naclip")[1], atol=1e-5, rtol=1e-4)


def test_weights_shared_and_model_unchanged(clip: open_clip.CLIP) -> None:
    x = images(NATIVE)
    before = clip.encode_image(x)
    state = {k: t.clone() for k, t in clip.state_dict().items()}
    dense = DenseCLIP(clip, "naclip")
    ours = dict(dense.named_parameters())
    theirs = dict(clip.visual.named_parameters())
    assert sum(p.numel() for p in dense.parameters()) == sum(p.numel() for p in clip.visual.parameters())
    assert ours.keys() == {f"visual.{k}" for k in theirs}
    assert all(ours[f"visual.{k}"].data_ptr() == p.data_ptr() for k, p in theirs.items())
    assert not list(dense.buffers())  # caches are not state
    for mode in MODES:
        DenseCLIP(clip, mode)(images(WIDE))
        DenseCLIP(clip, mode)(x)
    assert torch.allclose(clip.encode_image(x), before, atol=0, rtol=0)
    after = clip.state_dict()
    assert after.keys() == state.keys()
    assert all(
        after[k].shape == t.shape and torch.allclose(after[k], t, atol=0, rtol=0) for k, t in state.items()
    )


def test_position_cache_hits_and_invalidates_on_weight_change() -> None:
    model = make_clip(None, seed=3)
    dense = DenseCLIP(model, "clearclip")
    x = images(WIDE)
    with torch.no_grad():
        first = dense(x)
        assert len(dense._pos_cache) == 1
        again = dense._positional_embedding(3, 5)
        assert again is dense._pos_cache[(3, 5, False)][1]
        model.visual.positional_embedding.mul_(1.5)  # in place, as an optimizer or load_state_dict would
        second = dense(x)
    assert (first - second).abs().max() > 1e-4
    assert torch.allclose(second, lit_dense(model, x, "clearclip")[1], **TOL)


def test_caches_stay_bounded() -> None:
    dense = DenseCLIP(make_clip(None, seed=6), "naclip")
    with torch.no_grad():
        for rows in range(1, 12):
            assert dense(images((16 * rows, 32), batch=1)).shape == (1, 32, rows, 2)
    assert 1 <= len(dense._pos_cache) <= 8
    assert 1 <= len(dense._bias_cache) <= 8


def test_gradients_flow_to_shared_weights_at_new_size() -> None:
    model = make_clip(None, seed=4)
    dense = DenseCLIP(model, "naclip")
    for _ in range(2):  # twice: a cached tensor with a stale graph would fail the second backward
        dense(images(WIDE)).square().sum().backward()
    pos_grad = model.visual.positional_embedding.grad
    assert pos_grad is not None and pos_grad.abs().sum() > 0
    assert not dense._pos_cache


def test_dense_logits_cosine_times_scale() -> None:
    gen = torch.Generator().manual_seed(5)
    patches = torch.randn(2, 8, 3, 4, generator=gen, dtype=torch.float64)
    texts = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    logits = dense_logits(patches, texts, torch.tensor(10.0, dtype=torch.float64))
    assert logits.shape == (2, 5, 3, 4)
    for b in range(2):
        for k in range(5):
            for i in range(3):
                for j in range(4):
                    p, t = patches[b, :, i, j], texts[k]
                    cos = (p @ t) / (p.norm() * t.norm())
                    assert math.isclose(logits[b, k, i, j].item(), 10.0 * cos.item(), rel_tol=1e-9)
    with pytest.raises(ValueError):
        dense_logits(patches, torch.randn(5, 7, dtype=torch.float64), 1.0)


def test_user_errors(clip: open_clip.CLIP) -> None:
    with pytest.raises(BadConfigError):
        DenseCLIP(clip, "gem")
    with pytest.raises(BadConfigError):
        DenseCLIP(torch.nn.Linear(3, 3))
    with pytest.raises(BadConfigError):
        DenseCLIP(clip, "naclip", sigma=0.0)
    with pytest.raises(BadImageError):
        DenseCLIP(clip)(images((50, 64)))
