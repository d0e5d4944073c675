"""VLT network: shapes, hand-computed QBM/QGM/GRU answers, ablation switches, paper sizes, overfitting."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

import langseg
from langseg.errors import BadConfigError, BadImageError
from langseg.metrics import ReferringMetrics
from langseg.models.text_gru import ClipWordEncoder, GRUTextEncoder
from langseg.models.vlt import VLT, vlt_loss, vlt_tiny
from langseg.models.vlt_modules import QueryBalance, QueryGeneration, coord_channels, sine_1d, sine_2d
from langseg.predict.tokenizers import ClipTokenizer, Vocab

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def tokens(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    return ids, ids != 0


def test_module_shapes_and_cached_image_features() -> None:
    torch.manual_seed(0)
    model = vlt_tiny().eval()
    images = torch.rand(2, 3, 64, 64)
    ids, mask = tokens([[2, 3, 4], [5, 6]])
    features = model.encode_image(images)
    assert [tuple(f.shape) for f in features] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    words, mask_out, sentence = model.text(ids, mask)
    assert words.shape == (2, 3, 32) and sentence.shape == (2, 32) and torch.equal(mask_out, mask)
    query_features, memory = model.merge(features, sentence)
    assert query_features.shape == (2, 16, 16, 16) and memory.shape == (2, 32, 16, 16)
    queries = model.queries(query_features, words, mask, sentence)
    assert queries.shape == (2, 4, 32)
    responses = model.transformer(memory, queries)
    assert responses.shape == (2, 4, 32)
    maps = model.response_maps(model.qbm(responses, queries))
    assert maps.shape == (2, 4, 16, 16) and (maps >= 0).all()
    with torch.no_grad():
        logits = model(images, ids, mask)
        assert logits.shape == (2, 1, 64, 64)
        assert torch.allclose(model.decode(features, ids, mask), logits, atol=1e-5)
        # One encoded image serves many expressions: features of batch 1 broadcast over them.
        shared = model.decode(model.encode_image(images[:1]), ids, mask)
        assert torch.allclose(shared[0], logits[0], atol=1e-5)
    assert vlt_tiny(out_stride=4).eval()(images, ids, mask).shape == (2, 1, 16, 16)


def test_positional_encodings_and_coordinates() -> None:
    pe = sine_1d(3, 4)
    expected = [[math.sin(p), math.cos(p), math.sin(p / 100), math.cos(p / 100)] for p in range(3)]
    assert torch.allclose(pe, torch.tensor(expected), atol=1e-6)
    pe2 = sine_2d(2, 3, 8)
    assert pe2.shape == (6, 8)
    # The first half depends only on the row, the second only on the column.
    grid = pe2.view(2, 3, 8)
    assert torch.allclose(grid[:, 0, :4], grid[:, 2, :4]) and torch.allclose(grid[0, :, 4:], grid[1, :, 4:])
    coords = coord_channels(torch.zeros(1, 1, 2, 3))
    assert coords.shape == (1, 7, 2, 3)
    assert torch.allclose(coords[0, 1:4, 0], torch.tensor([-1.0, 0.0, 1.0]).expand(3, 3))
    assert torch.allclose(coords[0, 4:, :, 0], torch.tensor([-1.0, 1.0]).expand(3, 2))


def test_qbm_gate_is_sigmoid_of_the_hand_computed_mlp() -> None:
    qbm = QueryBalance(2)
    with torch.no_grad():
        qbm.response.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        qbm.response.bias.copy_(torch.tensor([0.0, 0.0]))
        qbm.query.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        qbm.query.bias.copy_(torch.tensor([0.0, -1.0]))
        qbm.hidden.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, -1.0, 1.0, 0.0]]))
        qbm.hidden.bias.copy_(torch.tensor([0.5, 0.0]))
        qbm.gate.weight.copy_(torch.tensor([[1.0, -2.0]]))
        qbm.gate.bias.copy_(torch.tensor([0.1]))
    r = [[1.0, -2.0], [0.5, 3.0]]
    q = [[2.0, 1.0], [-1.0, 0.5]]
    relu = lambda v: max(v, 0.0)  # noqa: E731
    gates = []
    for (r0, r1), (q0, q1) in zip(r, q, strict=True):
        joint = [relu(r0), relu(r1), relu(q1), relu(q0 - 1.0)]
        h = [relu(joint[0] + joint[3] + 0.5), relu(-joint[1] + joint[2])]
        gates.append(1.0 / (1.0 + math.exp(-(h[0] - 2.0 * h[1] + 0.1))))
    responses, queries = torch.tensor([r]), torch.tensor([q])
    assert torch.allclose(qbm.confidence(responses, queries)[0, :, 0], torch.tensor(gates), atol=1e-6)
    expected = torch.tensor([[[g * v for v in row] for g, row in zip(gates, r, strict=True)]])
    assert torch.allclose(qbm(responses, queries), expected, atol=1e-6)


def test_qgm_query_is_attention_weighted_words_plus_residual() -> None:
    torch.manual_seed(0)
    qgm = QueryGeneration(in_channels=1, grid_cells=4, num_queries=2, text_dim=2, dim=2, heads=1).eval()
    eye = torch.eye(2)
    with torch.no_grad():
        for linear in (qgm.words, qgm.q_proj, qgm.k_proj, qgm.v_proj):
            linear.weight.copy_(eye)
            linear.bias.zero_()
        qgm.visual.weight.copy_(torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, -0.5]]))
        qgm.visual.bias.copy_(torch.tensor([0.2, 0.1]))
        qgm.attention.in_proj_weight.copy_(torch.cat([eye, eye, eye]))
        qgm.attention.in_proj_bias.zero_()
        qgm.attention.out_proj.weight.copy_(eye)
        qgm.attention.out_proj.bias.zero_()
    x = torch.randn(1, 1, 2, 2)
    words = torch.tensor([[[0.5, 1.0], [2.0, -1.0], [9.0, 9.0]]])  # the third word is padding
    mask = torch.tensor([[True, True, False]])
    with torch.no_grad():
        out = qgm(x, words, mask)
        maps = qgm.spatial_maps(x)[0].flatten(1).tolist()  # 2 queries x 4 cells
    relu = lambda v: max(v, 0.0)  # noqa: E731
    w_v, b_v = [[1.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, -0.5]], [0.2, 0.1]
    pe = [[math.sin(p), math.cos(p)] for p in range(3)]
    keys = [[relu(relu(words[0, i, c].item()) + pe[i][c]) for c in range(2)] for i in range(2)]
    for n in range(2):
        visual = [relu(sum(w_v[c][j] * maps[n][j] for j in range(4)) + b_v[c]) for c in range(2)]
        query = [relu(visual[c] + pe[n][c]) for c in range(2)]
        scores = [sum(query[c] * keys[i][c] for c in range(2)) / math.sqrt(2) for i in range(2)]
        weights = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
        expected = [sum(weights[i] * keys[i][c] for i in range(2)) + visual[c] for c in range(2)]
        assert out[0, n].tolist() == pytest.approx(expected, abs=1e-5)


def test_gru_attention_pooling_matches_a_literal_loop() -> None:
    torch.manual_seed(0)
    encoder = GRUTextEncoder(vocab_size=10, word_dim=3, hidden_dim=4).eval()
    ids, mask = tokens([[2, 3, 4, 5], [6, 7]])
    with torch.no_grad():
        words, _, sentence = encoder(ids, mask)
        # Bi-GRU, directions summed, on the unpadded second sentence alone.
        alone, _ = encoder.gru(encoder.embed(torch.tensor([[6, 7]])))
        assert torch.allclose(words[1, :2], alone[0, :, :4] + alone[0, :, 4:], atol=1e-6)
        assert torch.equal(words[1, 2:], torch.zeros(2, 4))
        weight, bias = encoder.attention.weight.tolist(), encoder.attention.bias.tolist()
    for b in range(2):
        length = int(mask[b].sum())
        h = words[b, :length].tolist()
        for c in range(4):
            scores = [
                math.tanh(sum(weight[c][k] * h[i][k] for k in range(4)) + bias[c]) for i in range(length)
            ]
            total = sum(math.exp(s) for s in scores)
            pooled = sum(math.exp(scores[i]) / total * h[i][c] for i in range(length))
            assert sentence[b, c].item() == pytest.approx(pooled, abs=1e-5)
    # Padding does not change a sentence's features.
    with torch.no_grad():
        short_ids, short_mask = tokens([[6, 7]])
        _, _, short = encoder(short_ids, short_mask)
    assert torch.allclose(short[0], sentence[1], atol=1e-6)


def test_ablation_switches_change_the_architecture_as_intended() -> None:
    torch.manual_seed(0)
    base = vlt_tiny()
    d, nq, text_dim = 32, 4, 32
    assert n_params(base.qbm) == 2 * (d * d + d) + (2 * d * d + d) + (d + 1)
    no_qbm = vlt_tiny(qbm=False)
    assert no_qbm.qbm is None and n_params(base) - n_params(no_qbm) == n_params(base.qbm)
    learnt = vlt_tiny(query_source="learnt")
    assert learnt.qgm is None and n_params(learnt) == n_params(base) - n_params(base.qgm) + nq * d
    text = vlt_tiny(query_source="text")
    assert text.qgm is None and n_params(text) == n_params(base) - n_params(base.qgm) + text_dim * d + d
    conv = vlt_tiny(decoder="conv")
    assert conv.transformer is None and conv.qgm is None and conv.qbm is None
    removed = sum(n_params(m) for m in (base.qgm, base.transformer, base.qbm, base.response_maps))
    added = 4 * (9 * d * d + 2 * d) + (d - nq) * d * 9  # 4 conv layers; mask head reads D, not Nq, maps
    assert n_params(conv) == n_params(base) - removed + added
    more = vlt_tiny(num_queries=8)
    # The QGM's last 1x1 conv (22 channels in, + bias) and the mask head's first conv read 4 more maps.
    assert n_params(more) - n_params(base) == 4 * (22 + 1) + 4 * d * 9
    images, (ids, mask) = torch.rand(2, 3, 64, 64), tokens([[2, 3, 4], [5, 6]])
    for model in (no_qbm, learnt, text, conv, more, vlt_tiny(memory_pos="sine1d")):
        assert model.eval()(images, ids, mask).shape == (2, 1, 64, 64)
    with torch.no_grad():
        words, m, sentence = text.text(ids, mask)
        q = text.queries(torch.zeros(2, 16, 16, 16), words, m, sentence)
        assert torch.allclose(q[:, 0], q[:, 3])  # the sentence feature is every query
        q = learnt.queries(torch.zeros(2, 16, 16, 16), words, m, sentence)
        assert torch.equal(q[0], learnt.learnt_query.weight) and torch.equal(q[1], q[0])


def test_bad_configurations_and_inputs_raise_langseg_errors() -> None:
    with pytest.raises(BadConfigError, match="query_source"):
        vlt_tiny(query_source="words")
    with pytest.raises(BadConfigError, match="decoder"):
        vlt_tiny(decoder="lstm")
    with pytest.raises(BadConfigError, match="out_stride"):
        vlt_tiny(out_stride=3)
    with pytest.raises(BadConfigError, match="multiple"):
        vlt_tiny(input_size=60)
    with pytest.raises(BadConfigError, match="timm"):
        vlt_tiny(backbone="no_such_net")
    with pytest.raises(BadImageError, match="64 x 64") as info:
        vlt_tiny().eval()(torch.rand(1, 3, 48, 48), *tokens([[2]]))
    assert "Letterbox" in info.value.hint


def test_loss_is_official_bce_sum_per_image_with_area_targets() -> None:
    logits = torch.randn(2, 1, 4, 4)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :3, :3] = True  # cell (0, 0) fully inside, cells (0, 1) and (1, 0) half, (1, 1) a quarter
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, 0, 0], target[0, 0, 0, 1], target[0, 0, 1, 0], target[0, 0, 1, 1] = 1.0, 0.5, 0.5, 0.25
    p = torch.sigmoid(logits)
    manual = -(target * p.log() + (1 - target) * (1 - p).log()).sum() / 2
    assert torch.allclose(vlt_loss(logits, masks), manual, atol=1e-5)
    assert torch.allclose(vlt_loss(logits, masks, reduction="mean"), manual * 2 / 32, atol=1e-6)


def test_input_resolution_loss_upsamples_logits_like_the_predictor() -> None:
    # One 2 x 2 logit grid on a 4 x 4 mask: bilinear (align_corners=False) upsampling by hand. Each
    # output pixel's source coordinate is (i + 0.5) / 2 - 0.5, clamped to [0, 1] on the edges.
    logits = torch.tensor([[[[0.0, 4.0], [-2.0, 2.0]]]])
    weights = torch.tensor([0.0, 0.25, 0.75, 1.0])  # weight of the second row/column per output index
    up = torch.empty(4, 4)
    for i in range(4):
        for j in range(4):
            top = logits[0, 0, 0, 0] * (1 - weights[j]) + logits[0, 0, 0, 1] * weights[j]
            bottom = logits[0, 0, 1, 0] * (1 - weights[j]) + logits[0, 0, 1, 1] * weights[j]
            up[i, j] = top * (1 - weights[i]) + bottom * weights[i]
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :, 3] = True  # a 1-pixel stripe: the output-resolution target would blur it to 0.5
    p = torch.sigmoid(up)
    per_pixel = -(masks[0] * p.log() + (~masks[0]) * (1 - p).log())
    assert torch.allclose(vlt_loss(logits, masks, "mean", "input"), per_pixel.mean(), atol=1e-6)
    # "image" reduction keeps the output-pixel scale: the 16 input pixels count as 4 output pixels.
    assert torch.allclose(vlt_loss(logits, masks, "image", "input"), per_pixel.sum() / 4, atol=1e-5)
    assert not torch.allclose(vlt_loss(logits, masks, "mean", "output"), per_pixel.mean(), atol=1e-3)
    with pytest.raises(BadConfigError, match="resolution"):
        vlt_loss(logits, masks, "mean", "pixels")


def test_lower_features_reach_the_mask_head() -> None:
    torch.manual_seed(0)
    base, lower = vlt_tiny(), vlt_tiny(concat_lower_feat=True)
    # The third CBL of the head reads the 16 query-feature channels too (3x3 conv, no bias).
    assert n_params(lower) - n_params(base) == 16 * 32 * 9
    images, (ids, mask) = torch.rand(2, 3, 64, 64), tokens([[2, 3, 4], [5, 6]])
    lower.eval()
    with torch.no_grad():
        features = lower.encode_image(images)
        words, m, sentence = lower.text(ids, mask)
        query_features, memory = lower.merge(features, sentence)
        logits = lower(images, ids, mask)
        # Perturbing only the lower features changes the logits: they are an input of the head.
        responses = lower.qbm(
            lower.transformer(memory, lower.queries(query_features, words, m, sentence)),
            lower.queries(query_features, words, m, sentence),
        )
        maps = lower.response_maps(responses)
        assert torch.allclose(lower.mask_head(maps, query_features), logits, atol=1e-5)
        assert not torch.allclose(lower.mask_head(maps, query_features + 1.0), logits, atol=1e-3)
        conv = vlt_tiny(decoder="conv", concat_lower_feat=True).eval()
        assert conv(images, ids, mask).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="lower"):
        lower.mask_head(maps)


def test_fine_skip_joins_the_finest_map_at_its_own_resolution() -> None:
    torch.manual_seed(0)
    base, skip = vlt_tiny(), vlt_tiny(fine_skip=True)
    # 1x1 CBL 16 -> 16 (+ BN), 16 more input channels for the joining 3x3 CBL, one extra 3x3 CBL 32 -> 32.
    assert n_params(skip) - n_params(base) == (16 * 16 + 32) + 16 * 32 * 9 + (32 * 32 * 9 + 64)
    skip.eval()
    images, (ids, mask) = torch.rand(2, 3, 64, 64), tokens([[2, 3, 4], [5, 6]])
    with torch.no_grad():
        features = skip.encode_image(images)
        maps = torch.rand(2, 4, 16, 16)
        fine = features[0]
        assert fine.shape == (2, 16, 32, 32)
        logits = skip.mask_head(maps, None, fine)
        assert logits.shape == (2, 1, 64, 64)
        # One fine cell changed: the logits move around its place in the image and nowhere far from it,
        # so the map joins at its own (stride 2) resolution rather than pooled to the grid.
        bumped = fine.clone()
        bumped[:, :, 10, 20] += 5.0
        change = (skip.mask_head(maps, None, bumped) - logits).abs()[0, 0]
        assert change[20:22, 40:42].max() > 1e-3
        far = change.clone()
        far[20 - 12 : 22 + 12, 40 - 12 : 42 + 12] = 0
        assert far.max() == 0
        assert skip(images, ids, mask).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="fine"):
        skip.mask_head(maps)
    with pytest.raises(BadConfigError, match="fine_skip"):
        vlt_tiny(fine_skip=True, out_stride=4)


def test_paper_and_other_backbones_build_with_official_sizes() -> None:
    paper = langseg.create_model("vlt-darknet53").eval()
    assert paper.backbone.channels == [256, 512, 1024] and paper.backbone.reductions == [8, 16, 32]
    assert paper.grid == (26, 26) and paper.qgm.visual.in_features == 676
    assert paper.top is not None and isinstance(paper.text, GRUTextEncoder) and paper.text.output_dim == 1024
    assert len(paper.transformer.encoder) == 2 and len(paper.transformer.decoder) == 2
    assert paper.transformer.encoder[0].self_attn.num_heads == 8
    assert paper.transformer.encoder[0].linear1.out_features == 256 and paper.num_queries == 16
    with torch.no_grad():
        assert paper(torch.rand(1, 3, 416, 416), *tokens([[2, 3]])).shape == (1, 1, 208, 208)
    small = {"text": {"kind": "gru", "vocab_size": 10, "word_dim": 8, "hidden_dim": 16}, "fusion_dim": 32}
    small |= {"hidden_dim": 16, "num_heads": 2, "ffn_dim": 16, "num_queries": 2, "out_stride": 8}
    swin_kwargs = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 4}
    swin = VLT("swin_base_patch4_window12_384", swin_kwargs, input_size=128, **small).eval()
    assert swin.backbone.nhwc and swin.backbone.channels == [32, 64, 128]
    resnet = VLT("resnet50", input_size=64, **small).eval()
    assert resnet.backbone.channels == [512, 1024, 2048] and resnet.backbone.reductions == [8, 16, 32]
    with torch.no_grad():
        assert swin(torch.rand(1, 3, 128, 128), *tokens([[2]])).shape == (1, 1, 16, 16)


def test_clip_word_encoder_gives_per_token_features() -> None:
    cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    text = {"kind": "clip", "model_name": None, "embed_dim": 32, "text_cfg": cfg}
    model = vlt_tiny(text=text).eval()
    assert isinstance(model.text, ClipWordEncoder) and not any(
        p.requires_grad for p in model.text.parameters()
    )
    tokenizer = ClipTokenizer("ViT-B-32")
    ids, mask = tokenizer.encode_batch(["the red circle", "the small blue square on the left"])
    assert ids.shape[1] == 9 and mask.sum(1).tolist() == [5, 9]  # start + words + end, trimmed
    with torch.no_grad():
        words, _, sentence = model.text(ids, mask)
        full = model.text.text(torch.nn.functional.pad(ids, (0, 77 - ids.shape[1])))[0]
        assert torch.allclose(sentence, full, atol=1e-5)  # trimming padding changes nothing
        # The pooled sentence is the end-of-text token's projected feature.
        assert torch.allclose(words[0, 4], sentence[0], atol=1e-5) and torch.equal(
            words[0, 5:], torch.zeros(4, 32)
        )
        assert model(torch.rand(2, 3, 64, 64), ids, mask).shape == (2, 1, 64, 64)


@pytest.mark.slow
def test_tiny_vlt_overfits_a_handful_of_shapeworld_samples() -> None:
    """A plain AdamW loop fits six ShapeWorld-Ref samples at 64 x 64 (about 25 s on one core)."""
    from langseg.data import ShapeWorldConfig, ShapeWorldReferring
    from langseg.predict.referrer import Referrer

    torch.manual_seed(0)
    data = ShapeWorldReferring(4, seed=0, config=ShapeWorldConfig(size=64))
    samples = [data[i] for i in range(0, len(data), len(data) // 6)][:6]
    texts = [s["text"] for s in samples]
    vocab = Vocab.build(texts)
    images = torch.stack([s["image"] for s in samples]).float() / 255
    masks = torch.stack([s["mask"] for s in samples])
    ids, mask = vocab.encode_batch(texts)
    model = vlt_tiny(text={"kind": "gru", "vocab_size": len(vocab), "word_dim": 32, "hidden_dim": 32})
    steps = 150
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        loss = vlt_loss(model(images, ids, mask), masks, reduction="mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    # Evaluate through the predictor: letterbox, sigmoid, threshold 0.35, original size.
    referrer = Referrer(model, vocab)
    metrics = ReferringMetrics()
    for sample in samples:
        result = referrer.refer(sample["image"], sample["text"])
        metrics.update(torch.from_numpy(result.mask), sample["mask"])
    scores = metrics.compute().as_dict()
    elapsed = time.perf_counter() - start
    print(f"overfit: {scores} after {steps} steps in {elapsed:.1f} s")  # shown with pytest -s / -rP
    assert scores["mIoU"] > 0.9 and scores["oIoU"] > 0.9, (scores, elapsed)
